"""RafsImage: read a RAFS v6 bootstrap (Nydus) or a plain uncompressed EROFS image.

Metadata comes from the bootstrap alone.  File data is described by :meth:`RafsImage.map_range`, which turns a file
range into chunk slices (blob, chunk location, offset and length inside the chunk); a chunk source
(:class:`rafsfs.storage.source.ChunkSource`: the chunk cache, or a direct reader over a backend) owns the blobs'
metadata (where each chunk lives, when the bootstrap's chunk table does not say) and turns chunks into verified,
decompressed bytes.  The reader does no blob I/O.

Every offset, count and size read from the image is checked before use: a malformed image raises
:class:`BadImage`, never an IndexError or a hang.
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Iterator

from .blob import BOOTSTRAP, HOLE, BlobInfo, ChunkInfo, ChunkRef, ChunkSlice, check_blob_id, check_chunk_info
from .errors import BadImage, BlobUnavailable, IsADirectory, NotADirectory, NotFound, NoXattr
from .format import blob_meta as bm
from .format import blob_table as bt
from .format import superblock as sbf
from .format.chunk import BLOCK_MAP_ENTRY_SIZE, CHUNK_INDEX_SIZE, ChunkIndex, ChunkTable
from .format.dirent import DIRENT_SIZE, MAX_NAME, Dirent
from .format.inode import (
    CHUNK_FORMAT_48BIT,
    CHUNK_FORMAT_BLKBITS_MASK,
    CHUNK_FORMAT_INDEXES,
    INODE_SLOT,
    LAYOUT_CHUNK_BASED,
    LAYOUT_FLAT_INLINE,
    LAYOUT_FLAT_PLAIN,
    NULL_ADDR,
    InodeCompact,
    InodeExtended,
    decode_rdev,
    xattr_ibody_size,
)
from .format.record import round_up
from .format.xattr import LONG_PREFIX_FLAG, PREFIXES, XattrEntry, XattrIbodyHeader

if TYPE_CHECKING:
    from .storage.source import ChunkSource

_MAX_DIR_ENTRIES = 1 << 24
MAX_IMAGE_CHUNKS = 1 << 24  # chunks in all blobs of one image: bounds the memory of their metadata
MAX_BLOB_SIZE = 1 << 44  # uncompressed offsets in chunk-info arrays have 44 bits


@dataclass
class Inode:
    nid: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    mtime: int
    mtime_nsec: int
    layout: int
    u: int
    ino: int
    xattr_icount: int
    extended: bool
    offset: int  # byte offset of the inode in the bootstrap

    @property
    def inode_size(self) -> int:
        return 64 if self.extended else 32

    @property
    def xattr_size(self) -> int:
        return xattr_ibody_size(self.xattr_icount)

    @property
    def data_offset(self) -> int:
        """First byte after the inode and its inline xattrs (inline tail / chunk indexes follow)."""
        return self.offset + self.inode_size + self.xattr_size

    @property
    def rdev(self) -> int:
        if stat.S_ISCHR(self.mode) or stat.S_ISBLK(self.mode):
            major, minor = decode_rdev(self.u)
            return os.makedev(major, minor)
        return 0

    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


@dataclass(frozen=True)
class DirEntry:
    name: bytes
    nid: int
    file_type: int


class RafsImage:
    """A read-only view of one bootstrap.  Thread-safe for concurrent reads (all caches are idempotent)."""

    def __init__(self, buf, name: str = "image", *, source_fd: int | None = None):
        self.name = name
        self.buf = memoryview(buf) if not isinstance(buf, memoryview) else buf
        self._fd = source_fd
        # per-instance caches (parsed records are immutable, so concurrent fills are harmless)
        self._inode = lru_cache(maxsize=1 << 16)(self._load_inode)
        self._dir_entries = lru_cache(maxsize=4096)(self._load_dir_entries)
        try:
            self._parse_superblock()
        except BadImage as e:  # errors while opening name the image
            msg = str(e)
            raise BadImage(msg if msg.startswith(name) else f"{name}: {msg}") from None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str) -> "RafsImage":
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise BadImage(f"cannot open image {path}: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size < sbf.SB_OFFSET + sbf.SuperBlock.rec_size():
                raise BadImage(f"{path}: too small to be an EROFS/RAFS v6 image ({size} bytes)")
            buf = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        except BadImage:
            os.close(fd)
            raise
        except OSError as e:
            os.close(fd)
            raise BadImage(f"cannot map image {path}: {e.strerror}") from None
        return cls(buf, name=path, source_fd=fd)

    def close(self) -> None:
        self.buf.release()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RafsImage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ bounds-checked access
    def _bytes(self, off: int, n: int, what: str = "data") -> memoryview:
        if off < 0 or n < 0 or off + n > len(self.buf):
            raise BadImage(f"{what} at offset {off} (+{n}) lies outside the image ({len(self.buf)} bytes)")
        return self.buf[off:off + n]

    # ------------------------------------------------------------------ superblock, devices, blobs
    def _parse_superblock(self) -> None:
        sb = sbf.SuperBlock.unpack_from(self.buf, sbf.SB_OFFSET)
        if sb.magic != sbf.EROFS_MAGIC:
            raise BadImage(f"{self.name}: not an EROFS/RAFS v6 image (bad magic 0x{sb.magic:08x})")
        if not 9 <= sb.blkszbits <= 16:
            raise BadImage(f"unsupported block size 2^{sb.blkszbits}")
        self.sb = sb
        self.blksz = 1 << sb.blkszbits
        self.nydus = bool(sb.feature_compat & sbf.COMPAT_RAFS_V6)
        unsupported = sb.feature_incompat & ~sbf.INCOMPAT_SUPPORTED
        if unsupported:
            raise BadImage(f"unsupported EROFS incompatible features 0x{unsupported:x}"
                           " (EROFS-compressed images are not supported)")
        if sb.dirblkbits:
            raise BadImage("unsupported directory block size")
        if sb.feature_compat & sbf.COMPAT_SB_CHKSUM and not self.nydus:
            end = min(self.blksz, len(self.buf))
            data = bytearray(self.buf[sbf.SB_OFFSET:end])
            data[4:8] = b"\0\0\0\0"
            if sbf.crc32c(bytes(data)) != sb.checksum:
                raise BadImage("superblock checksum mismatch")
        self.meta_base = sb.meta_blkaddr * self.blksz
        if self.meta_base >= len(self.buf):
            raise BadImage("inode area starts beyond the end of the image")
        if sb.extra_devices > 255:
            raise BadImage(f"too many devices ({sb.extra_devices})")
        self.ext: sbf.SuperBlockExt | None = None
        if self.nydus:
            self._parse_nydus_ext()
        self.devices = [sbf.DeviceSlot.unpack_from(self.buf, sb.devt_slotoff * 128 + i * 128)
                        for i in range(sb.extra_devices)]
        self.blobs = self._parse_blobs()
        self.long_prefixes = self._parse_long_prefixes()
        root = self.inode(sb.root_nid)
        if not root.is_dir():
            raise BadImage("root inode is not a directory")
        self.root_nid = sb.root_nid

    def _parse_nydus_ext(self) -> None:
        ext = sbf.SuperBlockExt.unpack_from(self.buf, sbf.EXT_SB_OFFSET)
        if ext.flags & sbf.FLAG_TARFS_MODE:
            raise BadImage("tarfs-mode RAFS images are not supported")
        if ext.flags & sbf.FLAG_ENCRYPTION_AES_128_XTS:
            raise BadImage("encrypted RAFS images are not supported")
        if ext.flags & ~sbf.FLAGS_KNOWN:
            raise BadImage(f"unknown RAFS superblock flags 0x{ext.flags & ~sbf.FLAGS_KNOWN:x}")
        cs = ext.chunk_size
        if cs < 4096 or cs > bm.MAX_CHUNK_SIZE or cs & (cs - 1):
            raise BadImage(f"invalid chunk size {cs}")
        size = len(self.buf)
        for what, off, n, unit in (("blob table", ext.blob_table_offset, ext.blob_table_size, bt.BLOB_ENTRY_SIZE),
                                   ("chunk table", ext.chunk_table_offset, ext.chunk_table_size, 80),
                                   ("prefetch table", ext.prefetch_table_offset, ext.prefetch_table_size, 4)):
            if n and off and (n % unit or off + n > size):
                raise BadImage(f"{what} ({off}+{n}) is malformed or outside the image")
        self.ext = ext

    def _parse_blobs(self) -> list[BlobInfo]:
        sb, ext = self.sb, self.ext
        self._chunk_table: ChunkTable | None = None
        if ext is None:  # plain EROFS: extra devices hold uncompressed chunk data
            return [BlobInfo(index=i, blob_id=_tag_id(d.tag), chunk_size=0, chunk_count=0,
                             compressor=bt.COMPRESSOR_NONE, digester=-1, features=0, compressed_size=0,
                             uncompressed_size=d.blocks * self.blksz, device_blocks=d.blocks,
                             mapped_blkaddr=d.mapped_blkaddr, nydus=False)
                    for i, d in enumerate(self.devices)]
        n = ext.blob_table_size // bt.BLOB_ENTRY_SIZE
        if n != sb.extra_devices:
            raise BadImage(f"blob table has {n} entries but the superblock names {sb.extra_devices} devices")
        kws = []
        seen = set()
        for i in range(n):
            e = bt.BlobEntry.unpack_from(self.buf, ext.blob_table_offset + i * bt.BLOB_ENTRY_SIZE)
            try:
                blob_id = e.blob_id.decode("ascii")
            except UnicodeDecodeError:
                raise BadImage(f"blob {i}: id is not ASCII") from None
            try:
                check_blob_id(blob_id)
            except BlobUnavailable:
                raise BadImage(f"blob {i}: invalid id {blob_id!r}") from None
            if blob_id in seen:
                raise BadImage(f"blob {blob_id} listed twice")
            seen.add(blob_id)
            if e.blob_index != i:
                raise BadImage(f"blob {i}: index field says {e.blob_index}")
            dev = self.devices[i]
            if _tag_id(dev.tag) != blob_id:
                raise BadImage(f"blob {i}: device slot tag does not match blob id {blob_id}")
            if e.chunk_count > MAX_IMAGE_CHUNKS:
                raise BadImage(f"blob {blob_id}: too many chunks ({e.chunk_count}, MAX_IMAGE_CHUNKS is "
                               f"{MAX_IMAGE_CHUNKS})")
            if e.compression_algo not in (0, 1, 2, 3) or e.digest_algo not in (0, 1):
                raise BadImage(f"blob {blob_id}: unknown compressor {e.compression_algo} or digest {e.digest_algo}")
            if e.features & bt.FEAT_UNKNOWN_INCOMPAT:
                raise BadImage(f"blob {blob_id}: unknown features 0x{e.features:x}")
            if e.uncompressed_size >= MAX_BLOB_SIZE or e.compressed_size >= MAX_BLOB_SIZE:
                raise BadImage(f"blob {blob_id}: size beyond 2^44 bytes (the chunk-info format's limit)")
            kws.append(dict(
                index=i, blob_id=blob_id, chunk_size=e.chunk_size, chunk_count=e.chunk_count,
                compressor=e.compression_algo, digester=e.digest_algo, features=e.features,
                compressed_size=e.compressed_size, uncompressed_size=e.uncompressed_size,
                ci_compressor=e.ci_compressor, ci_offset=e.ci_offset, ci_compressed_size=e.ci_compressed_size,
                ci_uncompressed_size=e.ci_uncompressed_size, toc_size=e.blob_toc_size,
                toc_digest=e.blob_toc_digest, device_blocks=dev.blocks, mapped_blkaddr=dev.mapped_blkaddr,
                ci_v2=bool(e.features & bt.FEAT_CHUNK_INFO_V2)))
        total = sum(kw["chunk_count"] for kw in kws)
        if total > MAX_IMAGE_CHUNKS:
            raise BadImage(f"image has {total} chunks, more than MAX_IMAGE_CHUNKS ({MAX_IMAGE_CHUNKS})")
        table = None
        if ext.chunk_table_offset and ext.chunk_table_size:
            if ext.chunk_table_size > 80 * MAX_IMAGE_CHUNKS:
                raise BadImage(f"chunk table has more entries than MAX_IMAGE_CHUNKS ({MAX_IMAGE_CHUNKS})")
            raw = bytes(self._bytes(ext.chunk_table_offset, ext.chunk_table_size, "chunk table"))
            table = ChunkTable(raw, [kw["chunk_count"] for kw in kws])
        self._chunk_table = table
        return [BlobInfo(**kw, chunk_table=table) for kw in kws]

    def _parse_long_prefixes(self) -> list[tuple[int, bytes]]:
        """EROFS long xattr name prefixes (INCOMPAT_XATTR_PREFIXES): (base index, infix) per entry."""
        sb = self.sb
        if not sb.feature_incompat & sbf.INCOMPAT_XATTR_PREFIXES or not sb.xattr_prefix_count:
            return []
        if sb.packed_nid:
            raise BadImage("xattr prefixes in a packed inode are not supported")
        pos = sb.xattr_prefix_start * 4
        out = []
        for _ in range(sb.xattr_prefix_count):
            (n,) = struct.unpack_from("<H", self._bytes(pos, 2, "xattr prefix"))
            body = bytes(self._bytes(pos + 2, n, "xattr prefix"))
            if n < 1 or body[0] not in PREFIXES:
                raise BadImage("malformed long xattr prefix")
            out.append((body[0], body[1:]))
            pos = round_up(pos + 2 + n, 4)
        return out

    @property
    def chunk_size(self) -> int:
        return self.ext.chunk_size if self.ext else 0

    @property
    def prefetch_nids(self) -> list[int]:
        ext = self.ext
        if not ext or not ext.prefetch_table_offset or not ext.prefetch_table_size:
            return []
        raw = self._bytes(ext.prefetch_table_offset, ext.prefetch_table_size, "prefetch table")
        out = []
        for (nid,) in struct.iter_unpack("<I", raw):
            if nid == 0:
                break
            out.append(nid)
        return out

    # ------------------------------------------------------------------ inodes
    def inode(self, nid: int) -> Inode:
        return self._inode(nid)

    def _load_inode(self, nid: int) -> Inode:
        if nid < 0 or nid > (len(self.buf) - self.meta_base) // INODE_SLOT:
            raise BadImage(f"inode number {nid} out of range")
        off = self.meta_base + nid * INODE_SLOT
        fmt = struct.unpack_from("<H", self._bytes(off, 2, f"inode {nid}"))[0]
        if fmt & 1:
            r = InodeExtended.unpack_from(self.buf, off)
            ino = Inode(nid, r.mode, r.nlink, r.uid, r.gid, r.size, r.mtime, r.mtime_nsec, (fmt >> 1) & 7, r.u,
                        r.ino, r.xattr_icount, True, off)
        else:
            r = InodeCompact.unpack_from(self.buf, off)
            ino = Inode(nid, r.mode, r.nlink, r.uid, r.gid, r.size, self.sb.build_time + r.mtime,
                        self.sb.build_time_nsec, (fmt >> 1) & 7, r.u, r.ino, r.xattr_icount, False, off)
        if fmt & ~0x1F or (self.nydus and fmt & ~0xF):
            raise BadImage(f"inode {nid}: unsupported format 0x{fmt:x}")
        if ino.layout not in (LAYOUT_FLAT_PLAIN, LAYOUT_FLAT_INLINE, LAYOUT_CHUNK_BASED):
            raise BadImage(f"inode {nid}: unsupported data layout {ino.layout} (EROFS compression)")
        if stat.S_IFMT(ino.mode) not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                                         stat.S_IFIFO, stat.S_IFSOCK):
            raise BadImage(f"inode {nid}: invalid file type in mode 0{ino.mode:o}")
        if ino.size < 0 or ino.size > 1 << 48:
            raise BadImage(f"inode {nid}: absurd size {ino.size}")
        if (ino.is_dir() or ino.is_symlink()) and ino.layout == LAYOUT_CHUNK_BASED:
            raise BadImage(f"inode {nid}: chunk-based directory or symlink")
        if ino.is_symlink() and not 0 < ino.size <= 65536:
            raise BadImage(f"inode {nid}: symlink of size {ino.size}")
        return ino

    # ------------------------------------------------------------------ flat (in-image) data
    def _flat_segments(self, ino: Inode) -> list[tuple[int, int, int]]:
        """(file_offset, image_offset, length) segments of a FLAT_PLAIN/FLAT_INLINE inode's data."""
        size, blk = ino.size, self.blksz
        if ino.layout == LAYOUT_FLAT_INLINE:
            full = size // blk * blk
            tail = size - full
            segs = []
            if full:
                segs.append((0, ino.u * blk, full))
            if tail:
                toff = ino.data_offset
                if toff // blk != (toff + tail - 1) // blk:
                    raise BadImage(f"inode {ino.nid}: inline data crosses a block boundary")
                segs.append((full, toff, tail))
            return segs
        if size == 0:
            return []
        return [(0, ino.u * blk, size)]

    def _read_flat(self, ino: Inode, offset: int, size: int) -> bytes:
        out = []
        end = min(offset + size, ino.size)
        for foff, ioff, n in self._flat_segments(ino):
            lo, hi = max(offset, foff), min(end, foff + n)
            if lo < hi:
                out.append(bytes(self._bytes(ioff + lo - foff, hi - lo, f"data of inode {ino.nid}")))
        return b"".join(out)

    # ------------------------------------------------------------------ directories
    def _dir_block(self, ino: Inode, i: int) -> bytes:
        blk = self.blksz
        n = min(blk, ino.size - i * blk)
        return self._read_flat(ino, i * blk, n)

    def _parse_dir_block(self, ino: Inode, data: bytes) -> list[DirEntry]:
        if len(data) < DIRENT_SIZE:
            raise BadImage(f"directory {ino.nid}: truncated block")
        first = Dirent.unpack_from(data, 0)
        if first.nameoff < DIRENT_SIZE or first.nameoff % DIRENT_SIZE or first.nameoff >= len(data):
            raise BadImage(f"directory {ino.nid}: bad name offset {first.nameoff}")
        n = first.nameoff // DIRENT_SIZE
        # (nid, nameoff, file_type, reserved) per entry, unpacked in one call: directory parsing is most of a walk
        ents = list(Dirent._layout().iter_unpack(data[:n * DIRENT_SIZE]))
        offs = [e[1] for e in ents] + [len(data)]
        base = n * DIRENT_SIZE
        out = []
        for i, (nid, start, ftype, _reserved) in enumerate(ents):
            end = offs[i + 1]
            if not (base <= start < end <= len(data)):
                raise BadImage(f"directory {ino.nid}: bad name offsets")
            name = data[start:end]
            if i + 1 == n:
                name = name.split(b"\0", 1)[0]
            if not name or len(name) > MAX_NAME or b"\0" in name:
                raise BadImage(f"directory {ino.nid}: bad entry name {bytes(name)[:40]!r}")
            out.append(DirEntry(name, nid, ftype))
        return out

    def _check_dir(self, ino: Inode) -> None:
        if not ino.is_dir():
            raise NotADirectory(f"inode {ino.nid} is not a directory")

    def readdir(self, ino: Inode) -> Iterator[DirEntry]:
        """All entries including ``.`` and ``..``, in on-disk order."""
        self._check_dir(ino)
        nblocks = (ino.size + self.blksz - 1) // self.blksz
        for i in range(nblocks):
            yield from self._dir_entries(ino.nid, i)

    def _load_dir_entries(self, nid: int, block: int) -> tuple[DirEntry, ...]:
        ino = self.inode(nid)
        return tuple(self._parse_dir_block(ino, self._dir_block(ino, block)))

    def lookup(self, dir_ino: Inode, name: bytes) -> Inode:
        """Binary search over blocks (by first name), then within the block."""
        self._check_dir(dir_ino)
        nblocks = (dir_ino.size + self.blksz - 1) // self.blksz
        lo, hi = 0, nblocks - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            ents = self._dir_entries(dir_ino.nid, mid)
            if name < ents[0].name:
                hi = mid - 1
            elif name > ents[-1].name:
                lo = mid + 1
            else:
                a, b = 0, len(ents) - 1
                while a <= b:
                    m = (a + b) // 2
                    if ents[m].name == name:
                        return self.inode(ents[m].nid)
                    if ents[m].name < name:
                        a = m + 1
                    else:
                        b = m - 1
                break
        raise NotFound(f"{name.decode(errors='replace')}: no such file or directory")

    def resolve(self, path: str | bytes, follow: bool = False) -> Inode:
        """Look up an absolute or relative path from the root (no symlink following)."""
        if isinstance(path, str):
            path = os.fsencode(path)
        ino = self.inode(self.root_nid)
        for part in path.split(b"/"):
            if part in (b"", b"."):
                continue
            if not ino.is_dir():
                raise NotADirectory(f"{os.fsdecode(path)}: not a directory")
            try:
                ino = self.lookup(ino, part)
            except NotFound:
                raise NotFound(f"{os.fsdecode(path)}: no such file or directory") from None
        return ino

    # ------------------------------------------------------------------ symlinks
    def readlink(self, ino: Inode) -> bytes:
        if not ino.is_symlink():
            raise BadImage(f"inode {ino.nid} is not a symlink")
        if ino.layout == LAYOUT_CHUNK_BASED:
            raise BadImage(f"symlink {ino.nid} has chunk-based data")
        return self._read_flat(ino, 0, ino.size)

    # ------------------------------------------------------------------ xattrs
    def _xattr_entries(self, ino: Inode) -> Iterator[tuple[bytes, memoryview]]:
        if ino.xattr_icount == 0:
            return
        if ino.xattr_icount == 1:
            raise BadImage(f"inode {ino.nid}: xattr area without entries")
        base = ino.offset + ino.inode_size
        end = base + ino.xattr_size
        hdr = XattrIbodyHeader.unpack_from(self._bytes(base, 12, "xattr header"), 0)
        pos = base + 12
        shared_end = pos + hdr.shared_count * 4
        if shared_end > end:
            raise BadImage(f"inode {ino.nid}: shared xattr count overflows the xattr area")
        for (sid,) in struct.iter_unpack("<I", self._bytes(pos, hdr.shared_count * 4, "shared xattr ids")):
            yield self._xattr_at(self.sb.xattr_blkaddr * self.blksz + sid * 4, None, ino)
        pos = shared_end
        while pos < end:
            name, value = self._xattr_at(pos, end, ino)
            yield name, value
            e = XattrEntry.unpack_from(self.buf, pos)
            pos += round_up(4 + e.name_len + e.value_size, 4)

    def _xattr_at(self, pos: int, limit: int | None, ino: Inode) -> tuple[bytes, memoryview]:
        e = XattrEntry.unpack_from(self._bytes(pos, 4, "xattr entry"), 0)
        n = 4 + e.name_len + e.value_size
        if limit is not None and pos + n > limit:
            raise BadImage(f"inode {ino.nid}: xattr entry overflows the xattr area")
        body = self._bytes(pos + 4, e.name_len + e.value_size, "xattr entry")
        suffix = bytes(body[:e.name_len])
        if e.name_index & LONG_PREFIX_FLAG:
            k = e.name_index & 0x7F
            if k >= len(self.long_prefixes):
                raise BadImage(f"inode {ino.nid}: unknown long xattr prefix {k}")
            base, infix = self.long_prefixes[k]
            prefix = PREFIXES[base] + infix
        elif e.name_index in PREFIXES:
            prefix = PREFIXES[e.name_index]
        else:
            raise BadImage(f"inode {ino.nid}: unknown xattr name index {e.name_index}")
        return prefix + suffix, body[e.name_len:]

    def listxattr(self, ino: Inode) -> list[bytes]:
        return [n for n, _ in self._xattr_entries(ino)]

    def getxattr(self, ino: Inode, name: bytes) -> bytes:
        for n, v in self._xattr_entries(ino):
            if n == name:
                return bytes(v)
        raise NoXattr(f"no attribute {name.decode(errors='replace')}")

    def xattrs(self, ino: Inode) -> dict[bytes, bytes]:
        return {n: bytes(v) for n, v in self._xattr_entries(ino)}

    # ------------------------------------------------------------------ chunk maps
    def _chunk_layout(self, ino: Inode) -> tuple[int, int, int, int]:
        """(chunk size, count, index array offset, entry size) of a chunk-based inode."""
        fmt = ino.u & 0xFFFF
        if fmt & ~(CHUNK_FORMAT_BLKBITS_MASK | CHUNK_FORMAT_INDEXES | CHUNK_FORMAT_48BIT) or fmt & CHUNK_FORMAT_48BIT:
            raise BadImage(f"inode {ino.nid}: unsupported chunk format 0x{fmt:x}")
        if self.ext is not None:  # Nydus readers use the filesystem chunk size, whatever the inode says
            cs = self.ext.chunk_size
            if not fmt & CHUNK_FORMAT_INDEXES:
                raise BadImage(f"inode {ino.nid}: RAFS chunk array without indexes")
        else:
            bits = self.sb.blkszbits + (fmt & CHUNK_FORMAT_BLKBITS_MASK)
            if bits > 40:
                raise BadImage(f"inode {ino.nid}: chunk size 2^{bits} too large")
            cs = 1 << bits
        count = (ino.size + cs - 1) // cs
        esize = CHUNK_INDEX_SIZE if fmt & CHUNK_FORMAT_INDEXES else BLOCK_MAP_ENTRY_SIZE
        start = round_up(ino.data_offset, esize)
        self._bytes(start, count * esize, f"chunk indexes of inode {ino.nid}")
        return cs, count, start, esize

    def chunk_size_of(self, ino: Inode) -> int:
        return self._chunk_layout(ino)[0]

    def chunks(self, ino: Inode, first: int = 0, last: int | None = None,
               source: ChunkSource | None = None) -> list[ChunkRef]:
        """The chunks of a regular file (chunk j covers [j*cs, min((j+1)*cs, size))), located in their blobs.

        For Nydus images each chunk's location comes from ``source``'s metadata of the blob (the bootstrap's chunk
        table, or the blob's chunk-info array, which storage reads and keeps) or, without a source, from the
        chunk table alone."""
        if ino.layout != LAYOUT_CHUNK_BASED:
            raise BadImage(f"inode {ino.nid} is not chunk-based")
        cs, count, start, esize = self._chunk_layout(ino)
        last = count - 1 if last is None else min(last, count - 1)
        return [self._chunk_ref(ino, start + j * esize, esize, min(cs, ino.size - j * cs), source)
                for j in range(first, last + 1)]

    def _chunk_ref(self, ino: Inode, off: int, esize: int, length: int, source: ChunkSource | None) -> ChunkRef:
        blk = self.blksz
        if esize == BLOCK_MAP_ENTRY_SIZE:
            (addr,) = struct.unpack_from("<I", self.buf, off)
            if addr == NULL_ADDR:
                return ChunkRef(HOLE, 0, ChunkInfo(0, length, 0, length, False))
            return self._bootstrap_chunk(ino, addr * blk, length)
        ci = ChunkIndex.unpack_from(self.buf, off)
        if self.ext is None:
            if ci.blkaddr == NULL_ADDR:
                return ChunkRef(HOLE, 0, ChunkInfo(0, length, 0, length, False))
            dev = ci.device_id(len(self.devices))
            if dev == 0:
                return self._bootstrap_chunk(ino, ci.blkaddr * blk, length)
            if dev > len(self.blobs):
                raise BadImage(f"inode {ino.nid}: chunk on unknown device {dev}")
            addr = ci.blkaddr * blk
            return ChunkRef(dev - 1, 0, ChunkInfo(addr, length, addr, length, False))
        bidx, cidx = ci.nydus_blob_index, ci.nydus_ci_index
        if not 0 <= bidx < len(self.blobs):
            raise BadImage(f"inode {ino.nid}: chunk refers to unknown blob {bidx}")
        blob = self.blobs[bidx]
        if cidx >= blob.chunk_count:
            raise BadImage(f"inode {ino.nid}: chunk index {cidx} beyond blob's {blob.chunk_count} chunks")
        if source is not None:
            ref = source.meta(blob).chunk_ref(cidx)
        else:
            found = self._chunk_table.chunk(bidx, cidx) if self._chunk_table is not None else None
            if found is None:
                raise BadImage(f"blob {blob.blob_id}: chunk {cidx} is not in the chunk table "
                               "and no blob source was given to read blob.meta")
            ref = ChunkRef(bidx, cidx, check_chunk_info(blob, found[0]), found[1])
        if ref.info.uncompressed_offset != ci.blkaddr * blk or ref.info.uncompressed_size < length:
            raise BadImage(f"inode {ino.nid}: chunk {cidx} of blob {blob.blob_id} "
                           f"disagrees with the blob's chunk information")
        return ref

    def _bootstrap_chunk(self, ino: Inode, addr: int, length: int) -> ChunkRef:
        self._bytes(addr, length, f"data of inode {ino.nid}")
        return ChunkRef(BOOTSTRAP, 0, ChunkInfo(addr, length, addr, length, False))

    def map_range(self, ino: Inode, offset: int, size: int, source: ChunkSource | None = None) -> list[ChunkSlice]:
        """The chunk slices that make up bytes [offset, offset+size) of a regular file, clipped to its size
        (chunks located as :meth:`chunks` does)."""
        if ino.is_dir():
            raise IsADirectory(f"inode {ino.nid} is a directory")
        end = min(offset + size, ino.size)
        if offset >= end:
            return []
        if ino.layout != LAYOUT_CHUNK_BASED:
            return [ChunkSlice(foff + max(0, offset - foff),
                               ChunkRef(BOOTSTRAP, 0, ChunkInfo(ioff, n, ioff, n, False)),
                               max(0, offset - foff), min(end, foff + n) - max(offset, foff))
                    for foff, ioff, n in self._flat_segments(ino) if foff < end and foff + n > offset]
        cs = self._chunk_layout(ino)[0]
        first, last = offset // cs, (end - 1) // cs
        out = []
        for j, ref in enumerate(self.chunks(ino, first, last, source), start=first):
            lo = max(offset, j * cs)
            hi = min(end, (j + 1) * cs)
            out.append(ChunkSlice(lo, ref, lo - j * cs, hi - lo))
        return out

    def chunk_table(self) -> ChunkTable:
        """The bootstrap's legacy chunk table (a mapping (blob index, chunk-info index) -> entry), indexed now
        rather than on the first read (~0.1 s for 50k chunks)."""
        if self._chunk_table is None:
            return ChunkTable(b"", [b.chunk_count for b in self.blobs])
        self._chunk_table.index()
        return self._chunk_table

    # ------------------------------------------------------------------ reading file data
    def read(self, ino: Inode, offset: int, size: int, source: ChunkSource | None) -> bytes:
        """Bytes [offset, offset+size) of a regular file (short at EOF): :meth:`map_range`, then ``source``
        reads the slices (:meth:`rafsfs.storage.source.ChunkSource.read`)."""
        slices = self.map_range(ino, offset, size, source)
        if source is not None:
            return source.read(self.blobs, slices, self._local_slice)
        if any(s.chunk.blob_index >= 0 for s in slices):
            raise BadImage("file data lives in a blob, but no blob source was given")
        return b"".join(bytes(s.length) if s.chunk.blob_index == HOLE else self._local_slice(s) for s in slices)

    def _local_slice(self, s: ChunkSlice) -> bytes:
        """The bytes of a slice stored in the image itself."""
        return bytes(self._bytes(s.chunk.info.uncompressed_offset + s.offset, s.length, "file data"))

    def walk(self, start: int | None = None) -> Iterator[tuple[bytes, Inode]]:
        """Every path (bytes, '/'-rooted) with its inode, depth first.  Each directory is visited once: a directory
        reachable twice (a cycle, or a crafted fan-out) is :class:`BadImage`."""
        root = self.inode(self.root_nid if start is None else start)
        stack: list[tuple[bytes, Inode]] = [(b"/", root)]
        seen_dirs = {root.nid}  # EROFS has no directory hardlinks: a second sighting is a cycle or a fan-out bomb
        yield b"/", root
        while stack:
            path, d = stack.pop()
            subdirs = []
            count = 0
            for e in self.readdir(d):
                count += 1
                if count > _MAX_DIR_ENTRIES:
                    raise BadImage(f"directory {os.fsdecode(path)} has too many entries")
                if e.name in (b".", b".."):
                    continue
                if b"/" in e.name:
                    raise BadImage(f"entry name with a slash in {os.fsdecode(path)}")
                child = self.inode(e.nid)
                cpath = path.rstrip(b"/") + b"/" + e.name
                yield cpath, child
                if child.is_dir():
                    if child.nid in seen_dirs:
                        raise BadImage(f"directory {os.fsdecode(cpath)} is linked more than once (cycle?)")
                    seen_dirs.add(child.nid)
                    subdirs.append((cpath, child))
            stack.extend(reversed(subdirs))


def _tag_id(tag: bytes) -> str:
    return tag.split(b"\0", 1)[0].decode("ascii", errors="replace")
