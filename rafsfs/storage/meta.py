"""Blob metadata: where each chunk of a Nydus blob lives and what its digest is, kept packed, decoded on access.

A :class:`BlobMeta` answers "chunk ``ci`` of this blob" (:meth:`BlobMeta.chunk_ref`) and "the chunks covering this
range of the blob's uncompressed layout" (:meth:`BlobMeta.chunks_at`).  It comes from one of two places:

- the bootstrap's chunk table, when it lists every chunk of the blob (no I/O at all);
- the blob's own metadata, read through the backend: the chunk-info array (``blob.meta``, its 4 KiB header checked
  against the blob table) and, when the blob inlines them, the chunk digests (``blob.digest``), both checked against
  the digests in the blob's ToC, whose own sha256 the bootstrap's blob table records.

The arrays stay as the bytes they were read as (16 or 24 bytes per chunk, 32 per digest): a blob of a million
chunks costs a few tens of MiB, never a Python object per chunk.  Every entry is checked when it is decoded.

:class:`MetaCache` keeps one BlobMeta per blob for a chunk source and, given a directory (the chunk cache's), keeps
what it read from the backend beside the cache entry (``<blob id>.blob.meta``): a restarted daemon then reads a
cached image without a single backend request.  The saved file records what the blob table said when it was written
and a sha256 of its contents, and keeps the ToC: a copy is used only if it matches the reading image's blob table and
its ToC digest chain (so another image's copy of a blob with the same id, fetched from another registry, is never
taken on trust).  Anything else is fetched again.  Blobs without a ToC digest are fetched again at every start.
"""
from __future__ import annotations

import bisect
import copy
import hashlib
import logging
import os
import struct
import threading
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from ..atomic import replacing
from ..blob import BlobInfo, ChunkInfo, ChunkRef, check_blob_id, check_chunk_info
from ..compression import decompress
from ..errors import BadImage, CorruptChunk, RafsError
from ..format import blob_meta as bm
from ..format import blob_table as bt
from ..format.record import Record, field
from ..format.toc import SECTION_DIGEST, SECTION_META, TOC_ENTRY_SIZE, TocEntry

log = logging.getLogger(__name__)

META_SUFFIX = ".blob.meta"
DIGEST_SIZE = 32
MAX_TOC_SIZE = 1 << 20
MAX_CI_ARRAY = 1 << 30  # bytes of one blob's chunk-info array (the image's chunk cap keeps it under 384 MiB)

ReadRaw = Callable[[BlobInfo, int, int], bytes]  # (blob, offset, size) -> stored bytes, one backend request

_FINGERPRINT_CHUNK = struct.Struct("<QIQI?32s")


