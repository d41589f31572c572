"""FUSE mode against the kernel's EROFS on the same uncompressed image, in one run.

    python bench/fuse_vs_kernel.py            # the bench rootfs (>= 50k entries, bench/rootfs.py), made once and cached
    python bench/fuse_vs_kernel.py --quick    # smoke run on a copy of /usr/include

One ``rafsfs build --compressor none`` image of the tree is mounted twice: by the kernel (file-backed EROFS, the blob
as its ``device=``) and by ``rafsfs mount --mode fuse --blob-dir`` (the daemon reads the same blob file, verifying
every chunk).  Then, for each mount, the same Python code measures:

metadata walk   ``find MNT -ls > /dev/null``, cold (caches dropped, FUSE daemon freshly started) and warm
sequential      every file >= 1 MiB read whole with 1 MiB reads, in path order: cold and warm page cache; and cold
                with 128 KiB reads, as cat and cp do (the kernel's read-ahead then sends windows that straddle chunks)
whole tree      every regular file read whole (tar-like: open, read, close), cold
random 4 KiB    4 KiB preads at seeded random aligned offsets of the >= 1 MiB files, ``POSIX_FADV_RANDOM`` on every fd
                (no read-ahead), caches dropped after the files are opened: 1 thread and 16 threads, IOPS

Warm numbers are the best of three walks / five reads (on a shared machine another process may drop the caches in
between, and a warm read of the big files takes only ~0.05 s);
``--repeat N`` rounds (kernel, then FUSE, taking turns so both see the same background load), medians reported.
Cold means ``sync; echo 3 > /proc/sys/vm/drop_caches`` (page cache, dentries, inodes) and, for FUSE, a new daemon
(its in-memory inode and directory caches empty).  Mount and daemon start-up are outside the timings.  Checks: the
walks list the same number of entries, the sequential and whole-tree reads return the same byte counts, and the random
reads return the same bytes on both mounts.  Goals (issue 4): sequential >= 0.5x kernel, cold metadata walk <= 2x
kernel time.  Results go to ``--out`` as JSON and CSV.  ``--profile`` runs the FUSE daemon once more under cProfile
(event-loop thread: metadata operations) during a cold walk and a cold sequential read, and prints its top functions.
"""
from __future__ import annotations

import argparse
import os
import pstats
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (REPO, MountDaemon, Table, drop_caches, fmt_bytes, is_mounted, log, machine_info,  # noqa: E402
                          parent_parser, run_timed)
from bench.rootfs import get_tree  # noqa: E402
from rafsfs import sysmount  # noqa: E402
from rafsfs.image import RafsImage  # noqa: E402

MiB = 1 << 20
RAFSFS = [sys.executable, "-m", "rafsfs.cli"]
BIG = 1 * MiB  # "sequential" files: at least this big


# ---------------------------------------------------------------------------- mounts
class FuseDaemon:
    """``rafsfs mount --foreground --mode fuse`` as a child process (optionally under cProfile), restartable."""

    def __init__(self, boot: Path, blobs: Path, mnt: Path, profile: Path | None = None):
        self.boot, self.blobs, self.mnt, self.profile = boot, blobs, mnt, profile
        self.daemon: MountDaemon | None = None

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.daemon.proc if self.daemon else None

    def start(self) -> "FuseDaemon":
        py = [sys.executable] + (["-m", "cProfile", "-o", str(self.profile)] if self.profile else [])
        self.daemon = MountDaemon([str(self.boot), "--mode", "fuse", "--blob-dir", str(self.blobs)], self.mnt,
                                  label="FUSE", python=py, timeout=60)
        return self

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None

    def rss_kb(self) -> int:
        assert self.daemon is not None
        return self.daemon.rss_kb()

    def cpu_s(self) -> float:
        assert self.daemon is not None
        return self.daemon.cpu_s()


class KernelMount:
    def __init__(self, boot: Path, blob: Path, mnt: Path):
        self.boot, self.blob, self.mnt = boot, blob, mnt

    def start(self) -> "KernelMount":
        self.mnt.mkdir(parents=True, exist_ok=True)
        sysmount.mount_erofs(str(self.boot), str(self.mnt), [str(self.blob)])
        return self

    def stop(self) -> None:
        sysmount.umount(str(self.mnt))


