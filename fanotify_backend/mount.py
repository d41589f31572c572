"""Run a fanotify-mode mount: the supervisor, and the filler workers it forks.

Survival design A of ``../shared/spec/fanotify-precontent.md`` §7.1:

* The **supervisor** (the mount session's process: :class:`~.runner.FanotifyRunner` calls :func:`serve`) has the
  session's chunk cache open every blob's entry (the data file's
  descriptor BEFORE the mark: writes through it raise no events), creates the pre-content group, marks the data files
  of incomplete blobs (complete ones get no mark: the kernel alone serves them), forks the first worker, waits until it
  reads events, then mounts the bootstrap file-backed with each data file as ``device=``.  It never reads or answers
  events: it only holds the group and the descriptors, re-forks a worker that dies, and unmounts on SIGTERM before the
  group closes.  It forks while other threads may run (the API server; after ready, the session's probe and
  prefetch): a worker touches none of their locks, and the modules it needs are imported in this thread before
  those threads start (the session imports the backend's in ``ready()``), so no fork copies one half-imported.
* A **worker** (forked) inherits all that, builds its own chunk cache over the same entries with the inherited
  before-mark descriptors in place of its own, answers what its predecessor left in the shared journal
  (:meth:`Filler.recover`), then reads events into the journal itself (:class:`~.journal.Journal`) and fills them.
  The session (API socket, prefetch through the session's cache, whose descriptors predate the mark too) stays in
  the supervisor; the worker's counters reach the API through a shared page.
  Workers die with the supervisor (``PR_SET_PDEATHSIG``, then a ``getppid`` check); SIGTERM is blocked around
  fork + record, so no worker is ever left running unrecorded.
* If the supervisor itself dies, the group closes and the kernel fails open: :mod:`.records` lets ``rafsfs mount``
  and ``rafsfs stats`` detect such an orphaned mount.
"""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import mmap
import os
import select
import signal
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from rafsfs import sysmount
from rafsfs.config import RafsConfig
from rafsfs.errors import RafsError
from rafsfs.image import RafsImage

from . import fanotify as fa
from . import records
from .filler import HANDLERS, Filler, Target
from .journal import Journal

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
SYS_EROFS = "/sys/fs/erofs"  # one entry per live EROFS superblock, mounted or lazily detached (erofs-N here)
WORKER_START_TIMEOUT = 120.0  # seconds for the first worker to be reading events (blob metadata, recovery)
RESPAWN_BURST = 5  # worker deaths within RESPAWN_WINDOW before the supervisor slows down re-forking
RESPAWN_WINDOW = 10.0
COMPLETE_CHECK = 0.5  # seconds between checks whether a marked blob became complete (its mark is then removed)
PUBLISH_EVERY = 0.02  # seconds: the API's counters trail the last answer by at most about this
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_libc = ctypes.CDLL(None, use_errno=True)


class FanotifyError(RafsError):
    pass


# ---------------------------------------------------------------------------------------------- the worker
def _worker_main(sup: "_Supervisor", ready_w: int) -> None:
    """The body of a forked worker; never returns."""
    code = 70
    try:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != sup.pid:  # the supervisor died between fork and prctl
            os._exit(0)
        signal.set_wakeup_fd(-1)
        for s in _STOP_SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        _worker(sup, ready_w)
        code = 0
    except BaseException as e:  # noqa: BLE001 - a worker must end in _exit, whatever happened
        msg = str(e) if isinstance(e, RafsError) else f"{type(e).__name__}: {e}"
        if not isinstance(e, RafsError):
            log.exception("fanotify worker failed")
        try:
            os.write(ready_w, b"E" + msg.encode(errors="replace")[:1000])
        except OSError:
            pass
    finally:
        logging.shutdown()
        os._exit(code)


