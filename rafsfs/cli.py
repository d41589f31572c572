"""``rafsfs``: the command-line front end.  Parses arguments, calls rafsfs.tools / rafsfs.builder, and turns every
error into one line on stderr and an exit code:

  0 success; 1 an error (bad image, missing blob, I/O error, check found bad files); 2 usage error;
  70 internal error (a bug: rerun with -v for the traceback); 130 interrupted; 141 stdout closed early.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from . import __version__
from .errors import RafsError
from .image import RafsImage
from .storage.source import ChunkSource
from .tools import Progress, cat, clear_progress, format_bytes, require_source

if TYPE_CHECKING:
    from .config import RafsConfig
    from .storage.cache.prefetch import Prefetcher

log = logging.getLogger("rafsfs")

EXIT_ERROR = 1
EXIT_INTERNAL = 70  # EX_SOFTWARE
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process killed by SIGPIPE

_SIZE = re.compile(r"(\d+)\s*([KMG]?)(?:i?B)?", re.IGNORECASE)


# ------------------------------------------------------------------------------------------------ argument types
def parse_size(text: str) -> int:
    """'1048576', '64K', '1M', '1MiB' -> bytes (binary units)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 65536, 64K, 1M)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


def chunk_size(text: str) -> int:
    n = parse_size(text)
    if n < 4096 or n > 16 << 20 or n & (n - 1):
        raise argparse.ArgumentTypeError(f"chunk size {text} must be a power of two from 4K to 16M")
    return n


# ------------------------------------------------------------------------------------------------ helpers
def _println(text: str = "") -> None:
    """Print to stdout; names decoded with surrogateescape go back out as their original bytes."""
    sys.stdout.buffer.write(os.fsencode(text) + b"\n")


@contextmanager
def _open_source(args: argparse.Namespace, image: RafsImage,
                 cfg: "RafsConfig | None" = None) -> Iterator[ChunkSource | None]:
    """The chunk source named by --blob-dir / --device / --config (or by ``cfg``), checked against the image."""
    from .storage.factory import config_from_args, source_from_config

    if cfg is None:
        cfg = config_from_args(args.blob_dir, args.device, args.config)
    source = None if cfg is None else source_from_config(cfg)
    try:
        if len(args.device) > len(image.devices):
            raise RafsError(f"{len(args.device)} --device files given, but the image has "
                            f"{len(image.devices)} device slot(s)")
        require_source(image, source)
        yield source
    finally:
        if source is not None:
            source.close()


def _read_prefetch_list(path: str) -> list[str]:
    """One absolute path per line; blank lines and lines starting with '#' are ignored."""
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    out = []
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        if not line.startswith(b"/"):
            raise RafsError(f"{path}, line {n}: {os.fsdecode(line)!r} is not an absolute path")
        out.append(os.fsdecode(line))
    return out


# ------------------------------------------------------------------------------------------------ commands
def cmd_build(args: argparse.Namespace) -> int:
    from .builder import BuildOptions, build

    if len(args.source) > 1:
        return _build_layers(args)
    args.source = args.source[0]
    prefetch = _read_prefetch_list(args.prefetch_list) if args.prefetch_list else []
    start = time.monotonic()
    with Progress("build") as progress:
        result = build(BuildOptions(
            source=args.source, bootstrap=args.bootstrap, blob_dir=args.blob_dir, compressor=args.compressor,
            chunk_size=args.chunk_size, digester=args.digester, prefetch_list=prefetch,
            progress=lambda done, total: progress.update(done, total=total)))
    elapsed = max(time.monotonic() - start, 1e-6)
    _println(f"built {result.bootstrap}: blob {result.blob_id or '(none: no file data)'}, "
             f"{result.files} files, {result.data_bytes} bytes ({format_bytes(result.data_bytes)}), "
             f"{result.chunks} chunks, {result.dedup_chunks} deduplicated, blob {format_bytes(result.blob_size)}, "
             f"{format_bytes(result.data_bytes / elapsed)}/s in {elapsed:.2f}s")
    return 0


