"""The nydusd-compatible HTTP/1.1 API on a unix socket, served from a thread inside the daemon.

Paths and answers follow nydusd's API as nydus-snapshotter's client uses it: success is 200 with JSON or 204;
errors are ``{"code": ..., "message": ...}`` with a 4xx/5xx status; unknown paths 404.  Requests that need a
capability the daemon lacks (shared-mode mounts, fscache blobs, fd passing for failover) get 501 unless the daemon
registered a handler for them.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import metrics as m
from .model import ApiError, DaemonState, build_info

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # request bodies are small JSON documents

Json = Any
Query = dict[str, str]
# a handler for a capability the daemon may provide: (query, parsed JSON body or raw text) -> JSON answer or None
Handler = Callable[[Query, Json], Json]


@dataclass
class MountEntry:
    mountpoint: str
    bootstrap: str
    mode: str = "fuse"

    def to_json(self) -> dict:
        return {"host_path": self.mountpoint, "fs_type": "rafs", "bootstrap": self.bootstrap, "mode": self.mode}


@dataclass
class DaemonHooks:
    """What the daemon lets the API see and do; every field is optional."""

    metrics: Callable[[], dict] | None = None  # CacheMetrics.snapshot of the daemon's chunk source
    backend_type: str = ""
    work_dir: str = ""
    on_exit: Callable[[], None] | None = None  # PUT /api/v1/daemon/exit: unmount and stop
    mount: Handler | None = None  # POST /api/v1/mount?mountpoint=
    umount: Handler | None = None  # DELETE /api/v1/mount?mountpoint=
    bind_blob: Handler | None = None  # PUT /api/v2/blobs (fscache)
    unbind_blob: Handler | None = None  # DELETE /api/v2/blobs?domain_id=&blob_id=
    on_request: Callable[[str, str], None] | None = None  # (method, path) of every request, before it is served
    mounts: list[MountEntry] = field(default_factory=list)
    # more routes, (method, path) -> handler, answered like the ones above (a backend's own API beyond them); they
    # take precedence over the built-in ones.  on_request only sees requests, whichever route serves them
    routes: dict[tuple[str, str], Handler] = field(default_factory=dict)


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False
    api: ApiServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Go's client expects
    server: _UnixHTTPServer
    # no idle timeout: nydus-snapshotter keeps one connection open, idle, as a liveness probe, and takes its hang-up
    # for the daemon's death (then restarts or fails over the daemon)
    timeout = None

    def address_string(self) -> str:  # a unix peer has no address
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api: " + format, *args)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0 or length > MAX_BODY:
                raise ApiError("request body too large", 413, "InvalidRequest")
            raw = self.rfile.read(length) if length else b""
            status, body = self.server.api.route(method, url.path, query, raw)
        except ApiError as e:
            status, body = e.status, {"code": e.code, "message": str(e)}
        except Exception as e:  # noqa: BLE001 - a bug must not kill the connection thread silently
            log.exception("api: %s %s failed", method, self.path)
            status, body = 500, {"code": "InternalError", "message": f"{type(e).__name__}: {e}"}
        self._answer(status, body)

    def _answer(self, status: int, body: Json) -> None:
        data = b"" if status == 204 or body is None else json.dumps(body).encode()
        if body is None and status == 200:
            status = 204
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")


class ApiServer:
    """Serve the API of one daemon on ``path`` from a background thread.  ``state`` starts INIT; the daemon sets
    RUNNING once its mount is complete (nydus-snapshotter waits for that before handing the mount to containerd)."""

    def __init__(self, path: str, daemon_id: str, hooks: DaemonHooks | None = None, hold_init: float = 0.0):
        """``hold_init``: a ``GET /api/v1/daemon`` that arrives while the daemon is still INIT is answered when the
        state changes (or after this many seconds), so a caller polling for RUNNING learns it the moment the mount
        is ready instead of on its next poll -- nydus-snapshotter polls only 20 times, 100 ms apart."""
        self.path, self.daemon_id = path, daemon_id
        self.hooks = hooks or DaemonHooks()
        self.state = DaemonState.INIT
        self.hold_init = hold_init
        self._settled = threading.Event()
        self._server: _UnixHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._routes: dict[tuple[str, str], Callable[[Query, bytes], tuple[int, Json]]] = {
            ("GET", "/api/v1/daemon"): self._daemon,
            ("GET", "/api/v2/daemon"): self._daemon,
            ("GET", "/api/v1/metrics"): self._fs_metrics,
            ("GET", "/api/v1/metrics/blobcache"): self._cache_metrics,
            ("GET", "/api/v1/metrics/backend"): self._backend_metrics,
            ("GET", "/api/v1/metrics/inflight"): self._inflight,
            ("GET", "/api/v1/metrics/files"): lambda q, b: (200, []),
            ("GET", "/api/v1/metrics/pattern"): lambda q, b: (200, []),
            ("PUT", "/api/v1/daemon/start"): self._start,
            ("PUT", "/api/v1/daemon/exit"): self._exit,
            ("PUT", "/api/v1/daemon/fuse/sendfd"): self._unsupported("fd passing for failover"),
            ("PUT", "/api/v1/daemon/fuse/takeover"): self._unsupported("failover takeover"),
            ("POST", "/api/v1/mount"): self._hook("mount", "mounting more images (shared daemon mode)"),
            ("PUT", "/api/v1/mount"): self._hook("mount", "remounting"),
            ("DELETE", "/api/v1/mount"): self._hook("umount", "unmounting through the API (shared daemon mode)"),
            ("PUT", "/api/v2/blobs"): self._hook("bind_blob", "binding fscache blobs"),
            ("DELETE", "/api/v2/blobs"): self._hook("unbind_blob", "unbinding fscache blobs"),
        }
        for key, handler in self.hooks.routes.items():
            self._routes[key] = self._answer_with(handler)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> ApiServer:
        """Bind the socket (replacing a stale one left by a dead daemon) and serve in a daemon thread."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o755, exist_ok=True)
        _remove_stale_socket(self.path)
        # the socket is born 0600 (bind creates it with 0777 & ~umask): no moment in which others may connect.
        # The umask is process-wide; the API starts before the daemon runs threads that create files.
        old_umask = os.umask(0o177)
        try:
            server = _UnixHTTPServer(self.path, _Handler)
        except OSError as e:
            raise ApiError(f"cannot listen on API socket {self.path}: {e.strerror or e}") from None
        finally:
            os.umask(old_umask)
        server.api = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="rafsfs-api", daemon=True)
        self._thread.start()
        log.info("API on %s", self.path)
        return self

    def set_state(self, state: DaemonState) -> None:
        if state != self.state:
            log.debug("daemon state %s -> %s", self.state.value, state.value)
        self.state = state
        if state != DaemonState.INIT:
            self._settled.set()

    def running(self) -> None:
        self.set_state(DaemonState.RUNNING)

    def close(self) -> None:
        self.set_state(DaemonState.DESTROYED)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ routing
    def route(self, method: str, path: str, query: Query, body: bytes) -> tuple[int, Json]:
        path = path.rstrip("/") or "/"
        if self.hooks.on_request is not None:
            self.hooks.on_request(method, path)
        fn = self._routes.get((method, path))
        if fn is None:
            if any(p == path for (_, p) in self._routes):
                raise ApiError(f"{method} is not allowed on {path}", 405, "MethodNotAllowed")
            raise ApiError(f"no such API path: {path}", 404, "NotFound")
        return fn(query, body)

    def _snapshot(self) -> dict | None:
        return self.hooks.metrics() if self.hooks.metrics else None

    def _daemon(self, q: Query, b: bytes) -> tuple[int, Json]:
        if self.state == DaemonState.INIT and self.hold_init > 0:
            self._settled.wait(self.hold_init)
        return 200, {"id": self.daemon_id, "version": build_info().to_json(), "state": self.state.value,
                     "supervisor": None, "pid": os.getpid(),
                     "backend_collection": {e.mountpoint: e.to_json() for e in self.hooks.mounts}}

    def _fs_metrics(self, q: Query, b: bytes) -> tuple[int, Json]:
        return 200, m.fs_metrics(self._snapshot(), q.get("id", "/"))

    def _cache_metrics(self, q: Query, b: bytes) -> tuple[int, Json]:
        return 200, m.cache_metrics(self._snapshot(), q.get("id", self.daemon_id), self.hooks.work_dir)

    def _backend_metrics(self, q: Query, b: bytes) -> tuple[int, Json]:
        return 200, m.backend_metrics(self._snapshot(), self.hooks.backend_type)

    def _inflight(self, q: Query, b: bytes) -> tuple[int, Json]:
        return 200, []  # per-request tracking of FUSE operations is not kept; the backend count is in blobcache

    def _start(self, q: Query, b: bytes) -> tuple[int, Json]:
        if self.state not in (DaemonState.RUNNING, DaemonState.READY, DaemonState.INIT):
            raise ApiError(f"daemon is {self.state.value}", 409, "InvalidState")
        return 204, None  # the filesystem is served as soon as it is mounted

    def _exit(self, q: Query, b: bytes) -> tuple[int, Json]:
        if self.hooks.on_exit is None:
            raise ApiError("this daemon cannot be stopped through the API", 501, "Unsupported")
        log.info("API: exit requested")
        self.hooks.on_exit()
        return 204, None

    @staticmethod
    def _unsupported(what: str) -> Callable[[Query, bytes], tuple[int, Json]]:
        def fn(q: Query, b: bytes) -> tuple[int, Json]:
            raise ApiError(f"{what} is not supported by rafsfs", 501, "Unsupported")
        return fn

    def _hook(self, name: str, what: str) -> Callable[[Query, bytes], tuple[int, Json]]:
        def fn(q: Query, b: bytes) -> tuple[int, Json]:
            handler = getattr(self.hooks, name)
            if handler is None:
                raise ApiError(f"{what} is not supported by this daemon", 501, "Unsupported")
            return self._answer_with(handler)(q, b)
        return fn

    @staticmethod
    def _answer_with(handler: Handler) -> Callable[[Query, bytes], tuple[int, Json]]:
        """A route for ``handler``: the body parsed as JSON; its answer 200 with JSON, or 204 when None."""
        def fn(q: Query, b: bytes) -> tuple[int, Json]:
            answer = handler(q, _json_body(b))
            return (200, answer) if answer is not None else (204, None)
        return fn


def _json_body(raw: bytes) -> Json:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise ApiError("request body is not valid JSON", 400, "InvalidRequest") from None


def _remove_stale_socket(path: str) -> None:
    """Unlink ``path`` if it is a socket nobody listens on; refuse to replace a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ApiError(f"API socket path {path} exists and is not a socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1)
        s.connect(path)
    except OSError:
        os.unlink(path)  # stale: its daemon is gone
        return
    finally:
        s.close()
    raise ApiError(f"API socket {path} is in use by another daemon")


@contextmanager
def serve_api(path: str | None, daemon_id: str, hooks: DaemonHooks | None = None,
              hold_init: float = 0.0) -> Iterator[ApiServer | None]:
    """Start an :class:`ApiServer` on ``path`` (None: no API) for the duration of the block; always closed."""
    if path is None:
        yield None
        return
    server = ApiServer(path, daemon_id, hooks, hold_init).start()
    try:
        yield server
    finally:
        server.close()
