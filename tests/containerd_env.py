"""Real container plumbing for the end-to-end test and bench/container_start.py.

* :func:`python_rootfs_tar` — a Debian bookworm ``debootstrap --variant=minbase --include=python3`` tree,
  made once and cached as a tarball (tests/rootfs_cache.py).
* :class:`Registry` — tests/registry_env.py's ``docker-registry``, started at once, with the push helpers an OCI
  image needs (layers with their sizes, manifests).
* :func:`push_oci_image` — an OCI image (one gzip layer per tar) pushed to the registry.
* :class:`Containerd` — containerd + nydus-snapshotter (``--nydusd rafsfs-nydusd`` in ``nydusd_mode``) and, on
  request, soci-snapshotter, all under one private root; ``ctr``/``ctr-remote`` wrappers.

Everything started here is stopped by ``close()`` (mounts under the root are unmounted, processes killed), also
when a test fails.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from registry_env import Registry as TestRegistry
from treeutil import sha256_file

REPO = Path(__file__).resolve().parent.parent
CI_CACHE = Path(os.environ.get("RAFSFS_CI_CACHE", "/var/cache/rafsfs-ci"))

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def which(name: str) -> str | None:
    return shutil.which(name)


# ------------------------------------------------------------------------------------------------ the rootfs
def python_rootfs_tar() -> Path:
    """rootfs.tar of debootstrap minbase + python3 (bookworm): the same cached tree the FUSE tests use
    (tests/rootfs_cache.py), so a fresh machine debootstraps once."""
    from rootfs_cache import ensure_test_rootfs

    tar = ensure_test_rootfs().parent / "rootfs.tar"
    if not tar.is_file():
        raise RuntimeError(f"{tar} is missing: delete {tar.parent} to debootstrap again")
    return tar


def gzip_file(src: Path, dst: Path, level: int = 1) -> None:
    """gzip ``src`` into ``dst`` (gzip(1) when present: several times faster than the gzip module)."""
    tmp = dst.with_name(dst.name + ".partial")
    if which("gzip"):
        with open(tmp, "wb") as out:
            subprocess.run(["gzip", f"-{level}", "-n", "-c", str(src)], stdout=out, check=True)
    else:
        with open(src, "rb") as f, gzip.open(tmp, "wb", compresslevel=level, mtime=0) as g:
            shutil.copyfileobj(f, g, 1 << 20)
    os.replace(tmp, dst)


# ------------------------------------------------------------------------------------------------ registry
class Registry(TestRegistry):
    """tests/registry_env.py's docker-registry, started at once, plus the push helpers an OCI image needs.
    ``tls=True`` serves HTTPS (certificate for 127.0.0.1 and 0.0.0.0, ``ca_file`` its CA); ``storage``: serve
    another registry's storage (soci needs a TLS twin of the plain registry)."""

    def __init__(self, workdir: Path, tls: bool = False, storage: Path | None = None):
        Path(workdir).mkdir(parents=True, exist_ok=True)
        super().__init__(Path(workdir), tls=tls, shared_storage=storage)
        self.start()

    def push_layer(self, repo: str, path: Path | None = None, data: bytes | None = None) -> tuple[str, int]:
        """Upload a blob; returns (``sha256:...`` digest, size)."""
        body = data if data is not None else Path(path).read_bytes()
        return "sha256:" + self.push_blob(repo, body), len(body)

    def close(self) -> None:
        self.stop()


