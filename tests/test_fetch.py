"""storage/fetch.py on its own: which chunks share a backend request, how a fetched chunk is checked, and what each
chunk's sink gets when a request or a chunk fails.  Real compression and digests, a real local backend."""
from __future__ import annotations

import hashlib
import random
import threading

import pytest

from rafsfs.blob import BlobInfo, BlobRef, ChunkInfo, ChunkRef
from rafsfs.compression import compress, digest
from rafsfs.errors import BlobUnavailable, CorruptChunk
from rafsfs.format import blob_table as bt
from rafsfs.storage.backend.localfs import LocalFsBackend
from rafsfs.storage.fetch import MERGE_GAP, ChunkFetcher, follows, merge_ranges, verify_chunk


def _ref(ci: int, coff: int, csize: int) -> ChunkRef:
    return ChunkRef(0, ci, ChunkInfo(coff, csize, ci * 4096, csize, False))


def _groups(groups: list[list[ChunkRef]]) -> list[list[int]]:
    return [[c.ci_index for c in g] for g in groups]


def test_follows_allows_the_page_padding_gap_only():
    assert follows(100, 100)  # contiguous
    assert follows(100, 100 + MERGE_GAP)  # the padding of an uncompressed chunk to its page
    assert not follows(100, 101 + MERGE_GAP)
    assert not follows(100, 99)  # behind the request's end: never merged backwards


def test_merge_ranges_groups_adjacent_chunks_up_to_the_limit():
    chunks = [_ref(0, 0, 1000), _ref(1, 1000, 1000), _ref(2, 2000 + MERGE_GAP, 1000),  # within the gap
              _ref(3, 3000 + MERGE_GAP + MERGE_GAP + 1, 1000)]  # one byte too far: a new request
    assert _groups(merge_ranges(chunks, 1 << 20)) == [[0, 1, 2], [3]]
    # order of the input does not matter: groups follow the stored order
    assert _groups(merge_ranges(list(reversed(chunks)), 1 << 20)) == [[0, 1, 2], [3]]
    # the limit counts bytes from the group's first stored byte to its last
    assert _groups(merge_ranges(chunks[:2], 2000)) == [[0, 1]]
    assert _groups(merge_ranges(chunks[:2], 1999)) == [[0], [1]]
    # a chunk larger than the limit still goes, alone
    assert _groups(merge_ranges([_ref(0, 0, 5000), _ref(1, 5000, 10)], 4096)) == [[0], [1]]
    assert merge_ranges([], 4096) == []


BLOB_ID = hashlib.sha256(b"test_fetch").hexdigest()


def _blob(compressed_size: int, count: int, compressor: int = bt.COMPRESSOR_ZSTD) -> BlobInfo:
    return BlobInfo(index=0, blob_id=BLOB_ID, chunk_size=64 << 10, chunk_count=count, compressor=compressor,
                    digester=bt.DIGEST_BLAKE3, features=0, compressed_size=compressed_size,
                    uncompressed_size=count * (64 << 10))


