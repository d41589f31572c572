"""Unit tests of the on-disk records in rafsfs/format (and the chunk codecs they name)."""
from __future__ import annotations

import dataclasses
import io
import struct
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rafsfs.errors import BadImage, CorruptChunk, RafsError
from rafsfs.format import blob_meta as bm
from rafsfs.format import blob_table as bt
from rafsfs.format import chunk as ch
from rafsfs.format import dirent as de
from rafsfs.format import inode as ino
from rafsfs.format import superblock as sbf
from rafsfs.format import toc
from rafsfs.format import xattr as xa
from rafsfs.format.record import round_up

MiB = 1 << 20

RECORDS = [sbf.SuperBlock, sbf.SuperBlockExt, sbf.DeviceSlot, ino.InodeCompact, ino.InodeExtended, de.Dirent,
           xa.XattrIbodyHeader, xa.XattrEntry, ch.ChunkTableEntry, bt.BlobEntry, bm.BlobMetaHeader, toc.TocEntry]
SIZES = {sbf.SuperBlock: 128, sbf.SuperBlockExt: 256, sbf.DeviceSlot: 128, ino.InodeCompact: 32,
         ino.InodeExtended: 64, de.Dirent: 12, xa.XattrIbodyHeader: 12, xa.XattrEntry: 4, ch.ChunkTableEntry: 80,
         bt.BlobEntry: 256, bm.BlobMetaHeader: 4096, toc.TocEntry: 128}


# ---------------------------------------------------------------------------- records
def _field_strategy(code: str):
    if code.endswith("s"):
        n = int(code[:-1])
        return st.binary(min_size=n, max_size=n)
    bits = struct.calcsize("<" + code) * 8
    return st.integers(0, (1 << bits) - 1)


def _record_strategy(cls):
    return st.builds(cls, **{f.name: _field_strategy(f.metadata["code"]) for f in dataclasses.fields(cls)})


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
def test_record_sizes(cls):
    assert cls.rec_size() == SIZES[cls]
    assert len(cls().pack()) == SIZES[cls]


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_record_roundtrip(cls, data):
    rec = data.draw(_record_strategy(cls))
    raw = rec.pack()
    assert len(raw) == cls.rec_size()
    assert cls.unpack_from(raw) == rec
    # at an offset inside a larger buffer
    buf = b"\xaa" * 7 + raw + b"\x55" * 3
    assert cls.unpack_from(buf, 7) == rec
    assert cls.unpack_from(memoryview(buf), 7) == rec


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
def test_record_truncated_is_bad_image(cls):
    raw = cls().pack()
    with pytest.raises(BadImage):
        cls.unpack_from(raw[:-1])
    with pytest.raises(BadImage):
        cls.unpack_from(raw, 1)
    with pytest.raises(BadImage):
        cls.unpack_from(raw, -1)
    with pytest.raises(BadImage):
        cls.unpack_from(b"")


def test_record_defaults_and_field_order():
    sb = sbf.SuperBlock()
    raw = sb.pack()
    assert struct.unpack_from("<I", raw, 0)[0] == sbf.EROFS_MAGIC
    assert raw[12] == 12  # blkszbits
    sb = sbf.SuperBlock(root_nid=0x1234, extra_devices=3, devt_slotoff=11, feature_incompat=sbf.INCOMPAT_NYDUS)
    raw = sb.pack()
    assert struct.unpack_from("<H", raw, 14)[0] == 0x1234  # root_nid at +14
    assert struct.unpack_from("<I", raw, 80)[0] == sbf.INCOMPAT_NYDUS  # feature_incompat at +80
    assert struct.unpack_from("<HH", raw, 86) == (3, 11)  # extra_devices, devt_slotoff
    assert bm.BlobMetaHeader().pack()[-4:] == struct.pack("<I", bm.BLOB_META_MAGIC)
    e = ino.InodeExtended(format=1 | (ino.LAYOUT_CHUNK_BASED << 1), mode=0o100644, size=1 << 40, uid=100000,
                          mtime=2**31 + 5, mtime_nsec=999_999_999, nlink=3)
    raw = e.pack()
    assert struct.unpack_from("<Q", raw, 8)[0] == 1 << 40
    assert struct.unpack_from("<QII", raw, 32) == (2**31 + 5, 999_999_999, 3)
    d = de.Dirent(nid=2**40 + 1, nameoff=36, file_type=de.FT_DIR)
    assert d.pack() == struct.pack("<QHBB", 2**40 + 1, 36, 2, 0)


