"""The interface every blob backend implements: ranged reads of a blob object."""
from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ...blob import BlobRef, check_blob_id  # noqa: F401  (backends import them from here too)

if TYPE_CHECKING:
    from ...config import RegistryConfig

_cap = threading.local()


class BlobBackend(ABC):
    """Reads byte ranges of blobs.  Implementations raise :class:`BlobUnavailable` on any failure."""

    is_local = False  # True: blobs are local files (a read never waits on the network)

    @abstractmethod
    def read(self, blob: BlobRef, offset: int, size: int) -> bytes:
        """Exactly ``size`` bytes at ``offset`` (fewer only if the blob ends first)."""

    @abstractmethod
    def size(self, blob: BlobRef) -> int:
        """The blob object's size in bytes."""

    @property
    @abstractmethod
    def identity(self) -> str:
        """Where this backend's bytes come from (a registry repository, local files): cache entries whose bytes
        cannot be verified are keyed by it (``storage.cache.blob_file.table_key``), so they are never shared with
        a reader of another source."""

    def prepare(self) -> None:
        """Do now the one-time set-up a first read would do (imports, sessions); no network."""

    def close(self) -> None:
        pass


def registry_identity(cfg: "RegistryConfig") -> str:
    """A registry backend's :attr:`BlobBackend.identity` (known before the backend is built)."""
    return f"registry:{cfg.scheme}://{cfg.host}/{cfg.repo}"


@contextlib.contextmanager
def deadline_cap(seconds: float) -> Iterator[None]:
    """Backend operations this thread starts inside the block take at most ``seconds`` each, whatever the
    backend's own deadline (a mount's probe of its blobs must not wait as long as a read may)."""
    old = getattr(_cap, "seconds", None)
    _cap.seconds = seconds if old is None else min(old, seconds)
    try:
        yield
    finally:
        _cap.seconds = old


def current_deadline_cap() -> float | None:
    """The cap :func:`deadline_cap` set for this thread, if any."""
    return getattr(_cap, "seconds", None)
