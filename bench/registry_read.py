"""Cold reads from a registry on loopback: rafsfs against a raw download and zstd decompression of the same blob.

    python bench/registry_read.py             # a 1 GiB tar of the Debian rootfs as one file (bench/rootfs.py)
    python bench/registry_read.py --quick     # a 96 MiB smoke file (the numbers are not the benchmark)

One image holding one large file of real, compressible data (the cached rootfs tarball), built with rafsfs (zstd,
1 MiB chunks) and pushed as a blob to Debian's ``docker-registry`` on 127.0.0.1 (``tests/registry_env.py``).  Then,
in one run, every case cold (page cache dropped, rafsfs cache directory empty):

* ``curl`` GET of the whole blob to /dev/null: the wire rate a plain download gets from this registry;
* for context, the same blob as sequential 1 MiB Range GETs on one connection (no decompression): what the registry
  gives a reader that has to ask by range (docker-registry spends a few ms on every request);
* zstd decompression of every chunk of the same blob, in memory, one thread (``rafsfs.compression.decompress``,
  the python-zstandard call rafsfs makes; the blob is read into memory first, untimed);
* rafsfs through a FUSE mount (``rafsfs mount --config``, a nydusd JSON config naming the registry and an empty
  cache directory): one sequential read of the file with 1 MiB ``read()`` calls, and the same read again from the
  cache after dropping the page cache (warm cache; its sha256 is checked against the source);
* the same cold FUSE read with ``amplify_io`` = 4 MiB in the config (larger merged requests; default 1 MiB);
* ``rafsfs cat IMAGE /FILE --config`` to /dev/null (a process, start-up included);
* random 4 KiB reads through a fresh mount with an empty cache (``POSIX_FADV_RANDOM``, so the kernel does not
  read ahead): registry requests (from the registry's log) against the chunks the reads touched.

Rates are MiB/s of the file's (uncompressed) bytes, so the download, decompression and rafsfs rows compare the time to
deliver the same data.  Goal (issue 3): cold rafsfs >= 0.5x the lower of the curl and zstd rates.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import pstats
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench.common import (REPO, Table, drop_caches, fmt_bytes, is_mounted, log, machine_info,  # noqa: E402
                          parent_parser, run_timed, save_plot)
from registry_env import start_registry  # noqa: E402

from rafsfs.compression import decompress  # noqa: E402
from rafsfs.image import RafsImage  # noqa: E402

MiB = 1 << 20
RAFSFS = [sys.executable, "-m", "rafsfs.cli", "--log-level", "warning"]
REPO_NAME = "bench/registry-read"
FILE = "image.tar"


# ---------------------------------------------------------------------------- data and image
def make_source(work: Path, quick: bool) -> tuple[Path, str]:
    """A directory holding one big file of real data; returns (dir, label)."""
    src = work / "src"
    target = src / FILE
    if target.is_file():
        return src, _label(quick)
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    if quick:
        # 96 MiB of shared libraries: real machine code and data, compressible like an image layer
        with open(target, "wb") as out:
            left = 96 * MiB
            for p in sorted(Path("/usr/lib/x86_64-linux-gnu").rglob("*.so*")):
                if left <= 0:
                    break
                if p.is_file() and not p.is_symlink():
                    data = p.read_bytes()[:left]
                    out.write(data)
                    left -= len(data)
    else:
        from bench.rootfs import ensure_rootfs

        tar = ensure_rootfs().parent / "rootfs.tar"
        try:
            os.link(tar, target)
        except OSError:
            shutil.copyfile(tar, target)
    return src, _label(quick)


def _label(quick: bool) -> str:
    return ("QUICK smoke file (96 MiB of /usr/lib shared libraries, not the benchmark)" if quick
            else "the cached Debian rootfs tarball (bench/rootfs.py) as one file")


def build_image(work: Path, src: Path) -> tuple[Path, Path]:
    boot, blobs = work / "image.boot", work / "blobs"
    if not boot.is_file():
        shutil.rmtree(blobs, ignore_errors=True)
        run_timed([*RAFSFS, "build", src, "--bootstrap", boot, "--blob-dir", blobs, "--compressor", "zstd",
                   "--chunk-size", "1M"], cwd=REPO)
    blob_id = RafsImage.open(str(boot)).blobs[0].blob_id
    return boot, blobs / blob_id


# ---------------------------------------------------------------------------- peers
def zstd_rate(boot: Path, blob: Path, threads: int = 1) -> tuple[float, int]:
    """(seconds, uncompressed bytes) to decompress every chunk of the blob, in memory."""
    img = RafsImage.open(str(boot))
    ino = img.resolve("/" + FILE)
    chunks = img.chunks(ino)
    raw = blob.read_bytes()
    b = img.blobs[0]
    pieces = [(raw[c.info.compressed_offset:c.info.compressed_offset + c.info.compressed_size],
               c.info.uncompressed_size, c.info.compressed) for c in chunks]

    def one(p):
        data, size, compressed = p
        return len(decompress(b.compressor, data, size) if compressed else data)

    t0 = time.perf_counter()
    if threads == 1:
        total = sum(one(p) for p in pieces)
    else:
        with ThreadPoolExecutor(threads) as ex:
            total = sum(ex.map(one, pieces))
    return time.perf_counter() - t0, total


def ranged_gets(port: int, path: str, size: int, piece: int) -> float:
    """Seconds to GET the whole blob as sequential ``piece``-byte Range requests on one keep-alive connection
    (http.client, no decompression): what the registry gives a reader that must ask by range."""
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    got = 0
    t0 = time.perf_counter()
    for off in range(0, size, piece):
        c.request("GET", path, headers={"Range": f"bytes={off}-{min(off + piece, size) - 1}"})
        got += len(c.getresponse().read())
    took = time.perf_counter() - t0
    c.close()
    if got != size:
        raise RuntimeError(f"ranged GETs returned {got} of {size} bytes")
    return took


# ---------------------------------------------------------------------------- rafsfs
class Mount:
    """``rafsfs mount`` (daemon) and ``rafsfs umount``: the product's own commands."""

    def __init__(self, boot: Path, mnt: Path, config: Path, log_file: Path):
        self.mnt = mnt
        mnt.mkdir(parents=True, exist_ok=True)
        run_timed([*RAFSFS, "mount", boot, mnt, "--config", config, "--log-file", log_file], cwd=REPO, quiet=True)

    def close(self) -> None:
        if is_mounted(self.mnt):
            run_timed([*RAFSFS, "umount", self.mnt], cwd=REPO, quiet=True)
        for _ in range(100):
            if not is_mounted(self.mnt):
                return
            time.sleep(0.1)


