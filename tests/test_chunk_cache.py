"""The chunk cache over a real local blob: single-flight, merging, persistence, corruption handling."""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

import pytest

from rafsfs.builder import BuildOptions, build
from rafsfs.errors import BlobUnavailable, CorruptChunk
from rafsfs.image import RafsImage
from rafsfs.storage.backend.base import BlobRef
from rafsfs.storage.backend.localfs import LocalFsBackend
from rafsfs.storage.cache import chunk_cache
from rafsfs.storage.cache.blob_file import DATA_SUFFIX, MAP_SUFFIX, entries_of, ready_map
from rafsfs.storage.cache.chunk_cache import CacheOptions, ChunkCache


class CountingBackend(LocalFsBackend):
    """A real local backend that counts requests and can be slowed down to widen races."""

    def __init__(self, blob_dir: str, delay: float = 0.0):
        super().__init__(blob_dir)
        self.requests: list[tuple[int, int]] = []
        self.delay = delay
        self._l = threading.Lock()

    def read(self, blob: BlobRef, offset: int, size: int) -> bytes:
        with self._l:
            self.requests.append((offset, size))
        if self.delay:
            threading.Event().wait(self.delay)
        return super().read(blob, offset, size)


def _random_image(d: Path, sizes: dict[str, int], seed: int, **opts) -> tuple[Path, Path, dict[str, bytes]]:
    """Files of random (incompressible) bytes of the given sizes, built into a zstd image in ``d``."""
    src = d / "src"
    src.mkdir()
    rnd = __import__("random").Random(seed)
    files = {}
    for name, size in sizes.items():
        files["/" + name] = rnd.randbytes(size)
        (src / name).write_bytes(files["/" + name])
    build(BuildOptions(source=str(src), bootstrap=str(d / "boot"), blob_dir=str(d / "blobs"), compressor="zstd",
                       **opts))
    return d / "boot", d / "blobs", files


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> tuple[Path, Path, dict[str, bytes]]:
    return _random_image(tmp_path_factory.mktemp("cache-img"), {f"f{i}": 300_000 + i * 12345 for i in range(6)},
                         7, chunk_size=64 << 10)


def _read_all(img: RafsImage, cache: ChunkCache) -> dict[str, bytes]:
    out = {}
    for p, ino in img.walk():
        if ino.is_reg():
            out[os.fsdecode(p)] = img.read(ino, 0, ino.size, cache)
    return out


def test_cold_then_warm_and_restart(image, tmp_path):
    boot, blobs, files = image
    img = RafsImage.open(str(boot))
    be = CountingBackend(str(blobs))
    cache = ChunkCache(be, CacheOptions(work_dir=str(tmp_path / "cache")))
    assert _read_all(img, cache) == files
    cold = len(be.requests)
    total_chunks = img.blobs[0].chunk_count
    # merged requests: far fewer than one per chunk
    assert 0 < cold < total_chunks
    assert _read_all(img, cache) == files
    assert len(be.requests) == cold  # warm: zero backend requests
    cache.close()
    # a restarted daemon reuses the persisted cache
    be2 = CountingBackend(str(blobs))
    cache2 = ChunkCache(be2, CacheOptions(work_dir=str(tmp_path / "cache")))
    assert _read_all(RafsImage.open(str(boot)), cache2) == files
    assert be2.requests == []
    snap = cache2.metrics.snapshot()
    assert snap["misses"] == 0 and snap["hits"] >= total_chunks


