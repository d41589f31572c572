"""Chunk decompression: exact sizes, and no input inflates past the size the image records (review H1).

Each bomb is decoded in a fresh interpreter that reports how much its peak resident set (VmHWM) and its peak address
space (VmPeak) grew during the one call: a bomb must cost about the chunk's size, not what the bomb expands to.
"""
from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import lz4.block
import pytest
import zstandard

from rafsfs import compression
from rafsfs.errors import CorruptChunk
from rafsfs.format.blob_meta import MAX_CHUNK_SIZE
from rafsfs.format.blob_table import COMPRESSOR_GZIP, COMPRESSOR_LZ4_BLOCK, COMPRESSOR_NONE, COMPRESSOR_ZSTD

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
BOMB = 64 * MiB  # what every bomb below expands to
CHUNK = 64 * 1024  # the size the image records for the bomb chunk


def zstd_rle_frame(total: int, content_size: int | None, window_log: int = 20) -> bytes:
    """A zstd frame of RLE blocks expanding to ``total`` bytes (4 bytes per 128 KiB), written by hand.

    ``content_size`` goes into the frame header (None: the header states no size, as streaming encoders write).
    """
    out = bytearray(struct.pack("<I", zstandard.MAGIC_NUMBER))
    if content_size is None:
        out += bytes([0x00, (window_log - 10) << 3])  # no content size, not single-segment: a window descriptor
    else:
        out += bytes([0xC0, (window_log - 10) << 3]) + struct.pack("<Q", content_size)  # 8-byte content size
    left = total
    while left:
        n = min(left, 128 * 1024)
        left -= n
        out += ((n << 3) | (1 << 1) | (left == 0)).to_bytes(3, "little") + b"A"  # RLE block of n bytes
    return bytes(out)


_MEASURE = r"""
import json, sys
from rafsfs import compression
from rafsfs.errors import CorruptChunk

def status():
    f = dict(l.split(":", 1) for l in open("/proc/self/status"))
    return int(f["VmHWM"].split()[0]) * 1024, int(f["VmPeak"].split()[0]) * 1024

algo, size, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
data = open(path, "rb").read()
compression.decompress(algo, compression.compress(algo, b"x" * 4096), 4096)  # decoder objects made before measuring
rss0, vm0 = status()
try:
    out = compression.decompress(algo, data, size)
    result = f"ok {len(out)}"
except CorruptChunk as e:
    result = f"CorruptChunk {e}"
rss1, vm1 = status()
print(json.dumps({"result": result, "rss": rss1 - rss0, "vm": vm1 - vm0}))
"""


def _decode_measured(tmp_path, algo: int, data: bytes, size: int) -> dict:
    p = tmp_path / "bomb"
    p.write_bytes(data)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(algo), str(size), str(p)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _bombs():
    zeros = bytes(BOMB)
    yield "zstd-content-size", COMPRESSOR_ZSTD, zstd_rle_frame(BOMB, BOMB)
    yield "zstd-content-size-huge", COMPRESSOR_ZSTD, zstd_rle_frame(BOMB, 1 << 40)
    # unknown size and the largest window the library accepts by default (128 MiB): the decoder must not reserve it
    yield "zstd-unknown-size", COMPRESSOR_ZSTD, zstd_rle_frame(BOMB, None, window_log=27)
    # states the recorded size but its blocks expand to 64 MiB
    yield "zstd-content-size-lies", COMPRESSOR_ZSTD, zstd_rle_frame(BOMB, CHUNK)
    yield "lz4", COMPRESSOR_LZ4_BLOCK, lz4.block.compress(zeros, store_size=False)
    yield "gzip", COMPRESSOR_GZIP, gzip.compress(zeros, mtime=0)
    yield "none", COMPRESSOR_NONE, b"\0" * (CHUNK + 1)


BOMBS = list(_bombs())


@pytest.mark.parametrize("name,algo,data", BOMBS, ids=[b[0] for b in BOMBS])
def test_bomb_is_refused_with_bounded_memory(tmp_path, name, algo, data):
    m = _decode_measured(tmp_path, algo, data, CHUNK)
    assert m["result"].startswith("CorruptChunk"), m
    if name == "zstd-unknown-size":
        assert "states" not in m["result"], m  # refused by the decoder, not by a content-size check
    # a few chunk-sized buffers, never the 64 MiB the bomb expands to (on the old code: +64 MiB resident for a zstd
    # frame stating its size, and +128 MiB of address space for one stating none)
    assert m["rss"] < 8 * MiB, m
    assert m["vm"] < MAX_CHUNK_SIZE + 8 * MiB, m


def test_unknown_size_frame_of_the_right_size_decodes():
    data = os.urandom(1000) * 100
    cctx = zstandard.ZstdCompressor(write_content_size=False)
    obj = cctx.compressobj()
    frame = obj.compress(data) + obj.flush()
    assert zstandard.frame_content_size(frame) == -1  # no size stated
    assert compression.decompress(COMPRESSOR_ZSTD, frame, len(data)) == data
    with pytest.raises(CorruptChunk):
        compression.decompress(COMPRESSOR_ZSTD, frame, len(data) - 1)
    with pytest.raises(CorruptChunk):
        compression.decompress(COMPRESSOR_ZSTD, frame, len(data) + 1)


def test_frame_stating_another_size_is_refused_before_decoding():
    data = b"abc" * 5000
    frame = zstandard.ZstdCompressor().compress(data)
    assert compression.decompress(COMPRESSOR_ZSTD, frame, len(data)) == data
    with pytest.raises(CorruptChunk, match="states 15000 bytes, expected 14999"):
        compression.decompress(COMPRESSOR_ZSTD, frame, len(data) - 1)


@pytest.mark.parametrize("algo", [COMPRESSOR_NONE, COMPRESSOR_ZSTD, COMPRESSOR_LZ4_BLOCK, COMPRESSOR_GZIP])
def test_round_trip_and_wrong_size(algo):
    data = os.urandom(3000) + bytes(70000)
    c = compression.compress(algo, data)
    assert compression.decompress(algo, c, len(data)) == data
    for wrong in (len(data) - 1, len(data) + 1):
        with pytest.raises(CorruptChunk):
            compression.decompress(algo, c, wrong)


@pytest.mark.parametrize("garbage", [b"", b"\0" * 10, b"\x28\xb5\x2f\xfd", os.urandom(64)])
def test_garbage_is_corrupt_chunk(garbage):
    for algo in (COMPRESSOR_ZSTD, COMPRESSOR_LZ4_BLOCK, COMPRESSOR_GZIP):
        with pytest.raises(CorruptChunk):
            compression.decompress(algo, garbage, 4096)


def test_chunk_info_sized_output_still_decodes():
    """Outputs above 16 MiB (a chunk-info array) get a window to match when their frame states no size."""
    data = bytes(20 * MiB)
    cctx = zstandard.ZstdCompressor(write_content_size=False)
    obj = cctx.compressobj()
    frame = obj.compress(data) + obj.flush()
    assert compression.decompress(COMPRESSOR_ZSTD, frame, len(data)) == data
    assert zlib.crc32(compression.decompress(COMPRESSOR_ZSTD, zstandard.ZstdCompressor().compress(data),
                                             len(data))) == zlib.crc32(data)
