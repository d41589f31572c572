"""EROFS superblock (offset 1024, 128 B) and the Nydus extended superblock (offset 1152, 256 B)."""
from __future__ import annotations

from dataclasses import dataclass

from .record import Record, field

EROFS_MAGIC = 0xE0F5E1E2
SB_OFFSET = 1024
EXT_SB_OFFSET = 1152
NYDUS_DEVT_SLOTOFF = 11  # device table at 1408

# feature_compat
COMPAT_SB_CHKSUM = 0x1
COMPAT_MTIME = 0x2
COMPAT_XATTR_FILTER = 0x4
COMPAT_RAFS_V6 = 0x40000000

# feature_incompat
INCOMPAT_ZERO_PADDING = 0x1
INCOMPAT_COMPR_CFGS = 0x2
INCOMPAT_CHUNKED_FILE = 0x4
INCOMPAT_DEVICE_TABLE = 0x8
INCOMPAT_ZTAILPACKING = 0x10
INCOMPAT_FRAGMENTS = 0x20
INCOMPAT_XATTR_PREFIXES = 0x40
INCOMPAT_48BIT = 0x80
# what this reader implements (uncompressed EROFS layouts only: no EROFS-native compression)
INCOMPAT_SUPPORTED = INCOMPAT_CHUNKED_FILE | INCOMPAT_DEVICE_TABLE | INCOMPAT_XATTR_PREFIXES
INCOMPAT_NYDUS = INCOMPAT_CHUNKED_FILE | INCOMPAT_DEVICE_TABLE

# RafsSuperFlags (ext sb s_flags)
FLAG_COMPRESSION_NONE = 0x1
FLAG_COMPRESSION_LZ4 = 0x2
FLAG_HASH_BLAKE3 = 0x4
FLAG_HASH_SHA256 = 0x8
FLAG_EXPLICIT_UID_GID = 0x10
FLAG_HAS_XATTR = 0x20
FLAG_COMPRESSION_GZIP = 0x40
FLAG_COMPRESSION_ZSTD = 0x80
FLAG_INLINED_CHUNK_DIGEST = 0x100
FLAG_TARFS_MODE = 0x200
FLAG_ENCRYPTION_NONE = 0x0100_0000
FLAG_ENCRYPTION_AES_128_XTS = 0x0200_0000
FLAGS_KNOWN = 0x3FF | 0xFF00_0000
FLAGS_COMPRESSION = FLAG_COMPRESSION_NONE | FLAG_COMPRESSION_LZ4 | FLAG_COMPRESSION_GZIP | FLAG_COMPRESSION_ZSTD
FLAGS_HASH = FLAG_HASH_BLAKE3 | FLAG_HASH_SHA256


@dataclass
class SuperBlock(Record):
    NAME = "superblock"
    magic: int = field("I", EROFS_MAGIC)
    checksum: int = field("I")
    feature_compat: int = field("I")
    blkszbits: int = field("B", 12)
    sb_extslots: int = field("B")
    root_nid: int = field("H")
    inos: int = field("Q")
    build_time: int = field("Q")
    build_time_nsec: int = field("I")
    blocks: int = field("I")
    meta_blkaddr: int = field("I")
    xattr_blkaddr: int = field("I")
    uuid: bytes = field("16s", bytes(16))
    volume_name: bytes = field("16s", bytes(16))
    feature_incompat: int = field("I")
    u1: int = field("H")
    extra_devices: int = field("H")
    devt_slotoff: int = field("H")
    dirblkbits: int = field("B")
    xattr_prefix_count: int = field("B")
    xattr_prefix_start: int = field("I")
    packed_nid: int = field("Q")
    reserved: bytes = field("24s", bytes(24))


@dataclass
class SuperBlockExt(Record):
    """Nydus ``RafsV6SuperBlockExt``: valid only when ``feature_compat`` has ``COMPAT_RAFS_V6``."""

    NAME = "extended superblock"
    flags: int = field("Q")
    blob_table_offset: int = field("Q")
    blob_table_size: int = field("I")
    chunk_size: int = field("I")
    chunk_table_offset: int = field("Q")
    chunk_table_size: int = field("Q")
    prefetch_table_offset: int = field("Q")
    prefetch_table_size: int = field("I")
    padding: int = field("I")
    reserved: bytes = field("200s", bytes(200))


@dataclass
class DeviceSlot(Record):
    """EROFS device table slot (128 B); Nydus: tag = blob id in hex."""

    NAME = "device slot"
    tag: bytes = field("64s", bytes(64))
    blocks: int = field("I")
    mapped_blkaddr: int = field("I")
    reserved: bytes = field("56s", bytes(56))


def crc32c(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """CRC32C (Castagnoli), reflected, no final inversion: what EROFS's superblock checksum uses."""
    table = _crc32c_table()
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


_CRC_TABLE: list[int] = []


def _crc32c_table() -> list[int]:
    if not _CRC_TABLE:
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            _CRC_TABLE.append(c)
    return _CRC_TABLE


assert SuperBlock.rec_size() == 128
assert SuperBlockExt.rec_size() == 256
assert DeviceSlot.rec_size() == 128
