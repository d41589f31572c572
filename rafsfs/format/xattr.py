"""EROFS extended attributes: the inline ibody header, entries and the name-index prefix table."""
from __future__ import annotations

from dataclasses import dataclass

from .record import Record, field

XATTR_ENTRY_ALIGN = 4

PREFIXES: dict[int, bytes] = {
    1: b"user.",
    2: b"system.posix_acl_access",
    3: b"system.posix_acl_default",
    4: b"trusted.",
    5: b"lustre.",
    6: b"security.",
}
# Nydus builders store only these (and nydusd rejects lustre)
NYDUS_PREFIXES = (1, 2, 3, 4, 6)
LONG_PREFIX_FLAG = 0x80


@dataclass
class XattrIbodyHeader(Record):
    NAME = "xattr header"
    name_filter: int = field("I")
    shared_count: int = field("B")
    reserved: bytes = field("7s", bytes(7))


@dataclass
class XattrEntry(Record):
    NAME = "xattr entry"
    name_len: int = field("B")
    name_index: int = field("B")
    value_size: int = field("H")


def split_name(name: bytes) -> tuple[int, bytes] | None:
    """(index, suffix) for a full xattr name, choosing the longest matching short prefix; None if none fits."""
    best: tuple[int, bytes] | None = None
    for idx in NYDUS_PREFIXES:
        p = PREFIXES[idx]
        if idx in (2, 3):
            if name == p:
                return idx, b""
            continue
        if name.startswith(p) and len(name) > len(p):
            if best is None or len(p) > len(PREFIXES[best[0]]):
                best = (idx, name[len(p):])
    return best


def entry_size(suffix_len: int, value_len: int) -> int:
    n = XattrEntry.rec_size() + suffix_len + value_len
    return (n + XATTR_ENTRY_ALIGN - 1) & ~(XATTR_ENTRY_ALIGN - 1)


assert XattrIbodyHeader.rec_size() == 12
assert XattrEntry.rec_size() == 4
