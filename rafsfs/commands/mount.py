"""``rafsfs mount``: serve an image at a mountpoint, in the best mode this machine has (or the one asked for).

This is where the mount modes are composed (the core knows none of them) and the one place a mode is chosen:

* ``fscache``: the kernel's EROFS over on-demand cachefiles; the mount is handed to the machine's one fscache
  daemon (``fscache_backend.service``), started when none runs.
* ``fanotify``: the kernel's EROFS over the chunk cache's data files, filled on fanotify pre-content events
  (``fanotify_backend``, an optional package).
* ``fuse``: pyfuse3 operations (``fuse_backend``).

``auto`` takes the first of these that can serve the request and logs which and why.  The FUSE and fanotify modes
run in a :class:`rafsfs.daemon.MountSession` (this process with ``--foreground``, else a daemon started by
:mod:`rafsfs.daemonize`); a mode plugs in with a :class:`rafsfs.daemon.Runner`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import RafsError
from ._common import Parents, add_command, is_reference, println, reference, registry_options

if TYPE_CHECKING:
    from ..config import RafsConfig

log = logging.getLogger("rafsfs")

MODES = ("fscache", "fanotify", "fuse")  # auto's order of preference


def register(sub, parents: Parents) -> None:
    p = add_command(sub, parents, "mount", run,
                    "mount an image (FUSE, or kernel EROFS over fscache or fanotify); data is fetched lazily",
                    "Mount the image at MOUNTPOINT read-only.  File data is read on demand through the configured "
                    "backend and chunk cache.  Runs in the background unless --foreground; stop it with "
                    "'rafsfs umount MOUNTPOINT' or SIGTERM, which unmount cleanly.", parents.data)
    p.add_argument("source", metavar="SOURCE",
                   help="bootstrap file, or a Nydus image in a registry (REGISTRY/REPO[:TAG|@DIGEST]): only its "
                        "bootstrap layer is fetched, blobs are read lazily; credentials from docker's config.json")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing, empty directory")
    registry_options(p)
    p.add_argument("--work-dir", metavar="DIR", default="/var/lib/rafsfs",
                   help="with a registry reference: where bootstraps (images/) and the chunk cache (cache/) are "
                        "kept (default: %(default)s)")
    p.add_argument("--mode", choices=["fuse", "fscache", "fanotify", "auto"], default="auto",
                   help="fuse (userspace); fscache (the kernel's EROFS over on-demand cachefiles: one daemon serves "
                        "every fscache mount; cache dir $RAFSFS_FSCACHE_DIR, default /var/cache/rafsfs/fscache, on "
                        "ext4/xfs); fanotify (the kernel's EROFS over the chunk cache, filled on fanotify "
                        "pre-content events: needs a cache, Linux 6.14+); or auto, which picks fscache, else "
                        "fanotify, else fuse, and logs which and why; a forced mode that cannot work is an error "
                        "naming the reason (default: auto)")
    p.add_argument("--prefetch-files", metavar="FILE",
                   help="file listing paths (files or directories, one absolute path per line), or the paths "
                        "themselves separated by commas, to fetch into the cache in the background after mounting, "
                        "behind on-demand reads; needs a cache (--config)")
    p.add_argument("--foreground", action="store_true", help="stay in the foreground (tests, systemd)")
    p.add_argument("--log-file", metavar="FILE",
                   help="daemon log (default: /run/rafsfs/<mountpoint>.log, the path escaped: '/' as '_')")
    p.add_argument("--pid-file", metavar="FILE", help="write the daemon's pid here")
    p.add_argument("--apisock", metavar="SOCK",
                   help="the daemon's nydusd-compatible API socket (default: /run/rafsfs/<mountpoint>.sock)")


# ------------------------------------------------------------------------------------------------ choosing a mode
@dataclass(frozen=True)
class MountRequest:
    """What a mode must be able to serve."""

    cache_dir: str | None  # the chunk cache's directory, None without a cache
    options: tuple[str, ...]  # options given that not every mode takes: "--prefetch-files", "--apisock"


def _fscache_problem(req: MountRequest) -> tuple[str | None, str]:
    """(why fscache cannot serve ``req`` or None, what the probe found)."""
    from fscache_backend import service
    from fscache_backend.device import cache_dir_problem, probe
    from fscache_backend.settings import Settings

    # the request first: the same command line must not be taken on one kernel and refused on another
    dropped = [o for o in req.options if o not in service.MOUNT_OPTIONS]  # the options the fscache service honours
    if dropped:
        return f"fscache mode does not take {' or '.join(dropped)}", ""
    ok, why = probe()
    if not ok:
        return why, why
    problem = cache_dir_problem(Settings.from_env().cache_dir)
    if problem is not None:
        return problem, problem
    return None, why


def _fanotify_problem(req: MountRequest) -> tuple[str | None, str]:
    if req.cache_dir is None:
        return "fanotify mode needs a chunk cache (--config with a cache, or a registry reference)", ""
    try:
        from fanotify_backend.probe import unavailable_reason
    except ImportError:
        return "fanotify mode is not installed (no fanotify_backend package)", ""
    why = unavailable_reason(req.cache_dir)
    return why, why or f"the kernel and {req.cache_dir} accept fanotify pre-content marks"


def _fuse_problem(req: MountRequest) -> tuple[str | None, str]:
    return None, "userspace"


PROBES: dict[str, Callable[[MountRequest], tuple[str | None, str]]] = {
    "fscache": _fscache_problem, "fanotify": _fanotify_problem, "fuse": _fuse_problem}


SESSION_MODES = ("fanotify", "fuse")  # the modes that run in a MountSession (what rafsfs-nydusd can serve)


def select_mode(requested: str, req: MountRequest, modes: tuple[str, ...] = MODES, what: str = "--mode") -> str:
    """The mode to mount with.  ``auto``: the first of ``modes`` that can serve ``req``, with one log line saying
    which and why; a forced mode that cannot work is a one-line error with the reason."""
    if requested != "auto":
        if requested not in modes:
            raise RafsError(f"{what} {requested} is not supported here (choose from {', '.join(modes)} or auto)")
        problem, _ = PROBES[requested](req)
        if problem is not None:
            raise RafsError(f"{what} {requested} is not available: {problem} (use {what} fuse or auto)")
        return requested
    passed: list[str] = []
    for mode in modes:
        problem, why = PROBES[mode](req)
        if problem is None:
            because = "; ".join([*passed, why]) if passed else why
            log.info("mode auto: using %s (%s)", mode, because)
            return mode
        passed.append(f"not {mode}: {problem}")
    raise AssertionError("fuse is always available")


def _request(args: argparse.Namespace, cfg: "RafsConfig | None") -> MountRequest:
    if is_reference(args.source):
        cache_dir: str | None = os.path.join(args.work_dir, "cache")  # where prepare_mount's config puts it
    else:
        cache_dir = cfg.cache.work_dir if cfg is not None and cfg.cache.type != "none" else None
    options = tuple(o for o, v in (("--prefetch-files", args.prefetch_files), ("--apisock", args.apisock)) if v)
    return MountRequest(cache_dir=cache_dir, options=options)


# ------------------------------------------------------------------------------------------------ the runners
def runner_for(mode: str):
    """The :class:`rafsfs.daemon.Runner` of a session mode (imported now: a missing package is a one-line error)."""
    if mode == "fuse":
        from fuse_backend.runner import FuseRunner

        return FuseRunner()
    if mode == "fanotify":
        try:
            from fanotify_backend.runner import FanotifyRunner
        except ImportError as e:
            raise RafsError(f"--mode fanotify is not available: {e}") from None
        return FanotifyRunner()
    raise ValueError(f"{mode} mode does not run in a mount session")


# ------------------------------------------------------------------------------------------------ the command
def run(args: argparse.Namespace) -> int:
    from ..storage.factory import config_from_args

    cfg = None if is_reference(args.source) else config_from_args(args.blob_dir, args.device, args.config)
    mode = select_mode(args.mode, _request(args, cfg))
    mountpoint = os.path.realpath(args.mountpoint)
    runner = runner_for(mode) if mode != "fscache" else None
    if runner is not None:
        runner.preflight(mountpoint)
    if is_reference(args.source):  # fetch only the bootstrap; blobs are read lazily from the registry
        _resolve_reference(args)
        cfg = config_from_args(args.blob_dir, args.device, args.config)
    from ..image import RafsImage

    RafsImage.open(args.source).close()  # a bad image fails here, in one line, before anything is mounted
    if mode == "fscache":
        return _mount_fscache(args, mountpoint)
    if not args.foreground:
        return _start_background(args, mountpoint, mode)
    return _serve(args, mountpoint, runner, cfg)


def _resolve_reference(args: argparse.Namespace) -> None:
    from ..oci.pull import prepare_mount

    if args.config:
        raise RafsError("a registry reference brings its own storage configuration: drop --config")
    ref = reference(args, args.source)
    try:
        args.source, args.config = prepare_mount(ref, args.work_dir, platform=args.platform)
    except RafsError as e:
        if ref.registry != "docker.io" or args.source.startswith("docker.io/"):
            raise
        raise RafsError(f"{e} ({args.source} is not a file, so it was taken as a Docker Hub image)") from None


def _apisock(args: argparse.Namespace, mountpoint: str) -> str:
    from ..api import default_apisock

    return os.path.abspath(args.apisock) if args.apisock else default_apisock(mountpoint)


def _serve(args: argparse.Namespace, mountpoint: str, runner, cfg: "RafsConfig | None") -> int:
    """The daemon itself: one mount session until unmounted or SIGTERM."""
    from ..daemon import MountSession, MountSpec

    spec = MountSpec(bootstrap=args.source, mountpoint=mountpoint, config=cfg,
                     apisock=_apisock(args, mountpoint), prefetch=args.prefetch_files, pid_file=args.pid_file,
                     devices_given=len(args.device))
    with MountSession(spec, runner) as session:
        session.serve()
    return 0


def _start_background(args: argparse.Namespace, mountpoint: str, mode: str) -> int:
    from ..daemon import parse_prefetch_list
    from ..daemonize import default_log_file, start_daemon, write_pid_file

    parse_prefetch_list(args.prefetch_files)  # bad input is said here, not in the daemon's log
    prefetch = args.prefetch_files
    if prefetch and os.path.isfile(prefetch):
        prefetch = os.path.abspath(prefetch)
    log_file = args.log_file or default_log_file(mountpoint)
    argv = [sys.executable, "-m", "rafsfs.cli", "mount", os.path.abspath(args.source), mountpoint,
            "--foreground", "--mode", mode, "--apisock", _apisock(args, mountpoint),
            *(["--config", os.path.abspath(args.config)] if args.config else []),
            *(["--blob-dir", os.path.abspath(args.blob_dir)] if args.blob_dir else []),
            *(["--prefetch-files", prefetch] if prefetch else []),
            *[x for d in args.device for x in ("--device", os.path.abspath(d))]]
    child = start_daemon(argv, mountpoint, log_file)
    write_pid_file(args.pid_file, child.pid)
    println(f"mounted {args.source} on {mountpoint} ({mode}, pid {child.pid}, log {log_file})")
    return 0


def _mount_fscache(args: argparse.Namespace, mountpoint: str) -> int:
    """fscache mode: one daemon serves every fscache mount of the machine; this hands the image to it or starts it
    (in the background unless --foreground, like the other modes)."""
    from fscache_backend import service

    from ..daemonize import default_log_file, start_daemon, write_pid_file

    from ..daemon import parse_prefetch_list

    # the options only a service that declares them in MOUNT_OPTIONS gets (select_mode refused them otherwise):
    # prefetch_files as parsed image paths, apisock as an absolute path
    options: dict = {}
    if args.prefetch_files:
        options["prefetch_files"] = parse_prefetch_list(args.prefetch_files)
    if args.apisock:
        options["apisock"] = os.path.abspath(args.apisock)
    req = service.mount_request(args.source, mountpoint, args.blob_dir, args.device, args.config, **options)

    def write_pid(pid: int) -> None:
        write_pid_file(args.pid_file, pid)

    if args.foreground:
        return service.mount_foreground(req, verbose=getattr(args, "verbose", False), on_mounted=write_pid)
    service.preflight(req)
    if service.delegate(req) is not None:  # a daemon is running: it makes the mount
        pid = service.daemon_pids()[0]
        write_pid(pid)
        println(f"mounted {args.source} on {mountpoint} (fscache, by the running daemon, pid {pid})")
        return 0
    log_file = args.log_file or default_log_file(mountpoint)
    argv = [sys.executable, "-m", "rafsfs.cli", "mount", os.path.abspath(args.source), mountpoint, "--foreground",
            "--mode", "fscache", *(["--config", req["config"]] if args.config else []),
            *(["--blob-dir", req["blob_dir"]] if args.blob_dir else []),
            *[x for d in req["devices"] for x in ("--device", d)],
            *(["--prefetch-files", ",".join(options["prefetch_files"])] if options.get("prefetch_files") else []),
            *(["--apisock", options["apisock"]] if "apisock" in options else [])]
    start_daemon(argv, mountpoint, log_file)
    pid = service.daemon_pids()[0]
    write_pid(pid)
    println(f"mounted {args.source} on {mountpoint} (fscache, pid {pid}, log {log_file})")
    return 0
