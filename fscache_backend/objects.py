"""Cache objects and READs: what the kernel opened (a bootstrap or a data blob of an image in the mount table), and
how a READ of one is answered.

OPEN  -> look the cookie up (bootstrap: an image's fsid; data blob: a blob id of an image in the same volume),
         answer ``copen`` with its size (bootstrap: the file size; blob: its uncompressed size -- the kernel addresses a
         blob device by ``blkaddr * 4096`` = each chunk's uncompressed offset).
READ  -> bootstrap: copy the range; blob: the chunks covering the range are fetched, decompressed and verified by the
         core (a non-persisting DirectChunkSource: the kernel's cache file *is* the uncompressed blob), written whole
         and page-aligned into the anonymous fd; then READ_COMPLETE, always (without data the reader gets EIO), and
         at the latest after ``read_timeout`` (the fetch then finishes in the background).
CLOSE -> forget the object (its fd closes once no READ uses it).

Three pools of worker threads, so that one kind of work never waits for another: bootstrap copies (local file
reads: an ``ls`` never queues behind a dead registry), blob fetches for READs, and background work (read-ahead,
prefetch).  A blob whose backend failed is not asked again for FAILURE_MEMORY seconds.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import trio

from rafsfs.blob import BlobInfo, ChunkRef
from rafsfs.errors import BlobUnavailable, CorruptChunk, RafsError
from rafsfs.format.inode import LAYOUT_CHUNK_BASED

from . import protocol
from .errors import open_errno
from .mounts import MountTable
from .served import ServedImage
from .settings import Settings

log = logging.getLogger(__name__)

BOOTSTRAP_WINDOW = 1 << 20  # bootstrap READs are answered with whole aligned windows of this size
BOOTSTRAP_WORKERS = 2  # threads copying bootstrap windows (their own pool: never behind a blob fetch)
BACKGROUND_WORKERS = 2  # threads for read-ahead and prefetch (their own pool: never in a READ's way)
READ_AHEAD = 2  # after a blob READ, fetch this many times amplify_io more bytes of chunks in the background
FAILURE_MEMORY = 2.0  # seconds a blob whose backend failed is answered with that failure without asking again


class RecentFailure(BlobUnavailable):
    """The blob's backend failed moments ago: answered without asking it again."""


@dataclass(eq=False)  # identity: objects are kept in sets
class CacheObject:
    """One cache object the kernel opened (a bootstrap or a data blob)."""

    object_id: int
    anon_fd: int
    kind: str  # "bootstrap" | "blob"
    volume: str
    key: str  # fsid or blob id
    size: int
    data_fd: int = -1  # bootstrap: our own fd of the bootstrap file
    ready: set[int] = field(default_factory=set)  # chunk-info indexes (blob) / windows (bootstrap) written
    inflight: dict[int, trio.Event] = field(default_factory=dict)
    users: int = 0
    closed: bool = False

    def release(self) -> None:
        for fd in (self.anon_fd, self.data_fd):
            if fd >= 0:
                os.close(fd)
        self.anon_fd = self.data_fd = -1


def blob_size(blob: BlobInfo, blksz: int) -> int:
    """The size a blob cookie is opened with: the same for every image using the blob (the kernel discards a cache
    file whose recorded size differs)."""
    return blob.uncompressed_size or blob.device_blocks * blksz