def test_round_up():
    assert round_up(0, 4096) == 0
    assert round_up(1, 4096) == 4096
    assert round_up(4096, 4096) == 4096
    assert round_up(4097, 4) == 4100


# ---------------------------------------------------------------------------- inode helpers
@pytest.mark.parametrize("major,minor", [(0, 0), (1, 3), (7, 0), (259, 3), (240, 70000), (4095, 0xFFFFF), (8, 255),
                                         (8, 256)])
def test_rdev_roundtrip(major, minor):
    u = ino.encode_rdev(major, minor)
    assert 0 <= u < 1 << 32
    assert ino.decode_rdev(u) == (major, minor)


def test_rdev_matches_linux_new_encode_dev():
    # Linux new_encode_dev: (minor & 0xff) | (major << 8) | ((minor & ~0xff) << 12)
    assert ino.encode_rdev(1, 3) == 0x103
    assert ino.encode_rdev(8, 0x1234) == 0x34 | (8 << 8) | (0x1200 << 12)


def test_xattr_ibody_size():
    assert ino.xattr_ibody_size(0) == 0
    assert ino.xattr_ibody_size(1) == 12
    assert ino.xattr_ibody_size(2) == 16
    assert ino.xattr_ibody_size(0xFFFF) == 12 + 0xFFFE * 4


# ---------------------------------------------------------------------------- dirent / xattr helpers
def test_dirent_file_types():
    import stat
    assert de.file_type(stat.S_IFREG | 0o644) == de.FT_REG
    assert de.file_type(stat.S_IFDIR) == de.FT_DIR
    assert de.file_type(stat.S_IFLNK) == de.FT_SYMLINK
    assert de.file_type(stat.S_IFCHR) == de.FT_CHR
    assert de.file_type(stat.S_IFBLK) == de.FT_BLK
    assert de.file_type(stat.S_IFIFO) == de.FT_FIFO
    assert de.file_type(stat.S_IFSOCK) == de.FT_SOCK
    assert de.file_type(0) == de.FT_UNKNOWN


@pytest.mark.parametrize("name,expected", [
    (b"user.foo", (1, b"foo")),
    (b"trusted.overlay.opaque", (4, b"overlay.opaque")),
    (b"security.selinux", (6, b"selinux")),
    (b"system.posix_acl_access", (2, b"")),
    (b"system.posix_acl_default", (3, b"")),
    (b"user.", None),  # empty suffix does not fit a short prefix
    (b"system.posix_acl_accessX", None),
    (b"lustre.foo", None),  # Nydus never stores lustre.*
    (b"other.foo", None),
])
def test_xattr_split_name(name, expected):
    assert xa.split_name(name) == expected


def test_xattr_entry_size():
    assert xa.entry_size(0, 0) == 4
    assert xa.entry_size(1, 0) == 8
    assert xa.entry_size(3, 1) == 8
    assert xa.entry_size(4, 1) == 12
    assert xa.entry_size(250, 1000) == round_up(4 + 250 + 1000, 4)


# ---------------------------------------------------------------------------- chunk index
@pytest.mark.parametrize("blob_index,ci_index", [(0, 0), (0, 1), (0, 0xFFFF), (0, 0x10000), (3, 0x123456),
                                                 (254, 0xFFFFFF), (254, 0)])
def test_chunk_index_nydus_roundtrip(blob_index, ci_index):
    c = ch.ChunkIndex.nydus(blob_index, ci_index, 0xDEADBEEF)
    raw = c.pack()
    assert len(raw) == ch.CHUNK_INDEX_SIZE
    back = ch.ChunkIndex.unpack_from(raw, 0)
    assert back == c
    assert back.nydus_blob_index == blob_index
    assert back.nydus_ci_index == ci_index
    assert back.blkaddr == 0xDEADBEEF
    # the layout Nydus writes: u16 ci low bits, u8 device id (blob index + 1), u8 ci bits 16..23, u32 blkaddr
    assert raw == struct.pack("<HBBI", ci_index & 0xFFFF, blob_index + 1, ci_index >> 16, 0xDEADBEEF)


def test_chunk_index_device_id_mask():
    c = ch.ChunkIndex(lo=0, hi=0x0301, blkaddr=5)
    assert c.device_id(0) == 0
    assert c.device_id(1) == 1
    assert c.device_id(2) == 1
    assert c.device_id(3) == 1
    c = ch.ChunkIndex(lo=0, hi=0x0302, blkaddr=5)
    assert c.device_id(1) == 0  # masked like the kernel: mask = 1
    assert c.device_id(2) == 2
    assert c.device_id(4) == 2


