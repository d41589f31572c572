"""The cache directory as a whole: list its entries, and evict whole blobs not in use (least recently used first).

Used by the chunk cache to keep under its size cap and by ``rafsfs cache ls|gc``.

Beside the entries lies one ``<blob id>.blob.meta`` per blob whose metadata was read from the backend
(:mod:`rafsfs.storage.meta`), shared by every entry of that blob id (one per chunk table).  Its bytes are counted
once, with the entry of that blob id that eviction would reach last (an entry in use, else the most recently used),
and it is deleted when the last entry of its blob id is removed.  A metadata file with no entry at all (its daemon
stopped before it made one, or a crash between two unlinks) is garbage: counted in :func:`usage` and removed first by
:func:`evict`.  A daemon that saves the file just before making its entry can lose it to a concurrent eviction; it
then fetches the metadata again at its next start, nothing worse.
"""
from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import time
from dataclasses import dataclass

from ..meta import META_SUFFIX
from .blob_file import DATA_SUFFIX, MAP_SUFFIX, blob_id_of, entries_of, read_ready

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheEntry:
    name: str  # entry name: <blob id>.<table key> (see blob_file), or the blob id alone for older entries
    chunks_total: int
    chunks_ready: int
    disk_bytes: int  # allocated bytes of data + map (+ meta_bytes)
    last_used: float  # epoch seconds
    in_use: bool  # a process holds it open
    meta_bytes: int = 0  # allocated bytes of the blob's saved metadata, when this entry carries them (see above)

    @property
    def blob_id(self) -> str:
        return blob_id_of(self.name)

    def as_dict(self) -> dict:
        return {"blob": self.blob_id, "entry": self.name, "chunks_ready": self.chunks_ready,
                "chunks_total": self.chunks_total, "disk_bytes": self.disk_bytes, "last_used": self.last_used,
                "in_use": self.in_use, "meta_bytes": self.meta_bytes}


@dataclass(frozen=True)
class OrphanMeta:
    """A saved ``<blob id>.blob.meta`` with no entry of its blob id beside it, or the temporary file of a metadata
    write that never finished (its writer was killed: ``.<blob id>.blob.meta.*.tmp``, older than
    :data:`TEMP_GRACE`)."""
    blob_id: str
    disk_bytes: int
    last_used: float  # mtime: when it was saved
    file_name: str = ""  # in the work dir; "" = ``<blob id>.blob.meta``

    @property
    def path_name(self) -> str:
        return self.file_name or self.blob_id + META_SUFFIX


TEMP_GRACE = 600.0  # seconds: a metadata write's temporary file older than this was abandoned (a write takes ms)


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


def _scan(work_dir: str) -> tuple[list[CacheEntry], list[OrphanMeta]]:
    """The entries of ``work_dir``, least recently used first, and the metadata files no entry goes with."""
    try:
        names = os.listdir(work_dir)
    except FileNotFoundError:
        return [], []
    out = []
    metas = {}
    temps = []
    for fn in names:
        if fn.endswith(META_SUFFIX):
            metas[fn[:-len(META_SUFFIX)]] = fn
            continue
        if fn.startswith(".") and fn.endswith(".tmp") and META_SUFFIX + "." in fn:
            temps.append(fn)
            continue
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
    carrier = {}  # blob id -> index of the entry eviction reaches last: in use, else the most recently used
    for i, e in enumerate(out):
        j = carrier.get(e.blob_id)
        if j is None or e.in_use or not out[j].in_use:
            carrier[e.blob_id] = i
    for blob_id, i in carrier.items():
        fn = metas.pop(blob_id, None)
        if fn is not None:
            n = _allocated(os.path.join(work_dir, fn))
            out[i] = dataclasses.replace(out[i], disk_bytes=out[i].disk_bytes + n, meta_bytes=n)
    orphans = []
    for blob_id, fn in metas.items():
        try:
            st = os.lstat(os.path.join(work_dir, fn))
        except OSError:
            continue
        orphans.append(OrphanMeta(blob_id, st.st_blocks * 512, st.st_mtime))
    now = time.time()
    for fn in temps:
        try:
            st = os.lstat(os.path.join(work_dir, fn))
        except OSError:
            continue
        if now - st.st_mtime > TEMP_GRACE:
            orphans.append(OrphanMeta(fn[1:].split(META_SUFFIX, 1)[0], st.st_blocks * 512, st.st_mtime, fn))
    orphans.sort(key=lambda o: o.last_used)
    return out, orphans


def list_entries(work_dir: str) -> list[CacheEntry]:
    """Every blob entry in ``work_dir``, least recently used first (saved blob metadata counted as above)."""
    return _scan(work_dir)[0]


def orphan_metas(work_dir: str) -> list[OrphanMeta]:
    """Saved blob metadata files in ``work_dir`` that no entry goes with, oldest first."""
    return _scan(work_dir)[1]


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
    finally:
        os.close(fd)
    blob_id = blob_id_of(name)
    if not entries_of(work_dir, blob_id):
        _unlink(os.path.join(work_dir, blob_id + META_SUFFIX))  # the blob's last entry: its metadata goes too
    return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def usage(work_dir: str) -> int:
    """Allocated bytes of every entry and every saved blob metadata file in ``work_dir``."""
    entries, orphans = _scan(work_dir)
    return sum(e.disk_bytes for e in entries) + sum(o.disk_bytes for o in orphans)


def evict(work_dir: str, max_bytes: int | None = None) -> list[CacheEntry]:
    """Remove entries not in use, least recently used first, until the directory holds at most ``max_bytes``
    (``None``: remove every entry not in use).  Metadata files without an entry (and abandoned temporary files of
    metadata writes) go first, and a blob's metadata file goes with its last entry.  Returns the removed entries."""
    entries, orphans = _scan(work_dir)
    total = sum(e.disk_bytes for e in entries) + sum(o.disk_bytes for o in orphans)
    for o in orphans:
        if max_bytes is not None and total <= max_bytes:
            break
        _unlink(os.path.join(work_dir, o.path_name))
        total -= o.disk_bytes
        log.info("cache: removed %s of blob %s, which has no entry (%d bytes)",
                 "an abandoned metadata write" if o.file_name else "metadata", o.blob_id, o.disk_bytes)
    removed = []
    for e in entries:
        if max_bytes is not None and total <= max_bytes:
            break
        if not e.in_use and remove_entry(work_dir, e.name):
            removed.append(e)
            freed = e.disk_bytes
            if e.meta_bytes and os.path.exists(os.path.join(work_dir, e.blob_id + META_SUFFIX)):
                freed -= e.meta_bytes  # another entry of the blob (one that became busy meanwhile) keeps it
            total -= freed
            log.info("cache: evicted blob %s (%d bytes)", e.name, freed)
    return removed
