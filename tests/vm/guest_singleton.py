"""Runs INSIDE the test VM (tests/test_fscache_singleton.py boots it): ``rafsfs-nydusd singleton`` under a kernel
with EROFS over on-demand cachefiles.

First the API on its own (the daemon started by hand, images bound with ``PUT /api/v2/blobs`` and mounted with
``mount -t erofs -o fsid=``, as nydus-snapshotter does), then the real thing: containerd + nydus-snapshotter with
``--fs-driver fscache --daemon-mode shared --nydusd rafsfs-nydusd``, containers of a busybox image from a registry on
the host.  Only one process of the machine may hold /dev/cachefiles, so the tests run in file order, each leaving
no daemon behind but the snapshotter's.
"""
from __future__ import annotations

import glob
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from treeutil import diff_snapshots, format_diffs, snapshot_tree  # noqa: E402

from fscache_backend import control  # noqa: E402
from rafsfs import sysmount  # noqa: E402
from rafsfs.api.client import ApiClient  # noqa: E402
from rafsfs.api.model import ApiError  # noqa: E402

PARAMS = json.loads(Path(os.environ["FSCACHE_TEST_PARAMS"]).read_text()) \
    if os.environ.get("FSCACHE_TEST_PARAMS") else None
pytestmark = pytest.mark.skipif(PARAMS is None or not os.environ.get("IN_EROFS_VM"),
                                reason="runs inside the fscache test VM (tests/test_fscache_singleton.py starts it)")
