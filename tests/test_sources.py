"""The chunk sources on their own, over a real image and a real local backend: the source without a cache (and its
memory of recent chunks), the read executor every source shares, and the deferred source of the nydusd daemon."""
from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from rafsfs.blob import BOOTSTRAP, HOLE, ChunkInfo, ChunkRef, ChunkSlice
from rafsfs.builder import BuildOptions, build
from rafsfs.errors import BlobUnavailable, RafsError
from rafsfs.image import RafsImage
from rafsfs.storage.backend.localfs import LocalFsBackend
from rafsfs.storage.cache.chunk_cache import CacheOptions, ChunkCache
from rafsfs.storage.cache.none import DirectChunkSource
from rafsfs.storage.cache.prefetch import PrefetchPlan, start_prefetch
from rafsfs.deferred_source import DeferredCache
from rafsfs.storage.metrics import CacheMetrics
from test_chunk_cache import CountingBackend

CS = 64 << 10


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> tuple[Path, Path, dict[str, bytes]]:
    d = tmp_path_factory.mktemp("sources")
    rnd = random.Random(21)
    (d / "src").mkdir()
    files = {"/big": rnd.randbytes(5 * CS + 777), "/small": b"a small file\n"}
    for name, data in files.items():
        (d / "src" / name[1:]).write_bytes(data)
    build(BuildOptions(source=str(d / "src"), bootstrap=str(d / "boot"), blob_dir=str(d / "blobs"),
                       compressor="zstd", chunk_size=CS))
    return d / "boot", d / "blobs", files


