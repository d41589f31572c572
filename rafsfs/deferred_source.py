"""A chunk cache built in a background thread, for a daemon that must report "mounted" as early as it can.

nydus-snapshotter starts one daemon per container image and waits for it before the container can start.  Building
the registry source means importing an HTTP stack (~40 ms of a ~0.3 s Python start-up) and probing each blob
(a round trip), none of which the mount itself needs: it serves metadata from the bootstrap.  The runtime spends
~0.1 s setting the container up after the mount is ready, before its first file read; the source is built then.
A read that comes first waits for it; a source that could not be built fails reads with its error (EIO).

It lives beside the mount session (:mod:`rafsfs.daemon`, its only user), not in ``storage/``: it is about when a
daemon builds its source, not about how chunks are stored.  It imports storage; storage never imports it.
"""
from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable

from .blob import BlobInfo, ChunkRef, ChunkSlice
from .errors import BlobUnavailable, RafsError
from .storage.cache.chunk_cache import ChunkCache
from .storage.meta import BlobMeta
from .storage.metrics import CacheMetrics
from .storage.source import ChunkSource

log = logging.getLogger(__name__)

CLOSE_WAIT = 5.0  # seconds close() waits for a build under way
GET_WAIT = 10.0  # seconds a read waits for the build before it fails (a registry that does not answer)


class DeferredCache(ChunkSource):
    """A chunk source in front of a :class:`ChunkCache` that ``build`` makes once :meth:`start` is called.
    ``metrics`` is shared with the cache, so counters can be read before it exists.  ``is_local`` is given, not
    asked of the cache: answering it must not wait for the build."""

    def __init__(self, build: Callable[[CacheMetrics], ChunkCache], metrics: CacheMetrics | None = None,
                 is_local: bool = False):
        self._is_local = is_local
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
        if self._error is not None:
            log.error("%s", self._error)  # before the readers waiting for the build see the error
            self._done.set()
            return
        self._done.set()
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

    def get(self, timeout: float = GET_WAIT) -> ChunkCache:
        """The cache, once built (starting the build if nobody did); a build that takes longer than ``timeout``
        fails this read (EIO), not the next ones."""
        if not self._done.is_set():
            self.start()
            if not self._done.wait(timeout):
                raise BlobUnavailable(f"the chunk source is still being built after {timeout:g} s")
        if self._error is not None:
            err = copy.copy(self._error)  # a new one per read: raising one object again and again grows its traceback
            err.__traceback__ = None
            raise err
        assert self._cache is not None
        return self._cache

    # ------------------------------------------------------------------ ChunkSource
    @property
    def is_local(self) -> bool:
        return self._is_local

    def meta(self, blob: BlobInfo) -> BlobMeta:
        return self.get().meta(blob)

    @property
    def keeps_chunks(self) -> bool:
        return True  # a chunk cache, once built (prefetch is given the built cache: see after_build)

    def read_chunks(self, blob: BlobInfo, chunks: list[ChunkRef]) -> list[bytes]:
        return self.get().read_chunks(blob, chunks)

    def read_slices(self, blob: BlobInfo, slices: list[ChunkSlice]) -> list[bytes]:
        return self.get().read_slices(blob, slices)

    def read_raw(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        return self.get().read_raw(blob, offset, size)

    def fully_cached(self, blob: BlobInfo) -> bool:
        return self.get().fully_cached(blob)

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