def image_config(diff_ids: list[str], cmd: list[str] | None = None) -> dict:
    return {"architecture": "amd64", "os": "linux",
            "config": {"Env": [PATH_ENV], "Cmd": cmd or ["/usr/bin/python3"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": "rafsfs tests"} for _ in diff_ids]}


def push_oci_image(registry: Registry, repo: str, tag: str, layer_tars: list[Path], cache_dir: Path) -> str:
    """Push an OCI image with one gzip layer per tar (gzipped layers cached in ``cache_dir``); returns the ref."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    layers, diff_ids = [], []
    for tar in layer_tars:
        diff = sha256_file(tar)
        gz = cache_dir / f"{diff}.tar.gz"
        if not gz.exists():
            gzip_file(tar, gz)
        digest, size = registry.push_layer(repo, gz)
        layers.append({"mediaType": MT_LAYER_GZIP, "digest": digest, "size": size})
        diff_ids.append("sha256:" + diff)
    cfg = json.dumps(image_config(diff_ids)).encode()
    cdigest, csize = registry.push_layer(repo, data=cfg)
    registry.push_manifest(repo, tag, {"schemaVersion": 2, "mediaType": MT_MANIFEST,
                                       "config": {"mediaType": MT_CONFIG, "digest": cdigest, "size": csize},
                                       "layers": layers})
    return f"{registry.host}/{repo}:{tag}"


# ------------------------------------------------------------------------------------------------ containerd
@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


class Containerd:
    """containerd with nydus-snapshotter (nydusd = rafsfs-nydusd in ``nydusd_mode``: fuse, fanotify or auto, through
    ``RAFSFS_NYDUSD_MODE``; dedicated daemons) and optionally
    soci-snapshotter, under ``root`` (keep it short: unix socket paths are limited to 107 bytes)."""

    NS = "rafsfs"

    def __init__(self, root: Path, soci: bool = False, nydusd: str | None = None, ca_file: Path | None = None,
                 prefetch_all: bool = False, nydusd_mode: str = "fuse"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.address = str(self.root / "c.sock")
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self._logs: list = []
        nydus_sock = self.root / "nydus.sock"
        soci_sock = self.root / "soci.sock"
        plugins = f"""
[proxy_plugins.nydus]
  type = "snapshot"
  address = "{nydus_sock}"
"""
        if soci:
            plugins += f"""
[proxy_plugins.soci]
  type = "snapshot"
  address = "{soci_sock}"
"""
        (self.root / "containerd.toml").write_text(f"""version = 2
root = "{self.root / 'croot'}"
state = "{self.root / 'cstate'}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.address}"
[ttrpc]
  address = "{self.address}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[proxy_plugins]
{plugins}
""")
        # the console script next to this interpreter (a pyenv shim on PATH would add its own start-up time)
        self.nydusd = (nydusd or shutil.which("rafsfs-nydusd", path=os.path.dirname(sys.executable))
                       or shutil.which("rafsfs-nydusd") or "rafsfs-nydusd")
        # nydusd's config template; the snapshotter fills in the registry host, repo and work dir
        self.nydusd_config = self.root / "nydusd-config.json"
        self.nydusd_config.write_text(json.dumps({
            "device": {"backend": {"type": "registry",
                                   "config": {"scheme": "http", "timeout": 30, "connect_timeout": 5,
                                              "retry_limit": 2}},
                       "cache": {"type": "blobcache", "config": {"work_dir": str(self.root / "nydus" / "cache")}}},
            "mode": "direct", "digest_validate": True, "enable_xattr": True,
            # prefetch_all: what the snapshotter's shipped nydusd config does (the whole blob in the background,
            # behind on-demand reads); off by default here so tests can see what on-demand reading alone fetched
            "fs_prefetch": {"enable": prefetch_all, "prefetch_all": prefetch_all, "threads_count": 2}}))
        try:
            self._start("nydus-snapshotter",
                        ["containerd-nydus-grpc", "--root", str(self.root / "nydus"), "--address", str(nydus_sock),
                         "--nydusd", self.nydusd, "--nydus-image", "/bin/true",
                         "--nydusd-config", str(self.nydusd_config), "--fs-driver", "fusedev",
                         "--daemon-mode", "dedicated", "--log-level", "info", "--log-to-stdout"],
                        nydus_sock, env={"RAFSFS_NYDUSD_MODE": nydusd_mode})  # rafsfs-nydusd: fuse|fanotify|auto
            if soci:
                # soci-snapshotter 0.4.1 fetches SOCI indexes over HTTPS only (its artifact fetcher has no plain-HTTP
                # switch), so it reads from a TLS registry whose certificate is ``ca_file``
                (self.root / "soci.toml").write_text("")
                self._start("soci-snapshotter",
                            ["soci-snapshotter-grpc", "--root", str(self.root / "soci"), "--address", str(soci_sock),
                             "--config", str(self.root / "soci.toml"), "--log-level", "warn"], soci_sock,
                            env={"SSL_CERT_FILE": str(ca_file)} if ca_file else None)
            self._start("containerd", ["containerd", "--config", str(self.root / "containerd.toml"),
                                       "--log-level", "warn"], Path(self.address))
        except BaseException:
            self.close()
            raise

    def _start(self, name: str, argv: list[str], sock: Path, timeout: float = 30, env: dict | None = None) -> None:
        log = open(self.root / f"{name}.log", "ab")
        self._logs.append(log)
        env = dict(os.environ, **(env or {}))
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                             start_new_session=True)
        self.procs.append((name, p))
        deadline = time.monotonic() + timeout
        while not sock.exists():
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: {self.log(name)[-3000:]}")
            time.sleep(0.05)

    def log(self, name: str) -> str:
        try:
            return (self.root / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""

    # ------------------------------------------------------------------ commands
    def _run(self, tool: str, args: list[str], timeout: float = 300, check: bool = True) -> Result:
        argv = [tool, "--address", self.address, "--namespace", self.NS, *args]
        t0 = time.perf_counter()
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        r = Result(p.returncode, p.stdout, p.stderr, time.perf_counter() - t0)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {p.returncode}\nstdout: {p.stdout[-2000:]}\n"
                                 f"stderr: {p.stderr[-3000:]}\n--- nydus-snapshotter log tail ---\n"
                                 f"{self.log('nydus-snapshotter')[-3000:]}\n--- nydusd logs ---\n"
                                 f"{self.nydusd_logs()[-3000:]}")
        return r

    def ctr(self, *args: str, **kw) -> Result:
        return self._run("ctr", list(args), **kw)

    def ctr_remote(self, *args: str, **kw) -> Result:
        return self._run("ctr-remote", list(args), **kw)

    def soci(self, *args: str, **kw) -> Result:
        return self._run("soci", list(args), **kw)

    def rpull_nydus(self, ref: str) -> Result:
        return self.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "nydus", ref)

    def run(self, ref: str, *cmd: str, snapshotter: str = "nydus", name: str | None = None,
            check: bool = True, timeout: float = 300) -> Result:
        name = name or f"c{time.monotonic_ns()}"
        return self.ctr("run", "--rm", "--snapshotter", snapshotter, ref, name, *cmd, check=check, timeout=timeout)

    def remove_image(self, ref: str) -> None:
        self.ctr("images", "rm", "--sync", ref, check=False)

    def nydusd_logs(self) -> str:
        out = []
        for f in sorted((self.root / "nydus" / "logs").glob("*/*.log")) if (self.root / "nydus").exists() else []:
            out.append(f"== {f}\n{f.read_text(errors='replace')}")
        return "\n".join(out)

    def nydusd_pids(self) -> list[int]:
        """Processes running rafsfs-nydusd under this root."""
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(b"nydusd" in c for c in cmd[:2]) and any(str(self.root).encode() in c for c in cmd):
                pids.append(int(d.name))
        return pids

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        for _name, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()
        for pid in self.nydusd_pids():  # daemons the snapshotter did not stop
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(0.3)
        umount_under(self.root)
        for f in self._logs:
            f.close()
        self._logs.clear()


def umount_under(root: Path) -> None:
    prefix = str(Path(root).resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        targets = [ln.split()[4].encode().decode("unicode_escape") for ln in f]
    for t in sorted({t for t in targets if t.startswith(prefix)}, key=len, reverse=True):
        subprocess.run(["umount", "-l", t], capture_output=True)


def short_tmpdir(prefix: str) -> Path:
    """A short directory under /tmp (socket paths inside it must stay under 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# ------------------------------------------------------------------------------------------------ the test VM
class ThrottleProxy:
    """A TCP relay on 127.0.0.1 in front of a server (a registry), whose pace a guest of the test VM sets by writing
    a number to ``control`` (a file in a directory the VM shares writable): bytes per second from the server to the
    client, ``0`` to stall (nothing forwarded until the file changes), empty for full speed.  A read of a big file
    then lasts long enough to kill a daemon in the middle of it, or never ends, with a real registry behind."""

    def __init__(self, upstream_port: int, control: Path):
        import socket
        import threading

        self.upstream_port = upstream_port
        self.control = Path(control)
        self.control.write_text("")
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, name="throttle-proxy", daemon=True).start()

    def rate(self) -> int | None:
        try:
            text = self.control.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def _accept(self) -> None:
        import socket
        import threading

        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=30)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src, dst, throttled: bool) -> None:
        piece = 16384
        try:
            while True:
                if throttled:
                    rate = self.rate()
                    while rate == 0 and not self._closed:
                        time.sleep(0.1)
                        rate = self.rate()
                    if rate:
                        time.sleep(piece / rate)
                data = src.recv(piece)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(2)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._closed = True
        self._sock.close()


def busybox_layer_tar(shared_dir: Path, dst: Path) -> Path:
    """The one-layer image tree of the host's static busybox, as the shared VM's examples build it
    (``shared/vm/examples/busybox_image.py``: deterministic, one symlink per applet)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("busybox_image", shared_dir / "vm" / "examples" /
                                                  "busybox_image.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dst.write_bytes(mod.layer_tar())
    return dst


def guest_test_names(guest_file: Path) -> list[str]:
    """Names of the guest tests in ``guest_file`` (parametrized ones expanded), read without importing it."""
    import ast

    names = []
    tree = ast.parse(Path(guest_file).read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            params = None
            for d in node.decorator_list:
                if isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "parametrize":
                    params = [ast.literal_eval(e) for e in d.args[1].elts]
            names += [f"{node.name}[{p}]" for p in params] if params else [node.name]
    return names


def run_guest_pytest(run_in_vm: Path, guest_file: Path, work: Path, params: dict, fwd: list[int],
                     timeout: float) -> tuple[dict[str, tuple[str, str]], str, float]:
    """Boot the test VM once and run pytest on ``guest_file`` inside it with ``params`` (JSON in
    ``$FSCACHE_TEST_PARAMS``); ``work`` is shared writable.  Returns ({test name: (status, text)}, the output, the
    VM's wall time in seconds).  A test the VM did not report is missing from the dict.  ``$RAFSFS_GUEST_PYTEST_ARGS``
    adds arguments to the guest's pytest (``-k NAME`` while working on one test)."""
    import shlex
    import xml.etree.ElementTree as ET

    (work / "params.json").write_text(json.dumps(params))
    junit = work / "junit.xml"
    env = dict(os.environ, FSCACHE_TEST_PARAMS=str(work / "params.json"), PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=str(REPO))
    cmd = [str(run_in_vm), "--timeout", str(int(timeout)), "--rw", str(work),
           *[a for port in fwd for a in ("--fwd", str(port))], "--",
           sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--durations=0",
           f"--junitxml={junit}", *shlex.split(os.environ.get("RAFSFS_GUEST_PYTEST_ARGS", "")), str(guest_file)]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout + 120)
    seconds = time.monotonic() - t0
    output = (f"--- VM exit status {p.returncode} after {seconds:.0f} s ---\n{p.stdout[-8000:]}\n"
              f"--- stderr ---\n{p.stderr[-4000:]}")
    results: dict[str, tuple[str, str]] = {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            status, text = "passed", ""
            for child in case:
                if child.tag in ("failure", "error"):
                    status, text = child.tag, (child.get("message") or "") + "\n" + (child.text or "")
                elif child.tag == "skipped":
                    status, text = "skipped", child.get("message") or ""
            results[case.get("name")] = (status, text)
    return results, output, seconds
