"""The filler: reads pre-content events into the journal, makes the chunks under each event's range present through
the chunk cache, and answers.

One event = a range of one blob's data file that the kernel's EROFS is about to read.  The range is clipped to the
blob's size (the kernel widens it to whole pages, past EOF too); an empty range is allowed at once.  The chunks that
cover it come from the blob's metadata (``BlobMeta.chunks_at``) and are made present by ``ChunkCache.fill``
(fetch, merge, decompress, verify, store: the path every mode shares).  ``FAN_ALLOW`` is written only after every one
of those chunks is marked ready in the cache's map (a chunk is marked only after its verified bytes are written);
anything else is ``FAN_DENY_ERRNO(EIO)``.  Holes are never allowed.

Errors map to an answer in one place (:meth:`Filler._decide`): a RafsError (fetch, digest, bad image) is EIO, and so
is a bug (logged with its traceback).
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

from rafsfs.blob import BlobInfo
from rafsfs.errors import RafsError
from rafsfs.storage.cache.blob_file import BlobCacheFile
from rafsfs.storage.cache.chunk_cache import ChunkCache

from . import fanotify as fa
from . import records
from .journal import GOT, Journal

log = logging.getLogger(__name__)

HANDLERS = 16  # events filled at the same time
LATENCIES = 1 << 16  # handler latencies kept for p50/p99
SHARED_RECHECK = 0.5  # seconds between looks whether another daemon serves a data file too


@dataclass(eq=False)
class Target:
    """A blob's data file as the kernel reads it (the ``device=`` of the mount)."""

    blobs: list[BlobInfo]  # the image's blobs stored in this entry (one, unless the image lists a blob twice)
    entry: BlobCacheFile  # its data_fd was opened before the mark: the descriptor every write goes through
    size: int  # bytes: ranges are clipped to this
    marked: bool
    shared: bool = False  # another live daemon serves this data file (see _fill_range)
    shared_checked: float = -1e9

    @property
    def path(self) -> str:
        return self.entry.data_path


