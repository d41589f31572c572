"""Lays out and writes a RAFS v6 bootstrap that both nydusd and the kernel's EROFS accept (spec §0, §13a).

File map: superblock (1024), extended superblock (1152), device slot (1408), blob table (4096), prefetch table,
then at ``meta_blkaddr`` one spare block and the inode area (root first, nid 128), then full directory blocks,
then the legacy chunk table.  Every inode is extended (64 B) so mtimes, large ids and rdev survive.  A directory
or symlink whose tail fits with its inode in one block is FLAT_INLINE, otherwise FLAT_PLAIN.
"""
from __future__ import annotations

import stat
import struct
from dataclasses import dataclass, field

from ..atomic import replacing
from ..format import blob_table as bt
from ..format import superblock as sbf
from ..format.chunk import CHUNK_INDEX_SIZE, ChunkIndex, ChunkTableEntry
from ..format.dirent import DIRENT_SIZE, Dirent, file_type
from ..format.inode import (
    CHUNK_FORMAT_INDEXES,
    INODE_SLOT,
    LAYOUT_CHUNK_BASED,
    LAYOUT_FLAT_INLINE,
    LAYOUT_FLAT_PLAIN,
    InodeExtended,
    encode_rdev,
)
from ..format.record import round_up
from ..format.xattr import XattrEntry, XattrIbodyHeader, entry_size, split_name
from .blob_writer import StoredChunk
from .tree import Node

BLK = 4096
INODE_SIZE = InodeExtended.rec_size()


@dataclass(eq=False)
class _Placed:
    node: Node
    nlink: int = 0
    ino: int = 0
    nid: int = 0
    offset: int = 0
    xattr_blob: bytes = b""
    data: bytes = b""  # dirent blocks / symlink target
    layout: int = LAYOUT_FLAT_PLAIN
    tail: bytes = b""  # inline tail
    full_blocks: bytes = b""  # data in whole blocks outside the inode area
    blkaddr: int = 0
    record: int = 0  # inode + xattrs + inline payload, bytes
    entries: list[tuple[bytes, "_Placed"]] = field(default_factory=list)


def _xattr_body(xattrs: dict[bytes, bytes]) -> bytes:
    if not xattrs:
        return b""
    parts = [XattrIbodyHeader().pack()]
    for name, value in sorted(xattrs.items()):
        idx, suffix = split_name(name)  # type: ignore[misc]  # tree.py keeps only names with a prefix
        if len(suffix) > 255 or len(value) > 65535:
            raise ValueError(f"xattr {name!r} too large")
        e = XattrEntry(len(suffix), idx, len(value)).pack() + suffix + value
        parts.append(e + bytes(entry_size(len(suffix), len(value)) - len(e)))
    return b"".join(parts)


def _dir_blocks(entries: list[tuple[bytes, int, int]]) -> bytes:
    """Dirent blocks for sorted (name, nid, file_type) entries; the last block is not padded."""
    blocks: list[bytes] = []
    cur: list[tuple[bytes, int, int]] = []
    used = 0

    def emit(last: bool) -> None:
        head = b""
        names = b""
        nameoff = len(cur) * DIRENT_SIZE
        for name, nid, ft in cur:
            head += Dirent(nid, nameoff + len(names), ft).pack()
            names += name
        blk = head + names
        blocks.append(blk if last else blk + bytes(BLK - len(blk)))

    for e in entries:
        need = DIRENT_SIZE + len(e[0])
        if cur and used + need > BLK:
            emit(False)
            cur, used = [], 0
        cur.append(e)
        used += need
    emit(True)
    return b"".join(blocks)