# ---------------------------------------------------------------------------- no cache
def test_no_cache_source_reads_files_and_remembers_recent_chunks(image):
    boot, blobs, files = image
    be = CountingBackend(str(blobs))
    with RafsImage.open(str(boot)) as img, DirectChunkSource(be, recent_bytes=2 * CS) as src:
        assert src.is_local and not src.keeps_chunks and not src.fully_cached(img.blobs[0])
        big = img.resolve("/big")
        # windows that straddle chunk boundaries, as the kernel's read-ahead sends them
        got = b"".join(img.read(big, off, 48 << 10, src) for off in range(0, big.size, 48 << 10))
        assert got == files["/big"]
        nchunks = -(-big.size // CS)
        assert len(be.requests) == nchunks  # each chunk fetched once (the chunk table locates them: no meta I/O)
        assert src.recent.hits > 0 and src.recent._bytes <= 2 * CS
        # a chunk pushed out of the memory is fetched again
        be.requests.clear()
        assert img.read(big, 0, 10, src) == files["/big"][:10]
        assert len(be.requests) == 1
        assert src.metrics.backend_requests == nchunks + 1


def test_no_cache_source_without_memory_fetches_every_time(image):
    boot, blobs, files = image
    be = CountingBackend(str(blobs))
    with RafsImage.open(str(boot)) as img, DirectChunkSource(be) as src:
        big = img.resolve("/big")
        assert src.recent is None
        for _ in range(2):
            assert img.read(big, CS - 5, 10, src) == files["/big"][CS - 5:CS + 5]
        assert len(be.requests) == 2  # chunks 0 and 1 merged into one request, twice


@pytest.mark.allow_log("prefetch needs a chunk cache")
def test_no_cache_source_does_not_prefetch(image):
    boot, blobs, _files = image
    with RafsImage.open(str(boot)) as img, DirectChunkSource(LocalFsBackend(str(blobs))) as src:
        assert start_prefetch(img, src, PrefetchPlan(paths=["/big"])) is None


def test_executor_joins_blob_data_holes_and_image_data(image):
    """``ChunkSource.read``: slices of one blob read together, holes as zeros, bootstrap-resident data through the
    caller, all in the order given."""
    boot, blobs, files = image
    be = CountingBackend(str(blobs))
    with RafsImage.open(str(boot)) as img, DirectChunkSource(be) as src:
        big = img.resolve("/big")
        slices = img.map_range(big, CS - 100, 200, src)  # two chunks
        hole = ChunkSlice(0, ChunkRef(HOLE, 0, ChunkInfo(0, 7, 0, 7, False)), 0, 7)
        local = ChunkSlice(0, ChunkRef(BOOTSTRAP, 0, ChunkInfo(1024, 4, 1024, 4, False)), 0, 4)
        asked = []

        def from_image(s: ChunkSlice) -> bytes:
            asked.append(s)
            return b"BOOT"

        out = src.read(img.blobs, [slices[0], hole, local, slices[1]], from_image)
        want = files["/big"]
        assert out == want[CS - 100:CS] + bytes(7) + b"BOOT" + want[CS:CS + 100]
        assert asked == [local]
        assert len(be.requests) == 1  # both chunks of the blob in one merged request
        # the reader's own read goes the same way
        assert img.read(big, 0, big.size, src) == want
        with pytest.raises(RafsError, match="no blob source"):
            img.read(big, 0, 10, None)


# ---------------------------------------------------------------------------- deferred
def test_deferred_source_builds_once_in_the_background(image, tmp_path):
    boot, blobs, files = image
    metrics = CacheMetrics()
    go = threading.Event()
    builds, hooks = [], []

    def build_cache(m):
        assert m is metrics  # counters are shared: they can be read before the cache exists
        go.wait(10)
        builds.append(1)
        return ChunkCache(LocalFsBackend(str(blobs)), CacheOptions(work_dir=str(tmp_path / "cache")), metrics=m)

    src = DeferredCache(build_cache, metrics)
    src.after_build.append(lambda cache: hooks.append(("first", cache)))
    src.after_build.append(lambda cache: hooks.append(("second", cache)))
    assert src.metrics is metrics and not src.is_local  # answered without waiting for the build
    with RafsImage.open(str(boot)) as img:
        big = img.resolve("/big")
        src.start()
        src.start()  # idempotent
        got = []
        reader = threading.Thread(target=lambda: got.append(img.read(big, 0, big.size, src)))
        reader.start()
        time.sleep(0.2)
        assert reader.is_alive() and not builds  # the read waits for the build
        go.set()
        reader.join(10)
        assert builds == [1]
        cache = src.get()
        assert got == [files["/big"]]
        src.seal()  # waits for the hooks under way
        assert hooks == [("first", cache), ("second", cache)]
        assert src.keeps_chunks and src.fully_cached(img.blobs[0]) == cache.fully_cached(img.blobs[0])
        assert metrics.backend_requests > 0
    assert src.close() is True


@pytest.mark.allow_log("the registry is unreachable")
def test_deferred_source_that_cannot_be_built_fails_every_read_cleanly(image):
    boot, _blobs, _files = image

    def build_cache(m):
        raise BlobUnavailable("the registry is unreachable")

    src = DeferredCache(build_cache)
    ran = []
    src.after_build.append(ran.append)
    with RafsImage.open(str(boot)) as img:
        big = img.resolve("/big")
        errors = []
        for _ in range(2):
            with pytest.raises(BlobUnavailable, match="unreachable") as ei:
                img.read(big, 0, 10, src)
            errors.append(ei.value)
        assert errors[0] is not errors[1]  # a fresh error per read: one object raised again grows its traceback
    assert ran == [] and src.close() is True


@pytest.mark.allow_log("building the chunk source", "could not be built")
def test_deferred_source_turns_a_bug_in_the_build_into_blob_unavailable():
    src = DeferredCache(lambda m: 1 / 0)
    with pytest.raises(BlobUnavailable, match="could not be built"):
        src.get()


@pytest.mark.allow_log("still being built")
def test_deferred_source_close_does_not_wait_forever_for_a_stuck_build():
    stuck = threading.Event()
    src = DeferredCache(lambda m: stuck.wait(30))
    ran = []
    src.after_build.append(ran.append)
    src.start()
    src.seal()  # the daemon stops what the hooks would start first
    t0 = time.monotonic()
    assert src.close(wait=0.2) is False
    assert time.monotonic() - t0 < 5
    stuck.set()  # the build ends now: sealed, so no hook runs
    assert src._done.wait(5)
    time.sleep(0.05)
    assert ran == []


def test_every_backend_names_where_its_bytes_come_from(tmp_path):
    """The cache keys entries it cannot verify by the backend's ``identity``, a property of the BlobBackend
    contract (the old code sniffed ``cfg``/``blob_dir``/``devices`` attributes, and any other backend got the one
    identity "localfs:")."""
    from rafsfs.config import RegistryConfig
    from rafsfs.storage.backend.base import BlobBackend
    from rafsfs.storage.backend.registry import RegistryBackend

    ids = set()
    for repo, host in (("a/b", "r1:5000"), ("a/c", "r1:5000"), ("a/b", "r2:5000")):
        be = RegistryBackend(RegistryConfig(host=host, repo=repo, scheme="http"))
        ids.add(be.identity)
        be.close()
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    ids |= {LocalFsBackend(str(tmp_path / "d1")).identity, LocalFsBackend(str(tmp_path / "d2")).identity}
    assert len(ids) == 5

    class Nameless(BlobBackend):  # a backend that does not say where its bytes come from cannot be made
        def read(self, blob, offset, size):
            return b""

        def size(self, blob):
            return 0

    with pytest.raises(TypeError):
        Nameless()


# ---------------------------------------------------------------------------- the lazy backend
def test_a_registry_source_is_built_without_the_http_stack(tmp_path):
    """A chunk cache over a registry (what a fanotify daemon builds before its mount) imports no HTTP stack and
    sends nothing; prepare() builds the backend (imports, no request); reads then use it."""
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from rafsfs.config import from_dict\n"
        "from rafsfs.storage.factory import source_from_config\n"
        f"cfg = from_dict({{'device': {{'backend': {{'type': 'registry', 'config': {{'scheme': 'http', "
        f"'host': '127.0.0.1:9', 'repo': 'x/y'}}}}, 'cache': {{'type': 'blobcache', 'config': "
        f"{{'work_dir': {str(tmp_path / 'c')!r}}}}}}}}})\n"
        "src = source_from_config(cfg)\n"
        "before = 'requests' in sys.modules\n"
        "src.prepare()\n"
        "print(json.dumps([before, 'requests' in sys.modules, src.backend.identity]))\n"
        "src.close()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    assert out.strip() == '[false, true, "registry:http://127.0.0.1:9/x/y"]'


def test_lazy_backend_builds_once_and_closes_what_it_built(image):
    from rafsfs.storage.backend.lazy import LazyBackend

    boot, blobs, _ = image
    built: list[CountingBackend] = []

    def make():
        time.sleep(0.05)  # a slow build: concurrent first reads all arrive during it
        built.append(CountingBackend(str(blobs)))
        return built[-1]

    blob = RafsImage.open(str(boot)).blobs[0]
    lazy = LazyBackend(make, "local:test")
    assert lazy.identity == "local:test" and not lazy.is_local and built == []
    ts = [threading.Thread(target=lazy.read, args=(blob.ref, 0, 16)) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(built) == 1 and lazy.read(blob.ref, 0, 16) == (blobs / blob.blob_id).read_bytes()[:16]
    lazy.close()
    never = LazyBackend(make, "local:test")
    never.close()
    with pytest.raises(BlobUnavailable, match="closed"):  # a read after close() builds nothing either
        never.read(blob.ref, 0, 16)
    assert len(built) == 1
