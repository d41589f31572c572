"""A fault-injection HTTP proxy for tests: a real reverse proxy on 127.0.0.1 in front of a real registry (the
``docker-registry`` that :mod:`registry_env` starts), which a test tells how to misbehave.

Any registry client (a ``rafsfs mount --config``, ``rafsfs-nydusd``, the fscache or fanotify daemon, the OCI
client) is pointed at the proxy instead of the registry: as the origin (``"host": px.host``), a mirror
(``"mirrors": [{"host": px.url}]``) or the proxy (``"proxy": {"url": px.url}``)::

    from fault_proxy import FaultProxy
    with start_registry(tmp) as reg, FaultProxy(reg.port) as px:     # or: reg.fault_proxy()
        cfg = reg.nydusd_config(repo, work_dir, host=px.host)
        px.set("truncate", after=1000)      # every blob GET from now on ...
        px.set("status", code=503, count=2, retry_after=1)   # ... or only the next two
        px.clear()                          # back to a faithful proxy
        px.requests["/v2/<repo>/blobs/sha256:<hex>"]         # requests seen per path (all methods, all faults)
        px.records                          # [{"method", "path", "range", "authorization", "fault"}], oldest first
        px.blob_gets(hex_digest)            # the GET records of one blob (any blob if None)

Faults (``px.set(name, **params)``; one at a time; applied to requests whose path contains ``path`` -- default
``/blobs/sha256:``, i.e. blob reads -- with HTTP method ``method`` if given, and only to the next ``count`` of them
if ``count`` is given, after which the proxy is faithful again).  Every wait is bounded (``seconds``, default 30)
and ends early on :meth:`clear` or when the proxy closes, so a test can never hang on its own proxy:

==============  ==================================================================================================
``reset``       status and headers of the real answer, ``after`` body bytes (default: half), then a TCP reset.
``truncate``    the same with a clean close (FIN): a short body under a full ``Content-Length``.
``stall``       read the request, send nothing for ``seconds``, then close.
``trickle``     the real status and headers, then one body byte every ``interval`` s (default 1) for at most
                ``seconds``, then close.
``slow_headers``  the real answer, its status line and headers sent one byte every ``interval`` s (default 1),
                for at most ``seconds``, then close.
``status``      answer ``code`` (500, 503, 429, ...) with ``Retry-After: retry_after`` if given; no upstream request.
``ignore_range``  forward without ``Range`` and answer ``200`` with the whole blob (streamed, as a static file
                server or a careless cache would).
``wrong_range`` ask upstream for the range shifted by ``shift`` bytes (default 4096) and pass its honest ``206``
                and ``Content-Range`` on: the right status, the wrong bytes, and a header that says so.
``challenge``   answer ``401`` with ``WWW-Authenticate: header`` (e.g. a mirror asking for credentials, or naming a
                token ``realm`` -- the proxy's own ``/token`` path records what a client sends there).
==============  ==================================================================================================

Requests are recorded (and counted in :attr:`requests`) before any fault is applied, with the ``Authorization``
header they carried, so a test can check where credentials went.
"""
from __future__ import annotations

import collections
import http.client
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("reset", "truncate", "stall", "trickle", "slow_headers", "status", "ignore_range", "wrong_range",
          "challenge")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade", "content-length"}  # Host is kept: upload Locations name the proxy
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")
_PIECE = 64 << 10
MAX_WAIT = 120.0  # seconds: no fault holds a connection longer, whatever a test asks