def _build_layers(args: argparse.Namespace) -> int:
    from .builder.merge import build_layers

    if args.prefetch_list:
        raise RafsError("--prefetch-list is not supported for multi-layer builds yet")
    start = time.monotonic()
    with Progress("build") as progress:
        done = [0] * len(args.source)

        def step(layer: int, n: int, _total: int) -> None:
            done[layer] = n
            progress.update(sum(done))

        res = build_layers(args.source, args.bootstrap, args.blob_dir, compressor=args.compressor,
                           chunk_size=args.chunk_size, digester=args.digester, progress=step)
    data = sum(lr.data_bytes for lr in res.layers)
    _println(f"built {res.bootstrap} from {len(res.layers)} layers: {len(res.blob_ids)} blobs "
             f"({' '.join(res.blob_ids) or 'none'}), {res.inodes} inodes, {data} bytes ({format_bytes(data)}), "
             f"blobs {format_bytes(sum(lr.blob_size for lr in res.layers))}, {time.monotonic() - start:.2f}s")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .tools.inspect import format_inspect, inspect_image

    with RafsImage.open(args.bootstrap) as image:
        info = inspect_image(image)
    _println(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from .tools.listing import list_path

    with RafsImage.open(args.bootstrap) as image:
        for line in list_path(image, args.path, long=args.long):
            _println(line)
    return 0


def cmd_cat(args: argparse.Namespace) -> int:

    with RafsImage.open(args.bootstrap) as image, _open_source(args, image) as source:
        cat(image, args.path, source, sys.stdout.buffer)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from .tools.extract import extract

    with RafsImage.open(args.bootstrap) as image, _open_source(args, image) as source:
        with Progress("extract") as progress:
            s = extract(image, source, args.dest, progress=progress)
    _println(f"extracted {s.files} files ({s.bytes} bytes, {format_bytes(s.bytes)}), {s.dirs} directories, "
             f"{s.symlinks} symlinks, {s.special} special files, {s.hardlinks} hard links to {args.dest}")
    if s.skipped or s.xattr_failures:
        log.warning("%d device nodes skipped, %d xattrs not set", s.skipped, s.xattr_failures)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .tools.check import check_image

    def on_bad(path: str, reason: str) -> None:
        _error(f"bad: {path}: {reason}")

    with RafsImage.open(args.bootstrap) as image, _open_source(args, image) as source:
        with Progress("check") as progress:
            r = check_image(image, source, on_bad=on_bad, progress=progress)
    if r.metadata_error:
        _error(f"bad: metadata: {r.metadata_error} (the walk stopped here)")
    unverified = ""
    if r.chunks_unverified or r.unverified_bytes:
        unverified = (f", {r.chunks_unverified} chunks and {r.unverified_bytes} bytes unverified "
                      "(the image records no digest for them)")
    _println(f"checked {r.inodes} inodes, {r.files} files, {r.bytes} bytes: {r.chunks_verified} chunks verified"
             f"{unverified}; {len(r.bad) + bool(r.metadata_error)} bad")
    return 0 if r.ok else EXIT_ERROR


def _mode(requested: str) -> str:
    """The mount mode to use: 'auto' probes the kernel (on-demand cachefiles: fscache, else fuse) and logs its choice
    and why; a forced fscache on a kernel without it is an error."""
    if requested == "fuse":
        return "fuse"
    from fscache_backend.device import probe  # the CLI is where backends are composed

    ok, why = probe()
    if ok:
        from fscache_backend.device import cache_dir_problem
        from fscache_backend.settings import Settings

        problem = cache_dir_problem(Settings.from_env().cache_dir)
        if problem is not None:
            ok, why = False, problem
    if requested == "fscache" and not ok:
        raise RafsError(f"--mode fscache is not available: {why} (use --mode fuse or auto)")
    if requested == "auto":
        log.info("mode auto: using %s (%s)", "fscache" if ok else "fuse", why)
    return "fscache" if ok else "fuse"


def _start_daemon(argv: list[str], mountpoint: str, log_file: str) -> "subprocess.Popen":
    """Run ``argv`` (a ``mount --foreground``) in its own session, logging to ``log_file``; wait for the mount."""
    with open(log_file, "ab") as logf:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                 start_new_session=True, close_fds=True)
    if not _wait_mounted(mountpoint, child):
        try:  # the whole session: an fscache supervisor's daemon, not just the direct child
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.wait()
        with open(log_file, "rb") as f:
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
        last = lines[-1].removeprefix("rafsfs: error: ") if lines else "daemon exited"
        raise RafsError(f"mount failed: {last} (log: {log_file})")
    return child


