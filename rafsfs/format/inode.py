"""EROFS compact (32 B) and extended (64 B) inodes, data layouts and chunk formats."""
from __future__ import annotations

from dataclasses import dataclass

from .record import Record, field

INODE_SLOT = 32  # nid -> offset granularity

# i_format
VERSION_COMPACT = 0
VERSION_EXTENDED = 1
LAYOUT_FLAT_PLAIN = 0
LAYOUT_COMPRESSED_FULL = 1
LAYOUT_FLAT_INLINE = 2
LAYOUT_COMPRESSED_COMPACT = 3
LAYOUT_CHUNK_BASED = 4

# chunk format (low 16 bits of i_u for CHUNK_BASED inodes)
CHUNK_FORMAT_BLKBITS_MASK = 0x1F
CHUNK_FORMAT_INDEXES = 0x20
CHUNK_FORMAT_48BIT = 0x40

NULL_ADDR = 0xFFFFFFFF


@dataclass
class InodeCompact(Record):
    NAME = "compact inode"
    format: int = field("H")
    xattr_icount: int = field("H")
    mode: int = field("H")
    nlink: int = field("H")
    size: int = field("I")
    mtime: int = field("I")  # Nydus: reserved (0); EROFS with COMPAT_MTIME: seconds since sb epoch
    u: int = field("I")
    ino: int = field("I")
    uid: int = field("H")
    gid: int = field("H")
    reserved: int = field("I")


@dataclass
class InodeExtended(Record):
    NAME = "extended inode"
    format: int = field("H")
    xattr_icount: int = field("H")
    mode: int = field("H")
    reserved: int = field("H")
    size: int = field("Q")
    u: int = field("I")
    ino: int = field("I")
    uid: int = field("I")
    gid: int = field("I")
    mtime: int = field("Q")
    mtime_nsec: int = field("I")
    nlink: int = field("I")
    reserved2: bytes = field("16s", bytes(16))


def encode_rdev(major: int, minor: int) -> int:
    """Linux "new" dev_t encoding as EROFS stores it in i_u."""
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def decode_rdev(u: int) -> tuple[int, int]:
    major = (u >> 8) & 0xFFF
    minor = (u & 0xFF) | ((u >> 12) & 0xFFF00)
    return major, minor


def xattr_ibody_size(icount: int) -> int:
    return 0 if icount == 0 else 12 + (icount - 1) * 4


assert InodeCompact.rec_size() == 32
assert InodeExtended.rec_size() == 64
