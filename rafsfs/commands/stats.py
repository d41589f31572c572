"""``rafsfs stats``: a running daemon's data-path counters."""
from __future__ import annotations

import argparse
import json
import os

from ..errors import RafsError
from ._common import Parents, add_command, println


def register(sub, parents: Parents) -> None:
    p = add_command(sub, parents, "stats", run, "show a running daemon's data-path counters",
                    "Ask the daemon serving MOUNTPOINT (or listening on --apisock) for its chunk cache counters: "
                    "hits, misses, bytes fetched from the backend and served to readers, fetch latency percentiles "
                    "and in-flight backend requests.  For an fscache mount, the fscache daemon's: every READ the "
                    "kernel sends is a miss (hits never reach the daemon: the kernel serves them from its cache "
                    "files).")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?", help="a mount made by 'rafsfs mount'")
    p.add_argument("--apisock", metavar="SOCK", help="the daemon's API socket instead of MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from ..api import default_apisock
    from ..api.stats import format_stats, read_stats

    if (args.mountpoint is None) == (args.apisock is None):
        raise RafsError("give a MOUNTPOINT or --apisock SOCK (one of them)")
    stats = None
    if args.mountpoint is not None:
        _check_orphan(args.mountpoint)
        from fscache_backend.service import mount_stats  # the front end composes the backend

        stats = mount_stats(args.mountpoint)  # None: not an fscache mount
    sock = os.path.abspath(args.apisock) if args.apisock else default_apisock(os.path.realpath(args.mountpoint))
    if stats is None:
        stats = read_stats(sock)
    println(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def _check_orphan(mountpoint: str) -> None:
    """A fanotify mount whose daemon is gone reads holes as zeros: say so (and how to recover) instead of stats."""
    try:
        from fanotify_backend.records import orphan_message
    except ImportError:
        return
    msg = orphan_message(mountpoint)
    if msg is not None:
        raise RafsError(msg)
