"""A real OCI registry for tests: Debian's ``docker-registry`` on 127.0.0.1, started and stopped by the test.

The API, all of it::

    with start_registry(tmp_path, auth="none" | "basic" | "token", tls=False, token_lifetime=..., ...) as reg:
        digest = reg.push_blob("test/repo", path_or_bytes)       # POST + PUT ?digest=, returns the hex sha256
        cfg = reg.nydusd_config("test/repo", work_dir)           # a nydusd JSON config (dict) reading from it
        reg.blob_gets()                                          # GET .../blobs/... requests the registry answered
        reg.stop() / reg.kill() / reg.start() / reg.restart()    # same port and storage across restarts
        reg.pause() / reg.resume()                               # SIGSTOP / SIGCONT: a registry that hangs
        reg.admin_session(repo)                                  # requests.Session with pull+push on repo
        reg.blob_path(digest)                                    # the stored blob file (to corrupt it)
        reg.token_server.hits                                    # token requests (auth="token")
        with reg.fault_proxy() as px:                            # a proxy tests make misbehave (fault_proxy.py)
        with reg.counting_proxy() as px:                         # a plain-HTTP proxy in front of it that
            cfg = reg.nydusd_config(repo, work_dir, host=px.host)  # records each request's Range header:
            px.blob_gets(digest, overlapping=(start, end))       # GETs whose range overlaps [start, end)

* Requests are counted **at the registry**: it logs one JSON line per answered request, which
  :meth:`Registry.requests` parses (waiting until the log is quiet, since the line is written just after the
  answer).
* ``auth="basic"``: an htpasswd file with bcrypt hashes (``htpasswd -B``); user :data:`USER` / :data:`PASSWORD`.
* ``auth="token"``: the registry's ``auth.token`` (realm/service/issuer/rootcertbundle) and :class:`TokenServer`, a
  small HTTP server in this process issuing RS256 JWTs signed with a key whose self-signed certificate is the
  registry's root bundle (sent as ``x5c``).  ``token_expires_in`` is what the server *tells* clients;
  ``token_lifetime`` is how long the registry really accepts a token, so a token can expire during a run both
  announced (client refreshes early) and unannounced (registry answers 401, client must fetch a new one).
  Token requests need the basic credentials above.
* ``tls=True``: HTTPS with a certificate for 127.0.0.1 signed by a test CA at :attr:`Registry.ca_file`.

Everything is cleaned up when the ``with`` block ends, also on failure.
"""
from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import requests

