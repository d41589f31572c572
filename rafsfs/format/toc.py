"""Blob ToC entries (128 B) and the "reverse tar" 512-byte GNU headers that frame blob sections."""
from __future__ import annotations

from dataclasses import dataclass

from .record import Record, field

TAR_BLOCK = 512
TOC_ENTRY_SIZE = 128

TOC_COMPRESSION_NONE = 0x1
TOC_COMPRESSION_ZSTD = 0x2
TOC_COMPRESSION_LZ4 = 0x4

SECTION_BLOB = b"image.blob"
SECTION_META = b"blob.meta"
SECTION_META_HEADER = b"blob.meta.header"
SECTION_DIGEST = b"blob.digest"
SECTION_BOOT = b"image.boot"
SECTION_TOC = b"rafs.blob.toc"


@dataclass
class TocEntry(Record):
    NAME = "ToC entry"
    flags: int = field("I")
    reserved1: int = field("I")
    name: bytes = field("16s", bytes(16))
    digest: bytes = field("32s", bytes(32))
    compressed_offset: int = field("Q")
    compressed_size: int = field("Q")
    uncompressed_size: int = field("Q")
    reserved2: bytes = field("48s", bytes(48))

    @property
    def section(self) -> bytes:
        return self.name.split(b"\0", 1)[0]


assert TocEntry.rec_size() == TOC_ENTRY_SIZE


def tar_header(name: bytes, size: int) -> bytes:
    """The GNU tar header Nydus writes after a blob section (mode/uid/gid fields left NUL, mtime 0)."""
    h = bytearray(TAR_BLOCK)
    h[0:len(name)] = name
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[156:157] = b"0"
    h[257:265] = b"ustar  \0"
    h[148:156] = b" " * 8
    h[148:156] = b"%07o\0" % sum(h)
    return bytes(h)


def parse_tar_header(buf: bytes) -> tuple[bytes, int] | None:
    """(name, size) of a 512-byte tar header, or None if it is not one (bad checksum)."""
    if len(buf) != TAR_BLOCK:
        return None
    try:
        chk = int(buf[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
        size = int(buf[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    calc = sum(buf[:148]) + 8 * 0x20 + sum(buf[156:])
    if chk != calc:
        return None
    return buf[:100].split(b"\0", 1)[0], size
