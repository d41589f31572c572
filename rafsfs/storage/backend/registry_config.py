"""What a registry backend needs to know: endpoints, credentials, timeouts -- plain data, importable without the
HTTP stack (the config loader and the CLI's start-up need it; only the backend itself imports requests)."""
from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field

from ...errors import BlobUnavailable


@dataclass
class Endpoint:
    """Where requests go: the origin registry, a mirror or a proxy (same API, another host)."""

    base_url: str  # scheme://host[:port]
    headers: dict[str, str] = field(default_factory=dict)
    is_origin: bool = False


@dataclass
class RegistryConfig:
    host: str
    repo: str
    scheme: str = "https"
    username: str | None = None
    password: str | None = None
    registry_token: str | None = None  # a pre-issued bearer token
    skip_verify: bool = False
    ca_file: str | None = None  # PEM bundle to verify the registry's certificate (default: the system's CAs)
    timeout: float = 30.0  # seconds one request may wait for data from the server
    connect_timeout: float = 5.0
    retry_limit: int = 3
    deadline: float = 0.0  # seconds for one read, retries included; 0 = (connect_timeout + timeout) x (retry_limit + 1)
    mirrors: list[Endpoint] = field(default_factory=list)
    proxy: Endpoint | None = None
    proxy_fallback: bool = True


def docker_credentials(host: str, config_path: str | None = None) -> tuple[str, str] | None:
    """(user, password) for ``host`` from docker's ``config.json`` (``$DOCKER_CONFIG`` or ``~/.docker``)."""
    path = config_path or os.path.join(os.environ.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker"),
                                       "config.json")
    try:
        with open(path) as f:
            auths = json.load(f).get("auths", {})
    except (OSError, ValueError):
        return None
    keys = (host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/")
    if host in ("docker.io", "registry-1.docker.io"):
        keys += ("https://index.docker.io/v1/",)
    for k in keys:
        entry = auths.get(k)
        if isinstance(entry, dict) and entry.get("auth"):
            return decode_auth(entry["auth"])
        if isinstance(entry, dict) and entry.get("username"):
            return entry["username"], entry.get("password", "")
    return None


def decode_auth(auth: str) -> tuple[str, str]:
    """Docker/Nydus ``auth`` field: base64 of ``user:password``."""
    try:
        user, _, pw = base64.b64decode(auth).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        raise BlobUnavailable("registry auth is not base64 of user:password") from None
    return user, pw
