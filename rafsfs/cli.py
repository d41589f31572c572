"""``rafsfs``: the command-line front end.  Each command is a module of :mod:`rafsfs.commands` (its arguments and its
run function); this module builds the parser from them, sets up logging, and turns every error into one line on
stderr and an exit code (:func:`rafsfs.errors.exit_status`, shared with ``rafsfs-nydusd``):

  0 success; 1 an error (bad image, missing blob, I/O error, check found bad files); 2 usage error;
  70 internal error (a bug: rerun with -v for the traceback); 130 interrupted; 141 stdout closed early.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from . import __version__
from .commands import build, cache, cat, check, convert, extract, inspect, ls, mount, pull, stats, umount
from .commands._common import chunk_size, error, make_parents, parse_size  # noqa: F401 (the size types: public)
from .errors import EXIT_BROKEN_PIPE, EXIT_INTERNAL, exit_status
from .tools import clear_progress

log = logging.getLogger("rafsfs")

COMMANDS = (build, inspect, ls, cat, extract, check, mount, stats, convert, pull, umount, cache)  # --help's order


# ------------------------------------------------------------------------------------------------ the parser
def build_parser() -> argparse.ArgumentParser:
    parents = make_parents()
    parser = argparse.ArgumentParser(
        prog="rafsfs", parents=[parents.common],
        description="Build, inspect and unpack Nydus RAFS v6 (and plain uncompressed EROFS) images.",
        epilog="Exit status: 0 success, 1 error, 2 usage error, 70 internal error, 130 interrupted. "
               "Run 'rafsfs COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"rafsfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(sub, parents)
    return parser


# ------------------------------------------------------------------------------------------------ entry point
class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            msg = f"rafsfs: {record.levelname.lower()}: {msg}"
        elif record.levelno < logging.INFO:
            msg = f"rafsfs: debug: {record.name}: {msg}"
        else:
            msg = f"rafsfs: {msg}"
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return msg


class _Handler(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        clear_progress()  # a message must not land on the end of a progress line
        super().emit(record)


def _setup_logging(level: int) -> None:
    handler = _Handler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _quiet_stdout() -> None:
    """stdout's reader went away: point stdout at /dev/null so the interpreter's final flush stays silent."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    level = getattr(args, "log_level", None) or ("debug" if verbose else "info")
    _setup_logging(getattr(logging, level.upper()))
    try:
        code = args.func(args)
        sys.stdout.flush()
        return code
    except (Exception, KeyboardInterrupt) as e:
        status = exit_status(e)
        if status.code == EXIT_BROKEN_PIPE:
            _quiet_stdout()
        elif status.code == EXIT_INTERNAL:
            if verbose:
                traceback.print_exc()
            error(status.line + ("" if verbose else " (run with -v for a traceback)"))
        else:
            error(status.line)
        return status.code


if __name__ == "__main__":
    sys.exit(main())