class CacheObjects:
    def __init__(self, devfd: int, table: MountTable, settings: Settings, stats: dict):
        self.devfd = devfd
        self.table = table
        self.settings = settings
        self.stats = stats
        self.objects: dict[int, CacheObject] = {}
        self.draining: set[CacheObject] = set()  # CLOSEd objects with READs still running
        self.limiter = trio.CapacityLimiter(settings.threads)
        self.boot_limiter = trio.CapacityLimiter(BOOTSTRAP_WORKERS)
        self.bg_limiter = trio.CapacityLimiter(BACKGROUND_WORKERS)
        self.failures: dict[tuple[str, str], tuple[float, str]] = {}  # (backend, blob id) -> (until, why)
        self.nursery: trio.Nursery | None = None  # set by the daemon before the first message

    def needed(self) -> set[tuple[str, str]]:
        return {(o.volume, o.key) for o in (*self.objects.values(), *self.draining)}

    # ------------------------------------------------------------------ OPEN / CLOSE
    def open(self, msg: protocol.OpenMsg) -> None:
        self.stats["opens"] += 1
        try:
            kind, s, blob = self.table.lookup(msg.volume_key, msg.cookie_key)
            if kind == "bootstrap":
                data_fd = os.dup(s.bootstrap_fd)
                size = os.fstat(data_fd).st_size
            else:
                assert blob is not None
                data_fd, size = -1, blob_size(blob, s.image.blksz)
                blobs = self.stats["blob_opens"]
                blobs[blob.blob_id] = blobs.get(blob.blob_id, 0) + 1
            os.set_inheritable(msg.fd, False)
            obj = CacheObject(msg.object_id, msg.fd, kind, msg.volume_key, msg.cookie_key, size, data_fd)
            protocol.copen(self.devfd, msg.msg_id, size)
        except Exception as e:  # a refused OPEN must be answered, whatever went wrong
            if not isinstance(e, (KeyError, OSError, RafsError)):
                log.exception("OPEN %d: internal error", msg.msg_id)
            code = open_errno(e)
            self.stats["open_errors"] += 1
            log.warning("OPEN %d (volume %s, cookie %s) refused: %s", msg.msg_id, msg.volume_key, msg.cookie_key,
                        os.strerror(-code))
            try:
                protocol.copen(self.devfd, msg.msg_id, code)
            except OSError as e2:
                log.error("copen %d failed: %s", msg.msg_id, e2.strerror)
            os.close(msg.fd)
            return
        old = self.objects.pop(msg.object_id, None)
        if old is not None:
            self._drop(old)
        self.objects[msg.object_id] = obj
        log.debug("OPEN %d: object %d = %s %s, size %d", msg.msg_id, msg.object_id, kind, msg.cookie_key, size)
        if blob is not None and _wants_prefetch(s):
            obj.users += 1
            s.users += 1
            assert self.nursery is not None
            self.nursery.start_soon(self._prefetch, obj, s, blob)

    def close(self, msg: protocol.CloseMsg) -> CacheObject | None:
        """Forget the object; returns it (None if unknown)."""
        self.stats["closes"] += 1
        obj = self.objects.pop(msg.object_id, None)
        if obj is None:
            return None
        log.debug("CLOSE object %d (%s %s)", obj.object_id, obj.kind, obj.key)
        self._drop(obj)
        self.table.prune_retired()
        return obj

    def _drop(self, obj: CacheObject) -> None:
        obj.closed = True
        if obj.users == 0:
            obj.release()
        else:
            self.draining.add(obj)

    def _unuse(self, obj: CacheObject) -> None:
        """A READ, fill or read-ahead of ``obj`` is over; the last one of a CLOSEd object releases it."""
        obj.users -= 1
        if obj.closed and obj.users == 0:
            obj.release()
            self.draining.discard(obj)
            self.table.prune_retired()

    def busy(self) -> int:
        """READs, fills and background fetches still running."""
        return sum(o.users for o in (*self.objects.values(), *self.draining))

    def release_all(self) -> None:
        for o in (*self.objects.values(), *self.draining):
            o.release()

    # ------------------------------------------------------------------ READ
    def read(self, msg: protocol.ReadMsg) -> None:
        obj = self.objects.get(msg.object_id)
        if obj is None:
            log.error("READ %d for unknown object %d: cannot complete it", msg.msg_id, msg.object_id)
            return
        obj.users += 1
        self.stats["reads_started"] = self.stats.get("reads_started", 0) + 1
        assert self.nursery is not None
        self.nursery.start_soon(self._read, obj, msg)

    async def _read(self, obj: CacheObject, msg: protocol.ReadMsg) -> None:
        """Answer the READ when its fill is done, or failing after ``read_timeout``: a fill thread cannot be
        cancelled, so the fill runs as a task of its own and finishes in the background."""
        outcome: dict[str, str] = {}
        done = trio.Event()
        obj.users += 1  # the fill's
        assert self.nursery is not None
        self.nursery.start_soon(self._fill, obj, msg, outcome, done)
        with trio.move_on_after(self.settings.read_timeout):
            await done.wait()
        ok = done.is_set() and "error" not in outcome
        try:
            if not done.is_set():
                log.error("READ %d (%s %s, %d+%d) timed out after %.0f s: answered with an error", msg.msg_id,
                          obj.kind, obj.key, msg.offset, msg.length, self.settings.read_timeout)
            elif not ok:
                log.error("READ %d (%s %s, %d+%d) failed: %s", msg.msg_id, obj.kind, obj.key, msg.offset,
                          msg.length, outcome["error"])
        finally:
            try:
                protocol.read_complete(obj.anon_fd, msg.msg_id)
            except OSError as e:
                log.warning("READ_COMPLETE %d (object %d): %s", msg.msg_id, obj.object_id, e.strerror)
            self._unuse(obj)
            st = self.stats
            st["reads"] += 1
            st["reads_" + obj.kind] += 1
            st["read_bytes"] += msg.length
            st["read_failures"] += not ok

    async def _fill(self, obj: CacheObject, msg: protocol.ReadMsg, outcome: dict[str, str],
                    done: trio.Event) -> None:
        try:
            if obj.kind == "bootstrap":
                await self._fill_bootstrap(obj, msg)
            else:
                await self._fill_blob(obj, msg)
        except (RafsError, OSError) as e:
            outcome["error"] = str(e)
        except KeyError as e:
            outcome["error"] = f"no image in the table uses blob {e}"
        except Exception:
            log.exception("READ %d (%s %s) failed: internal error", msg.msg_id, obj.kind, obj.key)
            outcome["error"] = "internal error"
        finally:
            done.set()
            self._unuse(obj)

    @staticmethod
    def _claim(obj: CacheObject, required: list[int], extra: list[int]) -> tuple[list[int], list[trio.Event]]:
        """Single flight per object: the keys (chunk indexes, bootstrap windows) this READ fills itself, and the
        fills of other READs it waits for.  ``extra`` keys (read-ahead) are taken only when nobody has them."""
        mine: list[int] = []
        waits: list[trio.Event] = []
        for k in required + extra:
            if k in obj.ready or k in mine:
                continue
            ev = obj.inflight.get(k)
            if ev is not None:
                if k in required:
                    waits.append(ev)
                continue
            obj.inflight[k] = trio.Event()
            mine.append(k)
        return mine, waits

    @staticmethod
    def _settle(obj: CacheObject, keys: list[int], done: list[int]) -> None:
        obj.ready.update(done)
        for k in keys:
            obj.inflight.pop(k).set()

    async def _fill_bootstrap(self, obj: CacheObject, msg: protocol.ReadMsg) -> None:
        """Copy whole aligned windows of the bootstrap: later metadata reads nearby need no READ at all."""
        first = msg.offset // BOOTSTRAP_WINDOW
        last = (msg.offset + msg.length - 1) // BOOTSTRAP_WINDOW
        mine, waits = self._claim(obj, list(range(first, last + 1)), [])
        done: list[int] = []
        try:
            if mine:
                done = await trio.to_thread.run_sync(_write_windows, obj, mine, limiter=self.boot_limiter)
        finally:
            self._settle(obj, mine, done)
        for ev in waits:
            await ev.wait()
        if len(done) < len(mine) or any(k not in obj.ready for k in range(first, last + 1)):
            raise RafsError("bootstrap window not written")

    async def _fill_blob(self, obj: CacheObject, msg: protocol.ReadMsg) -> None:
        """The chunks covering the READ plus the chunks after them up to ``amplify`` bytes, before completing it
        (small files lie next to each other in a blob: one merged fetch, and a chunk written now is a READ the kernel
        never sends); then, in the background, the next READ_AHEAD x ``amplify`` bytes (sequential readers find
        their next chunks present)."""
        _, s, blob = self.table.lookup(obj.volume, obj.key)
        assert blob is not None and s.source is not None
        s.users += 1
        try:
            await self._fill_blob_from(obj, msg, s, blob)
        finally:
            self.table.release(s)

    def _check_failures(self, s: ServedImage, blob: BlobInfo) -> None:
        key = (s.backend_id, blob.blob_id)
        failed = self.failures.get(key)
        if failed is not None:
            until, why = failed
            if time.monotonic() < until:
                raise RecentFailure(f"{why} (failed moments ago: not asked again yet)")
            del self.failures[key]

    async def _fill_blob_from(self, obj: CacheObject, msg: protocol.ReadMsg, s: ServedImage,
                              blob: BlobInfo) -> None:
        self._check_failures(s, blob)
        sync_end = msg.offset + max(msg.length, s.amplify)
        span = min(sync_end + READ_AHEAD * s.amplify, obj.size) - msg.offset
        chunks = await trio.to_thread.run_sync(
            lambda: s.source.meta(blob).chunks_at(msg.offset, max(span, msg.length)), limiter=self.limiter)
        end = msg.offset + msg.length
        by_ci = {c.ci_index: c for c in chunks}
        required = [c.ci_index for c in chunks if c.info.uncompressed_offset < end]
        mine, waits = self._claim(obj, required, [c.ci_index for c in chunks if c.info.uncompressed_offset >= end])
        later = [k for k in mine if by_ci[k].info.uncompressed_offset >= sync_end]
        now = [k for k in mine if k not in later]
        gaps = _uncovered(msg.offset, msg.length, [by_ci[k] for k in required])
        if later:
            obj.users += 1
            s.users += 1
            assert self.nursery is not None
            self.nursery.start_soon(self._fetch_chunks, obj, s, blob, [by_ci[k] for k in later], [], True)
        await self._fetch_chunks(obj, s, blob, [by_ci[k] for k in now], gaps, False)
        for ev in waits:
            await ev.wait()
        missing = [k for k in required if k not in obj.ready]
        if missing:
            raise RafsError(f"{len(missing)} chunk(s) could not be fetched")

    async def _fetch_chunks(self, obj: CacheObject, s: ServedImage, blob: BlobInfo, chunks: list[ChunkRef],
                            gaps: list[tuple[int, int]], background: bool) -> None:
        """Fill claimed ``chunks`` (and zero ``gaps``) in a worker thread, then settle their claims."""
        done: list[int] = []
        try:
            if chunks or gaps:
                if chunks:
                    self._check_failures(s, blob)
                done, nbytes = await trio.to_thread.run_sync(
                    _write_chunks, obj, s, blob, chunks, gaps,
                    limiter=self.bg_limiter if background else self.limiter)
                st = self.stats
                st["chunks_fetched"] += len(done)
                st["bytes_fetched"] += nbytes
                st["blob_chunks_fetched"][blob.blob_id] = st["blob_chunks_fetched"].get(blob.blob_id, 0) + len(done)
        except (RafsError, OSError) as e:
            if isinstance(e, BlobUnavailable) and not isinstance(e, RecentFailure):
                self.failures[(s.backend_id, blob.blob_id)] = (time.monotonic() + FAILURE_MEMORY, str(e))
            if not background:
                raise
            log.warning("read-ahead of blob %s failed: %s", blob.blob_id, e)
        except Exception:
            if not background:
                raise
            # a background task's exception would end the nursery, and with it every image of the machine
            log.exception("read-ahead of blob %s failed: internal error", blob.blob_id)
        finally:
            self._settle(obj, [c.ci_index for c in chunks], done)
            if background:
                self._unuse(obj)
                self.table.release(s)

    # ------------------------------------------------------------------ prefetch
    async def _prefetch(self, obj: CacheObject, s: ServedImage, blob: BlobInfo) -> None:
        """Fetch the blob's chunks of the image's prefetch table, its ``prefetch_files`` and, with
        ``prefetch_all``, the whole blob, in batches of ``amplify`` bytes on the background pool (READs never wait
        for it).  Runs once per OPEN of a blob object; stops when the object is closed or a batch fails."""
        try:
            refs = await trio.to_thread.run_sync(_prefetch_chunks, s, blob, limiter=self.bg_limiter)
            log.debug("prefetch of blob %s: %d chunk(s)", blob.blob_id, len(refs))
            batch: list[ChunkRef] = []
            size = 0
            for i, ref in enumerate(refs):
                batch.append(ref)
                size += ref.info.compressed_size
                if size < s.amplify and i + 1 < len(refs):
                    continue
                if obj.closed:
                    return
                mine, _ = self._claim(obj, [], [c.ci_index for c in batch])
                by_ci = {c.ci_index: c for c in batch}
                batch, size = [], 0
                if not mine:
                    continue
                before = len(obj.ready)
                obj.users += 1
                s.users += 1
                await self._fetch_chunks(obj, s, blob, [by_ci[k] for k in mine], [], True)
                if len(obj.ready) - before < len(mine):
                    return  # logged by the fetch; READs still fetch what they need
                self.stats["chunks_prefetched"] = self.stats.get("chunks_prefetched", 0) + len(mine)
            log.info("prefetched blob %s: %d chunk(s)", blob.blob_id, len(refs))
            self.stats["prefetches_done"] = self.stats.get("prefetches_done", 0) + 1
        except RafsError as e:
            log.warning("prefetch of blob %s stopped: %s", blob.blob_id, e)
        except Exception:
            log.exception("prefetch of blob %s stopped: internal error", blob.blob_id)
        finally:
            self._unuse(obj)
            self.table.release(s)


