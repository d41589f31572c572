"""The cachefiles on-demand protocol: messages the kernel sends on /dev/cachefiles, the text commands written back,
and the READ completion ioctl on an object's anonymous fd.

Layouts (include/uapi/linux/cachefiles.h; native endian): a 16-byte header {msg_id, opcode, len, object_id} (u32 each),
then for OPEN {volume_key_size, cookie_key_size, fd, flags} (u32 each) and the two keys, for READ {off, len} (u64 each),
for CLOSE nothing.  See ../shared/spec/fscache-ondemand.md.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import struct
from dataclasses import dataclass

DEVICE = "/dev/cachefiles"
PAGE = 4096
MSG_BUF_SIZE = 4096  # the kernel's largest message is 1024 bytes; a smaller buffer fails with EMSGSIZE

OP_OPEN, OP_CLOSE, OP_READ = 0, 1, 2

# _IOW(0x98, 1, int) with the generic encoding (x86, arm64, riscv, s390)
IOC_READ_COMPLETE = (1 << 30) | (4 << 16) | (0x98 << 8) | 1

_HDR = struct.Struct("=IIII")
_OPEN = struct.Struct("=IIII")
_READ = struct.Struct("=QQ")


class ProtocolError(Exception):
    """A message from the kernel that does not parse (never expected; logged and skipped)."""


@dataclass(frozen=True)
class OpenMsg:
    msg_id: int
    object_id: int
    volume_key: str  # "erofs,<domain_id or fsid>"
    cookie_key: str  # the fsid (bootstrap) or the device tag / blob id (data blob)
    fd: int  # anonymous fd, already installed in our fd table
    flags: int


@dataclass(frozen=True)
class ReadMsg:
    msg_id: int
    object_id: int
    offset: int
    length: int


@dataclass(frozen=True)
class CloseMsg:
    msg_id: int
    object_id: int


Message = OpenMsg | ReadMsg | CloseMsg


def parse(buf: bytes) -> Message:
    if len(buf) < _HDR.size:
        raise ProtocolError(f"message of {len(buf)} bytes is shorter than its header")
    msg_id, opcode, length, object_id = _HDR.unpack_from(buf, 0)
    if length != len(buf):
        raise ProtocolError(f"message {msg_id}: length field {length} but {len(buf)} bytes read")
    if opcode == OP_OPEN:
        if length < _HDR.size + _OPEN.size:
            raise ProtocolError(f"OPEN {msg_id}: too short")
        vks, cks, fd, flags = _OPEN.unpack_from(buf, _HDR.size)
        start = _HDR.size + _OPEN.size
        if start + vks + cks != length:
            raise ProtocolError(f"OPEN {msg_id}: key sizes {vks}+{cks} do not fill the message")
        volume = buf[start:start + vks].rstrip(b"\0").decode("utf-8", "replace")
        cookie = buf[start + vks:start + vks + cks].decode("utf-8", "replace")
        return OpenMsg(msg_id, object_id, volume, cookie, fd, flags)
    if opcode == OP_READ:
        if length != _HDR.size + _READ.size:
            raise ProtocolError(f"READ {msg_id}: wrong length {length}")
        off, n = _READ.unpack_from(buf, _HDR.size)
        return ReadMsg(msg_id, object_id, off, n)
    if opcode == OP_CLOSE:
        return CloseMsg(msg_id, object_id)
    raise ProtocolError(f"message {msg_id}: unknown opcode {opcode}")


# ---------------------------------------------------------------------------------------------- commands
def command(devfd: int, text: str) -> None:
    """One text command (``dir``, ``tag``, ``bind``, ``copen``, ``restore``): one write(2); raises OSError."""
    os.write(devfd, text.encode())


def copen(devfd: int, msg_id: int, size_or_errno: int) -> None:
    """Answer an OPEN: the object's size (>= 1), or a negative errno to refuse it."""
    command(devfd, f"copen {msg_id},{size_or_errno}")


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.restype = ctypes.c_int


def read_complete(anon_fd: int, msg_id: int) -> None:
    """Complete a READ.  msg_id is a u32 passed by value (fcntl.ioctl would pack it as a signed int)."""
    if _libc.ioctl(anon_fd, IOC_READ_COMPLETE, msg_id) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"READ_COMPLETE {msg_id}: {os.strerror(e)}")


# ---------------------------------------------------------------------------------------------- writing data
def round_up(n: int, align: int = PAGE) -> int:
    return (n + align - 1) // align * align


def write_aligned(anon_fd: int, offset: int, data: bytes | memoryview, length: int | None = None) -> None:
    """Write ``data`` at page-aligned ``offset``, zero-padded to ``length`` (default: ``len(data)``) rounded up to a
    page, from a page-aligned buffer: the kernel writes the cache file with direct I/O."""
    write_run(anon_fd, offset, [(offset, data)], max(length if length is not None else len(data), len(data)))


def write_run(anon_fd: int, offset: int, pieces: list[tuple[int, bytes | memoryview]], length: int) -> None:
    """One write of ``length`` bytes (rounded up to a page) at page-aligned ``offset``: each (position, data) of
    ``pieces`` in place, zeros in between.  Adjacent chunks go to the kernel in one direct I/O instead of one each."""
    if offset % PAGE:
        raise ValueError(f"unaligned offset {offset}")
    total = round_up(length)
    if total == 0:
        return
    buf = mmap.mmap(-1, total)  # anonymous mappings are page-aligned and zero-filled
    try:
        for pos, data in pieces:
            if pos < offset or pos + len(data) > offset + total:
                raise ValueError(f"piece at {pos}+{len(data)} outside the run {offset}+{total}")
            buf[pos - offset:pos - offset + len(data)] = data
        view = memoryview(buf)
        try:
            done = 0
            while done < total:
                n = os.pwrite(anon_fd, view[done:], offset + done)
                if n <= 0:
                    raise OSError(5, "short write into the cache file")
                done += n
        finally:
            view.release()
    finally:
        buf.close()
