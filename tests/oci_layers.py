"""Three OCI layers that exercise overlay semantics, and the merged tree they must give.

Layer 0 is a base; layer 1 has no file data (whiteouts, an opaque directory, a chmod); layer 2 replaces files and
directories, deletes one of two hard links, links to a file of layer 0 and adds a tree whose parents the tar only
implies.  ``EXPECTED`` is written out by hand (not computed from the layers), so a merge bug cannot hide in it.
"""
from __future__ import annotations

import gzip
import io
import os
import random
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

T0 = 1_600_000_000


def rand(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


BIG = rand(1, 2_500_000)  # several 1 MiB chunks
TOOL = rand(2, 300_000)


@dataclass
class E:
    """One entry: kind is 'dir', 'file', 'sym', 'link' (hard link to ``target``) or 'fifo'."""

    path: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    mtime: int = T0
    target: str = ""
    uid: int = 0
    gid: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)


def D(path: str, mode: int = 0o755, mtime: int = T0, **kw) -> E:
    return E(path, "dir", mode=mode, mtime=mtime, **kw)


LAYERS: list[list[E]] = [
    [
        D("etc"), E("etc/config", data=b"v1\n"), E("etc/keep", data=b"keep me\n"),
        D("bin"), E("bin/tool", data=TOOL, mode=0o755),
        D("data"), E("data/big", data=BIG), D("data/sub"), E("data/sub/x", data=b"x\n"),
        E("data/sub/y", data=b"y\n", uid=1000, gid=1000),
        D("gone"), E("gone/a", data=b"a\n"), D("gone/b"), E("gone/b/c", data=b"c\n"),
        D("opq"), E("opq/old1", data=b"old\n"), D("opq/olddir"), E("opq/olddir/f", data=b"f\n"),
        E("lnk", "sym", target="etc/keep", mode=0o777),
        E("hl1", data=b"hard\n"), E("hl2", "link", target="hl1"),
        D("dir2file"), E("dir2file/child", data=b"child\n"),
        E("file2dir", data=b"was a file\n"),
        E("emptyfile"),
        E("fifo", "fifo"),
    ],
    [  # no file data: this layer gets no blob
        E(".wh.gone"), E("data/sub/.wh.x"),
        E("opq/.wh..wh..opq"), D("opq/newempty", mtime=T0 + 10),
        D("etc", mode=0o700, mtime=T0 + 20),
    ],
    [
        E("etc/config", data=b"version three, longer\n", mtime=T0 + 30),
        E("dir2file", data=b"now a file\n"),
        D("file2dir"), E("file2dir/inner", data=b"inner\n"),
        E("opq/new", data=b"new\n", xattrs={"user.origin": b"layer2"}),
        E("newdir/nested/file", data=b"implied parents\n"),  # no entries for newdir, newdir/nested
        E("hl3", "link", target="bin/tool"),  # a hard link to a file of layer 0
        E(".wh.hl1"),
        E("data/big2", data=BIG),  # the same bytes as layer 0's data/big, in another blob
    ],
]

# the merged tree, written out by hand; directories implied by a tar have mode 0755, mtime 0
EXPECTED: list[E] = [
    D("etc", mode=0o700, mtime=T0 + 20), E("etc/config", data=b"version three, longer\n", mtime=T0 + 30),
    E("etc/keep", data=b"keep me\n"),
    D("bin"), E("bin/tool", data=TOOL, mode=0o755), E("hl3", "link", target="bin/tool"),
    D("data"), E("data/big", data=BIG), E("data/big2", data=BIG), D("data/sub"),
    E("data/sub/y", data=b"y\n", uid=1000, gid=1000),
    D("opq"), D("opq/newempty", mtime=T0 + 10), E("opq/new", data=b"new\n", xattrs={"user.origin": b"layer2"}),
    E("lnk", "sym", target="etc/keep", mode=0o777),
    E("hl2", data=b"hard\n"),
    E("dir2file", data=b"now a file\n"),
    D("file2dir"), E("file2dir/inner", data=b"inner\n"),
    D("newdir", mtime=0), D("newdir/nested", mtime=0), E("newdir/nested/file", data=b"implied parents\n"),
    E("emptyfile"),
    E("fifo", "fifo"),
]
DELETED = ["gone", "data/sub/x", "opq/old1", "opq/olddir", "hl1"]


def layer_tar(entries: list[E], gz: bool = False) -> bytes:
    """An OCI layer tarball (PAX) holding ``entries`` in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.path)
            ti.mode, ti.mtime, ti.uid, ti.gid = e.mode, e.mtime, e.uid, e.gid
            if e.xattrs:
                ti.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                                  for k, v in e.xattrs.items()}
            data = None
            if e.kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif e.kind == "file":
                ti.size = len(e.data)
                data = io.BytesIO(e.data)
            elif e.kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, e.target
            elif e.kind == "link":
                ti.type, ti.linkname = tarfile.LNKTYPE, e.target
            elif e.kind == "fifo":
                ti.type = tarfile.FIFOTYPE
            tf.addfile(ti, data)
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if gz else raw


def write_layers(dest: Path, gz: bool = False) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, entries in enumerate(LAYERS):
        p = dest / f"layer{i}.tar{'.gz' if gz else ''}"
        p.write_bytes(layer_tar(entries, gz))
        paths.append(p)
    return paths


def make_tree(root: Path, entries: list[E]) -> None:
    """Create ``entries`` under ``root`` (needs root for owners), directory metadata set last."""
    root.mkdir(parents=True)
    dirs = []
    for e in entries:
        p = root / e.path
        p.parent.mkdir(parents=True, exist_ok=True)
        if e.kind == "dir":
            p.mkdir(exist_ok=True)
            dirs.append(e)
            continue
        if e.kind == "file":
            p.write_bytes(e.data)
        elif e.kind == "sym":
            os.symlink(e.target, p)
        elif e.kind == "link":
            os.link(root / e.target, p)
            continue
        elif e.kind == "fifo":
            os.mkfifo(p)
        os.lchown(p, e.uid, e.gid)
        if e.kind != "sym":
            os.chmod(p, e.mode)
        for k, v in e.xattrs.items():
            os.setxattr(p, k, v)
        os.utime(p, ns=(e.mtime * 10**9, e.mtime * 10**9), follow_symlinks=False)
    for e in sorted(dirs, key=lambda d: -d.path.count("/")):
        p = root / e.path
        os.lchown(p, e.uid, e.gid)
        os.chmod(p, e.mode)
        os.utime(p, ns=(e.mtime * 10**9, e.mtime * 10**9))
    assert all(stat.S_ISDIR(os.lstat(root / d.path).st_mode) for d in dirs)


def expected_tree(tmp_path_factory) -> Path:
    """The merged tree the layers must give, written out once per module (its owners need root)."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("the expected tree has owners and needs root")
    root = tmp_path_factory.mktemp("expected") / "tree"
    make_tree(root, EXPECTED)
    return root