USER = "rafs-user"
PASSWORD = "s3cret-pw"
SERVICE = "rafsfs-test-registry"
ISSUER = "rafsfs-test-token-issuer"
REGISTRY_LEEWAY = 60  # seconds docker-registry adds to a token's exp (and subtracts from nbf) for clock skew


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- keys and certs
def _self_signed(dirpath: Path, name: str, *, ca: tuple | None = None, ips: tuple[str, ...] = (),
                 is_ca: bool = False) -> tuple[Path, Path, object, object]:
    """Write ``name.key`` / ``name.crt``; signed by ``ca`` = (cert, key) or self-signed.  Returns paths and objects."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(subject)
         .issuer_name(ca[0].subject if ca else subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if ips:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]),
                            critical=False)
    cert = b.sign(ca[1] if ca else key, hashes.SHA256())
    kp, cp = dirpath / f"{name}.key", dirpath / f"{name}.crt"
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                     serialization.NoEncryption()))
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return kp, cp, cert, key


# ---------------------------------------------------------------------------------------------- token server
class TokenServer:
    """Docker's token protocol (``GET /token?service=&scope=``, Basic credentials) issuing RS256 JWTs."""

    def __init__(self, workdir: Path, *, expires_in: int = 300, lifetime: float | None = None,
                 users: dict[str, str] | None = None):
        from cryptography.hazmat.primitives import serialization

        self.expires_in = expires_in  # announced to clients
        self.lifetime = expires_in if lifetime is None else lifetime  # enforced by the registry
        self.users = users if users is not None else {USER: PASSWORD}
        _, self.cert_path, cert, key = _self_signed(workdir, "token-signer")
        self._key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        self._x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
        self.hits: list[dict] = []  # one per token request: {"user", "scopes", "status", "time"}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, name="token-server", daemon=True)
        self._thread.start()

    def issue(self, scopes: list[str], subject: str = USER) -> str:
        """A signed token granting ``scopes`` (``repository:NAME:pull,push``) that the registry accepts for
        :attr:`lifetime` seconds."""
        import jwt

        access = []
        for s in scopes:
            typ, _, rest = s.partition(":")
            name, _, actions = rest.rpartition(":")
            if typ and name:
                access.append({"type": typ, "name": name, "actions": [a for a in actions.split(",") if a]})
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "iat": now, "nbf": now - 1,
                  # the registry accepts a token until exp + 60 s: take that leeway off
                  "exp": now + int(round(self.lifetime)) - REGISTRY_LEEWAY,
                  "jti": uuid.uuid4().hex, "access": access}
        return jwt.encode(claims, self._key_pem, algorithm="RS256", headers={"x5c": self._x5c})

    def _handler(self):
        ts = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                q = urllib.parse.parse_qs(url.query)
                user = None
                hdr = self.headers.get("Authorization", "")
                if hdr.startswith("Basic "):
                    try:
                        user, _, pw = base64.b64decode(hdr[6:]).decode().partition(":")
                    except ValueError:
                        user, pw = None, None
                    if ts.users.get(user) != pw:
                        user = "!bad"
                ok = url.path == "/token" and user in ts.users and q.get("service") == [SERVICE]
                scopes = q.get("scope", [])
                with ts._lock:
                    ts.hits.append({"user": user, "scopes": scopes, "status": 200 if ok else 401,
                                    "time": time.time()})
                if not ok:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="token"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                tok = ts.issue(scopes, user)
                body = json.dumps({"token": tok, "access_token": tok, "expires_in": ts.expires_in,
                                   "issued_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler

    @property
    def ok_hits(self) -> int:
        with self._lock:
            return sum(1 for h in self.hits if h["status"] == 200)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# ---------------------------------------------------------------------------------------------- counting proxy
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade", "host", "content-length"}
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


class CountingProxy:
    """A reverse proxy on 127.0.0.1 that forwards every request to the registry (plain HTTP) and records it with
    its ``Range``: the registry's own log has no ranges, so this is how a test counts requests for one chunk."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.records: list[dict] = []  # {"method", "path", "range": (start, end) | None, "status"}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, name="counting-proxy", daemon=True).start()

    def _handler(self):
        px = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _forward(self):
                import http.client

                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                conn = http.client.HTTPConnection("127.0.0.1", px.upstream_port, timeout=300)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                except OSError:
                    data, resp = None, None
                finally:
                    conn.close()
                m = _RANGE.fullmatch(self.headers.get("Range", ""))
                with px._lock:
                    px.records.append({"method": self.command, "path": self.path,
                                       "range": (int(m[1]), int(m[2]) + 1) if m else None,
                                       "status": resp.status if resp else 502})
                if resp is None:
                    self.send_error(502)
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP_BY_HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        return Handler

    def blob_gets(self, digest: str | None = None, *, overlapping: tuple[int, int] | None = None) -> list[dict]:
        """Data-carrying GETs of blob ``digest`` (any blob if None); with ``overlapping=(start, end)`` only those
        whose Range overlaps that byte range (a GET without Range covers everything)."""
        want = f"/blobs/sha256:{digest}" if digest else "/blobs/sha256:"
        with self._lock:
            recs = list(self.records)
        out = []
        for r in recs:
            if r["method"] != "GET" or want not in r["path"] or r["status"] not in (200, 206):
                continue
            if overlapping and r["range"] and not (r["range"][0] < overlapping[1] and overlapping[0] < r["range"][1]):
                continue
            out.append(r)
        return out

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# ---------------------------------------------------------------------------------------------- the registry
@dataclass
class Registry:
    """One ``docker-registry serve`` process; see the module docstring."""

    workdir: Path
    auth: str = "none"  # none | basic | token
    tls: bool = False
    token_server: TokenServer | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    ca_file: str | None = None
    shared_storage: Path | None = None  # serve another registry's storage (a TLS twin of a plain one)

    def __post_init__(self):
        self.storage = self.shared_storage or self.workdir / "storage"
        self.log_path = self.workdir / "registry.log"
        self.config_path = self.workdir / "config.yml"
        self.storage.mkdir(parents=True, exist_ok=True)
        self._write_config()

    # ---------------------------------------------------------------- addresses and credentials
    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def auth_field(self) -> str | None:
        """nydusd's ``auth``: base64 of ``user:password`` (None for an anonymous registry)."""
        return None if self.auth == "none" else base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    def nydusd_config(self, repo: str, work_dir: str | os.PathLike, *, cache: str = "blobcache",
                      **backend: object) -> dict:
        """A nydusd JSON config reading blobs of ``repo`` from this registry through a cache in ``work_dir``.
        ``backend`` adds or overrides keys of ``device.backend.config`` (``timeout``, ``retry_limit``, ...)."""
        bc: dict = {"scheme": self.scheme, "host": self.host, "repo": repo}
        if self.auth_field:
            bc["auth"] = self.auth_field
        if self.ca_file:
            bc["ca_file"] = self.ca_file
        bc.update(backend)
        return {"device": {"backend": {"type": "registry", "config": bc},
                           "cache": {"type": cache, "config": {"work_dir": str(work_dir)}}},
                "digest_validate": True}

    # ---------------------------------------------------------------- process
    def _write_config(self) -> None:
        auth = ""
        if self.auth == "basic":
            htpasswd = self.workdir / "htpasswd"
            p = subprocess.run(["htpasswd", "-nbB", USER, PASSWORD], capture_output=True, text=True, check=True)
            htpasswd.write_text(p.stdout.strip() + "\n")
            auth = f"auth:\n  htpasswd:\n    realm: rafsfs-test\n    path: {htpasswd}\n"
        elif self.auth == "token":
            assert self.token_server is not None
            ts = self.token_server
            auth = (f"auth:\n  token:\n    realm: {ts.realm}\n    service: {SERVICE}\n    issuer: {ISSUER}\n"
                    f"    rootcertbundle: {ts.cert_path}\n")
        elif self.auth != "none":
            raise ValueError(f"auth must be none, basic or token, not {self.auth!r}")
        tls = ""
        if self.tls:
            ca = _self_signed(self.workdir, "test-ca", is_ca=True)
            kp, cp, _, _ = _self_signed(self.workdir, "registry-server", ca=(ca[2], ca[3]),
                                          ips=("127.0.0.1", "0.0.0.0"))  # 0.0.0.0: how soci must address it
            self.ca_file = str(ca[1])
            tls = f"  tls:\n    certificate: {cp}\n    key: {kp}\n"
        self.config_path.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  formatter: json\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n  secret: {uuid.uuid4().hex}\n{tls}"
            + auth)

    def start(self, timeout: float = 20.0) -> None:
        """Start (or start again, same port and storage) and wait until it answers."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        exe = shutil.which("docker-registry")
        if exe is None:
            raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen([exe, "serve", str(self.config_path)], stdout=logf,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                requests.get(f"{self.url}/v2/", timeout=1, verify=self.ca_file or True)
                return
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"docker-registry did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM and wait (a stopped, i.e. paused, process is resumed first so it can exit)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: the registry dies mid-request."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel, nothing is answered."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    # ---------------------------------------------------------------- what it answered
    def requests(self, *, settle: float = 0.3) -> list[dict]:
        """Every request the registry answered, oldest first: ``{"method", "uri", "status", "bytes", "msg"}`` from
        its "response completed" log records, and status 401 from its "error authorizing context" ones.  Waits
        until the log has not grown for ``settle`` seconds."""
        size, quiet_since = -1, time.monotonic()
        while True:
            now_size = self.log_path.stat().st_size if self.log_path.exists() else 0
            if now_size != size:
                size, quiet_since = now_size, time.monotonic()
            elif time.monotonic() - quiet_since >= settle:
                break
            time.sleep(0.05)
        out = []
        with open(self.log_path, "rb") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                msg = rec.get("msg", "")
                if msg == "response completed":
                    status = rec.get("http.response.status")
                elif msg.startswith("error authorizing context"):  # answered 401: logged only like this
                    status = 401
                else:
                    continue
                out.append({"method": rec.get("http.request.method"), "uri": rec.get("http.request.uri"),
                            "status": status, "bytes": rec.get("http.response.written", 0), "msg": msg})
        return out

    def blob_gets(self, digest: str | None = None, *, settle: float = 0.3) -> list[dict]:
        """Answered ``GET /v2/<repo>/blobs/sha256:<digest>`` requests that carried data (200/206)."""
        want = f"/blobs/sha256:{digest}" if digest else "/blobs/sha256:"
        return [r for r in self.requests(settle=settle)
                if r["method"] == "GET" and want in (r["uri"] or "") and r["status"] in (200, 206)]

    @contextlib.contextmanager
    def counting_proxy(self) -> Iterator[CountingProxy]:
        """A :class:`CountingProxy` in front of this registry (plain HTTP only), closed when the block ends."""
        assert not self.tls, "the counting proxy speaks plain HTTP"
        px = CountingProxy(self.port)
        try:
            yield px
        finally:
            px.close()

    @contextlib.contextmanager
    def fault_proxy(self) -> Iterator["FaultProxy"]:
        """A :class:`fault_proxy.FaultProxy` in front of this registry (plain HTTP only), closed when the block
        ends."""
        from fault_proxy import FaultProxy

        assert not self.tls, "the fault proxy speaks plain HTTP"
        with FaultProxy(self.port) as px:
            yield px

    def blob_path(self, digest: str) -> Path:
        """The stored file of a blob in the registry's filesystem storage."""
        return self.storage / "docker/registry/v2/blobs/sha256" / digest[:2] / digest / "data"

    # ---------------------------------------------------------------- pushing
    def admin_session(self, repo: str) -> requests.Session:
        """A requests session allowed to pull and push ``repo`` (for manifests and other API calls of a test)."""
        s = requests.Session()
        s.trust_env = False  # else REQUESTS_CA_BUNDLE would override verify
        s.verify = self.ca_file or True
        if self.auth == "basic":
            s.auth = (USER, PASSWORD)
        elif self.auth == "token":
            assert self.token_server is not None
            # minted in-process: pushing does not count as a token-server hit
            tok = self.token_server.issue([f"repository:{repo}:pull,push"])
            s.headers["Authorization"] = f"Bearer {tok}"
        return s

    _admin_session = admin_session  # the name test_oci.py first used

    def push_manifest(self, repo: str, tag: str, manifest: dict) -> str:
        """PUT an image manifest (its ``mediaType`` is the content type); returns its digest."""
        raw = json.dumps(manifest, separators=(",", ":")).encode()
        with self.admin_session(repo) as s:
            r = s.put(f"{self.url}/v2/{repo}/manifests/{tag}", data=raw, timeout=30,
                      headers={"Content-Type": manifest["mediaType"]})
            if r.status_code != 201:
                raise RuntimeError(f"manifest {repo}:{tag}: HTTP {r.status_code} {r.text[:200]}")
        return "sha256:" + hashlib.sha256(raw).hexdigest()

    def get_manifest(self, repo: str, ref: str) -> dict:
        with self.admin_session(repo) as s:
            r = s.get(f"{self.url}/v2/{repo}/manifests/{ref}", timeout=30, headers={"Accept": ", ".join(
                ("application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
                 "application/vnd.docker.distribution.manifest.v2+json"))})
            r.raise_for_status()
            return r.json()

    def push_blob(self, repo: str, data: bytes | str | os.PathLike) -> str:
        """Upload a blob (monolithic: POST an upload, PUT its bytes with ``?digest=``); returns its hex sha256."""
        if not isinstance(data, bytes):
            data = Path(data).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        with self.admin_session(repo) as s:
            r = s.post(f"{self.url}/v2/{repo}/blobs/uploads/", timeout=30)
            if r.status_code != 202:
                raise RuntimeError(f"upload start: HTTP {r.status_code} {r.text[:200]}")
            loc = urllib.parse.urljoin(self.url, r.headers["Location"])
            sep = "&" if "?" in loc else "?"
            r = s.put(f"{loc}{sep}digest=sha256:{digest}", data=data, timeout=300,
                      headers={"Content-Type": "application/octet-stream"})
            if r.status_code != 201:
                raise RuntimeError(f"upload of sha256:{digest}: HTTP {r.status_code} {r.text[:200]}")
        return digest


@contextlib.contextmanager
def start_registry(workdir: str | os.PathLike, *, auth: str = "none", tls: bool = False,
                   token_expires_in: int = 300, token_lifetime: float | None = None) -> Iterator[Registry]:
    """A running registry in ``workdir`` (created), stopped with its token server when the block ends."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ts = TokenServer(workdir, expires_in=token_expires_in, lifetime=token_lifetime) if auth == "token" else None
    reg = None
    try:
        reg = Registry(workdir, auth=auth, tls=tls, token_server=ts)
        reg.start()
        yield reg
    finally:
        if reg is not None:
            reg.stop()
        if ts is not None:
            ts.close()
