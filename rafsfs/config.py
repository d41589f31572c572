"""One typed configuration, with every default next to its field, and loaders for the shapes users already have:

* nydusd's JSON config: ``{"device": {"backend": {"type", "config"}, "cache": {"type", "config": {"work_dir"}}},
  "digest_validate", "amplify_io", "fs_prefetch": {...}, ...}``
* the seed's / nydusd v2 fscache shape: ``{"type": "bootstrap", "config": {"backend_type", "backend_config",
  "cache_type", "cache_config", "prefetch_config", ...}}``

Unknown keys are logged as warnings; invalid values raise :class:`ConfigError` with the offending key.
"""
from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from .errors import RafsError

log = logging.getLogger(__name__)

DEFAULT_WORK_DIR = "/var/lib/rafsfs/cache"
MAX_AMPLIFY_IO = 16 << 20  # one merged backend request is held in memory whole: bounded (nydusd's default is 1 MiB)
MAX_PREFETCH_THREADS = 1024  # nydusd's bound; the prefetcher itself uses at most a few (and says so)


class ConfigError(RafsError):
    pass


# ---------------------------------------------------------------------------------------------- registry
# Plain data, importable without the HTTP stack; the registry backend imports it from here (as Nydus's backend
# imports nydus_api::RegistryConfig).  Defaults follow nydusd (api/src/config.rs): 5 s timeouts, no retries.
MAX_TIMEOUT = 600.0  # seconds: timeout, connect_timeout
MAX_RETRY_LIMIT = 255  # nydusd's retry_limit is a u8
MAX_DEADLINE = 3600.0  # seconds one read may take, retries included (an explicit deadline, or the implied one)


@dataclass
class Endpoint:
    """Where requests go: the origin registry, a mirror or a proxy (same API, another host)."""

    base_url: str  # scheme://host[:port]
    headers: dict[str, str] = field(default_factory=dict)
    is_origin: bool = False
    auth_through: bool = False  # the origin's credentials and registry_token may go here (nydusd's auth_through)
    username: str | None = None  # this endpoint's own credentials (a mirror's "auth"), never sent elsewhere
    password: str | None = None


@dataclass
class RegistryConfig:
    host: str
    repo: str
    scheme: str = "https"
    username: str | None = None  # the origin's credentials: sent only to the origin and its own token realm
    password: str | None = None
    registry_token: str | None = None  # a pre-issued bearer token for the origin
    skip_verify: bool = False
    ca_file: str | None = None  # PEM bundle to verify the registry's certificate (default: the system's CAs)
    timeout: float = 5.0  # seconds one request may wait for data from the server (nydusd: 5)
    connect_timeout: float = 5.0  # nydusd: 5
    retry_limit: int = 0  # retries after a failed attempt, per endpoint (nydusd: 0)
    deadline: float = 0.0  # seconds for one read, retries included; 0 = (connect_timeout + timeout) x (retry_limit + 1)
    mirrors: list[Endpoint] = field(default_factory=list)
    proxy: Endpoint | None = None
    proxy_fallback: bool = True

    @property
    def read_deadline(self) -> float:
        """Seconds one read may take, retries and fallbacks included."""
        if self.deadline > 0:
            return self.deadline
        return min((self.connect_timeout + self.timeout) * (self.retry_limit + 1), MAX_DEADLINE)


