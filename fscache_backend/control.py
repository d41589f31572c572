"""The daemon's control socket: one JSON request line, one JSON reply line, over a Unix stream socket.

Requests: ``{"op": "mount", "record": {...}}`` (the daemon picks the fsid and mounts), ``{"op": "status"}``
(pids and mounts), ``{"op": "stats"}`` (counters), ``{"op": "shutdown"}`` (unmount everything and exit).
"""
from __future__ import annotations

import json
import socket
from typing import Any

from .errors import FscacheError


def request(path: str, req: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """Send one request; raises ConnectionError/FileNotFoundError when no daemon listens, FscacheError when the
    daemon answers with an error."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            part = s.recv(65536)
            if not part:
                raise ConnectionError("the fscache daemon closed the control connection")
            buf += part
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise FscacheError(reply.get("error", "the fscache daemon refused the request"))
    return reply


def daemon_running(path: str) -> bool:
    try:
        request(path, {"op": "status"}, timeout=10)
        return True
    except (OSError, ValueError):
        return False
