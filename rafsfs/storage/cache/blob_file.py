"""One blob's entry in the cache directory: the data file in the blob's uncompressed layout and its ready map.

  ``<name>.blob.data``   sparse file; chunk i's bytes at its uncompressed offset (the layout fscache wants too)
  ``<name>.chunk_map``   one byte per chunk-info index: 1 = the bytes in ``.blob.data`` are verified

A process using an entry holds a shared ``flock`` on its map file; eviction takes the lock exclusively, so an entry in
use by any process is never removed.  The map file's mtime records when the entry was last opened.
"""
from __future__ import annotations

import errno
import fcntl
import os

from ...errors import BlobUnavailable
from ...blob import BlobInfo, check_blob_id

DATA_SUFFIX = ".blob.data"
MAP_SUFFIX = ".chunk_map"


def entry_name(blob: BlobInfo) -> str:
    return check_blob_id(blob.blob_id) if blob.blob_id else f"device{blob.index}"


def _open_locked(path: str, flags: int) -> int:
    """Open ``path`` and take a shared lock, retrying if an evictor unlinked it between the two steps."""
    for _ in range(8):
        fd = os.open(path, flags, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise BlobUnavailable(f"cache entry {path} keeps disappearing")


class BlobCacheFile:
    """Cache file + ready map of one blob, held open (and locked shared) while in use."""

    def __init__(self, work_dir: str, blob: BlobInfo):
        name = entry_name(blob)
        self.name = name
        self.data_path = os.path.join(work_dir, name + DATA_SUFFIX)
        self.map_path = os.path.join(work_dir, name + MAP_SUFFIX)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            self.map_fd = _open_locked(self.map_path, flags)
        except OSError as e:
            raise BlobUnavailable(f"cannot open cache file {self.map_path}: {e.strerror}") from None
        n = max(blob.chunk_count, 1)
        try:
            # without O_CREAT first: a map whose data file is gone (deleted, or a crash between the two unlinks of
            # an eviction) must not keep its ready bytes over a fresh, all-zero data file
            fresh = False
            try:
                self.data_fd = os.open(self.data_path, flags & ~os.O_CREAT)
            except FileNotFoundError:
                self.data_fd = os.open(self.data_path, flags, 0o600)
                fresh = True
        except OSError as e:
            os.close(self.map_fd)
            raise BlobUnavailable(f"cannot open cache file {self.data_path}: {e.strerror}") from None
        os.utime(self.map_fd)  # last use, for eviction order
        short = bool(blob.uncompressed_size) and os.fstat(self.data_fd).st_size < blob.uncompressed_size
        if fresh or short or os.fstat(self.map_fd).st_size != n:
            # a new entry, a data file cut short, or a map of another layout: start over (data, then the map)
            os.ftruncate(self.data_fd, 0)
            os.ftruncate(self.map_fd, 0)
            os.ftruncate(self.map_fd, n)
        if blob.uncompressed_size and os.fstat(self.data_fd).st_size < blob.uncompressed_size:
            os.ftruncate(self.data_fd, blob.uncompressed_size)
        self.ready = bytearray(os.pread(self.map_fd, n, 0))

    def is_ready(self, ci: int) -> bool:
        return ci < len(self.ready) and self.ready[ci] == 1

    def write_chunk(self, ci: int, offset: int, data: bytes, sync: bool = False) -> None:
        """Store a verified chunk: its bytes first, then its map byte, so a crash at any point never leaves a ready
        chunk with wrong bytes (``sync`` extends that to power loss)."""
        n = os.pwrite(self.data_fd, data, offset)
        if n != len(data):
            raise OSError(errno.ENOSPC, "short write to the cache file")
        if sync:
            os.fdatasync(self.data_fd)
        os.pwrite(self.map_fd, b"\1", ci)
        self.ready[ci] = 1

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.data_fd, size, offset)

    def close(self) -> None:
        os.close(self.data_fd)
        os.close(self.map_fd)  # releases the shared lock
