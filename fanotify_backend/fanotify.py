"""fanotify(7) for pre-content events: the syscalls (ctypes), the constants, and the event and response records.

Debian 12's headers predate pre-content events (Linux 6.14), so the values are written here, from
``include/uapi/linux/fanotify.h`` (``../shared/spec/fanotify-precontent.md`` §2).  ctypes rather than a compiled
module: three syscalls and fixed little-endian records need nothing more, and ctypes releases the GIL around each
call (a ``read`` blocked on the group does not stop the daemon's other threads).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from dataclasses import dataclass

# fanotify_init flags
FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_PRE_CONTENT = 0x8
# event mask
FAN_PRE_ACCESS = 0x00100000
# fanotify_mark flags
FAN_MARK_ADD = 0x1
FAN_MARK_REMOVE = 0x2
FAN_MARK_FLUSH = 0x80
FAN_MARK_INODE = 0x0
FAN_MARK_IGNORE = 0x400
# records
FANOTIFY_METADATA_VERSION = 3
FAN_EVENT_INFO_TYPE_RANGE = 6
FAN_NOFD = -1
# responses
FAN_ALLOW = 0x1
FAN_DENY = 0x2
FAN_ERRNO_SHIFT = 24

AT_FDCWD = -100

METADATA = struct.Struct("<IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
INFO_HEADER = struct.Struct("<BBH")  # info_type, pad, len
RANGE = struct.Struct("<BBHIQQ")  # header, pad, offset, count
RESPONSE = struct.Struct("<iI")  # fd, response
EVENT_SIZE = METADATA.size + RANGE.size  # 48: a pre-content event with its range record

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
_libc.fanotify_mark.restype = ctypes.c_int
_libc.read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_libc.read.restype = ctypes.c_ssize_t


def deny_errno(e: int) -> int:
    """``FAN_DENY_ERRNO(e)``: the reader gets ``e`` (the kernel accepts EIO, EPERM, EBUSY, ETXTBSY, EAGAIN, ENOSPC,
    EDQUOT)."""
    return FAN_DENY | ((e & 0xFF) << FAN_ERRNO_SHIFT)


DENY_EIO = deny_errno(errno.EIO)


def _raise(what: str) -> None:
    e = ctypes.get_errno()
    raise OSError(e, f"{what}: {os.strerror(e)}")


def init(flags: int = FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC,
         event_f_flags: int = os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC) -> int:
    """A new group's descriptor.  Event fds get ``event_f_flags`` (``O_CLOEXEC``: they never leak into children)."""
    fd = _libc.fanotify_init(flags, event_f_flags)
    if fd < 0:
        _raise("fanotify_init")
    return fd


def mark(group: int, flags: int, mask: int, path: str | None, dirfd: int = AT_FDCWD) -> None:
    if _libc.fanotify_mark(group, flags, mask, dirfd, os.fsencode(path) if path is not None else None) < 0:
        _raise(f"fanotify_mark {path}")


def add_mark(group: int, path: str) -> None:
    """An inode mark for pre-content events on ``path`` (not evictable: it pins the inode until removed)."""
    mark(group, FAN_MARK_ADD | FAN_MARK_INODE, FAN_PRE_ACCESS, path)


def remove_mark(group: int, path: str) -> None:
    mark(group, FAN_MARK_REMOVE | FAN_MARK_INODE, FAN_PRE_ACCESS, path)


def read_into(group: int, address: int, size: int) -> int:
    """``read(2)`` of whole events straight into memory at ``address`` (a shared journal page: the kernel writes the
    records there before the call returns).  Returns the byte count."""
    n = _libc.read(group, address, size)
    if n < 0:
        _raise("read fanotify group")
    return n


@dataclass(frozen=True)
class Event:
    fd: int  # the event's fd number in the reading process (also how the answer names it)
    pid: int
    mask: int
    offset: int  # the range record (0, 0 when the event has none)
    count: int


def parse(buf: bytes | memoryview) -> list[Event]:
    """The events in a buffer filled by ``read``; stops at a zero or malformed header (the rest of a zeroed page)."""
    out: list[Event] = []
    pos = 0
    mv = memoryview(buf)
    while pos + METADATA.size <= len(mv):
        event_len, vers, _, meta_len, mask, fd, pid = METADATA.unpack_from(mv, pos)
        if event_len < METADATA.size or vers != FANOTIFY_METADATA_VERSION or pos + event_len > len(mv) \
                or meta_len < METADATA.size or meta_len > event_len:
            break
        offset = count = 0
        ipos = pos + meta_len
        while ipos + INFO_HEADER.size <= pos + event_len:
            itype, _, ilen = INFO_HEADER.unpack_from(mv, ipos)
            if ilen < INFO_HEADER.size or ipos + ilen > pos + event_len:
                break
            if itype == FAN_EVENT_INFO_TYPE_RANGE and ilen >= RANGE.size:
                _, _, _, _, offset, count = RANGE.unpack_from(mv, ipos)
            ipos += ilen
        out.append(Event(fd, pid, mask, offset, count))
        pos += event_len
    return out


def respond(group: int, fd: int, response: int) -> bool:
    """Answer the pending event numbered ``fd``.  False when the group has no such pending event (ENOENT: it was
    answered already); other errors raise."""
    try:
        os.write(group, RESPONSE.pack(fd, response))
        return True
    except FileNotFoundError:
        return False
