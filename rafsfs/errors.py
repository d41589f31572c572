"""The core's exception types.

Each mount backend maps these to errno in one function; the CLI maps them to one line and an exit code.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass


class RafsError(Exception):
    """Base of every error the core raises on purpose.  ``str(e)`` is a one-line user message."""

    errno: int = errno.EIO


class BadImage(RafsError):
    """The bootstrap (metadata image) is malformed, truncated or uses something unsupported."""

    errno = errno.EIO


class NotFound(RafsError):
    errno = errno.ENOENT


class NotADirectory(RafsError):
    errno = errno.ENOTDIR


class IsADirectory(RafsError):
    errno = errno.EISDIR


class NoXattr(RafsError):
    errno = errno.ENODATA


class BlobUnavailable(RafsError):
    """A data blob cannot be read (missing, too short, backend failure)."""

    errno = errno.EIO


class CorruptChunk(RafsError):
    """A chunk failed decompression or digest verification."""

    errno = errno.EIO


class BuildError(RafsError):
    """The builder cannot turn the given source into an image."""


class MissingDependency(RafsError):
    """An optional Python module that this feature needs is not installed; the message says how to install it."""


# what each optional module is for and how to get it (pyproject.toml's optional-dependencies)
OPTIONAL_MODULES: dict[str, tuple[str, str]] = {
    "pyfuse3": ("FUSE mounts", "pip install 'rafsfs[fuse]', or on Debian: apt install python3-pyfuse3"),
}


def missing_dependency(name: str) -> MissingDependency | None:
    """The one-line error for a missing optional module ``name`` (None: not an optional module of ours)."""
    known = OPTIONAL_MODULES.get((name or "").split(".")[0])
    if known is None:
        return None
    what, fix = known
    return MissingDependency(f"{what} need the Python module {name.split('.')[0]}, which is not installed: {fix}")


def require_module(name: str) -> None:
    """Raise :class:`MissingDependency` now (cheaply, without importing it) if optional module ``name`` is absent."""
    import importlib.util

    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or sys.modules[name] = None
        found = False
    if not found:
        err = missing_dependency(name)
        raise err if err is not None else MissingDependency(f"the Python module {name} is not installed")


# ------------------------------------------------------------------------------------------------ errors -> exit
EXIT_ERROR = 1
EXIT_USAGE = 2  # argparse's
EXIT_INTERNAL = 70  # EX_SOFTWARE
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process killed by SIGPIPE


@dataclass(frozen=True)
class ExitStatus:
    """How a front end ends for an exception: its exit code and what it says (one line)."""

    code: int
    kind: str  # "error", "internal error", "interrupted", "" (say nothing)
    text: str = ""  # one line

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", " ".join(self.text.split("\n")).replace("\r", " "))

    @property
    def line(self) -> str:
        """``kind: text`` as one line (``kind`` alone when there is no text)."""
        return f"{self.kind}: {self.text}" if self.text else self.kind


def _os_error_text(e: OSError) -> str:
    what = e.strerror or str(e)
    if e.filename is not None:
        name = os.fsdecode(e.filename) if isinstance(e.filename, (bytes, str)) else str(e.filename)
        if e.filename2 is not None:
            name += " -> " + (os.fsdecode(e.filename2) if isinstance(e.filename2, (bytes, str)) else str(e.filename2))
        return f"{name}: {what}"
    return what


def exit_status(e: BaseException) -> ExitStatus:
    """The one error-to-exit mapping of ``rafsfs`` and ``rafsfs-nydusd``."""
    if isinstance(e, BrokenPipeError):
        return ExitStatus(EXIT_BROKEN_PIPE, "")
    if isinstance(e, KeyboardInterrupt):
        return ExitStatus(EXIT_INTERRUPTED, "interrupted")
    if isinstance(e, ModuleNotFoundError):
        missing = missing_dependency(e.name or "")
        if missing is not None:  # an optional dependency: say how to install it
            return ExitStatus(EXIT_ERROR, "error", str(missing))
    if isinstance(e, RafsError):
        return ExitStatus(EXIT_ERROR, "error", str(e))
    if isinstance(e, OSError):
        return ExitStatus(EXIT_ERROR, "error", _os_error_text(e))
    return ExitStatus(EXIT_INTERNAL, "internal error", f"{type(e).__name__}: {e}")  # a bug
