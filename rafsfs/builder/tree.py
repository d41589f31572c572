"""Tree sources for the builder: a directory on disk, or an OCI layer tarball (tar, tar.gz, tar.zst).

A source is scanned once, in a deterministic order.  Each regular file's data is handed to a callback while the
scan is at that file (a tar stream can only be read in order), so the builder chunks data as it goes.
"""
from __future__ import annotations

import logging
import os
import stat
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

from ..errors import BuildError
from ..format.xattr import split_name

log = logging.getLogger(__name__)

DataSink = Callable[["Node", BinaryIO], None]


@dataclass(eq=False)
class Node:
    """One inode of the tree being built.  A hardlinked inode is one Node referenced from several directories."""

    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    size: int = 0
    rdev_major: int = 0
    rdev_minor: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    target: bytes = b""  # symlink target
    children: dict[bytes, "Node"] = field(default_factory=dict)
    chunks: list[int] = field(default_factory=list)  # chunk-info indexes, one per chunk of a regular file
    blob_index: int = 0  # which blob ``chunks`` index into (a multi-layer build has one blob per layer)
    implicit: bool = False  # a directory a tar only implies (a parent of an entry, no entry of its own)

    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def new_dir(mode: int = 0o755, implicit: bool = False) -> Node:
    return Node(mode=stat.S_IFDIR | mode, implicit=implicit)


def _keep_xattrs(path: str, xattrs: dict[bytes, bytes]) -> dict[bytes, bytes]:
    kept = {}
    for name, value in sorted(xattrs.items()):
        if split_name(name) is None:
            log.warning("%s: xattr %s has no RAFS prefix; skipped", path, name.decode(errors="replace"))
            continue
        kept[name] = value
    return kept


def _check_name(name: bytes, where: str) -> None:
    if name in (b"", b".", b"..") or b"/" in name or b"\0" in name or len(name) > 255:
        raise BuildError(f"{where}: invalid file name {name!r}")