def read_file(path: Path, bs: int = MiB, hash_it: bool = False) -> tuple[float, int, str | None]:
    h = hashlib.sha256() if hash_it else None
    buf = bytearray(bs)
    n = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            n += k
            if h:
                h.update(memoryview(buf)[:k])
    return time.perf_counter() - t0, n, h.hexdigest() if h else None


def drop_file_pages(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fresh_cache(work: Path, name: str) -> Path:
    d = work / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def write_config(path: Path, reg, cache_dir: Path, amplify_io: int | None = None) -> Path:
    import json

    cfg = reg.nydusd_config(REPO_NAME, cache_dir)
    if amplify_io:
        cfg["amplify_io"] = amplify_io
    path.write_text(json.dumps(cfg))
    return path


def random_reads(path: Path, size: int, count: int, chunk_size: int, seed: int = 1) -> tuple[float, set[int]]:
    rnd = random.Random(seed)
    offsets = [rnd.randrange(0, size - 4096) for _ in range(count)]
    touched: set[int] = set()
    for off in offsets:
        touched.update({off // chunk_size, (off + 4095) // chunk_size})
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        t0 = time.perf_counter()
        for off in offsets:
            if len(os.pread(fd, 4096, off)) != 4096:
                raise RuntimeError(f"short read at {off}")
        took = time.perf_counter() - t0
    finally:
        os.close(fd)
    return took, touched


def profile_cat(boot: Path, config: Path, out: Path) -> str:
    """``rafsfs cat`` of the file under cProfile (cold), top functions by cumulative and own time."""
    prof = out / "registry_read-cat.prof"
    drop_caches()
    with open(os.devnull, "wb") as null:
        subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "rafsfs.cli", "--log-level",
                        "warning", "cat", str(boot), "/" + FILE, "--config", str(config)], stdout=null, cwd=REPO,
                       check=True)
    s = io.StringIO()
    st = pstats.Stats(str(prof), stream=s)
    st.sort_stats("cumulative").print_stats(18)
    st.sort_stats("tottime").print_stats(12)
    return s.getvalue()


# ---------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[parent_parser()])
    ap.add_argument("--repeat", type=int, default=1, help="cold runs per case; the median is reported")
    ap.add_argument("--random-reads", type=int, default=400, help="random 4 KiB reads (default 400)")
    ap.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                    help="profile 'rafsfs cat' when rafsfs misses the goal (auto), always, or never")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("registry_read.py needs root (FUSE mounts, dropping caches)", file=sys.stderr)
        return 1
    out = args.out
    work = out / "work" / ("registry_read-quick" if args.quick else "registry_read")
    work.mkdir(parents=True, exist_ok=True)
    src, label = make_source(work, args.quick)
    size = (src / FILE).stat().st_size
    src_sha = hashlib.sha256((src / FILE).read_bytes()).hexdigest()
    boot, blob = build_image(work, src)
    blob_size = blob.stat().st_size
    chunk_size = RafsImage.open(str(boot)).blobs[0].chunk_size
    log(f"{label}: {fmt_bytes(size)} -> blob {fmt_bytes(blob_size)} ({blob_size / size:.0%}), chunks of "
        f"{fmt_bytes(chunk_size)}")

    def med(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    rows: dict[str, dict] = {}
    with start_registry(work / "registry") as reg:
        log("pushing the blob")
        digest = reg.push_blob(REPO_NAME, blob)
        url = f"{reg.url}/v2/{REPO_NAME}/blobs/sha256:{digest}"

        # -- curl
        walls = []
        for _ in range(args.repeat):
            drop_caches()
            t = run_timed(["curl", "-sf", "-o", "/dev/null", "-w", "%{size_download}", url])
            assert int(t.stdout) == blob_size, t.stdout
            walls.append(t.wall)
        rows["curl"] = dict(case="curl GET of the whole blob (wire)", seconds=med(walls), cpu=t.cpu)

        # -- the same blob as 1 MiB ranged GETs (context: a lazy reader cannot ask for the whole blob)
        walls = []
        for _ in range(args.repeat):
            drop_caches()
            walls.append(ranged_gets(reg.port, f"/v2/{REPO_NAME}/blobs/sha256:{digest}", blob_size, MiB))
        rows["ranged"] = dict(case="1 MiB ranged GETs, one connection, no decompression (context)",
                              seconds=med(walls), requests=-(-blob_size // MiB))

        # -- zstd, 1 and 2 threads
        for threads in (1, 2):
            walls = []
            for _ in range(args.repeat):
                took, total = zstd_rate(boot, blob, threads)
                assert total == size
                walls.append(took)
            rows[f"zstd{threads}"] = dict(case=f"zstd decompress, in memory, {threads} thread{'s' * (threads > 1)}",
                                          seconds=med(walls))

        # -- rafsfs FUSE, cold then warm
        walls, warm_walls, reqs, req_bytes = [], [], [], []
        for i in range(args.repeat):
            cache = fresh_cache(work, "cache-seq")
            cfg = write_config(work / "seq.json", reg, cache)
            m = Mount(boot, work / "mnt", cfg, work / "mount.log")
            try:
                before = reg.blob_gets(digest)
                drop_caches()
                took, n, _ = read_file(m.mnt / FILE)
                assert n == size
                walls.append(took)
                gets = reg.blob_gets(digest)[len(before):]
                reqs.append(len(gets))
                req_bytes.append(sum(g["bytes"] for g in gets))
                drop_file_pages(m.mnt / FILE)
                drop_caches()
                took, n, sha = read_file(m.mnt / FILE, hash_it=True)
                if sha != src_sha:
                    raise RuntimeError("the file read through the FUSE mount differs from the source")
                warm_walls.append(took)
                if len(reg.blob_gets(digest)) != len(before) + reqs[-1]:
                    raise RuntimeError("the warm read went to the registry")
            finally:
                m.close()
        rows["fuse"] = dict(case="rafsfs FUSE mount, cold (sequential 1 MiB reads)", seconds=med(walls),
                            requests=med(reqs), req_mib=med(req_bytes) / MiB)
        rows["fuse_warm"] = dict(case="rafsfs FUSE mount, warm cache (page cache dropped), sha256 ok",
                                 seconds=med(warm_walls), requests=0)

        # -- the same cold read with 4 MiB merged requests (nydusd's amplify_io; the default is 1 MiB)
        walls, reqs = [], []
        for i in range(args.repeat):
            cfg = write_config(work / "seq4.json", reg, fresh_cache(work, "cache-seq4"), amplify_io=4 * MiB)
            m = Mount(boot, work / "mnt", cfg, work / "mount4.log")
            try:
                before = len(reg.blob_gets(digest))
                drop_caches()
                took, n, _ = read_file(m.mnt / FILE)
                assert n == size
                walls.append(took)
                reqs.append(len(reg.blob_gets(digest)) - before)
            finally:
                m.close()
        rows["fuse4"] = dict(case="rafsfs FUSE mount, cold, amplify_io = 4 MiB", seconds=med(walls),
                             requests=med(reqs))

        # -- rafsfs cat
        walls, reqs = [], []
        for i in range(args.repeat):
            cache = fresh_cache(work, "cache-cat")
            cfg = write_config(work / "cat.json", reg, cache)
            before = len(reg.blob_gets(digest))
            drop_caches()
            t = run_timed(["sh", "-c", 'exec "$@" > /dev/null', "sh", *RAFSFS, "cat", boot, "/" + FILE,
                           "--config", cfg], cwd=REPO)
            walls.append(t.wall)
            reqs.append(len(reg.blob_gets(digest)) - before)
        rows["cat"] = dict(case="rafsfs cat --config (process, start-up included)", seconds=med(walls), cpu=t.cpu,
                           requests=med(reqs))

        # -- random 4 KiB
        cache = fresh_cache(work, "cache-rand")
        cfg = write_config(work / "rand.json", reg, cache)
        m = Mount(boot, work / "mnt", cfg, work / "mount-rand.log")
        try:
            before = len(reg.blob_gets(digest))
            drop_caches()
            took, touched = random_reads(m.mnt / FILE, size, args.random_reads, chunk_size)
            rand_reqs = len(reg.blob_gets(digest)) - before
        finally:
            m.close()
        rows["rand"] = dict(case=f"rafsfs FUSE, {args.random_reads} random 4 KiB reads, cold", seconds=took,
                            requests=rand_reqs, chunks=len(touched))

        if args.profile == "always":
            prof_text = profile_cat(boot, write_config(work / "prof.json", reg, fresh_cache(work, "cache-prof")), out)
        else:
            prof_text = None

    # -- the table
    for key, r in rows.items():
        if key != "rand":
            r["mib_s"] = size / MiB / r["seconds"]
    curl_rate, zstd_rate_1 = rows["curl"]["mib_s"], rows["zstd1"]["mib_s"]
    floor = min(curl_rate, zstd_rate_1)
    for key in ("fuse", "fuse4", "cat", "fuse_warm"):
        rows[key]["vs_floor"] = rows[key]["mib_s"] / floor
    rows["curl"]["wire_mib_s"] = blob_size / MiB / rows["curl"]["seconds"]
    r = rows["rand"]
    r["iops"] = args.random_reads / r["seconds"]
    r["req_per_chunk"] = r["requests"] / r["chunks"]

    title = (f"rafsfs cold read from docker-registry on loopback: {label}\n"
             f"  {fmt_bytes(size)} file, zstd blob {fmt_bytes(blob_size)}, {fmt_bytes(chunk_size)} chunks "
             f"({os.cpu_count()} CPUs, kernel {os.uname().release}; median of {args.repeat})")
    t = Table(title, [("case", "case", None), ("seconds", "seconds", "{:.2f}"), ("mib_s", "MiB/s", "{:.0f}"),
                      ("vs_floor", "vs goal floor", "{:.2f}x"), ("requests", "registry GETs", "{:.0f}"),
                      ("req_mib", "GET MiB", "{:.0f}"), ("chunks", "chunks touched", None),
                      ("iops", "IOPS", "{:.0f}"), ("req_per_chunk", "GETs/chunk", "{:.2f}")])
    for key in ("curl", "ranged", "zstd1", "zstd2", "fuse", "fuse4", "cat", "fuse_warm", "rand"):
        t.add(**rows[key])
    goal_ok = rows["fuse"]["vs_floor"] >= 0.5
    t.notes += [
        f"MiB/s = the file's uncompressed bytes / seconds (curl moved {rows['curl']['wire_mib_s']:.0f} MiB/s of "
        "compressed blob on the wire).",
        f"goal floor = min(curl {curl_rate:.0f}, zstd 1 thread {zstd_rate_1:.0f}) = {floor:.0f} MiB/s; "
        f"goal >= 0.5x: FUSE cold {rows['fuse']['vs_floor']:.2f}x -> {'PASS' if goal_ok else 'MISS'}, "
        f"cat {rows['cat']['vs_floor']:.2f}x -> {'PASS' if rows['cat']['vs_floor'] >= 0.5 else 'MISS'}",
        f"random 4 KiB: {r['requests']} registry GETs for {r['chunks']} chunks touched "
        f"({r['req_per_chunk']:.2f} per chunk; goal <= 1) -> {'PASS' if r['req_per_chunk'] <= 1 else 'MISS'}",
    ]
    t.print()
    stem = "registry_read-quick" if args.quick else "registry_read"
    t.save_json(out / f"{stem}.json", machine=machine_info(), file_bytes=size, blob_bytes=blob_size,
                chunk_size=chunk_size, label=label)
    t.save_csv(out / f"{stem}.csv")
    keys = ["curl", "ranged", "zstd1", "fuse", "fuse4", "cat", "fuse_warm"]
    save_plot(out / f"{stem}.png", [rows[k]["case"] for k in keys], [rows[k]["mib_s"] for k in keys],
              title="cold read from a loopback registry (MiB/s of file data)", xlabel="MiB/s",
              colors=["tab:blue", "tab:blue", "tab:blue", "tab:orange", "tab:orange", "tab:orange", "tab:green"])
    if prof_text is None and args.profile == "auto" and not goal_ok:
        log("rafsfs missed the goal: profiling 'rafsfs cat' (cold)")
        with start_registry(work / "registry") as reg:
            reg.push_blob(REPO_NAME, blob)
            prof_text = profile_cat(boot, write_config(work / "prof.json", reg, fresh_cache(work, "cache-prof")),
                                    out)
    if prof_text:
        print("\nprofile of 'rafsfs cat' (cold):\n" + prof_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