class Filler:
    def __init__(self, group: int, journal: Journal, cache: ChunkCache, targets: list[Target],
                 handlers: int = HANDLERS):
        self.group = group
        self.pid = os.getpid()
        self.journal = journal
        self.cache = cache
        self.targets = targets
        self.by_inode: dict[tuple[int, int], Target] = {}
        for t in targets:
            st = os.fstat(t.entry.data_fd)
            self.by_inode[(st.st_dev, st.st_ino)] = t
        self.pool = ThreadPoolExecutor(handlers, thread_name_prefix="fanotify-fill")
        self.free: queue.Queue[int] = queue.Queue()
        self._left: dict[int, int] = {}  # slot -> events not answered yet
        self._lock = threading.Lock()
        self.events = 0
        self.event_bytes = 0
        self.denied = 0
        self.latencies: deque[float] = deque(maxlen=LATENCIES)
        self.on_answered = None  # called after every answer: must be cheap (the worker wakes its publisher)
        self._percentiles: dict = {"p50": None, "p99": None}

    # ------------------------------------------------------------------ one event
    def _chunks_under(self, t: Target, offset: int, count: int) -> list[tuple[BlobInfo, list]]:
        """(blob, chunks) for each blob stored in ``t``: the chunks under [offset, offset+count) clipped to the
        blob's size (the kernel widens ranges to whole pages, past EOF too); none for an empty range."""
        end = min(offset + count, t.size)
        if count == 0 or offset >= end:
            return [(blob, []) for blob in t.blobs]
        return [(blob, self.cache.meta(blob).chunks_at(offset, end - offset)) for blob in t.blobs]

    def _fill_range(self, t: Target, offset: int, count: int) -> bool:
        """Make [offset, offset+count) of ``t`` readable; True when every chunk under it is ready."""
        ok = True
        fetched = False
        for blob, chunks in self._chunks_under(t, offset, count):
            if chunks:
                fetched = fetched or not all(self.cache.is_ready(blob, c) for c in chunks)
                self.cache.fill(blob, chunks)
            ok = ok and all(self.cache.is_ready(blob, c) for c in chunks)
        if fetched and ok and self._shared(t):
            self.cache.sync()  # the other daemon's group sees this read next: it must find the chunks ready
        return ok

    def _shared(self, t: Target) -> bool:
        now = time.monotonic()
        if now - t.shared_checked > SHARED_RECHECK:
            t.shared = records.shared_with_others(t.path)
            t.shared_checked = now
        return t.shared

    def _decide(self, ev: fa.Event, targets: list[Target]) -> int:
        """The answer for ``ev`` once its range is filled in each of ``targets``: the one place errors become an
        answer."""
        if not ev.mask & fa.FAN_PRE_ACCESS or ev.pid == self.pid:
            return fa.FAN_ALLOW  # our own access (a write through a descriptor that raises events): never wait on it
        try:
            ok = all(self._fill_range(t, ev.offset, ev.count) for t in targets)
            if not ok:
                log.error("fill of %d bytes at %d left a chunk missing: answering EIO", ev.count, ev.offset)
            return fa.FAN_ALLOW if ok else fa.DENY_EIO
        except RafsError as e:
            log.warning("range %d+%d: %s: EIO", ev.offset, ev.count, e)
        except Exception:
            log.exception("range %d+%d: internal error: EIO", ev.offset, ev.count)
        return fa.DENY_EIO

    def _target_of(self, fd: int) -> list[Target]:
        try:
            st = os.fstat(fd)
        except OSError:
            return self.targets
        t = self.by_inode.get((st.st_dev, st.st_ino))
        return [t] if t is not None else []

    def _answer(self, fd: int, response: int) -> None:
        try:
            if not fa.respond(self.group, fd, response):
                log.debug("event fd %d was answered already", fd)
        except OSError as e:  # EINVAL would mean a bad answer: keep going, the event stays for a successor
            log.error("cannot answer event fd %d: %s", fd, e)

    def _ready_now(self, ev: fa.Event) -> list[tuple[BlobInfo, list]] | None:
        """The chunks under ``ev``'s range, per blob, when every one of them is ready already (the common case of a
        sequential reader behind readahead: the kernel asks for each 128 KiB of filled ranges while the mark stays);
        None when something must be filled (or decided) by :meth:`_decide`.  Cheap: no I/O, the metadata was loaded
        when the worker opened its entries."""
        if ev.fd < 0 or not ev.mask & fa.FAN_PRE_ACCESS or ev.pid == self.pid:
            return None
        targets = self._target_of(ev.fd)
        if len(targets) != 1:
            return None
        out = self._chunks_under(targets[0], ev.offset, ev.count)
        if not all(self.cache.is_ready(blob, c) for blob, chunks in out for c in chunks):
            return None
        return out

    def _follow(self, ready: list[tuple[BlobInfo, list]]) -> None:
        """After a ready range was allowed: let the cache see the step (its readahead follows in-order readers
        through hits too).  Never fetches: runs on the reading thread."""
        try:
            for blob, chunks in ready:
                if chunks:
                    self.cache.follow(blob, chunks)
        except RafsError as e:
            log.debug("readahead after a ready range: %s", e)
        except Exception:
            log.exception("readahead after a ready range")

    def _handle(self, slot: int, i: int, ev: fa.Event, t0: float) -> None:
        response = None
        try:
            if ev.fd >= 0:  # else FAN_NOFD: an overflow notice, nothing to answer
                targets = self._target_of(ev.fd)
                response = self._decide(ev, targets) if targets else fa.FAN_ALLOW  # not ours: nothing to fill
        except BaseException:  # _decide maps every Exception; this is only what must not be swallowed
            log.exception("event handler")
            self._finish(slot, i, ev, fa.DENY_EIO if ev.fd >= 0 else None, t0)  # never leave a reader waiting
            raise
        self._finish(slot, i, ev, response, t0)

    def _finish(self, slot: int, i: int, ev: fa.Event, response: int | None, t0: float) -> None:
        """Answer ``ev`` (unless it is a notice), record it answered in the journal, and free its slot after its
        last event."""
        try:
            if response is not None:
                self._answer(ev.fd, response)
                if response != fa.FAN_ALLOW:
                    self.denied += 1
            self.journal.set_answered(slot, i)
            if ev.fd >= 0:
                os.close(ev.fd)
            self.latencies.append(time.monotonic() - t0)
            if self.on_answered is not None:
                self.on_answered()
        except BaseException:
            log.exception("event handler")
            raise
        finally:
            self._done(slot)

    def _done(self, slot: int) -> None:
        with self._lock:
            self._left[slot] -= 1
            done = self._left[slot] == 0
        if done:
            self.journal.clear(slot)
            self.free.put(slot)

    # ------------------------------------------------------------------ a predecessor's orphans
    def recover(self) -> int:
        """Answer every event a dead worker left unanswered: fill ALL their ranges first, then answer ALL their
        numbers (an answer to number N releases the oldest pending event numbered N).  Their fds died with the
        worker, so the blob is unknown: each range is filled in every blob still marked."""
        orphans = self.journal.pending()
        if orphans:
            targets = [t for t in self.targets if t.marked]
            futures = [self.pool.submit(self._decide, ev, targets) for _, _, ev in orphans]
            wait(futures)
            for (slot, i, ev), fut in zip(orphans, futures):
                if ev.fd >= 0:
                    self._answer(ev.fd, fut.result())
                self.journal.set_answered(slot, i)
            log.info("answered %d event(s) left by the previous filler", len(orphans))
        for s in range(self.journal.slots):
            self.journal.clear(s)
        return len(orphans)

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        """Read events until the group fails: a ready range is answered here, the rest go to the handler pool.
        Only after :meth:`recover`."""
        for s in range(self.journal.slots):
            self.free.put(s)
        while True:
            slot = self.free.get()
            addr, size = self.journal.begin_read(slot)
            try:
                n = fa.read_into(self.group, addr, size)
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN):
                    self.journal.clear(slot)
                    self.free.put(slot)
                    continue
                raise
            t0 = time.monotonic()
            self.journal.set_state(slot, GOT)
            events = self.journal.events(slot) if n > 0 else []
            if not events:
                self.journal.clear(slot)
                self.free.put(slot)
                continue
            self.events += len(events)
            self.event_bytes += sum(ev.count for ev in events)
            with self._lock:
                self._left[slot] = len(events)
            for i, ev in enumerate(events):
                try:
                    ready = self._ready_now(ev)
                except Exception:  # noqa: BLE001 - the handler decides (and logs) instead
                    ready = None
                if ready is None:
                    self.pool.submit(self._handle, slot, i, ev, t0)
                else:  # answered here, without a hand-off to a handler thread (~0.1 ms per event)
                    self._finish(slot, i, ev, fa.FAN_ALLOW, t0)
                    self._follow(ready)  # after the answer: the kernel goes on meanwhile

    def stats(self, percentiles: bool = True) -> dict:
        """Counters; the latency percentiles are computed again only when asked (a sort of up to 64k samples)."""
        if percentiles:
            lat = sorted(self.latencies)

            def pct(p: float) -> float | None:
                return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1e6, 1) if lat else None

            self._percentiles = {"p50": pct(0.5), "p99": pct(0.99)}
        return {"events": self.events, "event_bytes": self.event_bytes, "denied": self.denied,
                "handler_us": self._percentiles}
