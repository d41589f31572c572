"""The steps every build shares: codec and chunk-size checks, the file-data sink that cuts files into chunks for a
blob writer, and writing the bootstrap with its errors turned into :class:`BuildError`."""
from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

from ..compression import COMPRESSOR_BY_NAME, DIGESTER_BY_NAME
from ..errors import BuildError
from .blob_writer import BlobWriter
from .bootstrap_writer import BlobPart, write_bootstrap
from .tree import Node


def check_codecs(compressor: str, digester: str, chunk_size: int) -> tuple[int, int]:
    """The on-disk compressor and digester ids for these names; a bad name or chunk size is a BuildError."""
    comp = COMPRESSOR_BY_NAME.get(compressor)
    if comp is None or compressor == "gzip":
        raise BuildError(f"unknown compressor {compressor!r} (zstd, lz4 or none)")
    dig = DIGESTER_BY_NAME.get(digester)
    if dig is None:
        raise BuildError(f"unknown digester {digester!r} (blake3 or sha256)")
    if chunk_size < 4096 or chunk_size > 16 << 20 or chunk_size & (chunk_size - 1):
        raise BuildError(f"chunk size {chunk_size} must be a power of two between 4 KiB and 16 MiB")
    return comp, dig


def _read_full(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    while data and len(data) < n:
        more = f.read(n - len(data))
        if not more:
            break
        data += more
    return data


class FileChunker:
    """The sink a tree scan calls with each regular file's data: cuts it into chunks for ``writer`` and counts.
    ``on_file(node, bytes read)`` follows every file (progress, bookkeeping)."""

    def __init__(self, writer: BlobWriter, chunk_size: int, what: str = "file",
                 on_file: Callable[[Node, int], None] | None = None):
        self.writer = writer
        self.chunk_size = chunk_size
        self.what = what
        self.on_file = on_file
        self.files = 0
        self.bytes = 0

    def __call__(self, node: Node, f: BinaryIO) -> None:
        self.files += 1
        read = 0
        while True:
            data = _read_full(f, self.chunk_size)  # chunk j must start at j * chunk size: never a short read
            if not data:
                break
            read += len(data)
            self.writer.add_chunk(data, node.chunks)
        if read != node.size:
            raise BuildError(f"{self.what} changed while reading: expected {node.size} bytes, read {read}")
        self.bytes += read
        if self.on_file:
            self.on_file(node, read)


def write_bootstrap_checked(path: str, root: Node, *, chunk_size: int, compressor: int, digester: int,
                            blobs: list[BlobPart], prefetch: list[bytes]) -> int:
    """:func:`write_bootstrap`, with I/O and layout errors as one-line BuildErrors.  Returns the inode count."""
    try:
        return write_bootstrap(path, root, chunk_size=chunk_size, compressor=compressor, digester=digester,
                               blobs=blobs, prefetch=prefetch)
    except OSError as e:
        raise BuildError(f"cannot write bootstrap {path}: {e.strerror}") from None
    except ValueError as e:
        raise BuildError(str(e)) from None
