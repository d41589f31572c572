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


def default_apisock(mountpoint: str) -> str:
    """``/run/rafsfs/<mountpoint with / as _>.sock``; a hash of the path when that is too long for a unix socket."""
    name = os.path.realpath(mountpoint).strip("/").replace("/", "_") or "root"
    path = os.path.join(API_SOCKET_DIR, name + ".sock")
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        digest = hashlib.sha256(os.fsencode(os.path.realpath(mountpoint))).hexdigest()[:32]
        path = os.path.join(API_SOCKET_DIR, f"mnt-{digest}.sock")
    return path