def test_single_flight(image, tmp_path):
    boot, blobs, files = image
    img = RafsImage.open(str(boot))
    be = CountingBackend(str(blobs), delay=0.2)
    cache = ChunkCache(be, CacheOptions(work_dir=str(tmp_path / "cache"), amplify_io=1))
    ino = img.resolve("/f3")
    results: list[bytes] = []
    barrier = threading.Barrier(16)

    def reader() -> None:
        barrier.wait()
        results.append(img.read(ino, 0, 4096, cache))

    threads = [threading.Thread(target=reader) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16 and all(r == files["/f3"][:4096] for r in results)
    assert len(be.requests) == 1


def _corrupt_copy(img: RafsImage, blobs: Path, dest: Path, victim_path: str):
    """A copy of the blob directory with one byte of ``victim_path``'s first chunk flipped: (dir, blob file,
    the chunk)."""
    shutil.copytree(blobs, dest)
    c = img.chunks(img.resolve(victim_path), source=None)[0]
    path = dest / img.blobs[0].blob_id
    raw = bytearray(path.read_bytes())
    raw[c.info.compressed_offset + c.info.compressed_size // 2] ^= 0x55
    path.write_bytes(bytes(raw))
    return dest, path, c


def test_corrupt_chunk_is_an_error_and_not_cached(image, tmp_path, monkeypatch):
    boot, blobs, files = image
    img = RafsImage.open(str(boot))
    blob = img.blobs[0]
    victim = img.resolve("/f2")
    bad_blobs, path, _ = _corrupt_copy(img, blobs, tmp_path / "blobs", "/f2")
    cache = ChunkCache(LocalFsBackend(str(bad_blobs)), CacheOptions(work_dir=str(tmp_path / "cache"), amplify_io=1))
    with pytest.raises(CorruptChunk):
        img.read(victim, 0, 100, cache)
    # other files are fine
    assert img.read(img.resolve("/f0"), 0, 1000, cache) == files["/f0"][:1000]
    # the kernel asks again right after an EIO: answered from memory, without a second backend request
    be_reads = cache.metrics.snapshot()["backend_requests"]
    with pytest.raises(CorruptChunk):
        img.read(victim, 0, 100, cache)
    assert cache.metrics.snapshot()["backend_requests"] == be_reads
    # the bad chunk was not marked ready: once the failure is old, the repaired blob serves correct bytes
    path.write_bytes((blobs / blob.blob_id).read_bytes())
    monkeypatch.setattr(chunk_cache, "FAILURE_MEMORY", 0.0)
    assert img.read(victim, 0, 100, cache) == files["/f2"][:100]
    assert hashlib.sha256(img.read(victim, 0, victim.size, cache)).digest() == hashlib.sha256(files["/f2"]).digest()


# ---------------------------------------------------------------------------- worker pool
def test_parallel_groups_one_request_each(image, tmp_path):
    """A read spanning many separate chunk groups issues one request per group (fetched by the worker pool) and
    returns every byte in order."""
    boot, blobs, files = image
    img = RafsImage.open(str(boot))
    be = CountingBackend(str(blobs), delay=0.02)
    cache = ChunkCache(be, CacheOptions(work_dir=str(tmp_path / "cache"), amplify_io=64 << 10, workers=4))
    ino = img.resolve("/f5")
    assert img.read(ino, 0, ino.size, cache) == files["/f5"]
    chunks = img.chunks(ino, source=cache)
    assert len(be.requests) == len(chunks) > 4  # 64K chunks, 64K merge limit: one request per chunk, none twice
    assert len(set(be.requests)) == len(be.requests)
    cache.close()


# ---------------------------------------------------------------------------- size cap, eviction, cache ls|gc
@pytest.fixture(scope="module")
def two_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("two-img")
    rnd = __import__("random").Random(11)
    out = []
    for name in ("a", "b"):
        src = d / f"src-{name}"
        src.mkdir()
        (src / "data").write_bytes(rnd.randbytes(2 << 20))
        build(BuildOptions(source=str(src), bootstrap=str(d / f"{name}.boot"), blob_dir=str(d / "blobs"),
                           compressor="none", chunk_size=256 << 10))
        out.append(d / f"{name}.boot")
    return out, d / "blobs"


def _fill(boot: Path, blobs: Path, work_dir: Path, max_size: int = 0) -> ChunkCache:
    img = RafsImage.open(str(boot))
    cache = ChunkCache(LocalFsBackend(str(blobs)), CacheOptions(work_dir=str(work_dir), max_size=max_size))
    ino = img.resolve("/data")
    img.read(ino, 0, ino.size, cache)
    return cache


def test_size_cap_evicts_idle_blobs_lru_never_in_use(two_images, tmp_path):
    from rafsfs.storage.cache.store import list_entries, usage

    (a, b), blobs = two_images
    work = tmp_path / "cache"
    ida, idb = (RafsImage.open(str(x)).blobs[0].blob_id for x in (a, b))
    cache_a = _fill(a, blobs, work, max_size=3 << 20)
    # a is open (in use): filling b pushes the directory over the cap, but a must stay
    cache_b = _fill(b, blobs, work, max_size=3 << 20)
    names = {e.blob_id: e for e in list_entries(str(work))}
    assert set(names) == {ida, idb} and all(e.in_use for e in names.values())
    assert usage(str(work)) > 3 << 20
    cache_a.close()
    cache_b.close()
    # a new user of the cache (a third blob would do; reopening b is enough) evicts the least recently used idle
    # blob -- a, opened first -- and keeps b
    cache_b2 = ChunkCache(LocalFsBackend(str(blobs)), CacheOptions(work_dir=str(work), max_size=3 << 20))
    img_b = RafsImage.open(str(b))
    data = img_b.read(img_b.resolve("/data"), 0, 4096, cache_b2)
    assert [e.blob_id for e in list_entries(str(work))] == [idb]
    assert not entries_of(str(work), ida)
    assert len(data) == 4096 and cache_b2.metrics.snapshot()["evicted_blobs"] == 1
    cache_b2.close()


def test_cache_ls_and_gc_commands(two_images, tmp_path):
    import json
    import subprocess
    import sys

    from conftest import REPO, run_rafsfs_proc

    (a, b), blobs = two_images
    work = tmp_path / "cache"
    _fill(a, blobs, work).close()
    ida, idb = (RafsImage.open(str(x)).blobs[0].blob_id for x in (a, b))
    # another process keeps b open while gc runs
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + '/tests');"
         "from test_chunk_cache import _fill; from pathlib import Path;"
         "c = _fill(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])); print('ready', flush=True);"
         "sys.stdin.read(); c.close()", str(REPO), str(b), str(blobs), str(work)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        ls = json.loads(run_rafsfs_proc("cache", "ls", "--work-dir", work, "--json", check=0).stdout)
        by = {e["blob"]: e for e in ls}
        assert by[ida]["in_use"] is False and by[idb]["in_use"] is True
        assert by[ida]["chunks_ready"] == by[ida]["chunks_total"] == 8
        assert by[ida]["disk_bytes"] >= 2 << 20
        text = run_rafsfs_proc("cache", "ls", "--work-dir", work, check=0).stdout
        assert "in use" in text and "idle" in text and "2 blobs" in text
        out = run_rafsfs_proc("cache", "gc", "--work-dir", work, check=0).stdout
        assert out.startswith("removed 1 blobs")
        assert [e["blob"] for e in json.loads(run_rafsfs_proc("cache", "ls", "--work-dir", work, "--json",
                                                               check=0).stdout)] == [idb]
    finally:
        holder.communicate("", timeout=30)
    # now idle: gc down to a size that b does not fit removes it too
    run_rafsfs_proc("cache", "gc", "--work-dir", work, "--max-size", "1M", check=0)
    assert json.loads(run_rafsfs_proc("cache", "ls", "--work-dir", work, "--json", check=0).stdout) == []


# ---------------------------------------------------------------------------- prefetch
def _ready_chunks(img: RafsImage, cache: ChunkCache, path: str) -> list[bool]:
    ino = img.resolve(path)
    return [cache.is_ready(img.blobs[c.blob_index], c) for c in img.chunks(ino, source=cache)]


def test_prefetch_paths_then_reads_are_free(image, tmp_path):
    from rafsfs.storage.cache.prefetch import PrefetchPlan, Prefetcher

    boot, blobs, files = image
    img = RafsImage.open(str(boot))
    be = CountingBackend(str(blobs))
    cache = ChunkCache(be, CacheOptions(work_dir=str(tmp_path / "cache")))
    p = Prefetcher(img, cache, PrefetchPlan(use_table=False, paths=["/f1", "/f4"]), threads=2).start()
    assert p.join(timeout=60)
    assert all(_ready_chunks(img, cache, "/f1")) and all(_ready_chunks(img, cache, "/f4"))
    assert not any(_ready_chunks(img, cache, "/f0"))
    n = len(be.requests)
    assert img.read(img.resolve("/f1"), 0, len(files["/f1"]), cache) == files["/f1"]
    assert img.read(img.resolve("/f4"), 0, len(files["/f4"]), cache) == files["/f4"]
    assert len(be.requests) == n
    snap = cache.metrics.snapshot()
    assert snap["prefetched_chunks"] == p.done_chunks > 0 and snap["misses"] == 0
    cache.close()


def test_prefetch_whole_blob_and_table(tmp_path):
    from rafsfs.storage.cache.prefetch import PrefetchPlan, Prefetcher

    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    rnd = __import__("random").Random(3)
    for i in range(4):
        (src / "dir" / f"x{i}").write_bytes(rnd.randbytes(100_000))
    (src / "other").write_bytes(rnd.randbytes(200_000))
    (tmp_path / "list").write_text("/dir/x2\n")
    build(BuildOptions(source=str(src), bootstrap=str(tmp_path / "boot"), blob_dir=str(tmp_path / "blobs"),
                       compressor="zstd", chunk_size=64 << 10, prefetch_list=["/dir/x2"]))
    img = RafsImage.open(str(tmp_path / "boot"))
    # the image's prefetch table alone
    cache = ChunkCache(LocalFsBackend(str(tmp_path / "blobs")), CacheOptions(work_dir=str(tmp_path / "c1")))
    assert Prefetcher(img, cache, PrefetchPlan()).start().join(timeout=60)
    assert all(_ready_chunks(img, cache, "/dir/x2")) and not any(_ready_chunks(img, cache, "/other"))
    cache.close()
    # a directory path and the whole blob
    cache = ChunkCache(LocalFsBackend(str(tmp_path / "blobs")), CacheOptions(work_dir=str(tmp_path / "c2")))
    p = Prefetcher(img, cache, PrefetchPlan(use_table=False, paths=["/dir"], whole_blobs=True)).start()
    assert p.join(timeout=60)
    assert p.done_chunks == img.blobs[0].chunk_count
    assert all(cache.is_ready(img.blobs[0], c) for c in Prefetcher(img, cache, PrefetchPlan(
        use_table=False, whole_blobs=True))._blob_chunks())
    cache.close()


def test_prefetch_stays_behind_on_demand_reads(image, tmp_path):
    """With a slow backend and whole-blob prefetch running, an on-demand read of a chunk near the blob's end is
    served long before the prefetch gets there."""
    from rafsfs.storage.cache.prefetch import PrefetchPlan, Prefetcher

    boot, blobs, files = image
    img = RafsImage.open(str(boot))
    be = CountingBackend(str(blobs), delay=0.03)
    cache = ChunkCache(be, CacheOptions(work_dir=str(tmp_path / "cache"), amplify_io=64 << 10))
    total = img.blobs[0].chunk_count
    p = Prefetcher(img, cache, PrefetchPlan(use_table=False, whole_blobs=True), threads=1).start()
    while len(be.requests) < 3:
        threading.Event().wait(0.01)
    last = img.resolve("/f5")
    off = last.size - 1000
    assert img.read(last, off, 1000, cache) == files["/f5"][off:]
    served_at = len(be.requests)
    assert p.join(timeout=120)
    assert served_at < total // 2  # prefetch had covered less than half the blob when the on-demand read returned
    assert p.done_chunks + 1 >= total - 1
    cache.close()


@pytest.mark.allow_log(r"prefetch: skipping /missing")
def test_prefetch_unknown_path_is_skipped(image, tmp_path):
    from rafsfs.storage.cache.prefetch import PrefetchPlan, Prefetcher

    boot, blobs, _ = image
    img = RafsImage.open(str(boot))
    cache = ChunkCache(LocalFsBackend(str(blobs)), CacheOptions(work_dir=str(tmp_path / "cache")))
    p = Prefetcher(img, cache, PrefetchPlan(use_table=False, paths=["/missing", "/f0"])).start()
    assert p.join(timeout=60) and all(_ready_chunks(img, cache, "/f0"))
    cache.close()


# ---------------------------------------------------------------------------- crash safety
def test_kill_9_during_fill_never_leaves_wrong_bytes(tmp_path):
    """``rafsfs extract`` through the cache is killed with SIGKILL at random points of the fill, several times;
    every chunk the map calls ready then holds exactly the right bytes, and a final run reproduces the source."""
    import json
    import random
    import signal
    import subprocess
    import time

    from conftest import REPO, rafsfs_cmd, run_rafsfs_proc
    from treeutil import assert_trees_equal

    from rafsfs.compression import digest

    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(5)
    for i in range(24):
        words = [rnd.choice([b"alpha", b"beta", b"gamma", b"delta", rnd.randbytes(6)]) for _ in range(200_000)]
        (src / f"f{i:02}").write_bytes(b" ".join(words)[: 1_000_000 + i * 7919])
    run_rafsfs_proc("build", src, "--bootstrap", tmp_path / "boot", "--blob-dir", tmp_path / "blobs",
                    "--chunk-size", "64K", check=0)
    work = tmp_path / "cache"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": str(tmp_path / "blobs")}},
                                          "cache": {"type": "blobcache", "config": {"work_dir": str(work)}}},
                               "amplify_io": 65536}))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    img = RafsImage.open(str(tmp_path / "boot"))
    blob = img.blobs[0]

    def map_path():
        names = entries_of(str(work), blob.blob_id)
        return work / (names[0] + MAP_SUFFIX) if names else work / "none"

    def ready_bytes() -> bytes:
        return (ready_map(str(map_path())) or b"") if map_path().exists() else b""
    kills = 0
    for attempt in range(6):
        dest = tmp_path / f"out{attempt}"
        p = subprocess.Popen(rafsfs_cmd("extract", tmp_path / "boot", dest, "--config", cfg),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        # kill once the map shows a random share of the chunks ready: mid-fill, wherever that lands
        target = int(blob.chunk_count * rnd.uniform(0.05, 0.9))
        while p.poll() is None:
            if ready_bytes().count(1) >= target:
                p.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.002)
        p.wait()
        if ready_bytes().count(1) == blob.chunk_count:
            break
    assert kills >= 1, "extract finished before any kill: make the image bigger"
    ready = ready_bytes()
    assert 0 < ready.count(1)
    # every chunk marked ready has exactly its recorded digest
    data = map_path().with_name(map_path().name[:-len(MAP_SUFFIX)] + DATA_SUFFIX).read_bytes()
    checked = 0
    for ci in range(blob.chunk_count):
        if ready[ci] == 1:
            ref = ChunkCache(LocalFsBackend(str(tmp_path / "blobs")),
                             CacheOptions(work_dir=str(tmp_path / "c2"))).meta(blob).chunk_ref(ci)
            info, dg = ref.info, ref.digest
            assert digest(blob.digester, data[info.uncompressed_offset:info.uncompressed_offset
                                              + info.uncompressed_size]) == dg, f"chunk {ci}"
            checked += 1
    assert checked == ready.count(1)
    # and a run to the end, reusing what the killed runs left, reproduces the source
    run_rafsfs_proc("extract", tmp_path / "boot", tmp_path / "final", "--config", cfg, check=0)
    assert_trees_equal(src, tmp_path / "final")


