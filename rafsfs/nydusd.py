"""``rafsfs-nydusd``: a drop-in for nydusd as nydus-snapshotter launches it (``--nydusd /path/to/rafsfs-nydusd``).

    rafsfs-nydusd fuse --config C.json --bootstrap B --mountpoint M --apisock S [--log-level L] [--log-file F] ...
    rafsfs-nydusd singleton --fscache DIR --apisock S ...   (nydusd's shared fscache daemon: fscache_backend.singleton)
    rafsfs-nydusd --version

nydusd's JSON config (``device.backend``/``device.cache``, ``digest_validate``, ...) names the blob backend and cache
work dir; the blobs are the ones the bootstrap's blob table names.  The image is mounted read-only with FUSE at
``--mountpoint``; the daemon API on ``--apisock`` reports ``INIT`` until the mount is in place and then ``RUNNING``.
SIGTERM (what the snapshotter sends) or ``PUT /api/v1/daemon/exit`` unmounts and exits 0.  Flags nydusd has and this
daemon does not need (``--thread-num``, ``--log-rotation-size``, ``--id``, ``--supervisor``, ...) are accepted; unknown
ones are logged and ignored, as nydus-snapshotter's newer versions may pass more.

Like ``rafsfs.cli``, this is a front end: it composes the core with ``fuse_backend``.
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import string
import sys
import traceback

from . import __version__
from .api import DaemonState, build_info
from .api.server import DaemonHooks, MountEntry, serve_api
from .errors import RafsError

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
        prog="rafsfs-nydusd", description="nydusd-compatible daemon: serves a RAFS v6 image over FUSE with the "
                                          "nydusd HTTP API (rafsfs " + __version__ + ")")
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
    for flag in ("--thread-num", "--log-rotation-size", "--supervisor", "--prefetch-files", "--failover-policy",
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


def _daemon_id(args: argparse.Namespace) -> str:
    if args.id:
        return args.id
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(20))


HOLD_INIT = 30.0  # seconds a state query may wait for the mount (the snapshotter's HTTP timeout is 30 s)


def run_fuse_daemon(args: argparse.Namespace) -> int:
    """Mount ``--bootstrap`` at ``--mountpoint`` and serve it (and the API) until SIGTERM or unmount.

    The API socket comes first, before the heavy imports and the image: nydus-snapshotter gives the socket 10 s to
    appear but RUNNING only 2 s after that; a state query made while the daemon is still INIT is answered as soon as
    the mount is complete (or the daemon DIED)."""
    if not args.bootstrap or not args.mountpoint:
        raise RafsError("fuse mode needs --bootstrap FILE and --mountpoint DIR")
    if args.upgrade:
        raise RafsError("--upgrade (hot upgrade with state takeover) is not supported by rafsfs")
    daemon_id = _daemon_id(args)
    mountpoint = os.path.realpath(args.mountpoint)
    hooks = DaemonHooks(on_exit=lambda: os.kill(os.getpid(), signal.SIGTERM),  # the FUSE loop unmounts on SIGTERM
                        mounts=[MountEntry(mountpoint="/", bootstrap=os.path.abspath(args.bootstrap))])
    with serve_api(args.apisock, daemon_id, hooks, hold_init=HOLD_INIT) as api:
        try:
            _serve_fuse(args, mountpoint, hooks, ready=api.running if api is not None else None)
        except BaseException:
            if api is not None:
                api.set_state(DaemonState.DIED)
            raise
    log.info("daemon %s stopped", daemon_id)
    return 0


def _serve_fuse(args: argparse.Namespace, mountpoint: str, hooks: DaemonHooks, ready) -> None:
    from fuse_backend.mount import prepare_reads, preflight, run_fuse  # the front end composes the backend

    from .config import load_config
    from .image import RafsImage
    from .storage.open import source_from_config
    from .tools import require_source

    preflight(mountpoint)
    cfg = load_config(args.config) if args.config else None
    paths = _prefetch_paths(args.prefetch_files)  # bad input stops the daemon here, in one line
    image = RafsImage.open(args.bootstrap)
    prefetchers: list = []
    image_in_use = False
    try:
        source = None
        deferred = None
        if cfg is not None and cfg.backend.type == "registry" and cfg.cache.type != "none":
            # the snapshotter waits for RUNNING: the registry source (an HTTP stack to import, a probe round trip
            # per blob) is built while the runtime sets the container up, and a failed probe is logged.  What can
            # fail without the network is checked now.
            from .storage.deferred import DeferredCache

            try:
                os.makedirs(cfg.cache.work_dir, exist_ok=True)
            except OSError as e:
                raise RafsError(f"cannot create cache directory {cfg.cache.work_dir}: {e.strerror}") from None

            def build(metrics):
                cache = source_from_config(cfg, metrics)
                try:
                    prepare_reads(image, cache)  # before the first read is served: it waits for this
                except RafsError as e:  # the mount stays up (the snapshotter waits for it); reads say it again
                    log.error("%s", e)
                return cache

            source = deferred = DeferredCache(build)
            deferred.after_build.append(lambda cache: prefetchers.append(_start_prefetch(paths, image, cache, cfg)))
        elif cfg is not None:
            source = source_from_config(cfg)
        try:
            require_source(image, source)
            if source is not None and cfg is not None:
                hooks.metrics = source.metrics.snapshot
                hooks.backend_type = cfg.backend.type
                hooks.work_dir = cfg.cache.work_dir if cfg.cache.type != "none" else ""
            if deferred is None:
                prefetchers.append(_start_prefetch(paths, image, source, cfg))
                on_ready = ready
            else:
                def on_ready() -> None:
                    if ready is not None:
                        ready()
                    deferred.start()
            log.info("mounting %s on %s (fuse)", args.bootstrap, mountpoint)
            try:
                run_fuse(image, source, mountpoint, fsname="rafsfs", ready=on_ready, eager=deferred is None)
            finally:
                if deferred is not None:
                    deferred.seal()  # no prefetcher starts after this
                for prefetcher in prefetchers:
                    if prefetcher is not None:
                        prefetcher.stop()
        finally:
            if deferred is not None:
                image_in_use = not deferred.close()  # a build still running uses the image
            elif source is not None:
                source.close()
    finally:
        if not image_in_use:
            image.close()


def _prefetch_paths(value: str | None) -> list[str]:
    """nydusd's ``--prefetch-files``: a file listing paths (one per line), or the paths themselves, separated by
    commas or whitespace."""
    if not value:
        return []
    if os.path.isfile(value):
        with open(value, "rb") as f:
            words = [os.fsdecode(w.strip()) for w in f.read().splitlines()]
    else:
        words = value.replace(",", " ").split()
    paths = [w for w in words if w and not w.startswith("#")]
    for p in paths:
        if not p.startswith("/"):
            raise RafsError(f"--prefetch-files: {p!r} is not an absolute path in the image")
    return paths


def _start_prefetch(paths: list[str], image, source, cfg):
    """Background prefetch as nydusd does it: ``fs_prefetch.enable`` reads the image's prefetch table,
    ``fs_prefetch.prefetch_all`` then every blob; ``--prefetch-files`` adds ``paths``.  Always behind on-demand
    reads."""
    from .storage.cache.prefetch import plan_for, start_prefetch

    pf = cfg.prefetch if cfg is not None else None
    if source is None or not (paths or (pf is not None and pf.enable)):
        return None
    plan, threads = plan_for(pf, paths)
    return start_prefetch(image, source, plan, threads)


def run_singleton(args: argparse.Namespace) -> int:
    """nydusd's shared fscache daemon (``singleton --fscache DIR``; images bound through ``PUT /api/v2/blobs``)."""
    from fscache_backend.singleton import run  # the front end composes the backend

    return run(args, _daemon_id(args))


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
        if mode == "fuse":
            return run_fuse_daemon(args)
        if mode == "singleton":
            return run_singleton(args)
        raise RafsError(f"{mode} mode is not supported by rafsfs (use fuse)")
    except KeyboardInterrupt:
        return 130
    except (RafsError, OSError) as e:
        text = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, OSError) and e.filename is not None:
            text = f"{e.filename}: {e.strerror}"
        log.error("%s", text)
        if args.log_file:  # the snapshotter logs our stderr; say it there too
            sys.stderr.write(f"rafsfs-nydusd: error: {text}\n")
        return 1
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback only at debug level
        log.error("internal error: %s: %s", type(e).__name__, e)
        if args.log_level in ("debug", "trace"):
            traceback.print_exc()
        return 70


if __name__ == "__main__":
    sys.exit(main())
