"""``rafsfs-nydusd singleton --fscache DIR --apisock S``: nydusd's shared fscache daemon, as nydus-snapshotter starts
it with ``--fs-driver fscache`` (``../shared/spec/nydusd-contract.md``, "fscache shared mode").

One process for every image of the node: this front end serves the nydusd HTTP API and runs the supervisor, which
binds ``/dev/cachefiles`` (``dir DIR``, ``tag T`` if given, ``bind ondemand``) and keeps the fscache daemon of
:mod:`fscache_backend.daemon` running (restarting it with ``restore`` after a crash).  The snapshotter hands each
image over with ``PUT /api/v2/blobs`` -- its bootstrap (``metadata_path``) and backend -- and mounts EROFS itself
with ``fsid=<id>[,domain_id=D]``; the daemon answers the kernel's OPEN/READ/CLOSE for the bootstrap cookie ``<id>``
and the blob cookies (blob ids from the bootstrap) in volume ``erofs,<domain_id>``, exactly as for its own mounts.
``DELETE /api/v2/blobs?domain_id=D[&blob_id=X]`` unbinds, ``?blob_id=X`` culls X's cache files.  SIGTERM (or
``PUT /api/v1/daemon/exit``) stops the daemon; the mounts are the snapshotter's.

The API socket comes first, before anything heavy is imported: the snapshotter gives it 10 s to appear, and an
emulated machine needs most of that for a Python start-up.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from rafsfs.api.model import ApiError, DaemonState
from rafsfs.api.server import ApiServer, DaemonHooks, MountEntry
from rafsfs.atomic import write_text
from rafsfs.errors import RafsError

from .errors import FscacheError
from .settings import Settings

log = logging.getLogger(__name__)

HOLD_INIT = 10.0  # a state query made before the cache is bound waits this long for RUNNING
BIND_TIMEOUT = 120.0  # seconds a PUT may wait for the daemon (its first start under emulation takes a while)
RUN_SUBDIR = "rafsfs-fscache"  # next to the API socket: control socket, image records, stats


def settings_for(fscache_dir: str, apisock: str, tag: str | None, threads: int | None) -> Settings:
    return Settings(cache_dir=os.path.abspath(fscache_dir),
                    run_dir=os.path.join(os.path.dirname(os.path.abspath(apisock)), RUN_SUBDIR),
                    domain_id="", tag=tag or None, singleton=True, threads=threads or 8)


def _error(e: BaseException, status: int = 500) -> ApiError:
    """nydusd answers every API failure with code UNDEFINED and the error's text."""
    return ApiError(" ".join(str(e).split()) or type(e).__name__, status, "UNDEFINED")