# ---------------------------------------------------------------------------- sequential readahead
def test_sequential_reads_fetch_ahead_random_reads_do_not(image, tmp_path):
    import random

    boot, blobs, files = image
    img = RafsImage.open(str(boot))
    ino = img.resolve("/f5")
    cs = 64 << 10
    nchunks = (ino.size + cs - 1) // cs
    # in order: after the second read, the following chunks are fetched in the background
    be = CountingBackend(str(blobs))
    cache = ChunkCache(be, CacheOptions(work_dir=str(tmp_path / "c1"), amplify_io=cs, readahead=4 * cs))
    got = b"".join(img.read(ino, off, cs, cache) for off in range(0, ino.size, cs))
    assert got == files["/f5"]
    cache.close()  # waits for queued readahead
    snap = cache.metrics.snapshot()
    assert snap["prefetched_chunks"] > 0 and snap["misses"] + snap["prefetched_chunks"] >= nchunks
    assert len(set(be.requests)) == len(be.requests)  # nothing fetched twice
    # random 4 KiB reads never trigger it: at most one request per chunk touched
    be = CountingBackend(str(blobs))
    cache = ChunkCache(be, CacheOptions(work_dir=str(tmp_path / "c2"), amplify_io=cs, readahead=4 * cs))
    rnd = random.Random(4)
    touched: set[int] = set()
    prev = -10
    for _ in range(40):
        j = rnd.randrange(nchunks)
        if abs(j - prev) <= 3:
            continue
        prev = j
        off = j * cs + rnd.randrange(0, min(cs, ino.size - j * cs) - 4096)
        assert img.read(ino, off, 4096, cache) == files["/f5"][off:off + 4096]
        touched.add(j)
    cache.close()
    assert len(be.requests) <= len(touched) and cache.metrics.snapshot()["prefetched_chunks"] == 0


