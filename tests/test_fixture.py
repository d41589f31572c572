"""The real Nydus fixture (built by nydus-image 2.2), read through the Python API.

What is known about it is in shared/fixtures/README.md; the file contents are not stated anywhere, so data is checked
through the digests the image records for it.
"""
from __future__ import annotations

import hashlib
import stat

import blake3
import pytest
import zstandard

from rafsfs.errors import NotFound
from rafsfs.format import blob_table as bt
from rafsfs.format import superblock as sbf
from rafsfs.format.toc import TOC_ENTRY_SIZE, parse_tar_header
from rafsfs.image import RafsImage
from rafsfs.storage.backend.localfs import LocalFsBackend
from rafsfs.storage.cache.none import DirectChunkSource
from rafsfs.storage.meta import fetch_meta, parse_toc, read_digests, read_toc, table_meta

BLOB_ID = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
BOOT_SHA256 = "6a1ab377a31df3b1dfe6d3f09b4168f1db66207f77012206ac7b98cb5a42186d"
BLOB_SHA256 = "4b16fb83ae9f62d8263323b8569535e66ebf21171cf98fd94db9db27b59755ac"
FILES = {b"/lib.rs": 16931, b"/sync_io.rs": 13400}


@pytest.fixture
def image(nydus_fixture):
    img = RafsImage.open(str(nydus_fixture / "rafs-v6-2.2.boot"))
    yield img
    img.close()


@pytest.fixture
def source(nydus_fixture):
    backend = LocalFsBackend(str(nydus_fixture))
    yield DirectChunkSource(backend)
    backend.close()


@pytest.fixture
def blob_bytes(nydus_fixture) -> bytes:
    return (nydus_fixture / BLOB_ID).read_bytes()


def test_fixture_files_are_the_published_ones(nydus_fixture, blob_bytes):
    assert hashlib.sha256((nydus_fixture / "rafs-v6-2.2.boot").read_bytes()).hexdigest() == BOOT_SHA256
    assert hashlib.sha256(blob_bytes).hexdigest() == BLOB_SHA256


def test_superblock(image):
    assert image.nydus
    assert image.blksz == 4096
    assert image.sb.feature_incompat & sbf.INCOMPAT_CHUNKED_FILE
    assert image.sb.feature_incompat & sbf.INCOMPAT_DEVICE_TABLE
    assert image.chunk_size == 1 << 20
    flags = image.ext.flags
    assert flags & sbf.FLAG_HASH_BLAKE3 and flags & sbf.FLAG_COMPRESSION_ZSTD
    assert flags & sbf.FLAG_INLINED_CHUNK_DIGEST and flags & sbf.FLAG_EXPLICIT_UID_GID
    assert image.prefetch_nids == []


def test_tree_is_exactly_root_and_two_files(image):
    entries = {p: ino for p, ino in image.walk()}
    assert set(entries) == {b"/", *FILES}
    root = entries[b"/"]
    assert stat.S_ISDIR(root.mode) and stat.S_IMODE(root.mode) == 0o755
    assert (root.uid, root.gid) == (0, 0)
    for path, size in FILES.items():
        ino = entries[path]
        assert stat.S_ISREG(ino.mode), path
        assert ino.size == size
        assert ino.nlink == 1
        assert image.xattrs(ino) == {}
        assert image.resolve(path).nid == ino.nid
    names = [e.name for e in image.readdir(root)]
    assert sorted(names) == [b".", b"..", b"lib.rs", b"sync_io.rs"]
    assert all(e.nid == root.nid for e in image.readdir(root) if e.name in (b".", b".."))
    with pytest.raises(NotFound):
        image.resolve("/missing")


def test_blob_table(image, blob_bytes):
    (blob,) = image.blobs
    assert blob.blob_id == BLOB_ID
    assert blob.compressor == bt.COMPRESSOR_ZSTD
    assert blob.digester == bt.DIGEST_BLAKE3
    assert blob.chunk_count == 2
    assert blob.chunk_size == 1 << 20
    assert blob.compressed_size == len(blob_bytes)
    assert not blob.ci_v2
    assert blob.features & bt.FEAT_HAS_TOC and blob.features & bt.FEAT_INLINED_CHUNK_DIGEST
    assert blob.features & bt.FEAT_ALIGNED


def test_every_chunk_matches_its_digest(image, source, nydus_fixture, blob_bytes):
    (blob,) = image.blobs
    table = image.chunk_table()
    assert sorted(table) == [(0, 0), (0, 1)]
    inline_digests = read_digests(blob, source.read_raw, read_toc(blob, source.read_raw))
    assert inline_digests is not None and len(inline_digests) == 2 * 32
    seen = set()
    for path, size in FILES.items():
        ino = image.resolve(path)
        chunks = image.chunks(ino, source=source)
        assert len(chunks) == 1  # one chunk each (1 MiB chunk size)
        (c,) = chunks
        seen.add(c.ci_index)
        e = table[(0, c.ci_index)]
        assert c.digest == e.digest == inline_digests[c.ci_index * 32:(c.ci_index + 1) * 32]
        # decompress the stored bytes independently of the reader
        raw = blob_bytes[c.info.compressed_offset:c.info.compressed_offset + c.info.compressed_size]
        data = zstandard.ZstdDecompressor().decompress(raw, max_output_size=1 << 20)
        assert len(data) == size == c.info.uncompressed_size
        assert blake3.blake3(data).digest() == c.digest
        # and the reader returns the same bytes, whole and in pieces
        assert image.read(ino, 0, size + 100, source) == data
        assert image.read(ino, 1000, 5000, source) == data[1000:6000]
        assert image.read(ino, size - 1, 10, source) == data[-1:]
        assert image.read(ino, size, 10, source) == b""
    assert seen == {0, 1}


