"""The core's exception types.

Each mount backend maps these to errno in one function; the CLI maps them to one line and an exit code.
"""
from __future__ import annotations

import errno


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