def _worker(sup: "_Supervisor", ready_w: int) -> None:
    """A chunk cache of its own (nothing of the supervisor's threads or locks is touched after the fork), over the
    same entries, writing through the supervisor's before-mark descriptors."""
    from rafsfs.storage.cache.chunk_cache import ChunkCache
    from rafsfs.storage.factory import source_from_config

    cache = source_from_config(sup.cfg)
    if not isinstance(cache, ChunkCache):
        raise FanotifyError("fanotify mode needs a chunk cache")
    targets = []
    for t in sup.targets:
        entry = None
        for blob in t.blobs:
            entry = cache.entry(blob)
        assert entry is not None
        os.dup2(t.fill_fd, entry.data_fd, inheritable=False)  # the before-mark descriptor in place of ours
        entry.refresh()
        targets.append(Target(t.blobs, entry, t.size, t.marked))
    filler = Filler(sup.group, sup.journal, cache, targets, sup.handlers)

    def publish(percentiles: bool = False) -> None:
        sup.stats.publish({**cache.metrics.snapshot(), "fanotify": filler.stats(percentiles)})

    # Answers only wake this thread, the one publisher: every answer is published within ~PUBLISH_EVERY, also the
    # last of a burst (a handler that published itself at most every PUBLISH_EVERY left a burst's tail unpublished
    # until the next COMPLETE_CHECK, so a client reading the counters right after its reads missed requests), and no
    # older snapshot from a slower handler overwrites a newer one.
    answered = threading.Event()
    filler.on_answered = answered.set
    filler.recover()  # before the first read: see journal.py

    def read_events() -> None:
        try:
            filler.run()
        except BaseException:
            log.exception("fanotify event loop failed")
        os._exit(71)

    threading.Thread(target=read_events, name="fanotify-read", daemon=True).start()
    try:
        os.write(ready_w, b"R")
    except OSError:  # a respawned worker: the supervisor does not wait for this
        pass
    os.close(ready_w)
    # the backend's HTTP stack, while the supervisor mounts (a first event meanwhile waits for it); a worker never
    # forks, so a thread may import
    threading.Thread(target=_prepare_quietly, args=(cache,), name="fanotify-prepare", daemon=True).start()
    next_check = 0.0
    while True:  # counters for the API, and marks off blobs that became complete
        if answered.wait(max(0.0, next_check - time.monotonic())):
            answered.clear()
            publish()
            time.sleep(PUBLISH_EVERY)  # answers meanwhile are published together, on the next turn
            if time.monotonic() < next_check:
                continue
        next_check = time.monotonic() + COMPLETE_CHECK
        publish(percentiles=True)
        for t in targets:
            if not t.marked:
                continue
            if 0 in t.entry.ready:
                t.entry.refresh()  # chunks the session's prefetch stored
            if all(cache.fully_cached(b) for b in t.blobs):
                try:
                    fa.remove_mark(sup.group, t.path)
                except OSError as e:
                    if e.errno != errno.ENOENT:
                        raise
                t.marked = False
                log.info("blob %s is complete: mark removed, the kernel reads it alone", t.entry.name)


def _prepare_quietly(cache) -> None:
    try:
        cache.prepare()
    except Exception:  # noqa: BLE001 - the first read builds it again and fails with the reason
        log.exception("fanotify worker: preparing the backend failed")


class SharedStats:
    """The worker's counters, published in shared memory for the supervisor's API (JSON, length-prefixed)."""

    SIZE = 1 << 16

    def __init__(self):
        self.mm = mmap.mmap(-1, self.SIZE, flags=mmap.MAP_SHARED)
        self._lock = threading.Lock()

    def publish(self, stats: dict) -> None:
        raw = json.dumps(stats).encode()
        if len(raw) + 8 <= self.SIZE:
            with self._lock:
                self.mm[8:8 + len(raw)] = raw
                self.mm[0:8] = struct.pack("<Q", len(raw))

    def read(self) -> dict:
        """The latest counters (a read that met a write half-way gives the previous ones)."""
        try:
            (n,) = struct.unpack("<Q", self.mm[0:8])
            if 0 < n <= self.SIZE - 8:
                self._last = json.loads(self.mm[8:8 + n])
        except ValueError:
            pass
        return getattr(self, "_last", {})


