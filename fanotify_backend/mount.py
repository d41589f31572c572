"""Run a fanotify-mode mount: the supervisor, and the filler workers it forks.

Survival design A of ``../shared/spec/fanotify-precontent.md`` §7.1:

* The **supervisor** (the process that calls :func:`run_fanotify`) opens every blob's cache entry (the data file's
  descriptor BEFORE the mark: writes through it raise no events), creates the pre-content group, marks the data files
  of incomplete blobs (complete ones get no mark: the kernel alone serves them), forks the first worker, waits until it
  reads events, then mounts the bootstrap file-backed with each data file as ``device=``.  It never reads or answers
  events: it only holds the group and the descriptors, re-forks a worker that dies, and unmounts on SIGTERM before the
  group closes.  It stays single-threaded (it forks).
* A **worker** inherits all that, builds the backend and chunk cache over the inherited entries, answers what its
  predecessor left in the shared journal (:meth:`Filler.recover`), then reads events into the journal itself
  (:class:`~.journal.Journal`) and fills them; it also serves the API socket (``rafsfs stats``) and runs prefetch.
  Workers die with the supervisor (``PR_SET_PDEATHSIG``, then a ``getppid`` check); SIGTERM is blocked around
  fork + record, so no worker is ever left running unrecorded.
* If the supervisor itself dies, the group closes and the kernel fails open: :mod:`.records` lets ``rafsfs mount``
  and ``rafsfs stats`` detect such an orphaned mount.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rafsfs import sysmount
from rafsfs.config import RafsConfig
from rafsfs.errors import RafsError
from rafsfs.image import RafsImage
from rafsfs.storage.cache.blob_file import BlobCacheFile, entry_name

from . import fanotify as fa
from . import records
from .filler import HANDLERS, Filler, Target
from .journal import Journal
from .probe import unavailable_reason

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
WORKER_START_TIMEOUT = 120.0  # seconds for the first worker to be reading events (blob metadata, recovery)
RESPAWN_BURST = 5  # worker deaths within RESPAWN_WINDOW before the supervisor slows down re-forking
RESPAWN_WINDOW = 10.0
COMPLETE_CHECK = 0.5  # seconds between checks whether a marked blob became complete (its mark is then removed)
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_libc = ctypes.CDLL(None, use_errno=True)


class FanotifyError(RafsError):
    pass


@dataclass
class FanotifyOptions:
    apisock: str | None = None  # the worker serves the nydusd-compatible API here
    prefetch: object | None = None  # a rafsfs.storage.cache.prefetch.PrefetchPlan, run by each worker
    prefetch_threads: int = 2
    handlers: int = HANDLERS
    journal_slots: int = 16
    extra_metrics: dict = field(default_factory=dict)


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
    from rafsfs.storage.cache.chunk_cache import CacheOptions, ChunkCache
    from rafsfs.storage.open import backend_from_config

    cfg = sup.cfg
    cache = ChunkCache(backend_from_config(cfg), CacheOptions(
        work_dir=cfg.cache.work_dir, verify=cfg.digest_validate, amplify_io=cfg.amplify_io,
        max_size=cfg.cache.max_size))
    for t in sup.targets:
        cache.adopt_entry(t.entry)
    filler = Filler(sup.group, sup.journal, sup.image, cache, sup.targets, sup.opts.handlers)
    filler.recover()  # before the first read: see journal.py
    import threading

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
    _serve_worker(sup, cache, filler)


def _serve_worker(sup: "_Supervisor", cache, filler: Filler) -> None:
    """API, prefetch, and removal of marks from blobs that became complete; until killed."""
    import secrets

    from rafsfs.api.server import DaemonHooks, MountEntry, serve_api
    from rafsfs.storage.cache.prefetch import start_prefetch

    def metrics() -> dict:
        return {**cache.metrics.snapshot(), "fanotify": filler.stats()}

    hooks = DaemonHooks(metrics=metrics, work_dir=sup.cfg.cache.work_dir,
                        on_exit=lambda: os.kill(sup.pid, signal.SIGTERM),
                        mounts=[MountEntry(mountpoint=sup.mountpoint, bootstrap=sup.image.name, mode="fanotify")])
    with serve_api(sup.opts.apisock, secrets.token_hex(10), hooks) as api:
        if sup.opts.prefetch is not None:
            start_prefetch(sup.image, cache, sup.opts.prefetch, sup.opts.prefetch_threads)
        running = False
        while True:
            if not running and records.mount_ids(sup.mountpoint):
                running = True
                if api is not None:
                    api.running()
            for t in sup.targets:
                if t.marked and all(cache.fully_cached(b) for b in t.blobs):
                    try:
                        fa.remove_mark(sup.group, t.path)
                    except OSError as e:
                        if e.errno != errno.ENOENT:
                            raise
                    t.marked = False
                    log.info("blob %s is complete: mark removed, the kernel reads it alone", t.entry.name)
            time.sleep(COMPLETE_CHECK)


# ---------------------------------------------------------------------------------------------- the supervisor
class _Supervisor:
    def __init__(self, image: RafsImage, cfg: RafsConfig, mountpoint: str, opts: FanotifyOptions):
        self.image = image
        self.cfg = cfg
        self.mountpoint = mountpoint
        self.opts = opts
        self.pid = os.getpid()
        self.targets: list[Target] = []
        self.devices: list[str] = []
        self.group = -1
        self.journal = Journal(opts.journal_slots)
        self.worker = 0
        self.worker_fd = -1  # pidfd
        self.deaths: list[float] = []
        self.mount_id = 0
        self.stop = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -------------------------------------------------------------- setting up
    def open_entries(self) -> None:
        by_name: dict[str, Target] = {}
        for blob in self.image.blobs:
            if not blob.nydus or not blob.blob_id:
                raise FanotifyError(f"{self.image.name}: device {blob.index + 1} is not a Nydus blob; fanotify mode "
                                    "serves blobs through the chunk cache")
            if blob.chunk_count and not blob.uncompressed_size:
                raise FanotifyError(f"{self.image.name}: blob {blob.blob_id} has no uncompressed size")
            name = entry_name(blob)
            t = by_name.get(name)
            if t is None:
                entry = BlobCacheFile(self.cfg.cache.work_dir, blob)  # BEFORE the mark (module docstring)
                borrowed = records.borrow_fill_fd(entry.data_path)
                if borrowed is not None:  # another daemon marked it already: use its before-mark descriptor
                    os.dup2(borrowed[0], entry.data_fd, inheritable=False)
                    os.close(borrowed[0])
                    log.info("blob %s: sharing the data file of fanotify daemon %d", name, borrowed[1])
                t = by_name[name] = Target([], entry, max(blob.uncompressed_size, os.fstat(entry.data_fd).st_size),
                                           False)
                self.targets.append(t)
            t.blobs.append(blob)
            self.devices.append(t.path)

    def prepare(self) -> None:
        """What every worker would otherwise redo after each fork: imports, and the blob layouts when the bootstrap
        has a chunk table (pure metadata; nothing here starts a thread or opens a connection)."""
        from rafsfs.errors import BadImage
        from rafsfs.storage.open import backend_from_config  # noqa: F401 - imports only
        from rafsfs.storage.cache import chunk_cache, prefetch  # noqa: F401
        from rafsfs.api import server  # noqa: F401

        if self.cfg.backend.type == "registry":
            from rafsfs.storage.backend import registry  # noqa: F401
        self.image.chunk_table()
        for blob in self.image.blobs:
            try:
                self.image.blob_chunks(blob, 0, 1, None)
            except BadImage:
                pass  # no chunk table: each worker reads blob.meta through the cache when first asked

    def mark(self) -> None:
        self.group = fa.init()
        for t in self.targets:
            if all(b.chunk_count == 0 or 0 not in t.entry.ready for b in t.blobs):
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

    def do_mount(self) -> None:
        try:
            sysmount.mount_erofs(self.image.name, self.mountpoint, self.devices)
        except OSError as e:
            raise FanotifyError(f"cannot mount {self.image.name} on {self.mountpoint}: {e.strerror}") from None
        ids = records.mount_ids(self.mountpoint)
        self.mount_id = ids[-1] if ids else 0
        records.write_record(records.MountRecord(self.mountpoint, self.image.name, self.pid,
                                                 records.process_start(self.pid) or 0, self.mount_id, self.devices,
                                                 [t.entry.data_fd for t in self.targets]))
        log.info("mounted %s on %s (fanotify, supervisor pid %d)", self.image.name, self.mountpoint, self.pid)

    # -------------------------------------------------------------- running
    def _on_signal(self, signum, frame) -> None:
        self.stop = True

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
                        if records.mount_path(self.mount_id) is None:
                            log.info("%s was unmounted", self.mountpoint)
                            return
                    elif fd == self.worker_fd:
                        poller.unregister(self.worker_fd)
                        self.respawn()
                        poller.register(self.worker_fd, select.POLLIN)
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
            return True  # unmounted already
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
        self.kill_worker()
        if self.group >= 0:
            os.close(self.group)
            self.group = -1
        for t in self.targets:
            t.entry.close()
        records.remove_record(self.mountpoint)


def preflight(mountpoint: str, work_dir: str) -> None:
    """One line on why a fanotify mount cannot start here."""
    if not os.path.isdir(mountpoint):
        raise FanotifyError(f"mountpoint {mountpoint} is not a directory")
    orphan = records.orphan_message(mountpoint)
    if orphan is not None:
        raise FanotifyError(orphan)
    if records.mount_ids(mountpoint):
        raise FanotifyError(f"mountpoint {mountpoint} is busy: something is already mounted there")
    reason = unavailable_reason(work_dir)
    if reason is not None:
        raise FanotifyError(f"--mode fanotify is not available: {reason}")


def run_fanotify(image: RafsImage, cfg: RafsConfig, mountpoint: str, options: FanotifyOptions | None = None, *,
                 ready: Callable[[], None] | None = None) -> None:
    """Mount ``image`` (kernel EROFS, file-backed, data files of the chunk cache in ``cfg.cache.work_dir`` as its
    devices) on ``mountpoint`` and keep its holes filled until unmounted or SIGTERM/SIGINT/SIGHUP; then unmount (if
    still mounted), stop the worker and close the group, in that order.  The calling process must be
    single-threaded: it forks the workers.  ``ready`` is called once the mount is up."""
    opts = options or FanotifyOptions()
    mountpoint = os.path.realpath(mountpoint)
    preflight(mountpoint, cfg.cache.work_dir)
    sup = _Supervisor(image, cfg, mountpoint, opts)
    old_handlers = {s: signal.signal(s, sup._on_signal) for s in _STOP_SIGNALS}
    old_wakeup = signal.set_wakeup_fd(sup._wake_w)
    mounted = False
    try:
        sup.open_entries()
        sup.prepare()
        sup.mark()
        sup.wait_ready(sup.spawn())
        if sup.stop:
            return
        sup.do_mount()
        mounted = True
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


# ---------------------------------------------------------------------------------------------- a front end
def main(argv: list[str] | None = None) -> int:
    """``python -m fanotify_backend.mount BOOTSTRAP MOUNTPOINT --config FILE | --blob-dir DIR [--work-dir DIR]``:
    the mode on its own, in the foreground (the tests drive it; ``rafsfs mount --mode fanotify`` is the front end)."""
    import argparse

    from rafsfs.config import DEFAULT_WORK_DIR
    from rafsfs.storage.open import config_from_args

    p = argparse.ArgumentParser(prog="fanotify_backend.mount")
    p.add_argument("bootstrap")
    p.add_argument("mountpoint")
    p.add_argument("--config")
    p.add_argument("--blob-dir")
    p.add_argument("--work-dir", help="cache directory (default: the config's, else " + DEFAULT_WORK_DIR + ")")
    p.add_argument("--apisock")
    p.add_argument("--prefetch-all", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s")
    try:
        cfg = config_from_args(args.blob_dir, None, args.config)
        if cfg is None:
            raise FanotifyError("give --config or --blob-dir")
        if args.work_dir:
            cfg.cache.work_dir = args.work_dir
        prefetch = None
        if args.prefetch_all:
            from rafsfs.storage.cache.prefetch import PrefetchPlan
            prefetch = PrefetchPlan(use_table=False, whole_blobs=True)
        image = RafsImage.open(args.bootstrap)
        run_fanotify(image, cfg, args.mountpoint, FanotifyOptions(apisock=args.apisock, prefetch=prefetch))
    except RafsError as e:
        print(f"rafsfs: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