VMDIR = REPO.parent / "shared" / "vm"
NYDUSD = shutil.which("rafsfs-nydusd") or "rafsfs-nydusd"
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def _wait(what: str, cond, timeout: float = 60.0, interval: float = 0.1, info=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{info()}")
        time.sleep(interval)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _erofs_mounts(under: str = "/") -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [ln.strip() for ln in f if " - erofs " in ln and ln.split()[4].startswith(under)]


def note(key: str, value) -> None:
    """A measurement for the host to print (tests/test_fscache_singleton.py shows them with the results)."""
    with open(PARAMS["notes"], "a") as f:
        f.write(json.dumps({key: value}) + "\n")


def _tail(path: str | Path, n: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"({path}: no log)"


# ================================================================================================ the API alone
class Singleton:
    """``rafsfs-nydusd singleton`` started by hand, as the snapshotter starts it."""

    def __init__(self, root: str, *extra: str):
        self.root = Path(root)
        shutil.rmtree(self.root, ignore_errors=True)
        self.sock = self.root / "socket" / "d1" / "api.sock"
        self.sock.parent.mkdir(parents=True)
        self.log = self.root / "logs" / "d1" / "nydusd.log"  # its directory does not exist: the daemon makes it
        self.cache = self.root / "cache"
        self.cache.mkdir(parents=True)
        t0 = time.monotonic()
        self.proc = subprocess.Popen([NYDUSD, "singleton", "--fscache", str(self.cache), "--apisock", str(self.sock),
                                      "--log-level", "info", "--log-file", str(self.log), "--log-rotation-size",
                                      "100", "--id", "d1", *extra], env=ENV, stdin=subprocess.DEVNULL)
        _wait("the API socket", lambda: self.sock.exists() or self.proc.poll() is not None, 30, 0.02)
        self.socket_seconds = time.monotonic() - t0
        assert self.proc.poll() is None, f"the singleton exited {self.proc.returncode}:\n{_tail(self.log)}"
        self.api = ApiClient(str(self.sock), timeout=150)
        self.control = str(self.sock.parent / "rafsfs-fscache" / "control.sock")

    def put(self, fsid: str, boot: str, blob_dir: str, domain: str | None = None, prefetch: dict | None = None):
        body = {"type": "bootstrap", "id": fsid, "domain_id": domain or fsid,
                "config": {"id": fsid, "backend_type": "localfs", "backend_config": {"dir": blob_dir},
                           "cache_type": "fscache", "cache_config": {"work_dir": str(self.root / "work")},
                           "prefetch_config": prefetch or {"enable": False, "threads_count": 0, "merging_size": 0,
                                                           "bandwidth_rate": 0},
                           "metadata_path": boot}}
        return self.api.request("PUT", "/api/v2/blobs", body)

    def delete(self, query: str):
        return self.api.request("DELETE", f"/api/v2/blobs?{query}")

    def worker(self, op: str = "status") -> dict:
        return control.request(self.control, {"op": op}, timeout=30)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _assert_small(mnt: Path) -> None:
    with open(PARAMS["small_snapshot"], "rb") as f:
        expected = pickle.load(f)
    diffs = diff_snapshots(expected, snapshot_tree(mnt), check_symlink_mtime=True)
    assert not diffs, format_diffs(diffs, f"fscache mount {mnt} differs from the source tree")


def _mount(fsid: str, mnt: Path, domain: str | None = None) -> None:
    mnt.mkdir(parents=True, exist_ok=True)
    opts = f"fsid={fsid}" + (f",domain_id={domain}" if domain and domain != fsid else "")
    sysmount.mount("erofs", str(mnt), "erofs", opts)


def test_api_binds_images_the_caller_mounts():
    """PUT /api/v2/blobs binds an image the caller then mounts with fsid=; a replayed PUT is accepted as it is; two
    images share a blob in one domain only when their backend agrees; DELETE with nydusd's semantics and errors;
    the bootstrap's cache file culled; SIGTERM leaves the daemon's socket gone and exit status 0."""
    d = Singleton("/tmp/sg-api")
    mnts = []
    try:
        assert d.socket_seconds < 10, d.socket_seconds  # the snapshotter's limit
        note("singleton API socket up after (s)", round(d.socket_seconds, 2))
        info = d.api.daemon_info()
        assert info["state"] == "RUNNING" and info["id"] == "d1", info
        assert d.log.parent.is_dir()
        a = "a" * 64
        assert d.put(a, PARAMS["small"], PARAMS["blob_dir"]) is None  # 204
        assert d.put(a, PARAMS["small"], PARAMS["blob_dir"]) is None  # a replay (the snapshotter after a restart)
        assert d.worker("stats")["stats"]["binds"] == 1
        ma = Path("/tmp/sg-api-mnt/a")
        _mount(a, ma)
        mnts.append(ma)
        _assert_small(ma)
        line = [ln for ln in _erofs_mounts(str(ma)) if f"fsid={a}" in ln]
        assert line, _erofs_mounts()

        # one domain, two images of the same blob: the second from another backend is refused (its bytes would be
        # served as the first one's), the same backend is shared: one cache object
        b, c, e = "b" * 64, "c" * 64, "e" * 64
        assert d.put(b, PARAMS["small"], PARAMS["blob_dir"], domain="shared") is None
        with pytest.raises(ApiError) as err:
            d.put(c, PARAMS["small"], PARAMS["blob_dir2"], domain="shared")
        assert err.value.status == 500 and err.value.code == "UNDEFINED" and "another domain" in str(err.value)
        assert d.put(e, PARAMS["small"], PARAMS["blob_dir"], domain="shared") is None
        mb, me = Path("/tmp/sg-api-mnt/b"), Path("/tmp/sg-api-mnt/e")
        _mount(b, mb, "shared")
        mnts.append(mb)
        _mount(e, me, "shared")
        mnts.append(me)
        _assert_small(mb)
        _assert_small(me)
        st = d.worker("stats")["stats"]
        assert st["blob_opens"][PARAMS["small_blob"]] == 2, st  # one object in domain a, one shared by b and e
        assert st["read_failures"] == 0, st

        # DELETE: unknown entry -> nydusd's error; the snapshotter's teardown order for domain == id
        with pytest.raises(ApiError) as err:
            d.delete("domain_id=nosuchdomain")
        assert err.value.status == 500 and err.value.code == "UNDEFINED" and "not found" in str(err.value)
        with pytest.raises(ApiError) as err:
            d.delete("")
        assert err.value.status == 400
        assert d.delete(f"domain_id={a}") is None
        sysmount.umount(str(ma))
        mnts.remove(ma)
        _wait("the bootstrap's cache file", lambda: glob.glob(f"{d.cache}/cache/Ierofs,{a}/@*/D{a}"), 30)
        assert d.delete(f"blob_id={a}") is None  # culled
        assert not glob.glob(f"{d.cache}/cache/Ierofs,{a}/@*/D{a}")
        # a shared domain: the bootstrap and its blobs by id; the other image keeps reading
        assert d.delete(f"blob_id={b}&domain_id=shared") is None
        sysmount.umount(str(mb))
        mnts.remove(mb)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        _assert_small(me)
        assert [m["fsid"] for m in d.worker()["mounts"]] == [e]
        assert d.api.daemon_info()["state"] == "RUNNING"
    finally:
        for m in mnts:
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
        rc = d.stop()
    assert rc == 0, _tail(d.log)
    assert not d.sock.exists()
    log = d.log.read_text()
    assert "Traceback" not in log, log[-3000:]


def test_prefetch_config_fills_the_blob_before_any_read():
    """``prefetch_config`` with ``prefetch_all``: once the kernel opens the blob, the daemon writes every chunk
    into the cache file in the background; reading the whole tree then sends no blob READ at all."""
    d = Singleton("/tmp/sg-prefetch")
    mnt = Path("/tmp/sg-prefetch-mnt")
    fsid = "f" * 64
    try:
        d.put(fsid, PARAMS["small"], PARAMS["blob_dir"],
              prefetch={"enable": True, "prefetch_all": True, "threads_count": 2})
        _mount(fsid, mnt)
        st = _wait("the prefetch", lambda: (s := d.worker("stats")["stats"]).get("prefetches_done") and s, 60, 0.2,
                   lambda: _tail(d.log))
        assert st["chunks_prefetched"] == PARAMS["small_chunks"], st  # prefetch_all: every chunk of the blob
        reads = st["reads_blob"]
        _assert_small(mnt)
        st = d.worker("stats")["stats"]
        assert st["reads_blob"] == reads, st
        assert st["read_failures"] == 0
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        assert d.stop() == 0, _tail(d.log)


# ================================================================================================ under the snapshotter
NYDUS = Path("/tmp/nydus")
ROOT = NYDUS / "root"
SNAP_SOCK = NYDUS / "nydus.sock"
# the seed's config shape, minimal: no timeouts (the daemon's own defaults apply), no domain (one per image)
TEMPLATE = {"type": "bootstrap", "config": {"backend_type": "registry", "backend_config": {"scheme": "http"},
                                            "cache_type": "fscache"}}


class Snapshotter:
    """nydus-snapshotter 0.13 in fscache mode, started as the README's walkthrough starts it."""

    def __init__(self):
        NYDUS.mkdir(parents=True, exist_ok=True)
        self.template = NYDUS / "nydusd-config.json"
        self.template.write_text(json.dumps(TEMPLATE))
        self.log = NYDUS / "snapshotter.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if SNAP_SOCK.exists():
            SNAP_SOCK.unlink()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["containerd-nydus-grpc", "--root", str(ROOT), "--address", str(SNAP_SOCK), "--nydusd", NYDUSD,
                 "--nydus-image", "/bin/true", "--config-path", str(self.template), "--fs-driver", "fscache",
                 "--daemon-mode", "shared", "--log-level", "info"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=ENV, start_new_session=True)
        _wait("the snapshotter's socket", lambda: SNAP_SOCK.exists() or self.proc.poll() is not None, 60, 0.05)
        assert self.proc.poll() is None, f"the snapshotter exited:\n{_tail(self.log)}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Node:
    """containerd + the snapshotter + the singleton it started."""

    def __init__(self):
        self.snap = Snapshotter()
        self.image = PARAMS["image"]
        self.throttle = Path(PARAMS["throttle"])

    def api_sock(self) -> Path:
        """The singleton's socket (the snapshotter starts the daemon with itself; on a busy machine its Python may
        still be starting)."""
        socks = _wait("the singleton's API socket", lambda: glob.glob(f"{ROOT}/socket/*/api.sock"), 60, 0.1,
                      self.logs)
        assert len(socks) == 1, socks
        return Path(socks[0])

    def api(self) -> ApiClient:
        return ApiClient(str(self.api_sock()), timeout=30)

    def worker(self, op: str = "status") -> dict:
        return control.request(str(self.api_sock().parent / "rafsfs-fscache" / "control.sock"), {"op": op},
                               timeout=30)

    def daemon_log(self) -> str:
        return "\n".join(f"== {p}\n{_tail(p, 60)}" for p in glob.glob(f"{ROOT}/logs/*/*.log"))

    def snapshotter_log(self) -> str:
        return "\n".join(f"== {p}\n{_tail(p, 40)}" for p in [self.snap.log, *glob.glob(f"{ROOT}/logs/*.log")])

    def wait_snapshotter(self) -> None:
        """containerd reaches a (re)started snapshotter: a listing through it works."""
        _wait("containerd to reach the snapshotter",
              lambda: self.ctr("snapshots", "--snapshotter", "nydus", "ls", check=False, timeout=60).returncode == 0,
              90, 0.5, self.logs)

    def logs(self) -> str:
        return (f"--- snapshotter ---\n{self.snapshotter_log()}\n--- daemon ---\n{self.daemon_log()}\n"
                f"--- containerd ---\n{_tail('/tmp/containerd/containerd.log', 15)}")

    def ctr(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(["ctr", *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} exited {p.returncode}: {p.stdout[-1000:]}\n"
                                 f"{p.stderr[-2000:]}\n{self.logs()}")
        return p

    def run(self, name: str, script: str, background: bool = False):
        argv = ["ctr", "run", "--rm", "--net-host", "--snapshotter", "nydus", self.image, name, "/bin/sh", "-c",
                script]
        if background:
            return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    stdin=subprocess.DEVNULL)
        p = subprocess.run(argv, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert p.returncode == 0, f"ctr run {name}: {p.returncode}\n{p.stdout}\n{p.stderr}\n{self.logs()}"
        return p.stdout

    def rpull(self) -> None:
        p = subprocess.run(["ctr-remote", "images", "rpull", "--plain-http", "--snapshotter", "nydus", self.image],
                           capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert p.returncode == 0, f"rpull: {p.stdout[-1000:]}\n{p.stderr[-2000:]}\n{self.logs()}"


def _daemon_log_all() -> str:
    return "".join(Path(p).read_text(errors="replace") for p in glob.glob(f"{ROOT}/logs/*/*.log"))


@pytest.fixture(scope="module")
def node():
    shutil.rmtree(NYDUS, ignore_errors=True)
    n = Node()
    n.throttle.write_text("")
    t0 = time.monotonic()
    n.snap.start()
    subprocess.run([str(VMDIR / "guest-containerd.sh"), "start", "--proxy", f"nydus={SNAP_SOCK}"], check=True)
    note("snapshotter and containerd started (s)", round(time.monotonic() - t0, 1))
    try:
        yield n
    finally:
        n.throttle.write_text("")
        subprocess.run(["ctr", "images", "rm", "--sync", n.image], capture_output=True, timeout=120)
        subprocess.run([str(VMDIR / "guest-containerd.sh"), "stop"], capture_output=True, timeout=120)
        n.snap.stop()
        for sock in glob.glob(f"{ROOT}/socket/*/api.sock"):  # a daemon the snapshotter left running
            try:
                os.kill(ApiClient(sock, timeout=5).daemon_info()["pid"], signal.SIGTERM)
            except (ApiError, OSError, KeyError):
                pass
        for ln in _erofs_mounts(str(ROOT)):
            subprocess.run(["umount", "-l", ln.split()[4]], capture_output=True)


def test_container_prints_42_and_busybox_digest(node):
    """rpull + ctr run: the container prints 42 and /bin/busybox's digest equal to the host's, while the snapshot's
    EROFS (fsid=, served by our singleton through the kernel) is mounted."""
    node.rpull()
    info = node.api().daemon_info()
    assert info["state"] == "RUNNING", info
    cmdline = Path(f"/proc/{info['pid']}/cmdline").read_bytes().split(b"\0")
    assert b"singleton" in cmdline and any(b"rafsfs-nydusd" in c for c in cmdline[:2]), cmdline
    t0 = time.monotonic()
    c = node.run("c1", "echo 42; sha256sum /bin/busybox; sleep 3", background=True)
    mounts = _wait("the image's EROFS mount", lambda: [ln for ln in _erofs_mounts(str(ROOT)) if "fsid=" in ln],
                   120, 0.1, node.logs)
    out, err = c.communicate(timeout=300)
    assert c.returncode == 0, f"{out}\n{err}\n{node.logs()}"
    note("first container: ctr run to exit, incl. sleep 3 (s)", round(time.monotonic() - t0, 1))
    lines = out.split("\n")
    assert lines[0] == "42" and lines[1].split()[0] == PARAMS["busybox_sha256"], out
    line = mounts[0]
    fsid = line.split("fsid=")[1].split(",")[0].split()[0]
    assert line.split()[4].endswith("/mnt") and " - erofs " in line, line
    assert [m["fsid"] for m in node.worker()["mounts"]] == [fsid]
    st = node.worker("stats")["stats"]
    assert st["reads_blob"] > 0 and st["read_failures"] == 0 and st["binds"] == 1, st


def test_second_container_of_the_image(node):
    t0 = time.monotonic()
    out = node.run("c2", "echo 42; sha256sum /bin/busybox")
    note("second container: ctr run to exit (s)", round(time.monotonic() - t0, 1))
    assert out.split("\n")[0] == "42" and out.split("\n")[1].split()[0] == PARAMS["busybox_sha256"], out
    st = node.worker("stats")["stats"]
    assert st["binds"] == 1 and st["read_failures"] == 0, st  # no second PUT: the mount serves every container


def test_snapshotter_restart_readopts_the_daemon(node):
    """The snapshotter stopped with the image mounted leaves the daemon running; a new snapshotter re-adopts it
    (no new PUT, same processes) and the next container works."""
    before = node.api().daemon_info()["pid"], node.worker()["pid"]
    calls = _daemon_log_all().count
    gets, puts = calls("API GET /api/v1/daemon"), calls("API PUT /api/v2/blobs")
    node.snap.stop()
    assert _alive(before[0]) and _alive(before[1])
    t0 = time.monotonic()
    node.snap.start()
    node.wait_snapshotter()
    note("snapshotter restart until containerd reaches it (s)", round(time.monotonic() - t0, 1))
    out = node.run("c3", "echo 43")
    assert out == "43\n", out
    log = _daemon_log_all()
    assert (log.count("API GET /api/v1/daemon") - gets, log.count("API PUT /api/v2/blobs") - puts) == (1, 0), \
        node.logs()  # one GET to find it RUNNING, no PUT: re-adopted as it is
    assert (node.api().daemon_info()["pid"], node.worker()["pid"]) == before
    st = node.worker("stats")["stats"]
    assert st["binds"] == 1, st


def test_worker_killed_during_a_read_the_container_reads_right(node):
    """kill -9 of the daemon's worker while a container reads a 32 MiB file (its registry slowed down, so the read
    is in the middle): the supervisor starts a new worker, which restores the kernel's pending READs; the digest
    the container prints is right."""
    node.throttle.write_text(str(4 << 20))
    c = node.run("c4", "sha256sum /data/big.bin", background=True)
    try:
        old = node.worker()["pid"]
        _wait("reads of the big blob", lambda: node.worker("stats")["stats"]["blob_chunks_fetched"]
              .get(PARAMS["big_blob"], 0) >= 2, 120, 0.1, node.logs)
        os.kill(old, signal.SIGKILL)
        assert c.poll() is None, "the container finished before the kill: the test proves nothing"
        status = _wait("a new worker", lambda: (s := _status_or_none(node)) and s["pid"] != old and s, 60, 0.2,
                       node.logs)
        assert status["restored"], status
    finally:
        node.throttle.write_text("")
    out, err = c.communicate(timeout=300)
    assert c.returncode == 0 and out.split()[0] == PARAMS["big_sha256"], f"{out}\n{err}\n{node.logs()}"
    assert "restarting it" in node.daemon_log()


def _status_or_none(node: Node) -> dict | None:
    try:
        return node.worker()
    except (OSError, ValueError):
        return None


def test_image_removal_unmounts_and_the_daemon_answers(node):
    node.ctr("images", "rm", "--sync", node.image)
    _wait("the EROFS mount to go", lambda: not _erofs_mounts(str(ROOT)), 60, 0.2, node.logs)
    assert node.api().daemon_info()["state"] == "RUNNING"
    assert node.worker()["mounts"] == []


def test_daemon_killed_the_snapshotter_restarts_it_and_replays(node):
    """kill -9 of the daemon itself: the snapshotter starts a new one with the same argv, replays the PUT of the
    mounted image and mounts again; the new daemon serves the next container."""
    node.rpull()
    assert node.run("c5", "echo 42") == "42\n"
    old = node.api().daemon_info()["pid"]
    os.kill(old, signal.SIGKILL)
    t0 = time.monotonic()
    info = _wait("a new daemon", lambda: (i := _info_or_none(node)) and i["pid"] != old and i, 90, 0.2, node.logs)
    note("daemon killed: new daemon answering after (s)", round(time.monotonic() - t0, 1))
    assert info["state"] == "RUNNING"
    _wait("the replayed PUT", lambda: node.worker("stats")["stats"]["binds"] == 1, 90, 0.2, node.logs)
    out = node.run("c6", "echo 42; sha256sum /bin/busybox")
    assert out.split("\n")[0] == "42" and out.split("\n")[1].split()[0] == PARAMS["busybox_sha256"], out
    assert node.worker("stats")["stats"]["read_failures"] == 0


def _info_or_none(node: Node) -> dict | None:
    try:
        return node.api().daemon_info()
    except (ApiError, AssertionError, OSError):
        return None
