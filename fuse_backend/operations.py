"""pyfuse3 operations over a RafsImage and a ChunkSource: a read-only POSIX filesystem.

Inode numbers are stable: the root is FUSE's ROOT_INODE (1) and every other inode is its EROFS nid + 2, so
hardlinks share one inode number.  The image is immutable, so the kernel may keep entries, attributes and file
data cached for a long time.  Metadata comes from the bootstrap in memory and is answered on the event loop;
file data may need the network, so reads run in worker threads (bounded) and one slow blob never stalls
other files.  The exception: when the composer says the data is local (``inline_max``), reads of small files are
answered on the event loop too, since a thread hop costs more than a small local read (3x the whole-tree read
time, measured).  Errors map to errno in :func:`errno_of`, the one place that does it.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

import pyfuse3
import trio

from rafsfs.errors import RafsError
from rafsfs.image import Inode, RafsImage
from rafsfs.storage.source import ChunkSource

log = logging.getLogger(__name__)

CACHE_TIMEOUT = 24 * 3600.0  # the image never changes under the mount
ATTR_CACHE = 1 << 16  # inodes whose reply attributes are kept (~0.3 KiB each)
DIR_CACHE = 1024  # directories whose entry lists are kept for the next readdir call
READ_THREADS = 32


def errno_of(exc: BaseException) -> int:
    """The errno a FUSE reply carries for an exception raised while serving it: the core's errors carry their
    own (ENOENT, ENODATA, ...); anything else -- the daemon's own OSErrors (EBADF, EMFILE, ENOSPC on its cache
    files) and bugs -- is EIO to the reader, whose read(2) must not report the daemon's trouble as its own."""
    if isinstance(exc, RafsError):
        return exc.errno
    return errno.EIO


@contextmanager
def _fuse_errors(op: str) -> Iterator[None]:
    try:
        yield
    except pyfuse3.FUSEError:
        raise
    except Exception as e:  # every failure becomes an errno, never a crashed request
        code = errno_of(e)
        if code == errno.EIO:  # the reader sees EIO: the log keeps what really happened
            log.error("%s: %s: %s", op, type(e).__name__, e)
        raise pyfuse3.FUSEError(code) from None


class RafsOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, image: RafsImage, source: ChunkSource | None, *, read_threads: int = READ_THREADS,
                 inline_max: int = 0, uid: int | None = None, gid: int | None = None, enable_xattr: bool = True):
        super().__init__()
        self.image = image
        # the config's enable_xattr: False hides every xattr.  ENOSYS, as nydusd answers: the kernel then stops asking
        # and tells readers EOPNOTSUPP itself
        self.enable_xattr = enable_xattr
        self.source = source
        self.limiter = trio.CapacityLimiter(read_threads)
        self.inline_max = inline_max  # files up to this size are read on the event loop (0: never)
        self.root_nid = image.root_nid
        self._uid, self._gid = uid, gid  # override owners (Nydus without EXPLICIT_UID_GID)
        # immutable image: replies are built once per inode / directory and reused (bounded, least recently used out)
        self._attr_of = lru_cache(maxsize=ATTR_CACHE)(self._make_attr)
        self._children = lru_cache(maxsize=DIR_CACHE)(self._load_children)

    # ------------------------------------------------------------------ inode numbers
    def _nid(self, ino: int) -> int:
        return self.root_nid if ino == pyfuse3.ROOT_INODE else ino - 2

    def _ino(self, nid: int) -> int:
        return pyfuse3.ROOT_INODE if nid == self.root_nid else nid + 2

    def _attr(self, node: Inode) -> pyfuse3.EntryAttributes:
        return self._attr_of(node.nid)

    def _make_attr(self, nid: int) -> pyfuse3.EntryAttributes:
        node = self.image.inode(nid)
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._ino(node.nid)
        a.generation = 0
        a.entry_timeout = CACHE_TIMEOUT
        a.attr_timeout = CACHE_TIMEOUT
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid if self._uid is None else self._uid
        a.st_gid = node.gid if self._gid is None else self._gid
        a.st_rdev = node.rdev
        a.st_size = node.size
        a.st_blksize = 4096
        a.st_blocks = (node.size + 511) // 512
        t = node.mtime * 10**9 + node.mtime_nsec
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = t
        return a

    # ------------------------------------------------------------------ metadata
    async def getattr(self, inode: int, ctx=None) -> pyfuse3.EntryAttributes:
        with _fuse_errors("getattr"):
            return self._attr_of(self._nid(inode))

    async def lookup(self, parent_inode: int, name: bytes, ctx=None) -> pyfuse3.EntryAttributes:
        with _fuse_errors("lookup"):
            pnid = self._nid(parent_inode)
            parent = self.image.inode(pnid)
            if name == b".":
                return self._attr(parent)
            return self._attr(self.image.lookup(parent, name))  # '..' is on disk in EROFS directories

    async def opendir(self, inode: int, ctx) -> int:
        with _fuse_errors("opendir"):
            node = self.image.inode(self._nid(inode))
            if not node.is_dir():
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return inode

    def _load_children(self, nid: int) -> tuple[tuple[bytes, int], ...]:
        """(name, nid) of a directory's entries but '.' and '..' (the kernel adds those), in on-disk order."""
        return tuple((e.name, e.nid) for e in self.image.readdir(self.image.inode(nid)) if e.name not in (b".", b".."))

    async def readdir(self, fh: int, start_id: int, token) -> None:
        """readdirplus: every entry goes with its attributes, so a walk needs no lookups.  ``start_id`` is the index
        of the next entry (the kernel asks again, with a larger one, until a reply comes back empty)."""
        with _fuse_errors("readdir"):
            children = self._children(self._nid(fh))
            for i in range(start_id, len(children)):
                name, nid = children[i]
                if not pyfuse3.readdir_reply(token, name, self._attr_of(nid), i + 1):
                    return

    async def releasedir(self, fh: int) -> None:
        pass

    async def readlink(self, inode: int, ctx) -> bytes:
        with _fuse_errors("readlink"):
            node = self.image.inode(self._nid(inode))
            if not node.is_symlink():
                raise pyfuse3.FUSEError(errno.EINVAL)
            return self.image.readlink(node)

    async def getxattr(self, inode: int, name: bytes, ctx) -> bytes:
        if not self.enable_xattr:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        with _fuse_errors("getxattr"):
            return self.image.getxattr(self.image.inode(self._nid(inode)), name)

    async def listxattr(self, inode: int, ctx) -> list[bytes]:
        if not self.enable_xattr:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        with _fuse_errors("listxattr"):
            return self.image.listxattr(self.image.inode(self._nid(inode)))

    async def access(self, inode: int, mode: int, ctx) -> bool:
        return True  # default_permissions: the kernel checks modes itself

    async def statfs(self, ctx) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        total = sum(b.uncompressed_size for b in self.image.blobs) + len(self.image.buf)
        s.f_blocks = total // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = self.image.sb.inos
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # ------------------------------------------------------------------ data
    async def open(self, inode: int, flags: int, ctx) -> pyfuse3.FileInfo:
        with _fuse_errors("open"):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
                raise pyfuse3.FUSEError(errno.EROFS)
            node = self.image.inode(self._nid(inode))
            if stat.S_ISDIR(node.mode):
                raise pyfuse3.FUSEError(errno.EISDIR)
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        with _fuse_errors("read"):
            node = self.image.inode(self._nid(fh))
            if node.size <= self.inline_max:
                return self.image.read(node, off, size, self.source)
            return await trio.to_thread.run_sync(self.image.read, node, off, size, self.source,
                                                 limiter=self.limiter)

    async def release(self, fh: int) -> None:
        pass

    async def forget(self, inode_list) -> None:
        pass
