"""Run a foreground mount command as a background daemon: its own session, its log in a file, and the parent
returns once the mount is in place (or says in one line why it is not)."""
from __future__ import annotations

import os
import signal
import subprocess
import time

from .api.model import runtime_path
from .errors import RafsError

MOUNT_TIMEOUT = 60.0  # seconds the parent waits for the mount to appear


def default_log_file(mountpoint: str) -> str:
    """``/run/rafsfs/<escaped mountpoint>.log``: distinct mountpoints never share a log (nor an API socket)."""
    return runtime_path(mountpoint, ".log")


def start_daemon(argv: list[str], mountpoint: str, log_file: str) -> subprocess.Popen:
    """Run ``argv`` (a ``mount --foreground``) in its own session, logging to ``log_file``; wait for the mount.
    If it does not come up, the whole session is killed and the daemon's last log line is the error."""
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    with open(log_file, "ab") as logf:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                 start_new_session=True, close_fds=True)
    if not wait_mounted(mountpoint, child):
        try:  # the whole session: an fscache supervisor's daemon, not just the direct child
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.wait()
        with open(log_file, "rb") as f:
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
        last = lines[-1].removeprefix("rafsfs: error: ") if lines else "daemon exited"
        raise RafsError(f"mount failed: {last} (log: {log_file})")
    return child


def wait_mounted(mountpoint: str, child: subprocess.Popen, timeout: float = MOUNT_TIMEOUT) -> bool:
    """True once ``mountpoint`` is a mount point (from mountinfo: a stat could hang on a dying FUSE daemon); False
    when ``child`` exits first or ``timeout`` passes."""
    target = os.path.realpath(mountpoint)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/self/mountinfo") as f:
            if any(line.split()[4] == target for line in f):
                return True
        if child.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def write_pid_file(path: str | None, pid: int) -> None:
    if path:
        with open(path, "w") as f:
            f.write(f"{pid}\n")
