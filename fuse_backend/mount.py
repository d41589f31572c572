"""Run a FUSE mount of one image until unmounted or signalled."""
from __future__ import annotations

import logging
import os
import signal

import pyfuse3
import trio

from rafsfs.errors import RafsError
from rafsfs.image import ChunkSource, RafsImage
from rafsfs.storage.backend.localfs import LocalFsBackend
from rafsfs.storage.recent import RecentChunks

from .operations import RafsOperations

log = logging.getLogger(__name__)

INLINE_MAX = 128 << 10  # with local data, files up to this size are read on the event loop (no thread hop)
READ_AHEAD_KB = 1024  # the kernel then sends up to 1 MiB reads (pyfuse3's max_read option is broken, issue #49)
MAX_TASKS = 64


class MountError(RafsError):
    pass


def preflight(mountpoint: str) -> None:
    """Say in one line why a mount cannot start, before touching FUSE."""
    if os.geteuid() != 0:
        raise MountError("FUSE mounts need root (or CAP_SYS_ADMIN)")
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: load the fuse module or install fuse3")
    if not os.path.isdir(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is busy: something is already mounted there")


def probe_blobs(image: RafsImage, source: ChunkSource | None) -> None:
    """Read one byte of every blob the image names, so that a missing blob or an unreachable registry stops the
    mount with one line instead of turning every later read into EIO."""
    if source is None:
        return
    for blob in image.blobs:
        if not (blob.compressed_size or blob.uncompressed_size):
            continue  # an empty blob: nothing to read
        fully_cached = getattr(source, "fully_cached", None)
        if fully_cached is not None and fully_cached(blob, image):
            continue  # every chunk is in the cache: this mount never needs the backend for it
        try:
            source.read_raw(blob, 0, 1)
        except RafsError as e:
            raise MountError(f"cannot read blob {blob.ref.name}: {e}") from None


def prepare_reads(image: RafsImage, source: ChunkSource | None) -> None:
    """What the first file read would otherwise do: check the blobs (:func:`probe_blobs`) and parse the chunk
    table (~0.2 s for 50k chunks)."""
    probe_blobs(image, source)
    image.chunk_table()


def data_is_local(source: ChunkSource | None) -> bool:
    """True when every read is served from local files (a blob directory, with or without the chunk cache), so
    that a small read never waits on the network."""
    return source is None or isinstance(getattr(source, "backend", None), LocalFsBackend)


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
             ready=None, debug: bool = False, eager: bool = True) -> None:
    """Mount and serve until unmounted (``umount``/``fusermount3 -u``) or SIGTERM/SIGINT; always unmounts.
    ``eager=False``: the caller prepares the read path itself, after the mount is up (:func:`prepare_reads`)."""
    mountpoint = os.path.realpath(mountpoint)  # before mounting: afterwards this would ask our own daemon
    preflight(mountpoint)
    if eager:
        prepare_reads(image, source)
    inline_max = INLINE_MAX if data_is_local(source) else 0
    ops = RafsOperations(image, RecentChunks(source) if source is not None else None, inline_max=inline_max)
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