class FaultProxy:
    """See the module docstring.  ``upstream_port``: the registry (plain HTTP) on ``upstream_host``, 127.0.0.1
    unless told (the fscache VM's guest reaches the host's registry at another address)."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        self.upstream_port = upstream_port
        self.upstream_host = upstream_host
        self.records: list[dict[str, Any]] = []
        self.requests: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._fault: dict[str, Any] | None = None
        self._changed = threading.Event()  # set on clear()/close(): ends stalls and trickles early
        self._closed = False
        self._server = _QuietServer(("127.0.0.1", 0), _handler(self))
        self.port = self._server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ what tests call
    def set(self, fault: str, *, path: str = "/blobs/sha256:", count: int | None = None, method: str | None = None,
            **params: Any) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r} (one of {', '.join(FAULTS)})")
        with self._lock:
            self._changed.set()  # a stall of the previous fault ends now
            self._changed = threading.Event()
            self._fault = {"name": fault, "path": path, "count": count, "method": method, **params}

    def clear(self) -> None:
        with self._lock:
            self._fault = None
            self._changed.set()
            self._changed = threading.Event()

    def blob_gets(self, digest: str | None = None) -> list[dict[str, Any]]:
        want = f"/blobs/sha256:{digest}" if digest else "/blobs/sha256:"
        with self._lock:
            return [r for r in self.records if r["method"] == "GET" and want in r["path"]]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._fault = None
            self._changed.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ used by the handler
    def _take(self, method: str, path: str, headers: Any) -> tuple[dict[str, Any] | None, threading.Event]:
        """Record a request and claim the fault that applies to it (if any)."""
        m = _RANGE.fullmatch(headers.get("Range", ""))
        with self._lock:
            f = self._fault
            if f is not None and f["path"] in path and f["method"] in (None, method) \
                    and (f["count"] is None or f["count"] > 0):
                if f["count"] is not None:
                    f["count"] -= 1
            else:
                f = None
            self.requests[path.split("?", 1)[0]] += 1
            self.records.append({"method": method, "path": path, "range": (int(m[1]), int(m[2]) + 1) if m else None,
                                 "authorization": headers.get("Authorization"), "fault": f["name"] if f else None,
                                 "time": time.monotonic()})
            return (dict(f) if f else None), self._changed


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up on a stalled or trickling answer is what the tests do on purpose


def _handler(px: FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: Any) -> None:
            pass

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            fault, changed = px._take(self.command, self.path, self.headers)
            name = fault["name"] if fault else None
            wait = min(float((fault or {}).get("seconds", 30)), MAX_WAIT)
            if name == "stall":
                changed.wait(wait)
                self.close_connection = True
                return
            if name == "status":
                self._answer(int(fault.get("code", 503)), fault.get("retry_after"))
                return
            if name == "challenge":
                self.send_response(401)
                self.send_header("WWW-Authenticate", fault.get("header", 'Basic realm="fault-proxy"'))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if name == "ignore_range":
                headers.pop("Range", None)
            elif name == "wrong_range":
                m = _RANGE.fullmatch(self.headers.get("Range", ""))
                if m:
                    shift = int(fault.get("shift", 4096))
                    headers["Range"] = f"bytes={int(m[1]) + shift}-{int(m[2]) + shift}"
            conn = http.client.HTTPConnection(px.upstream_host, px.upstream_port, timeout=60)
            try:
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                except OSError:
                    self._answer(502)
                    return
                self._relay(resp, fault, changed, wait)
            finally:
                conn.close()

        def _answer(self, code: int, retry_after: Any = None) -> None:
            self.send_response(code)
            if retry_after is not None:
                self.send_header("Retry-After", str(retry_after))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _relay(self, resp: http.client.HTTPResponse, fault: dict | None, changed: threading.Event,
                   wait: float) -> None:
            name = fault["name"] if fault else None
            length = resp.getheader("Content-Length")
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP_BY_HOP:
                    self.send_header(k, v)
            if length is not None:
                self.send_header("Content-Length", length)
            else:
                self.close_connection = True  # no length: the end of the body is the end of the connection
            if name == "slow_headers":
                head = b"".join(self._headers_buffer) + b"\r\n"
                self._headers_buffer = []
                interval = float(fault.get("interval", 1.0))
                end = time.monotonic() + wait
                try:
                    for i in range(len(head)):  # bounded by the header size and ``seconds``
                        if time.monotonic() >= end or changed.is_set():
                            break
                        self.wfile.write(head[i:i + 1])
                        self.wfile.flush()
                        changed.wait(interval)
                except OSError:
                    pass
                self.close_connection = True
                return
            self.end_headers()
            if self.command == "HEAD":
                return
            limit = None
            if name in ("reset", "truncate"):
                limit = int(fault.get("after", int(length or 0) // 2))
            sent = 0
            try:
                if name == "trickle":
                    interval = float(fault.get("interval", 1.0))
                    end = time.monotonic() + wait
                    while time.monotonic() < end and not changed.is_set():  # bounded by ``seconds``
                        byte = resp.read(1)
                        if not byte:
                            return
                        self.wfile.write(byte)
                        self.wfile.flush()
                        changed.wait(interval)
                    self.close_connection = True
                    return
                while limit is None or sent < limit:
                    piece = resp.read(_PIECE if limit is None else min(_PIECE, limit - sent))
                    if not piece:
                        break
                    self.wfile.write(piece)
                    sent += len(piece)
            except OSError:  # the client went away
                self.close_connection = True
                return
            if name in ("reset", "truncate"):
                self.wfile.flush()
                self.close_connection = True
                if name == "reset":  # SO_LINGER 0: closing now sends RST (the server's own close would send FIN)
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    return Handler