def test_small_reads_copy_only_their_bytes(image, tmp_path):
    """A 4 KiB read (also one straddling two chunks) copies just its bytes out of the cache file."""
    boot, blobs, files = image
    img = RafsImage.open(str(boot))
    cache = ChunkCache(LocalFsBackend(str(blobs)), CacheOptions(work_dir=str(tmp_path / "cache"), readahead=0))
    ino = img.resolve("/f4")
    for off in (0, 65536 - 2048, 200_001):
        before = cache.metrics.snapshot()["bytes_served"]
        assert img.read(ino, off, 4096, cache) == files["/f4"][off:off + 4096]
        assert cache.metrics.snapshot()["bytes_served"] - before == 4096
    cache.close()


def test_map_without_its_data_file_starts_over(image, tmp_path):
    """A ready map whose data file vanished (deleted, or a crash between an eviction's two unlinks) never serves
    the zeros of a fresh data file as verified bytes."""
    boot, blobs, files = image
    img = RafsImage.open(str(boot))
    work = tmp_path / "cache"
    cache = ChunkCache(LocalFsBackend(str(blobs)), CacheOptions(work_dir=str(work), readahead=0))
    ino = img.resolve("/f1")
    assert img.read(ino, 0, ino.size, cache) == files["/f1"]
    cache.close()
    (name,) = entries_of(str(work), img.blobs[0].blob_id)
    (work / (name + DATA_SUFFIX)).unlink()
    be = CountingBackend(str(blobs))
    cache = ChunkCache(be, CacheOptions(work_dir=str(work), readahead=0))
    assert img.read(ino, 0, ino.size, cache) == files["/f1"]
    assert be.requests, "the chunks were fetched again"
    cache.close()