class Front:
    """The v2 blob routes of the API, handed to the daemon over its control socket."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.entries: list[MountEntry] = []  # GET /api/v1/daemon's backend_collection
        self.online = threading.Event()  # the cache is bound and the control socket listens

    def _request(self, req: dict, timeout: float = BIND_TIMEOUT) -> dict:
        from . import control

        if not self.online.wait(timeout):
            raise _error("the fscache daemon is not online yet", 503)
        try:
            return control.request(self.settings.control_path, req, timeout=timeout)
        except FscacheError as e:
            raise _error(e) from None
        except (OSError, ValueError) as e:
            raise _error(f"the fscache daemon does not answer: {e}", 503) from None

    def put_blobs(self, query: dict[str, str], body: Any) -> None:
        """``PUT /api/v2/blobs`` with the snapshotter's body: bind the image; 204 once the kernel may OPEN it."""
        if not isinstance(body, dict):
            raise _error("PUT /api/v2/blobs needs a JSON object", 400)
        if body.get("type", "bootstrap") != "bootstrap":
            raise _error(f"blob entries of type {body.get('type')!r} are not supported (only 'bootstrap')", 400)
        cfg = body.get("config")
        if not isinstance(cfg, dict):
            raise _error("PUT /api/v2/blobs: 'config' must be an object", 400)
        blob_id = body.get("id") or cfg.get("id")
        metadata = cfg.get("metadata_path") or body.get("metadata_path")
        if not isinstance(blob_id, str) or not blob_id:
            raise _error("PUT /api/v2/blobs: 'id' is missing", 400)
        if not isinstance(metadata, str) or not metadata:
            raise _error("PUT /api/v2/blobs: 'config.metadata_path' (the bootstrap) is missing", 400)
        if not os.path.isfile(metadata):
            raise _error(f"metadata_path {metadata}: no such file")
        if any(not (c.isalnum() or c in "-_.") for c in blob_id) or len(blob_id) > 240:
            raise _error(f"id {blob_id[:80]!r}: expected letters, digits, '-', '_' or '.'", 400)
        # the body is the image's config (seed / nydusd v2 shape: backend, credentials, prefetch): the daemon loads it
        os.makedirs(self.settings.images_dir, mode=0o700, exist_ok=True)
        path = os.path.join(self.settings.images_dir, blob_id + ".json")
        import json

        write_text(path, json.dumps(body))
        os.chmod(path, 0o600)
        reply = self._request({"op": "bind", "id": blob_id, "domain_id": body.get("domain_id") or blob_id,
                               "bootstrap": metadata, "config": path})
        if not reply.get("replayed"):
            self.entries.append(MountEntry(mountpoint=f"/{blob_id}", bootstrap=metadata, mode="fscache"))
        return None

    def delete_blobs(self, query: dict[str, str], body: Any) -> None:
        """``DELETE /api/v2/blobs?domain_id=D[&blob_id=X]`` unbinds; ``?blob_id=X`` alone culls X's cache files."""
        domain, blob_id = query.get("domain_id"), query.get("blob_id")
        if domain:
            reply = self._request({"op": "unbind", "domain_id": domain, "blob_id": blob_id}, timeout=30)
            gone = set(reply.get("unbound") or [])
            self.entries[:] = [e for e in self.entries if e.mountpoint.lstrip("/") not in gone]
        elif blob_id:
            self._request({"op": "cull", "blob_id": blob_id}, timeout=30)
        else:
            raise _error("DELETE /api/v2/blobs needs domain_id or blob_id", 400)
        return None

    @staticmethod
    def on_request(method: str, path: str) -> None:
        """Every request in the log, as nydusd logs them (metrics polls only at debug level)."""
        log.log(logging.DEBUG if "/metrics" in path else logging.INFO, "API %s %s", method, path)

    def metrics(self) -> dict | None:
        try:
            return self._request({"op": "stats"}, timeout=10).get("cache")
        except ApiError:
            return None


def _exit_now(signum, frame) -> None:
    raise SystemExit(0)


def run(args, daemon_id: str) -> int:
    """Serve until SIGTERM; one-line RafsError for what cannot start."""
    if not args.fscache:
        raise RafsError("singleton mode needs --fscache DIR (the cachefiles cache directory)")
    if not args.apisock:
        raise RafsError("singleton mode needs --apisock SOCKET (nydus-snapshotter's API socket)")
    threads = None
    if args.fscache_threads is not None:
        try:
            threads = int(args.fscache_threads)
        except ValueError:
            threads = 0
        if not 1 <= threads <= 1024:
            raise RafsError(f"--fscache-threads {args.fscache_threads!r}: expected a number from 1 to 1024")
    if args.upgrade:
        log.warning("--upgrade: rafsfs takes over no state from a previous daemon; starting afresh")
    if args.supervisor:
        log.info("--supervisor %s: not used (the daemon has its own supervisor)", args.supervisor)
    # SIGTERM before the supervisor takes over (it forwards it to the daemon from then on): a clean exit
    signal.signal(signal.SIGTERM, _exit_now)
    settings = settings_for(args.fscache, args.apisock, args.fscache_tag, threads)
    from . import state

    state.clear(settings.mounts_dir)  # before the API: a PUT may come at once
    for name in os.listdir(settings.images_dir) if os.path.isdir(settings.images_dir) else ():
        os.unlink(os.path.join(settings.images_dir, name))  # configs of an earlier daemon (credentials)
    front = Front(settings)
    hooks = DaemonHooks(bind_blob=front.put_blobs, unbind_blob=front.delete_blobs, metrics=front.metrics,
                        backend_type="fscache", work_dir=settings.cache_dir, mounts=front.entries,
                        on_exit=lambda: os.kill(os.getpid(), signal.SIGTERM), on_request=front.on_request)
    api = ApiServer(args.apisock, daemon_id, hooks, hold_init=HOLD_INIT).start()
    try:
        from .supervisor import run as supervise

        log.info("singleton %s: fscache directory %s, API %s", daemon_id, settings.cache_dir, args.apisock)

        def online() -> None:
            front.online.set()
            api.running()

        supervise(settings, None, verbose=logging.getLogger().level <= logging.DEBUG, on_online=online,
                  log_file=args.log_file)
    except BaseException:
        api.set_state(DaemonState.DIED)
        raise
    finally:
        api.close()
    log.info("singleton %s stopped", daemon_id)
    return 0
