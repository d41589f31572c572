"""Blobs in an OCI registry: ``GET /v2/<repo>/blobs/sha256:<id>`` with ``Range``.

Authentication follows the registry's ``WWW-Authenticate`` challenge: anonymous, Basic, or Bearer tokens fetched
from the challenge's realm (with Basic credentials when we have them).  A token is refreshed before it expires
and again whenever the registry answers 401, since expired credentials are the most common failure of lazy
pulling.  Redirects (to object storage) are followed without leaking the registry's Authorization header.
Requests go first to the configured proxy (e.g. a Dragonfly peer) or mirrors, falling back to the origin.
5xx, 429, connection errors and cut-off bodies are retried with exponential backoff, all within one deadline per
read; after that the read fails with :class:`BlobUnavailable` (EIO to a reader), so a registry that stops answering
never hangs a reader.  TLS uses the system CAs, a custom CA file, or no verification (``skip_verify``); a failed
verification is not retried.
"""
from __future__ import annotations

import base64
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import requests

from ...errors import BlobUnavailable
from .base import BlobBackend, BlobRef, check_blob_id
from .registry_config import Endpoint, RegistryConfig, decode_auth, docker_credentials  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
_RETRY_STATUS = {429, 500, 502, 503, 504}
_SSL_REASON = re.compile(r"\[SSL[^\]]*\] ([^(']+)")
_BODY_PIECE = 1 << 20


class _Token:
    def __init__(self, value: str, expires_at: float):
        self.value = value
        self.expires_at = expires_at