def _erofs_superblocks() -> set[str] | None:
    """Names of the live EROFS superblocks (None: not listed here).  An entry stays while a lazily unmounted
    superblock still has open files and goes with the superblock (measured on 6.18)."""
    try:
        return {n for n in os.listdir(SYS_EROFS) if n != "features"}
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------- the supervisor
@dataclass(eq=False)
class _Held:
    """A data file as the supervisor holds it."""

    blobs: list
    path: str
    fill_fd: int  # the session cache's descriptor, opened before the mark
    size: int
    marked: bool = False
    ready: bytearray | None = None


class _Supervisor:
    def __init__(self, image: RafsImage, cfg: RafsConfig, source, mountpoint: str, handlers: int, slots: int):
        self.image = image
        self.cfg = cfg
        self.source = source
        self.mountpoint = mountpoint
        self.handlers = handlers
        self.pid = os.getpid()
        self.targets: list[_Held] = []
        self.devices: list[str] = []
        self.group = -1
        self.journal = Journal(slots)
        self.stats = SharedStats()
        self.worker = 0
        self.worker_fd = -1  # pidfd
        self.deaths: list[float] = []
        self.mount_id = 0
        self.superblocks: set[str] | None = None  # /sys/fs/erofs entries that appeared with our mount
        self.detached = False  # unmounted from outside while the superblock lives on (lazy unmount)
        self.stop = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -------------------------------------------------------------- setting up
    def open_entries(self) -> None:
        by_name: dict[str, _Held] = {}
        for blob in self.image.blobs:
            if not blob.nydus or not blob.blob_id:
                raise FanotifyError(f"{self.image.name}: device {blob.index + 1} is not a Nydus blob; fanotify mode "
                                    "serves blobs through the chunk cache")
            if blob.chunk_count and not blob.uncompressed_size:
                raise FanotifyError(f"{self.image.name}: blob {blob.blob_id} has no uncompressed size")
            entry = self.source.entry(blob)  # BEFORE the mark (module docstring)
            t = by_name.get(entry.name)
            if t is None:
                borrowed = records.borrow_fill_fd(entry.data_path)
                if borrowed is not None:  # another daemon marked it already: use its before-mark descriptor
                    os.dup2(borrowed[0], entry.data_fd, inheritable=False)
                    os.close(borrowed[0])
                    log.info("blob %s: sharing the data file of fanotify daemon %d", entry.name, borrowed[1])
                t = by_name[entry.name] = _Held([], entry.data_path, entry.data_fd,
                                                 max(blob.uncompressed_size, os.fstat(entry.data_fd).st_size),
                                                 ready=entry.ready)
                self.targets.append(t)
            t.blobs.append(blob)
            self.devices.append(t.path)

    def mark(self) -> None:
        self.group = fa.init()
        for t in self.targets:
            if all(b.chunk_count == 0 for b in t.blobs) or (t.ready is not None and 0 not in t.ready):
                continue  # complete: the kernel reads it alone
            fa.add_mark(self.group, t.path)
            t.marked = True
        log.info("%d of %d blob(s) marked for filling", sum(t.marked for t in self.targets), len(self.targets))

    def spawn(self) -> int:
        """Fork a worker (signals blocked until it is recorded); returns the read end of its ready pipe."""
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                os.close(ready_r)
                _worker_main(self, ready_w)  # never returns
            self.worker = pid
            self.worker_fd = os.pidfd_open(pid)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        os.close(ready_w)
        return ready_r

    def wait_ready(self, ready_r: int) -> None:
        """Until the worker reads events; a worker that fails first makes the mount fail with its reason."""
        try:
            r, _, _ = select.select([ready_r], [], [], WORKER_START_TIMEOUT)
            msg = os.read(ready_r, 1100) if r else b"Etook too long to start"
        finally:
            os.close(ready_r)
        if msg != b"R":
            self.kill_worker()
            raise FanotifyError(f"fanotify worker: {msg[1:].decode(errors='replace') or 'died while starting'}")

    def kill_worker(self) -> None:
        if self.worker:
            try:
                os.kill(self.worker, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self.worker, 0)
            os.close(self.worker_fd)
            self.worker, self.worker_fd = 0, -1

    def _record(self) -> None:
        records.write_record(records.MountRecord(self.mountpoint, self.image.name, self.pid,
                                                 records.process_start(self.pid) or 0, self.mount_id, self.devices,
                                                 [t.fill_fd for t in self.targets]))

    def do_mount(self) -> None:
        self.mount_id = records.UNKNOWN_MOUNT
        self._record()  # before the mount: a supervisor killed right after mount(2) still leaves its record
        before = _erofs_superblocks()
        try:
            sysmount.mount_erofs(self.image.name, self.mountpoint, self.devices)
        except OSError as e:
            records.remove_record(self.mountpoint, self.pid)
            raise FanotifyError(f"cannot mount {self.image.name} on {self.mountpoint}: {e.strerror}") from None
        after = _erofs_superblocks()
        # ours, and any other EROFS mounted in the same moment (then we wait for both: never too early)
        self.superblocks = None if before is None or after is None else after - before
        if not self.superblocks:
            self.superblocks = None
            log.warning("cannot tell this mount's EROFS superblock in %s: a lazy unmount while files are open "
                        "would end the filling early", SYS_EROFS)
        ids = records.mount_ids(self.mountpoint)
        self.mount_id = ids[-1] if ids else 0
        self._record()
        log.info("mounted %s on %s (fanotify, supervisor pid %d)", self.image.name, self.mountpoint, self.pid)

    # -------------------------------------------------------------- running
    def _on_signal(self, signum, frame) -> None:
        self.stop = True

    def superblock_alive(self) -> bool:
        """The mount's EROFS superblock still exists (files of a lazily unmounted mount are still open): the group
        must stay, or their holes would read as zeros.  False when it is gone, or cannot be told."""
        if not self.superblocks:
            return False
        now = _erofs_superblocks()
        return bool(now and self.superblocks & now)

    def gone(self) -> bool:
        """The mount (found missing from mountinfo) is gone for good: True unless its superblock lives on, detached
        with files open; then say so once and keep filling."""
        if not self.superblock_alive():
            return True
        if not self.detached:
            self.detached = True
            log.warning("%s was detached while files of it are open (lazy unmount): filling until they are closed",
                        self.mountpoint)
        return False

    def serve(self) -> None:
        mi = open("/proc/self/mountinfo", "rb")
        try:
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            poller.register(mi.fileno(), select.POLLPRI | select.POLLERR)
            poller.register(self.worker_fd, select.POLLIN)
            while True:
                if self.stop:
                    self.stop = False
                    if self.unmount():
                        return
                for fd, _ in poller.poll(1000):
                    if fd == self._wake_r:
                        try:
                            os.read(self._wake_r, 512)
                        except BlockingIOError:
                            pass
                    elif fd == mi.fileno():
                        mi.seek(0)
                        mi.read()
                        if not self.detached and records.mount_path(self.mount_id) is None and self.gone():
                            log.info("%s was unmounted", self.mountpoint)
                            return
                    elif fd == self.worker_fd:
                        poller.unregister(self.worker_fd)
                        self.respawn()
                        poller.register(self.worker_fd, select.POLLIN)
                if self.detached and not self.superblock_alive():
                    log.info("the last file of the detached %s was closed", self.mountpoint)
                    return
        finally:
            mi.close()

    def respawn(self) -> None:
        _, status = os.waitpid(self.worker, 0)
        os.close(self.worker_fd)
        how = f"signal {-os.waitstatus_to_exitcode(status)}" if os.WIFSIGNALED(status) \
            else f"exit {os.waitstatus_to_exitcode(status)}"
        log.warning("fanotify worker %d died (%s): starting another", self.worker, how)
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < RESPAWN_WINDOW] + [now]
        if len(self.deaths) > RESPAWN_BURST:
            time.sleep(1.0)  # a worker that cannot start: readers wait (never zeros), the log says why
        ready_r = self.spawn()
        os.close(ready_r)  # readers wait in the kernel meanwhile; nobody needs to know when it reads

    def unmount(self) -> bool:
        """Unmount before the group closes (fanotify fails open).  False when the mount is busy: keep serving."""
        where = records.mount_path(self.mount_id)
        if where is None:
            return self.gone()  # unmounted already; or detached and in use: closing the group would fail open
        try:
            sysmount.umount(where)
        except OSError as e:
            if records.mount_path(self.mount_id) is None:
                return True
            log.error("cannot unmount %s (%s): still serving it", self.mountpoint, e.strerror)
            return False
        log.info("unmounted %s", self.mountpoint)
        return True

    def close(self) -> None:
        """Worker, then group (the session closes the entries)."""
        self.kill_worker()
        if self.group >= 0:
            os.close(self.group)
            self.group = -1
        records.remove_record(self.mountpoint, self.pid)