# ---------------------------------------------------------------------------- chunk info v1 / v2
V1_CASES = [
    bm.ChunkInfo(0, 1, 0, 1, False),
    bm.ChunkInfo(0, 4096, 0, 4096, False),
    bm.ChunkInfo(0, 4095, 4096, 4096, True),
    bm.ChunkInfo(4096, 16 * MiB, 16 * MiB, 16 * MiB, False),
    bm.ChunkInfo(12345, 1, 8192, 16 * MiB, True),
    bm.ChunkInfo((1 << 40) - 16 * MiB, 16 * MiB, (1 << 44) - 16 * MiB, 16 * MiB, False),  # offsets near limits
    bm.ChunkInfo((1 << 40) - 1, 1, (1 << 44) - 4096, 1, False),
    bm.ChunkInfo(0xAB_CDEF_0123, 0xFFFFF, 0xABC_DEF0_1000, 0x100001, True),  # sizes crossing the 20-bit split
]


@pytest.mark.parametrize("ci", V1_CASES)
def test_chunk_info_v1_roundtrip(ci):
    raw = bm.encode_v1(ci)
    assert len(raw) == bm.CI_V1_SIZE
    assert bm.decode_v1(raw, 0) == ci
    assert bm.decode_v1(b"\0" * 5 + raw, 5) == ci


def test_chunk_info_v1_bit_layout():
    # Nydus BlobChunkInfoV1Ondisk: uncomp_info = size_lo20 << 44 | offset (4K aligned) | size_hi4 << 8
    ci = bm.ChunkInfo(compressed_offset=0x10, compressed_size=0x123456, uncompressed_offset=0x5000,
                      uncompressed_size=0xABCDEF, compressed=True)
    u, c = struct.unpack("<QQ", bm.encode_v1(ci))
    us, cs = 0xABCDEF - 1, 0x123456 - 1
    assert u == ((us & 0xFFFFF) << 44) | 0x5000 | ((us >> 20) << 8)
    assert c == ((cs & 0xFFFFF) << 44) | ((cs >> 20) << 40) | 0x10
    # all zero: sizes decode as 1
    z = bm.decode_v1(bytes(16), 0)
    assert (z.compressed_size, z.uncompressed_size, z.compressed) == (1, 1, False)


V2_CASES = [
    bm.ChunkInfo(0, 1, 0, 1, False),
    bm.ChunkInfo(0, 4096, 0, 4096, False),
    bm.ChunkInfo(100, 1000, 4096, 4096, True),
    bm.ChunkInfo(0, 16 * MiB - 1, 16 * MiB, 16 * MiB, True),  # v2 compressed_size is 24 bits, not minus one
    bm.ChunkInfo((1 << 40) - 1, (1 << 24) - 1, ((1 << 32) - 1) << 12, 16 * MiB, True),  # offsets at the limits
    bm.ChunkInfo(0x12_3456_789A, 0xFEDCBA, 0x1234_5000, 1, True),
]


@pytest.mark.parametrize("ci", V2_CASES)
def test_chunk_info_v2_roundtrip(ci):
    raw = bm.encode_v2(ci)
    assert len(raw) == bm.CI_V2_SIZE
    back, flags = bm.decode_v2(raw, 0)
    assert back == ci
    assert flags == (bm.CI_V2_COMPRESSED if ci.compressed else 0)
    assert bm.decode_v2(b"\1" * 3 + raw, 3)[0] == ci


def test_chunk_info_v2_bit_layout():
    ci = bm.ChunkInfo(compressed_offset=0x1234, compressed_size=0x777, uncompressed_offset=0x3000,
                      uncompressed_size=0x10000, compressed=True)
    u, c, d = struct.unpack("<QQQ", bm.encode_v2(ci))
    assert u == 0x3 | ((0x10000 - 1) << 32) | (bm.CI_V2_COMPRESSED << 56)
    assert c == 0x1234 | (0x777 << 40)
    assert d == 0
    # flags survive decoding (ZRAN/batch/encrypted must be visible to the reader so it can refuse them)
    raw = struct.pack("<QQQ", (bm.CI_V2_ZRAN | bm.CI_V2_BATCH) << 56, 0, 0)
    assert bm.decode_v2(raw, 0)[1] == bm.CI_V2_ZRAN | bm.CI_V2_BATCH


