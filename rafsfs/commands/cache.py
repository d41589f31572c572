"""``rafsfs cache ls|gc``: list or clean the chunk cache directory."""
from __future__ import annotations

import argparse
import json
import time

from ..tools import format_bytes
from ._common import Parents, add_command, parse_size, println


def register(sub, parents: Parents) -> None:
    cache_dir = argparse.ArgumentParser(add_help=False)
    g = cache_dir.add_argument_group("cache directory")
    g.add_argument("--work-dir", metavar="DIR", help="the cache directory (default: the config's, else "
                   "/var/lib/rafsfs/cache)")
    g.add_argument("--config", metavar="FILE", help="take the cache directory from this storage configuration")
    p = add_command(sub, parents, "cache", lambda a: 2, "list or clean the chunk cache directory",
                    "Inspect the chunk cache: one entry per blob (a data file in the blob's uncompressed layout and "
                    "its ready map).  Entries open in a running daemon are in use and never removed.")
    csub = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    c = csub.add_parser("ls", parents=[parents.common, cache_dir], help="list cached blobs",
                        description="List cached blobs, least recently used first: chunks present / total, bytes "
                                    "on disk, last use, and whether a daemon has the blob open.")
    c.add_argument("--json", action="store_true", help="print a JSON array")
    c.set_defaults(func=run_ls)
    c = csub.add_parser("gc", parents=[parents.common, cache_dir], help="remove cached blobs not in use",
                        description="Remove whole cached blobs that no daemon has open, least recently used first: "
                                    "all of them, or only until the directory holds at most --max-size bytes.")
    c.add_argument("--max-size", metavar="SIZE", type=parse_size,
                   help="stop once the cache holds at most SIZE (bytes, or with a K/M/G suffix)")
    c.set_defaults(func=run_gc)


def _cache_dir(args: argparse.Namespace) -> str:
    from ..config import DEFAULT_WORK_DIR, load_config

    if args.work_dir:
        return args.work_dir
    return load_config(args.config).cache.work_dir if args.config else DEFAULT_WORK_DIR


def run_ls(args: argparse.Namespace) -> int:
    from ..storage.cache.store import list_entries, orphan_metas

    entries = list_entries(_cache_dir(args))
    if args.json:
        println(json.dumps([e.as_dict() for e in entries], indent=1))
        return 0
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        println(f"{e.name}  {e.chunks_ready:>7}/{e.chunks_total:<7} chunks  {format_bytes(e.disk_bytes):>10}  "
                f"{when}  {'in use' if e.in_use else 'idle'}")
    total = sum(e.disk_bytes for e in entries)
    orphans = orphan_metas(_cache_dir(args))
    if orphans:  # removed by the next `rafsfs cache gc`
        total += sum(o.disk_bytes for o in orphans)
        println(f"saved metadata of {len(orphans)} blobs without an entry (or abandoned writes): "
                f"{format_bytes(sum(o.disk_bytes for o in orphans))}")
    println(f"{len(entries)} blobs, {format_bytes(total)} on disk in {_cache_dir(args)}")
    return 0


def run_gc(args: argparse.Namespace) -> int:
    from ..storage.cache.store import evict, usage

    work_dir = _cache_dir(args)
    removed = evict(work_dir, args.max_size)
    println(f"removed {len(removed)} blobs ({format_bytes(sum(e.disk_bytes for e in removed))}); "
            f"{format_bytes(usage(work_dir))} left in {work_dir}")
    return 0
