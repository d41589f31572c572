"""Blobs in a local directory, named by their id (``DIR/<blob-id>``), or explicit device files."""
from __future__ import annotations

import os
import threading

from ...errors import BlobUnavailable
from ...blob import BlobRef, check_blob_id
from .base import BlobBackend


class LocalFsBackend(BlobBackend):
    """``blob_dir`` holds blobs named by id; ``devices`` lists files bound to device slots in order (like the
    kernel's ``-o device=``), used for images whose slots carry no id (``mkfs.erofs --blobdev``)."""

    is_local = True

    def __init__(self, blob_dir: str | None = None, devices: list[str] | None = None):
        self.blob_dir = blob_dir
        self.devices = list(devices or [])
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def identity(self) -> str:
        return "localfs:" + ":".join(os.path.realpath(p) for p in ([self.blob_dir] if self.blob_dir else [])
                                     + self.devices)

    def path(self, blob: BlobRef) -> str:
        if blob.device_index < len(self.devices):
            return self.devices[blob.device_index]
        if blob.blob_id and self.blob_dir is not None:
            return os.path.join(self.blob_dir, check_blob_id(blob.blob_id))
        if not blob.blob_id:
            raise BlobUnavailable(f"no file given for {blob.name} (pass it with --device)")
        raise BlobUnavailable(f"no blob directory given for blob {blob.blob_id}")

    def _fd(self, blob: BlobRef) -> int:
        path = self.path(blob)
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    raise BlobUnavailable(f"blob {blob.name}: cannot open {path}: {e.strerror}") from None
                self._fds[path] = fd
            return fd

    def read(self, blob: BlobRef, offset: int, size: int) -> bytes:
        fd = self._fd(blob)
        if offset < 0 or size < 0 or offset + size > 1 << 62:
            raise BlobUnavailable(f"blob {blob.name}: invalid range {offset}+{size}")
        try:
            return os.pread(fd, size, offset)
        except (OSError, OverflowError, MemoryError) as e:
            raise BlobUnavailable(f"blob {blob.name}: read of {size} bytes at {offset} failed: {e}") from None

    def size(self, blob: BlobRef) -> int:
        return os.fstat(self._fd(blob)).st_size

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
