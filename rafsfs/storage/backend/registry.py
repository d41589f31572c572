"""Blobs in an OCI registry: ``GET /v2/<repo>/blobs/sha256:<id>`` with ``Range``.

Endpoints: the configured proxy (e.g. a Dragonfly peer) and mirrors first, then the origin.  A failed endpoint
hands the read to the next one; a mirror or proxy may use at most half of the time left, so the origin always
gets its turn.

Retries (the shape of s3ql's ``@retry`` + ``is_temp_failure``): one *attempt* is the request **and** its body.  A
connection error, a reset or cut-off body, a timeout, 5xx and 429 (honouring ``Retry-After``) are temporary and
retried with exponential backoff up to ``retry_limit`` times; everything happens within one deadline per read
(:attr:`RegistryConfig.read_deadline`).  Every failure leaves this module as :class:`BlobUnavailable` (EIO to a
reader), never as a ``requests``/``urllib3``/socket exception.

Bodies are read in small pieces straight from the socket, with the socket's timeout set to the time left before
each piece, and a watchdog shuts the socket down if the status line and headers are not in by the deadline, so a
server that trickles one byte at a time cannot hold a read past its deadline.  A ``206`` must
carry the ``Content-Range`` that was asked for (else the endpoint fails: never wrong bytes).  A server that
ignores ``Range`` (``200``, the whole blob) is remembered for :data:`NO_RANGE_MEMORY` seconds and asked last; the
read goes to the next endpoint, and if there is none the body is streamed -- the bytes before the offset skipped,
the wanted ones kept, the rest never read -- so memory stays bounded by the read's size.

Authentication follows each endpoint's ``WWW-Authenticate`` challenge: anonymous, Basic, or Bearer tokens from the
challenge's realm; a token is refreshed before it expires and whenever the endpoint answers 401.  Credentials are
per endpoint: the origin's (``auth``/``username``, docker's config, ``registry_token``) go only to the origin and
the token realm it names, and to a mirror or proxy only if it sets ``auth_through``; a mirror may have its own.
Credentials never go to a plain-HTTP realm named by an HTTPS endpoint.  Redirects (to object storage) are followed
without the Authorization header.  TLS uses the system CAs, a custom CA file, or no verification (``skip_verify``);
a failed verification is not retried.
"""
from __future__ import annotations

import base64
import contextlib
import functools
import http.client
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import requests
import urllib3

from ...config import Endpoint, RegistryConfig
from ...errors import BlobUnavailable
from .auth import docker_credentials
from .base import BlobBackend, BlobRef, check_blob_id, current_deadline_cap, registry_identity

log = logging.getLogger(__name__)

BODY_PIECE = 64 << 10  # bytes asked of the socket at a time: the deadline is checked between pieces
NO_RANGE_MEMORY = 300.0  # seconds an endpoint that ignored Range is asked only after the others
PROXY_DOWN_MEMORY = 30.0  # seconds a failed proxy is skipped
MAX_RETRY_AFTER = 10.0  # seconds: the longest Retry-After honoured (the deadline still bounds it)
MAX_TOKEN_ANSWER = 256 << 10  # bytes: a token server's JSON answer (real ones: a few KiB)

_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_RETRY_STATUS = {429, 500, 502, 503, 504}
_SSL_REASON = re.compile(r"\[SSL[^\]]*\] ([^(']+)")
# what a request or a body read may raise; all of it is a temporary failure of the attempt
_NET_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)

T = TypeVar("T")


class _Retry(Exception):
    """A temporary failure of one attempt: try again (not before ``wait`` seconds) while the deadline allows."""

    def __init__(self, why: str, wait: float = 0.0):
        super().__init__(why)
        self.wait = wait


class _Reauth(Exception):
    """A 401: authenticate with its challenge and try once more (``why`` if that fails too)."""

    def __init__(self, response: requests.Response, why: str):
        super().__init__(why)
        self.response = response


_answer_by = threading.local()  # .deadline: when the request this thread is sending must have its headers


@contextlib.contextmanager
def _headers_by(deadline: float) -> Iterator[None]:
    _answer_by.deadline = deadline
    try:
        yield
    finally:
        _answer_by.deadline = None


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # the thread blocked in recv() gets EOF: the attempt fails
    except OSError:
        pass


