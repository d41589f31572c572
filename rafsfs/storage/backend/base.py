"""The interface every blob backend implements: ranged reads of a blob object."""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

from ...errors import BlobUnavailable

_HEX64 = re.compile(r"[0-9a-f]{64}")


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
