"""The mount session: one place that turns (bootstrap, config, source mode, API socket, prefetch list) into a served
mount, for every mode.

    with MountSession(spec, runner) as session:
        session.serve()            # blocks until unmounted or SIGTERM

The session opens the image, builds the chunk source (now, or in the background once the mount is up: ``deferred``),
serves the nydusd-compatible API, starts prefetch by one rule, hands the mount to the mode's :class:`Runner`, and
tears everything down in one order.  A mode supplies only its runner (the FUSE operations, the kernel protocol);
the core never imports a mode: the front end passes the runner in.

Order of setup: ``runner.preflight`` (cheap, one line: the mountpoint) -> prefetch list parsed -> API socket (INIT) ->
image -> chunk source -> pid file -> prefetch -> ``runner.run`` (which calls ``ready()``: API RUNNING, a deferred
source starts building; with a runner that needs the source before the mount, the source is built at once, its
backend lazily, and ``ready()``, when there is something to prefetch, builds the backend, then probes and prefetches
in a thread; with nothing to prefetch the blobs are not probed: the runner's own reads report a failure).  Order of
teardown, whatever happened: no new prefetch -> prefetchers stopped (and the probe thread joined) -> source closed ->
image closed (unless a deferred build or the probe thread still uses it) -> API closed (DIED first if the session
failed).
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import string
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Protocol

from .errors import RafsError

if TYPE_CHECKING:
    from .api.server import ApiServer, DaemonHooks
    from .config import RafsConfig
    from .blob import BlobInfo
    from .image import RafsImage
    from .storage.cache.prefetch import Prefetcher
    from .storage.metrics import CacheMetrics
    from .storage.source import ChunkSource

log = logging.getLogger(__name__)

SourceMode = Literal["eager", "deferred"]
PROBE_DEADLINE = 5.0  # seconds a probe of one blob may take (nydusd's request timeout; a read gets more)
LATE_WAIT = 2.0  # seconds teardown waits for a probe after ready(); then it leaves the image and source open


class MountError(RafsError):
    """A mount cannot start (mountpoint, blobs, options); one line."""


# ------------------------------------------------------------------------------------------------ the prefetch list
def parse_prefetch_list(value: str | None, what: str = "--prefetch-files") -> list[str]:
    """The one prefetch-list parser (``rafsfs mount --prefetch-files``, ``rafsfs-nydusd --prefetch-files``,
    ``rafsfs build --prefetch-list``): ``value`` is a file listing absolute image paths, one per line (blank lines
    and lines starting with '#' are ignored), or, when it is not a file, the paths themselves separated by commas
    or whitespace (nydusd's inline form).  A path that is not absolute is a one-line error."""
    if not value:
        return []
    if os.path.isfile(value):
        try:
            with open(value, "rb") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise MountError(f"{what}: cannot read {value}: {e.strerror}") from None
        paths = []
        for n, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith(b"#"):
                continue
            if not line.startswith(b"/"):
                raise MountError(f"{value}, line {n}: {os.fsdecode(line)!r} is not an absolute path in the image")
            paths.append(os.fsdecode(line))
        return paths
    words = [w for w in value.replace(",", " ").split() if not w.startswith("#")]
    for w in words:
        if not w.startswith("/"):
            raise MountError(f"{what}: {w!r} is neither a file nor an absolute path in the image")
    return words


# ------------------------------------------------------------------------------------------------ the source
@dataclass(frozen=True)
class SourceTraits:
    """What the session and the runners need to know of a chunk source."""

    is_local: bool  # every read is served from local files: a small read never waits on the network
    metrics: "CacheMetrics | None"
    # every chunk of the blob is in the cache entry for its chunk table (found through the source's BlobMeta)
    fully_cached: Callable[["BlobInfo"], bool]


def source_traits(source: "ChunkSource | None") -> SourceTraits:
    """The one place that asks a chunk source for its capabilities (the ChunkSource contract)."""
    if source is None:
        return SourceTraits(is_local=True, metrics=None, fully_cached=lambda blob: False)
    return SourceTraits(is_local=source.is_local, metrics=source.metrics, fully_cached=source.fully_cached)


def probe_blobs(image: "RafsImage", source: "ChunkSource | None") -> None:
    """Read one byte of every blob the image names, so that a missing blob or an unreachable registry stops the
    mount with one line instead of turning every later read into EIO.  Each probe may take at most
    :data:`PROBE_DEADLINE`, not a read's full deadline."""
    from .storage.backend.base import deadline_cap

    if source is None:
        return
    fully_cached = source_traits(source).fully_cached
    for blob in image.blobs:
        if not (blob.compressed_size or blob.uncompressed_size):
            continue  # an empty blob: nothing to read
        if fully_cached(blob):
            continue  # every chunk is in the cache: this mount never needs the backend for it
        try:
            with deadline_cap(PROBE_DEADLINE):
                source.read_raw(blob, 0, 1)
        except RafsError as e:
            raise MountError(f"cannot read blob {blob.ref.name}: {e}") from None


def prepare_reads(image: "RafsImage", source: "ChunkSource | None") -> None:
    """What the first file read would otherwise do: check the blobs (:func:`probe_blobs`) and parse the chunk
    table (~0.2 s for 50k chunks)."""
    probe_blobs(image, source)
    image.chunk_table()


# ------------------------------------------------------------------------------------------------ the mode's part
@dataclass
class ServedMount:
    """What a runner gets: the image and its source, ready to serve."""

    image: "RafsImage"
    source: "ChunkSource | None"
    mountpoint: str  # resolved (realpath) before anything was mounted
    config: "RafsConfig | None"
    fsname: str
    is_local: bool  # reads never wait on the network (see :class:`SourceTraits`)
    ready: Callable[[], None]  # call once the mount is in place and reads can be served
    options: dict = field(default_factory=dict)  # MountSpec.options
    hooks: "DaemonHooks | None" = None  # the API's view of the daemon: a runner may add to it (its own counters)


class Runner(Protocol):
    """A mount mode.  ``preflight`` says in one line why the mount cannot start (cheap: no heavy imports);
    ``run`` mounts ``m.mountpoint``, calls ``m.ready()`` once the mount is in place, serves until it is unmounted or
    the process gets SIGTERM/SIGINT (the API's exit request sends SIGTERM), unmounts, and returns."""

    name: str
    # the runner opens the source before the mount and serves reads through a source of its own (fanotify: the
    # cache's entries before its marks, a worker's cache): a deferred session then builds the source at once (its
    # backend lazily) and, once ready, probes and prefetches only if there is something to prefetch
    source_before_mount: bool

    def preflight(self, mountpoint: str) -> None: ...

    def run(self, m: ServedMount) -> None: ...


@dataclass
class MountSpec:
    """Everything a served mount is made of."""

    bootstrap: str
    mountpoint: str
    config: "RafsConfig | None" = None  # None: all data is in the bootstrap
    source_mode: SourceMode = "eager"  # deferred: the source is built (and probed) once the mount is up
    apisock: str | None = None  # None: no API
    prefetch: str | None = None  # --prefetch-files: a file or an inline list (:func:`parse_prefetch_list`)
    daemon_id: str | None = None  # None: a random one
    api_mountpoint: str | None = None  # the mount's name in the API's backend_collection (default: mountpoint)
    hold_init: float = 0.0  # see ApiServer
    pid_file: str | None = None
    fsname: str = "rafsfs"
    devices_given: int = 0  # --device files on the command line (checked against the image's slots)
    options: dict = field(default_factory=dict)  # mode-specific options: read by the runner only


def new_daemon_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(20))


