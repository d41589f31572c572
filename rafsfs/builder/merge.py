"""Multi-layer builds: OCI layer tarballs, bottom first -> one merged RAFS v6 bootstrap + one blob per layer.

Each layer is chunked into its own blob (so a layer shared by two images is one blob in the registry), and the
layers' trees are merged with overlay semantics, the way a container runtime stacks them:

* ``.wh.NAME`` deletes NAME (and everything below it) from the layers beneath;
* ``.wh..wh..opq`` in a directory hides every entry the layers beneath had in that directory;
* an entry of an upper layer replaces the same path below, except that a directory over a directory merges
  (the upper directory's owner, mode, times and xattrs win unless the tar only implied it);
* whiteout files never appear in the merged tree.

A hard link inside a layer shares its inode; a link to a file of a lower layer is resolved against the merged
tree below it.  Chunks are deduplicated within a layer, not across layers.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..errors import BuildError
from .blob_writer import BlobWriter
from .bootstrap_writer import BlobPart
from .pipeline import FileChunker, check_codecs, write_bootstrap_checked
from .tree import Node, new_dir, scan_tar

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = b".wh."
OPAQUE = b".wh..wh..opq"
MAX_LAYERS = 254  # device ids are one byte and 0 is the bootstrap


@dataclass
class LayerResult:
    source: str
    blob_id: str | None  # None: the layer has no file data, so no blob
    blob_path: str | None
    blob_size: int
    files: int
    data_bytes: int
    chunks: int


@dataclass
class MergedBuildResult:
    bootstrap: str
    layers: list[LayerResult] = field(default_factory=list)
    inodes: int = 0

    @property
    def blob_ids(self) -> list[str]:
        """The blobs in blob-table order (layers without data have none)."""
        return [lr.blob_id for lr in self.layers if lr.blob_id]


# ---------------------------------------------------------------------------------------------- tree merge
def _is_whiteout(name: bytes) -> bool:
    return name.startswith(WHITEOUT_PREFIX)


def strip_whiteouts(node: Node) -> None:
    """Remove whiteout entries from a directory tree that has nothing beneath it to hide."""
    stack = [node]
    seen: set[int] = set()
    while stack:
        d = stack.pop()
        if id(d) in seen:
            continue
        seen.add(id(d))
        for name in [n for n in d.children if _is_whiteout(n)]:
            del d.children[name]
        stack.extend(c for c in d.children.values() if c.is_dir())


def _copy_dir_meta(dst: Node, src: Node) -> None:
    dst.mode, dst.uid, dst.gid = src.mode, src.uid, src.gid
    dst.mtime, dst.mtime_nsec, dst.xattrs = src.mtime, src.mtime_nsec, dict(src.xattrs)
    dst.implicit = False


def apply_layer(lower: Node, upper: Node) -> None:
    """Apply layer tree ``upper`` onto the merged tree ``lower`` in place (both are directory roots)."""
    if not upper.implicit:
        _copy_dir_meta(lower, upper)
    stack = [(lower, upper)]
    while stack:
        mdir, udir = stack.pop()
        if OPAQUE in udir.children:
            mdir.children.clear()
        for name in udir.children:
            if _is_whiteout(name) and name != OPAQUE:
                target = name[len(WHITEOUT_PREFIX):]
                if target in (b"", b".", b".."):
                    raise BuildError(f"invalid whiteout {os.fsdecode(name)!r}")
                mdir.children.pop(target, None)
        for name, uchild in udir.children.items():
            if _is_whiteout(name):
                continue
            mchild = mdir.children.get(name)
            if uchild.is_dir() and mchild is not None and mchild.is_dir():
                if not uchild.implicit:
                    _copy_dir_meta(mchild, uchild)
                stack.append((mchild, uchild))
            else:
                if uchild.is_dir():
                    strip_whiteouts(uchild)
                mdir.children[name] = uchild


def lookup(root: Node, key: bytes) -> Node | None:
    """The node at slash-separated ``key`` (relative to ``root``), or None."""
    node = root
    for part in key.split(b"/"):
        if not part:
            continue
        if not node.is_dir():
            return None
        nxt = node.children.get(part)
        if nxt is None:
            return None
        node = nxt
    return node


# ---------------------------------------------------------------------------------------------- the build
def build_layers(layers: list[str], bootstrap: str, blob_dir: str, *, compressor: str = "zstd",
                 chunk_size: int = 1 << 20, digester: str = "blake3",
                 progress: Callable[[int, int, int], None] | None = None) -> MergedBuildResult:
    """Build one merged bootstrap over ``layers`` (tar paths, bottom layer first) and one blob per layer with
    data.  ``progress(layer index, bytes done in this layer, layer file size)`` is called as data is read."""
    cs = chunk_size
    comp, dig = check_codecs(compressor, digester, cs)
    if not layers:
        raise BuildError("no layers to build")
    if len(layers) > MAX_LAYERS:
        raise BuildError(f"{len(layers)} layers: at most {MAX_LAYERS} are supported")

    merged = new_dir()
    result = MergedBuildResult(bootstrap=bootstrap)
    parts: list[BlobPart] = []
    for li, path in enumerate(layers):
        if not os.path.isfile(path):
            raise BuildError(f"layer {path} is not a file")
        total = os.path.getsize(path)
        writer = BlobWriter(blob_dir, comp, dig, cs)
        with_data: list[Node] = []

        chunker = FileChunker(writer, cs, what=f"layer {li}: file")

        def on_file(node: Node, n: int, chunker: FileChunker = chunker, with_data: list = with_data, li: int = li,
                    total: int = total) -> None:
            if n:
                with_data.append(node)
            if progress:
                progress(li, chunker.bytes, total)

        chunker.on_file = on_file
        try:
            tree = scan_tar(path, chunker, lower=lambda key: lookup(merged, key))
            blob_id, blob_path, entry = writer.finish()
        except BaseException:
            writer.abort()
            raise
        try:
            apply_layer(merged, tree)
        except BuildError as e:
            raise BuildError(f"{path}: {e}") from None
        if entry is not None:
            entry = replace(entry, blob_index=len(parts))
            for node in with_data:
                node.blob_index = entry.blob_index
            parts.append(BlobPart(entry, writer.chunks))
        result.layers.append(LayerResult(source=path, blob_id=blob_id, blob_path=blob_path,
                                         blob_size=entry.compressed_size if entry else 0, files=chunker.files,
                                         data_bytes=chunker.bytes, chunks=len(writer.chunks)))
        log.info("layer %d/%d: %d files, %d bytes, blob %s", li + 1, len(layers), chunker.files, chunker.bytes,
                 blob_id or "(none)")
    merged.implicit = False
    result.inodes = write_bootstrap_checked(bootstrap, merged, chunk_size=cs, compressor=comp, digester=dig,
                                            blobs=parts, prefetch=[])
    return result
