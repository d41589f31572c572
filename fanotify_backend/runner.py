"""The fanotify mode's part of a mount session (:class:`rafsfs.daemon.Runner`): the session's process becomes the
supervisor of :mod:`.mount` (group, marks, mount, workers); the session keeps its API socket and prefetch."""
from __future__ import annotations

from rafsfs.daemon import ServedMount

from .mount import preflight, serve


class FanotifyRunner:
    name = "fanotify"
    source_before_mount = True  # its entries are opened before the marks, the marks before the mount

    def preflight(self, mountpoint: str) -> None:
        preflight(mountpoint)

    def run(self, m: ServedMount) -> None:
        hooks = m.hooks

        def add_metrics(worker_stats) -> None:
            if hooks is None:
                return
            own = hooks.metrics

            def merged() -> dict:
                """The worker's counters (its fetches for the kernel), with the session's prefetch added."""
                mine = own() if own is not None else {}
                theirs = worker_stats()
                out = dict(theirs or mine)
                for k in ("bytes_fetched", "backend_requests", "prefetched_chunks", "errors"):
                    if isinstance(mine.get(k), int) and isinstance(theirs.get(k), int):
                        out[k] = mine[k] + theirs[k]
                return out

            hooks.metrics = merged

        serve(m.image, m.config, m.source, m.mountpoint, ready=m.ready, add_metrics=add_metrics)
