"""Replace a file as a whole: write a private temporary file next to it, then rename it over the target.

Readers see the old file or the new one, never a part; two writers of the same path (two daemons, two ``rafsfs``
commands) each write their own temporary file instead of interleaving in one with a fixed name.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO


@contextmanager
def replacing(path: str, mode: str = "wb") -> Iterator[IO]:
    """``with replacing(path) as f: f.write(...)``: ``path`` is replaced when the block ends without an error;
    on an error the temporary file is removed and ``path`` is left as it was."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the files written here are not secrets
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_text(path: str, text: str) -> None:
    with replacing(path, "w") as f:
        f.write(text)