class BlobMeta:
    """Chunk locations and digests of one Nydus blob (see the module docstring).  Immutable and thread-safe."""

    def __init__(self, blob: BlobInfo, *, infos: bytes | None = None, digests: bytes | None = None,
                 toc: bytes = b"", table=None):
        """``infos``: the decompressed chunk-info array; or ``table``: the bootstrap's chunk table, which lists
        every chunk of ``blob``.  ``digests``: packed 32-byte chunk digests by chunk index (``blob.digest``).
        ``toc``: the blob's ToC as stored (kept so a saved copy can be checked; may be empty)."""
        self.blob = blob
        self.count = blob.chunk_count
        self.toc_raw = toc
        if table is not None:
            self._table = table
            self._infos = b""
            self._esize = 0
        else:
            self._table = None
            self._esize = bm.CI_V2_SIZE if blob.ci_v2 else bm.CI_V1_SIZE
            if infos is None or len(infos) != self.count * self._esize:
                raise BadImage(f"blob {blob.blob_id}: chunk-info array size does not match its chunk count")
            self._infos = infos
        if digests is not None and len(digests) != self.count * DIGEST_SIZE:
            raise BadImage(f"blob {blob.blob_id}: blob.digest has the wrong size")
        self.digests = digests
        self._layout: tuple[array, array] | None = None
        self._fingerprint: tuple[bytes, bool] | None = None
        self._lock = threading.Lock()

    @property
    def from_table(self) -> bool:
        return self._table is not None

    # ------------------------------------------------------------------ one chunk
    def chunk_info(self, ci: int) -> ChunkInfo:
        return self._located(ci)[0]

    def _located(self, ci: int) -> tuple[ChunkInfo, bytes | None]:
        """(checked location, digest or None) of chunk ``ci``."""
        if not 0 <= ci < self.count:
            raise BadImage(f"blob {self.blob.blob_id}: no chunk info for chunk {ci}")
        if self._table is not None:
            found = self._table.chunk(self.blob.index, ci)
            if found is None:  # the table was complete when this was made; it cannot lose entries
                raise BadImage(f"blob {self.blob.blob_id}: chunk {ci} is not in the chunk table")
            return check_chunk_info(self.blob, found[0]), found[1]
        if self._esize == bm.CI_V2_SIZE:
            info, flags = bm.decode_v2(self._infos, ci * bm.CI_V2_SIZE)
            if flags & (bm.CI_V2_ZRAN | bm.CI_V2_BATCH | bm.CI_V2_ENCRYPTED):
                raise BadImage(f"blob {self.blob.blob_id}: ZRAN/batch/encrypted chunks are not supported")
        else:
            info = bm.decode_v1(self._infos, ci * bm.CI_V1_SIZE)
        return check_chunk_info(self.blob, info), self.digest(ci)

    def digest(self, ci: int) -> bytes | None:
        if self.digests is not None:
            return self.digests[ci * DIGEST_SIZE:(ci + 1) * DIGEST_SIZE]
        table = self.blob.chunk_table
        found = table.chunk(self.blob.index, ci) if table is not None else None
        return found[1] if found is not None else None

    def chunk_ref(self, ci: int) -> ChunkRef:
        """Chunk ``ci`` of the blob, located, with its digest."""
        info, digest = self._located(ci)
        return ChunkRef(self.blob.index, ci, info, digest)

    def fingerprint(self) -> tuple[bytes, bool]:
        """(sha256 over the blob's geometry and every chunk's location, size and digest, in chunk order; whether
        every chunk has a digest).  Equal for two images exactly when they agree on the blob's chunk table, however
        each recorded it (bootstrap chunk table or blob.meta): what a cache entry for the blob can be keyed by.
        Computed once (one pass over the packed arrays)."""
        fp = self._fingerprint
        if fp is None:
            b = self.blob
            h = hashlib.sha256(b"rafsfs blob chunk table v1\0")
            h.update(struct.pack("<64sIIIIQQ", b.blob_id.encode(), b.compressor, b.digester, b.chunk_size,
                                 b.chunk_count, b.compressed_size, b.uncompressed_size))
            all_digests = True
            for ci in range(self.count):
                info, dg = self._located(ci)
                all_digests = all_digests and dg is not None
                h.update(_FINGERPRINT_CHUNK.pack(info.compressed_offset, info.compressed_size,
                                                 info.uncompressed_offset, info.uncompressed_size, info.compressed,
                                                 dg or bytes(DIGEST_SIZE)))
            fp = self._fingerprint = (h.digest(), all_digests)
        return fp

    # ------------------------------------------------------------------ the blob's uncompressed layout
    def chunks_at(self, offset: int, size: int) -> list[ChunkRef]:
        """The chunks whose uncompressed bytes overlap [offset, offset+size) of the blob's uncompressed address
        space (chunk i at its uncompressed offset: how the kernel addresses a blob device), in offset order."""
        starts, cis = self._sorted_layout()
        out: list[ChunkRef] = []
        i = max(0, bisect.bisect_right(starts, offset) - 1)
        end = offset + size
        while i < len(starts) and starts[i] < end:
            ref = self.chunk_ref(cis[i])
            if ref.info.uncompressed_offset + ref.info.uncompressed_size > offset:
                out.append(ref)
            i += 1
        return out

    def _uncompressed_offsets(self):
        if self._table is not None:
            return self._table.uncompressed_offsets(self.blob.index)
        return bm.uncompressed_offsets(self._infos, self._esize == bm.CI_V2_SIZE)

    def _sorted_layout(self) -> tuple[array, array]:
        """(sorted distinct uncompressed offsets, chunk index of each), packed (12 bytes per chunk at most)."""
        layout = self._layout
        if layout is not None:
            return layout
        with self._lock:
            if self._layout is None:
                starts, cis = array("Q"), array("I")
                ordered = True
                for ci, start in enumerate(self._uncompressed_offsets()):
                    if starts and start <= starts[-1]:
                        if start < starts[-1]:
                            ordered = False
                            break
                        continue  # same offset as the chunk before: the first one stands for it
                    starts.append(start)
                    cis.append(ci)
                if not ordered:  # chunks not stored in offset order: sort packed keys (offset in pages, index)
                    keys = array("Q")
                    for ci, start in enumerate(self._uncompressed_offsets()):
                        if start % 4096 or start >> 52:
                            raise BadImage(f"blob {self.blob.blob_id}: chunk {ci} is not page-aligned")
                        keys.append((start >> 12) << 24 | ci)
                    starts, cis = array("Q"), array("I")
                    for k in sorted(keys):
                        start = (k >> 24) << 12
                        if not starts or start != starts[-1]:
                            starts.append(start)
                            cis.append(k & 0xFFFFFF)
                self._layout = (starts, cis)
            return self._layout

    # ------------------------------------------------------------------ ToC
    @property
    def toc(self) -> list[TocEntry]:
        return parse_toc(self.blob, self.toc_raw) if self.toc_raw else []