# ---------------------------------------------------------------------------------------------- directory source
def scan_directory(root: str, sink: DataSink) -> Node:
    """Scan a directory tree (not following symlinks), sorted by name bytes; regular-file data goes to ``sink``."""
    try:
        st = os.lstat(root)
    except OSError as e:
        raise BuildError(f"cannot read source {root}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise BuildError(f"source {root} is not a directory")
    dev = st.st_dev
    links: dict[tuple[int, int], Node] = {}
    top = _node_from_stat(os.fsencode(root), st)
    stack: list[tuple[bytes, Node]] = [(os.fsencode(root), top)]
    while stack:
        path, node = stack.pop()
        try:
            names = sorted(os.listdir(path))
        except OSError as e:
            raise BuildError(f"cannot list {os.fsdecode(path)}: {e.strerror}") from None
        subdirs = []
        for name in names:
            p = path + b"/" + name
            try:
                st = os.lstat(p)
            except OSError as e:
                raise BuildError(f"cannot stat {os.fsdecode(p)}: {e.strerror}") from None
            if stat.S_ISDIR(st.st_mode):
                if st.st_dev != dev:
                    log.info("%s: on another filesystem; included anyway", os.fsdecode(p))
                child = _node_from_stat(p, st)
                subdirs.append((p, child))
            else:
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in links:
                    node.children[name] = links[key]
                    continue
                child = _node_from_stat(p, st)
                if st.st_nlink > 1:
                    links[key] = child
                if stat.S_ISREG(st.st_mode):
                    try:
                        with open(p, "rb") as f:
                            sink(child, f)
                    except OSError as e:
                        raise BuildError(f"cannot read {os.fsdecode(p)}: {e.strerror}") from None
            node.children[name] = child
        stack.extend(reversed(subdirs))
    return top


def _node_from_stat(path: bytes, st: os.stat_result) -> Node:
    n = Node(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, mtime=st.st_mtime_ns // 10**9,
             mtime_nsec=st.st_mtime_ns % 10**9, size=st.st_size if not stat.S_ISDIR(st.st_mode) else 0)
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        n.rdev_major, n.rdev_minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    if stat.S_ISLNK(st.st_mode):
        n.target = os.readlink(path)
        n.size = len(n.target)
    try:
        names = os.listxattr(path, follow_symlinks=False)
        xattrs = {os.fsencode(k): os.getxattr(path, k, follow_symlinks=False) for k in names}
    except OSError:
        xattrs = {}
    n.xattrs = _keep_xattrs(os.fsdecode(path), xattrs)
    return n


# ---------------------------------------------------------------------------------------------- tar source
def _open_tar(path: str) -> tuple[tarfile.TarFile, list]:
    closers: list = []
    try:
        f = open(path, "rb")
    except OSError as e:
        raise BuildError(f"cannot read source {path}: {e.strerror}") from None
    closers.append(f)
    magic = f.read(4)
    f.seek(0)
    stream: BinaryIO = f
    if magic == b"\x28\xb5\x2f\xfd":  # zstd frame
        import zstandard

        stream = zstandard.ZstdDecompressor().stream_reader(f)  # type: ignore[assignment]
        closers.append(stream)
        mode = "r|"
    elif magic[:2] == b"\x1f\x8b":
        mode = "r|gz"
    else:
        mode = "r|"
    try:
        tf = tarfile.open(fileobj=stream, mode=mode)
    except (tarfile.TarError, OSError, EOFError) as e:
        for c in closers:
            c.close()
        raise BuildError(f"{path}: not a tar archive ({e})") from None
    return tf, closers


def scan_tar(path: str, sink: DataSink, lower: Callable[[bytes], Node | None] | None = None) -> Node:
    """Scan an OCI layer tarball in archive order.  Whiteouts (``.wh.*`` files) are kept as they are, the way
    Nydus keeps them in a per-layer image; a later entry for the same path replaces an earlier one.  A hard link
    whose target is not in this archive is looked up with ``lower`` (the layers below, for a multi-layer build).
    Directories the archive only implies are marked ``implicit``."""
    tf, closers = _open_tar(path)
    root = new_dir(implicit=True)
    by_path: dict[bytes, Node] = {b"": root}
    try:
        for m in tf:
            name = os.fsencode(m.name)
            parts = [p for p in name.split(b"/") if p not in (b"", b".")]
            for p in parts:
                if p == b"..":
                    raise BuildError(f"{path}: entry {m.name!r} escapes the archive root")
                _check_name(p, path)
            key = b"/".join(parts)
            if not parts:  # the root itself
                _apply_tar_meta(root, m)
                root.implicit = False
                continue
            parent = _tar_parent(by_path, parts)
            if m.islnk():
                tparts = [p for p in os.fsencode(m.linkname).split(b"/") if p not in (b"", b".")]
                tkey = b"/".join(tparts)
                target = by_path.get(tkey)
                if target is None and lower is not None and b".." not in tparts:
                    target = lower(tkey)
                if target is None or target.is_dir():
                    raise BuildError(f"{path}: hardlink {m.name!r} to missing entry {m.linkname!r}")
                parent.children[parts[-1]] = target
                by_path[key] = target
                continue
            if m.isdir():
                node = by_path.get(key)
                if node is None or not node.is_dir():
                    node = new_dir()
                    parent.children[parts[-1]] = node
                    by_path[key] = node
                _apply_tar_meta(node, m)
                node.implicit = False
                continue
            node = Node(mode=0)
            _apply_tar_meta(node, m)
            if m.isreg():
                node.mode |= stat.S_IFREG
                node.size = m.size
                data = tf.extractfile(m)
                if data is None:
                    raise BuildError(f"{path}: cannot read {m.name!r}")
                sink(node, data)
            elif m.issym():
                node.mode |= stat.S_IFLNK
                node.target = os.fsencode(m.linkname)
                if not node.target:
                    raise BuildError(f"{path}: symlink {m.name!r} has an empty target")
                node.size = len(node.target)
            elif m.ischr() or m.isblk():
                node.mode |= stat.S_IFCHR if m.ischr() else stat.S_IFBLK
                node.rdev_major, node.rdev_minor = m.devmajor, m.devminor
            elif m.isfifo():
                node.mode |= stat.S_IFIFO
            else:
                log.warning("%s: entry %r of unsupported type %r skipped", path, m.name, m.type)
                continue
            parent.children[parts[-1]] = node
            by_path[key] = node
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BuildError(f"{path}: corrupt tar archive ({e})") from None
    except Exception as e:  # zstandard raises its own error type on corrupt streams
        if type(e).__module__.startswith("zstandard") or type(e).__name__ == "ZstdError":
            raise BuildError(f"{path}: corrupt compressed stream ({e})") from None
        raise
    finally:
        tf.close()
        for c in reversed(closers):
            c.close()
    return root


def _tar_parent(by_path: dict[bytes, Node], parts: list[bytes]) -> Node:
    node = by_path[b""]
    for i in range(len(parts) - 1):
        key = b"/".join(parts[:i + 1])
        child = by_path.get(key)
        if child is None or not child.is_dir():
            child = new_dir(implicit=True)
            node.children[parts[i]] = child
            by_path[key] = child
        node = child
    return node


def _apply_tar_meta(node: Node, m: tarfile.TarInfo) -> None:
    node.mode = (node.mode & stat.S_IFMT(node.mode)) | (m.mode & 0o7777)
    node.uid, node.gid = m.uid, m.gid
    mt = m.mtime
    if "mtime" in m.pax_headers:
        try:
            from decimal import Decimal

            d = Decimal(m.pax_headers["mtime"])
            node.mtime, node.mtime_nsec = int(d), int((d - int(d)) * 10**9)
        except Exception:
            node.mtime, node.mtime_nsec = int(mt), 0
    else:
        node.mtime, node.mtime_nsec = int(mt), 0
    if node.mtime < 0:
        node.mtime, node.mtime_nsec = 0, 0
    xattrs = {}
    for k, v in m.pax_headers.items():
        if k.startswith("SCHILY.xattr."):
            raw = v.encode("utf-8", "surrogateescape") if isinstance(v, str) else v
            xattrs[os.fsencode(k[len("SCHILY.xattr."):])] = raw
    node.xattrs = _keep_xattrs(m.name, xattrs)


def scan_source(source: str, sink: DataSink) -> Node:
    if os.path.isdir(source):
        return scan_directory(source, sink)
    if os.path.isfile(source):
        return scan_tar(source, sink)
    raise BuildError(f"source {source} is neither a directory nor a tar archive")
