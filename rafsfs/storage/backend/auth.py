"""Credentials a registry backend finds on this machine: docker's ``config.json``."""
from __future__ import annotations

import json
import os

from ...config import ConfigError, decode_auth
from ...errors import BlobUnavailable


def docker_credentials(host: str, config_path: str | None = None) -> tuple[str, str] | None:
    """(user, password) for ``host`` from docker's ``config.json`` (``$DOCKER_CONFIG`` or ``~/.docker``)."""
    path = config_path or os.path.join(os.environ.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker"),
                                       "config.json")
    try:
        with open(path) as f:
            auths = json.load(f).get("auths", {})
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(auths, dict):
        return None
    keys = (host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/")
    if host in ("docker.io", "registry-1.docker.io"):
        keys += ("https://index.docker.io/v1/",)
    for k in keys:
        entry = auths.get(k)
        if isinstance(entry, dict) and isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                return decode_auth(entry["auth"])
            except ConfigError:
                raise BlobUnavailable(f"{path}: the auth for {k} is not base64 of user:password") from None
        if isinstance(entry, dict) and isinstance(entry.get("username"), str) and entry["username"]:
            return entry["username"], str(entry.get("password", ""))
    return None
