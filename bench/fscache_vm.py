"""fscache mode vs the kernel's own EROFS vs FUSE mode, on one uncompressed image, in ONE run of the test VM.

The host builds a ``--compressor none`` image of a tree (default /usr/include, plus one 64 MiB file), boots
``../shared/vm/run-in-vm.sh`` once and runs this script inside (``--guest``).  In the guest the bootstrap and blob
are first copied to the ext4 scratch disk, then each of three mounts of the same image is measured the same way:

* ``kernel EROFS``: a file-backed mount(2) of the bootstrap with ``device=`` the blob (no daemon at all: the peer);
* ``fscache``: ``rafsfs mount --mode fscache`` (kernel EROFS over on-demand cachefiles; fresh cache directory);
* ``FUSE``: ``rafsfs mount --mode fuse`` (pyfuse3 daemon);
* ``kernel EROFS, no readahead`` (a diagnostic, not a peer): the kernel's mount again with the read-ahead of the disk
  holding the blob set to 0 while it is mounted.  The file-backed mount reads its blob through the page cache, where
  read-ahead brings the next small files in with one I/O; cachefiles reads its cache files with direct I/O, one I/O
  per file.  This column shows how much of the gap in warm small-file reads that explains.

Phases, in this order on a fresh mount:  metadata walk (lstat of every entry) with dropped caches -- "cold" (for
fscache the bootstrap still has to come through the daemon); sequential read of the small files, then of the big
file, with dropped caches -- cold (fscache: every chunk through the daemon); the same again after dropping the page
cache -- warm (fscache: from its cache files, no daemon); again without dropping -- page cache; random 4 KiB preads
of random files with dropped page cache (warm); and the metadata walk again, warm.  Goal: fscache warm >= 0.9x
kernel EROFS.

    python bench/fscache_vm.py [--tree DIR] [--big-mib N] [--random N] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, Table, drop_caches, fmt_bytes, log, machine_info, parent_parser  # noqa: E402

PHASES = [  # key, label
    ("walk_cold", "metadata walk, cold (entries/s)"),
    ("seq_cold_small", "seq. read small files, cold (MiB/s)"),
    ("seq_cold_big", "seq. read big file, cold (MiB/s)"),
    ("seq_warm_small", "seq. read small files, warm (MiB/s)"),
    ("seq_warm_big", "seq. read big file, warm (MiB/s)"),
    ("seq_hot_small", "seq. read small files, page cache (MiB/s)"),
    ("seq_hot_big", "seq. read big file, page cache (MiB/s)"),
    ("rand_warm", "random 4 KiB reads, warm (IOPS)"),
    ("walk_warm", "metadata walk, warm (entries/s)"),
]
MODES = ["kernel", "fscache", "fuse", "kernel-nora"]
BIG = "big.bin"  # the one large file added to the tree
LABELS = {"kernel": "kernel EROFS", "fscache": "rafsfs fscache", "fuse": "rafsfs FUSE",
          "kernel-nora": "kernel EROFS, no readahead"}


def _read_ahead_file(path: str) -> Path:
    """The read_ahead_kb knob of the block device holding ``path`` (its disk's, for a partition)."""
    st = os.stat(path)
    dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve()
    for d in (dev, dev.parent):
        if (d / "queue" / "read_ahead_kb").exists():
            return d / "queue" / "read_ahead_kb"
    raise OSError(f"no read_ahead_kb for the device of {path}")


# ------------------------------------------------------------------------------------------------ guest side
def _files(root: str) -> tuple[list[str], int]:
    out, entries = [], 0
    for dirpath, dirs, files in os.walk(root):
        entries += 1 + len(files) + sum(os.path.islink(os.path.join(dirpath, d)) for d in dirs)
        for f in files:
            p = os.path.join(dirpath, f)
            if os.path.isfile(p) and not os.path.islink(p):
                out.append(p)
    return sorted(out), entries


def _walk(root: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return time.perf_counter() - t0, n


def _read_all(files: list[str]) -> tuple[float, int]:
    buf = bytearray(1 << 20)
    t0 = time.perf_counter()
    n = 0
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while k := f.readinto(buf):
                n += k
    return time.perf_counter() - t0, n


def _random_reads(files: list[str], sizes: dict[str, int], count: int, seed: int = 7) -> float:
    rnd = random.Random(seed)
    big = [p for p in files if sizes[p] >= 4096]
    picks = [(p, rnd.randrange(0, sizes[p] - 4095) // 4096 * 4096) for p in (rnd.choice(big) for _ in range(count))]
    t0 = time.perf_counter()
    for p, off in picks:
        fd = os.open(p, os.O_RDONLY)
        try:
            if len(os.pread(fd, 4096, off)) != 4096:
                raise RuntimeError(f"short read of {p}")
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def _measure(mnt: str, count: int) -> dict:
    res: dict = {}
    drop_caches()
    t, n = _walk(mnt)
    res["walk_cold"] = n / t
    files, _ = _files(mnt)
    sizes = {p: os.stat(p).st_size for p in files}
    groups = {"small": [p for p in files if os.path.basename(p) != BIG], "big": [p for p in files
                                                                                if os.path.basename(p) == BIG]}
    for key, drop in (("seq_cold", True), ("seq_warm", True), ("seq_hot", False)):
        if drop:
            drop_caches()
        for g, members in groups.items():
            t, nbytes = _read_all(members)
            res[f"{key}_{g}"] = nbytes / t / (1 << 20)
            res[f"bytes_{g}"] = nbytes
            log(f"  {key} {g}: {fmt_bytes(nbytes)} in {t:.2f} s")
    drop_caches()
    res["rand_warm"] = count / _random_reads(files, sizes, count)
    drop_caches()
    t, n = _walk(mnt)
    res["walk_warm"] = n / t
    res["entries"] = n
    return res


def _rafsfs(*args: str, env: dict) -> None:
    p = subprocess.run([sys.executable, "-m", "rafsfs.cli", *args], capture_output=True, text=True, env=env,
                       cwd=REPO)
    if p.returncode:
        raise RuntimeError(f"rafsfs {' '.join(args)}: {p.stderr.strip()}")


def guest(params_path: str) -> int:
    from rafsfs import sysmount

    params = json.loads(Path(params_path).read_text())
    local = Path("/tmp/bench-img")
    local.mkdir(parents=True, exist_ok=True)
    boot = str(local / "img.boot")
    blob_dir = local / "blobs"
    blob_dir.mkdir(exist_ok=True)
    shutil.copyfile(params["bootstrap"], boot)
    blob = str(blob_dir / params["blob_id"])
    shutil.copyfile(params["blob"], blob)
    env = dict(os.environ, PYTHONPATH=str(REPO), RAFSFS_FSCACHE_DIR="/tmp/bench-fscache-cache",
               RAFSFS_FSCACHE_RUN="/run/rafsfs/bench-fscache")
    results: dict = {"errors": {}}
    for mode in params["modes"]:
        mnt = f"/tmp/bench-mnt-{mode}"
        os.makedirs(mnt, exist_ok=True)
        log(f"{LABELS[mode]}: mounting")
        ra_knob, ra_saved = None, None
        try:
            if mode == "kernel-nora":
                ra_knob = _read_ahead_file(blob)
                ra_saved = ra_knob.read_text().strip()
                ra_knob.write_text("0")  # before mounting: the backing file's read-ahead is set up when it is opened
            if mode.startswith("kernel"):
                sysmount.mount_erofs(boot, mnt, [blob])
            else:
                _rafsfs("mount", boot, mnt, "--mode", mode, "--blob-dir", str(blob_dir), "--log-file",
                        f"/tmp/bench-{mode}.log", env=env)
        except (OSError, RuntimeError) as e:
            if ra_knob is not None:
                ra_knob.write_text(ra_saved)
            results["errors"][mode] = str(e)
            log(f"{LABELS[mode]}: cannot mount: {e}")
            continue
        try:
            results[mode] = _measure(mnt, params["random"])
            if mode == "fscache":
                st = json.loads(Path("/run/rafsfs/bench-fscache/stats.json").read_text())
                results[mode]["daemon_reads"] = st["reads"]
        finally:
            if mode.startswith("kernel"):
                sysmount.umount(mnt)
            else:
                _rafsfs("umount", mnt, env=env)
                time.sleep(1)
            if ra_knob is not None:
                ra_knob.write_text(ra_saved)
    Path(params["results"]).write_text(json.dumps(results))
    return 0


# ------------------------------------------------------------------------------------------------ host side
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 parents=[parent_parser()])
    ap.add_argument("--tree", default="/usr/include", help="source tree (default: %(default)s)")
    ap.add_argument("--big-mib", type=int, default=64, help="size of the large file added to the tree (MiB)")
    ap.add_argument("--random", type=int, default=2000, help="random 4 KiB reads per mode (default: %(default)s)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--guest", metavar="PARAMS", help=argparse.SUPPRESS)
    ap.add_argument("--vm-timeout", type=int, default=3600)
    args = ap.parse_args()
    if args.guest:
        return guest(args.guest)
    tree = "/usr/include/linux" if args.quick and args.tree == "/usr/include" else args.tree
    big_mib = 8 if args.quick and args.big_mib == 64 else args.big_mib
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fscache-bench-", dir="/var/tmp"))  # /var/tmp: not hidden by the guest's /tmp
    try:
        src = work / "tree"
        shutil.copytree(tree, src, symlinks=True)
        (src / BIG).write_bytes(random.Random(1).randbytes(big_mib << 20))
        boot = work / "img.boot"
        log(f"building an uncompressed image of {tree} + a {big_mib} MiB file")
        subprocess.run([sys.executable, "-m", "rafsfs.cli", "--log-level", "warning", "build", str(src),
                        "--bootstrap", str(boot), "--blob-dir", str(work / "blobs"), "--compressor", "none"],
                       check=True, cwd=REPO)
        blob_id = os.listdir(work / "blobs")[0]
        params = {"bootstrap": str(boot), "blob": str(work / "blobs" / blob_id), "blob_id": blob_id,
                  "random": args.random, "modes": args.modes.split(","), "results": str(work / "results.json")}
        (work / "params.json").write_text(json.dumps(params))
        vm = REPO.parent / "shared" / "vm" / "run-in-vm.sh"
        log("booting the VM (everything below runs under emulation)")
        t0 = time.perf_counter()
        p = subprocess.run([str(vm), "--timeout", str(args.vm_timeout), "--rw", str(work), "--", sys.executable,
                            str(Path(__file__).resolve()), "--guest", str(work / "params.json")], cwd=REPO)
        log(f"VM run took {time.perf_counter() - t0:.0f} s, exit status {p.returncode}")
        if not (work / "results.json").exists():
            log("no results from the guest")
            return 1
        res = json.loads((work / "results.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    any_mode = next((res[m] for m in MODES if m in res), {})
    cols = [("phase", "phase", None)] + [(m, LABELS[m], "{:.1f}") for m in MODES] + \
        [("ratio", "fscache / kernel", "{:.2f}x"), ("fuse_ratio", "FUSE / kernel", "{:.2f}x"),
         ("nora_ratio", "fscache / kernel no RA", "{:.2f}x")]
    table = Table(f"fscache vs kernel EROFS vs FUSE, one uncompressed image of {tree} "
                  f"({fmt_bytes(any_mode.get('bytes_small', 0))} in small files, {any_mode.get('entries', 0)} "
                  f"entries) + one {fmt_bytes(any_mode.get('bytes_big', 0))} file, "
                  f"in the test VM (6.12, qemu TCG: absolute numbers are emulated)", cols)
    for key, label in PHASES:
        row = {"phase": label}
        for m in MODES:
            row[m] = res.get(m, {}).get(key)
        if row.get("kernel") and row.get("fscache"):
            row["ratio"] = row["fscache"] / row["kernel"]
        if row.get("kernel") and row.get("fuse"):
            row["fuse_ratio"] = row["fuse"] / row["kernel"]
        if row.get("kernel-nora") and row.get("fscache"):
            row["nora_ratio"] = row["fscache"] / row["kernel-nora"]
        table.add(**row)
    for m, err in res.get("errors", {}).items():
        table.notes.append(f"{LABELS[m]}: not measured: {err}")
    if "fscache" in res:
        table.notes.append(f"fscache daemon READ requests over the whole run: {res['fscache'].get('daemon_reads')}")
    table.print()
    name = "fscache_vm-quick" if args.quick else "fscache_vm"
    table.save_json(args.out / f"{name}.json", machine=machine_info(), tree=tree, raw=res)
    table.save_csv(args.out / f"{name}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
