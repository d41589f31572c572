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
from .format.blob_meta import MAX_CHUNK_SIZE
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


# The largest window a zstd frame of unknown content size may ask for (16 MiB, the largest chunk): a frame's window
# is what the decoder allocates for it, and the default limit (128 MiB) would let a 4 KiB chunk reserve 128 MiB per
# decode worker.  Every zstd level below --ultra fits (streaming encoders use at most 8 MiB).  Larger outputs (a
# chunk-info array) get the next power of two of their size.
MIN_ZSTD_WINDOW_LOG = MAX_CHUNK_SIZE.bit_length() - 1


def _zstd_d(window_log: int) -> zstandard.ZstdDecompressor:
    ds = getattr(_local, "zd", None)
    if ds is None:
        ds = _local.zd = {}
    d = ds.get(window_log)
    if d is None:
        d = ds[window_log] = zstandard.ZstdDecompressor(max_window_size=1 << window_log)
    return d


def _zstd_decompress(data, size: int) -> bytes:
    """One zstd frame to at most ``size`` bytes, with memory bounded by ``size`` whatever the frame says.

    python-zstandard's ``max_output_size`` is ignored when the frame header states a content size (it allocates and
    inflates whatever the header claims), so a frame must state exactly ``size`` or nothing; a frame of unknown size
    is inflated into a ``size``-byte buffer by a decoder whose window is capped.
    """
    fcs = zstandard.frame_content_size(data)  # raises ZstdError on a malformed header; -1: no size stated
    if fcs not in (-1, zstandard.CONTENTSIZE_UNKNOWN) and fcs != size:
        raise CorruptChunk(f"zstd frame states {fcs} bytes, expected {size}")
    if size == 0:
        return b""
    window_log = max(MIN_ZSTD_WINDOW_LOG, (size - 1).bit_length())
    return _zstd_d(window_log).decompress(data, max_output_size=size)


def decompress(algo: int, data: bytes, size: int) -> bytes:
    """Decompress one chunk to exactly ``size`` bytes; anything else is :class:`CorruptChunk`.

    No input makes it allocate much more than ``size`` bytes (plus a zstd window of at most
    ``max(16 MiB, size)`` for frames that do not state their size): every decoder is told the size up front.
    """
    try:
        if algo == COMPRESSOR_NONE:
            if len(data) != size:
                raise CorruptChunk(f"uncompressed chunk is {len(data)} bytes, expected {size}")
            out = bytes(data)
        elif algo == COMPRESSOR_ZSTD:
            out = _zstd_decompress(data, size)
        elif algo == COMPRESSOR_LZ4_BLOCK:
            out = lz4.block.decompress(data, uncompressed_size=size)  # an output buffer of exactly size bytes
        elif algo == COMPRESSOR_GZIP:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out = d.decompress(data, size)  # max_length: never more than size bytes out
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
