"""One module per ``rafsfs`` command: each has ``register(sub, parents)`` (its arguments, its help) and
``run(args) -> exit code``.  ``rafsfs.cli`` builds the parser from :data:`COMMANDS`, in this order (the order of
``rafsfs --help``), and maps errors to exit codes."""
from __future__ import annotations

from . import build, cache, cat, check, convert, extract, inspect, ls, mount, pull, stats, umount

COMMANDS = (build, inspect, ls, cat, extract, check, mount, stats, convert, pull, umount, cache)
