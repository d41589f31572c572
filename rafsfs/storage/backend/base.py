"""The interface every blob backend implements: ranged reads of a blob object."""
from __future__ import annotations

import contextlib
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from ...errors import BlobUnavailable

_HEX64 = re.compile(r"[0-9a-f]{64}")
_cap = threading.local()


def check_blob_id(blob_id: str) -> str:
    """A blob id becomes a file name or a URL path: accept only 64 lowercase hex digits."""
    if not _HEX64.fullmatch(blob_id):
        raise BlobUnavailable(f"invalid blob id {blob_id!r}")
    return blob_id


@dataclass(frozen=True)
class BlobRef:
    """Names one blob for a backend: its content id (hex sha256) or, for plain EROFS devices whose slot carries
    no id, its device index."""

    blob_id: str
    device_index: int

    @property
    def name(self) -> str:
        return self.blob_id or f"device #{self.device_index + 1}"


class BlobBackend(ABC):
    """Reads byte ranges of blobs.  Implementations raise :class:`BlobUnavailable` on any failure."""

    @abstractmethod
    def read(self, blob: BlobRef, offset: int, size: int) -> bytes:
        """Exactly ``size`` bytes at ``offset`` (fewer only if the blob ends first)."""

    @abstractmethod
    def size(self, blob: BlobRef) -> int:
        """The blob object's size in bytes."""

    def close(self) -> None:
        pass


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
