"""Recreate an image's tree in a local directory: data (sparse), links, device nodes, owners, modes, xattrs, times.

Names and link targets come from an untrusted image, so every file is created relative to a directory fd with
O_NOFOLLOW/O_EXCL (or mkdir/symlink/mknod, which never follow a final symlink): nothing is written outside DEST.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass

from ..errors import BadImage, RafsError
from ..image import Inode, RafsImage
from ..storage.source import ChunkSource
from . import Progress, check_name, file_pieces

log = logging.getLogger(__name__)

SPARSE_BLOCK = 4096  # an all-zero block of this size is skipped (left as a hole) instead of written
_ZERO = bytes(SPARSE_BLOCK)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# setxattr failures that lose one attribute rather than the extraction (unprivileged user, filesystem without xattrs
# or without that namespace, an SELinux label the host policy rejects)
_XATTR_SOFT_ERRNOS = (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL)


@dataclass
class ExtractStats:
    files: int = 0  # regular files written
    dirs: int = 0
    symlinks: int = 0
    special: int = 0  # device nodes, fifos, sockets
    hardlinks: int = 0  # names made with link(2) to an earlier name
    bytes: int = 0  # regular-file bytes (logical size)
    skipped: int = 0  # device nodes that could not be created (unprivileged)
    xattr_failures: int = 0


def prepare_dest(dest: str) -> int:
    """Create DEST or accept an existing empty directory that nobody else can write to (owned by the effective
    user, not group- or other-writable: another user could otherwise swap an entry for a symlink between its
    creation and its chown/chmod); returns an fd of it."""
    try:
        os.mkdir(dest, 0o700)
    except FileExistsError:
        if not os.path.isdir(dest):
            raise RafsError(f"{dest} exists and is not a directory") from None
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise RafsError(f"{dest} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}): "
                            "extract into a directory of your own")
        if st.st_mode & 0o022:
            raise RafsError(f"{dest} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}): "
                            "extract into a directory only you can write to")
        if os.listdir(fd):
            raise RafsError(f"{dest} is not empty")
    except BaseException:
        os.close(fd)
        raise
    return fd


def extract(image: RafsImage, source: ChunkSource | None, dest: str,
            progress: Progress | None = None) -> ExtractStats:
    """Extract the whole tree of ``image`` into ``dest`` (created, or an existing empty directory).

    The root directory's owner, mode, xattrs and mtime are applied to ``dest`` itself.
    """
    dest_fd = prepare_dest(dest)
    try:
        return _Extractor(image, source, dest, dest_fd, progress).run()
    finally:
        os.close(dest_fd)


class _Extractor:
    def __init__(self, image: RafsImage, source: ChunkSource | None, dest: str, dest_fd: int,
                 progress: Progress | None):
        self.image, self.source, self.progress = image, source, progress
        self.dest = os.fsencode(dest)
        self.dest_fd = dest_fd
        self.stats = ExtractStats()
        self.owner = os.geteuid() == 0  # like tar: only root restores owners
        self.proc = os.path.isdir("/proc/self/fd")
        self.links: dict[tuple[str, int], tuple[bytes, bytes]] = {}  # link key -> (parent, name) of the first name
        self.dirs: list[tuple[bytes, Inode]] = []  # directories, for their metadata once their contents exist
        self.warned: set[tuple[bytes, int]] = set()
        self._cur: tuple[bytes, int] | None = None  # cached (parent path, fd)

    # ---------------------------------------------------------------- directory fds
    def _open_dir(self, rel: bytes) -> int:
        """An fd of DEST/rel, walked one component at a time without following symlinks."""
        fd = self.dest_fd
        for comp in rel.split(b"/") if rel else ():
            try:
                nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
            finally:
                if fd != self.dest_fd:
                    os.close(fd)
            fd = nfd
        return fd

    def _parent_fd(self, rel: bytes) -> int:
        if self._cur is not None and self._cur[0] == rel:
            return self._cur[1]
        self._drop_parent()
        fd = self._open_dir(rel)
        self._cur = (rel, fd)
        return fd

    def _drop_parent(self) -> None:
        if self._cur is not None and self._cur[1] != self.dest_fd:
            os.close(self._cur[1])
        self._cur = None

    # ---------------------------------------------------------------- the walk
    def run(self) -> ExtractStats:
        try:
            names: tuple[bytes, set[bytes]] = (b"", set())  # names seen in the current directory
            for path, ino in self.image.walk():  # visits each directory once; its entries come together
                if path == b"/":
                    self.dirs.append((b"", ino))
                    continue
                parent, _, name = path[1:].rpartition(b"/")
                check_name(name, path)
                if names[0] != parent:
                    names = (parent, set())
                if name in names[1]:
                    raise BadImage(f"{os.fsdecode(path)}: the image has two entries of this name")
                names[1].add(name)
                self._guard(self._create, parent, name, ino)
                if self.progress:
                    self.progress.update(self.stats.bytes, files=self.stats.files)
            # directories last and deepest first, so writing their contents does not change their times
            self.dirs.sort(key=lambda d: d[0].count(b"/") + 1 if d[0] else 0, reverse=True)
            for rel, ino in self.dirs:
                parent, _, name = rel.rpartition(b"/")
                self._guard(self._apply_meta, parent, name or b".", ino)
        finally:
            self._drop_parent()
        return self.stats

    def _guard(self, fn, parent: bytes, name: bytes, ino: Inode) -> None:
        """Call fn(parent, name, ino); an OSError is re-raised naming the full destination path."""
        try:
            fn(parent, name, ino)
        except OSError as e:
            e.filename = os.fsdecode(os.path.join(self.dest, parent, name) if name != b"." else self.dest)
            e.filename2 = None
            raise

    def _link_key(self, ino: Inode) -> tuple[str, int] | None:
        if ino.is_dir() or ino.nlink < 2:
            return None
        if self.image.nydus and ino.ino:  # legacy Nydus images: separate inodes sharing i_ino are one file
            return ("ino", ino.ino)
        return ("nid", ino.nid)

    def _create(self, parent: bytes, name: bytes, ino: Inode) -> None:
        fd = self._parent_fd(parent)
        key = self._link_key(ino)
        if key is not None and key in self.links:
            src_parent, src_name = self.links[key]
            src_fd = self._open_dir(src_parent)
            try:
                os.link(src_name, name, src_dir_fd=src_fd, dst_dir_fd=fd, follow_symlinks=False)
            finally:
                if src_fd != self.dest_fd:
                    os.close(src_fd)
            self.stats.hardlinks += 1
            return
        fmt = stat.S_IFMT(ino.mode)
        if fmt == stat.S_IFDIR:
            os.mkdir(name, 0o700, dir_fd=fd)  # owner-writable until its contents are in; mode applied last
            self.dirs.append((parent + b"/" + name if parent else name, ino))
            self.stats.dirs += 1
            return
        if fmt == stat.S_IFREG:
            self._write_file(fd, parent, name, ino)  # its metadata too, through its own fd
            self.stats.files += 1
            if key is not None:
                self.links[key] = (parent, name)
            return
        elif fmt == stat.S_IFLNK:
            target = self.image.readlink(ino)
            if b"\0" in target:
                raise BadImage(f"symlink inode {ino.nid}: target contains a NUL byte")
            os.symlink(target, name, dir_fd=fd)
            self.stats.symlinks += 1
        elif fmt == stat.S_IFIFO:
            os.mkfifo(name, 0o600, dir_fd=fd)
            self.stats.special += 1
        else:  # character/block device or socket
            try:
                os.mknod(name, fmt | 0o600, ino.rdev, dir_fd=fd)
            except PermissionError:
                log.warning("%s: cannot create %s node without privileges; skipped",
                            os.fsdecode(os.path.join(parent, name)), "socket" if fmt == stat.S_IFSOCK else "device")
                self.stats.skipped += 1
                return
            self.stats.special += 1
        self._apply_meta(parent, name, ino)
        if key is not None:
            self.links[key] = (parent, name)

    # ---------------------------------------------------------------- data
    def _write_file(self, dir_fd: int, parent: bytes, name: bytes, ino: Inode) -> None:
        """Create, fill and apply the metadata of a regular file, all through the one fd that created it (O_EXCL,
        O_NOFOLLOW): no name is looked up again, so nothing put in its place can be reached, and it costs no
        extra system calls (by name, the mode alone took four: open O_PATH, fstat, chmod, close)."""
        fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=dir_fd)
        try:
            for off, n, data in file_pieces(self.image, ino, self.source):
                if data is not None:
                    _write_sparse(fd, off, data)
                self.stats.bytes += n
                if self.progress:
                    self.progress.update(self.stats.bytes, files=self.stats.files)
            os.ftruncate(fd, ino.size)
            self._apply_meta(parent, name, ino, node_fd=fd)
        finally:
            os.close(fd)

    # ---------------------------------------------------------------- metadata
    def _apply_meta(self, parent: bytes, name: bytes, ino: Inode, node_fd: int | None = None) -> None:
        """Owner first (chown clears setuid/setgid and drops security.capability), then xattrs (while the node is
        still writable for an unprivileged user), then mode, then times.  ``name`` is b"." for DEST itself.
        ``node_fd``: an fd of the node itself (a regular file being written), used instead of its name."""
        fd = self._parent_fd(parent)
        if self.owner:
            if node_fd is not None:
                os.fchown(node_fd, ino.uid, ino.gid)
            else:
                os.chown(name, ino.uid, ino.gid, dir_fd=fd, follow_symlinks=False)
        xattrs = self.image.xattrs(ino)
        if xattrs:
            self._set_xattrs(fd, parent, name, ino, xattrs, node_fd)
        if node_fd is not None:
            os.fchmod(node_fd, stat.S_IMODE(ino.mode))
        elif not ino.is_symlink():  # a symlink's mode means nothing
            self._chmod(fd, parent, name, stat.S_IMODE(ino.mode))
        ns = ino.mtime * 1_000_000_000 + ino.mtime_nsec
        try:
            if node_fd is not None:
                os.utime(node_fd, ns=(ns, ns))
            else:
                os.utime(name, ns=(ns, ns), dir_fd=fd, follow_symlinks=False)
        except OverflowError:
            log.warning("%s: mtime %d out of range; not set", os.fsdecode(os.path.join(parent, name)), ino.mtime)

    def _chmod(self, fd: int, parent: bytes, name: bytes, mode: int) -> None:
        """chmod the node we made, never what a symlink in its place points to: open it O_PATH|O_NOFOLLOW (a
        symlink is then the link itself, refused) and chmod that very inode through /proc/self/fd."""
        if not self.proc:
            os.chmod(name, mode, dir_fd=fd)
            return
        pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        try:
            if stat.S_ISLNK(os.fstat(pfd).st_mode):
                raise RafsError(f"{os.fsdecode(os.path.join(self.dest, parent, name))}: replaced by a symbolic "
                                "link during extraction; mode not set")
            os.chmod(f"/proc/self/fd/{pfd}", mode)
        finally:
            os.close(pfd)

    def _set_xattrs(self, fd: int, parent: bytes, name: bytes, ino: Inode, xattrs: dict[bytes, bytes],
                    node_fd: int | None = None) -> None:
        # setxattr has no dir_fd form: the node's own fd when there is one, else reach the entry through the
        # directory fd's /proc link (never through a symlink: follow_symlinks=False applies to the last component,
        # and the fd pins the directory)
        path = b"/proc/self/fd/%d/%s" % (fd, name) if self.proc else os.path.join(self.dest, parent, name)
        # Linux allows user.* only on regular files and directories
        user_ok = ino.is_reg() or ino.is_dir()
        for xname, value in xattrs.items():
            if b"\0" in xname:
                raise BadImage(f"inode {ino.nid}: xattr name contains a NUL byte")
            if xname.startswith(b"user.") and not user_ok:
                continue
            try:
                if node_fd is not None:
                    os.setxattr(node_fd, xname, value)
                else:
                    os.setxattr(path, xname, value, follow_symlinks=False)
            except OSError as e:
                if e.errno not in _XATTR_SOFT_ERRNOS:
                    raise
                self.stats.xattr_failures += 1
                ns = xname.split(b".", 1)[0]
                if (ns, e.errno) not in self.warned:
                    self.warned.add((ns, e.errno))
                    log.warning("cannot set %s.* xattrs (%s, first on %s); further failures not shown",
                                os.fsdecode(ns), e.strerror, os.fsdecode(os.path.join(parent, name)))


def _write_sparse(fd: int, off: int, data: bytes) -> None:
    """pwrite ``data`` at ``off``, leaving every all-zero SPARSE_BLOCK unwritten (a hole once truncated to size)."""
    n = len(data)
    view = memoryview(data)
    i = 0
    while i < n:
        while i < n and data[i:i + SPARSE_BLOCK] == _ZERO[:min(SPARSE_BLOCK, n - i)]:
            i += SPARSE_BLOCK
        j = i
        while j < n and data[j:j + SPARSE_BLOCK] != _ZERO[:min(SPARSE_BLOCK, n - j)]:
            j += SPARSE_BLOCK
        j = min(j, n)
        pos = i
        while pos < j:
            w = os.pwrite(fd, view[pos:j], off + pos)
            if w <= 0:
                raise OSError(errno.EIO, "short write")
            pos += w
        i = j
