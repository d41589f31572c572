"""A small client of the daemon API (what ``rafsfs stats`` and the tests use)."""
from __future__ import annotations

import http.client
import json
import os
import socket
from typing import Any

from .model import ApiError


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("unix", timeout=timeout)
        self.sock_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.sock_path)
        except BaseException:
            s.close()
            raise
        self.sock = s


class ApiClient:
    """One request per call over a fresh connection to the unix socket ``path``."""

    def __init__(self, path: str, timeout: float = 10.0):
        self.path, self.timeout = path, timeout

    def request(self, method: str, url: str, body: Any = None) -> Any:
        """Send ``body`` as JSON (a str is sent as is); returns the decoded JSON answer, or None for 204.
        Raises :class:`ApiError` with the daemon's message, or a one-line reason the daemon cannot be reached."""
        conn = _UnixConnection(self.path, self.timeout)
        data = None if body is None else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except FileNotFoundError:
            raise ApiError(f"no daemon API socket at {self.path}", 503, "Unavailable") from None
        except ConnectionRefusedError:
            raise ApiError(f"no daemon is listening on {self.path} (stale socket)", 503, "Unavailable") from None
        except (OSError, http.client.HTTPException) as e:
            raise ApiError(f"daemon API {self.path}: {getattr(e, 'strerror', None) or e}", 503,
                           "Unavailable") from None
        finally:
            conn.close()
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            raise ApiError(f"daemon API {self.path}: {method} {url} answered {resp.status} with non-JSON",
                           resp.status, "BadAnswer") from None
        if resp.status >= 400:
            msg = answer.get("message") if isinstance(answer, dict) else None
            code = answer.get("code") if isinstance(answer, dict) else None
            raise ApiError(f"{method} {url}: {resp.status} {msg or resp.reason}", resp.status, code or "Error")
        return answer

    def get(self, url: str) -> Any:
        return self.request("GET", url)

    def daemon_info(self) -> dict:
        return self.get("/api/v1/daemon")

    def cache_metrics(self) -> dict:
        return self.get("/api/v1/metrics/blobcache")

    def exists(self) -> bool:
        return os.path.exists(self.path)
