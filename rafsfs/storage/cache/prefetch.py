"""Background prefetch into the chunk cache: the image's prefetch table, a runtime list of paths, and optionally
every chunk of every blob -- always behind on-demand reads.

Work is cut into batches of at most ``amplify_io`` bytes (one backend request each); before each batch the worker
waits until no on-demand read is fetching, so a reader waits at most for the batches already under way.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...blob import ChunkRef
from ...errors import RafsError
from ...format.inode import LAYOUT_CHUNK_BASED
from ...image import RafsImage
from ..source import ChunkSource
from .chunk_cache import ChunkCache

if TYPE_CHECKING:
    from ...config import PrefetchConfig

log = logging.getLogger(__name__)

WHOLE_BLOB_QUIET = 0.5  # seconds without on-demand fetching before whole-blob prefetch goes on


@dataclass
class PrefetchPlan:
    use_table: bool = True  # the image's prefetch table
    paths: list[str] = field(default_factory=list)  # files or directories (recursively), absolute in the image
    whole_blobs: bool = False  # then every remaining chunk of every blob


class Prefetcher:
    """Runs a :class:`PrefetchPlan` in background threads.  ``stop()`` ends it early; ``join()`` waits."""

    def __init__(self, image: RafsImage, cache: ChunkCache, plan: PrefetchPlan, threads: int = 2):
        self.image = image
        self.cache = cache
        self.plan = plan
        self.threads = max(1, threads)
        self.done_chunks = 0
        self.failed_chunks = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._batches: Iterator[tuple[int, list[ChunkRef]]] | None = None
        self._workers: list[threading.Thread] = []
        self._warned: set[int] = set()

    # ------------------------------------------------------------------ what to fetch
    def _file_chunks(self, nid: int) -> Iterator[ChunkRef]:
        ino = self.image.inode(nid)
        if ino.is_reg() and ino.layout == LAYOUT_CHUNK_BASED and ino.size:
            for ref in self.image.chunks(ino, source=self.cache):
                if ref.blob_index >= 0 and self.image.blobs[ref.blob_index].nydus:
                    yield ref

    def _path_nids(self) -> Iterator[int]:
        if self.plan.use_table:
            yield from self.image.prefetch_nids
        for p in self.plan.paths:
            try:
                ino = self.image.resolve(p)
            except RafsError as e:
                log.warning("prefetch: skipping %s: %s", p, e)
                continue
            if ino.is_dir():
                yield from (child.nid for _, child in self.image.walk(ino.nid) if child.is_reg())
            else:
                yield ino.nid

    def _blob_chunks(self) -> Iterator[ChunkRef]:
        for blob in self.image.blobs:
            if not blob.nydus:
                continue
            meta = self.cache.meta(blob)
            for ci in range(blob.chunk_count):
                yield meta.chunk_ref(ci)

    def _chunks(self) -> Iterator[tuple[ChunkRef, bool]]:
        """(chunk, from the whole-blob part of the plan), files first."""
        seen = [bytearray(b.chunk_count if b.nydus else 0) for b in self.image.blobs]  # 1 byte per chunk
        sources: list[tuple[Iterable[ChunkRef], bool]] = []
        seen_nids: set[int] = set()

        def file_refs() -> Iterator[ChunkRef]:
            for nid in self._path_nids():
                if nid not in seen_nids:
                    seen_nids.add(nid)
                    yield from self._file_chunks(nid)

        sources.append((file_refs(), False))
        if self.plan.whole_blobs:
            sources.append((self._blob_chunks(), True))
        for src, whole in sources:
            for ref in src:
                done = seen[ref.blob_index]
                if not done[ref.ci_index]:
                    done[ref.ci_index] = 1
                    yield ref, whole

    def _plan_batches(self) -> Iterator[tuple[int, list[ChunkRef], bool]]:
        """(blob index, chunks, whole-blob part) batches of at most ``amplify_io`` compressed bytes."""
        limit = self.cache.opts.amplify_io
        batch: list[ChunkRef] = []
        size = 0
        batch_whole = False
        for ref, whole in self._chunks():
            if batch and (ref.blob_index != batch[0].blob_index or whole != batch_whole
                          or size + ref.info.compressed_size > limit):
                yield batch[0].blob_index, batch, batch_whole
                batch, size = [], 0
            batch.append(ref)
            batch_whole = whole
            size += ref.info.compressed_size
        if batch:
            yield batch[0].blob_index, batch, batch_whole

    # ------------------------------------------------------------------ running
    def _next_batch(self) -> tuple[int, list[ChunkRef], bool] | None:
        with self._lock:
            assert self._batches is not None
            try:
                return next(self._batches)
            except StopIteration:
                return None
            except RafsError as e:
                log.warning("prefetch stopped: %s", e)
                return None
            except Exception:  # a bug must not die silently in a background thread
                log.exception("prefetch stopped by an internal error")
                return None

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self._next_batch()
            if item is None:
                return
            bidx, batch, whole = item
            # the files asked for go as soon as no read is fetching; the rest of the blobs only once reads have
            # been quiet for a while (a program starting reads in bursts: it gets both cores meanwhile)
            while not self.cache.wait_idle(timeout=0.2, quiet=WHOLE_BLOB_QUIET if whole else 0.0):
                if self._stop.is_set():
                    return
            if self._stop.is_set():
                return
            blob = self.image.blobs[bidx]
            try:
                self.cache.ensure(blob, batch, background=True)
                with self._lock:
                    self.done_chunks += len(batch)
            except RafsError as e:
                with self._lock:
                    self.failed_chunks += len(batch)
                    first = bidx not in self._warned
                    self._warned.add(bidx)
                if first:
                    log.warning("prefetch of blob %s: %s", blob.ref.name, e)

    def start(self) -> "Prefetcher":
        self._batches = self._plan_batches()
        for i in range(self.threads):
            t = threading.Thread(target=self._run, name=f"rafsfs-prefetch-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        log.info("prefetch started (%s)", ", ".join(
            w for w, on in (("prefetch table", self.plan.use_table), (f"{len(self.plan.paths)} paths",
                            bool(self.plan.paths)), ("whole blobs", self.plan.whole_blobs)) if on))
        return self

    def join(self, timeout: float | None = None) -> bool:
        for t in self._workers:
            t.join(timeout)
        finished = not any(t.is_alive() for t in self._workers)
        if finished and self._workers:
            log.info("prefetch finished: %d chunks present, %d failed", self.done_chunks, self.failed_chunks)
        return finished

    def stop(self) -> None:
        self._stop.set()
        self.join(timeout=30)


def plan_for(pf: "PrefetchConfig | None", paths: list[str]) -> tuple[PrefetchPlan, int]:
    """(plan, threads) by nydusd's rules: ``fs_prefetch.enable`` reads the image's prefetch table,
    ``prefetch_all`` (with ``enable``) then every blob; ``paths`` (``--prefetch-files``) add to it.  Without a
    prefetch section (no config) the table is read: an image built with a prefetch list asks for it."""
    if pf is None:
        return PrefetchPlan(use_table=True, paths=paths), 2
    return (PrefetchPlan(use_table=pf.enable, paths=paths, whole_blobs=pf.enable and pf.prefetch_all),
            max(1, min(pf.threads, 4)))


def plan_has_work(image: RafsImage, plan: PrefetchPlan) -> bool:
    """``plan`` asks for anything in ``image``."""
    return bool(plan.paths or plan.whole_blobs or (plan.use_table and image.prefetch_nids))


def start_prefetch(image: RafsImage, source: ChunkSource, plan: PrefetchPlan,
                   threads: int = 2) -> Prefetcher | None:
    """Start prefetching ``plan`` if ``source`` keeps what it reads (a chunk cache) and there is anything to do."""
    if not source.keeps_chunks:
        if plan.paths or plan.whole_blobs:
            log.warning("prefetch needs a chunk cache (cache type 'none' configured): not prefetching")
        return None
    if not plan_has_work(image, plan):
        return None
    return Prefetcher(image, source, plan, threads).start()

