"""Nydus blob table entries (``RafsV6Blob``, 256 B each) and blob feature bits."""
from __future__ import annotations

from dataclasses import dataclass

from .record import Record, field

BLOB_ENTRY_SIZE = 256

FEAT_ALIGNED = 0x1
FEAT_INLINED_FS_META = 0x2
FEAT_CHUNK_INFO_V2 = 0x4
FEAT_ZRAN = 0x8
FEAT_SEPARATE = 0x10
FEAT_INLINED_CHUNK_DIGEST = 0x20
FEAT_TARFS = 0x40
FEAT_BATCH = 0x80
FEAT_ENCRYPTED = 0x100
FEAT_IS_CHUNKDICT_GENERATED = 0x200
FEAT_IS_SEPARATED_WITH_PREFETCH_FILES = 0x400
FEAT_EXTERNAL = 0x800
FEAT_HAS_TAR_HEADER = 0x1000_0000
FEAT_HAS_TOC = 0x2000_0000
FEAT_CAP_TAR_TOC = 0x4000_0000
FEAT_UNKNOWN_INCOMPAT = 0x0000_F000
# features this reader cannot serve data for
FEAT_UNSUPPORTED = FEAT_ZRAN | FEAT_BATCH | FEAT_ENCRYPTED | FEAT_TARFS | FEAT_SEPARATE | FEAT_EXTERNAL

# compression enum (blob compression_algo, ci_compressor, blob.meta header)
COMPRESSOR_NONE = 0
COMPRESSOR_LZ4_BLOCK = 1
COMPRESSOR_GZIP = 2
COMPRESSOR_ZSTD = 3
# digest enum
DIGEST_BLAKE3 = 0
DIGEST_SHA256 = 1


@dataclass
class BlobEntry(Record):
    NAME = "blob table entry"
    blob_id: bytes = field("64s", bytes(64))
    blob_index: int = field("I")
    chunk_size: int = field("I")
    chunk_count: int = field("I")
    compression_algo: int = field("I")
    digest_algo: int = field("I")
    features: int = field("I")
    compressed_size: int = field("Q")
    uncompressed_size: int = field("Q")
    blob_toc_size: int = field("I")
    ci_compressor: int = field("I")
    ci_offset: int = field("Q")
    ci_compressed_size: int = field("Q")
    ci_uncompressed_size: int = field("Q")
    blob_toc_digest: bytes = field("32s", bytes(32))
    blob_meta_digest: bytes = field("32s", bytes(32))
    blob_meta_size: int = field("Q")
    cipher_iv: int = field("Q")
    cipher_algo: int = field("I")
    reserved: bytes = field("36s", bytes(36))


assert BlobEntry.rec_size() == BLOB_ENTRY_SIZE
