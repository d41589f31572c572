"""Container start in the test VM, three ways, one image, one run: full pull onto overlayfs vs rafsfs through
nydus-snapshotter's fscache driver (``rafsfs-nydusd singleton``, kernel EROFS over on-demand cachefiles) vs its FUSE
driver (``rafsfs-nydusd fuse``, one daemon per image).

    python bench/fscache_containers.py            # the python3 image (debootstrap minbase + python3)
    python bench/fscache_containers.py --quick    # the busybox image instead (a smoke run)

The host pushes the image (one gzip layer) to a docker-registry on 127.0.0.1, converts it with ``rafsfs convert``,
boots ``../shared/vm/run-in-vm.sh`` ONCE (the registry forwarded with ``--fwd``) and runs this script inside
(``--guest``).  For each way the guest starts a fresh containerd (and snapshotter) root on the ext4 scratch disk,
drops the page cache, then times the pull (``ctr images pull`` / ``ctr-remote images rpull``) and ``ctr run`` of
``python3 -c 'print(42)'`` (busybox: ``echo 42``) to its exit.  Absolute times under qemu TCG mean little: read the
ratios against the full pull.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench.common import REPO, Table, drop_caches, log, machine_info, parent_parser  # noqa: E402

WAYS = [("overlayfs", "full pull (overlayfs)"), ("fscache", "rafsfs, snapshotter fscache driver"),
        ("fuse", "rafsfs, snapshotter FUSE driver")]
VMDIR = REPO.parent / "shared" / "vm"


# ------------------------------------------------------------------------------------------------ guest side
def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _timed(argv: list[str], expect: str | None = None, env: dict | None = None) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL, env=env)
    seconds = time.perf_counter() - t0
    if p.returncode != 0 or (expect is not None and p.stdout.strip() != expect):
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}: {p.stdout[-500:]} {p.stderr[-1500:]}")
    return seconds


def _one_way(way: str, params: dict, n: int) -> dict:
    ctd = f"/tmp/ctd-{way}-{n}"
    nydus = Path(f"/tmp/nyd-{way}-{n}")
    env = dict(os.environ, PYTHONPATH=str(REPO), CTD=ctd)
    snap = None
    ref = params["oci"] if way == "overlayfs" else params["nydus"]
    try:
        proxy: list[str] = []
        if way != "overlayfs":
            nydus.mkdir(parents=True)
            sock = nydus / "nydus.sock"
            if way == "fscache":  # the seed's config shape
                template = {"type": "bootstrap", "config": {"backend_type": "registry",
                                                            "backend_config": {"scheme": "http"},
                                                            "cache_type": "fscache"}}
                mode = ["--fs-driver", "fscache", "--daemon-mode", "shared"]
            else:  # nydusd's config shape, as the FUSE end-to-end test uses it
                template = {"device": {"backend": {"type": "registry", "config": {"scheme": "http"}},
                                       "cache": {"type": "blobcache",
                                                 "config": {"work_dir": str(nydus / "root" / "cache")}}},
                            "mode": "direct", "digest_validate": True, "enable_xattr": True}
                mode = ["--fs-driver", "fusedev", "--daemon-mode", "dedicated"]
            (nydus / "config.json").write_text(json.dumps(template))
            snap = subprocess.Popen(
                ["containerd-nydus-grpc", "--root", str(nydus / "root"), "--address", str(sock), "--nydusd",
                 shutil.which("rafsfs-nydusd") or "rafsfs-nydusd", "--nydus-image", "/bin/true", "--config-path",
                 str(nydus / "config.json"), *mode, "--log-level", "warn"],
                stdout=open(nydus / "snapshotter.log", "wb"), stderr=subprocess.STDOUT, env=env,
                start_new_session=True)
            _wait(lambda: sock.exists() or snap.poll() is not None, 60, "the snapshotter")
            proxy = ["--proxy", f"nydus={sock}"]
        subprocess.run([str(VMDIR / "guest-containerd.sh"), "start", *proxy], check=True, env=env)
        if way == "fscache":  # the node's daemon, started with the snapshotter, is up: not part of the pull
            from fscache_backend import control

            _wait(lambda: list((nydus / "root" / "socket").glob("*/rafsfs-fscache/control.sock")), 120,
                  "the singleton")
            sock = next((nydus / "root" / "socket").glob("*/rafsfs-fscache/control.sock"))
            _wait(lambda: control.daemon_running(str(sock)), 120, "the singleton's daemon")
        drop_caches()
        if way == "overlayfs":
            pull = _timed(["ctr", "images", "pull", "--plain-http", ref])
            snapshotter = "overlayfs"
        else:
            pull = _timed(["ctr-remote", "images", "rpull", "--plain-http", "--snapshotter", "nydus", ref])
            snapshotter = "nydus"
        run = _timed(["ctr", "run", "--rm", "--net-host", "--snapshotter", snapshotter, ref, f"b{n}",
                      *params["cmd"]], expect="42")
        row = {"pull_s": pull, "run_s": run, "total_s": pull + run}
        row.update(_fetched(way, nydus))
        return row
    finally:
        subprocess.run(["ctr", "images", "rm", "--sync", ref], capture_output=True, env=env)
        subprocess.run([str(VMDIR / "guest-containerd.sh"), "stop"], capture_output=True, env=env)
        if snap is not None and snap.poll() is None:
            snap.send_signal(signal.SIGTERM)
            try:
                snap.wait(60)
            except subprocess.TimeoutExpired:
                snap.kill()
        for sock in (nydus / "root" / "socket").glob("*/api.sock") if nydus.exists() else []:
            from rafsfs.api.client import ApiClient

            try:  # a daemon the snapshotter left behind
                os.kill(ApiClient(str(sock), timeout=5).daemon_info()["pid"], signal.SIGTERM)
            except Exception:  # noqa: BLE001 - best effort clean-up between ways
                pass
        with open("/proc/self/mountinfo") as f:
            for t in sorted({ln.split()[4] for ln in f if ln.split()[4].startswith(str(nydus))}, reverse=True):
                subprocess.run(["umount", "-l", t], capture_output=True)


def _fetched(way: str, nydus: Path) -> dict:
    """What the daemon fetched from the registry for the container (the full pull fetches the whole layer)."""
    from rafsfs.api.client import ApiClient

    socks = sorted((nydus / "root" / "socket").glob("*/api.sock")) if way != "overlayfs" else []
    if not socks:
        return {}
    try:
        m = ApiClient(str(socks[0]), timeout=30).cache_metrics()
    except Exception:  # noqa: BLE001 - a missing number, not a failed run
        return {}
    return {"fetched_bytes": m.get("bytes_fetched", 0), "backend_requests": m.get("backend_requests", 0)}


def guest(params_path: str) -> int:
    params = json.loads(Path(params_path).read_text())
    results: dict = {}
    for n in range(params["repeat"]):
        for way, label in WAYS:
            log(f"{label}: run {n + 1}")
            try:
                r = _one_way(way, params, n)
                results.setdefault(way, []).append(r)
                log(f"  pull {r['pull_s']:.1f} s, run {r['run_s']:.1f} s")
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                results.setdefault("errors", {})[way] = str(e)[-1500:]
                log(f"  failed: {e}")
    Path(params["results"]).write_text(json.dumps(results))
    return 0


# ------------------------------------------------------------------------------------------------ host side
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 parents=[parent_parser()])
    ap.add_argument("--repeat", type=int, default=1, help="runs per way, interleaved; the median is reported")
    ap.add_argument("--guest", metavar="PARAMS", help=argparse.SUPPRESS)
    ap.add_argument("--vm-timeout", type=int, default=3600)
    args = ap.parse_args()
    if args.guest:
        return guest(args.guest)
    from containerd_env import CI_CACHE, Registry, busybox_layer_tar, push_oci_image, python_rootfs_tar

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fscache-containers-", dir="/var/tmp"))
    reg = Registry(work / "reg")
    try:
        if args.quick:
            tar, cmd, what = busybox_layer_tar(REPO.parent / "shared", work / "busybox.tar"), \
                ["/bin/sh", "-c", "echo 42"], "busybox: sh -c 'echo 42'"
        else:
            tar, cmd, what = python_rootfs_tar(), ["python3", "-c", "print(42)"], \
                "debootstrap minbase + python3: python3 -c 'print(42)'"
        log(f"pushing the image ({tar.stat().st_size >> 20} MiB layer tar, gzip) and converting it")
        oci = push_oci_image(reg, "bench/ctr", "oci", [tar], CI_CACHE / "layers")
        subprocess.run([sys.executable, "-m", "rafsfs.cli", "convert", oci, f"{reg.host}/bench/ctr:nydus",
                        "--log-level", "warning"], check=True, cwd=REPO)
        subprocess.run([sys.executable, "-m", "compileall", "-q", "rafsfs", "fscache_backend", "fuse_backend"],
                       cwd=REPO, capture_output=True, env=dict(os.environ, PYTHONDONTWRITEBYTECODE=""))
        guest_host = f"10.0.2.100:{reg.port}"
        params = {"oci": oci.replace(reg.host, guest_host), "nydus": f"{guest_host}/bench/ctr:nydus", "cmd": cmd,
                  "repeat": args.repeat, "results": str(work / "results.json")}
        (work / "params.json").write_text(json.dumps(params))
        log("booting the VM (everything below runs under emulation)")
        t0 = time.perf_counter()
        p = subprocess.run([str(VMDIR / "run-in-vm.sh"), "--timeout", str(args.vm_timeout), "--rw", str(work),
                            "--fwd", str(reg.port), "--", sys.executable, str(Path(__file__).resolve()), "--guest",
                            str(work / "params.json")], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
        log(f"VM run took {time.perf_counter() - t0:.0f} s, exit status {p.returncode}")
        if not (work / "results.json").exists():
            log("no results from the guest")
            return 1
        res = json.loads((work / "results.json").read_text())
    finally:
        reg.close()
        shutil.rmtree(work, ignore_errors=True)
    import statistics

    table = Table(f"Container start in the test VM (6.12, qemu TCG, 2 vCPUs), {what}; fresh roots, page cache "
                  f"dropped; median of {args.repeat}",
                  [("way", "way", None), ("pull_s", "pull s", "{:.1f}"), ("run_s", "ctr run s", "{:.1f}"),
                   ("total_s", "total s", "{:.1f}"), ("ratio", "vs full pull", "{:.2f}x"),
                   ("fetched", "blob bytes fetched", None), ("requests", "backend requests", None)])
    med = {w: {k: statistics.median(r[k] for r in res[w]) for k in ("pull_s", "run_s", "total_s")}
           for w, _ in WAYS if res.get(w)}
    full = med.get("overlayfs", {}).get("total_s")
    for way, label in WAYS:
        if way in med:
            m = med[way]
            last = res[way][-1]
            fetched = f"{last['fetched_bytes'] / (1 << 20):.1f} MiB" if "fetched_bytes" in last else \
                ("whole layer" if way == "overlayfs" else None)
            table.add(way=label, **m, ratio=m["total_s"] / full if full else None, fetched=fetched,
                      requests=last.get("backend_requests"))
    for way, err in res.get("errors", {}).items():
        table.notes.append(f"{way}: failed: {err.splitlines()[-1] if err else ''}")
    table.print()
    name = "fscache_containers-quick" if args.quick else "fscache_containers"
    table.save_json(args.out / f"{name}.json", machine=machine_info(), raw=res)
    table.save_csv(args.out / f"{name}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
