"""One cache entry: a blob's bytes in their uncompressed layout, and the ready map saying which of them are stored.

An entry belongs to one blob id *and one chunk table*: its name is ``<blob id>.<key>``, ``key`` being 16 hex digits
of :func:`table_key` (a sha256 over every chunk's location, size and digest, plus the backend's identity when the
bytes cannot be verified).  Why not the blob id alone, with the expected digest stored per ready chunk?  A stamp per
chunk can tell a reader that a chunk was verified against *its* digest, but two images that describe one blob id
differently (a crafted image naming a popular layer's id, or a benign one disagreeing on the chunk count) would
still write their chunks over each other's bytes in one data file, and in the kernel modes the kernel reads that
file directly, with no stamp to look at.  With the table in the name every byte of a data file belongs to exactly
one table; images that agree on the table (the normal case: one layer used by many images) still share one entry
and fetch each chunk once, whatever registry or mirror each of them reads from, because every chunk is checked
against the table's digests before it is stored.

Files of entry ``<name>``:

  ``<name>.blob.data``   exactly the blob in its uncompressed layout (sparse): chunk i's bytes at its uncompressed
                         offset, nothing else (the kernel reads it as ``device=`` in fanotify mode)
  ``<name>.chunk_map``   a 64-byte header, then one byte per chunk-info index: 1 = the chunk's bytes are in
                         ``.blob.data`` and (in a verified entry) matched the table's digest

  header (little-endian): 8s magic ``RAFSCMAP`` | u32 version (1) | u32 flags (bit 0: verified entry) |
                          u64 chunk count | u64 uncompressed size | 32s table key

Locks: a process using an entry holds a shared ``flock`` on its map file; eviction takes it exclusively (never
blocking), so an entry in use is never removed.  Creating or resetting an entry is done under the exclusive lock,
then downgraded to shared; an entry whose header does not match while other processes hold it is never reset
under them (:class:`EntryBusy`: the opener reads that blob directly instead).  The map file's mtime records when
the entry was last opened.

Durability: a chunk's bytes are written first and its map byte only after ``fdatasync`` of the data file
(:meth:`BlobCacheFile.commit`, once per fetched batch), so neither a crash nor a power loss can leave a chunk marked
ready over a hole or half-written bytes.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
import time

from ...blob import BlobInfo, check_blob_id
from ...errors import BlobUnavailable
from ..meta import BlobMeta

DATA_SUFFIX = ".blob.data"
MAP_SUFFIX = ".chunk_map"
HEADER = struct.Struct("<8sIIQQ32s")
MAGIC = b"RAFSCMAP"
VERSION = 1
F_VERIFIED = 1
KEY_HEX = 16  # hex digits of the table key in entry names (the whole key is in the header and compared)
BUSY_TRIES = 4  # looks at an entry that does not match under another process's lock before it counts as in use
BUSY_WAIT = 0.01  # seconds before the next look, times the looks so far (0.06 s in all)
_KEY_DOMAIN = b"rafsfs cache entry v1\0"


class EntryBusy(BlobUnavailable):
    """The entry exists with other content and other processes are using it: it is not reset under them."""


def table_key(meta: BlobMeta, verify: bool, backend_identity: str) -> tuple[bytes, bool]:
    """(key, verified) of the entry for the chunk table ``meta`` describes: a sha256 over the blob's geometry and
    every chunk's compressed and uncompressed location, size and digest (:meth:`BlobMeta.fingerprint`, computed
    once per blob from storage's own metadata, whichever way the image recorded it).  ``verified`` is True when
    ``verify`` is on and every chunk has a digest; otherwise the bytes are only as good as where they came from, and
    ``backend_identity`` joins the key (such an entry is never shared with another registry, nor with a verifying
    reader)."""
    fingerprint, all_digests = meta.fingerprint()
    h = hashlib.sha256(_KEY_DOMAIN)
    h.update(fingerprint)
    verified = verify and all_digests
    if not verified:
        h.update(b"unverified\0" + backend_identity.encode())
    return h.digest(), verified


def entry_name(blob: BlobInfo, key: bytes) -> str:
    return f"{check_blob_id(blob.blob_id)}.{key.hex()[:KEY_HEX]}"


def blob_id_of(name: str) -> str:
    """The blob id of an entry name (entries of older versions are named by the blob id alone)."""
    return name.split(".", 1)[0]


def ready_map(map_path: str) -> bytes | None:
    """The ready bytes of a map file (one per chunk), or None if it is not a map of this version."""
    with open(map_path, "rb") as f:
        raw = f.read()
    if len(raw) < HEADER.size:
        return None
    magic, version, _flags, n, _size, _key = HEADER.unpack_from(raw)
    if magic != MAGIC or version != VERSION or len(raw) != HEADER.size + n:
        return None
    return raw[HEADER.size:]


def read_ready(map_path: str) -> tuple[int, int] | None:
    """(chunks, chunks ready) of a map file, or None if it is not a map of this version."""
    ready = ready_map(map_path)
    return None if ready is None else (len(ready), ready.count(1))


def entries_of(work_dir: str, blob_id: str) -> list[str]:
    """Names of the entries ``work_dir`` holds for ``blob_id`` (one per chunk table seen)."""
    try:
        names = os.listdir(work_dir)
    except FileNotFoundError:
        return []
    return sorted(fn[:-len(MAP_SUFFIX)] for fn in names
                  if fn.endswith(MAP_SUFFIX) and blob_id_of(fn[:-len(MAP_SUFFIX)]) == blob_id)


_FLOCK = struct.Struct("@hhqqi4x")  # struct flock: l_type, l_whence, l_start, l_len, l_pid (64-bit Linux)

class BlobCacheFile:
    """Data file + ready map of one entry, held open (and locked shared) while in use."""

    def __init__(self, work_dir: str, blob: BlobInfo, key: bytes, verified: bool):
        self.name = entry_name(blob, key)
        self.data_path = os.path.join(work_dir, self.name + DATA_SUFFIX)
        self.map_path = os.path.join(work_dir, self.name + MAP_SUFFIX)
        self.chunks = max(blob.chunk_count, 1)
        self.size = blob.uncompressed_size
        self.header = HEADER.pack(MAGIC, VERSION, F_VERIFIED if verified else 0, self.chunks, self.size, key)
        self.map_fd = self.data_fd = -1
        try:
            self._open()
            self.ready = bytearray(os.pread(self.map_fd, self.chunks, HEADER.size))
        except OSError as e:  # e.g. a read-only or failing cache disk
            self.close()
            raise BlobUnavailable(f"cache entry {self.name}: {e.strerror or e}") from None
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ opening
    def _open(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        busy = 0
        for _ in range(8 + BUSY_TRIES):
            self.close()
            try:
                self.map_fd = os.open(self.map_path, flags, 0o600)
            except OSError as e:
                raise BlobUnavailable(f"cannot open cache file {self.map_path}: {e.strerror}") from None
            try:
                fcntl.flock(self.map_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                exclusive = True
            except BlockingIOError:
                fcntl.flock(self.map_fd, fcntl.LOCK_SH)  # waits out a creator or an evictor (both brief)
                exclusive = False
            if not self._still_linked():
                continue  # an evictor removed it between our open and our lock
            valid = self._open_data() and self._valid()
            if not valid:
                if not exclusive:
                    # whoever held the lock may have held it only for a moment without making the entry (a look
                    # by store._busy: `rafsfs cache ls`, another daemon's eviction pass): only a map that stays
                    # invalid while others hold it is another table's entry in use
                    busy += 1
                    if busy >= BUSY_TRIES:
                        raise EntryBusy(f"cache entry {self.name} does not match and is in use by another process")
                    time.sleep(BUSY_WAIT * busy)
                    continue
                self._reset()
            if exclusive:
                # not atomic (flock drops, then takes): an evictor may slip in between, which the check below sees
                fcntl.flock(self.map_fd, fcntl.LOCK_SH)
                if not self._still_linked():
                    continue
            os.utime(self.map_fd)  # last use, for eviction order
            return
        raise BlobUnavailable(f"cache entry {self.map_path} keeps disappearing")

    def _still_linked(self) -> bool:
        try:
            return os.path.samestat(os.fstat(self.map_fd), os.stat(self.map_path))
        except FileNotFoundError:
            return False

    def _open_data(self) -> bool:
        """Open the data file if it exists (False if not): a map whose data file is gone (deleted, or a crash between
        the two unlinks of an eviction) must not keep its ready bytes over a fresh, all-zero data file."""
        try:
            self.data_fd = os.open(self.data_path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            raise BlobUnavailable(f"cannot open cache file {self.data_path}: {e.strerror}") from None

    def _valid(self) -> bool:
        return os.fstat(self.map_fd).st_size == HEADER.size + self.chunks \
            and os.pread(self.map_fd, HEADER.size, 0) == self.header \
            and os.fstat(self.data_fd).st_size >= self.size

    def _reset(self) -> None:
        """Start the entry over (caller holds the exclusive lock): an empty data file of the blob's size, an empty
        map, both durable before the header that makes the map valid."""
        try:
            if self.data_fd < 0:
                self.data_fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            os.ftruncate(self.map_fd, 0)  # invalid from here until the header is written
            os.ftruncate(self.data_fd, 0)
            os.ftruncate(self.data_fd, self.size)
            os.ftruncate(self.map_fd, HEADER.size + self.chunks)
            os.fsync(self.data_fd)
            os.fsync(self.map_fd)
            if os.pwrite(self.map_fd, self.header, 0) != HEADER.size:
                raise OSError(errno.ENOSPC, "short write")
            os.fdatasync(self.map_fd)
        except (OSError, OverflowError) as e:
            # nothing else uses the entry (we hold it exclusively): leave nothing behind
            for path in (self.map_path, self.data_path):
                try:
                    os.unlink(path)
                except OSError:
                    pass
            why = e.strerror if isinstance(e, OSError) else "size out of range"
            raise BlobUnavailable(f"cannot create cache entry {self.name} of {self.size} bytes: {why}") from None

    # ------------------------------------------------------------------ use
    def is_ready(self, ci: int) -> bool:
        return ci < len(self.ready) and self.ready[ci] == 1

    def refresh(self) -> None:
        """Take in the chunks other processes stored since this entry was opened (map bytes only ever go 0 -> 1
        while anyone holds the entry)."""
        disk = os.pread(self.map_fd, self.chunks, HEADER.size)
        for ci in range(min(len(disk), len(self.ready))):
            if disk[ci] == 1:
                self.ready[ci] = 1

    def claim(self, start: int, end: int) -> bool:
        """Claim chunks ``start``..``end`` for a fetch this process makes in the background (readahead): False if
        another process sharing the entry holds a claim on any of them (it is fetching them: fetching them again
        would only cost the registry twice).  An open-file-description lock on their map bytes, so it is dropped
        when the process dies, and no other descriptor of the map this process opens or closes touches it.  A
        hint only: a chunk counts as stored by its bytes and map byte, never by a claim."""
        return self._ofd_lock(fcntl.F_WRLCK, start, end, fcntl.F_OFD_SETLK)

    def release(self, start: int, end: int) -> None:
        self._ofd_lock(fcntl.F_UNLCK, start, end, fcntl.F_OFD_SETLK)

    def _ofd_lock(self, kind: int, start: int, end: int, cmd: int) -> bool:
        lock = _FLOCK.pack(kind, os.SEEK_SET, HEADER.size + start, end - start, 0)
        try:
            fcntl.fcntl(self.map_fd, cmd, lock)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def write_chunk(self, ci: int, offset: int, data: bytes) -> None:
        """Store a verified chunk's bytes.  It is ready for this process at once; its map byte is written by
        :meth:`commit`, after the bytes are durable."""
        view = memoryview(data)
        while view:  # a short write is retried: the next one says why (ENOSPC, EIO)
            n = os.pwrite(self.data_fd, view, offset)
            if n <= 0:
                raise OSError(errno.EIO, "the cache file takes no more bytes")
            view, offset = view[n:], offset + n
        self.ready[ci] = 1

    def commit(self, cis: list[int]) -> None:
        """Make stored chunks ready on disk: one ``fdatasync`` of the data file, then their map bytes."""
        if not cis:
            return
        os.fdatasync(self.data_fd)
        for start, end in _runs(sorted(set(cis))):
            os.pwrite(self.map_fd, b"\1" * (end - start), HEADER.size + start)

    def forget(self, cis: list[int]) -> None:
        """Stored chunks whose commit failed are fetched again next time (their bytes may not be on the disk)."""
        for ci in cis:
            self.ready[ci] = 0

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.data_fd, size, offset)

    def close(self) -> None:
        for attr in ("data_fd", "map_fd"):  # the map last: closing it releases the shared lock
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                os.close(fd)


def _runs(cis: list[int]):
    start = prev = cis[0]
    for ci in cis[1:]:
        if ci != prev + 1:
            yield start, prev + 1
            start = ci
        prev = ci
    yield start, prev + 1
