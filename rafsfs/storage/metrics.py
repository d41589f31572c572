"""Counters of the data path: hits, misses, bytes fetched and served, backend request latency."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

_LATENCY_SAMPLES = 4096  # a ring of recent backend request latencies for percentiles


@dataclass
class CacheMetrics:
    hits: int = 0
    misses: int = 0
    errors: int = 0
    backend_requests: int = 0
    inflight: int = 0
    bytes_fetched: int = 0
    bytes_served: int = 0
    prefetched_chunks: int = 0  # chunks fetched by background prefetch
    evicted_blobs: int = 0
    _latencies: list[float] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def hit(self) -> None:
        with self._lock:
            self.hits += 1

    def miss(self) -> None:
        with self._lock:
            self.misses += 1

    def prefetched(self, n: int = 1) -> None:
        with self._lock:
            self.prefetched_chunks += n

    def evicted(self, n: int) -> None:
        with self._lock:
            self.evicted_blobs += n

    def error(self) -> None:
        with self._lock:
            self.errors += 1

    def served(self, n: int) -> None:
        with self._lock:
            self.bytes_served += n

    def fetched(self, n: int) -> None:
        with self._lock:
            self.bytes_fetched += n

    def request_started(self) -> None:
        with self._lock:
            self.backend_requests += 1
            self.inflight += 1

    def request_done(self, seconds: float) -> None:
        with self._lock:
            self.inflight -= 1
            lat = self._latencies
            if len(lat) >= _LATENCY_SAMPLES:
                del lat[: _LATENCY_SAMPLES // 2]
            lat.append(seconds)

    def snapshot(self) -> dict:
        with self._lock:
            lat = sorted(self._latencies)

            def pct(p: float) -> float | None:
                return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3) if lat else None

            return {"hits": self.hits, "misses": self.misses, "errors": self.errors,
                    "backend_requests": self.backend_requests, "inflight": self.inflight,
                    "bytes_fetched": self.bytes_fetched, "bytes_served": self.bytes_served,
                    "prefetched_chunks": self.prefetched_chunks, "evicted_blobs": self.evicted_blobs,
                    "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)}}