class _WatchedResponse:
    """Mixed into urllib3's connections: a server that trickles its status line and headers (each recv() in time,
    the whole never) has its socket shut down at the deadline of the request (see :func:`_headers_by`)."""

    def getresponse(self):  # type: ignore[no-untyped-def]
        deadline = getattr(_answer_by, "deadline", None)
        sock = getattr(self, "sock", None)
        if deadline is None or sock is None:
            return super().getresponse()
        timer = threading.Timer(max(deadline - time.monotonic(), 0.0), _shutdown, (sock,))
        timer.daemon = True
        timer.start()
        try:
            return super().getresponse()
        finally:
            timer.cancel()


class _HTTPConnection(_WatchedResponse, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_WatchedResponse, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _Adapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


class _Token:
    def __init__(self, value: str, expires_at: float):
        self.value = value
        self.expires_at = expires_at


def _why(e: BaseException) -> str:
    """A short reason for a network exception (requests nests the real one a few levels down)."""
    inner: BaseException = e
    for _ in range(4):  # bounded: ConnectionError(MaxRetryError(NewConnectionError(...)))
        nxt = inner.args[0] if inner.args and isinstance(inner.args[0], BaseException) else None
        nxt = nxt or getattr(inner, "reason", None)
        if not isinstance(nxt, BaseException):
            break
        inner = nxt
    if isinstance(inner, (socket.timeout, TimeoutError)) or isinstance(e, requests.Timeout):
        return "timed out"
    if isinstance(inner, ConnectionRefusedError) or "refused" in str(inner).lower():
        return "connection refused"
    if isinstance(inner, ConnectionResetError):
        return "connection reset"
    return type(inner).__name__


def _boundary(fn: Callable[..., T]) -> Callable[..., T]:
    """Nothing but :class:`BlobUnavailable` leaves the backend (the contract of :class:`BlobBackend`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except (_Retry, _Reauth) as e:  # not expected here: _retrying turns them into BlobUnavailable
            raise BlobUnavailable(str(e)) from None
        except _NET_ERRORS as e:
            raise BlobUnavailable(f"registry request failed: {_why(e)}") from None

    return wrapper


class RegistryBackend(BlobBackend):
    def __init__(self, cfg: RegistryConfig):
        self.cfg = cfg
        self.session = requests.Session()
        self.session.trust_env = False  # proxies and CAs come from our config only (REQUESTS_CA_BUNDLE would win)
        adapter = _Adapter(pool_connections=4, pool_maxsize=64)  # one per concurrent fetch
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if cfg.skip_verify:
            self.session.verify = False
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        elif cfg.ca_file:
            self.session.verify = cfg.ca_file
        self.origin = Endpoint(f"{cfg.scheme}://{cfg.host}", is_origin=True)
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str, str], _Token] = {}  # (endpoint, realm, scope) -> token
        self._challenge: dict[str, dict] = {}  # endpoint base url -> last challenge params
        self._token_lock = threading.Lock()  # one token request at a time: no stampede when a token expires
        self._proxy_down_until = 0.0
        self._no_range_until: dict[str, float] = {}  # endpoint base url -> until when it is asked last
        self.requests_sent = 0

    @property
    def deadline(self) -> float:
        """Seconds one read may take (a caller's :func:`~.base.deadline_cap` may shorten it)."""
        cap = current_deadline_cap()
        d = self.cfg.read_deadline
        return d if cap is None else min(d, cap)

    # ------------------------------------------------------------------ BlobBackend
    @property
    def identity(self) -> str:
        return registry_identity(self.cfg)

    @_boundary
    def read(self, blob: BlobRef, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        path = self._blob_path(blob)
        return self._each_endpoint(f"GET blob {blob.name}", lambda ep, deadline, last: self._retrying(
            ep, deadline, lambda d: self._get_range(ep, path, offset, size, d, last)))

    @_boundary
    def size(self, blob: BlobRef) -> int:
        path = self._blob_path(blob)

        def head(ep: Endpoint, d: float) -> int:
            r = self._open(ep, "HEAD", path, {}, d, ok=(200,), describe=_describe)
            r.close()
            try:
                return int(r.headers["Content-Length"])
            except (KeyError, ValueError):
                raise BlobUnavailable(f"registry gave no size for blob {blob.name}") from None

        return self._each_endpoint(f"HEAD blob {blob.name}",
                                   lambda ep, deadline, last: self._retrying(ep, deadline, lambda d: head(ep, d)))

    def close(self) -> None:
        self.session.close()

    # ------------------------------------------------------------------ endpoints, attempts, retries
    def _blob_path(self, blob: BlobRef) -> str:
        check_blob_id(blob.blob_id)
        return f"/v2/{self.cfg.repo}/blobs/sha256:{blob.blob_id}"

    def _endpoints(self) -> list[Endpoint]:
        now = time.monotonic()
        eps: list[Endpoint] = []
        if self.cfg.proxy and now >= self._proxy_down_until:
            eps.append(self.cfg.proxy)
        eps.extend(self.cfg.mirrors)
        if not self.cfg.proxy or self.cfg.proxy_fallback or not eps:
            eps.append(self.origin)
        with self._lock:
            late = {e.base_url for e in eps if self._no_range_until.get(e.base_url, 0.0) > now}
        return [e for e in eps if e.base_url not in late] + [e for e in eps if e.base_url in late]

    def _each_endpoint(self, what: str, fn: Callable[[Endpoint, float, bool], T]) -> T:
        """``fn(endpoint, its deadline, is_last)`` on each endpoint in turn until one succeeds."""
        deadline = time.monotonic() + self.deadline
        eps = self._endpoints()
        last_error = f"{what}: no answer within the {self.deadline:g} s deadline"
        for i, ep in enumerate(eps):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            is_last = i == len(eps) - 1
            try:
                return fn(ep, deadline if is_last else time.monotonic() + left / 2, is_last)
            except BlobUnavailable as e:
                last_error = str(e)
                if ep is self.cfg.proxy:
                    self._proxy_down_until = time.monotonic() + PROXY_DOWN_MEMORY
                if not is_last:
                    log.warning("%s failed (%s); trying %s", ep.base_url, e, eps[i + 1].base_url)
        raise BlobUnavailable(last_error)

    def _retrying(self, ep: Endpoint, deadline: float, attempt: Callable[[float], T]) -> T:
        """``attempt(deadline)`` until it returns, retrying temporary failures (:class:`_Retry`) with backoff up
        to ``retry_limit`` times and a 401 once after authenticating, all within ``deadline``."""
        delay = 0.2
        attempts = 0
        reauthed = False
        last = ""
        while True:
            if time.monotonic() >= deadline:
                raise BlobUnavailable(f"{last or ep.base_url}: no answer within the {self.deadline:g} s deadline")
            try:
                return attempt(deadline)
            except _Reauth as e:
                if reauthed:
                    raise BlobUnavailable(str(e)) from None
                reauthed = True
                self._authenticate(ep, e.response)
                continue
            except _Retry as e:
                last, wait = str(e), e.wait
            attempts += 1
            if attempts > self.cfg.retry_limit:
                raise BlobUnavailable(f"{last} (gave up after {attempts} attempt{'s' if attempts > 1 else ''})")
            wait = min(max(delay, wait), max(deadline - time.monotonic(), 0.0))
            log.info("%s; retrying in %.1fs", last, wait)
            time.sleep(wait)
            delay = min(delay * 2, 5.0)

    def _open(self, ep: Endpoint, method: str, path: str, headers: dict[str, str], deadline: float, *,
              ok: tuple[int, ...], describe: Callable[[requests.Response, str], str], body: Any = None,
              stream: bool = True) -> requests.Response:
        """Send one request; a status in ``ok`` returns the response (the caller reads and closes it).  Raises
        :class:`_Retry` (temporary), :class:`_Reauth` (401) or :class:`BlobUnavailable` (this endpoint cannot)."""
        url = ep.base_url + path
        left = max(deadline - time.monotonic(), 0.001)
        h = dict(ep.headers)
        h.update(headers)
        auth = self._auth_for(ep, deadline)
        if auth:
            h["Authorization"] = auth
        data = body() if callable(body) else body  # a callable gives a fresh body (an opened file) per attempt
        try:
            with self._lock:
                self.requests_sent += 1
            with _headers_by(deadline):
                r = self.session.request(method, url, headers=h, data=data, allow_redirects=True, stream=stream,
                                         timeout=(min(self.cfg.connect_timeout, left), min(self.cfg.timeout, left)))
        except requests.exceptions.SSLError as e:
            m = _SSL_REASON.search(str(e))
            raise BlobUnavailable(f"TLS with {ep.base_url} failed ({m.group(1).strip() if m else 'handshake'}):"
                                  " give the registry's CA as ca_file, or skip_verify") from None
        except _NET_ERRORS as e:
            raise _Retry(f"{method} {url}: {_why(e)}") from None
        finally:
            if data is not body and hasattr(data, "close"):
                data.close()
        if r.status_code in ok:
            return r
        r.close()
        if r.status_code == 401:
            raise _Reauth(r, describe(r, url))
        if r.status_code in _RETRY_STATUS:
            raise _Retry(f"{method} {url}: HTTP {r.status_code}", _retry_after(r))
        raise BlobUnavailable(describe(r, url))

    def _get_range(self, ep: Endpoint, path: str, offset: int, size: int, deadline: float, last: bool) -> bytes:
        end = offset + size - 1
        r = self._open(ep, "GET", path, {"Range": f"bytes={offset}-{end}", "Accept-Encoding": "identity"},
                       deadline, ok=(200, 206), describe=_describe)
        url = ep.base_url + path
        with r:
            if r.status_code == 206:
                n = _range_length(r.headers.get("Content-Range"), offset, end, url)
                return self._read_body(r, url, deadline, skip=0, size=n)
            # 200: the whole blob
            with self._lock:
                known = self._no_range_until.get(ep.base_url, 0.0) > time.monotonic()
                self._no_range_until[ep.base_url] = time.monotonic() + NO_RANGE_MEMORY
            if not known:
                log.warning("%s ignores Range requests: it is asked last for %g s", ep.base_url, NO_RANGE_MEMORY)
            if not last:
                raise BlobUnavailable(f"{ep.base_url} ignores Range requests")
            try:
                total: int | None = int(r.headers["Content-Length"])
            except (KeyError, ValueError):
                total = None
            n = size if total is None else max(0, min(size, total - offset))
            return self._read_body(r, url, deadline, skip=offset, size=n, eof_ok=total is None)

    def _read_body(self, r: requests.Response, url: str, deadline: float, *, skip: int, size: int,
                   eof_ok: bool = False) -> bytes:
        """``size`` bytes of the body after the first ``skip`` (which are read and dropped), in pieces of at most
        :data:`BODY_PIECE`, each bounded by the time left.  A body that ends early is a temporary failure, unless
        ``eof_ok`` (no length was announced: the end of the body is the end of the blob)."""
        fp = r.raw._fp  # the http.client response under urllib3: read1() returns what one recv brings
        sock = _socket_of(r)
        out = bytearray()
        skipped = 0
        try:
            while skipped < skip or len(out) < size:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _Retry(f"GET {url}: {len(out)} of {size} bytes within the deadline")
                if sock is not None:
                    sock.settimeout(min(self.cfg.timeout, left))
                want = min(BODY_PIECE, skip - skipped) if skipped < skip else min(BODY_PIECE, size - len(out))
                piece = fp.read1(want)
                if not piece:
                    if eof_ok and skipped >= skip:
                        break
                    raise _Retry(f"GET {url}: body cut short after {len(out)} of {size} bytes")
                if skipped < skip:
                    skipped += len(piece)
                else:
                    out += piece
        except _NET_ERRORS as e:
            raise _Retry(f"GET {url}: {_why(e)} after {len(out)} of {size} bytes") from None
        if getattr(fp, "length", None) == 0 and not getattr(fp, "chunked", True):
            r.raw.release_conn()  # the whole body was read: the connection can serve the next request
        return bytes(out)

    def iter_body(self, r: requests.Response, deadline: float) -> Iterator[bytes]:
        """The body of a response from :meth:`request` in pieces, each read bounded by the time left; a body
        shorter than its ``Content-Length`` raises a temporary failure (retried by :meth:`request`)."""
        fp = r.raw._fp
        sock = _socket_of(r)
        try:
            want = int(r.headers["Content-Length"])
        except (KeyError, ValueError):
            want = None
        got = 0
        try:
            while want is None or got < want:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _Retry(f"{r.url}: {got} bytes within the deadline")
                if sock is not None:
                    sock.settimeout(min(self.cfg.timeout, left))
                piece = fp.read1(BODY_PIECE)
                if not piece:
                    break
                got += len(piece)
                yield piece
        except _NET_ERRORS as e:
            raise _Retry(f"{r.url}: {_why(e)} after {got} bytes") from None
        if want is not None and got < want:
            raise _Retry(f"{r.url}: body cut short after {got} of {want} bytes")

    # ------------------------------------------------------------------ authentication
    def _credentials(self, ep: Endpoint) -> tuple[str, str] | None:
        """The credentials ``ep`` may see: its own, or the origin's if it is the origin or ``auth_through``."""
        if ep.username is not None:
            return ep.username, ep.password or ""
        if not (ep.is_origin or ep.auth_through):
            return None
        if self.cfg.username is not None:
            return self.cfg.username, self.cfg.password or ""
        return docker_credentials(self.cfg.host)

    def _auth_for(self, ep: Endpoint, deadline: float) -> str | None:
        with self._lock:
            ch = self._challenge.get(ep.base_url)
        if ch is None:
            if self.cfg.registry_token and (ep.is_origin or ep.auth_through):
                return f"Bearer {self.cfg.registry_token}"
            return None
        if ch["scheme"] == "basic":
            creds = self._credentials(ep)
            if creds is None:
                return None
            return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        key = (ep.base_url, ch.get("realm", ""), ch.get("scope", ""))
        tok = self._tokens.get(key)
        if tok is None or time.time() >= tok.expires_at:
            with self._token_lock:
                tok = self._tokens.get(key)  # another thread may have just fetched it
                if tok is None or time.time() >= tok.expires_at:
                    tok = self._fetch_token(ep, ch, deadline)
        return f"Bearer {tok.value}"

    def _authenticate(self, ep: Endpoint, r: requests.Response) -> None:
        """Record the 401 challenge and drop any token it invalidates (an expired or revoked one)."""
        hdr = r.headers.get("WWW-Authenticate", "")
        scheme, _, rest = hdr.partition(" ")
        params = dict(_CHALLENGE_PARAM.findall(rest))
        params["scheme"] = scheme.lower()
        if params["scheme"] not in ("basic", "bearer"):
            raise BlobUnavailable(f"registry {ep.base_url} asks for unsupported auth {hdr[:100]!r}")
        if params["scheme"] == "bearer":
            params.setdefault("scope", f"repository:{self.cfg.repo}:pull")
            with self._lock:
                self._tokens.pop((ep.base_url, params.get("realm", ""), params["scope"]), None)
        elif self._credentials(ep) is None:
            raise BlobUnavailable(f"registry {ep.base_url} requires credentials and none are configured for it")
        with self._lock:
            self._challenge[ep.base_url] = params

    def _fetch_token(self, ep: Endpoint, ch: dict, deadline: float) -> _Token:
        realm = ch.get("realm")
        if not realm:
            raise BlobUnavailable(f"{ep.base_url}: bearer challenge without a realm")
        u = urllib.parse.urlsplit(realm)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise BlobUnavailable(f"{ep.base_url}: token realm {realm[:100]!r} is not an HTTP URL")
        creds = self._credentials(ep)
        if creds is not None and u.scheme == "http" and urllib.parse.urlsplit(ep.base_url).scheme == "https":
            raise BlobUnavailable(f"{ep.base_url} names a plain-HTTP token realm {realm[:100]}: credentials are not "
                                  "sent there")
        q = {"scope": ch["scope"]}
        if ch.get("service"):
            q["service"] = ch["service"]
        left = max(deadline - time.monotonic(), 0.001)
        try:
            with _headers_by(deadline):
                # streamed, and read like a blob body (bounded pieces, the deadline between them): the realm is
                # named by the registry, and its answer must not hold the read past its deadline nor fill memory
                r = self.session.get(realm, params=q, auth=creds, stream=True, headers={"Accept-Encoding": "identity"},
                                     timeout=(min(self.cfg.connect_timeout, left), min(self.cfg.timeout, left)))
        except _NET_ERRORS as e:  # the attempt is retried like any other
            raise _Retry(f"token request to {realm} failed: {_why(e)}") from None
        with r:
            if r.status_code in _RETRY_STATUS:
                raise _Retry(f"token request to {realm}: HTTP {r.status_code}", _retry_after(r))
            if r.status_code != 200:
                raise BlobUnavailable(f"token request to {realm}: HTTP {r.status_code}")
            try:
                length: int | None = int(r.headers["Content-Length"])
            except (KeyError, ValueError):
                length = None  # read to the end (a cut-off body is then cut-off JSON: no token)
            if length is not None and length > MAX_TOKEN_ANSWER:
                raise BlobUnavailable(f"token server {realm} sent more than {MAX_TOKEN_ANSWER} bytes")
            raw = self._read_body(r, realm, deadline, skip=0, size=MAX_TOKEN_ANSWER + 1 if length is None else length,
                                  eof_ok=length is None)  # an announced length cut short: retried
        if len(raw) > MAX_TOKEN_ANSWER:
            raise BlobUnavailable(f"token server {realm} sent more than {MAX_TOKEN_ANSWER} bytes")
        try:
            body = json.loads(raw)
            value = body.get("token") or body["access_token"]
            ttl = float(body.get("expires_in") or 60)
            if not isinstance(value, str) or not value:
                raise ValueError
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise BlobUnavailable(f"token server {realm} sent no token") from None
        tok = _Token(value, time.time() + max(ttl - 10, ttl / 2))  # refresh a little early
        with self._lock:
            self._tokens[(ep.base_url, realm, ch["scope"])] = tok
        return tok

    # ------------------------------------------------------------------ other API requests (the OCI client)
    @_boundary
    def request(self, method: str, path: str, headers: dict[str, str] | None = None, *, body: Any = None,
                ok: tuple[int, ...] = (200,), stream: bool = False,
                read: Callable[[requests.Response, float], T] | None = None) -> Any:
        """One request to the origin registry (``path`` starts with ``/v2/``) with this backend's auth (the
        challenge decides the token scope, so pushes get ``pull,push``), retries and deadline: manifests and
        uploads for rafsfs.oci.  ``body`` is bytes or a callable returning a fresh body per attempt (an opened
        file, closed after the attempt).  A status in ``ok`` returns the response, or with ``read`` the result of
        ``read(response, deadline)``, called inside the retry loop (it reads the body, e.g. with
        :meth:`iter_body`; a cut-off body is retried).  Any other status raises :class:`BlobUnavailable`."""

        def attempt(d: float) -> Any:
            r = self._open(self.origin, method, path, dict(headers or {}), d, ok=ok, describe=_describe_api,
                           body=body, stream=stream or read is not None)
            if read is None:
                return r
            with r:
                try:
                    return read(r, d)
                except _NET_ERRORS as e:
                    raise _Retry(f"{method} {path}: {_why(e)}") from None

        return self._retrying(self.origin, time.monotonic() + self.deadline, attempt)


def _socket_of(r: requests.Response) -> socket.socket | None:
    conn = getattr(r.raw, "_connection", None)
    return getattr(conn, "sock", None)


def _retry_after(r: requests.Response) -> float:
    try:
        return max(0.0, min(float(r.headers.get("Retry-After", 0)), MAX_RETRY_AFTER))
    except ValueError:  # an HTTP date: not worth parsing, the backoff applies
        return 0.0


def _range_length(hdr: str | None, offset: int, end: int, url: str) -> int:
    """The length of a 206 body, if its ``Content-Range`` is the one asked for (it may stop early only where the
    blob ends); else this endpoint's answer is unusable."""
    m = _CONTENT_RANGE.fullmatch((hdr or "").strip())
    if m:
        a, b, total = int(m[1]), int(m[2]), m[3]
        if a == offset and a <= b <= end and (b == end or (total != "*" and b == int(total) - 1)):
            return b - a + 1
    raise BlobUnavailable(f"{url}: asked for bytes {offset}-{end}, got Content-Range {str(hdr)[:80]!r}")


def _describe_api(r: requests.Response, url: str) -> str:
    err = f"{r.request.method} {url}: HTTP {r.status_code}"
    if r.status_code in (401, 403):
        return f"access denied: {err}: check the registry credentials"
    return err


def _describe(r: requests.Response, url: str) -> str:
    if r.status_code == 404:
        return f"blob not found at {url}"
    if r.status_code in (401, 403):
        return f"access denied to {url} (HTTP {r.status_code}): check the registry credentials"
    if r.status_code == 416:
        return f"range not satisfiable at {url}: the blob is shorter than the image says"
    return f"{r.request.method} {url}: HTTP {r.status_code}"