@pytest.mark.allow_log(r"reading blob")
def test_backend_bug_fails_the_read_and_never_hangs_later_readers(image, tmp_path):
    boot, blobs, _ = image

    class Broken(LocalFsBackend):
        def read(self, blob, offset, size):
            raise ValueError("boom")

    img = RafsImage.open(str(boot))
    cache = ChunkCache(Broken(str(blobs)), CacheOptions(work_dir=str(tmp_path / "cache"), readahead=0))
    ino = img.resolve("/f0")
    for _ in range(2):  # the second reader must not wait on a future the first one left behind
        done = threading.Event()
        errors = []

        def read() -> None:
            try:
                img.read(ino, 0, 4096, cache)
            except Exception as e:
                errors.append(e)
            done.set()

        threading.Thread(target=read, daemon=True).start()
        assert done.wait(30), "reader hung"
        assert errors and "internal error" in str(errors[0]) and isinstance(errors[0], BlobUnavailable)
    cache.close()


# ---------------------------------------------------------------------------- amplify_io on demand
@pytest.fixture(scope="module")
def small_files(tmp_path_factory) -> tuple[Path, Path, dict[str, bytes]]:
    """40 incompressible 2-3 KiB files, one chunk each, stored one after the other in a zstd blob."""
    sizes = {f"s{i:02d}": 2048 + (i * 337) % 1024 for i in range(40)}
    return _random_image(tmp_path_factory.mktemp("small-img"), sizes, 11)


