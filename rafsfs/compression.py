"""Chunk compression and digests, by the enum values the blob table uses."""
from __future__ import annotations

import gzip
import hashlib
import threading
import zlib

import blake3  # the Nydus default chunk digester; a maintained binding of the reference implementation
import lz4.block  # Nydus's lz4_block is a raw LZ4 block with no frame and no size prefix
import zstandard  # Nydus's default chunk compressor; releases the GIL

from .errors import CorruptChunk
from .format.blob_table import (
    COMPRESSOR_GZIP,
    COMPRESSOR_LZ4_BLOCK,
    COMPRESSOR_NONE,
    COMPRESSOR_ZSTD,
    DIGEST_BLAKE3,
    DIGEST_SHA256,
)

COMPRESSOR_NAMES = {COMPRESSOR_NONE: "none", COMPRESSOR_LZ4_BLOCK: "lz4_block", COMPRESSOR_GZIP: "gzip",
                    COMPRESSOR_ZSTD: "zstd"}
COMPRESSOR_BY_NAME = {"none": COMPRESSOR_NONE, "lz4": COMPRESSOR_LZ4_BLOCK, "lz4_block": COMPRESSOR_LZ4_BLOCK,
                      "gzip": COMPRESSOR_GZIP, "zstd": COMPRESSOR_ZSTD}
DIGESTER_NAMES = {DIGEST_BLAKE3: "blake3", DIGEST_SHA256: "sha256"}
DIGESTER_BY_NAME = {v: k for k, v in DIGESTER_NAMES.items()}

_local = threading.local()  # zstandard (de)compressor objects must not be shared between threads


def _zstd_c() -> zstandard.ZstdCompressor:
    c = getattr(_local, "zc", None)
    if c is None:
        c = _local.zc = zstandard.ZstdCompressor(level=3)
    return c


def _zstd_d() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "zd", None)
    if d is None:
        d = _local.zd = zstandard.ZstdDecompressor()
    return d


def decompress(algo: int, data: bytes, size: int) -> bytes:
    """Decompress one chunk to exactly ``size`` bytes; anything else is :class:`CorruptChunk`."""
    try:
        if algo == COMPRESSOR_NONE:
            out = bytes(data)
        elif algo == COMPRESSOR_ZSTD:
            out = _zstd_d().decompress(data, max_output_size=size)
        elif algo == COMPRESSOR_LZ4_BLOCK:
            out = lz4.block.decompress(data, uncompressed_size=size)
        elif algo == COMPRESSOR_GZIP:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out = d.decompress(bytes(data), size)
            if not d.eof or d.unconsumed_tail:
                raise CorruptChunk("gzip chunk is longer than its recorded size or truncated")
        else:
            raise CorruptChunk(f"unknown compressor {algo}")
    except CorruptChunk:
        raise
    except Exception as e:  # each library raises its own error type on bad input
        raise CorruptChunk(f"{COMPRESSOR_NAMES.get(algo, algo)} decompression failed: {e}") from None
    if len(out) != size:
        raise CorruptChunk(f"chunk decompressed to {len(out)} bytes, expected {size}")
    return out


def compress(algo: int, data: bytes) -> bytes:
    if algo == COMPRESSOR_NONE:
        return data
    if algo == COMPRESSOR_ZSTD:
        return _zstd_c().compress(data)
    if algo == COMPRESSOR_LZ4_BLOCK:
        return lz4.block.compress(data, store_size=False)
    if algo == COMPRESSOR_GZIP:
        return gzip.compress(data, mtime=0)
    raise ValueError(f"unknown compressor {algo}")


def digest(algo: int, data) -> bytes:
    if algo == DIGEST_BLAKE3:
        return blake3.blake3(data, max_threads=1).digest()
    if algo == DIGEST_SHA256:
        return hashlib.sha256(data).digest()
    raise ValueError(f"unknown digester {algo}")