def preflight(mountpoint: str) -> None:
    """One line on why a fanotify mount cannot start at ``mountpoint`` (the probe is the mode selection's)."""
    if os.geteuid() != 0:
        raise FanotifyError("fanotify mode needs root (CAP_SYS_ADMIN)")
    if not os.path.isdir(mountpoint):
        raise FanotifyError(f"mountpoint {mountpoint} is not a directory")
    orphan = records.orphan_message(mountpoint)
    if orphan is not None:
        raise FanotifyError(orphan)
    if records.mount_ids(mountpoint):
        raise FanotifyError(f"mountpoint {mountpoint} is busy: something is already mounted there")


def serve(image: RafsImage, cfg: RafsConfig, source, mountpoint: str, *, ready: Callable[[], None] | None = None,
          add_metrics: Callable[[Callable[[], dict]], None] | None = None, handlers: int = HANDLERS,
          journal_slots: int = 16) -> None:
    """Mount ``image`` (kernel EROFS, file-backed, the data files of ``source``, a chunk cache, as its devices) on
    ``mountpoint`` and keep its holes filled until unmounted or SIGTERM/SIGINT/SIGHUP; then unmount (if still
    mounted), stop the worker and close the group, in that order.  Runs in the main thread (signals, and the
    workers' PR_SET_PDEATHSIG follow the thread that forks them).  ``ready`` is called once the mount is up;
    ``add_metrics`` gets a function returning the worker's counters (the API shows them)."""
    if not hasattr(source, "entry"):
        raise FanotifyError("fanotify mode needs a chunk cache (a config with a cache, or a registry reference)")
    sup = _Supervisor(image, cfg, source, mountpoint, handlers, journal_slots)
    old_handlers = {s: signal.signal(s, sup._on_signal) for s in _STOP_SIGNALS}
    old_wakeup = signal.set_wakeup_fd(sup._wake_w)
    mounted = False
    try:
        sup.open_entries()
        sup.mark()
        sup.wait_ready(sup.spawn())
        if sup.stop:
            return
        sup.do_mount()
        mounted = True
        if add_metrics is not None:
            add_metrics(sup.stats.read)
        if ready is not None:
            ready()
        sup.serve()
        mounted = False
    finally:
        if mounted:
            while not sup.unmount():
                time.sleep(1.0)  # never close the group under a mount: it would read holes as zeros
        sup.close()
        signal.set_wakeup_fd(old_wakeup)
        for s, h in old_handlers.items():
            signal.signal(s, h)
