"""What the API talks about: daemon states, build information, errors, and the default socket path."""
from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import asdict, dataclass
from enum import Enum

from .. import __version__
from ..errors import RafsError

API_SOCKET_DIR = "/run/rafsfs"
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL


class DaemonState(str, Enum):
    """The states nydus-snapshotter knows (it waits for RUNNING)."""

    INIT = "INIT"
    READY = "READY"
    RUNNING = "RUNNING"
    DIED = "DIED"
    DESTROYED = "DESTROYED"
    UNKNOWN = "UNKNOWN"


@dataclass(frozen=True)
class BuildInfo:
    """nydusd's ``version`` object; the snapshotter decodes these five keys."""

    package_ver: str
    git_commit: str
    build_time: str
    profile: str
    rustc: str  # nydusd reports its compiler here; we report the Python that runs us

    def to_json(self) -> dict:
        return asdict(self)


def build_info() -> BuildInfo:
    return BuildInfo(package_ver=f"v{__version__}", git_commit="rafsfs", build_time="-", profile="release",
                     rustc=f"{platform.python_implementation()} {platform.python_version()}")


class ApiError(RafsError):
    """An API call failed: carries the HTTP status and nydusd's error ``code`` (e.g. ``NotFound``)."""

    def __init__(self, message: str, status: int = 500, code: str = "Error"):
        super().__init__(message)
        self.status, self.code = status, code


_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.")


def mount_name(mountpoint: str) -> str:
    """A file name that stands for one mountpoint, and for no other: '/' becomes '_', every byte other than letters,
    digits and '.' becomes '%XX' (so '/mnt/a_b' is 'mnt_a%5Fb' and '/mnt/a/b' is 'mnt_a_b'); '/' itself is '_'.
    The path is resolved first.  ('-' is escaped too: hashed names, 'mnt-<hex>', then collide with none.)"""
    raw = os.fsencode(os.path.realpath(mountpoint)).strip(b"/")
    if not raw:
        return "_"
    return "".join("_" if c == 0x2F else chr(c) if c in _PLAIN else f"%{c:02X}" for c in raw)


def runtime_path(mountpoint: str, suffix: str, directory: str = API_SOCKET_DIR) -> str:
    """``DIRECTORY/<mount_name>SUFFIX``; ``DIRECTORY/mnt-<hash of the path>SUFFIX`` when that is too long for a
    unix socket."""
    path = os.path.join(directory, mount_name(mountpoint) + suffix)
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        digest = hashlib.sha256(os.fsencode(os.path.realpath(mountpoint))).hexdigest()[:32]
        path = os.path.join(directory, f"mnt-{digest}{suffix}")
    return path


def default_apisock(mountpoint: str) -> str:
    """``/run/rafsfs/<mount_name>.sock`` (see :func:`mount_name`): distinct mountpoints never share a socket."""
    return runtime_path(mountpoint, ".sock")