# ---------------------------------------------------------------------------- workloads
@dataclass
class Files:
    big: list[str]  # relative paths of regular files >= BIG, sorted
    big_bytes: int
    all: list[str]  # every regular file, in walk order
    all_bytes: int


def list_files(tree: Path) -> Files:
    big, allf, big_bytes, all_bytes = [], [], 0, 0
    for dirpath, dirs, names in os.walk(tree):
        dirs.sort()
        for n in sorted(names):
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if st.st_mode & 0o170000 != 0o100000:
                continue
            rel = os.path.relpath(p, tree)
            allf.append(rel)
            all_bytes += st.st_size
            if st.st_size >= BIG:
                big.append(rel)
                big_bytes += st.st_size
    return Files(sorted(big), big_bytes, allf, all_bytes)


def walk(mnt: Path) -> tuple[float, int]:
    t = run_timed(["find", str(mnt), "-ls"], quiet=True)
    return t.wall, t.stdout.count("\n")


def read_files(mnt: Path, rels: list[str], bufsize: int = MiB) -> tuple[float, int]:
    buf = bytearray(bufsize)
    total = 0
    t0 = time.perf_counter()
    for rel in rels:
        fd = os.open(os.path.join(mnt, rel), os.O_RDONLY)
        try:
            with open(fd, "rb", buffering=0, closefd=False) as f:
                while n := f.readinto(buf):
                    total += n
        finally:
            os.close(fd)
    return time.perf_counter() - t0, total