OUT_OF_RANGE = [
    ("v1 usize 16M+1", bm.encode_v1, bm.ChunkInfo(0, 1, 0, 16 * MiB + 1, True)),  # size does not fit 24 bits
    ("v1 csize 16M+1", bm.encode_v1, bm.ChunkInfo(0, 16 * MiB + 1, 0, 1, True)),
    ("v1 coff 2^40", bm.encode_v1, bm.ChunkInfo(1 << 40, 1, 0, 1, False)),  # does not fit 40 bits
    ("v1 uoff 2^44", bm.encode_v1, bm.ChunkInfo(0, 1, 1 << 44, 1, False)),  # does not fit bits 12..43
    ("v1 uoff unaligned", bm.encode_v1, bm.ChunkInfo(0, 1, 100, 1, False)),  # not 4K aligned
    ("v2 csize 2^24", bm.encode_v2, bm.ChunkInfo(0, 16 * MiB, 0, 16 * MiB, False)),  # 24 bits, not minus one
    ("v2 coff 2^40", bm.encode_v2, bm.ChunkInfo(1 << 40, 1, 0, 1, True)),
    ("v2 uoff 2^44", bm.encode_v2, bm.ChunkInfo(0, 1, 1 << 44, 1, True)),
    ("v2 uoff unaligned", bm.encode_v2, bm.ChunkInfo(0, 1, 100, 1, True)),
]


def test_chunk_info_encode_rejects_out_of_range():
    """An encoder must refuse what its fields cannot hold (any exception will do), never silently write another
    chunk's location.  Lists every case that was encoded silently."""
    silent = []
    for label, encode, ci in OUT_OF_RANGE:
        try:
            raw = encode(ci)
        except (ValueError, OverflowError, struct.error, RafsError):
            continue
        back = bm.decode_v1(raw, 0) if encode is bm.encode_v1 else bm.decode_v2(raw, 0)[0]
        silent.append(f"{label}: {encode.__name__}({ci}) -> decodes as {back}")
    assert not silent, "out-of-range chunk info encoded silently:\n  " + "\n  ".join(silent)


@settings(max_examples=200, deadline=None)
@given(coff=st.integers(0, (1 << 40) - 1), csize=st.integers(1, 16 * MiB - 1), ublk=st.integers(0, (1 << 32) - 4097),
       usize=st.integers(1, 16 * MiB), compressed=st.booleans())
def test_chunk_info_property(coff, csize, ublk, usize, compressed):
    ci = bm.ChunkInfo(coff, csize, ublk << 12, usize, compressed)
    back2, _ = bm.decode_v2(bm.encode_v2(ci), 0)
    assert back2 == ci
    # v1 has no flag: "compressed" means the sizes differ
    ci1 = bm.ChunkInfo(coff, csize, ublk << 12, usize, csize != usize)
    assert bm.decode_v1(bm.encode_v1(ci1), 0) == ci1


# ---------------------------------------------------------------------------- crc32c
def test_crc32c_check_value():
    # the standard CRC-32C check value: crc32c("123456789") = 0xE3069283 (init ~0, final inversion)
    assert sbf.crc32c(b"123456789") ^ 0xFFFFFFFF == 0xE3069283
    assert sbf.crc32c(b"123456789", 0xFFFFFFFF) == 0xE3069283 ^ 0xFFFFFFFF
    assert sbf.crc32c(b"") == 0xFFFFFFFF
    # RFC 3720 B.4 vector: 32 bytes of zeros -> 0x8A9136AA
    assert sbf.crc32c(bytes(32)) ^ 0xFFFFFFFF == 0x8A9136AA
    # chaining
    assert sbf.crc32c(b"6789", sbf.crc32c(b"12345")) == sbf.crc32c(b"123456789")


# ---------------------------------------------------------------------------- tar headers and the ToC
@pytest.mark.parametrize("name,size", [(b"image.blob", 0), (b"blob.meta", 4096), (b"blob.digest", 64),
                                       (b"rafs.blob.toc", 128 * 5), (b"image.boot", 8**11 - 1)])
def test_tar_header_roundtrip(name, size):
    h = toc.tar_header(name, size)
    assert len(h) == toc.TAR_BLOCK
    assert toc.parse_tar_header(h) == (name, size)
    # Python's tarfile agrees it is a valid (GNU) header
    info = tarfile.TarInfo.frombuf(h, "utf-8", "surrogateescape")
    assert info.name == name.decode()
    assert info.size == size
    assert info.type == tarfile.REGTYPE


