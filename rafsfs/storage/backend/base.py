"""The interface every blob backend implements: ranged reads of a blob object."""
from __future__ import annotations

from abc import ABC, abstractmethod

from ...blob import BlobRef, check_blob_id  # noqa: F401  (backends import them from here too)


class BlobBackend(ABC):
    """Reads byte ranges of blobs.  Implementations raise :class:`BlobUnavailable` on any failure."""

    is_local = False  # True: blobs are local files (a read never waits on the network)

    @abstractmethod
    def read(self, blob: BlobRef, offset: int, size: int) -> bytes:
        """Exactly ``size`` bytes at ``offset`` (fewer only if the blob ends first)."""

    @abstractmethod
    def size(self, blob: BlobRef) -> int:
        """The blob object's size in bytes."""

    def close(self) -> None:
        pass
