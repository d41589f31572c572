"""The fscache daemon: a trio loop over /dev/cachefiles serving every image of the machine's fscache mounts.

The rooms: :mod:`.mounts` (the mount table: images by fsid, sharing rule, retirement), :mod:`.objects` (cache
objects, OPEN/READ/CLOSE), and this module, the loops: restore after a crash, the device, signals, the control
socket and the stats file.

Run by :mod:`fscache_backend.supervisor`, which owns the bound device fd and restarts this process after a crash;
a restarted daemon sends ``restore`` and rebuilds its object table from the kernel's re-OPENs and the persisted mount
records.

Control requests (one JSON line each, see :mod:`.control`): ``mount`` (rafsfs mount), ``bind``/``unbind``/``cull``
(the nydusd API of the singleton), ``status``, ``stats``, ``shutdown``.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import json
import logging
import os
import signal
import socket
import sys
import time

import trio

from rafsfs.atomic import write_text
from rafsfs.errors import RafsError
from rafsfs.storage.metrics import CacheMetrics

from . import protocol
from .errors import FscacheError
from .mounts import MountTable
from .objects import CacheObjects
from .settings import Settings

log = logging.getLogger(__name__)

WATCH_INTERVAL = 1.0  # how often the mount table is checked for mounts that went away
MAX_REQUEST = 1 << 20  # bytes of one control request


class Daemon:
    def __init__(self, devfd: int, listener: socket.socket | None, settings: Settings, restored: bool):
        self.devfd = devfd
        self.listener = listener
        self.settings = settings
        self.restored = restored
        self.metrics = CacheMetrics()  # every image's backend requests, as 'rafsfs stats' shows them
        self.stats: dict = {"pid": os.getpid(), "restored": restored, "opens": 0, "open_errors": 0, "closes": 0,
                            "reads": 0, "reads_bootstrap": 0, "reads_blob": 0, "read_bytes": 0, "read_failures": 0,
                            "chunks_fetched": 0, "bytes_fetched": 0, "blob_opens": {}, "blob_chunks_fetched": {},
                            "binds": 0}
        self.table = MountTable(settings, self.metrics, lambda: self.objects.needed())
        self.table.stats = self.stats
        self.objects = CacheObjects(devfd, self.table, settings, self.stats)
        self._written_stats = ""
        self._shutdown = trio.Event()

    # ------------------------------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        if self.restored:
            self._restore()
        await self.table.load_records()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self.objects.nursery = nursery
            nursery.start_soon(self._device_loop)
            nursery.start_soon(self._control_loop)
            nursery.start_soon(self._watch_mounts)
            nursery.start_soon(self._signals)
            nursery.start_soon(self._stats_writer)
            await self._shutdown.wait()
            await self.table.unmount_all()
            if self.objects.busy():
                # fetch threads cannot be cancelled and a dead backend holds them for its whole deadline: the
                # process ends now, the kernel closes the objects' fds (their READs fail, as they would anyway)
                log.info("exiting with %d fetch(es) still waiting for their backend", self.objects.busy())
                self._write_stats()
                logging.shutdown()
                os._exit(0)
            nursery.cancel_scope.cancel()
        self._write_stats()
        self.objects.release_all()
        self.table.close_all()
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
                log.info("signal %s: %s", signal.Signals(sig).name,
                         "exiting" if self.settings.singleton else "unmounting and exiting")
                self._shutdown.set()

    async def _watch_mounts(self) -> None:
        while True:
            await trio.sleep(WATCH_INTERVAL)
            self._check_mounts()

    def _check_mounts(self) -> None:
        if self.table.check_mounts():
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
                    self.objects.read(msg)
                elif isinstance(msg, protocol.OpenMsg):
                    self.objects.open(msg)
                else:
                    obj = self.objects.close(msg)
                    if obj is not None and obj.kind == "bootstrap":
                        self._check_mounts()

    # ------------------------------------------------------------------------------------------ control socket
    async def _control_loop(self) -> None:
        assert self.listener is not None
        listener = trio.socket.from_stdlib_socket(self.listener)
        while True:
            conn, _ = await listener.accept()
            self.nursery.start_soon(self._serve_conn, conn)

    async def _serve_conn(self, conn) -> None:
        with conn:
            buf = b""
            while not buf.endswith(b"\n") and len(buf) < MAX_REQUEST:
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
                reply = {"ok": False, "error": str(e) if isinstance(e, RafsError) else f"{type(e).__name__}: {e}",
                         "kind": type(e).__name__}
            data = memoryview(json.dumps(reply).encode() + b"\n")
            try:
                while data:
                    data = data[await conn.send(data):]
            except OSError:
                pass

    async def _handle(self, req: dict) -> dict:
        op = req.get("op")
        if op == "mount":
            return await self.table.mount(req)
        if op == "bind":
            return await self.table.bind(req)
        if op == "unbind":
            return self.table.unbind(req["domain_id"], req.get("blob_id"))
        if op == "cull":
            return self._cull(req["blob_id"])
        if op == "status":
            return {"pid": os.getpid(), "supervisor": os.getppid(), "restored": self.restored,
                    "mounts": self.table.status()}
        if op == "stats":
            return {"stats": self.stats, "cache": self.metrics.snapshot()}
        if op == "shutdown":
            self._shutdown.set()
            return {}
        raise FscacheError(f"unknown request {op!r}")

    def _cull(self, key: str) -> dict:
        """nydusd's ``DELETE /api/v2/blobs?blob_id=X``: remove the cache files of cookie ``X`` (an unbound image's
        bootstrap, or a blob no image uses any more) from every EROFS volume, with cachefiles' ``cull``."""
        if any(not (c.isalnum() or c in "-_.") for c in key) or not key:
            raise FscacheError(f"blob id {key[:80]!r}: not a cache key")
        if self.table.in_use(key):
            raise FscacheError(f"blob {key} is in use by a bound image: not culled")
        root = os.path.join(self.settings.cache_dir, "cache")
        culled = []
        try:
            volumes = [v for v in os.listdir(root) if v.startswith("Ierofs,")]
        except FileNotFoundError:
            volumes = []
        here = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for v in volumes:
                for fan in os.listdir(os.path.join(root, v)):
                    d = os.path.join(root, v, fan)
                    if not os.path.exists(os.path.join(d, "D" + key)):
                        continue
                    os.chdir(d)  # cachefiles culls a name in the daemon's working directory
                    try:
                        protocol.command(self.devfd, f"cull D{key}")
                        culled.append(f"{v[1:]}/{fan}")
                    except OSError as e:
                        log.warning("cannot cull %s in %s: %s", key, v[1:], e.strerror)
        finally:
            os.fchdir(here)
            os.close(here)
        log.info("culled %s from %d volume(s)", key, len(culled))
        return {"culled": culled}

    # ------------------------------------------------------------------------------------------ stats
    async def _stats_writer(self) -> None:
        while True:
            await trio.sleep(0.5)
            self._write_stats()

    def _write_stats(self) -> None:
        text = json.dumps(self.stats)
        if text == self._written_stats:
            return
        try:
            write_text(self.settings.stats_path, text, durable=False)  # rewritten every 0.5 s: no fsync in the loop
            self._written_stats = text
        except OSError as e:
            log.warning("cannot write %s: %s", self.settings.stats_path, e.strerror)


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: the kernel kills this process when the supervisor dies.  Needed where a new daemon must
    be able to open /dev/cachefiles once the supervisor is gone (nydus-snapshotter restarts a killed daemon): the
    device stays busy while any process holds it."""
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fscache_backend.daemon",
                                description="the rafsfs fscache daemon (started by the supervisor)")
    p.add_argument("--devfd", type=int, required=True)
    p.add_argument("--listen-fd", type=int, required=True)
    p.add_argument("--restore", action="store_true")
    p.add_argument("--settings", help="the supervisor's settings (JSON); default: from the environment")
    p.add_argument("--die-with-supervisor", type=int, metavar="PID", help="exit when process PID (the parent) does")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s rafsfs: fscache[{os.getpid()}] %(levelname)s: %(message)s")
    if args.die_with_supervisor:
        _die_with_parent()
        if os.getppid() != args.die_with_supervisor:  # it died before the prctl
            return 1
    listener = socket.socket(fileno=args.listen_fd)
    settings = Settings.from_json(args.settings) if args.settings else Settings.from_env()
    if settings.singleton:
        # its images come from registries, and the first PUT waits for this import (seconds on a slow machine):
        # taken now, while the daemon has nothing to do yet
        import rafsfs.storage.backend.registry  # noqa: F401
    d = Daemon(args.devfd, listener, settings, args.restore)
    t0 = time.monotonic()
    trio.run(d.run)
    log.debug("ran %.1f s", time.monotonic() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
