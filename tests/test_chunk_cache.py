"""The chunk cache over a real local blob: single-flight, merging, persistence, corruption handling."""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

import pytest

from rafsfs.builder import BuildOptions, build
from rafsfs.errors import CorruptChunk
from rafsfs.image import RafsImage
from rafsfs.storage.backend.base import BlobRef
from rafsfs.storage.backend.localfs import LocalFsBackend
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


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> tuple[Path, Path, dict[str, bytes]]:
    d = tmp_path_factory.mktemp("cache-img")
    src = d / "src"
    src.mkdir()
    rnd = __import__("random").Random(7)
    files = {}
    for i in range(6):
        data = rnd.randbytes(300_000 + i * 12345)
        (src / f"f{i}").write_bytes(data)
        files[f"/f{i}"] = data
    build(BuildOptions(source=str(src), bootstrap=str(d / "boot"), blob_dir=str(d / "blobs"),
                       compressor="zstd", chunk_size=64 << 10))
    return d / "boot", d / "blobs", files


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


def test_corrupt_chunk_is_an_error_and_not_cached(image, tmp_path):
    boot, blobs, files = image
    bad_blobs = tmp_path / "blobs"
    shutil.copytree(blobs, bad_blobs)
    img = RafsImage.open(str(boot))
    blob = img.blobs[0]
    victim = img.resolve("/f2")
    c0 = img.chunks(victim, source=None)[0]
    path = bad_blobs / blob.blob_id
    raw = bytearray(path.read_bytes())
    raw[c0.info.compressed_offset + c0.info.compressed_size // 2] ^= 0x55
    path.write_bytes(bytes(raw))
    cache = ChunkCache(LocalFsBackend(str(bad_blobs)), CacheOptions(work_dir=str(tmp_path / "cache"), amplify_io=1))
    with pytest.raises(CorruptChunk):
        img.read(victim, 0, 100, cache)
    # other files are fine
    assert img.read(img.resolve("/f0"), 0, 1000, cache) == files["/f0"][:1000]
    # the bad chunk was not marked ready: the repaired blob now serves correct bytes
    path.write_bytes((blobs / blob.blob_id).read_bytes())
    assert img.read(victim, 0, 100, cache) == files["/f2"][:100]
    assert hashlib.sha256(img.read(victim, 0, victim.size, cache)).digest() == hashlib.sha256(files["/f2"]).digest()