def random_plan(tree: Path, rels: list[str], n: int, seed: int = 42) -> list[tuple[int, int]]:
    """(file index, 4 KiB-aligned offset) pairs, uniform over the bytes of the big files."""
    sizes = [os.path.getsize(os.path.join(tree, r)) for r in rels]
    rnd = random.Random(seed)
    plan = []
    for _ in range(n):
        i = rnd.choices(range(len(rels)), weights=sizes)[0]
        plan.append((i, rnd.randrange(sizes[i] // 4096) * 4096))
    return plan


def random_reads(mnt: Path, rels: list[str], plan: list[tuple[int, int]], threads: int) -> tuple[float, list[bytes]]:
    """Open every file, drop caches, then time the plan's 4 KiB preads across ``threads`` threads."""
    fds = [os.open(os.path.join(mnt, r), os.O_RDONLY) for r in rels]
    try:
        for fd in fds:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        drop_caches()
        out: list[bytes] = [b""] * len(plan)

        def work(k: int) -> None:
            for j in range(k, len(plan), threads):
                i, off = plan[j]
                out[j] = os.pread(fds[i], 4096, off)

        ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return time.perf_counter() - t0, out
    finally:
        for fd in fds:
            os.close(fd)


# ---------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("fuse_vs_kernel: needs root (mounts, drop_caches)", file=sys.stderr)
        return 1
    info = get_tree(quick=args.quick)
    log(info.summary())
    work = args.work or (args.out / ("fuse_vs_kernel-quick-work" if args.quick else "fuse_vs_kernel-work"))
    work.mkdir(parents=True, exist_ok=True)
    boot, blobs = work / "none.boot", work / "blobs"
    stamp = work / "built-from"
    if not (boot.is_file() and stamp.is_file() and stamp.read_text() == f"{info.path} {info.entries} {info.bytes}"):
        log("building the --compressor none image")
        run_timed(RAFSFS + ["--log-level", "warning", "build", str(info.path), "--bootstrap", str(boot),
                            "--blob-dir", str(blobs), "--compressor", "none"], env=dict(os.environ, PYTHONPATH=str(REPO)))
        stamp.write_text(f"{info.path} {info.entries} {info.bytes}")
    with RafsImage.open(str(boot)) as img:
        blob = blobs / img.blobs[0].blob_id
    files = list_files(info.path)
    log(f"{len(files.big)} files >= {fmt_bytes(BIG)} ({fmt_bytes(files.big_bytes)}); "
        f"{len(files.all)} regular files ({fmt_bytes(files.all_bytes)})")
    plan = random_plan(info.path, files.big, args.random_reads)

    kmnt, fmnt = work / "kernel-mnt", work / "fuse-mnt"
    for m in (kmnt, fmnt):
        if m.exists() and is_mounted(m):
            sysmount.umount(str(m), lazy=True)
    kernel = KernelMount(boot, blob, kmnt)
    fuse = FuseDaemon(boot, blobs, fmnt)
    res: dict[str, dict[str, list[float]]] = {"kernel": {}, "fuse": {}}
    checks: dict[str, list] = {"walk": [], "seq": [], "tree": [], "random": []}
    extra: dict[str, float] = {}

    def cold(which: str) -> KernelMount | FuseDaemon:
        """A freshly started mount with every cache dropped."""
        m: KernelMount | FuseDaemon = kernel if which == "kernel" else fuse
        if (which == "kernel" and is_mounted(kmnt)) or (which == "fuse" and fuse.proc):
            m.stop()
        m.start()
        drop_caches()
        return m

    def one_round(which: str, mnt: Path) -> None:
        r = res[which]

        def put(key: str, v: float) -> None:
            r.setdefault(key, []).append(v)

        log(f"{which}: metadata walk, cold then warm")
        m = cold(which)
        t, n = walk(mnt)
        put("walk_cold", t)
        t, n2 = min(walk(mnt) for _ in range(3))  # warm: the best of three
        put("walk_warm", t)
        checks["walk"].append((n, n2))
        log(f"{which}: sequential read of the big files, cold then warm")
        m = cold(which)
        t, nb = read_files(mnt, files.big)
        put("seq_cold_s", t)
        t, nb2 = min(read_files(mnt, files.big) for _ in range(5))  # 0.05-0.1 s each: the best of five
        put("seq_warm_s", t)
        checks["seq"].append((nb, nb2))
        log(f"{which}: sequential read of the big files with 128 KiB reads (like cat), cold")
        m = cold(which)
        t, nb3 = read_files(mnt, files.big, 128 << 10)
        put("seq128_cold_s", t)
        checks["seq"].append((nb3, nb3))
        log(f"{which}: whole tree, cold")
        m = cold(which)
        t, nt = read_files(mnt, files.all)
        put("tree_cold_s", t)
        checks["tree"].append(nt)
        if which == "fuse":
            extra["fuse_rss_mb_after_tree"] = m.rss_kb() / 1024
            extra["fuse_cpu_s_after_tree"] = m.cpu_s()
        for th in (1, 16):
            log(f"{which}: {len(plan)} random 4 KiB reads, {th} thread(s), cold")
            m = cold(which)
            t, data = random_reads(mnt, files.big, plan, th)
            put(f"rand{th}_s", t)
            checks["random"].append(data)
        m.stop()

    try:
        for rep in range(args.repeat):  # kernel and FUSE take turns, so both see the same background load
            log(f"round {rep + 1} of {args.repeat}")
            one_round("kernel", kmnt)
            one_round("fuse", fmnt)
        if args.profile:
            profile_fuse(boot, blobs, work, files)
    finally:
        fuse.stop()
        if is_mounted(kmnt):
            kernel.stop()

    ok = {
        "walk": len({c for pair in checks["walk"] for c in pair}) == 1,
        "seq": len({c for pair in checks["seq"] for c in pair}) == 1 and checks["seq"][0][0] == files.big_bytes,
        "tree": len(set(checks["tree"])) == 1 and checks["tree"][0] == files.all_bytes,
        "random": all(d == checks["random"][0] for d in checks["random"]),
    }
    k = {key: statistics.median(v) for key, v in res["kernel"].items()}
    f = {key: statistics.median(v) for key, v in res["fuse"].items()}
    nwalk = checks["walk"][0][0]
    table = Table(
        f"FUSE vs kernel EROFS, same uncompressed rafsfs image: {info.label}\n"
        f"  {info.entries} entries, {len(files.all)} regular files, {fmt_bytes(files.all_bytes)}; "
        f"{len(files.big)} files >= 1 MiB ({fmt_bytes(files.big_bytes)}); {machine_info().get('cpus')} CPUs, "
        f"kernel {os.uname().release}; median of {args.repeat} round(s)",
        [("test", "test", None), ("unit", "unit", None), ("kernel", "kernel", "{:.1f}"), ("fuse", "FUSE", "{:.1f}"),
         ("ratio", "FUSE/kernel", "{:.2f}x"), ("goal", "goal", None), ("met", "met", None), ("check", "check", None)])

    def row(test: str, unit: str, kv: float, fv: float, goal: str = "", goal_ok=None, check: str = "") -> None:
        ratio = fv / kv if kv else 0.0
        table.add(test=test, unit=unit, kernel=kv, fuse=fv, ratio=ratio, goal=goal,
                  met=("yes" if goal_ok(ratio) else "NO") if goal_ok else "", check=check)

    def ck(key: str) -> str:
        return "PASS" if ok[key] else "FAIL"

    row("metadata walk (find -ls), cold", "s", k["walk_cold"], f["walk_cold"], "<= 2x time",
        lambda r: r <= 2.0, ck("walk"))
    row("metadata walk (find -ls), warm", "s", k["walk_warm"], f["walk_warm"], check=ck("walk"))
    mib = files.big_bytes / MiB
    row("sequential read >= 1 MiB files, cold", "MiB/s", mib / k["seq_cold_s"], mib / f["seq_cold_s"],
        ">= 0.5x", lambda r: r >= 0.5, ck("seq"))
    row("sequential, 128 KiB reads (cat), cold", "MiB/s", mib / k["seq128_cold_s"], mib / f["seq128_cold_s"],
        ">= 0.5x", lambda r: r >= 0.5, ck("seq"))
    row("sequential read >= 1 MiB files, warm", "MiB/s", mib / k["seq_warm_s"], mib / f["seq_warm_s"],
        ">= 0.5x", lambda r: r >= 0.5, ck("seq"))
    tmib = files.all_bytes / MiB
    row("read every file (tar-like), cold", "MiB/s", tmib / k["tree_cold_s"], tmib / f["tree_cold_s"],
        check=ck("tree"))
    for th in (1, 16):
        row(f"random 4 KiB reads, {th} thread{'s' if th > 1 else ''}, cold", "IOPS", len(plan) / k[f"rand{th}_s"],
            len(plan) / f[f"rand{th}_s"], check=ck("random"))
    table.notes.append(f"walk: {nwalk} entries listed; random: {len(plan)} reads (seeded) over the >= 1 MiB files; "
                       f"FUSE daemon after the tree read: RSS {extra.get('fuse_rss_mb_after_tree', 0):.0f} MiB, "
                       f"CPU {extra.get('fuse_cpu_s_after_tree', 0):.1f} s")
    table.print()
    suffix = "-quick" if args.quick else ""
    table.save_json(args.out / f"fuse_vs_kernel{suffix}.json", tree=info.to_json(), machine=machine_info(),
                    raw=res, extra=extra)
    table.save_csv(args.out / f"fuse_vs_kernel{suffix}.csv")
    return 0 if all(ok.values()) else 1


def profile_fuse(boot: Path, blobs: Path, work: Path, files: Files) -> None:
    prof = work / "fuse-daemon.prof"
    d = FuseDaemon(boot, blobs, work / "fuse-mnt", profile=prof).start()
    try:
        drop_caches()
        walk(d.mnt)
        drop_caches()
        read_files(d.mnt, files.big)
    finally:
        d.stop()
    log(f"cProfile of the FUSE daemon's event-loop thread (cold walk + cold sequential read): {prof}")
    pstats.Stats(str(prof)).sort_stats("cumulative").print_stats(25)
    pstats.Stats(str(prof)).sort_stats("tottime").print_stats(20)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[parent_parser()],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--work", type=Path, help="scratch directory for the image and mountpoints (default OUT/...-work)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (kernel, then FUSE); medians reported (default 3)")
    ap.add_argument("--random-reads", type=int, default=4000, help="random 4 KiB reads per run (default 4000)")
    ap.add_argument("--profile", action="store_true", help="also profile the FUSE daemon (cProfile) and print it")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
