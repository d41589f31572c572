"""Run a FUSE mount of one image until unmounted or signalled."""
from __future__ import annotations

import logging
import os
import signal

import pyfuse3
import trio

from rafsfs.daemon import source_traits
from rafsfs.image import RafsImage
from rafsfs.storage.source import ChunkSource

from .operations import RafsOperations
from .runner import preflight

log = logging.getLogger(__name__)

INLINE_MAX = 128 << 10  # with local data, files up to this size are read on the event loop (no thread hop)
READ_AHEAD_KB = 1024  # the kernel then sends up to 1 MiB reads (pyfuse3's max_read option is broken, issue #49)
MAX_TASKS = 64


def data_is_local(source: ChunkSource | None) -> bool:
    """True when every read is served from local files (a blob directory, with or without the chunk cache), so
    that a small read never waits on the network."""
    return source_traits(source).is_local


def _mount_dev(mountpoint: str) -> str | None:
    """major:minor of the mount at ``mountpoint``, from mountinfo: stat() on our own FUSE mountpoint would send a
    request to this very daemon before its loop runs, and hang."""
    target = mountpoint  # already resolved by the caller: realpath() here would lstat the mount
    dev = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].encode().decode("unicode_escape") == target:
                dev = fields[2]  # the last (topmost) mount wins
    return dev


async def set_read_ahead(mountpoint: str, kb: int = READ_AHEAD_KB) -> None:
    """Raise the mount's read-ahead once the kernel has processed FUSE_INIT (which resets it)."""
    dev = _mount_dev(mountpoint)
    if dev is None:
        log.warning("cannot find %s in mountinfo; read-ahead left as is", mountpoint)
        return
    path = f"/sys/class/bdi/{dev}/read_ahead_kb"
    for _ in range(20):
        await trio.sleep(0.05)
        try:
            with open(path, "w") as f:
                f.write(str(kb))
            with open(path) as f:
                if int(f.read()) == kb:
                    await trio.sleep(0.2)  # and once more in case INIT was answered just now
                    with open(path, "w") as f:
                        f.write(str(kb))
                    return
        except (OSError, ValueError) as e:
            log.warning("cannot raise read-ahead via %s: %s", path, e)
            return


async def _serve(mountpoint: str, ready) -> None:
    async with trio.open_nursery() as nursery:
        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for sig in sigs:  # keep receiving: a second signal must not kill us mid-unmount
                    log.info("signal %s: unmounting", signal.Signals(sig).name)
                    pyfuse3.terminate()

        nursery.start_soon(on_signals)
        nursery.start_soon(set_read_ahead, mountpoint)
        if ready is not None:
            ready()
        await pyfuse3.main(min_tasks=4, max_tasks=MAX_TASKS)
        nursery.cancel_scope.cancel()


def run_fuse(image: RafsImage, source: ChunkSource | None, mountpoint: str, *, fsname: str = "rafsfs",
             ready=None, debug: bool = False, data_local: bool | None = None, enable_xattr: bool = True) -> None:
    """Mount and serve until unmounted (``umount``/``fusermount3 -u``) or SIGTERM/SIGINT; always unmounts.  The
    caller has prepared the read path (:func:`rafsfs.daemon.prepare_reads`); ``data_local``: reads never wait on
    the network (default: asked of ``source``), so small files are read on the event loop."""
    mountpoint = os.path.realpath(mountpoint)  # before mounting: afterwards this would ask our own daemon
    preflight(mountpoint)
    if data_local is None:
        data_local = data_is_local(source)
    inline_max = INLINE_MAX if data_local else 0
    ops = RafsOperations(image, source, inline_max=inline_max,
                         enable_xattr=enable_xattr)
    options = set(pyfuse3.default_options)
    options |= {"ro", f"fsname={fsname}", "subtype=rafs", "allow_other"}
    if debug:
        options.add("debug")
    pyfuse3.init(ops, mountpoint, options)
    log.info("mounted %s on %s", image.name, mountpoint)
    try:
        trio.run(_serve, mountpoint, ready)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # trio has restored the defaults: don't die before unmounting
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", mountpoint)
