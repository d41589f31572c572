"""What a build is asked to do and what it produced."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class BuildOptions:
    source: str  # a directory, or an OCI layer tarball (.tar, .tar.gz/.tgz, .tar.zst)
    bootstrap: str  # output bootstrap path
    blob_dir: str  # the blob is written here, named by its id (sha256 of the blob file)
    compressor: str = "zstd"  # zstd | lz4 | none
    chunk_size: int = 1 << 20  # power of two in [4 KiB, 16 MiB]
    digester: str = "blake3"  # blake3 | sha256
    prefetch_list: list[str] = field(default_factory=list)  # absolute paths inside the image
    progress: Callable[[int, int], None] | None = None  # (bytes done, bytes total or 0 when unknown)


@dataclass
class BuildResult:
    bootstrap: str
    blob_id: str | None  # None when the tree has no file data (no blob is written)
    blob_path: str | None
    inodes: int
    files: int
    data_bytes: int  # bytes of regular-file data read from the source
    chunks: int  # distinct chunks stored
    dedup_chunks: int  # chunks that reused an identical stored chunk
    blob_size: int