# ---------------------------------------------------------------------------- reading through the backend
def table_meta(blob: BlobInfo) -> BlobMeta | None:
    """The blob's metadata from the bootstrap's chunk table, if that lists every chunk of the blob."""
    table = blob.chunk_table
    if table is None or not table.covers(blob.index):
        return None
    return BlobMeta(blob, table=table)


def check_ci_sizes(blob: BlobInfo) -> None:
    """The blob table's record of the chunk-info array is consistent and bounded (checked before any read)."""
    if blob.features & bt.FEAT_UNSUPPORTED:
        raise BadImage(f"blob {blob.blob_id}: unsupported blob features 0x{blob.features:x}")
    esize = bm.CI_V2_SIZE if blob.ci_v2 else bm.CI_V1_SIZE
    if not blob.ci_compressed_size or blob.ci_uncompressed_size != blob.chunk_count * esize:
        raise BadImage(f"blob {blob.blob_id}: chunk-info array size does not match its chunk count")
    if blob.ci_compressed_size > blob.ci_uncompressed_size + 4096 or blob.ci_uncompressed_size > MAX_CI_ARRAY:
        raise BadImage(f"blob {blob.blob_id}: implausible chunk-info sizes")
    if blob.compressed_size and blob.ci_offset + blob.ci_compressed_size + bm.BLOB_META_HEADER_SIZE \
            > blob.compressed_size:
        raise BadImage(f"blob {blob.blob_id}: blob.meta lies beyond the end of the blob")


def read_chunk_infos(blob: BlobInfo, read_raw: ReadRaw) -> bytes:
    """The blob's chunk-info array (blob.meta), decompressed to exactly the size the blob table records."""
    check_ci_sizes(blob)
    want = blob.ci_compressed_size + bm.BLOB_META_HEADER_SIZE
    raw = read_raw(blob, blob.ci_offset, want)
    if len(raw) != want:
        raise BadImage(f"blob {blob.blob_id}: blob.meta is truncated")
    hdr = bm.BlobMetaHeader.unpack_from(raw, blob.ci_compressed_size)
    if (hdr.magic, hdr.magic2) != (bm.BLOB_META_MAGIC, bm.BLOB_META_MAGIC) or hdr.ci_entries != blob.chunk_count \
            or hdr.ci_offset != blob.ci_offset or hdr.ci_compressed_size != blob.ci_compressed_size \
            or hdr.ci_uncompressed_size != blob.ci_uncompressed_size:
        raise BadImage(f"blob {blob.blob_id}: blob.meta header does not match the blob table")
    data = memoryview(raw)[:blob.ci_compressed_size]
    if blob.ci_compressor == bt.COMPRESSOR_NONE:
        return bytes(data)
    try:  # decompress() never returns (or holds) more than the recorded size
        return decompress(blob.ci_compressor, data, blob.ci_uncompressed_size)
    except CorruptChunk as e:
        raise BadImage(f"blob {blob.blob_id}: chunk-info array: {e}") from None


