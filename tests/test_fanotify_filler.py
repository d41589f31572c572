"""The fanotify filler against a stand-in for the kernel's side of the group: a SOCK_SEQPACKET socket pair carries
the same event records (metadata + range) and answers (``fd, response``) that a pre-content group does, so the
filler's ordering can be driven precisely.  The real kernel path (marks, EROFS, kill -9) is tests/test_fanotify*.py.
"""
from __future__ import annotations

import os
import random
import select
import socket
import threading
import time

import pytest

from fanotify_backend import fanotify as fa
from fanotify_backend.filler import Filler, Target
from fanotify_backend.journal import Journal
from rafsfs.builder import BuildOptions, build
from rafsfs.errors import BlobUnavailable
from rafsfs.image import RafsImage
from rafsfs.storage.backend.localfs import LocalFsBackend
from rafsfs.storage.cache.chunk_cache import CacheOptions, ChunkCache

CS = 64 << 10


class GatedBackend(LocalFsBackend):
    """Local blobs; reads wait while the gate is closed (a registry that does not answer)."""

    def __init__(self, blob_dir: str):
        super().__init__(blob_dir)
        self.gate = threading.Event()
        self.gate.set()

    def read(self, blob, offset, size):
        if not self.gate.wait(30):
            raise BlobUnavailable("gate closed")
        return super().read(blob, offset, size)


@pytest.fixture
def filler_env(tmp_path, monkeypatch):
    monkeypatch.setenv("RAFSFS_FANOTIFY_RUN", str(tmp_path / "run"))  # no other daemon's records
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(5).randbytes(8 * CS)
    (src / "f").write_bytes(data)
    build(BuildOptions(source=str(src), bootstrap=str(tmp_path / "boot"), blob_dir=str(tmp_path / "blobs"),
                       compressor="zstd", chunk_size=CS))
    image = RafsImage.open(str(tmp_path / "boot"))
    blob = image.blobs[0]
    backend = GatedBackend(str(tmp_path / "blobs"))
    cache = ChunkCache(backend, CacheOptions(work_dir=str(tmp_path / "cache"), readahead=2 * CS, amplify_io=0))
    entry = cache.entry(blob)
    group, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    filler = Filler(group.fileno(), Journal(4), cache, [Target([blob], entry, blob.uncompressed_size, True)],
                    handlers=1)
    yield image, blob, backend, cache, entry, filler, kernel, data
    group.close()
    kernel.close()
    cache.close()
    image.close()


def _run_until_closed(filler: Filler) -> None:
    try:
        filler.run()
    except OSError:  # the test closed the group: what a dead kernel side looks like
        pass


def _event(fd: int, offset: int, count: int, pid: int = 1) -> bytes:
    rng = fa.RANGE.pack(fa.FAN_EVENT_INFO_TYPE_RANGE, 0, fa.RANGE.size, 0, offset, count)
    n = fa.METADATA.size + len(rng)
    return fa.METADATA.pack(n, fa.FANOTIFY_METADATA_VERSION, 0, fa.METADATA.size, fa.FAN_PRE_ACCESS, fd, pid) + rng


def _answer(kernel: socket.socket, timeout: float) -> tuple[int, int] | None:
    r, _, _ = select.select([kernel], [], [], timeout)
    return fa.RESPONSE.unpack(kernel.recv(64)) if r else None


def test_ready_ranges_are_answered_while_every_handler_waits_on_a_fetch(filler_env):
    """Chunk 0 is in the cache, chunk 1 is not, and the registry stops answering.  An event on chunk 1 takes the
    only handler thread; an event on chunk 0 that comes after it is still answered (ALLOW) at once: cached data is
    never held up by a slow fetch (before, it queued behind the fetch).  Once the registry answers, chunk 1 is
    filled, verified and allowed; every event is journaled as answered and every slot but the one being read is
    free again."""
    image, blob, backend, cache, entry, filler, kernel, data = filler_env
    meta = cache.meta(blob)
    cache.fill(blob, [meta.chunk_ref(0)])
    assert cache.is_ready(blob, meta.chunk_ref(0)) and not cache.is_ready(blob, meta.chunk_ref(1))
    backend.gate.clear()
    threading.Thread(target=_run_until_closed, args=(filler,), daemon=True).start()
    fd_miss = os.open(entry.data_path, os.O_RDONLY)
    fd_hit = os.open(entry.data_path, os.O_RDONLY)
    kernel.send(_event(fd_miss, CS, 128 << 10))
    assert _answer(kernel, 0.5) is None  # waiting on the registry
    kernel.send(_event(fd_hit, 4096, 8192))
    assert _answer(kernel, 5.0) == (fd_hit, fa.FAN_ALLOW)
    backend.gate.set()
    assert _answer(kernel, 30.0) == (fd_miss, fa.FAN_ALLOW)
    c1 = meta.chunk_ref(1)
    with open(entry.data_path, "rb") as f:
        f.seek(c1.info.uncompressed_offset)
        stored = f.read(c1.info.uncompressed_size)
    assert stored == data[CS:2 * CS]
    deadline = 50
    while filler.free.qsize() != filler.journal.slots - 1 and deadline:
        threading.Event().wait(0.1)
        deadline -= 1
    assert filler.journal.pending() == [] and filler.free.qsize() == filler.journal.slots - 1
    assert filler.stats()["events"] == 2 and filler.stats()["denied"] == 0


def test_following_a_reader_through_ready_chunks_reads_ahead_without_waiting(filler_env):
    """What the reading thread does after answering a ready range (``ChunkCache.follow``): the in-order steps start
    readahead of the next chunks, in the background: with the registry stalled it returns at once (it never
    fetches on the caller's thread); once the registry answers, the chunks ahead arrive with no reader asking."""
    image, blob, backend, cache, entry, filler, kernel, data = filler_env
    meta = cache.meta(blob)
    refs = [meta.chunk_ref(i) for i in range(blob.chunk_count)]
    cache.fill(blob, refs[:3])
    backend.gate.clear()
    t0 = time.monotonic()
    for r in refs[:3]:
        cache.follow(blob, [r])
    assert time.monotonic() - t0 < 1.0
    assert not cache.is_ready(blob, refs[3])
    backend.gate.set()
    deadline = time.monotonic() + 30
    while not cache.is_ready(blob, refs[3]):
        assert time.monotonic() < deadline, "readahead did not follow"
        time.sleep(0.05)