def test_small_reads_bring_their_neighbours(small_files, tmp_path):
    """A read that needs less than amplify_io fetches the chunks stored after it in the same request: the next
    files are then read with no backend request.  The neighbours are decoded (and cached) only when read.  With
    amplify_io at one byte, each read is its own request."""
    boot, blobs, files = small_files
    img = RafsImage.open(str(boot))
    blob = img.blobs[0]
    be = CountingBackend(str(blobs))
    cache = ChunkCache(be, CacheOptions(work_dir=str(tmp_path / "c1"), readahead=0))
    assert img.read(img.resolve("/s00"), 0, 4096, cache) == files["/s00"]
    assert len(be.requests) == 1
    assert be.requests[0][1] > 30 * 2048  # one request carried the neighbours
    s01 = img.chunks(img.resolve("/s01"), source=None)[0]
    assert not cache.is_ready(blob, s01)  # kept as it came, not decompressed or written yet
    assert _read_all(img, cache) == files
    assert len(be.requests) == 1
    assert cache.is_ready(blob, s01)
    assert cache.metrics.snapshot()["backend_requests"] == 1

    be1 = CountingBackend(str(blobs))
    cache1 = ChunkCache(be1, CacheOptions(work_dir=str(tmp_path / "c2"), readahead=0, amplify_io=1))
    assert _read_all(img, cache1) == files
    assert len(be1.requests) == len(files)