def test_tar_header_readable_by_tarfile():
    data = b"x" * 1000
    stream = data + bytes(round_up(len(data), 512) - len(data)) + toc.tar_header(b"image.blob", len(data))
    # a "reverse tar": data first, header after; reading the header then seeking back to the data works
    hdr = stream[-512:]
    name, size = toc.parse_tar_header(hdr)
    assert (name, size) == (b"image.blob", 1000)
    # and a forward tar built from the same header is readable by tarfile
    fwd = hdr + data + bytes(round_up(len(data), 512) - len(data)) + bytes(1024)
    with tarfile.open(fileobj=io.BytesIO(fwd)) as tf:
        (m,) = tf.getmembers()
        assert m.name == "image.blob"
        assert tf.extractfile(m).read() == data


def test_parse_tar_header_rejects():
    h = bytearray(toc.tar_header(b"blob.meta", 10))
    assert toc.parse_tar_header(bytes(h[:511])) is None
    assert toc.parse_tar_header(bytes(h) + b"\0") is None
    assert toc.parse_tar_header(bytes(512)) is None  # zero block: checksum field empty
    h2 = bytearray(h)
    h2[0] ^= 1
    assert toc.parse_tar_header(bytes(h2)) is None  # checksum mismatch
    h3 = bytearray(h)
    h3[124:136] = b"zzzzzzzzzzz\0"
    assert toc.parse_tar_header(bytes(h3)) is None  # non-octal size


def test_toc_entry_section_name():
    e = toc.TocEntry(name=b"blob.digest".ljust(16, b"\0"), compressed_offset=1, compressed_size=2)
    assert e.section == b"blob.digest"
    assert toc.TocEntry.unpack_from(e.pack()).section == toc.SECTION_DIGEST


# ---------------------------------------------------------------------------- chunk codecs (the blob table enums)
@pytest.mark.parametrize("algo", [bt.COMPRESSOR_NONE, bt.COMPRESSOR_ZSTD, bt.COMPRESSOR_LZ4_BLOCK,
                                  bt.COMPRESSOR_GZIP])
@pytest.mark.parametrize("size", [1, 4096, 100_000])
def test_compression_roundtrip(algo, size):
    from rafsfs.compression import compress, decompress
    import random
    data = random.Random(size).randbytes(size // 2) + bytes(size - size // 2)
    assert decompress(algo, compress(algo, data), size) == data


@pytest.mark.parametrize("algo", [bt.COMPRESSOR_ZSTD, bt.COMPRESSOR_LZ4_BLOCK, bt.COMPRESSOR_GZIP, 99])
def test_decompress_garbage_is_corrupt_chunk(algo):
    from rafsfs.compression import compress, decompress
    with pytest.raises(CorruptChunk):
        decompress(algo, b"\x00garbage\xff" * 10, 4096)
    if algo != 99:
        with pytest.raises(CorruptChunk):  # right data, wrong expected size
            decompress(algo, compress(algo, b"a" * 5000), 4096)


def test_lz4_is_a_raw_block():
    import lz4.block
    from rafsfs.compression import compress
    data = b"abc" * 1000
    raw = compress(bt.COMPRESSOR_LZ4_BLOCK, data)
    assert lz4.block.decompress(raw, uncompressed_size=len(data)) == data
    assert not raw.startswith(b"\x04\x22\x4d\x18")  # no LZ4 frame magic


def test_digests_known_values():
    import hashlib
    from rafsfs.compression import digest
    assert digest(bt.DIGEST_SHA256, b"abc") == hashlib.sha256(b"abc").digest()
    # BLAKE3 of the empty input (reference test vector)
    assert digest(bt.DIGEST_BLAKE3, b"").hex() == \
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"



@settings(max_examples=200)
@given(raw=st.binary(min_size=0, max_size=24 * 40), v2=st.booleans())
def test_uncompressed_offsets_agree_with_the_entry_decoders(raw, v2):
    """The fast pass over a chunk-info array (blob layout, ``BlobMeta.chunks_at``) reads the uncompressed offset by
    the same rule as the full entry decoders, for any bytes."""
    size = bm.CI_V2_SIZE if v2 else bm.CI_V1_SIZE
    raw = raw[:len(raw) // size * size]
    full = [(bm.decode_v2(raw, o)[0] if v2 else bm.decode_v1(raw, o)).uncompressed_offset
            for o in range(0, len(raw), size)]
    assert list(bm.uncompressed_offsets(raw, v2)) == full
