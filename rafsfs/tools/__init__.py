"""The library behind the command-line tools (inspect, ls, cat, extract, check), and what they share."""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import BinaryIO, TextIO

from ..errors import BadImage, IsADirectory, RafsError
from ..format.inode import LAYOUT_CHUNK_BASED
from ..blob import HOLE
from ..image import Inode, RafsImage
from ..storage.source import ChunkSource

log = logging.getLogger(__name__)

PIECE = 1 << 20  # file data is read this much at a time ...
MAX_PIECE = 16 << 20  # ... or one whole chunk, so that no chunk is fetched and decompressed twice


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_name(name: bytes, path: bytes) -> None:
    """Reject a directory entry name no filesystem can hold (the reader already rejects '/' and empty names)."""
    if b"\0" in name or name in (b".", b".."):
        raise BadImage(f"invalid entry name {name!r} in {os.fsdecode(path)}")


def require_source(image: RafsImage, source: ChunkSource | None) -> None:
    """A command that reads file data needs a blob source whenever the image keeps data outside the bootstrap."""
    if source is None and image.blobs:
        what = "blob" if image.nydus else "extra device"
        raise RafsError(f"this image keeps file data in {len(image.blobs)} {what}(s): "
                        "give --blob-dir DIR or --device FILE")


def regular_file(image: RafsImage, path: str) -> Inode:
    """The inode of a regular file, by path (links are not followed)."""
    ino = image.resolve(path)
    if ino.is_dir():
        raise IsADirectory(f"{path}: is a directory")
    if ino.is_symlink():
        target = os.fsdecode(image.readlink(ino))
        raise RafsError(f"{path}: is a symbolic link to {target} (links inside the image are not followed)")
    if not ino.is_reg():
        raise RafsError(f"{path}: not a regular file")
    return ino


def piece_size(image: RafsImage, ino: Inode) -> int:
    if ino.layout == LAYOUT_CHUNK_BASED:
        return min(max(image.chunk_size_of(ino), PIECE), MAX_PIECE)
    return PIECE


def file_pieces(image: RafsImage, ino: Inode,
                source: ChunkSource | None) -> Iterator[tuple[int, int, bytes | None]]:
    """(offset, length, data) covering a regular file in order; data is None for a piece that is entirely a hole."""
    step = piece_size(image, ino)
    for off in range(0, ino.size, step):
        n = min(step, ino.size - off)
        if all(s.chunk.blob_index == HOLE for s in image.map_range(ino, off, n, source)):
            yield off, n, None
            continue
        data = image.read(ino, off, n, source)
        if len(data) != n:
            raise BadImage(f"inode {ino.nid}: read {len(data)} bytes at offset {off}, expected {n}")
        yield off, n, data


def cat(image: RafsImage, path: str, source: ChunkSource | None, out: BinaryIO) -> int:
    """Write a regular file's bytes to ``out`` piece by piece; returns the byte count."""
    ino = regular_file(image, path)
    for _off, n, data in file_pieces(image, ino, source):
        out.write(bytes(n) if data is None else data)
    return ino.size


def clear_progress() -> None:
    """Erase the progress line, if one is showing, so a message can be printed (it comes back on the next update)."""
    if Progress.active is not None:
        Progress.active.close()


class Progress:
    """Progress on stderr: one line rewritten in place when stderr is a terminal, else an INFO log line every
    ``interval`` seconds.  Silent when INFO logging is off.  Use as a context manager so the line is cleared."""

    active: "Progress | None" = None  # the one whose line is on the terminal now

    def __init__(self, what: str, total: int | None = None, *, stream: TextIO | None = None):
        self.what = what
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = log.isEnabledFor(logging.INFO)
        try:
            self.tty = self.stream.isatty()
        except ValueError:  # closed stream
            self.tty = self.enabled = False
        self.interval = 0.2 if self.tty else 10.0
        self.start = self.last = time.monotonic()
        self._shown = False

    def update(self, done: int, *, files: int | None = None, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        now = time.monotonic()
        if not self.enabled or now - self.last < self.interval:
            return
        self.last = now
        parts = [f"{self.what}:"]
        if self.total:
            parts.append(f"{min(100.0, 100.0 * done / self.total):5.1f}%")
        parts.append(format_bytes(done))
        if files is not None:
            parts.append(f"{files} files")
        parts.append(f"{format_bytes(done / max(now - self.start, 1e-6))}/s")
        text = " ".join(parts)
        if self.tty:
            self.stream.write("\r" + text + "\033[K")
            self.stream.flush()
            self._shown = True
            Progress.active = self
        else:
            log.info("%s", text)

    def close(self) -> None:
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False
            Progress.active = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