class RegistryBackend(BlobBackend):
    def __init__(self, cfg: RegistryConfig):
        self.cfg = cfg
        self.session = requests.Session()
        self.session.trust_env = False  # proxies and CAs come from our config only (REQUESTS_CA_BUNDLE would win)
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=64)  # one per concurrent fetch
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if cfg.skip_verify:
            self.session.verify = False
            import urllib3

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        elif cfg.ca_file:
            self.session.verify = cfg.ca_file
        self.origin = Endpoint(f"{cfg.scheme}://{cfg.host}", is_origin=True)
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str], _Token] = {}  # (realm, scope) -> token
        self._challenge: dict[str, dict] = {}  # endpoint base url -> last challenge params
        self._token_lock = threading.Lock()  # one token request at a time: no stampede when a token expires
        self._proxy_down_until = 0.0
        self.requests_sent = 0

    @property
    def deadline(self) -> float:
        c = self.cfg
        return c.deadline if c.deadline > 0 else (c.connect_timeout + c.timeout) * (c.retry_limit + 1)

    # ------------------------------------------------------------------ BlobBackend
    def read(self, blob: BlobRef, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        r, data = self._request("GET", blob, {"Range": f"bytes={offset}-{offset + size - 1}"})
        if r.status_code == 200:  # the server ignored Range: take our slice of the whole blob
            log.debug("registry ignored Range for %s", blob.name)
            data = data[offset:offset + size]
        return data

    def size(self, blob: BlobRef) -> int:
        r, _ = self._request("HEAD", blob, {})
        try:
            return int(r.headers["Content-Length"])
        except (KeyError, ValueError):
            raise BlobUnavailable(f"registry gave no size for blob {blob.name}") from None

    def close(self) -> None:
        self.session.close()

    # ------------------------------------------------------------------ endpoints and retries
    def _endpoints(self) -> list[Endpoint]:
        eps: list[Endpoint] = []
        if self.cfg.proxy and time.monotonic() >= self._proxy_down_until:
            eps.append(self.cfg.proxy)
        eps.extend(self.cfg.mirrors)
        if not self.cfg.proxy or self.cfg.proxy_fallback or not eps:
            eps.append(self.origin)
        return eps

    def _request(self, method: str, blob: BlobRef, headers: dict[str, str]) -> tuple[requests.Response, bytes]:
        check_blob_id(blob.blob_id)
        path = f"/v2/{self.cfg.repo}/blobs/sha256:{blob.blob_id}"
        deadline = time.monotonic() + self.deadline
        last = "no endpoint"
        for ep in self._endpoints():
            # a mirror or proxy may use at most half of what is left: the origin always gets its turn
            ep_deadline = deadline if ep.is_origin else time.monotonic() + (deadline - time.monotonic()) / 2
            try:
                return self._request_endpoint(ep, method, path, headers, ep_deadline)
            except BlobUnavailable as e:
                last = str(e)
                if ep is self.cfg.proxy:
                    self._proxy_down_until = time.monotonic() + 30
                if not ep.is_origin:
                    log.warning("%s failed (%s); falling back", ep.base_url, e)
        raise BlobUnavailable(last)

    def _request_endpoint(self, ep: Endpoint, method: str, path: str, headers: dict[str, str],
                          deadline: float) -> tuple[requests.Response, bytes]:
        r = self._send(ep, method, path, headers, deadline, ok=(200, 206), stream=True, describe=_describe)
        if method == "HEAD":
            r.close()
            return r, b""
        return r, self._body(r, deadline)

    def _send(self, ep: Endpoint, method: str, path: str, headers: dict[str, str], deadline: float, *,
              ok: tuple[int, ...], stream: bool, describe: "Callable[[requests.Response, str], str]",
              body: Any = None) -> requests.Response:
        """One request with auth (a 401 re-authenticates once), retries with backoff on connection errors, 429 and
        5xx, all within ``deadline``; returns the response with a status in ``ok`` (the caller reads and closes
        it), else raises :class:`BlobUnavailable` with ``describe(response, url)`` or the last error."""
        url = ep.base_url + path
        delay = 0.2
        reauthed = False
        attempt = 0
        err = f"{method} {url}"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BlobUnavailable(f"{err}: no answer within the {self.deadline:g} s deadline")
            h = dict(ep.headers)
            h.update(headers)
            auth = self._auth_for(ep, deadline)
            if auth:
                h["Authorization"] = auth
            r = None
            try:
                with self._lock:
                    self.requests_sent += 1
                r = self.session.request(method, url, headers=h, data=body() if callable(body) else body,
                                         allow_redirects=True, stream=stream,
                                         timeout=(min(self.cfg.connect_timeout, left), min(self.cfg.timeout, left)))
                if r.status_code in ok:
                    return r
                r.close()
            except requests.exceptions.SSLError as e:
                m = _SSL_REASON.search(str(e))
                raise BlobUnavailable(f"TLS with {ep.base_url} failed ({m.group(1).strip() if m else 'handshake'}):"
                                      " give the registry's CA as ca_file, or skip_verify") from None
            except requests.RequestException as e:
                err = f"{method} {url}: {type(e).__name__}"
            else:
                if r.status_code == 401 and not reauthed:
                    reauthed = True
                    self._authenticate(ep, r)
                    continue
                err = f"{method} {url}: HTTP {r.status_code}"
                if r.status_code not in _RETRY_STATUS:
                    raise BlobUnavailable(describe(r, url))
            attempt += 1
            if attempt > self.cfg.retry_limit:
                raise BlobUnavailable(f"{err} (gave up after {attempt} attempts)")
            wait = delay
            if r is not None and r.status_code == 429:
                try:
                    wait = max(wait, min(float(r.headers.get("Retry-After", 0)), 10.0))
                except ValueError:
                    pass
            wait = min(wait, max(deadline - time.monotonic(), 0))
            log.info("%s; retrying in %.1fs", err, wait)
            time.sleep(wait)
            delay = min(delay * 2, 5.0)

    def _body(self, r: requests.Response, deadline: float) -> bytes:
        """The whole response body, read within ``deadline``; a body cut short raises (requests' errors)."""
        parts = []
        with r:
            for piece in r.iter_content(_BODY_PIECE):
                parts.append(piece)
                if time.monotonic() > deadline:
                    raise requests.exceptions.Timeout("body not complete before the deadline")
        return b"".join(parts)

    # ------------------------------------------------------------------ authentication
    def _credentials(self) -> tuple[str, str] | None:
        if self.cfg.username is not None:
            return self.cfg.username, self.cfg.password or ""
        return docker_credentials(self.cfg.host)

    def _auth_for(self, ep: Endpoint, deadline: float) -> str | None:
        with self._lock:
            ch = self._challenge.get(ep.base_url)
            if ch is None:
                if self.cfg.registry_token:
                    return f"Bearer {self.cfg.registry_token}"
                return None
        if ch["scheme"] == "basic":
            creds = self._credentials()
            if creds is None:
                return None
            return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        key = (ch.get("realm", ""), ch.get("scope", ""))
        tok = self._tokens.get(key)
        if tok is None or time.time() >= tok.expires_at:
            with self._token_lock:
                tok = self._tokens.get(key)  # another thread may have just fetched it
                if tok is None or time.time() >= tok.expires_at:
                    tok = self._fetch_token(ch, deadline)
        return f"Bearer {tok.value}"

    def _authenticate(self, ep: Endpoint, r: requests.Response) -> None:
        """Record the 401 challenge and drop any token it invalidates (an expired or revoked one)."""
        hdr = r.headers.get("WWW-Authenticate", "")
        scheme, _, rest = hdr.partition(" ")
        params = dict(_CHALLENGE_PARAM.findall(rest))
        params["scheme"] = scheme.lower()
        if params["scheme"] not in ("basic", "bearer"):
            raise BlobUnavailable(f"registry {ep.base_url} asks for unsupported auth {hdr!r}")
        if params["scheme"] == "bearer":
            params.setdefault("scope", f"repository:{self.cfg.repo}:pull")
            with self._lock:
                self._tokens.pop((params.get("realm", ""), params["scope"]), None)
        elif self._credentials() is None:
            raise BlobUnavailable(f"registry {ep.base_url} requires credentials and none are configured")
        with self._lock:
            self._challenge[ep.base_url] = params

    def _fetch_token(self, ch: dict, deadline: float) -> _Token:
        realm = ch.get("realm")
        if not realm:
            raise BlobUnavailable("bearer challenge without a realm")
        q = {"scope": ch["scope"]}
        if ch.get("service"):
            q["service"] = ch["service"]
        creds = self._credentials()
        left = max(deadline - time.monotonic(), 0.001)
        try:
            r = self.session.get(realm, params=q, auth=creds,
                                 timeout=(min(self.cfg.connect_timeout, left), min(self.cfg.timeout, left)))
        except requests.RequestException as e:
            raise BlobUnavailable(f"token request to {realm} failed: {type(e).__name__}") from None
        if r.status_code != 200:
            raise BlobUnavailable(f"token request to {realm}: HTTP {r.status_code}")
        try:
            body = r.json()
            value = body.get("token") or body["access_token"]
            ttl = float(body.get("expires_in") or 60)
        except (ValueError, KeyError, TypeError):
            raise BlobUnavailable(f"token server {realm} sent no token") from None
        tok = _Token(value, time.time() + max(ttl - 10, ttl / 2))  # refresh a little early
        with self._lock:
            self._tokens[(realm, ch["scope"])] = tok
        return tok

    # ------------------------------------------------------------------ other API requests (the OCI client)
    def request(self, method: str, path: str, headers: dict[str, str] | None = None, *, body: Any = None,
                ok: tuple[int, ...] = (200,), stream: bool = False) -> requests.Response:
        """One request to the origin registry (``path`` starts with ``/v2/``) with this backend's auth (the
        challenge decides the token scope, so pushes get ``pull,push``), retries and deadline: manifests and
        uploads for rafsfs.oci.  ``body`` is bytes or a callable returning a fresh body (an opened file) per
        attempt.  A status in ``ok`` returns the response (the caller reads and closes it); any other raises
        :class:`BlobUnavailable` with a one-line reason."""
        return self._send(self.origin, method, path, dict(headers or {}), time.monotonic() + self.deadline,
                          ok=ok, stream=stream, describe=_describe_api, body=body)


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
    return f"GET {url}: HTTP {r.status_code}"