class BootstrapLayout:
    def __init__(self, root: Node, chunk_size: int):
        self.root = root
        self.chunk_size = chunk_size
        self.placed: list[_Placed] = []
        self.by_node: dict[int, _Placed] = {}
        self.paths: dict[bytes, _Placed] = {}
        self._collect()

    def _collect(self) -> None:
        """Breadth-first, names sorted: the inode order (and so nids) is deterministic."""
        root = self._get(self.root, b"/")
        root.nlink = 0
        queue = [(b"/", root, root)]
        while queue:
            nxt = []
            for path, p, parent in queue:
                for name in sorted(p.node.children):
                    child_node = p.node.children[name]
                    cpath = path.rstrip(b"/") + b"/" + name
                    c = self._get(child_node, cpath)
                    p.entries.append((name, c))
                    if child_node.is_dir():
                        nxt.append((cpath, c, p))
                    else:
                        c.nlink += 1
                p.nlink = 2 + sum(1 for _, c in p.entries if c.node.is_dir())
                p.entries.append((b".", p))
                p.entries.append((b"..", parent))
                p.entries.sort(key=lambda e: e[0])
            queue = nxt

    def _get(self, node: Node, path: bytes) -> _Placed:
        p = self.by_node.get(id(node))
        if p is None:
            p = _Placed(node)
            p.ino = len(self.placed) + 1
            self.by_node[id(node)] = p
            self.placed.append(p)
        elif node.is_dir():
            raise ValueError(f"directory {path!r} appears twice")
        self.paths.setdefault(path, p)
        return p

    def place(self, meta_base: int) -> int:
        """Assign nids and block addresses.  Returns the end offset of everything placed."""
        # 1) payload sizes (dirent sizes depend only on names, so they are known before nids)
        for p in self.placed:
            n = p.node
            p.xattr_blob = _xattr_body(n.xattrs)
            head = INODE_SIZE + len(p.xattr_blob)
            if n.is_dir():
                size = len(_dir_blocks([(name, 0, 0) for name, _ in p.entries]))
            elif stat.S_ISLNK(n.mode):
                size = len(n.target)
            elif stat.S_ISREG(n.mode):
                p.layout = LAYOUT_CHUNK_BASED
                p.record = round_up(head, CHUNK_INDEX_SIZE) + CHUNK_INDEX_SIZE * len(n.chunks)
                continue
            else:
                p.record = head
                continue
            tail = size % BLK
            if tail and head + tail <= BLK:
                p.layout = LAYOUT_FLAT_INLINE
                p.record = head + tail
            else:
                p.layout = LAYOUT_FLAT_PLAIN
                p.record = head
            p.data = bytes(size)  # placeholder: real bytes after nids are known
        # 2) inode area: root first (nid 128 after one spare block), 32-byte slots; an inode with an inline tail
        #    never crosses a block boundary, nor does any inode+xattr header that fits in one block
        pos = meta_base + BLK
        for p in self.placed:
            head = INODE_SIZE + len(p.xattr_blob)
            must_fit = p.record if p.layout == LAYOUT_FLAT_INLINE else min(head, BLK)
            if pos % BLK + must_fit > BLK:
                pos = round_up(pos, BLK)
            p.offset = pos
            p.nid = (pos - meta_base) // INODE_SLOT
            pos = round_up(pos + p.record, INODE_SLOT)
        if self.placed[0].nid > 0xFFFF:
            raise ValueError("root inode does not fit a 16-bit nid")
        # 3) whole data blocks after the inode area
        blk = round_up(pos, BLK) // BLK
        for p in self.placed:
            n = p.node
            if n.is_dir():
                p.data = _dir_blocks([(name, c.nid, file_type(c.node.mode)) for name, c in p.entries])
            elif stat.S_ISLNK(n.mode):
                p.data = n.target
            else:
                continue
            if p.layout == LAYOUT_FLAT_INLINE:
                full = len(p.data) // BLK * BLK
                p.full_blocks, p.tail = p.data[:full], p.data[full:]
            else:
                p.full_blocks = p.data + bytes(round_up(len(p.data), BLK) - len(p.data))
            if p.full_blocks:
                p.blkaddr = blk
                blk += len(p.full_blocks) // BLK
        return blk * BLK

    def inode_bytes(self, p: _Placed, blobs: list["BlobPart"]) -> bytes:
        n = p.node
        fmt = 1 | (p.layout << 1)
        if p.layout == LAYOUT_CHUNK_BASED:
            u = CHUNK_FORMAT_INDEXES | (self.chunk_size.bit_length() - 1 - 12)
            size = n.size
        elif stat.S_ISCHR(n.mode) or stat.S_ISBLK(n.mode):
            u, size = encode_rdev(n.rdev_major, n.rdev_minor), 0
        elif n.is_dir() or stat.S_ISLNK(n.mode):
            u, size = p.blkaddr, len(p.data)
        else:
            u, size = 0, 0
        icount = 0 if not p.xattr_blob else (len(p.xattr_blob) - 12) // 4 + 1
        rec = InodeExtended(format=fmt, xattr_icount=icount, mode=n.mode, size=size, u=u, ino=p.ino, uid=n.uid,
                            gid=n.gid, mtime=n.mtime, mtime_nsec=n.mtime_nsec,
                            nlink=p.nlink).pack() + p.xattr_blob
        if p.layout == LAYOUT_CHUNK_BASED:
            rec += bytes(round_up(len(rec), CHUNK_INDEX_SIZE) - len(rec))
            if n.chunks and not 0 <= n.blob_index < len(blobs):
                raise ValueError(f"inode {p.ino}: blob index {n.blob_index} out of range")
            infos = blobs[n.blob_index].chunks if n.chunks else []
            rec += b"".join(ChunkIndex.nydus(n.blob_index, ci, infos[ci].info.uncompressed_offset // BLK).pack()
                            for ci in n.chunks)
        elif p.layout == LAYOUT_FLAT_INLINE:
            rec += p.tail
        return rec


@dataclass
class BlobPart:
    """One data blob of the image: its blob table entry and its stored chunks (``Node.chunks`` index these)."""

    entry: bt.BlobEntry
    chunks: list[StoredChunk]


def write_bootstrap(path: str, root: Node, *, chunk_size: int, compressor: int, digester: int,
                    blobs: list[BlobPart], prefetch: list[bytes]) -> int:
    """Write the bootstrap file; returns the number of inodes.  ``Node.blob_index`` picks the node's blob."""
    if len(blobs) > 254:
        raise ValueError(f"{len(blobs)} blobs: RAFS v6 allows at most 254")
    for i, b in enumerate(blobs):
        if b.entry.blob_index != i:
            raise ValueError(f"blob {i} has blob_index {b.entry.blob_index}")
    layout = BootstrapLayout(root, chunk_size)
    nblobs = len(blobs)
    blob_table_off = round_up(1408 + 128 * nblobs, BLK)
    prefetch_off = blob_table_off + bt.BLOB_ENTRY_SIZE * nblobs
    meta_base = round_up(prefetch_off + 4 * len(prefetch), BLK)  # room for every entry, resolved or not
    end = layout.place(meta_base)
    prefetch_nids = []
    for pth in prefetch:
        p = layout.paths.get(pth)
        if p is not None:
            prefetch_nids.append(p.nid)
    prefetch_bytes = struct.pack(f"<{len(prefetch_nids)}I", *prefetch_nids)
    prefetch_bytes += bytes(4 * len(prefetch) - len(prefetch_bytes))  # unresolved entries: 0 ends the list

    # legacy chunk table (nydusd's per-chunk lookups fall back to it), sorted by (digest, blob index)
    table = b"".join(
        ChunkTableEntry(digest=c.digest, blob_index=bi, flags=1 if c.info.compressed else 0,
                        compressed_size=c.info.compressed_size, uncompressed_size=c.info.uncompressed_size,
                        compressed_offset=c.info.compressed_offset,
                        uncompressed_offset=c.info.uncompressed_offset, index=i).pack()
        for bi, i, c in sorted(((bi, i, c) for bi, b in enumerate(blobs) for i, c in enumerate(b.chunks)),
                               key=lambda e: (e[2].digest, e[0])))
    chunk_table_off = end if table else 0
    total = round_up(end + len(table), BLK)

    buf = bytearray(total)
    for p in layout.placed:
        rec = layout.inode_bytes(p, blobs)
        buf[p.offset:p.offset + len(rec)] = rec
        if p.full_blocks:
            buf[p.blkaddr * BLK:p.blkaddr * BLK + len(p.full_blocks)] = p.full_blocks
    if table:
        buf[chunk_table_off:chunk_table_off + len(table)] = table

    flags = {bt.COMPRESSOR_NONE: sbf.FLAG_COMPRESSION_NONE, bt.COMPRESSOR_LZ4_BLOCK: sbf.FLAG_COMPRESSION_LZ4,
             bt.COMPRESSOR_ZSTD: sbf.FLAG_COMPRESSION_ZSTD, bt.COMPRESSOR_GZIP: sbf.FLAG_COMPRESSION_GZIP}[compressor]
    flags |= sbf.FLAG_HASH_BLAKE3 if digester == bt.DIGEST_BLAKE3 else sbf.FLAG_HASH_SHA256
    flags |= sbf.FLAG_EXPLICIT_UID_GID | sbf.FLAG_ENCRYPTION_NONE
    if any(p.xattr_blob for p in layout.placed):
        flags |= sbf.FLAG_HAS_XATTR
    if blobs:
        flags |= sbf.FLAG_INLINED_CHUNK_DIGEST
    blocks = sum(b.entry.uncompressed_size // BLK for b in blobs)
    sb = sbf.SuperBlock(feature_compat=sbf.COMPAT_RAFS_V6, blkszbits=12, root_nid=layout.placed[0].nid,
                        inos=len(layout.placed), blocks=blocks, meta_blkaddr=meta_base // BLK,
                        feature_incompat=sbf.INCOMPAT_NYDUS, extra_devices=nblobs,
                        devt_slotoff=sbf.NYDUS_DEVT_SLOTOFF)
    ext = sbf.SuperBlockExt(flags=flags, blob_table_offset=blob_table_off,
                            blob_table_size=bt.BLOB_ENTRY_SIZE * nblobs, chunk_size=chunk_size,
                            chunk_table_offset=chunk_table_off, chunk_table_size=len(table),
                            prefetch_table_offset=prefetch_off if prefetch_nids else 0,
                            prefetch_table_size=len(prefetch_bytes) if prefetch_nids else 0)
    buf[sbf.SB_OFFSET:sbf.SB_OFFSET + 128] = sb.pack()
    buf[sbf.EXT_SB_OFFSET:sbf.EXT_SB_OFFSET + 256] = ext.pack()
    # where each blob would start in a flat "unified" device (nydus-image aligns each to 512 KiB)
    mapped = round_up(total, 0x80000) // BLK
    for i, b in enumerate(blobs):
        dblocks = b.entry.uncompressed_size // BLK
        slot = sbf.DeviceSlot(tag=b.entry.blob_id, blocks=dblocks, mapped_blkaddr=mapped)
        buf[1408 + 128 * i:1408 + 128 * (i + 1)] = slot.pack()
        off = blob_table_off + bt.BLOB_ENTRY_SIZE * i
        buf[off:off + bt.BLOB_ENTRY_SIZE] = b.entry.pack()
        mapped += round_up(dblocks * BLK, 0x80000) // BLK
    if prefetch_nids:
        buf[prefetch_off:prefetch_off + len(prefetch_bytes)] = prefetch_bytes
    with replacing(path) as f:  # whole and durable, or the old file (review M5)
        f.write(buf)
    return len(layout.placed)