def test_blob_id_is_sha256_without_digest_section(image, source, blob_bytes):
    (blob,) = image.blobs
    (d,) = [e for e in parse_toc(blob, read_toc(blob, source.read_raw)) if e.section == b"blob.digest"]
    without = blob_bytes[:d.compressed_offset] + blob_bytes[d.compressed_offset + d.compressed_size:]
    assert hashlib.sha256(without).hexdigest() == BLOB_ID
    assert hashlib.sha256(blob_bytes).hexdigest() != BLOB_ID


def test_toc(image, source, blob_bytes):
    (blob,) = image.blobs
    toc = parse_toc(blob, read_toc(blob, source.read_raw))
    assert [e.section for e in toc] == [b"image.blob", b"blob.meta", b"blob.meta.header", b"blob.digest"]
    # the ToC digest in the blob table is sha256 of the ToC entries plus their tar header, at the blob's end
    assert blob.toc_size == len(toc) * TOC_ENTRY_SIZE + 512
    assert hashlib.sha256(blob_bytes[-blob.toc_size:]).digest() == blob.toc_digest
    assert parse_tar_header(blob_bytes[-512:]) == (b"rafs.blob.toc", len(toc) * TOC_ENTRY_SIZE)
    by = {e.section: e for e in toc}
    for name in (b"blob.meta", b"blob.meta.header", b"blob.digest"):
        e = by[name]
        body = blob_bytes[e.compressed_offset:e.compressed_offset + e.compressed_size]
        assert hashlib.sha256(body).digest() == e.digest, name
    # image.blob: its digest covers the chunk data and the tar header framing it (what nydus-image 2.2 wrote)
    assert hashlib.sha256(blob_bytes[:blob.ci_offset]).digest() == by[b"image.blob"].digest
    assert by[b"blob.meta"].compressed_offset == blob.ci_offset
    assert by[b"blob.meta.header"].compressed_offset == blob.ci_offset + blob.ci_compressed_size
    # reverse-tar framing: each section is followed by its header
    assert parse_tar_header(blob_bytes[blob.ci_offset - 512:blob.ci_offset]) == (b"image.blob", blob.ci_offset - 512)
    d = by[b"blob.digest"]
    end = d.compressed_offset + d.compressed_size
    assert parse_tar_header(blob_bytes[end:end + 512]) == (b"blob.digest", 64)


def test_toc_digest_mismatch_is_detected(image, nydus_fixture, tmp_path, blob_bytes):
    bad = bytearray(blob_bytes)
    bad[-600] ^= 0xFF  # inside the ToC entries
    (tmp_path / BLOB_ID).write_bytes(bad)
    from rafsfs.errors import BadImage
    with pytest.raises(BadImage):
        read_toc(image.blobs[0], DirectChunkSource(LocalFsBackend(str(tmp_path))).read_raw)


def test_blob_meta_equals_chunk_table(image, source):
    (blob,) = image.blobs
    meta = fetch_meta(blob, source.read_raw)  # the blob's own chunk-info array, not the bootstrap's table
    assert not meta.from_table and meta.digests is not None
    infos = [meta.chunk_info(i) for i in range(meta.count)]
    table = image.chunk_table()
    assert len(infos) == blob.chunk_count == len(table)
    for i, info in enumerate(infos):
        e = table[(0, i)]
        assert e.index == i
        assert (info.compressed_offset, info.compressed_size, info.uncompressed_offset, info.uncompressed_size) == \
            (e.compressed_offset, e.compressed_size, e.uncompressed_offset, e.uncompressed_size)
        assert info.compressed == bool(e.flags & 1)
        assert info.uncompressed_offset % 4096 == 0  # ALIGNED
    # the same chunk table, whichever way it was recorded
    assert meta.fingerprint() == table_meta(blob).fingerprint()
    assert meta.fingerprint()[1]  # every chunk has a digest
    # the uncompressed view packs chunks at 4K boundaries, in order
    assert infos[0].uncompressed_offset == 0
    assert infos[1].uncompressed_offset == -(-infos[0].uncompressed_size // 4096) * 4096
    assert infos[1].compressed_offset == infos[0].compressed_offset + infos[0].compressed_size


def test_corrupt_chunk_is_detected(image, tmp_path, blob_bytes):
    from rafsfs.errors import CorruptChunk, RafsError
    bad = bytearray(blob_bytes)
    bad[100] ^= 0x01  # inside the first chunk's zstd frame
    (tmp_path / BLOB_ID).write_bytes(bad)
    src = DirectChunkSource(LocalFsBackend(str(tmp_path)))
    with pytest.raises(RafsError) as ei:
        image.read(image.resolve("/lib.rs"), 0, 100, src)
    assert isinstance(ei.value, CorruptChunk) or "digest" in str(ei.value)
    # the other file is unaffected
    assert len(image.read(image.resolve("/sync_io.rs"), 0, 20000, src)) == 13400


def test_missing_blob_is_blob_unavailable(image, tmp_path):
    from rafsfs.errors import BlobUnavailable
    src = DirectChunkSource(LocalFsBackend(str(tmp_path)))
    with pytest.raises(BlobUnavailable):
        image.read(image.resolve("/lib.rs"), 0, 100, src)