def read_toc(blob: BlobInfo, read_raw: ReadRaw) -> bytes:
    """The blob's ToC as stored (b"" if it has none); its sha256 is checked against the blob table."""
    if not blob.toc_size or not blob.features & bt.FEAT_HAS_TOC:
        return b""
    if blob.toc_size < 512 or (blob.toc_size - 512) % TOC_ENTRY_SIZE or blob.toc_size > MAX_TOC_SIZE \
            or blob.compressed_size < blob.toc_size or blob.compressed_size > 1 << 40:
        raise BadImage(f"blob {blob.blob_id}: malformed ToC size {blob.toc_size}")
    raw = read_raw(blob, blob.compressed_size - blob.toc_size, blob.toc_size)
    if len(raw) != blob.toc_size:
        raise BadImage(f"blob {blob.blob_id}: ToC is truncated")
    check_toc(blob, raw)
    return raw


def check_toc(blob: BlobInfo, raw: bytes) -> None:
    if len(raw) != blob.toc_size:
        raise BadImage(f"blob {blob.blob_id}: ToC has the wrong size")
    if any(blob.toc_digest) and hashlib.sha256(raw).digest() != blob.toc_digest:
        raise BadImage(f"blob {blob.blob_id}: ToC digest mismatch")


def parse_toc(blob: BlobInfo, raw: bytes) -> list[TocEntry]:
    return [TocEntry.unpack_from(raw, i * TOC_ENTRY_SIZE) for i in range((len(raw) - 512) // TOC_ENTRY_SIZE)]


def read_digests(blob: BlobInfo, read_raw: ReadRaw, toc_raw: bytes) -> bytes | None:
    """The blob's inlined chunk digest array (blob.digest), if it has one.  Stored uncompressed: nothing inflates."""
    if not blob.features & bt.FEAT_INLINED_CHUNK_DIGEST:
        return None
    for e in parse_toc(blob, toc_raw):
        if e.section == SECTION_DIGEST:
            if e.uncompressed_size != blob.chunk_count * DIGEST_SIZE or e.compressed_size != e.uncompressed_size:
                raise BadImage(f"blob {blob.blob_id}: blob.digest has the wrong size")
            digests = read_raw(blob, e.compressed_offset, e.compressed_size)
            if len(digests) != e.compressed_size:
                raise BadImage(f"blob {blob.blob_id}: blob.digest is truncated")
            return bytes(digests)
    return None


def check_sections(blob: BlobInfo, toc_raw: bytes, infos: bytes, digests: bytes | None) -> bool:
    """Check the chunk-info array and the digest array against the digests the ToC records for them (sha256 of the
    uncompressed section); a mismatch is :class:`BadImage`.  True when both are vouched for this way: the ToC's own
    sha256 is in the bootstrap (``blob.toc_digest``), so the arrays are then the ones the reading image names."""
    if not toc_raw or not any(blob.toc_digest):
        return False
    found = {e.section: e.digest for e in parse_toc(blob, toc_raw)}
    vouched = True
    for name, body in ((SECTION_META, infos), (SECTION_DIGEST, digests)):
        want = found.get(name)
        if body is None:
            continue
        if want is None or not any(want):
            vouched = False
        elif hashlib.sha256(body).digest() != want:
            raise BadImage(f"blob {blob.blob_id}: {name.decode()} does not match the digest in the blob's ToC")
    return vouched


def fetch_meta(blob: BlobInfo, read_raw: ReadRaw) -> BlobMeta:
    """The blob's metadata read from the blob itself (ToC, chunk-info array, digests): three requests at most."""
    if not blob.nydus:
        raise BadImage(f"device {blob.index + 1} is not a Nydus blob: it has no chunk information")
    toc = read_toc(blob, read_raw)
    infos = read_chunk_infos(blob, read_raw)
    digests = read_digests(blob, read_raw, toc)
    check_sections(blob, toc, infos, digests)
    return BlobMeta(blob, infos=infos, digests=digests, toc=toc)


# ---------------------------------------------------------------------------- kept beside the cache entry
@dataclass
class SavedMetaHeader(Record):
    """Header of ``<blob id>.blob.meta``: what the blob table said when the file was written, and a sha256 of the
    arrays that follow (chunk infos, ToC, digests)."""

    NAME = "saved blob meta header"
    magic: bytes = field("8s", b"RAFSBM01")
    blob_id: bytes = field("64s", bytes(64))
    chunk_count: int = field("I")
    features: int = field("I")
    ci_compressor: int = field("I")
    ci_v2: int = field("I")
    ci_offset: int = field("Q")
    ci_compressed_size: int = field("Q")
    ci_uncompressed_size: int = field("Q")
    compressed_size: int = field("Q")
    toc_size: int = field("Q")  # bytes of ToC saved (0 or the blob table's toc_size)
    digests_size: int = field("Q")  # bytes of digests saved
    has_digests: int = field("I")
    reserved: int = field("I")
    toc_digest: bytes = field("32s", bytes(32))
    payload_sha256: bytes = field("32s", bytes(32))


def _expected_header(blob: BlobInfo) -> SavedMetaHeader:
    return SavedMetaHeader(blob_id=blob.blob_id.encode(), chunk_count=blob.chunk_count, features=blob.features,
                           ci_compressor=blob.ci_compressor, ci_v2=int(blob.ci_v2), ci_offset=blob.ci_offset,
                           ci_compressed_size=blob.ci_compressed_size,
                           ci_uncompressed_size=blob.ci_uncompressed_size, compressed_size=blob.compressed_size,
                           toc_digest=bytes(blob.toc_digest).ljust(32, b"\0")[:32])


def meta_path(work_dir: str, blob: BlobInfo) -> str:
    return os.path.join(work_dir, check_blob_id(blob.blob_id) + META_SUFFIX)


def save_meta(path: str, meta: BlobMeta) -> None:
    """Write ``meta`` (read from the backend) beside the cache entry, atomically."""
    digests = meta.digests or b""
    payload = [meta._infos, meta.toc_raw, digests]
    h = hashlib.sha256()
    for p in payload:
        h.update(p)
    hdr = _expected_header(meta.blob)
    hdr.toc_size, hdr.digests_size, hdr.has_digests = len(meta.toc_raw), len(digests), int(meta.digests is not None)
    hdr.payload_sha256 = h.digest()
    with replacing(path, file_mode=0o600) as f:  # private like the cache entries beside it (blob_file)
        f.write(hdr.pack())
        for p in payload:
            f.write(p)


def load_saved_meta(path: str, blob: BlobInfo) -> BlobMeta | None:
    """The saved metadata of ``blob``, or None if there is none, or it was written for another blob table entry,
    or it is damaged (the caller fetches it again)."""
    try:
        with open(path, "rb") as f:
            head = f.read(SavedMetaHeader.rec_size())
            if len(head) < SavedMetaHeader.rec_size():
                raise BadImage("truncated header")
            hdr = SavedMetaHeader.unpack_from(head)
            want = _expected_header(blob)
            for name in ("magic", "blob_id", "chunk_count", "features", "ci_compressor", "ci_v2", "ci_offset",
                         "ci_compressed_size", "ci_uncompressed_size", "compressed_size", "toc_digest"):
                if getattr(hdr, name) != getattr(want, name):
                    raise BadImage(f"{name} differs from the blob table")
            if hdr.toc_size not in (0, blob.toc_size) or hdr.digests_size not in (0, blob.chunk_count * DIGEST_SIZE) \
                    or blob.ci_uncompressed_size > MAX_CI_ARRAY:
                raise BadImage("sizes differ from the blob table")
            infos = f.read(blob.ci_uncompressed_size)
            toc = f.read(hdr.toc_size)
            digests = f.read(hdr.digests_size)
            if f.read(1) or len(infos) + len(toc) + len(digests) != \
                    blob.ci_uncompressed_size + hdr.toc_size + hdr.digests_size:
                raise BadImage("wrong length")
    except FileNotFoundError:
        return None
    except (OSError, RafsError) as e:
        log.info("blob %s: saved metadata %s not used (%s): fetching it again", blob.blob_id, path, e)
        return None
    h = hashlib.sha256()
    for p in (infos, toc, digests):
        h.update(p)
    try:
        if h.digest() != hdr.payload_sha256:
            raise BadImage("checksum mismatch")
        digests = digests if hdr.has_digests else None
        if toc:
            check_toc(blob, toc)
        if not check_sections(blob, toc, infos, digests):
            # only the reading image's own bootstrap can vouch for a copy (through the ToC's sha256): a copy that
            # another image's daemon saved from another registry is never taken on the blob table's word alone
            raise BadImage("not vouched for by the blob's ToC")
        return BlobMeta(blob, infos=infos, toc=toc, digests=digests)
    except RafsError as e:
        log.info("blob %s: saved metadata %s not used (%s): fetching it again", blob.blob_id, path, e)
        return None


class _Load:
    """One load of a blob's metadata, which concurrent callers wait for; its error, if it failed, is theirs too."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.error: RafsError | None = None


class MetaCache:
    """One :class:`BlobMeta` per blob for a chunk source: from the bootstrap's chunk table, else from ``work_dir``
    (when given) if a matching copy was saved there, else read through ``read_raw`` (then saved).  Concurrent
    callers for one blob wait for a single load, and share its error if it fails (they do not each try again, one
    backend deadline after the other); a caller that comes after it tries again."""

    def __init__(self, read_raw: ReadRaw, work_dir: str | None = None):
        self._read_raw = read_raw
        self.work_dir = work_dir
        self._metas: dict[tuple[BlobInfo, int], BlobMeta] = {}
        self._by_object: dict[int, BlobMeta] = {}  # id(BlobInfo) -> its meta (checked: meta.blob is the object)
        self._loading: dict[tuple[BlobInfo, int], _Load] = {}
        self._lock = threading.Lock()

    def get(self, blob: BlobInfo) -> BlobMeta:
        meta = self._by_object.get(id(blob))  # every chunk lookup comes here: no hashing of a BlobInfo
        if meta is not None and meta.blob is blob:
            return meta
        key = (blob, id(blob.chunk_table))  # a BlobMeta holds its blob, so the table's id stays unique meanwhile
        meta = self._metas.get(key)
        if meta is None:
            with self._lock:
                load = self._loading.setdefault(key, _Load())
            with load.lock:
                meta = self._metas.get(key)
                if meta is None:
                    if load.error is not None:  # the load this caller waited for failed
                        err = copy.copy(load.error)  # one object per caller: raising one again grows its traceback
                        err.__traceback__ = None
                        raise err
                    try:
                        meta = self._metas[key] = self._load(blob)
                    except RafsError as e:
                        load.error = e
                        raise
                    finally:
                        with self._lock:
                            if self._loading.get(key) is load:
                                del self._loading[key]  # callers from now on start a new load
        if meta.blob is blob:
            self._by_object[id(blob)] = meta
        return meta

    def _load(self, blob: BlobInfo) -> BlobMeta:
        if not blob.nydus:
            raise BadImage(f"device {blob.index + 1} is not a Nydus blob: it has no chunk information")
        meta = table_meta(blob)
        if meta is not None:
            return meta
        check_ci_sizes(blob)  # what the blob table says must make sense before anything is read or trusted
        path = meta_path(self.work_dir, blob) if self.work_dir else None
        if path is not None:
            meta = load_saved_meta(path, blob)
            if meta is not None:
                return meta
        meta = fetch_meta(blob, self._read_raw)
        if path is not None:
            try:
                save_meta(path, meta)
            except OSError as e:  # the cache still works; the next start fetches the metadata again
                log.info("blob %s: cannot save its metadata in %s: %s", blob.blob_id, path, e.strerror)
        return meta

    def clear(self) -> None:
        with self._lock:
            self._metas.clear()
            self._by_object.clear()
