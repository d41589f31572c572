"""Turn the chunk cache's ``CacheMetrics.snapshot()`` into the JSON nydusd serves (and ``rafsfs stats`` prints).

nydusd's own keys come first so nydus-snapshotter's decoders find what they expect; rafsfs's counters ride along
under their own names (JSON decoders ignore keys they do not know).
"""
from __future__ import annotations

from typing import Any

Snapshot = dict[str, Any]

EMPTY: Snapshot = {"hits": 0, "misses": 0, "errors": 0, "backend_requests": 0, "inflight": 0, "bytes_fetched": 0,
                   "bytes_served": 0, "latency_ms": {"p50": None, "p90": None, "p99": None}}


def cache_metrics(snap: Snapshot | None, daemon_id: str, store_path: str = "") -> dict:
    """``GET /api/v1/metrics/blobcache``: nydusd's BlobcacheMetrics plus rafsfs's counters."""
    s = {**EMPTY, **(snap or {})}
    return {"id": daemon_id, "underlying_files": [], "store_path": store_path,
            "partial_hits": 0, "whole_hits": s["hits"], "total": s["hits"] + s["misses"],
            "entries_count": 0, "prefetch_data_amount": 0, "prefetch_requests_count": 0, "prefetch_workers": 0,
            "prefetch_cumulative_time_millis": 0, "prefetch_begin_time_secs": 0, "prefetch_end_time_secs": 0,
            "buffered_backend_size": 0, **s}


def fs_metrics(snap: Snapshot | None, fs_id: str) -> dict:
    """``GET /api/v1/metrics``: nydusd's FsIoStats; ``data_read`` is the bytes served to readers."""
    s = {**EMPTY, **(snap or {})}
    return {"files_account_enabled": False, "access_pattern_enabled": False, "measure_latency": False,
            "id": fs_id, "data_read": s["bytes_served"], "block_count_read": [0] * 11, "fop_hits": [0] * 19,
            "fop_errors": [0] * 19, "fop_cumulative_latency_total": [0] * 19, "read_latency_dist": [0] * 8,
            "nr_opens": 0}


def backend_metrics(snap: Snapshot | None, backend_type: str) -> dict:
    """``GET /api/v1/metrics/backend``: nydusd's BackendMetrics keys that we count."""
    s = {**EMPTY, **(snap or {})}
    return {"id": "", "backend_type": backend_type, "read_count": s["backend_requests"],
            "read_errors": s["errors"], "read_amount_total": s["bytes_fetched"], "inflight": s["inflight"],
            "latency_ms": s["latency_ms"]}
