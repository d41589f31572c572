"""A chunk cache built in a background thread, for a daemon that must report "mounted" as early as it can.

nydus-snapshotter starts one daemon per container image and waits for it before the container can start.  Building
the registry source means importing an HTTP stack (~40 ms of a ~0.3 s Python start-up) and probing each blob
(a round trip), none of which the mount itself needs: it serves metadata from the bootstrap.  The runtime spends
~0.1 s setting the container up after the mount is ready, before its first file read; the source is built then.
A read that comes first waits for it; a source that could not be built fails reads with its error (EIO).
"""
from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable

from ..errors import BlobUnavailable, RafsError
from ..image import BlobInfo, ChunkRef, ChunkSlice, RafsImage
from .cache.chunk_cache import ChunkCache
from .cache.metrics import CacheMetrics

log = logging.getLogger(__name__)

CLOSE_WAIT = 5.0  # seconds close() waits for a build under way


class DeferredCache:
    """A :class:`rafsfs.image.ChunkSource` in front of a :class:`ChunkCache` that ``build`` makes once
    :meth:`start` is called.  ``metrics`` is shared with the cache, so counters can be read before it exists."""

    def __init__(self, build: Callable[[CacheMetrics], ChunkCache], metrics: CacheMetrics | None = None):
        self.metrics = metrics or CacheMetrics()
        self._build = build
        self._cache: ChunkCache | None = None
        self._error: RafsError | None = None
        self._started = False
        self._sealed = False
        self._done = threading.Event()
        self._lock = threading.Lock()
        self.after_build: list[Callable[[ChunkCache], None]] = []  # run in the builder thread, in order

    def start(self) -> None:
        """Build in a background thread (idempotent)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._run, name="rafsfs-source", daemon=True).start()

    def _run(self) -> None:
        try:
            cache = self._build(self.metrics)
        except RafsError as e:
            self._error = e
        except Exception as e:  # a bug: reads must still fail cleanly, and the log must say why
            log.exception("building the chunk source")
            self._error = BlobUnavailable(f"the chunk source could not be built: {e}")
        else:
            self._cache = cache
        self._done.set()
        if self._error is not None:
            log.error("%s", self._error)
            return
        with self._lock:  # seal() waits for these, and none runs after it
            for hook in self.after_build:
                if self._sealed:
                    return
                try:
                    hook(cache)
                except RafsError as e:
                    log.error("%s", e)
                except Exception:
                    log.exception("after building the chunk source")

    def seal(self) -> None:
        """No :attr:`after_build` hook runs after this returns (the daemon is stopping what they started)."""
        with self._lock:
            self._sealed = True

    def get(self) -> ChunkCache:
        """The cache, once built (starting the build if nobody did)."""
        if not self._done.is_set():
            self.start()
            self._done.wait()
        if self._error is not None:
            err = copy.copy(self._error)  # a new one per read: raising one object again and again grows its traceback
            err.__traceback__ = None
            raise err
        assert self._cache is not None
        return self._cache

    # ------------------------------------------------------------------ ChunkSource
    def read_chunks(self, image: RafsImage, blob: BlobInfo, chunks: list[ChunkRef]) -> list[bytes]:
        return self.get().read_chunks(image, blob, chunks)

    def read_slices(self, image: RafsImage, blob: BlobInfo, slices: list[ChunkSlice]) -> list[bytes]:
        return self.get().read_slices(image, blob, slices)

    def read_raw(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        return self.get().read_raw(blob, offset, size)

    def fully_cached(self, blob: BlobInfo, image: RafsImage | None = None) -> bool:
        return self.get().fully_cached(blob, image)

    def close(self, wait: float = CLOSE_WAIT) -> bool:
        """Close the cache if it was built.  A build still under way (a probe of a registry that does not answer)
        gets ``wait`` seconds; after that the daemon stops without it (the thread dies with the process) and this
        returns False: the build may still be using what it was given."""
        if self._started and not self._done.wait(wait):
            log.warning("stopping while the chunk source is still being built")
            return False
        self.seal()
        if self._cache is not None:
            self._cache.close()
        return True