def decode_auth(auth: str) -> tuple[str, str]:
    """Docker/Nydus ``auth`` field: base64 of ``user:password``."""
    try:
        user, sep, pw = base64.b64decode(auth, validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        raise ConfigError("registry auth is not base64 of user:password") from None
    if not sep:
        raise ConfigError("registry auth is not base64 of user:password")
    return user, pw


@dataclass
class BackendConfig:
    type: str = "localfs"  # localfs | registry
    blob_dir: str | None = None  # localfs
    devices: list[str] = field(default_factory=list)  # localfs: files bound to device slots in order
    registry: RegistryConfig | None = None


@dataclass
class CacheConfig:
    type: str = "blobcache"  # blobcache | fscache | none
    work_dir: str = DEFAULT_WORK_DIR
    max_size: int = 0  # bytes, 0 = no cap; whole blobs not in use are evicted, least recently used first


@dataclass
class PrefetchConfig:
    enable: bool = False
    prefetch_all: bool = False  # whole-blob background prefetch
    threads: int = 4
    files: list[str] = field(default_factory=list)


@dataclass
class RafsConfig:
    backend: BackendConfig = field(default_factory=BackendConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    digest_validate: bool = True
    amplify_io: int = 1 << 20
    enable_xattr: bool = True  # False: the mount shows no xattrs (readers get EOPNOTSUPP)


# ---------------------------------------------------------------------------------------------- typed access
class _Section:
    """Reads keys of one JSON object with type checks, remembering which keys were used."""

    def __init__(self, obj: Any, where: str):
        if not isinstance(obj, dict):
            raise ConfigError(f"{where}: expected an object")
        self.obj, self.where, self.used = obj, where, set()

    def get(self, key: str, typ: type | tuple, default: Any = None) -> Any:
        self.used.add(key)
        v = self.obj.get(key, default)
        if v is None:
            return default
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, typ) or (isinstance(v, bool) and typ in (int, float)):
            name = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
            raise ConfigError(f"{self.where}.{key}: expected {name}, got {json.dumps(v)[:60]}")
        return v

    def sub(self, key: str) -> "_Section":
        self.used.add(key)
        return _Section(self.obj.get(key) or {}, f"{self.where}.{key}")

    def warn_unknown(self, known_ignored: tuple[str, ...] = ()) -> None:
        for k in self.obj:
            if k not in self.used and k not in known_ignored:
                log.warning("config: unknown key %s.%s ignored", self.where, k)


def _positive(v: int | float, where: str) -> Any:
    if v <= 0:
        raise ConfigError(f"{where}: must be positive")
    return v


def _in_range(v: int, low: int, high: int, where: str) -> int:
    if not low <= v <= high:
        raise ConfigError(f"{where}: {v} is out of range ({low} to {high})")
    return v


def _amplify_io(v: int, where: str) -> int:
    """A positive request size of at most :data:`MAX_AMPLIFY_IO` bytes."""
    return _in_range(_positive(v, where), 1, MAX_AMPLIFY_IO, where)


def _backend(btype: str, s: _Section) -> BackendConfig:
    if btype == "localfs":
        blob_dir = s.get("dir", str) or s.get("blob_dir", str)
        blob_file = s.get("blob_file", str)
        s.warn_unknown(("readahead", "readahead_sec", "alt_dirs"))
        if not blob_dir and not blob_file:
            raise ConfigError(f"{s.where}: localfs backend needs 'dir'")
        return BackendConfig(type="localfs", blob_dir=blob_dir, devices=[blob_file] if blob_file else [])
    if btype == "registry":
        return BackendConfig(type="registry", registry=_registry(s))
    raise ConfigError(f"{s.where}: unsupported backend type {btype!r} (localfs or registry)")


def _seconds(v: float, high: float, where: str) -> float:
    """A positive number of seconds, at most ``high`` (NaN and infinity refused: JSON parsers accept them)."""
    return _in_range(_positive(v, where), 0, high, where)


def _auth(s: _Section) -> tuple[str | None, str | None]:
    """(username, password) from ``auth`` (base64 user:password) or ``username``/``password``."""
    user = pw = None
    auth = s.get("auth", str)
    if auth:
        try:
            user, pw = decode_auth(auth)
        except ConfigError:
            raise ConfigError(f"{s.where}.auth: not base64 of user:password") from None
    if s.get("username", str) is not None:
        user, pw = s.get("username", str), s.get("password", str, "")
    return user, pw


def _headers(s: _Section) -> dict[str, str]:
    h = s.get("headers", dict, {})
    for k, v in h.items():
        if not isinstance(v, str) or not k or any(c in k + v for c in "\r\n\0"):
            raise ConfigError(f"{s.where}.headers.{k}: expected a one-line string, got {json.dumps(v)[:60]}")
    return dict(h)


def _registry(s: _Section) -> RegistryConfig:
    host = s.get("host", str)
    repo = s.get("repo", str)
    if not host or not repo:
        raise ConfigError(f"{s.where}: registry backend needs 'host' and 'repo'")
    scheme = s.get("scheme", str, "https")
    if scheme not in ("http", "https"):
        raise ConfigError(f"{s.where}.scheme: must be http or https")
    d = RegistryConfig(host="", repo="")
    rc = RegistryConfig(
        host=host, repo=repo, scheme=scheme, skip_verify=s.get("skip_verify", bool, False),
        timeout=_seconds(s.get("timeout", float, d.timeout), MAX_TIMEOUT, f"{s.where}.timeout"),
        connect_timeout=_seconds(s.get("connect_timeout", float, d.connect_timeout), MAX_TIMEOUT,
                                 f"{s.where}.connect_timeout"),
        retry_limit=_in_range(s.get("retry_limit", int, d.retry_limit), 0, MAX_RETRY_LIMIT, f"{s.where}.retry_limit"),
        deadline=_in_range(s.get("deadline", float, d.deadline), 0, MAX_DEADLINE, f"{s.where}.deadline"),
        registry_token=s.get("registry_token", str), ca_file=s.get("ca_file", str))
    rc.username, rc.password = _auth(s)
    for i, m in enumerate(s.get("mirrors", list, [])):
        ms = _Section(m, f"{s.where}.mirrors[{i}]")
        mhost = ms.get("host", str)
        if not mhost:
            raise ConfigError(f"{ms.where}.host: required")
        if "://" not in mhost:
            mhost = f"{scheme}://{mhost}"
        user, pw = _auth(ms)
        rc.mirrors.append(Endpoint(mhost.rstrip("/"), headers=_headers(ms), auth_through=ms.get("auth_through", bool,
                                                                                                  False),
                                   username=user, password=pw))
        ms.warn_unknown(("ping_url", "health_check_interval", "failure_limit"))
    px = s.sub("proxy")
    rc.proxy_fallback = px.get("fallback", bool, True)
    if px.get("url", str):
        rc.proxy = Endpoint(px.get("url", str).rstrip("/"), auth_through=px.get("auth_through", bool, False))
    px.warn_unknown(("ping_url", "check_interval", "use_http", "check_pause_elapsed"))
    s.warn_unknown(("readahead", "readahead_sec", "proxy", "blob_url_scheme", "blob_redirected_host"))
    return rc


def _cache(ctype: str, s: _Section) -> CacheConfig:
    if ctype in ("", "dummycache", "none"):
        ctype = "none"
    elif ctype not in ("blobcache", "fscache"):
        raise ConfigError(f"{s.where}: unsupported cache type {ctype!r} (blobcache, fscache or none)")
    work_dir = s.get("work_dir", str, DEFAULT_WORK_DIR)
    if not work_dir:
        raise ConfigError(f"{s.where}.work_dir: must not be empty")
    max_size = s.get("max_size", int, 0)
    if max_size < 0:
        raise ConfigError(f"{s.where}.max_size must not be negative")
    s.warn_unknown(("disable_indexed_map", "compressed", "validate", "prefetch_config"))
    return CacheConfig(type=ctype, work_dir=work_dir, max_size=max_size)


def _prefetch(s: _Section) -> PrefetchConfig:
    enable = s.get("enable", bool, False)
    threads = PrefetchConfig.threads
    for key in ("threads", "threads_count"):  # nydusd's name wins when both are given
        v = s.get(key, int)
        if v == 0 and key == "threads_count" and not enable:
            continue  # nydus-snapshotter's PUT bodies carry every field: 0 threads of a disabled prefetch is unset
        if v is not None:
            threads = _in_range(v, 1, MAX_PREFETCH_THREADS, f"{s.where}.{key}")
    p = PrefetchConfig(enable=enable, prefetch_all=s.get("prefetch_all", bool, False), threads=threads)
    s.warn_unknown(("merging_size", "bandwidth_rate", "bandwidth_limit", "batch_size"))
    return p


def from_dict(obj: Any) -> RafsConfig:
    top = _Section(obj, "config")
    if top.obj.get("type") == "bootstrap" or ("config" in top.obj and "device" not in top.obj):
        return _from_seed(top)
    cfg = RafsConfig()
    dev = top.sub("device")
    be = dev.sub("backend")
    cfg.backend = _backend(be.get("type", str, "localfs"), be.sub("config"))
    be.warn_unknown()
    ca = dev.sub("cache")
    cfg.cache = _cache(ca.get("type", str, "blobcache"), ca.sub("config"))
    ca.warn_unknown(("compressed", "validate"))
    dev.warn_unknown()
    cfg.digest_validate = top.get("digest_validate", bool, True)
    cfg.enable_xattr = top.get("enable_xattr", bool, True)
    cfg.amplify_io = _amplify_io(top.get("amplify_io", int, 1 << 20), "config.amplify_io")
    cfg.prefetch = _prefetch(top.sub("fs_prefetch"))
    top.warn_unknown(("mode", "iostats_files", "access_pattern", "latest_read_files", "enable_xattr", "id",
                      "version"))
    return cfg


def _from_seed(top: _Section) -> RafsConfig:
    top.get("type", str)
    top.get("id", str)
    top.get("domain_id", str)
    c = top.sub("config")
    c.get("id", str)
    cfg = RafsConfig()
    cfg.backend = _backend(c.get("backend_type", str, "localfs"), c.sub("backend_config"))
    cfg.cache = _cache(c.get("cache_type", str, "fscache"), c.sub("cache_config"))
    cfg.digest_validate = c.get("digest_validate", bool, True)
    cfg.enable_xattr = c.get("enable_xattr", bool, True)
    cfg.amplify_io = _amplify_io(c.get("amplify_io", int, 1 << 20), f"{c.where}.amplify_io")
    if c.obj.get("prefetch_config") is not None:
        cfg.prefetch = _prefetch(c.sub("prefetch_config"))
    c.warn_unknown(("metadata_path", "blob_info"))
    top.warn_unknown(("metadata_path",))
    return cfg


def load_config(path: str) -> RafsConfig:
    try:
        with open(path) as f:
            obj = json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"config {path} is not valid JSON: {e}") from None
    return from_dict(obj)
