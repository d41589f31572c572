"""Mount records, and the orphan check.

The supervisor writes one record per mount (``$RAFSFS_FANOTIFY_RUN``, default ``/run/rafsfs/fanotify``) and removes
it when it stops.  A record whose mount still exists but whose supervisor is gone is an orphaned mount: the group
died with the daemon, so the kernel now answers every read of a hole with zeros (fanotify fails open).
:func:`orphan_message` says so in one line, with the way out; ``rafsfs mount`` and ``rafsfs stats`` call it.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
from dataclasses import asdict, dataclass

from rafsfs.atomic import write_text

_SYS_PIDFD_GETFD = 438  # x86-64 and every architecture using the generic syscall table
_libc = ctypes.CDLL(None, use_errno=True)


UNKNOWN_MOUNT = -1  # in a record written just before mount(2)


def run_dir() -> str:
    return os.environ.get("RAFSFS_FANOTIFY_RUN", "/run/rafsfs/fanotify")


@dataclass
class MountRecord:
    mountpoint: str
    bootstrap: str
    pid: int  # the supervisor (holds the group)
    pid_start: int  # its start time in clock ticks (/proc/PID/stat field 22): pid reuse is not mistaken for it
    mount_id: int
    data_files: list[str]
    fill_fds: list[int]  # the supervisor's descriptor of each data file, opened before its mark (see borrow_fill_fd)


def _path(mountpoint: str) -> str:
    tag = hashlib.sha256(mountpoint.encode()).hexdigest()[:12]
    return os.path.join(run_dir(), f"{mountpoint.strip('/').replace('/', '_')[-80:] or 'root'}-{tag}.json")


def process_start(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return int(text.rsplit(")", 1)[1].split()[19])


def write_record(rec: MountRecord) -> None:
    os.makedirs(run_dir(), exist_ok=True)
    write_text(_path(rec.mountpoint), json.dumps(asdict(rec)))


def read_record(mountpoint: str) -> MountRecord | None:
    try:
        with open(_path(mountpoint)) as f:
            return MountRecord(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def remove_record(mountpoint: str, pid: int | None = None) -> None:
    """Remove the record of ``mountpoint``; with ``pid``, only if that daemon wrote it (a daemon still filling a
    lazily unmounted mount must not remove the record of a new mount at the same place)."""
    if pid is not None:
        rec = read_record(mountpoint)
        if rec is None or rec.pid != pid:
            return
    try:
        os.unlink(_path(mountpoint))
    except FileNotFoundError:
        pass


def mount_ids(target: str) -> list[int]:
    """Mount ids of the mounts at ``target`` (mountinfo; no stat of the mountpoint)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].encode().decode("unicode_escape") == target:
                out.append(int(fields[0]))
    return out


def _other_live_records(*skip: int):
    """The mount records of live fanotify daemons other than the processes ``skip``."""
    try:
        names = os.listdir(run_dir())
    except OSError:
        return
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(run_dir(), name)) as f:
                rec = MountRecord(**json.load(f))
        except (OSError, ValueError, TypeError):
            continue
        if rec.pid not in skip and alive(rec):
            yield rec


def _same_file(path: str, want: os.stat_result) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino)


def borrow_fill_fd(path: str) -> tuple[int, int] | None:
    """(fd, pid): a duplicate of the before-mark descriptor another live fanotify supervisor holds for data file
    ``path``, or None.  A descriptor opened now, with that daemon's mark on the file, would raise pre-content
    events on every write (a daemon filling through it would wait on itself); a ``pidfd_getfd`` duplicate is the
    same open file, which raises none.  Two images sharing a blob then fill one data file without events."""
    try:
        want = os.stat(path)
    except OSError:
        return None
    for rec in _other_live_records(os.getpid()):
        for fd in rec.fill_fds:
            if not _same_file(f"/proc/{rec.pid}/fd/{fd}", want):
                continue
            try:
                pidfd = os.pidfd_open(rec.pid)
            except OSError:
                continue
            try:
                got = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
            finally:
                os.close(pidfd)
            if got >= 0:
                os.set_inheritable(got, False)
                return got, rec.pid
    return None


def shared_with_others(path: str) -> bool:
    """Another live fanotify daemon serves data file ``path`` too (then chunks stored for it must be committed to
    the shared ready map before an answer: that daemon's group sees the same read right after ours)."""
    try:
        want = os.stat(path)
    except OSError:
        return False
    return any(_same_file(p, want) for rec in _other_live_records(os.getppid(), os.getpid()) for p in rec.data_files)


def mount_path(mount_id: int) -> str | None:
    """Where mount ``mount_id`` is now (its mountpoint may have been renamed since), None if it is gone."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if int(fields[0]) == mount_id:
                return fields[4].encode().decode("unicode_escape")
    return None


def alive(rec: MountRecord) -> bool:
    return process_start(rec.pid) == rec.pid_start


def orphan_message(mountpoint: str) -> str | None:
    """One line when ``mountpoint`` is a fanotify mount whose daemon is gone; None otherwise (not ours, healthy, or
    no longer mounted: a stale record is removed)."""
    target = os.path.realpath(mountpoint)
    rec = read_record(target)
    if rec is None:
        return None
    mounted = mount_ids(target)
    if rec.mount_id == UNKNOWN_MOUNT and mounted and not alive(rec):  # killed right after mount(2)
        rec.mount_id = mounted[-1]
    if rec.mount_id not in mounted:
        if not alive(rec):
            remove_record(target)
        return None
    if alive(rec):
        return None
    return (f"{target} is an orphaned fanotify mount: its daemon (pid {rec.pid}) is gone, so data not fetched yet "
            f"reads as zeros instead of being filled; recover: umount {target} (umount -l if busy), then mount "
            f"{rec.bootstrap} again")
