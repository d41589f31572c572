"""What ``rafsfs mount --mode fscache --foreground`` does: hand the mount to the running daemon, or become the
supervisor of a new one (the kernel allows a single cachefiles daemon per machine)."""
from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable

from rafsfs.api.stats import stats_record

from . import control
from .errors import FscacheError
from .mount import is_mountpoint, mounted_fsids
from .served import close_served, open_served
from .settings import Settings
from .state import MountRecord
from .supervisor import run as run_supervisor

log = logging.getLogger(__name__)

# the mount options fscache mode honours (``rafsfs.commands.mount`` refuses the others in one line, whatever the
# kernel, and hands these to :func:`mount_request`).  Not --apisock: the kernel serves the mount and the shared daemon
# has no per-mount nydusd API ('rafsfs stats MOUNTPOINT' asks the daemon).
MOUNT_OPTIONS = frozenset({"--prefetch-files"})


def mount_request(bootstrap: str, mountpoint: str, blob_dir: str | None, devices: list[str],
                  config: str | None, prefetch_files: list[str] | None = None) -> dict:
    """``prefetch_files``: absolute paths in the image (``--prefetch-files``, already parsed), fetched in the
    background once the kernel opens the blobs; a path the image does not have fails the mount in one line."""
    for p in prefetch_files or ():
        if not p.startswith("/"):
            raise FscacheError(f"--prefetch-files: {p!r} is not an absolute path in the image")
    return {"bootstrap": os.path.abspath(bootstrap), "mountpoint": os.path.realpath(mountpoint),
            "blob_dir": os.path.abspath(blob_dir) if blob_dir else None,
            "devices": [os.path.abspath(d) for d in devices], "config": os.path.abspath(config) if config else None,
            "prefetch_files": list(prefetch_files or [])}


def preflight(req: dict) -> None:
    """What can be checked before any daemon starts: the mountpoint, the image, its blob source (one-line errors)."""
    if not os.path.isdir(req["mountpoint"]):
        raise FscacheError(f"mountpoint {req['mountpoint']} is not a directory")
    if is_mountpoint(req["mountpoint"]):
        raise FscacheError(f"mountpoint {req['mountpoint']} is busy: something is already mounted there")
    close_served(open_served(MountRecord(fsid="", domain_id="", **req)))


def delegate(req: dict, settings: Settings | None = None) -> dict | None:
    """Have the running daemon make the mount: its reply, or None when no daemon listens."""
    settings = settings or Settings.from_env()
    try:
        return control.request(settings.control_path, {"op": "mount", **req})
    except (FileNotFoundError, ConnectionRefusedError):
        return None


def mount_foreground(req: dict, settings: Settings | None = None, verbose: bool = False,
                     on_mounted: Callable[[int], None] | None = None) -> int:
    """Returns once the mount is made by an already running daemon, or after serving it (and any later mounts) as a
    new daemon until they are all unmounted or SIGTERM arrives."""
    settings = settings or Settings.from_env()
    preflight(req)
    for _attempt in range(50):
        reply = delegate(req, settings)
        if reply is not None:
            log.info("mounted %s on %s (fsid %s) by the running fscache daemon", req["bootstrap"],
                     req["mountpoint"], reply["fsid"])
            if on_mounted is not None:
                on_mounted(daemon_pids(settings)[0])
            return 0
        try:
            run_supervisor(settings, req, verbose, on_mounted)
            return 0
        except FscacheError as e:
            if e.errno != errno.EBUSY:  # not another daemon holding /dev/cachefiles: a real failure
                raise
        time.sleep(0.1)  # another daemon is starting or exiting right now
    raise FscacheError("/dev/cachefiles stays busy but no rafsfs daemon answers")


def mount_stats(mountpoint: str, settings: Settings | None = None) -> dict | None:
    """``rafsfs stats`` for an fscache mount: the daemon's counters in the shape of
    :func:`rafsfs.api.stats.read_stats`, or None when ``mountpoint`` is not an fscache mount.  The kernel serves
    cache hits from its cache files without asking the daemon, so hits are not known (None); each READ is a miss."""
    mountpoint = os.path.realpath(mountpoint)
    if mountpoint not in mounted_fsids().values():
        return None
    settings = settings or Settings.from_env()
    try:
        status = control.request(settings.control_path, {"op": "status"}, timeout=10)
        if mountpoint not in (m["mountpoint"] for m in status["mounts"]):
            raise FscacheError(f"{mountpoint} is an fscache mount that the rafsfs daemon on "
                               f"{settings.control_path} does not serve")
        reply = control.request(settings.control_path, {"op": "stats"}, timeout=10)
    except OSError as e:
        raise FscacheError(f"{mountpoint} is an fscache mount but no rafsfs daemon answers on "
                           f"{settings.control_path}: {e.strerror or e}") from None
    st = reply["stats"]
    # READs (bootstrap and blobs) are the misses; the failed ones are the errors the kernel saw
    return stats_record(f"fscache daemon pid {st.get('pid')}", "RUNNING", settings.control_path,
                        reply.get("cache", {}), mode="fscache", hits=None, misses=st.get("reads", 0),
                        errors=st.get("read_failures", 0), bytes_served=st.get("read_bytes", 0))


def daemon_pids(settings: Settings | None = None) -> tuple[int, int]:
    """(supervisor pid, daemon pid) of the running fscache daemon."""
    settings = settings or Settings.from_env()
    st = control.request(settings.control_path, {"op": "status"}, timeout=10)
    return st["supervisor"], st["pid"]
