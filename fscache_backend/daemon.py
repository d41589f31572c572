"""The fscache daemon: a trio loop over /dev/cachefiles serving every rafsfs fscache mount of the machine.

OPEN  -> look the cookie up (bootstrap: a mount's fsid; data blob: a blob id of a mounted image in the same volume),
         answer ``copen`` with its size (bootstrap: the file size; blob: its uncompressed size -- the kernel addresses a
         blob device by ``blkaddr * 4096`` = each chunk's uncompressed offset).
READ  -> bootstrap: copy the range; blob: the chunks covering the range are fetched, decompressed and verified by the
         core (a non-persisting DirectChunkSource: the kernel's cache file *is* the uncompressed blob), written whole
         and page-aligned into the anonymous fd; then READ_COMPLETE, always (without data the reader gets EIO).
CLOSE -> forget the object (its fd closes once no READ uses it).

Run by :mod:`fscache_backend.supervisor`, which owns the bound device fd and restarts this process after a crash;
a restarted daemon sends ``restore`` and rebuilds its object table from the kernel's re-OPENs and the persisted mount
records.  Blocking work runs in threads under a bounded limiter.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

import trio

from rafsfs.atomic import write_text
from rafsfs.errors import BadImage, RafsError
from rafsfs.blob import BlobInfo, ChunkRef
from rafsfs.storage.metrics import CacheMetrics

from . import protocol
from . import mount as fsmount
from . import state
from .errors import FscacheError, open_errno
from .settings import Settings
from .served import Served, close_served, open_served
from .state import MountRecord

log = logging.getLogger(__name__)

WORKERS = 8  # threads fetching / decompressing / writing at once
READ_TIMEOUT = 120.0  # a READ is completed (then failing with EIO) after this long, whatever the backend does
WATCH_INTERVAL = 1.0  # how often the mount table is checked for mounts that went away
BOOTSTRAP_WINDOW = 1 << 20  # bootstrap READs are answered with whole aligned windows of this size
SYSFS_NAME_MAX = 36  # the kernel's sysfs name of an fscache-mode EROFS mount, "<domain>,<fsid>", cut here
FSID_ATTEMPTS = 8  # fsids tried for one mount when the kernel says the name is taken
READ_AHEAD = 2  # after a blob READ, fetch this many times amplify_io more bytes of chunks in the background


@dataclass(eq=False)  # identity: objects are kept in sets
class Obj:
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


class Daemon:
    def __init__(self, devfd: int, listener: socket.socket, settings: Settings, restored: bool):
        self.devfd = devfd
        self.listener = listener
        self.settings = settings
        self.restored = restored
        self.mounts: dict[str, Served] = {}
        self.mounting: set[str] = set()
        self.retired: list[Served] = []  # unmounted, kept while a cache object may still read through them
        self.draining: set[Obj] = set()  # CLOSEd objects with READs still running
        self.objects: dict[int, Obj] = {}
        self.limiter = trio.CapacityLimiter(WORKERS)
        self.metrics = CacheMetrics()  # every mount's backend requests, as 'rafsfs stats' shows them
        self.read_delay = float(os.environ.get("RAFSFS_FSCACHE_READ_DELAY", "0") or 0)  # test hook: slow READs
        self.had_mounts = False
        self.stats: dict = {"pid": os.getpid(), "restored": restored, "opens": 0, "open_errors": 0, "closes": 0,
                            "reads": 0, "reads_bootstrap": 0, "reads_blob": 0, "read_bytes": 0, "read_failures": 0,
                            "chunks_fetched": 0, "bytes_fetched": 0, "blob_opens": {}, "blob_chunks_fetched": {}}
        self._stats_dirty = True
        self._shutdown = trio.Event()

    # ------------------------------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        if self.restored:
            self._restore()
        for rec in state.load_all(self.settings.mounts_dir):
            try:
                self.mounts[rec.fsid] = await trio.to_thread.run_sync(open_served, rec, self.metrics)
                self.had_mounts = True
            except RafsError as e:
                log.error("cannot serve %s (fsid %s) any more: %s", rec.mountpoint, rec.fsid, e)
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._device_loop)
            nursery.start_soon(self._control_loop)
            nursery.start_soon(self._watch_mounts)
            nursery.start_soon(self._signals)
            nursery.start_soon(self._stats_writer)
            await self._shutdown.wait()
            await self._unmount_all()
            nursery.cancel_scope.cancel()
        self._write_stats()
        for o in self.objects.values():
            o.release()
        for s in list(self.mounts.values()) + self.retired:
            close_served(s)
        log.info("fscache daemon exits")

    def _restore(self) -> None:
        try:
            protocol.command(self.devfd, "restore")
            log.info("restarted after a crash: sent 'restore'; pending requests come back")
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            log.warning("the kernel has no 'restore' (Linux < 6.8): requests of the previous daemon are lost")

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for sig in sigs:
                log.info("signal %s: unmounting and exiting", signal.Signals(sig).name)
                self._shutdown.set()

    async def _unmount_all(self) -> None:
        for fsid, s in list(self.mounts.items()):
            try:
                await trio.to_thread.run_sync(fsmount.umount, s.rec.mountpoint)
            except OSError as e:
                if e.errno == errno.EBUSY:
                    log.warning("%s is busy: detaching it lazily", s.rec.mountpoint)
                    await trio.to_thread.run_sync(fsmount.umount, s.rec.mountpoint, True)
                elif e.errno != errno.EINVAL:  # EINVAL: not mounted any more
                    log.error("cannot unmount %s: %s", s.rec.mountpoint, e.strerror)
            self._forget(fsid)
            log.info("unmounted %s", s.rec.mountpoint)

    # ------------------------------------------------------------------------------------------ mounts
    def _forget(self, fsid: str) -> None:
        s = self.mounts.pop(fsid, None)
        state.remove(self.settings.mounts_dir, fsid)
        if s is not None and s not in self.retired:
            self.retired.append(s)  # cache objects of its blobs may still be served through it
            self._prune_retired()

    def _prune_retired(self) -> None:
        """Close the retired mounts that no open cache object needs any more: a blob object is served through a
        live mount that has the blob if there is one, else through a retired one."""
        if not self.retired:
            return
        live = {(m.rec.volume_key, b.blob_id) for m in self.mounts.values() for b in m.image.blobs}
        needed = {(o.volume, o.key) for o in (*self.objects.values(), *self.draining)} - live
        keep = []
        for s in self.retired:
            if s.users or any((s.rec.volume_key, k) in needed
                              for k in (s.rec.fsid, *(b.blob_id for b in s.image.blobs))):
                keep.append(s)
            else:
                close_served(s)
        self.retired = keep
        self.stats["retired_mounts"] = len(keep)
        self._stats_dirty = True

    async def _mount(self, req: dict) -> dict:
        rec = MountRecord(fsid="", domain_id=self.settings.domain_id, bootstrap=os.path.realpath(req["bootstrap"]),
                          mountpoint=os.path.realpath(req["mountpoint"]), blob_dir=req.get("blob_dir"),
                          devices=list(req.get("devices") or []), config=req.get("config"))
        if not os.path.isdir(rec.mountpoint):
            raise FscacheError(f"mountpoint {rec.mountpoint} is not a directory")
        if fsmount.is_mountpoint(rec.mountpoint):
            raise FscacheError(f"mountpoint {rec.mountpoint} is busy: something is already mounted there")
        content_id = await trio.to_thread.run_sync(self._content_id, rec.bootstrap)
        live = set(await trio.to_thread.run_sync(fsmount.mounted_fsids))
        served = await trio.to_thread.run_sync(open_served, rec, self.metrics)
        try:
            for attempt in range(FSID_ATTEMPTS):
                rec.fsid = self._unique_fsid(content_id, live)
                self.mounting.add(rec.fsid)  # reserved before the next await: a concurrent mount picks another
                self.mounts[rec.fsid] = served
                try:
                    state.save(self.settings.mounts_dir, rec)
                    await trio.to_thread.run_sync(fsmount.mount, rec)
                    break
                except OSError as e:
                    self.mounts.pop(rec.fsid, None)
                    state.remove(self.settings.mounts_dir, rec.fsid)
                    if e.errno == errno.EEXIST and attempt + 1 < FSID_ATTEMPTS:
                        # the domain still holds this fsid (an image unmounted moments ago, another daemon's
                        # mount): the next name will do
                        log.info("fsid %s is taken in domain %s: trying another", rec.fsid, rec.domain_id)
                        live.add(rec.fsid)
                        continue
                    raise FscacheError(f"mount of {rec.bootstrap} on {rec.mountpoint} failed: "
                                       f"{e.strerror} (see dmesg)") from None
                finally:
                    self.mounting.discard(rec.fsid)
        except BaseException:
            # READs of a blob it shares with another mount may be using it right now: retired, it is closed
            # once nobody is
            if self.mounts.get(rec.fsid) is served:
                self.mounts.pop(rec.fsid)
                state.remove(self.settings.mounts_dir, rec.fsid)
            if served not in self.retired:
                self.retired.append(served)
            self._prune_retired()
            raise
        self.had_mounts = True
        log.info("mounted %s on %s (fsid %s, domain %s)", rec.bootstrap, rec.mountpoint, rec.fsid, rec.domain_id)
        return {"fsid": rec.fsid, "mountpoint": rec.mountpoint}

    @staticmethod
    def _content_id(bootstrap: str) -> str:
        """The base of a mount's fsid: derived from the bootstrap's bytes, so that a cached bootstrap file is
        reused only for identical bytes."""
        h = hashlib.sha256()
        try:
            with open(bootstrap, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except OSError as e:
            raise BadImage(f"cannot read image {bootstrap}: {e.strerror}") from None
        return h.hexdigest()[:40]

    def _unique_fsid(self, base: str, live: set[str] | list[str]) -> str:
        """``base``, or for a second, third... mount of the same bootstrap ``base`` cut short + ``-N``: not used by
        our mounts, mounts being set up, or any EROFS mount of the system.  The kernel names each mount in sysfs
        ``<domain>,<fsid>`` cut to 36 characters (``s_sysfs_name``) and refuses a second mount with the same
        name (EEXIST), so names must differ within that length."""
        keep = SYSFS_NAME_MAX - (len(self.settings.domain_id) + 1 if self.settings.domain_id else 0)
        if keep < 8:
            raise FscacheError(f"domain id {self.settings.domain_id!r} is too long for the kernel's mount names")
        taken = {f[:keep] for f in (*self.mounts, *self.mounting, *live)}
        fsid, n = base, 1
        while fsid[:keep] in taken:
            n += 1
            if n > 10 ** (keep - 2):
                raise FscacheError(f"no free fsid for another mount of {base}")
            fsid = f"{base[:keep - len(str(n)) - 1]}-{n}"
        return fsid

    async def _watch_mounts(self) -> None:
        while True:
            await trio.sleep(WATCH_INTERVAL)
            self._check_mounts()

    def _check_mounts(self) -> None:
        live = fsmount.mounted_fsids()
        for fsid in [f for f in self.mounts if f not in live and f not in self.mounting]:
            log.info("%s (fsid %s) was unmounted", self.mounts[fsid].rec.mountpoint, fsid)
            self._forget(fsid)
        if self.had_mounts and not self.mounts and not self.mounting:
            log.info("no mounts left")
            self._shutdown.set()

    # ------------------------------------------------------------------------------------------ the device
    async def _device_loop(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.devfd)
            while True:
                try:
                    buf = os.read(self.devfd, protocol.MSG_BUF_SIZE)
                except BlockingIOError:
                    break
                except OSError as e:
                    log.error("reading %s failed: %s; the cache is dead", protocol.DEVICE, e.strerror)
                    self._shutdown.set()
                    return
                if not buf:
                    break
                try:
                    msg = protocol.parse(buf)
                except protocol.ProtocolError as e:
                    log.error("%s", e)
                    continue
                if isinstance(msg, protocol.ReadMsg):
                    obj = self.objects.get(msg.object_id)
                    if obj is None:
                        log.error("READ %d for unknown object %d: cannot complete it", msg.msg_id, msg.object_id)
                        continue
                    obj.users += 1
                    self.nursery.start_soon(self._read, obj, msg)
                elif isinstance(msg, protocol.OpenMsg):
                    self._open(msg)
                else:
                    self._close(msg)

    def _lookup(self, volume: str, cookie: str) -> tuple[str, Served, BlobInfo | None]:
        """(kind, a mount that has it, the blob); KeyError for a cookie we do not serve."""
        s = self.mounts.get(cookie)
        if s is not None and s.rec.volume_key == volume:
            return "bootstrap", s, None
        for s in list(self.mounts.values()) + self.retired:
            if s.rec.volume_key != volume or s.bootstrap_fd < 0:
                continue
            for b in s.image.blobs:
                if b.blob_id == cookie:
                    return "blob", s, b
        raise KeyError(cookie)

    def _open(self, msg: protocol.OpenMsg) -> None:
        self.stats["opens"] += 1
        self._stats_dirty = True
        try:
            kind, s, blob = self._lookup(msg.volume_key, msg.cookie_key)
            if kind == "bootstrap":
                data_fd = os.dup(s.bootstrap_fd)
                size = os.fstat(data_fd).st_size
            else:
                assert blob is not None
                data_fd, size = -1, blob_size(blob, s.image.blksz)
                blobs = self.stats["blob_opens"]
                blobs[blob.blob_id] = blobs.get(blob.blob_id, 0) + 1
            os.set_inheritable(msg.fd, False)
            obj = Obj(msg.object_id, msg.fd, kind, msg.volume_key, msg.cookie_key, size, data_fd)
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

    def _close(self, msg: protocol.CloseMsg) -> None:
        self.stats["closes"] += 1
        self._stats_dirty = True
        obj = self.objects.pop(msg.object_id, None)
        if obj is None:
            return
        log.debug("CLOSE object %d (%s %s)", obj.object_id, obj.kind, obj.key)
        self._drop(obj)
        if obj.kind == "bootstrap":
            self._check_mounts()
        self._prune_retired()

    def _drop(self, obj: Obj) -> None:
        obj.closed = True
        if obj.users == 0:
            obj.release()
        else:
            self.draining.add(obj)

    def _release_served(self, s: Served) -> None:
        s.users -= 1
        if s.users == 0 and s in self.retired:
            self._prune_retired()

    def _unuse(self, obj: Obj) -> None:
        """A READ or a read-ahead of ``obj`` is over; the last one of a CLOSEd object releases it."""
        obj.users -= 1
        if obj.closed and obj.users == 0:
            obj.release()
            self.draining.discard(obj)
            self._prune_retired()

    # ------------------------------------------------------------------------------------------ READ
    async def _read(self, obj: Obj, msg: protocol.ReadMsg) -> None:
        ok = False
        try:
            with trio.move_on_after(READ_TIMEOUT) as scope:
                if self.read_delay:
                    await trio.sleep(self.read_delay)
                if obj.kind == "bootstrap":
                    await self._fill_bootstrap(obj, msg)
                else:
                    await self._fill_blob(obj, msg)
                ok = True
            if scope.cancelled_caught:
                log.error("READ %d (%s %s, %d+%d) timed out", msg.msg_id, obj.kind, obj.key, msg.offset, msg.length)
        except (RafsError, OSError, KeyError) as e:
            log.error("READ %d (%s %s, %d+%d) failed: %s", msg.msg_id, obj.kind, obj.key, msg.offset, msg.length,
                      f"no mounted image uses blob {e}" if isinstance(e, KeyError) else e)
        except Exception:
            log.exception("READ %d (%s %s) failed: internal error", msg.msg_id, obj.kind, obj.key)
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
            self._stats_dirty = True

    @staticmethod
    def _claim(obj: Obj, required: list[int], extra: list[int]) -> tuple[list[int], list[trio.Event]]:
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
    def _settle(obj: Obj, keys: list[int], done: list[int]) -> None:
        obj.ready.update(done)
        for k in keys:
            obj.inflight.pop(k).set()

    async def _fill_bootstrap(self, obj: Obj, msg: protocol.ReadMsg) -> None:
        """Copy whole aligned windows of the bootstrap: later metadata reads nearby need no READ at all."""
        first = msg.offset // BOOTSTRAP_WINDOW
        last = (msg.offset + msg.length - 1) // BOOTSTRAP_WINDOW
        mine, waits = self._claim(obj, list(range(first, last + 1)), [])
        done: list[int] = []
        try:
            if mine:
                done = await trio.to_thread.run_sync(self._write_windows, obj, mine, limiter=self.limiter)
        finally:
            self._settle(obj, mine, done)
        for ev in waits:
            await ev.wait()
        if len(done) < len(mine) or any(k not in obj.ready for k in range(first, last + 1)):
            raise RafsError("bootstrap window not written")

    @staticmethod
    def _write_windows(obj: Obj, windows: list[int]) -> list[int]:
        size = protocol.round_up(obj.size)
        for w in windows:
            off = w * BOOTSTRAP_WINDOW
            n = min(BOOTSTRAP_WINDOW, size - off)
            protocol.write_aligned(obj.anon_fd, off, os.pread(obj.data_fd, n, off), n)
        return windows

    async def _fill_blob(self, obj: Obj, msg: protocol.ReadMsg) -> None:
        """The chunks covering the READ plus the chunks after them up to ``amplify`` bytes, before completing it
        (small files lie next to each other in a blob: one merged fetch, and a chunk written now is a READ the kernel
        never sends); then, in the background, the next READ_AHEAD x ``amplify`` bytes (sequential readers find
        their next chunks present)."""
        _, s, blob = self._lookup(obj.volume, obj.key)
        assert blob is not None and s.source is not None
        s.users += 1
        try:
            await self._fill_blob_from(obj, msg, s, blob)
        finally:
            self._release_served(s)

    async def _fill_blob_from(self, obj: Obj, msg: protocol.ReadMsg, s: Served, blob: BlobInfo) -> None:
        sync_end = msg.offset + max(msg.length, s.amplify)
        span = min(sync_end + READ_AHEAD * s.amplify, obj.size) - msg.offset
        chunks = await trio.to_thread.run_sync(
            lambda: s.source.meta(blob).chunks_at(msg.offset, max(span, msg.length)),
            limiter=self.limiter)
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
            self.nursery.start_soon(self._fetch_chunks, obj, s, blob, [by_ci[k] for k in later], [], True)
        await self._fetch_chunks(obj, s, blob, [by_ci[k] for k in now], gaps, False)
        for ev in waits:
            await ev.wait()
        missing = [k for k in required if k not in obj.ready]
        if missing:
            raise RafsError(f"{len(missing)} chunk(s) could not be fetched")

    async def _fetch_chunks(self, obj: Obj, s: Served, blob: BlobInfo, chunks: list[ChunkRef],
                            gaps: list[tuple[int, int]], background: bool) -> None:
        """Fill claimed ``chunks`` (and zero ``gaps``) in a worker thread, then settle their claims."""
        done: list[int] = []
        try:
            if chunks or gaps:
                done, nbytes = await trio.to_thread.run_sync(self._write_chunks, obj, s, blob, chunks, gaps,
                                                             limiter=self.limiter)
                st = self.stats
                st["chunks_fetched"] += len(done)
                st["bytes_fetched"] += nbytes
                st["blob_chunks_fetched"][blob.blob_id] = st["blob_chunks_fetched"].get(blob.blob_id, 0) + len(done)
        except (RafsError, OSError) as e:
            if not background:
                raise
            log.warning("read-ahead of blob %s failed: %s", blob.blob_id, e)
        except Exception:
            if not background:
                raise
            # a background task's exception would end the nursery, and with it every mount of the machine
            log.exception("read-ahead of blob %s failed: internal error", blob.blob_id)
        finally:
            self._settle(obj, [c.ci_index for c in chunks], done)
            if background:
                self._unuse(obj)
                self._release_served(s)

    @staticmethod
    def _write_chunks(obj: Obj, s: Served, blob: BlobInfo, chunks: list[ChunkRef],
                      gaps: list[tuple[int, int]]) -> tuple[list[int], int]:
        """Fetch (merged), verify and write whole chunks, and zeros into ``gaps``; on an error retry chunk by chunk so
        the good ones still land."""
        assert s.source is not None
        pairs: list[tuple[ChunkRef, bytes]] = []
        if chunks:
            try:
                pairs = list(zip(chunks, s.source.read_chunks(blob, chunks)))
            except RafsError as e:
                if len(chunks) > 1:
                    log.warning("blob %s: %s; fetching chunk by chunk", blob.blob_id, e)
                for c in chunks if len(chunks) > 1 else ():
                    try:
                        pairs.append((c, s.source.read_chunks(blob, [c])[0]))
                    except RafsError as e1:
                        log.error("blob %s chunk %d: %s", blob.blob_id, c.ci_index, e1)
                if len(chunks) == 1:
                    log.error("blob %s chunk %d: %s", blob.blob_id, chunks[0].ci_index, e)
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

    # ------------------------------------------------------------------------------------------ control socket
    async def _control_loop(self) -> None:
        listener = trio.socket.from_stdlib_socket(self.listener)
        while True:
            conn, _ = await listener.accept()
            self.nursery.start_soon(self._serve_conn, conn)

    async def _serve_conn(self, conn) -> None:
        with conn:
            buf = b""
            while not buf.endswith(b"\n") and len(buf) < 1 << 20:
                part = await conn.recv(65536)
                if not part:
                    return
                buf += part
            try:
                req = json.loads(buf)
                reply = {"ok": True, **await self._handle(req)}
            except Exception as e:  # any request, however malformed, gets an answer, never the daemon's end
                if not isinstance(e, (RafsError, OSError, ValueError, KeyError, TypeError, AttributeError)):
                    log.exception("control request failed")
                reply = {"ok": False, "error": str(e) if isinstance(e, RafsError) else f"{type(e).__name__}: {e}"}
            data = memoryview(json.dumps(reply).encode() + b"\n")
            try:
                while data:
                    data = data[await conn.send(data):]
            except OSError:
                pass

    async def _handle(self, req: dict) -> dict:
        op = req.get("op")
        if op == "mount":
            return await self._mount(req)
        if op == "status":
            return {"pid": os.getpid(), "supervisor": os.getppid(), "restored": self.restored,
                    "mounts": [{"fsid": f, "mountpoint": s.rec.mountpoint, "bootstrap": s.rec.bootstrap}
                               for f, s in self.mounts.items()]}
        if op == "stats":
            return {"stats": self.stats, "cache": self.metrics.snapshot()}
        if op == "shutdown":
            self._shutdown.set()
            return {}
        raise FscacheError(f"unknown request {op!r}")

    # ------------------------------------------------------------------------------------------ stats
    async def _stats_writer(self) -> None:
        while True:
            await trio.sleep(0.5)
            if self._stats_dirty:
                self._write_stats()

    def _write_stats(self) -> None:
        self._stats_dirty = False
        try:
            write_text(self.settings.stats_path, json.dumps(self.stats))
        except OSError as e:
            log.warning("cannot write %s: %s", self.settings.stats_path, e.strerror)


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fscache_backend.daemon",
                                description="the rafsfs fscache daemon (started by the supervisor)")
    p.add_argument("--devfd", type=int, required=True)
    p.add_argument("--listen-fd", type=int, required=True)
    p.add_argument("--restore", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format=f"rafsfs: fscache[{os.getpid()}] %(levelname)s: %(message)s")
    listener = socket.socket(fileno=args.listen_fd)
    d = Daemon(args.devfd, listener, Settings.from_env(), args.restore)
    t0 = time.monotonic()
    trio.run(d.run)
    log.debug("ran %.1f s", time.monotonic() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
