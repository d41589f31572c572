"""``rafsfs-nydusd``: a drop-in for nydusd as nydus-snapshotter launches it (``--nydusd /path/to/rafsfs-nydusd``).

    rafsfs-nydusd fuse --config C.json --bootstrap B --mountpoint M --apisock S [--log-level L] [--log-file F] ...
    rafsfs-nydusd singleton --fscache DIR --apisock S ...   (nydusd's shared fscache daemon: fscache_backend.singleton)
    rafsfs-nydusd --version

nydusd's JSON config (``device.backend``/``device.cache``, ``digest_validate``, ...) names the blob backend and cache
work dir; the blobs are the ones the bootstrap's blob table names.  The image is mounted read-only at
``--mountpoint`` in the best mode the machine has: ``$RAFSFS_NYDUSD_MODE`` = ``auto`` (the default: fanotify where the
kernel and the cache directory allow it, else FUSE), ``fanotify`` or ``fuse``; the daemon API on ``--apisock`` reports ``INIT`` until the mount is in place and then ``RUNNING``.
SIGTERM (what the snapshotter sends) or ``PUT /api/v1/daemon/exit`` unmounts and exits 0.  Flags nydusd has and this
daemon does not need (``--thread-num``, ``--log-rotation-size``, ``--id``, ``--supervisor``, ...) are accepted; unknown
ones are logged and ignored, as nydus-snapshotter's newer versions may pass more.

Like ``rafsfs.cli``, this is a front end: it composes the core with a mode (``rafsfs.commands.mount`` chooses it)
in one :class:`rafsfs.daemon.MountSession`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable

from . import __version__
from .api import build_info
from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, RafsError, exit_status

log = logging.getLogger("rafsfs.nydusd")

SUBCOMMANDS = ("fuse", "singleton", "virtiofs")
_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
           "warning": logging.WARNING, "error": logging.ERROR}


def version_text() -> str:
    """nydusd prints its build information as ``Key: \\tvalue`` lines; so do we."""
    b = build_info()
    return (f"Version: \t{b.package_ver}\nGit Commit: \t{b.git_commit}\nBuild Time: \t{b.build_time}\n"
            f"Profile: \t{b.profile}\nRustc: \t{b.rustc}\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rafsfs-nydusd", description="nydusd-compatible daemon: serves a RAFS v6 image (FUSE, or the kernel's "
                                          "EROFS filled on fanotify events) with the nydusd HTTP API (rafsfs "
                                          + __version__ + ")",
        epilog="Environment: RAFSFS_NYDUSD_MODE=auto|fanotify|fuse chooses how 'fuse' mounts are served (default "
               "auto: fanotify where the kernel and the cache directory allow it, else FUSE).")
    p.add_argument("-V", "--version", action="store_true", help="print build information and exit")
    p.add_argument("--config", metavar="FILE", help="nydusd JSON config (backend and cache)")
    p.add_argument("--bootstrap", metavar="FILE", help="RAFS v6 bootstrap to mount")
    p.add_argument("--mountpoint", metavar="DIR", help="where to mount the image (FUSE)")
    p.add_argument("--apisock", metavar="SOCK", help="unix socket for the HTTP API")
    p.add_argument("--id", metavar="ID", help="daemon id reported by the API (default: a random one)")
    p.add_argument("--log-level", default="info", type=str.lower, choices=sorted(_LEVELS),
                   help="log threshold (default: info)")
    p.add_argument("--log-file", metavar="FILE", help="append the log here instead of stderr")
    p.add_argument("--fscache", metavar="DIR", help="singleton: the fscache (cachefiles) directory")
    p.add_argument("--fscache-tag", metavar="TAG", help="singleton: the cachefiles tag")
    p.add_argument("--upgrade", action="store_true", help="hot upgrade (not supported)")
    # accepted because nydus-snapshotter passes them; this daemon does not need them
    p.add_argument("--prefetch-files", metavar="FILE",
                   help="file listing image paths to prefetch (one per line), or the paths separated by commas")
    for flag in ("--thread-num", "--log-rotation-size", "--supervisor", "--failover-policy",
                 "--virtual-mountpoint", "--fscache-threads", "--sock"):
        p.add_argument(flag, metavar="X", help=argparse.SUPPRESS)
    for flag in ("--readonly", "--writable"):
        p.add_argument(flag, nargs="?", const="true", metavar="BOOL", help=argparse.SUPPRESS)
    return p


def _setup_logging(level: str, log_file: str | None) -> None:
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        handler: logging.Handler = logging.FileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])


HOLD_INIT = 30.0  # seconds a state query may wait for the mount (the snapshotter's HTTP timeout is 30 s)
MODE_ENV = "RAFSFS_NYDUSD_MODE"  # fuse | fanotify | auto (default): how the 'fuse' subcommand serves the image


def run_fuse_daemon(args: argparse.Namespace) -> int:
    """Mount ``--bootstrap`` at ``--mountpoint`` and serve it (and the API) until SIGTERM or unmount.

    With a registry backend and a cache the chunk source is built once the mount is up (``deferred``): the
    snapshotter waits for RUNNING, and the registry source (an HTTP stack to import, a probe round trip per blob) is
    built while the runtime sets the container up (fanotify mode opens the cache before its marks, so only its
    HTTP stack, probe and prefetch wait); a state query made while the daemon is still INIT is answered
    as soon as the mount is complete (or the daemon DIED)."""
    from .commands.mount import SESSION_MODES, MountRequest, runner_for, select_mode  # composes the backends
    from .config import load_config
    from .daemon import MountSession, MountSpec

    if not args.bootstrap or not args.mountpoint:
        raise RafsError("fuse mode needs --bootstrap FILE and --mountpoint DIR")
    if args.upgrade:
        raise RafsError("--upgrade (hot upgrade with state takeover) is not supported by rafsfs")
    cfg = load_config(args.config) if args.config else None
    cache_dir = cfg.cache.work_dir if cfg is not None and cfg.cache.type != "none" else None
    mode = select_mode(os.environ.get(MODE_ENV, "auto"), MountRequest(cache_dir=cache_dir, options=()),
                       SESSION_MODES, what=MODE_ENV)
    # both modes report RUNNING before the registry is probed (fanotify builds its cache first, the HTTP stack later)
    deferred = cfg is not None and cfg.backend.type == "registry" and cfg.cache.type != "none"
    spec = MountSpec(bootstrap=args.bootstrap, mountpoint=args.mountpoint, config=cfg,
                     source_mode="deferred" if deferred else "eager", apisock=args.apisock,
                     prefetch=args.prefetch_files, daemon_id=args.id, api_mountpoint="/", hold_init=HOLD_INIT)
    with MountSession(spec, runner_for(mode)) as session:
        session.serve()
    log.info("daemon %s stopped", session.daemon_id)
    return 0


def run_singleton(args: argparse.Namespace) -> int:
    """nydusd's shared fscache daemon (``singleton --fscache DIR``; images bound through ``PUT /api/v2/blobs``)."""
    from fscache_backend.singleton import run  # the front end composes the backend

    from .daemon import new_daemon_id

    return run(args, args.id or new_daemon_id())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = "fuse"
    if argv and argv[0] in SUBCOMMANDS:
        mode = argv.pop(0)
    args, unknown = build_parser().parse_known_args(argv)
    if args.version:
        sys.stdout.write(version_text())
        return 0
    try:
        _setup_logging(args.log_level, args.log_file)
    except OSError as e:
        sys.stderr.write(f"rafsfs-nydusd: error: cannot open log file {args.log_file}: {e.strerror}\n")
        return 1
    if unknown:
        log.info("ignoring arguments this daemon does not use: %s", " ".join(unknown))
    if args.thread_num:
        log.debug("--thread-num %s ignored: the FUSE backend sizes its own worker pool", args.thread_num)
    try:
        run = RUNS.get(mode)
        if run is None:
            raise RafsError(f"{mode} mode is not supported by rafsfs (use fuse)")
        return run(args)
    except (Exception, KeyboardInterrupt) as e:
        status = exit_status(e)
        if status.code == EXIT_INTERRUPTED:
            return status.code
        log.error("%s", status.text if status.kind == "error" else status.line)
        if status.code == EXIT_INTERNAL and args.log_level in ("debug", "trace"):
            traceback.print_exc()
        if args.log_file:  # the snapshotter logs our stderr; say it there too
            sys.stderr.write(f"rafsfs-nydusd: {status.line}\n")
        return status.code


RUNS: dict[str, Callable[[argparse.Namespace], int]] = {"fuse": run_fuse_daemon, "singleton": run_singleton}


if __name__ == "__main__":
    sys.exit(main())