def _wants_prefetch(s: ServedImage) -> bool:
    return bool(s.rec.prefetch_files) or (s.prefetch is not None and s.prefetch.enable)


def _prefetch_chunks(s: ServedImage, blob: BlobInfo) -> list[ChunkRef]:
    """The chunks of ``blob`` to prefetch, files first (nydusd's rules: ``enable`` reads the image's prefetch
    table, ``prefetch_all`` then every chunk; ``prefetch_files`` add to it)."""
    image, pf = s.image, s.prefetch
    nids: list[int] = list(image.prefetch_nids) if pf is not None and pf.enable else []
    for p in s.rec.prefetch_files:
        ino = image.resolve(p)
        if ino.is_dir():
            nids += [child.nid for _, child in image.walk(ino.nid) if child.is_reg()]
        else:
            nids.append(ino.nid)
    out: dict[int, ChunkRef] = {}
    for nid in dict.fromkeys(nids):
        ino = image.inode(nid)
        if ino.is_reg() and ino.layout == LAYOUT_CHUNK_BASED and ino.size:
            for ref in image.chunks(ino, source=s.source):
                if ref.blob_index == blob.index:
                    out.setdefault(ref.ci_index, ref)
    if pf is not None and pf.enable and pf.prefetch_all:
        for ci in range(blob.chunk_count):
            if ci not in out:
                out[ci] = s.source.meta(blob).chunk_ref(ci)
    return list(out.values())