def _mount_fscache(args: argparse.Namespace, mountpoint: str) -> int:
    """fscache mode: one daemon serves every fscache mount of the machine; this hands the image to it or starts it
    (in the background unless --foreground, like the FUSE daemon)."""
    from fscache_backend import service

    req = service.mount_request(args.source, mountpoint, args.blob_dir, args.device, args.config)

    def write_pid(pid: int) -> None:
        if args.pid_file:
            with open(args.pid_file, "w") as f:
                f.write(f"{pid}\n")

    if args.foreground:
        return service.mount_foreground(req, verbose=getattr(args, "verbose", False), on_mounted=write_pid)
    service.preflight(req)
    if service.delegate(req) is not None:  # a daemon is running: it makes the mount
        pid = service.daemon_pids()[0]
        write_pid(pid)
        _println(f"mounted {args.source} on {mountpoint} (fscache, by the running daemon, pid {pid})")
        return 0
    log_file = args.log_file or f"/run/rafsfs/{mountpoint.strip('/').replace('/', '_') or 'root'}.log"
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    argv = [sys.executable, "-m", "rafsfs.cli", "mount", os.path.abspath(args.source), mountpoint, "--foreground",
            "--mode", "fscache", *(["--config", req["config"]] if args.config else []),
            *(["--blob-dir", req["blob_dir"]] if args.blob_dir else []),
            *[x for d in req["devices"] for x in ("--device", d)]]
    _start_daemon(argv, mountpoint, log_file)
    pid = service.daemon_pids()[0]
    write_pid(pid)
    _println(f"mounted {args.source} on {mountpoint} (fscache, pid {pid}, log {log_file})")
    return 0


