"""EROFS directory entries (12 B each, names packed after the entries within each block)."""
from __future__ import annotations

import stat
from dataclasses import dataclass

from .record import Record, field

FT_UNKNOWN, FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_SYMLINK = range(8)
MAX_NAME = 255

_FT_BY_IFMT = {
    stat.S_IFREG: FT_REG,
    stat.S_IFDIR: FT_DIR,
    stat.S_IFCHR: FT_CHR,
    stat.S_IFBLK: FT_BLK,
    stat.S_IFIFO: FT_FIFO,
    stat.S_IFSOCK: FT_SOCK,
    stat.S_IFLNK: FT_SYMLINK,
}


def file_type(mode: int) -> int:
    return _FT_BY_IFMT.get(stat.S_IFMT(mode), FT_UNKNOWN)


@dataclass
class Dirent(Record):
    NAME = "directory entry"
    nid: int = field("Q")
    nameoff: int = field("H")
    file_type: int = field("B")
    reserved: int = field("B")


DIRENT_SIZE = Dirent.rec_size()
assert DIRENT_SIZE == 12
