"""The supervisor: holds the bound /dev/cachefiles fd and the control socket, runs the daemon as a child process and
restarts it after a crash.  Because the supervisor keeps the device open, a daemon killed with SIGKILL loses nothing:
its successor sends ``restore`` and the kernel re-delivers the pending requests (Linux >= 6.8); readers only wait.

The supervisor never reads the device (whatever it read would be taken from the daemon).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from . import control, device, state
from .errors import FscacheError
from .settings import Settings

log = logging.getLogger(__name__)

MAX_RESTARTS = 5  # within RESTART_WINDOW seconds; then give up (the mounts fail with EIO/ENOBUFS)
RESTART_WINDOW = 60.0


def _listen(path: str) -> socket.socket:
    try:
        os.unlink(path)  # stale: nobody answered on it (the caller checked)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    os.chmod(path, 0o600)
    s.listen(64)
    return s


def run(settings: Settings, first_mount: dict | None, verbose: bool = False,
        on_mounted: Callable[[int], None] | None = None, on_online: Callable[[], None] | None = None,
        log_file: str | None = None) -> dict:
    """Bring the cache online, start the daemon, have it make ``first_mount`` (if any); then supervise until the
    daemon exits (all mounts gone, or SIGTERM).  Returns the first mount's reply; raises FscacheError if it failed.

    ``on_online`` is called once the cache is bound and the control socket listens (requests then queue until the
    daemon takes them); ``log_file``: the daemon's stderr goes there.  A singleton (``settings.singleton``)
    daemon dies with its supervisor: a successor must be able to open the device."""
    os.makedirs(settings.run_dir, exist_ok=True)
    devfd = device.open_device()
    try:
        device.bind(devfd, settings.cache_dir, settings.tag)
    except FscacheError:
        os.close(devfd)
        raise
    state.clear(settings.mounts_dir)  # a fresh cache: records of earlier daemons describe nothing alive
    listener = _listen(settings.control_path)
    log.info("cachefiles on-demand cache online in %s (supervisor pid %d)", settings.cache_dir, os.getpid())
    result: dict = {}
    if on_online is not None:
        on_online()

    def do_first_mount() -> None:
        assert first_mount is not None
        try:
            result["reply"] = reply = control.request(settings.control_path, {"op": "mount", **first_mount})
            log.info("mounted %s on %s (fsid %s)", first_mount["bootstrap"], first_mount["mountpoint"], reply["fsid"])
            if on_mounted is not None:
                on_mounted(os.getpid())
        except (OSError, ValueError, FscacheError) as e:
            result["error"] = e
            try:
                control.request(settings.control_path, {"op": "shutdown"}, timeout=30)
            except (OSError, ValueError, FscacheError):
                pass

    stopping = False
    child: subprocess.Popen | None = None

    def on_signal(sig, _frame) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(sig)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    first = threading.Thread(target=do_first_mount, daemon=True)
    restarts: list[float] = []
    stderr = open(log_file, "ab") if log_file else None
    try:
        while True:
            argv = [sys.executable, "-m", "fscache_backend.daemon", "--devfd", str(devfd),
                    "--listen-fd", str(listener.fileno()), "--settings", settings.to_json(),
                    *(["--restore"] if restarts else []), *(["-v"] if verbose else []),
                    *(["--die-with-supervisor", str(os.getpid())] if settings.singleton else [])]
            child = subprocess.Popen(argv, pass_fds=(devfd, listener.fileno()), stdin=subprocess.DEVNULL,
                                     stdout=stderr, stderr=stderr)
            log.info("fscache daemon pid %d started%s", child.pid, " (restore)" if restarts else "")
            if first_mount is not None and not first.is_alive() and not result and not restarts:
                first.start()
            rc = child.wait()
            if rc == 0 or stopping:
                break
            # killed, or died of an internal error: either way the mounts need a daemon again (restore)
            why = signal.Signals(-rc).name if rc < 0 else f"exit status {rc}"
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
            if len(restarts) > MAX_RESTARTS:
                log.error("fscache daemon died %d times within %.0f s: giving up", len(restarts), RESTART_WINDOW)
                break
            log.warning("fscache daemon pid %d died (%s): restarting it", child.pid, why)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if stderr is not None:
            stderr.close()
        if first.is_alive():
            first.join(timeout=5)
        listener.close()
        try:
            os.unlink(settings.control_path)
        except FileNotFoundError:
            pass
        os.close(devfd)  # the last device fd: the cache goes offline
    log.info("supervisor exits")
    if "error" in result:
        raise result["error"] if isinstance(result["error"], FscacheError) else FscacheError(str(result["error"]))
    return result.get("reply", {})
