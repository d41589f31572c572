"""Verify an image: every directory, symlink and xattr parses, and every chunk of every regular file reads,
decompresses and matches its recorded digest.  The digest is checked here, on the bytes the source hands back,
whatever the source is: a chunk cache serves cached chunks without hashing them again, and a source configured with
``digest_validate: false`` hashes nothing, so only this check finds a corrupt cache.

Each distinct chunk is read once, however many files share it.  Chunks of plain EROFS images, and data kept inside
the bootstrap, carry no digest: they are read (so I/O and bounds errors show) and counted as unverified.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..compression import digest
from ..errors import BadImage, RafsError
from ..format.inode import LAYOUT_CHUNK_BASED
from ..blob import HOLE, BlobInfo, ChunkRef
from ..image import Inode, RafsImage
from ..storage.source import ChunkSource
from . import Progress, check_name, file_pieces

BATCH_BYTES = 64 << 20  # uncompressed bytes per read_chunks call (bounds memory; adjacent chunks still merge)


@dataclass
class CheckResult:
    files: int = 0  # distinct regular-file inodes checked
    inodes: int = 0  # distinct inodes of all types
    bytes: int = 0  # their logical size
    chunks_verified: int = 0  # distinct chunks read and matched against a recorded digest
    chunks_unverified: int = 0  # distinct chunks read that have no recorded digest
    unverified_bytes: int = 0  # bytes of file data outside chunks with digests (plain EROFS, inline data)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), in walk order
    metadata_error: str | None = None  # the tree walk itself failed (later paths were not checked)

    @property
    def ok(self) -> bool:
        return not self.bad and self.metadata_error is None


def check_image(image: RafsImage, source: ChunkSource | None, *,
                on_bad: Callable[[str, str], None] | None = None,
                progress: Progress | None = None) -> CheckResult:
    """Check the whole image; ``on_bad(path, reason)`` is called as each bad path is found."""
    return _Checker(image, source, on_bad, progress).run()


class _Checker:
    def __init__(self, image: RafsImage, source: ChunkSource | None,
                 on_bad: Callable[[str, str], None] | None, progress: Progress | None):
        self.image, self.source, self.on_bad, self.progress = image, source, on_bad, progress
        self.result = CheckResult()
        self.chunk_errors: dict[tuple[int, int], str | None] = {}  # (blob, ci index) -> None (good) or reason
        self.plain_chunks: set[tuple[int, int]] = set()  # (device, offset) of plain EROFS chunks counted

    def bad(self, path: bytes, reason: str) -> None:
        p = os.fsdecode(path)
        self.result.bad.append((p, reason))
        if self.on_bad:
            self.on_bad(p, reason)

    def run(self) -> CheckResult:
        image, r = self.image, self.result
        done: set[int] = set()
        try:
            for path, ino in image.walk():  # reads every directory
                try:
                    check_name(path.rpartition(b"/")[2] or b"/", path)
                    if ino.nid in done:
                        continue
                    done.add(ino.nid)
                    r.inodes += 1
                    for name in image.listxattr(ino):
                        if b"\0" in name:
                            raise BadImage(f"xattr name {name!r} contains a NUL byte")
                    image.xattrs(ino)  # values too
                    if ino.is_symlink() and b"\0" in image.readlink(ino):
                        raise BadImage("symlink target contains a NUL byte")
                    if ino.is_reg():
                        r.files += 1
                        r.bytes += ino.size
                        reason = self._check_file(ino)
                        if reason:
                            self.bad(path, reason)
                except RafsError as e:
                    self.bad(path, str(e))
                if self.progress:
                    self.progress.update(r.bytes, files=r.files)
        except RafsError as e:
            r.metadata_error = str(e)
        return r

    def _check_file(self, ino: Inode) -> str | None:
        image = self.image
        if ino.layout != LAYOUT_CHUNK_BASED or not image.nydus:
            # no digests anywhere: read everything (bounds, device reads) and count it as unverified
            if ino.layout == LAYOUT_CHUNK_BASED:
                for c in image.chunks(ino):
                    key = (c.blob_index, c.info.compressed_offset)
                    if c.blob_index != HOLE and key not in self.plain_chunks:
                        self.plain_chunks.add(key)
                        self.result.chunks_unverified += 1
            for _off, n, data in file_pieces(image, ino, self.source):
                if data is not None:
                    self.result.unverified_bytes += n
            return None
        if self.source is None:
            return "file data lives in a blob, but no blob source was given"
        todo: dict[int, list[ChunkRef]] = {}
        keys = []
        for ref in image.chunks(ino, source=self.source):
            key = (ref.blob_index, ref.ci_index)
            keys.append(key)
            if key not in self.chunk_errors:
                self.chunk_errors[key] = "chunk was not read"  # until _read marks it
                todo.setdefault(ref.blob_index, []).append(ref)
        for bidx, refs in todo.items():
            self._read(self.source, self.image.blobs[bidx], refs)
        return next((self.chunk_errors[k] for k in keys if self.chunk_errors[k]), None)

    def _read(self, source: ChunkSource, blob: BlobInfo, refs: list[ChunkRef]) -> None:
        """Read chunks of one blob in bounded batches; on a failure, retry them one by one to name the bad one."""
        for batch in _batches(refs):
            try:
                for c, data in zip(batch, source.read_chunks(blob, batch)):
                    self._mark(c, _mismatch(blob, c, data))
            except RafsError:
                for c in batch:
                    try:
                        (data,) = source.read_chunks(blob, [c])
                        self._mark(c, _mismatch(blob, c, data))
                    except RafsError as e:
                        self._mark(c, str(e))

    def _mark(self, ref: ChunkRef, reason: str | None) -> None:
        self.chunk_errors[(ref.blob_index, ref.ci_index)] = reason
        if reason is None:
            if ref.digest is not None:
                self.result.chunks_verified += 1
            else:
                self.result.chunks_unverified += 1


def _mismatch(blob: BlobInfo, ref: ChunkRef, data: bytes) -> str | None:
    """Why the bytes a source returned for a chunk are wrong (None: they match its size and recorded digest)."""
    if len(data) != ref.info.uncompressed_size:
        return f"chunk {ref.ci_index} of blob {blob.ref.name}: {len(data)} bytes, expected {ref.info.uncompressed_size}"
    try:
        if ref.digest is not None and digest(blob.digester, data) != ref.digest:
            return f"chunk {ref.ci_index} of blob {blob.ref.name} does not match its digest"
    except ValueError as e:  # a digester the image names but nobody knows
        return f"chunk {ref.ci_index} of blob {blob.ref.name}: {e}"
    return None


def _batches(refs: list[ChunkRef]) -> Iterator[list[ChunkRef]]:
    batch: list[ChunkRef] = []
    size = 0
    for ref in refs:
        if batch and size + ref.info.uncompressed_size > BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(ref)
        size += ref.info.uncompressed_size
    if batch:
        yield batch
