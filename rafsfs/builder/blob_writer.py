"""Writes one data blob the way nydus-image lays it out (spec §8.1):

    [chunk data][tar "image.blob"][ci array][blob.meta header][tar "blob.meta"]
    [chunk digests][tar "blob.digest"][ToC entries][tar "rafs.blob.toc"]

Chunks are deduplicated by digest.  Compression and hashing run in a small thread pool (zstandard, lz4 and blake3
release the GIL) while the caller keeps reading the source.  Chunks stored uncompressed (``--compressor none``) are
placed at their 4 KiB-aligned uncompressed offsets, so the first ``uncompressed_size`` bytes of such a blob *are*
its uncompressed view and the blob can be handed to the kernel as ``-o device=`` directly.

The blob id is the sha256 of the whole blob file (unlike nydus-image, which leaves the blob.digest bytes out of
the hash), so the file can be pushed to a registry as a layer whose digest is its id.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from .. import compression
from ..atomic import publish
from ..format import blob_meta as bm
from ..format import blob_table as bt
from ..format import toc
from ..format.record import round_up

FEATURES = (bt.FEAT_ALIGNED | bt.FEAT_INLINED_CHUNK_DIGEST | bt.FEAT_HAS_TAR_HEADER | bt.FEAT_HAS_TOC
            | bt.FEAT_CAP_TAR_TOC)
_TOC_FLAG = {bt.COMPRESSOR_NONE: toc.TOC_COMPRESSION_NONE, bt.COMPRESSOR_ZSTD: toc.TOC_COMPRESSION_ZSTD,
             bt.COMPRESSOR_LZ4_BLOCK: toc.TOC_COMPRESSION_LZ4}


@dataclass
class StoredChunk:
    digest: bytes
    info: bm.ChunkInfo


def _process(compressor: int, digester: int, data: bytes) -> tuple[bytes, bytes, int, bool]:
    """(digest, stored bytes, raw length, compressed?) for one chunk; stored raw unless compression shrinks it."""
    d = compression.digest(digester, data)
    if compressor != bt.COMPRESSOR_NONE:
        c = compression.compress(compressor, data)
        if len(c) < len(data):
            return d, c, len(data), True
    return d, data, len(data), False


class BlobWriter:
    def __init__(self, blob_dir: str, compressor: int, digester: int, chunk_size: int, workers: int = 2):
        self.blob_dir = blob_dir
        self.compressor = compressor
        self.digester = digester
        self.chunk_size = chunk_size
        os.makedirs(blob_dir, exist_ok=True)
        fd, self.tmp_path = tempfile.mkstemp(prefix=".blob-", dir=blob_dir)
        self.f = os.fdopen(fd, "wb")
        self.hash = hashlib.sha256()
        self.pos = 0  # bytes written to the blob file
        self.uoff = 0  # next free offset in the uncompressed view
        self.chunks: list[StoredChunk] = []
        self.by_digest: dict[bytes, int] = {}
        self.dedup_hits = 0
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rafsfs-build")
        self.pending: deque[tuple[Future, list[int]]] = deque()
        self.window = workers * 4

    # ------------------------------------------------------------------ chunk data
    def _write(self, data: bytes) -> None:
        self.f.write(data)
        self.hash.update(data)
        self.pos += len(data)

    def add_chunk(self, data: bytes, out: list[int]) -> None:
        """Queue one chunk; its chunk-info index is appended to ``out`` in order once processed."""
        self.pending.append((self.pool.submit(_process, self.compressor, self.digester, data), out))
        while len(self.pending) > self.window:
            self._drain_one()

    def _drain_one(self) -> None:
        fut, out = self.pending.popleft()
        digest, stored, raw_len, compressed = fut.result()
        idx = self.by_digest.get(digest)
        if idx is not None:
            self.dedup_hits += 1
            out.append(idx)
            return
        if self.compressor == bt.COMPRESSOR_NONE:
            # keep the blob equal to its uncompressed view: chunk at its aligned uncompressed offset
            self._write(bytes(self.uoff - self.pos))
        coff = self.pos
        self._write(stored)
        info = bm.ChunkInfo(coff, len(stored), self.uoff, raw_len, compressed)
        self.uoff = round_up(self.uoff + raw_len, 4096)
        idx = len(self.chunks)
        self.chunks.append(StoredChunk(digest, info))
        self.by_digest[digest] = idx
        out.append(idx)

    def flush(self) -> None:
        while self.pending:
            self._drain_one()

    # ------------------------------------------------------------------ finishing
    def finish(self) -> tuple[str | None, str | None, bt.BlobEntry | None]:
        """Write the metadata sections, name the file by its sha256 and return (id, path, blob table entry)."""
        self.flush()
        self.pool.shutdown()
        if not self.chunks:
            self.f.close()
            os.unlink(self.tmp_path)
            return None, None, None
        toc_entries: list[toc.TocEntry] = []
        data_size = self.pos
        self._write(toc.tar_header(toc.SECTION_BLOB, data_size))
        toc_entries.append(toc.TocEntry(flags=toc.TOC_COMPRESSION_NONE, name=toc.SECTION_BLOB,
                                        digest=self.hash.copy().digest(), compressed_offset=0,
                                        compressed_size=data_size, uncompressed_size=round_up(self.uoff, 4096)))
        ci_raw = b"".join(bm.encode_v1(c.info) for c in self.chunks)
        ci_comp, ci_algo = ci_raw, bt.COMPRESSOR_NONE
        if self.compressor != bt.COMPRESSOR_NONE:
            c = compression.compress(self.compressor, ci_raw)
            if len(c) < len(ci_raw):
                ci_comp, ci_algo = c, self.compressor
        ci_offset = self.pos
        hdr = bm.BlobMetaHeader(features=FEATURES, ci_compressor=ci_algo, ci_entries=len(self.chunks),
                                ci_offset=ci_offset, ci_compressed_size=len(ci_comp),
                                ci_uncompressed_size=len(ci_raw)).pack()
        self._write(ci_comp)
        toc_entries.append(toc.TocEntry(flags=_TOC_FLAG[ci_algo], name=toc.SECTION_META,
                                        digest=hashlib.sha256(ci_raw).digest(), compressed_offset=ci_offset,
                                        compressed_size=len(ci_comp), uncompressed_size=len(ci_raw)))
        toc_entries.append(toc.TocEntry(flags=toc.TOC_COMPRESSION_NONE, name=toc.SECTION_META_HEADER,
                                        digest=hashlib.sha256(hdr).digest(), compressed_offset=self.pos,
                                        compressed_size=len(hdr), uncompressed_size=len(hdr)))
        self._write(hdr)
        self._write(toc.tar_header(toc.SECTION_META, len(ci_comp) + len(hdr)))
        digests = b"".join(c.digest for c in self.chunks)
        toc_entries.append(toc.TocEntry(flags=toc.TOC_COMPRESSION_NONE, name=toc.SECTION_DIGEST,
                                        digest=hashlib.sha256(digests).digest(), compressed_offset=self.pos,
                                        compressed_size=len(digests), uncompressed_size=len(digests)))
        self._write(digests)
        self._write(toc.tar_header(toc.SECTION_DIGEST, len(digests)))
        toc_bytes = b"".join(e.pack() for e in toc_entries)
        toc_tail = toc_bytes + toc.tar_header(toc.SECTION_TOC, len(toc_bytes))
        self._write(toc_tail)
        self.f.flush()
        os.fsync(self.f.fileno())  # the bytes are durable before the name that says they are complete
        self.f.close()
        blob_id = self.hash.hexdigest()
        path = os.path.join(self.blob_dir, blob_id)
        publish(self.tmp_path, path)
        entry = bt.BlobEntry(
            blob_id=blob_id.encode(), blob_index=0, chunk_size=self.chunk_size, chunk_count=len(self.chunks),
            compression_algo=self.compressor, digest_algo=self.digester, features=FEATURES,
            compressed_size=self.pos, uncompressed_size=round_up(self.uoff, 4096), blob_toc_size=len(toc_tail),
            ci_compressor=ci_algo, ci_offset=ci_offset, ci_compressed_size=len(ci_comp),
            ci_uncompressed_size=len(ci_raw), blob_toc_digest=hashlib.sha256(toc_tail).digest())
        return blob_id, path, entry

    def abort(self) -> None:
        self.pool.shutdown(cancel_futures=True)
        try:
            self.f.close()
        finally:
            if os.path.exists(self.tmp_path):
                os.unlink(self.tmp_path)