def _write_windows(obj: CacheObject, windows: list[int]) -> list[int]:
    size = protocol.round_up(obj.size)
    for w in windows:
        off = w * BOOTSTRAP_WINDOW
        n = min(BOOTSTRAP_WINDOW, size - off)
        protocol.write_aligned(obj.anon_fd, off, os.pread(obj.data_fd, n, off), n)
    return windows


def _write_chunks(obj: CacheObject, s: ServedImage, blob: BlobInfo, chunks: list[ChunkRef],
                  gaps: list[tuple[int, int]]) -> tuple[list[int], int]:
    """Fetch (merged), verify and write whole chunks, and zeros into ``gaps``.  When a chunk of a merged fetch is
    corrupt, the others are fetched one by one so the good ones still land; an unreachable backend is not asked
    again chunk by chunk (that would cost a deadline per chunk)."""
    assert s.source is not None
    pairs: list[tuple[ChunkRef, bytes]] = []
    if chunks:
        try:
            pairs = list(zip(chunks, s.source.read_chunks(blob, chunks)))
        except CorruptChunk as e:
            if len(chunks) == 1:
                raise
            log.warning("blob %s: %s; fetching chunk by chunk", blob.blob_id, e)
            for c in chunks:
                try:
                    pairs.append((c, s.source.read_chunks(blob, [c])[0]))
                except CorruptChunk as e1:
                    log.error("blob %s chunk %d: %s", blob.blob_id, c.ci_index, e1)
    done, nbytes = [], 0
    for run in _runs(pairs):
        start = run[0][0].info.uncompressed_offset
        last = run[-1][0].info
        protocol.write_run(obj.anon_fd, start, [(c.info.uncompressed_offset, d) for c, d in run],
                           last.uncompressed_offset + last.uncompressed_size - start)
        done += [c.ci_index for c, _d in run]
        nbytes += sum(len(d) for _c, d in run)
    for off, n in gaps:
        protocol.write_aligned(obj.anon_fd, off, b"", n)
    return done, nbytes


