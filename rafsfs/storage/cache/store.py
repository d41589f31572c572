"""The cache directory as a whole: list its entries, and evict whole blobs not in use (least recently used first).

Used by the chunk cache to keep under its size cap and by ``rafsfs cache ls|gc``.
"""
from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass

from ..meta import META_SUFFIX
from .blob_file import DATA_SUFFIX, MAP_SUFFIX, blob_id_of, entries_of, read_ready

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheEntry:
    name: str  # entry name: <blob id>.<table key> (see blob_file), or the blob id alone for older entries
    chunks_total: int
    chunks_ready: int
    disk_bytes: int  # allocated bytes of data + map
    last_used: float  # epoch seconds
    in_use: bool  # a process holds it open

    @property
    def blob_id(self) -> str:
        return blob_id_of(self.name)

    def as_dict(self) -> dict:
        return {"blob": self.blob_id, "entry": self.name, "chunks_ready": self.chunks_ready,
                "chunks_total": self.chunks_total, "disk_bytes": self.disk_bytes, "last_used": self.last_used,
                "in_use": self.in_use}


def _busy(map_path: str) -> bool:
    try:
        fd = os.open(map_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _allocated(path: str) -> int:
    try:
        return os.lstat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def list_entries(work_dir: str) -> list[CacheEntry]:
    """Every blob entry in ``work_dir``, least recently used first."""
    try:
        names = os.listdir(work_dir)
    except FileNotFoundError:
        return []
    out = []
    for fn in names:
        if not fn.endswith(MAP_SUFFIX):
            continue
        name = fn[:-len(MAP_SUFFIX)]
        map_path = os.path.join(work_dir, fn)
        try:
            st = os.lstat(map_path)
            total, ready = read_ready(map_path) or (0, 0)  # a map of another version counts as empty
        except OSError:
            continue
        out.append(CacheEntry(name, total, ready, _allocated(map_path)
                              + _allocated(os.path.join(work_dir, name + DATA_SUFFIX)),
                              st.st_mtime, _busy(map_path)))
    out.sort(key=lambda e: e.last_used)
    return out


def remove_entry(work_dir: str, name: str) -> bool:
    """Delete one entry unless some process has it open.  True if it was removed."""
    map_path = os.path.join(work_dir, name + MAP_SUFFIX)
    try:
        fd = os.open(map_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        # the data file first, the map (whose lock we hold) last: an opener that comes in between finds the old
        # map, waits for our lock, sees it unlinked and starts over.  (Map first, an opener in between would make
        # a new map over the old data file, then lose that file to our second unlink.)  A crash between the two
        # leaves a map without its data file, which the next opener resets.
        for path in (os.path.join(work_dir, name + DATA_SUFFIX), map_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        _drop_meta(work_dir, blob_id_of(name))
        return True
    finally:
        os.close(fd)


def _drop_meta(work_dir: str, blob_id: str) -> None:
    """A blob's saved metadata (:mod:`..meta`) goes with its last entry: else it would stay forever, outside the
    size cap.  (A process that saves it again meanwhile only fetches it once more at its next start.)"""
    if entries_of(work_dir, blob_id):
        return
    try:
        os.unlink(os.path.join(work_dir, blob_id + META_SUFFIX))
    except FileNotFoundError:
        pass


def usage(work_dir: str) -> int:
    return sum(e.disk_bytes for e in list_entries(work_dir))


def evict(work_dir: str, max_bytes: int | None = None) -> list[CacheEntry]:
    """Remove entries not in use, least recently used first, until the directory holds at most ``max_bytes``
    (``None``: remove every entry not in use).  Returns the removed entries."""
    entries = list_entries(work_dir)
    total = sum(e.disk_bytes for e in entries)
    removed = []
    for e in entries:
        if max_bytes is not None and total <= max_bytes:
            break
        if not e.in_use and remove_entry(work_dir, e.name):
            removed.append(e)
            total -= e.disk_bytes
            log.info("cache: evicted blob %s (%d bytes)", e.name, e.disk_bytes)
    return removed
