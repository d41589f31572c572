"""A backend built on its first use (or on :meth:`LazyBackend.prepare`).

Building the registry backend imports an HTTP stack (``requests``, ``urllib3``: ~90 ms of a daemon's ~0.5 s start
on this project's 2-core bench machine) that a mount does not need before it is in place: the kernel serves
metadata from the bootstrap, and the chunk cache opens its entries from the blob's chunk table.  A daemon that must
report "mounted" early (under nydus-snapshotter) builds it after the mount, or in a thread while the runtime sets the
container up; a read that comes first builds it itself (one build, under a lock).
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from ...errors import BlobUnavailable
from .base import BlobBackend, BlobRef


class LazyBackend(BlobBackend):
    """``build()`` makes the real backend once; ``identity`` and ``is_local`` are given, so asking for them never
    builds it."""

    def __init__(self, build: Callable[[], BlobBackend], identity: str, is_local: bool = False):
        self._build = build
        self._identity = identity
        self.is_local = is_local
        self._backend: BlobBackend | None = None
        self._closed = False
        self._lock = threading.Lock()

    def _get(self) -> BlobBackend:
        backend = self._backend
        if backend is None:
            with self._lock:
                if self._closed:  # never built, and closed: a read racing close() builds nothing
                    raise BlobUnavailable("the blob backend is closed")
                if self._backend is None:
                    self._backend = self._build()
                backend = self._backend
        return backend

    def prepare(self) -> None:
        self._get()

    @property
    def identity(self) -> str:
        return self._identity

    def read(self, blob: BlobRef, offset: int, size: int) -> bytes:
        return self._get().read(blob, offset, size)

    def size(self, blob: BlobRef) -> int:
        return self._get().size(blob)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            backend = self._backend
        if backend is not None:
            backend.close()