def _wait_mounted(mountpoint: str, child: "subprocess.Popen", timeout: float = 60.0) -> bool:
    target = os.path.realpath(mountpoint)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/self/mountinfo") as f:
            if any(line.split()[4] == target for line in f):
                return True
        if child.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def cmd_mount(args: argparse.Namespace) -> int:
    mode = _mode(args.mode)
    mountpoint = os.path.realpath(args.mountpoint)
    if mode == "fuse":
        from fuse_backend.mount import preflight, run_fuse  # the CLI is where backends are composed

        preflight(mountpoint)
    if _is_reference(args.source):  # fetch only the bootstrap; blobs are read lazily from the registry
        from .oci.pull import prepare_mount

        if args.config:
            raise RafsError("a registry reference brings its own storage configuration: drop --config")
        ref = _reference(args, args.source)
        try:
            args.source, args.config = prepare_mount(ref, args.work_dir, platform=args.platform)
        except RafsError as e:
            if ref.registry != "docker.io" or args.source.startswith("docker.io/"):
                raise
            raise RafsError(f"{e} ({args.source} is not a file, so it was taken as a Docker Hub image)") from None
    image = RafsImage.open(args.source)  # a bad image fails here, in one line, before anything is mounted
    if mode == "fscache":
        image.close()
        return _mount_fscache(args, mountpoint)
    if not args.foreground:
        image.close()
        log_file = args.log_file or f"/run/rafsfs/{mountpoint.strip('/').replace('/', '_') or 'root'}.log"
        os.makedirs(os.path.dirname(log_file), exist_ok=True)
        argv = [sys.executable, "-m", "rafsfs.cli", "mount", os.path.abspath(args.source), mountpoint,
                "--foreground", "--mode", args.mode, "--apisock", _apisock(args, mountpoint),
                *(["--config", os.path.abspath(args.config)] if args.config else []),
                *(["--blob-dir", os.path.abspath(args.blob_dir)] if args.blob_dir else []),
                *(["--prefetch-files", os.path.abspath(args.prefetch_files)] if args.prefetch_files else []),
                *[x for d in args.device for x in ("--device", os.path.abspath(d))]]
        child = _start_daemon(argv, mountpoint, log_file)
        if args.pid_file:
            with open(args.pid_file, "w") as f:
                f.write(f"{child.pid}\n")
        _println(f"mounted {args.source} on {mountpoint} (fuse, pid {child.pid}, log {log_file})")
        return 0
    from .storage.factory import config_from_args

    cfg = config_from_args(args.blob_dir, args.device, args.config)
    with _open_source(args, image, cfg) as source, _serve_api(args, mountpoint, source) as api:
        if args.pid_file:
            with open(args.pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")
        prefetcher = _start_prefetch(args, image, source, cfg)
        try:
            run_fuse(image, source, mountpoint, ready=api.running)
        finally:
            if prefetcher is not None:
                prefetcher.stop()
    return 0


def _apisock(args: argparse.Namespace, mountpoint: str) -> str:
    from .api import default_apisock

    return os.path.abspath(args.apisock) if args.apisock else default_apisock(mountpoint)


def _serve_api(args: argparse.Namespace, mountpoint: str, source: ChunkSource | None):
    """The daemon's nydusd-compatible API (what 'rafsfs stats' reads), for as long as the mount runs."""
    import secrets

    from .api.server import DaemonHooks, MountEntry, serve_api

    metrics = source.metrics if source is not None else None
    hooks = DaemonHooks(metrics=metrics.snapshot if metrics is not None else None,
                        on_exit=lambda: os.kill(os.getpid(), signal.SIGTERM),  # the FUSE loop unmounts on SIGTERM
                        mounts=[MountEntry(mountpoint=mountpoint, bootstrap=os.path.abspath(args.source))])
    return serve_api(_apisock(args, mountpoint), secrets.token_hex(10), hooks)


def cmd_stats(args: argparse.Namespace) -> int:
    from .api.stats import format_stats, read_stats

    if (args.mountpoint is None) == (args.apisock is None):
        raise RafsError("give a MOUNTPOINT or --apisock SOCK (one of them)")
    stats = None
    if args.mountpoint is not None:
        from fscache_backend.service import mount_stats  # the front end composes the backend

        stats = mount_stats(args.mountpoint)  # None: not an fscache mount
    if stats is None:
        stats = read_stats(_apisock(args, os.path.realpath(args.mountpoint or "/")))
    _println(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def _start_prefetch(args: argparse.Namespace, image: RafsImage, source: ChunkSource | None,
                    cfg: "RafsConfig | None") -> "Prefetcher | None":
    """Background prefetch into the chunk cache: the image's prefetch table and whole blobs as the config's
    ``fs_prefetch`` says (the table by default when no config is given), plus ``--prefetch-files``."""
    from .storage.cache.prefetch import plan_for, start_prefetch

    paths = _read_prefetch_list(args.prefetch_files) if args.prefetch_files else []
    plan, threads = plan_for(cfg.prefetch if cfg is not None and args.config else None, paths)
    return start_prefetch(image, source, plan, threads)


def _cache_dir(args: argparse.Namespace) -> str:
    from .config import DEFAULT_WORK_DIR, load_config

    if args.work_dir:
        return args.work_dir
    return load_config(args.config).cache.work_dir if args.config else DEFAULT_WORK_DIR


def cmd_cache_ls(args: argparse.Namespace) -> int:
    from .storage.cache.store import list_entries

    entries = list_entries(_cache_dir(args))
    if args.json:
        _println(json.dumps([e.as_dict() for e in entries], indent=1))
        return 0
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        _println(f"{e.name}  {e.chunks_ready:>7}/{e.chunks_total:<7} chunks  {format_bytes(e.disk_bytes):>10}  "
                 f"{when}  {'in use' if e.in_use else 'idle'}")
    total = sum(e.disk_bytes for e in entries)
    _println(f"{len(entries)} blobs, {format_bytes(total)} on disk in {_cache_dir(args)}")
    return 0


def cmd_cache_gc(args: argparse.Namespace) -> int:
    from .storage.cache.store import evict, usage

    work_dir = _cache_dir(args)
    removed = evict(work_dir, args.max_size)
    _println(f"removed {len(removed)} blobs ({format_bytes(sum(e.disk_bytes for e in removed))}); "
             f"{format_bytes(usage(work_dir))} left in {work_dir}")
    return 0


def _is_reference(source: str) -> bool:
    """SOURCE names a registry image rather than a file: it does not exist, does not look like a path and has a
    repository part (a bare name is taken as a missing file, not as a Docker Hub image)."""
    return not os.path.exists(source) and "/" in source and not source.startswith(("/", "./", "../", "~"))


def _reference(args: argparse.Namespace, text: str):
    from .oci.reference import parse_reference

    return parse_reference(text, plain_http=args.plain_http, insecure=args.insecure)


def cmd_convert(args: argparse.Namespace) -> int:
    from .oci.convert import ConvertOptions, convert

    stages = {"download": Progress("download"), "build": Progress("build"), "push": Progress("push")}
    try:
        res = convert(ConvertOptions(
            source=_reference(args, args.source), target=_reference(args, args.target), platform=args.platform,
            compressor=args.compressor, chunk_size=args.chunk_size, work_dir=args.work_dir,
            progress=lambda stage, done, total: stages[stage].update(done, total=total or None)))
    finally:
        for pr in stages.values():
            pr.close()
    _println(f"converted {args.source} ({res.layers} layers, {format_bytes(res.source_bytes)}) to {res.target}@"
             f"{res.manifest_digest}: {len(res.blob_ids)} blobs ({format_bytes(res.blob_bytes)}, "
             f"{res.pushed_blobs} uploaded), bootstrap layer {format_bytes(res.bootstrap_bytes)}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from .oci.pull import pull

    with Progress("pull") as progress:
        res = pull(_reference(args, args.ref), args.dest, blobs=args.blobs, platform=args.platform,
                   progress=lambda done, total: progress.update(done, total=total))
    what = f", {len(res.blobs)} blobs in {res.blob_dir}" if res.blob_dir else f", {len(res.blobs)} blobs (not fetched)"
    _println(f"pulled {res.reference}@{res.manifest_digest}: bootstrap {res.bootstrap}{what}; "
             f"{format_bytes(res.bytes_fetched)} fetched")
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from .sysmount import umount

    umount(os.path.realpath(args.mountpoint), lazy=args.lazy)
    return 0


# ------------------------------------------------------------------------------------------------ the parser
def _registry_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("registry", "localhost and 127.0.0.1 registries speak plain HTTP, others HTTPS")
    g.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="the image to use from a multi-platform index (default: this host's)")
    g.add_argument("--plain-http", action="store_true", help="use plain HTTP for every registry")
    g.add_argument("--insecure", action="store_true", help="HTTPS without certificate verification")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("logging")
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="log debug messages and show a traceback for internal errors")
    g.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=argparse.SUPPRESS,
                   help="log threshold on stderr (default: info, or debug with -v); 'warning' hides progress")

    data = argparse.ArgumentParser(add_help=False)
    g = data.add_argument_group(
        "file data", "Where the image's data blobs are.  Not needed when all data is inside the image file.")
    g.add_argument("--blob-dir", metavar="DIR",
                   help="directory holding the blobs, each named by its 64-hex-digit blob id")
    g.add_argument("--device", metavar="FILE", action="append", default=[],
                   help="file for the next device slot, in slot order (like the kernel's -o device=); repeat for "
                        "several; slots without one are looked up in --blob-dir")
    g.add_argument("--config", metavar="FILE",
                   help="storage configuration: nydusd's JSON config or the fscache-shaped one "
                        "({\"type\": \"bootstrap\", \"config\": {\"backend_type\": ...}}); names the backend "
                        "(localfs or registry) and the cache; --blob-dir/--device override its blob location")

    parser = argparse.ArgumentParser(
        prog="rafsfs", parents=[common],
        description="Build, inspect and unpack Nydus RAFS v6 (and plain uncompressed EROFS) images.",
        epilog="Exit status: 0 success, 1 error, 2 usage error, 70 internal error, 130 interrupted. "
               "Run 'rafsfs COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"rafsfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str, description: str,
                *extra: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common, *extra], help=help, description=description)
        p.set_defaults(func=func)
        return p

    p = command("build", cmd_build, "build a RAFS v6 image (bootstrap + one blob) from a directory or layer tar",
                "Build a Nydus RAFS v6 bootstrap and one data blob from SOURCE.  The blob is written into "
                "--blob-dir, named by its id.  Prints one summary line.")
    p.add_argument("source", metavar="SOURCE", nargs="+",
                   help="a directory, or an OCI layer tarball (.tar, .tar.gz/.tgz, .tar.zst); several tarballs "
                        "(bottom layer first) make one merged bootstrap with one blob per layer, whiteouts applied")
    p.add_argument("--bootstrap", metavar="FILE", required=True, help="bootstrap (metadata image) to write")
    p.add_argument("--blob-dir", metavar="DIR", required=True, help="directory the data blob is written to")
    p.add_argument("--compressor", choices=["zstd", "lz4", "none"], default="zstd",
                   help="chunk compression (default: %(default)s; lz4 means raw LZ4 blocks)")
    p.add_argument("--chunk-size", metavar="SIZE", type=chunk_size, default=1 << 20,
                   help="chunk size in bytes, or with a K/M suffix; a power of two from 4K to 16M (default: 1M)")
    p.add_argument("--digester", choices=["blake3", "sha256"], default="blake3",
                   help="chunk digest algorithm (default: %(default)s)")
    p.add_argument("--prefetch-list", metavar="FILE",
                   help="file listing paths to prefetch, one absolute path per line ('#' starts a comment line)")

    p = command("inspect", cmd_inspect, "describe a bootstrap",
                "Show the superblock, flavour (Nydus RAFS v6 or plain EROFS), block and chunk size, flags and "
                "features by name, blobs, device slots, the prefetch table and counts from a walk of the tree.")
    p.add_argument("bootstrap", metavar="BOOTSTRAP", help="bootstrap or EROFS image file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    p = command("ls", cmd_ls, "list a directory of the image",
                "List the entries of directory PATH (without . and ..), or PATH itself when it is not a "
                "directory.  Symbolic links inside the image are not followed.")
    p.add_argument("bootstrap", metavar="BOOTSTRAP", help="bootstrap or EROFS image file")
    p.add_argument("path", metavar="PATH", nargs="?", default="/", help="path inside the image (default: /)")
    p.add_argument("-l", dest="long", action="store_true",
                   help="long format: mode, links, uid, gid, size (or major, minor), mtime, name, -> target")

    p = command("cat", cmd_cat, "write a file's contents to stdout",
                "Write the bytes of regular file PATH to standard output.  Every chunk read is verified against "
                "its recorded digest.", data)
    p.add_argument("bootstrap", metavar="BOOTSTRAP", help="bootstrap or EROFS image file")
    p.add_argument("path", metavar="PATH", help="path of a regular file inside the image")

    p = command("extract", cmd_extract, "unpack the whole tree into a directory",
                "Recreate the image's tree under DEST: data (sparse where the image has holes or zero blocks), "
                "directories, symlinks, device nodes, fifos, sockets, hard links, xattrs, owners (when run as "
                "root), modes and mtimes.  Nothing is ever written outside DEST.", data)
    p.add_argument("bootstrap", metavar="BOOTSTRAP", help="bootstrap or EROFS image file")
    p.add_argument("dest", metavar="DEST", help="destination directory: must not exist, or be empty")

    p = command("check", cmd_check, "verify metadata and every chunk of every file",
                "Walk every inode (directories, symlinks, xattrs) and read every distinct chunk once, checking "
                "its digest.  Prints each bad path with the reason, then a summary; exits 1 if anything is bad. "
                "Chunks of images that record no digests (plain EROFS) are counted as unverified.", data)
    p.add_argument("bootstrap", metavar="BOOTSTRAP", help="bootstrap or EROFS image file")

    p = command("mount", cmd_mount, "mount an image (FUSE or kernel EROFS over fscache); data is fetched lazily",
                "Mount the image at MOUNTPOINT read-only.  File data is read on demand through the configured "
                "backend and chunk cache.  Runs in the background unless --foreground; stop it with "
                "'rafsfs umount MOUNTPOINT' or SIGTERM, which unmount cleanly.", data)
    p.add_argument("source", metavar="SOURCE",
                   help="bootstrap file, or a Nydus image in a registry (REGISTRY/REPO[:TAG|@DIGEST]): only its "
                        "bootstrap layer is fetched, blobs are read lazily; credentials from docker's config.json")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing, empty directory")
    _registry_options(p)
    p.add_argument("--work-dir", metavar="DIR", default="/var/lib/rafsfs",
                   help="with a registry reference: where bootstraps (images/) and the chunk cache (cache/) are "
                        "kept (default: %(default)s)")
    p.add_argument("--mode", choices=["fuse", "fscache", "auto"], default="auto",
                   help="fuse (userspace), fscache (the kernel's EROFS over on-demand cachefiles: one daemon serves "
                        "every fscache mount; cache dir $RAFSFS_FSCACHE_DIR, default /var/cache/rafsfs/fscache, on "
                        "ext4/xfs) or auto, which picks fscache when the kernel supports it and logs why "
                        "(default: auto)")
    p.add_argument("--prefetch-files", metavar="FILE",
                   help="file listing paths (files or directories, one absolute path per line) to fetch into the "
                        "cache in the background after mounting, behind on-demand reads; needs a cache (--config)")
    p.add_argument("--foreground", action="store_true", help="stay in the foreground (tests, systemd)")
    p.add_argument("--log-file", metavar="FILE", help="daemon log (default: /run/rafsfs/<mountpoint>.log)")
    p.add_argument("--pid-file", metavar="FILE", help="write the daemon's pid here")
    p.add_argument("--apisock", metavar="SOCK",
                   help="the daemon's nydusd-compatible API socket (default: /run/rafsfs/<mountpoint>.sock)")

    p = command("stats", cmd_stats, "show a running daemon's data-path counters",
                "Ask the daemon serving MOUNTPOINT (or listening on --apisock) for its chunk cache counters: hits, "
                "misses, bytes fetched from the backend and served to readers, fetch latency percentiles and "
                "in-flight backend requests.  For an fscache mount, the fscache daemon's: every READ the kernel "
                "sends is a miss (hits never reach the daemon: the kernel serves them from its cache files).")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?", help="a mount made by 'rafsfs mount'")
    p.add_argument("--apisock", metavar="SOCK", help="the daemon's API socket instead of MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("convert", cmd_convert, "convert an OCI image in a registry to a Nydus RAFS v6 image",
                "Read the OCI image SOURCE from its registry, build one RAFS v6 blob per layer and one bootstrap "
                "merged over all layers (whiteouts and opaque directories applied), and push the Nydus image "
                "(blob layers + bootstrap layer, as nydusify makes them) to TARGET.")
    p.add_argument("source", metavar="SOURCE", help="OCI image reference, e.g. 127.0.0.1:5000/app:1.0")
    p.add_argument("target", metavar="TARGET", help="where to push the Nydus image (a tag)")
    _registry_options(p)
    p.add_argument("--compressor", choices=["zstd", "lz4", "none"], default="zstd",
                   help="chunk compression (default: %(default)s)")
    p.add_argument("--chunk-size", metavar="SIZE", type=chunk_size, default=1 << 20,
                   help="chunk size, a power of two from 4K to 16M (default: 1M)")
    p.add_argument("--work-dir", metavar="DIR",
                   help="keep downloaded layers, blobs and the bootstrap here (default: a temporary directory, "
                        "removed afterwards); a rerun reuses downloaded layers")

    p = command("pull", cmd_pull, "fetch a Nydus image's bootstrap (and blobs) from a registry",
                "Write DEST/image.boot and DEST/manifest.json from the Nydus image REF; with --blobs also every "
                "data blob into DEST/blobs/ (then 'rafsfs extract DEST/image.boot X --blob-dir DEST/blobs' works "
                "offline).  Every download is checked against its digest.")
    p.add_argument("ref", metavar="REF", help="Nydus image reference")
    p.add_argument("dest", metavar="DEST", help="destination directory (created)")
    _registry_options(p)
    p.add_argument("--blobs", action="store_true", help="fetch the data blobs too")

    p = command("umount", cmd_umount, "unmount a rafsfs mount",
                "Unmount MOUNTPOINT; the daemon serving it then exits.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--lazy", action="store_true", help="detach now even if busy (MNT_DETACH)")

    cache_dir = argparse.ArgumentParser(add_help=False)
    g = cache_dir.add_argument_group("cache directory")
    g.add_argument("--work-dir", metavar="DIR", help="the cache directory (default: the config's, else "
                   "/var/lib/rafsfs/cache)")
    g.add_argument("--config", metavar="FILE", help="take the cache directory from this storage configuration")
    p = command("cache", lambda a: 2, "list or clean the chunk cache directory",
                "Inspect the chunk cache: one entry per blob (a data file in the blob's uncompressed layout and its "
                "ready map).  Entries open in a running daemon are in use and never removed.")
    csub = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    c = csub.add_parser("ls", parents=[common, cache_dir], help="list cached blobs",
                        description="List cached blobs, least recently used first: chunks present / total, bytes "
                                    "on disk, last use, and whether a daemon has the blob open.")
    c.add_argument("--json", action="store_true", help="print a JSON array")
    c.set_defaults(func=cmd_cache_ls)
    c = csub.add_parser("gc", parents=[common, cache_dir], help="remove cached blobs not in use",
                        description="Remove whole cached blobs that no daemon has open, least recently used first: "
                                    "all of them, or only until the directory holds at most --max-size bytes.")
    c.add_argument("--max-size", metavar="SIZE", type=parse_size,
                   help="stop once the cache holds at most SIZE (bytes, or with a K/M/G suffix)")
    c.set_defaults(func=cmd_cache_gc)
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


def _one_line(text: str) -> str:
    return " ".join(text.split("\n")).replace("\r", " ") or "(no message)"


def _error(text: str) -> None:
    clear_progress()
    sys.stderr.write(f"rafsfs: {_one_line(text)}\n")
    sys.stderr.flush()


def _os_error_text(e: OSError) -> str:
    what = e.strerror or str(e)
    if e.filename is not None:
        name = os.fsdecode(e.filename) if isinstance(e.filename, (bytes, str)) else str(e.filename)
        if e.filename2 is not None:
            name += " -> " + (os.fsdecode(e.filename2) if isinstance(e.filename2, (bytes, str)) else str(e.filename2))
        return f"{name}: {what}"
    return what


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
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except RafsError as e:
        _error(f"error: {e}")
        return EXIT_ERROR
    except OSError as e:
        _error(f"error: {_os_error_text(e)}")
        return EXIT_ERROR
    except Exception as e:  # a bug: one line, the traceback only on request
        if verbose:
            traceback.print_exc()
        hint = "" if verbose else " (run with -v for a traceback)"
        _error(f"internal error: {type(e).__name__}: {e}{hint}")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