def _stop_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # every runner unmounts and returns on SIGTERM


class MountSession:
    """A served mount from setup to teardown (see the module docstring for the order)."""

    def __init__(self, spec: MountSpec, runner: Runner):
        self.spec = spec
        self.runner = runner
        self.mountpoint = os.path.realpath(spec.mountpoint)  # before mounting: afterwards this would ask the mount
        self.daemon_id = spec.daemon_id or new_daemon_id()
        self.image: RafsImage | None = None
        self.source: ChunkSource | None = None
        self.api: ApiServer | None = None
        self.hooks: DaemonHooks | None = None
        self._paths: list[str] = []
        self._deferred = None  # the DeferredCache, in deferred mode
        self._late_prepare = False  # deferred mode with a runner that needs the source first (see Runner)
        self._late_thread: threading.Thread | None = None  # its probe + prefetch start, after ready()
        self._sealed = False  # tearing down: no prefetch starts
        self._seal_lock = threading.Lock()
        self._prefetchers: list[Prefetcher] = []
        self._api_cm = None

    # ------------------------------------------------------------------ setup
    def __enter__(self) -> MountSession:
        try:
            self._setup()
        except BaseException:
            self._teardown(failed=True)
            raise
        return self

    def _setup(self) -> None:
        from .api.server import DaemonHooks, MountEntry, serve_api

        spec = self.spec
        self.runner.preflight(self.mountpoint)
        self._paths = parse_prefetch_list(spec.prefetch)  # bad input stops the daemon here, in one line
        self.hooks = DaemonHooks(on_exit=_stop_self, mounts=[MountEntry(
            mountpoint=spec.api_mountpoint or self.mountpoint, bootstrap=os.path.abspath(spec.bootstrap),
            mode=self.runner.name)])
        if spec.apisock is not None:
            self._api_cm = serve_api(spec.apisock, self.daemon_id, self.hooks, hold_init=spec.hold_init)
            self.api = self._api_cm.__enter__()
        self._open_image()
        self._open_source()
        if spec.pid_file:
            with open(spec.pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")

    def _open_image(self) -> None:
        from .image import RafsImage

        self.image = RafsImage.open(self.spec.bootstrap)
        if self.spec.devices_given > len(self.image.devices):
            raise MountError(f"{self.spec.devices_given} --device files given, but the image has "
                             f"{len(self.image.devices)} device slot(s)")

    def _open_source(self) -> None:
        from .storage.factory import source_from_config
        from .tools import require_source

        cfg, image = self.spec.config, self.image
        assert image is not None
        if cfg is None:
            source = None
        elif self.spec.source_mode == "deferred" and not self.runner.source_before_mount:
            source = self._deferred_source(cfg, image)
        else:
            self._late_prepare = self.spec.source_mode == "deferred"
            source = source_from_config(cfg)
        self.source = source
        require_source(image, source)
        assert self.hooks is not None
        traits = source_traits(source)
        if traits.metrics is not None:
            self.hooks.metrics = traits.metrics.snapshot
        if cfg is not None:
            self.hooks.backend_type = cfg.backend.type
            self.hooks.work_dir = cfg.cache.work_dir if cfg.cache.type != "none" else ""

    def _deferred_source(self, cfg: "RafsConfig", image: "RafsImage"):
        """A chunk cache built once the mount is up (then probed, then prefetching); reads that come first wait."""
        from .deferred_source import DeferredCache
        from .storage.factory import source_from_config

        if cfg.cache.type == "none":
            raise MountError("a deferred chunk source needs a cache (cache type 'none' configured)")
        try:  # what can fail without the network is checked now
            os.makedirs(cfg.cache.work_dir, exist_ok=True)
        except OSError as e:
            raise MountError(f"cannot create cache directory {cfg.cache.work_dir}: {e.strerror}") from None

        def build(metrics):
            cache = source_from_config(cfg, metrics)
            try:
                prepare_reads(image, cache)  # before the first read is served: it waits for this
            except RafsError as e:  # the mount stays up (the snapshotter waits for it); reads say it again
                log.error("%s", e)
            return cache

        deferred = DeferredCache(build)
        deferred.after_build.append(lambda cache: self._start_prefetch(cache))
        self._deferred = deferred
        return deferred

    def _start_prefetch(self, source: "ChunkSource | None") -> None:
        """The one prefetch rule (nydusd's): the config's ``fs_prefetch.enable`` reads the image's prefetch table,
        with ``prefetch_all`` then every blob; ``--prefetch-files`` adds its paths; without a config (no cache) the
        table would be asked for, but there is nothing to prefetch into.  Always behind on-demand reads."""
        from .storage.cache.prefetch import plan_for, start_prefetch

        if source is None or self.image is None:
            return
        pf = self.spec.config.prefetch if self.spec.config is not None else None
        plan, threads = plan_for(pf, self._paths)
        if pf is not None and pf.threads > threads and (plan.paths or plan.use_table or plan.whole_blobs):
            log.info("prefetch: %d threads configured, %d used (more only compete with on-demand reads)",
                     pf.threads, threads)
        prefetcher = start_prefetch(self.image, source, plan, threads)
        if prefetcher is not None:
            self._prefetchers.append(prefetcher)

    # ------------------------------------------------------------------ serving
    def _ready(self) -> None:
        if self.api is not None:
            self.api.running()
        if self._deferred is not None:
            self._deferred.start()
        if self._late_prepare and self.source is not None:
            if not self._prefetch_wanted():
                # the runner reads through a source of its own (fanotify's worker): the probe would only build a
                # second HTTP stack here, while the container starts; a blob that cannot be read fails its reads
                log.debug("no prefetch: the blobs are not probed, the first read reports a failure")
                return
            # in the runner's thread, before any thread of ours: a worker the runner forks later finds the
            # backend's modules imported, never half-imported by a thread the fork did not copy
            try:
                self.source.prepare()
            except Exception as e:  # noqa: BLE001 - the mount stays; its reads report the failure again
                log.error("cannot prepare the chunk source's backend: %s", e)
                return
            assert self.image is not None
            self._late_thread = threading.Thread(target=self._prepare_late, args=(self.image, self.source),
                                                 name="rafsfs-prepare", daemon=True)
            self._late_thread.start()

    def _prefetch_wanted(self) -> bool:
        from .storage.cache.prefetch import plan_for, plan_has_work

        assert self.image is not None
        pf = self.spec.config.prefetch if self.spec.config is not None else None
        return plan_has_work(self.image, plan_for(pf, self._paths)[0])

    def _prepare_late(self, image: "RafsImage", source: "ChunkSource") -> None:
        """Probe and table (:func:`prepare_reads`), then prefetch, with the mount already up: a failure is logged
        (the mount stays; reads say it again).  Teardown waits for this (or leaves ``image`` and ``source`` open)."""
        try:
            prepare_reads(image, source)
        except RafsError as e:
            log.error("%s", e)
        except Exception:  # noqa: BLE001 - a thread's error must reach the log, not stderr
            log.exception("preparing the reads")
        with self._seal_lock:
            if not self._sealed:
                self._start_prefetch(source)

    def serve(self) -> None:
        """Prepare the reads (eager), start prefetch, and run the mode until the mount ends."""
        assert self.image is not None
        if self._deferred is None and not self._late_prepare:
            prepare_reads(self.image, self.source)
            self._start_prefetch(self.source)
        log.info("mounting %s on %s (%s)", self.spec.bootstrap, self.mountpoint, self.runner.name)
        self.runner.run(ServedMount(image=self.image, source=self.source, mountpoint=self.mountpoint,
                                    config=self.spec.config, fsname=self.spec.fsname,
                                    is_local=source_traits(self.source).is_local, ready=self._ready,
                                    options=self.spec.options, hooks=self.hooks))

    # ------------------------------------------------------------------ teardown
    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._teardown(failed=exc_type is not None)

    def _teardown(self, failed: bool) -> None:
        image_in_use = False
        try:
            with self._seal_lock:
                self._sealed = True  # no late prefetcher starts after this
            if self._deferred is not None:
                self._deferred.seal()  # no prefetcher starts after this
            for prefetcher in self._prefetchers:
                prefetcher.stop()
            self._prefetchers.clear()
            if self._late_thread is not None:
                self._late_thread.join(LATE_WAIT)  # a probe of a registry that does not answer: bounded
                image_in_use = self._late_thread.is_alive()
            if self._deferred is not None:
                image_in_use = not self._deferred.close()  # a build still running uses the image
            elif self.source is not None and not image_in_use:
                self.source.close()
            self.source = None
        finally:
            try:
                if self.image is not None and not image_in_use:
                    self.image.close()
                self.image = None
            finally:
                if self._api_cm is not None:
                    if failed and self.api is not None:
                        from .api.model import DaemonState

                        self.api.set_state(DaemonState.DIED)
                    self._api_cm.__exit__(None, None, None)
                    self._api_cm = self.api = None
