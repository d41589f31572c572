"""``rafsfs stats``: read a running daemon's cache metrics and lay them out for people."""
from __future__ import annotations

from ..tools import format_bytes

FIELDS = ("hits", "misses", "errors", "backend_requests", "inflight", "bytes_fetched", "bytes_served")


def stats_record(daemon_id, state, apisock: str, counters: dict, **override) -> dict:
    """The flat dict ``rafsfs stats`` prints: ``counters`` (a :class:`CacheMetrics` snapshot) picked by
    :data:`FIELDS`, then ``override``."""
    out = {"id": daemon_id, "state": state, "apisock": apisock}
    out.update({k: counters.get(k, 0) for k in FIELDS})
    out["latency_ms"] = counters.get("latency_ms") or {"p50": None, "p90": None, "p99": None}
    out.update(override)
    return out


def read_stats(apisock: str) -> dict:
    """The daemon's id, state and cache counters as one flat dict."""
    from .client import ApiClient  # http.client: only for the command that asks

    client = ApiClient(apisock)
    info = client.daemon_info()
    return stats_record(info.get("id"), info.get("state"), apisock, client.cache_metrics())


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} ms"


def format_stats(s: dict) -> str:
    lat = s["latency_ms"]
    rows = [
        ("daemon", f"{s['id']} ({s['state']}, {s['apisock']})"),
        ("hits", "- (the kernel serves them from its cache files)" if s["hits"] is None else str(s["hits"])),
        ("misses", str(s["misses"])),
        ("errors", str(s["errors"])),
        ("bytes fetched", f"{s['bytes_fetched']} ({format_bytes(s['bytes_fetched'])})"),
        ("bytes served", f"{s['bytes_served']} ({format_bytes(s['bytes_served'])})"),
        ("backend requests", str(s["backend_requests"])),
        ("fetch latency", f"p50 {_ms(lat.get('p50'))}, p90 {_ms(lat.get('p90'))}, p99 {_ms(lat.get('p99'))}"),
        ("in flight", str(s["inflight"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