def test_two_files_read_in_turns_both_get_readahead(image, tmp_path):
    """Two readers going through two files of one blob at the same time, a chunk each in turn: each is followed
    as its own stream, so both get their following chunks fetched ahead (one stream per blob would see every read
    out of order and fetch nothing ahead)."""
    boot, blobs, files = image
    img = RafsImage.open(str(boot))
    cs = 64 << 10
    a, b = img.resolve("/f4"), img.resolve("/f5")
    be = CountingBackend(str(blobs))
    cache = ChunkCache(be, CacheOptions(work_dir=str(tmp_path / "c"), amplify_io=cs, readahead=4 * cs))
    got = {"/f4": b"", "/f5": b""}
    for off in range(0, max(a.size, b.size), cs):
        for name, ino in (("/f4", a), ("/f5", b)):
            if off < ino.size:
                got[name] += img.read(ino, off, cs, cache)
    cache.close()
    assert got == {"/f4": files["/f4"], "/f5": files["/f5"]}
    chunks = sum((ino.size + cs - 1) // cs for ino in (a, b))
    snap = cache.metrics.snapshot()
    assert snap["prefetched_chunks"] >= chunks // 2, snap
    assert len(be.requests) < chunks, (len(be.requests), chunks)

def test_a_corrupt_neighbour_fails_only_its_own_file(small_files, tmp_path, monkeypatch):
    boot, blobs, files = small_files
    img = RafsImage.open(str(boot))
    blob = img.blobs[0]
    victim = img.resolve("/s05")
    bad_blobs, path, c = _corrupt_copy(img, blobs, tmp_path / "blobs", "/s05")
    be = CountingBackend(str(bad_blobs))
    cache = ChunkCache(be, CacheOptions(work_dir=str(tmp_path / "c"), readahead=0))
    assert img.read(img.resolve("/s00"), 0, 4096, cache) == files["/s00"]  # s05 came along and failed: not ours
    assert not cache.is_ready(blob, c)
    for name, data in files.items():
        if name != "/s05":
            assert img.read(img.resolve(name), 0, 4096, cache) == data
    with pytest.raises(CorruptChunk):
        img.read(victim, 0, 4096, cache)
    assert len(be.requests) == 1  # all of it came with the first request: the kept bytes failed their check
    path.write_bytes((blobs / blob.blob_id).read_bytes())
    monkeypatch.setattr(chunk_cache, "FAILURE_MEMORY", 0.0)  # repaired, and the failure is old: fetched again
    assert img.read(victim, 0, 4096, cache) == files["/s05"]
    assert len(be.requests) == 2


def test_reads_do_not_queue_behind_background_fetches(small_files, tmp_path):
    """Background fetching (readahead, prefetch) has worker pools of its own: a read's requests start at once,
    not after every background request queued before them."""
    import time

    boot, blobs, files = small_files
    img = RafsImage.open(str(boot))
    blob = img.blobs[0]
    be = CountingBackend(str(blobs), delay=0.15)
    cache = ChunkCache(be, CacheOptions(work_dir=str(tmp_path / "c"), readahead=0, amplify_io=1, workers=4))

    def first_chunk(i: int):
        return img.chunks(img.resolve(f"/s{i:02d}"), source=None)[0]

    background = [first_chunk(i) for i in range(0, 40, 2)]  # 20 one-chunk requests, 4 at a time
    t = threading.Thread(target=cache.ensure, args=(blob, background), kwargs={"background": True, "merge_limit": 1})
    t.start()
    time.sleep(0.05)
    wanted = [first_chunk(1), first_chunk(3)]
    cache.ensure(blob, wanted, merge_limit=1)
    order = [off for off, _ in be.requests]
    t.join()
    positions = [order.index(c.info.compressed_offset) for c in wanted]
    assert max(positions) < len(background), (positions, len(order))
    for i in (1, 3):
        assert img.read(img.resolve(f"/s{i:02d}"), 0, 4096, cache) == files[f"/s{i:02d}"]
    cache.close()


def test_wait_idle_with_a_quiet_period(image, tmp_path):
    """Whole-blob prefetch waits until reads have been quiet for a while: wait_idle(quiet=...) is False right after
    a read and True once that long has passed without one."""
    import time

    boot, blobs, files = image
    img = RafsImage.open(str(boot))
    cache = ChunkCache(LocalFsBackend(str(blobs)), CacheOptions(work_dir=str(tmp_path / "c"), readahead=0))
    t0 = time.monotonic()
    assert img.read(img.resolve("/f1"), 0, 4096, cache) == files["/f1"][:4096]
    assert cache.wait_idle(timeout=0.05, quiet=5.0) is False
    assert cache.wait_idle(timeout=10, quiet=0.3) is True
    assert time.monotonic() - t0 >= 0.3
    assert cache.wait_idle(timeout=0.05) is True  # no quiet period asked: idle now
    cache.close()


def test_fill_follows_an_in_order_reader_through_chunks_it_finds_ready(tmp_path):
    """fanotify mode's fill: chunks readahead (or anyone) stored already are part of the reader's in-order stream,
    so the stream keeps fetching ahead after them instead of starting over at the next missing chunk (where the
    window never grew and the reader fetched most chunks itself, one at a time)."""
    import time

    (tmp_path / "img").mkdir()
    boot, blobs, files = _random_image(tmp_path / "img", {"big": 24 * (64 << 10)}, 11, chunk_size=64 << 10)
    img = RafsImage.open(str(boot))
    blob = img.blobs[0]
    refs = sorted(img.chunks(img.resolve("/big")), key=lambda c: c.ci_index)
    assert len(refs) == 24
    cache = ChunkCache(LocalFsBackend(str(blobs)), CacheOptions(work_dir=str(tmp_path / "c"), readahead=4 << 16))
    try:
        cache.ensure(blob, refs[2:10])  # stored before the reader gets there
        for c in refs[:11]:  # the reader in order: 0, 1 missing, 2..9 ready, 10 missing
            cache.fill(blob, [c])
            assert cache.is_ready(blob, c)
        deadline = time.monotonic() + 30
        while not all(cache.is_ready(blob, c) for c in refs[11:14]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(cache.is_ready(blob, c) for c in refs[11:14]), "no readahead past the chunks found ready"
    finally:
        cache.close()
