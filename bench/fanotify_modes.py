"""fanotify mode against the kernel's limit and FUSE, on the same images, in one run (issue 11).

    python bench/fanotify_modes.py                 # the 58k-entry bench rootfs (bench/rootfs.py)
    python bench/fanotify_modes.py --tree test     # the test rootfs (~8k entries, 213 MB): when CPU is scarce
    python bench/fanotify_modes.py --quick         # smoke run on a copy of /usr/include

Two ``rafsfs build`` images of the tree (``--compressor none`` and ``zstd``), their blobs pushed to a loopback
docker-registry.  For each image and each row:

kernel          file-backed EROFS with the complete uncompressed data file as ``device=`` (no daemon: the limit)
fanotify cold   ``rafsfs mount --mode fanotify`` from the registry, empty cache
fanotify warm   the same over a complete cache (the blob has no mark: the kernel reads alone), page cache dropped
fuse cold/warm  ``rafsfs mount --mode fuse``, the same two caches

workloads (each on a fresh mount once its daemon is idle, caches dropped first; cold rows on an empty chunk cache each
time; each cell the median of ``--repeat`` runs, 5 by default, the rows taking turns; a cell whose run took over 5 s
is run once):
walk            ``find MNT -ls``
big seq         the largest file read whole, 1 MiB reads
small files     every regular file < 64 KiB read whole, in walk order
rand 4K         2000 4 KiB preads at seeded random offsets of the >= 1 MiB files, 8 threads, ``POSIX_FADV_RANDOM``
python3         ``chroot MNT /usr/bin/python3 -c 'import json, sqlite3'`` (exec, loader, start-up imports)

For the fanotify rows: events the worker answered per MiB the workload read, and its handler latency p50/p99
(read -> answer, from the daemon's API).  Results: a table on stdout, JSON/CSV in ``--out``.

    python bench/fanotify_modes.py --seq           # issue 11's cold sequential target only

``--seq``: one big file of real data (the test rootfs tarball, >= 200 MiB) in a zstd image with 1 MiB chunks (built
and measured with bench/registry_read.py's code), read cold from the loopback registry with 1 MiB reads in fanotify
mode and in FUSE mode, against the single-thread zstd decompression rate of the same chunks measured in the same run
(the floor of issue 11: fanotify >= 0.5x it).  ``--repeat N`` runs each mode N times (median).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench.common import (REPO, MountDaemon, Table, drop_caches, log, machine_info, parent_parser,  # noqa: E402
                          run_timed)
from rafsfs import sysmount  # noqa: E402
from rafsfs.image import RafsImage  # noqa: E402

MiB = 1 << 20
RAFSFS = [sys.executable, "-m", "rafsfs.cli"]
REPO_NAME = "bench/fanotify"
WORKLOADS = ("walk", "big seq", "small files", "rand 4K", "python3")
REPEAT_UNDER = 5.0  # seconds: a cell that took less is run --repeat times (median); longer ones once


class Daemon(MountDaemon):
    """``rafsfs mount --foreground --mode MODE --config C --apisock S`` as a child process."""

    def __init__(self, mode: str, boot: Path, cfg: Path, mnt: Path):
        self.sock = str(mnt) + ".sock"
        super().__init__([str(boot), "--mode", mode, "--config", str(cfg), "--apisock", self.sock], mnt, label=mode)

    def metrics(self) -> dict:
        from rafsfs.api.client import ApiClient

        return ApiClient(self.sock).cache_metrics()


class Kernel:
    def __init__(self, boot: Path, data: Path, mnt: Path):
        mnt.mkdir(parents=True, exist_ok=True)
        self.mnt = mnt
        sysmount.mount_erofs(str(boot), str(mnt), [str(data)])

    def stop(self) -> None:
        sysmount.umount(str(self.mnt))


# ---------------------------------------------------------------------------- workloads
def plan_files(tree: Path) -> dict:
    files, big, small = [], [], []
    for dirpath, dirs, names in os.walk(tree):
        dirs.sort()
        for n in sorted(names):
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if st.st_mode & 0o170000 != 0o100000:
                continue
            rel = os.path.relpath(p, tree)
            files.append((rel, st.st_size))
            if st.st_size >= MiB:
                big.append((rel, st.st_size))
            elif st.st_size < 64 << 10:
                small.append(rel)
    largest = max(files, key=lambda f: f[1])
    rnd = random.Random(42)
    rand = []
    for _ in range(2000):
        rel, size = rnd.choices(big, weights=[s for _, s in big])[0]
        rand.append((rel, rnd.randrange(size // 4096) * 4096))
    return {"largest": largest, "small": small, "rand": rand}


def _read_whole(path: str, buf: bytearray) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            n += k
    return n


def run_workload(name: str, mnt: Path, plan: dict) -> tuple[float, int]:
    """(seconds, bytes read) of one workload on ``mnt``."""
    buf = bytearray(MiB)
    t0 = time.perf_counter()
    if name == "walk":
        run_timed(["find", str(mnt), "-ls"], quiet=True)
        return time.perf_counter() - t0, 0
    if name == "big seq":
        n = _read_whole(os.path.join(mnt, plan["largest"][0]), buf)
        return time.perf_counter() - t0, n
    if name == "small files":
        n = sum(_read_whole(os.path.join(mnt, rel), buf) for rel in plan["small"])
        return time.perf_counter() - t0, n
    if name == "rand 4K":
        rels = sorted({rel for rel, _ in plan["rand"]})
        fds = {rel: os.open(os.path.join(mnt, rel), os.O_RDONLY) for rel in rels}
        try:
            for fd in fds.values():
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            t0 = time.perf_counter()

            def work(k: int) -> None:
                for j in range(k, len(plan["rand"]), 8):
                    rel, off = plan["rand"][j]
                    os.pread(fds[rel], 4096, off)

            ts = [threading.Thread(target=work, args=(k,)) for k in range(8)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            return time.perf_counter() - t0, 4096 * len(plan["rand"])
        finally:
            for fd in fds.values():
                os.close(fd)
    if name == "python3":
        if not os.path.exists(os.path.join(mnt, "usr/bin/python3")):
            return float("nan"), 0
        p = subprocess.run(["chroot", str(mnt), "/usr/bin/python3", "-c", "import json, sqlite3"],
                           capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"python3 from {mnt}: {p.stderr[-500:]}")
        return time.perf_counter() - t0, 0
    raise ValueError(name)


# ---------------------------------------------------------------------------- the run
def write_config(path: Path, reg, cache: Path, prefetch_all: bool = False) -> Path:
    cfg = reg.nydusd_config(REPO_NAME, cache)
    if prefetch_all:
        cfg["fs_prefetch"] = {"enable": True, "prefetch_all": True, "threads_count": 2}
    path.write_text(json.dumps(cfg))
    return path


def complete_cache(boot: Path, reg, work: Path, name: str) -> Path:
    """A chunk cache holding every chunk of the image's blob (fanotify mode's whole-blob prefetch); returns it."""
    cache = work / f"complete-{name}"
    shutil.rmtree(cache, ignore_errors=True)
    cfg = write_config(work / f"prefetch-{name}.json", reg, cache, prefetch_all=True)
    d = Daemon("fanotify", boot, cfg, work / "mnt-prefetch")
    try:
        deadline = time.monotonic() + 1800
        while True:
            entries = [e for e in (cache.glob("*.chunk_map"))]
            if entries and all(_map_complete(e) for e in entries):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("whole-blob prefetch did not finish")
            time.sleep(0.5)
    finally:
        d.stop()
    return cache


def _map_complete(path: Path) -> bool:
    from rafsfs.storage.cache.blob_file import HEADER

    raw = path.read_bytes()[HEADER.size:]
    return bool(raw) and 0 not in raw


def run(args: argparse.Namespace) -> int:
    from registry_env import start_registry

    if os.geteuid() != 0:
        print("fanotify_modes: needs root (mounts, drop_caches, fanotify)", file=sys.stderr)
        return 1
    if args.tree == "test":
        from rootfs_cache import ensure_test_rootfs

        tree, label = ensure_test_rootfs(), "Debian test rootfs (minbase + python3)"
    else:
        from bench.rootfs import get_tree

        info = get_tree(quick=args.quick)
        tree, label = info.path, info.label
    work = args.out / "work" / "fanotify_modes"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    plan = plan_files(tree)
    log(f"tree {tree}: largest {plan['largest'][0]} ({plan['largest'][1] / MiB:.1f} MiB), "
        f"{len(plan['small'])} small files")
    table = Table(f"fanotify vs kernel vs FUSE, {label}: seconds (events/MiB, handler p50/p99 us for fanotify cold)",
                  [("image", "image", None), ("row", "row", None)]
                  + [(w, w, "{:.3f}") for w in WORKLOADS]
                  + [("ev_per_mib", "events/MiB", "{:.1f}"), ("handler", "handler p50/p99 us", None)])
    targets = Table("against the kernel (issue 11 targets)", [("image", "image", None), ("row", "row", None),
                                                               ("walk", "walk x time", "{:.2f}")]
                    + [(w, f"{w} x speed", "{:.2f}") for w in WORKLOADS[1:]])
    with start_registry(work / "reg") as reg:
        for comp in ("none", "zstd"):
            boot = work / f"{comp}.boot"
            run_timed([*RAFSFS, "build", str(tree), "--bootstrap", str(boot), "--blob-dir", str(work / "blobs"),
                       "--compressor", comp], cwd=REPO, quiet=True)
            blob_id = RafsImage.open(str(boot)).blobs[0].blob_id
            reg.push_blob(REPO_NAME, work / "blobs" / blob_id)
            log(f"{comp}: built and pushed; filling a complete cache")
            full = complete_cache(boot, reg, work, comp)
            data = next(full.glob("*.blob.data"))
            rows = {r: {"image": comp, "row": r} for r in
                    ("kernel", "fanotify cold", "fanotify warm", "fuse cold", "fuse warm")}
            events = event_bytes = 0
            lat: list[tuple[float, float]] = []
            for w in WORKLOADS:
                times: dict[str, list[float]] = {r: [] for r in rows}
                for k in range(args.repeat):  # the rows take turns, so each sees the same background load
                    for r in rows:
                        if k and times[r][-1] > REPEAT_UNDER:
                            continue  # long enough that one run is not noise
                        mnt = work / "mnt"
                        if r == "kernel":
                            m = Kernel(boot, data, mnt)
                        else:
                            mode, temp = r.split()
                            cache = full if temp == "warm" else work / f"cold-{comp}"
                            if temp == "cold":
                                shutil.rmtree(cache, ignore_errors=True)
                            cfg = write_config(work / f"{r.replace(' ', '-')}-{comp}.json", reg, cache)
                            m = Daemon(mode, boot, cfg, mnt)
                        try:
                            drop_caches()
                            took, nbytes = run_workload(w, mnt, plan)
                            times[r].append(took)
                            if r == "fanotify cold" and k == 0:
                                st = m.metrics().get("fanotify", {})
                                if nbytes:
                                    events += st.get("events", 0)
                                    event_bytes += nbytes
                                h = st.get("handler_us") or {}
                                if h.get("p50") is not None:
                                    lat.append((h["p50"], h["p99"]))
                        finally:
                            m.stop()
                for r in rows:
                    rows[r][w] = statistics.median(times[r])
                    log(f"{comp} {w:11s} {r:13s} {rows[r][w]:8.3f} s (median of {len(times[r])}: "
                        f"{' '.join(f'{t:.3f}' for t in times[r])})")
            cold = rows["fanotify cold"]
            cold["ev_per_mib"] = events / max(event_bytes / MiB, 1e-9) if event_bytes else None
            if lat:
                cold["handler"] = f"{sorted(p for p, _ in lat)[len(lat) // 2]:.0f}/{max(q for _, q in lat):.0f}"
            for r in rows.values():
                table.add(**r)
            k = rows["kernel"]
            for r in ("fanotify cold", "fanotify warm", "fuse warm"):
                targets.add(image=comp, row=r, walk=rows[r]["walk"] / k["walk"],
                            **{w: k[w] / rows[r][w] for w in WORKLOADS[1:] if rows[r][w] and r != "fanotify cold"})
    table.notes.append(f"each cell: median of --repeat {args.repeat} runs (once if over {REPEAT_UNDER:g} s); "
                       "kernel: EROFS with the complete data file and no daemon; warm: complete cache, caches dropped "
                       "(fanotify: no mark, the kernel reads alone); events/MiB over big seq + small files + rand 4K "
                       "bytes read (python3 excluded); handler: median of the per-workload p50s / max of the p99s")
    table.print()
    targets.notes.append("walk: time / the kernel's (target <= 1.2 cold and warm); reads: the kernel's time / this "
                         "row's (speed relative to the kernel; target >= 0.9 warm)")
    targets.print()
    table.save_json(args.out / "fanotify_modes.json", machine=machine_info(), tree=str(tree),
                    targets=targets.rows)
    table.save_csv(args.out / "fanotify_modes.csv")
    return 0


def run_seq(args: argparse.Namespace) -> int:
    """Cold sequential read of one big file from the registry: fanotify and FUSE against the zstd floor."""
    from registry_env import start_registry
    from rootfs_cache import ensure_test_rootfs

    from bench import registry_read as rr

    if os.geteuid() != 0:
        print("fanotify_modes: needs root (mounts, drop_caches, fanotify)", file=sys.stderr)
        return 1
    work = args.out / "work" / "fanotify_seq"
    src = work / "src"
    if not (src / rr.FILE).is_file():
        src.mkdir(parents=True, exist_ok=True)
        tar = ensure_test_rootfs().parent / "rootfs.tar"
        try:
            os.link(tar, src / rr.FILE)
        except OSError:
            shutil.copyfile(tar, src / rr.FILE)
    boot, blob = rr.build_image(work, src)
    size = (src / rr.FILE).stat().st_size
    secs, total = rr.zstd_rate(boot, blob)
    floor = total / MiB / secs
    log(f"{size / MiB:.1f} MiB file; zstd 1 thread: {floor:.1f} MiB/s")
    table = Table(f"cold sequential read of a {size / MiB:.0f} MiB file (zstd, 1 MiB chunks) from a loopback registry",
                  [("row", "row", None), ("secs", "seconds", "{:.2f}"), ("rate", "MiB/s", "{:.1f}"),
                   ("x_floor", "x zstd 1-thread", "{:.2f}"), ("ev_per_mib", "events/MiB", "{:.1f}"),
                   ("handler", "handler p50/p99 us", None)])
    table.add(row="zstd 1 thread (floor)", secs=secs, rate=floor, x_floor=1.0)
    with start_registry(work / "reg") as reg:
        reg.push_blob(REPO_NAME, blob)
        for mode in ("fanotify", "fuse"):
            runs = []
            for _ in range(args.repeat):
                cache = work / f"cold-{mode}"
                shutil.rmtree(cache, ignore_errors=True)
                cfg = write_config(work / f"{mode}.json", reg, cache)
                m = Daemon(mode, boot, cfg, work / "mnt")
                try:
                    drop_caches()
                    took, n = run_workload("big seq", work / "mnt", {"largest": (rr.FILE, size)})
                    st = m.metrics().get("fanotify", {}) if mode == "fanotify" else {}
                finally:
                    m.stop()
                h = st.get("handler_us") or {}
                runs.append({"secs": took, "rate": n / MiB / took, "x_floor": n / MiB / took / floor,
                             "ev_per_mib": st["events"] / (n / MiB) if st.get("events") else None,
                             "handler": f"{h['p50']:.0f}/{h['p99']:.0f}" if h.get("p50") is not None else None})
                log(f"{mode}: {runs[-1]}")
            table.add(row=f"{mode} cold", **sorted(runs, key=lambda r: r["secs"])[len(runs) // 2])
    table.notes.append(f"machine load average at the end: {os.getloadavg()[0]:.1f} (2 cores shared)")
    table.print()
    table.save_json(args.out / "fanotify_seq.json", machine=machine_info())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(parents=[parent_parser()], description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", choices=["bench", "test"], default="bench",
                   help="bench: the 58k-entry rootfs; test: the tests' smaller rootfs")
    p.add_argument("--seq", action="store_true", help="only the cold sequential read against the zstd floor")
    p.add_argument("--repeat", type=int, default=5,
                   help=f"runs per cell, median (cells over {REPEAT_UNDER:g} s run once); --seq: runs per mode")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    return run_seq(args) if args.seq else run(args)


if __name__ == "__main__":
    sys.exit(main())