def _runs(pairs: list[tuple[ChunkRef, bytes]], limit: int = 8 << 20) -> list[list[tuple[ChunkRef, bytes]]]:
    """Chunks in offset order, grouped where each starts on the page after the previous one ends (up to ``limit``
    bytes a group): one aligned write each."""
    runs: list[list[tuple[ChunkRef, bytes]]] = []
    for c, d in sorted(pairs, key=lambda p: p[0].info.uncompressed_offset):
        if runs:
            first, prev = runs[-1][0][0].info, runs[-1][-1][0].info
            if c.info.uncompressed_offset == protocol.round_up(prev.uncompressed_offset + prev.uncompressed_size) \
                    and c.info.uncompressed_offset + c.info.uncompressed_size - first.uncompressed_offset <= limit:
                runs[-1].append((c, d))
                continue
        runs.append([(c, d)])
    return runs


def _uncovered(offset: int, length: int, chunks: list[ChunkRef]) -> list[tuple[int, int]]:
    """Parts of [offset, offset+length) outside every chunk's page-rounded span (padding between or after chunks:
    zeros), page-aligned."""
    out = []
    pos, end = offset, offset + length
    for c in sorted(chunks, key=lambda c: c.info.uncompressed_offset):
        start = c.info.uncompressed_offset
        stop = protocol.round_up(start + c.info.uncompressed_size)
        if start > pos:
            out.append((pos, min(start, end) - pos))
        pos = max(pos, stop)
        if pos >= end:
            break
    if pos < end:
        out.append((pos, end - pos))
    return [(o, n) for o, n in out if n > 0]