@pytest.fixture
def stored(tmp_path):
    """A blob file of 6 zstd chunks stored back to back, with chunk 4 corrupt (one bit flipped, digest kept)."""
    rnd = random.Random(5)
    datas = [rnd.randbytes(20_000 + 1000 * i) + bytes(30_000) for i in range(6)]
    raw, refs = b"", []
    for ci, data in enumerate(datas):
        z = bytearray(compress(bt.COMPRESSOR_ZSTD, data))
        if ci == 4:
            z[len(z) // 2] ^= 0x01
        refs.append(ChunkRef(0, ci, ChunkInfo(len(raw), len(z), ci * (64 << 10), len(data), True),
                             digest(bt.DIGEST_BLAKE3, data)))
        raw += bytes(z)
    (tmp_path / BLOB_ID).write_bytes(raw)
    return _blob(len(raw), len(datas)), refs, datas, raw


class CountingBackend(LocalFsBackend):
    def __init__(self, blob_dir: str, fail: bool = False):
        super().__init__(blob_dir)
        self.requests: list[tuple[int, int]] = []
        self.fail = fail
        self._l = threading.Lock()

    def read(self, blob: BlobRef, offset: int, size: int) -> bytes:
        with self._l:
            self.requests.append((offset, size))
        if self.fail:
            raise BlobUnavailable("the registry is down")
        return super().read(blob, offset, size)


def test_verify_chunk_decompresses_and_checks_the_digest(stored):
    blob, refs, datas, raw = stored
    c = refs[0]
    stored0 = raw[:c.info.compressed_size]
    assert verify_chunk(blob, c, stored0) == datas[0]
    with pytest.raises(BlobUnavailable, match="short read"):
        verify_chunk(blob, c, stored0[:-1])
    wrong = ChunkRef(0, 0, c.info, bytes(32))
    with pytest.raises(CorruptChunk, match="digest"):
        verify_chunk(blob, wrong, stored0)
    assert verify_chunk(blob, wrong, stored0, verify=False) == datas[0]  # digest_validate off
    plain = ChunkRef(0, 0, ChunkInfo(0, 10, 0, 10, False), digest(bt.DIGEST_BLAKE3, b"0123456789"))
    assert verify_chunk(blob, plain, b"0123456789") == b"0123456789"
    with pytest.raises(CorruptChunk):
        verify_chunk(blob, plain, b"0123456780")


def test_fetcher_merges_and_gives_each_chunk_once(stored, tmp_path):
    blob, refs, datas, raw = stored
    be = CountingBackend(str(tmp_path))
    f = ChunkFetcher(be, workers=4)
    got: dict[int, list] = {}
    lock = threading.Lock()

    def sink(c, data, err):
        with lock:
            got.setdefault(c.ci_index, []).append((data, err))

    err = f.fetch(blob, [refs[3], refs[0], refs[1], refs[5]], sink)
    assert err is None
    assert sorted(be.requests) == [(0, sum(r.info.compressed_size for r in refs[:2])),  # 0 and 1: one request
                                   (refs[3].info.compressed_offset, refs[3].info.compressed_size),
                                   (refs[5].info.compressed_offset, refs[5].info.compressed_size)]
    assert got == {ci: [(datas[ci], None)] for ci in (0, 1, 3, 5)}
    assert f.metrics.backend_requests == 3 and f.metrics.bytes_fetched == sum(n for _o, n in be.requests)
    f.close()


def test_a_corrupt_chunk_fails_alone_in_its_merged_request(stored, tmp_path):
    blob, refs, datas, raw = stored
    be = CountingBackend(str(tmp_path))
    f = ChunkFetcher(be)
    got = {}
    err = f.fetch(blob, refs[3:6], lambda c, d, e: got.__setitem__(c.ci_index, (d, e)))
    assert len(be.requests) == 1
    assert isinstance(err, CorruptChunk)
    assert got[3] == (datas[3], None) and got[5] == (datas[5], None)
    assert got[4][0] is None and isinstance(got[4][1], CorruptChunk)
    assert f.metrics.errors == 1
    f.close()


def test_a_failed_request_reaches_every_chunk_but_no_neighbour(stored, tmp_path):
    blob, refs, datas, raw = stored
    f = ChunkFetcher(CountingBackend(str(tmp_path), fail=True))
    got, kept = {}, []
    err = f.fetch(blob, refs[:2], lambda c, d, e: got.__setitem__(c.ci_index, (d, e)),
                  neighbours=refs[2:4], neighbour_sink=lambda c, r: kept.append(c.ci_index))
    assert isinstance(err, BlobUnavailable)
    assert set(got) == {0, 1} and all(d is None and isinstance(e, BlobUnavailable) for d, e in got.values())
    assert kept == []  # neighbours are nobody's read: they get no error either
    f.close()


def test_neighbours_come_with_a_request_but_never_alone(stored, tmp_path):
    blob, refs, datas, raw = stored
    be = CountingBackend(str(tmp_path))
    f = ChunkFetcher(be)
    got, kept = {}, {}
    # chunk 0 asked for; 1 and 2 follow it in the blob: one request brings all three
    f.fetch(blob, [refs[0]], lambda c, d, e: got.__setitem__(c.ci_index, d),
            neighbours=refs[1:3], neighbour_sink=lambda c, r: kept.__setitem__(c.ci_index, r))
    assert be.requests == [(0, refs[2].info.compressed_offset + refs[2].info.compressed_size)]
    assert got == {0: datas[0]}  # only what was asked for is decoded and handed out
    for ci in (1, 2):  # neighbours as stored: compressed, not checked yet
        i = refs[ci].info
        assert kept[ci] == raw[i.compressed_offset:i.compressed_offset + i.compressed_size]
    # a neighbour that is not next to any asked-for chunk is not fetched on its own
    be.requests.clear()
    kept.clear()
    f.fetch(blob, [refs[0]], lambda c, d, e: None, neighbours=[refs[5]],
            neighbour_sink=lambda c, r: kept.__setitem__(c.ci_index, r))
    assert be.requests == [(0, refs[0].info.compressed_size)] and kept == {}
    f.close()


def test_a_closed_fetcher_refuses_parallel_work(stored, tmp_path):
    blob, refs, datas, raw = stored
    f = ChunkFetcher(CountingBackend(str(tmp_path)), workers=4)
    f.close()
    with pytest.raises(BlobUnavailable, match="closed"):
        f.fetch(blob, [refs[0], refs[3]], lambda c, d, e: None)
