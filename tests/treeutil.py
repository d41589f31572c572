"""Trees for round-trip tests: make a tree with every awkward thing in it, snapshot a tree, compare two trees.

Paths are bytes throughout (``os.fsencode``), so names that are not UTF-8 work.  Snapshot keys are '/'-rooted paths
relative to the tree root (``b"/"`` is the root itself).  Everything is deterministic (seeded).
"""
from __future__ import annotations

import hashlib
import os
import random
import socket
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20

# mtimes used in the tricky tree (ns); 2**31 + 5 needs more than a signed 32-bit seconds field
MTIME_ZERO = 0
MTIME_ONE = 1_000_000_000
MTIME_2038 = (2**31 + 5) * 1_000_000_000
MTIME_NSEC = 1_700_000_000_123_456_789
MTIME_DEFAULT = 1_600_000_000_000_000_000  # everything not set otherwise
MTIME_DIR = 1_650_000_000_987_654_321

UNICODE_NAMES = ["héllo wörld", "日本語のファイル", "emoji-🎉🐍", "Ελληνικά", "zero\u200bwidth"]
NON_UTF8_NAME = b"bad-\xff\xfe-name"
LONG_SYMLINK_TARGET = ("t" * 99 + "/") * 10  # 1000 bytes


def _rand(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _write(path: Path | bytes, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.chmod(path, mode)


def _acl_bytes(scratch: Path) -> tuple[bytes, bytes] | None:
    """Valid (access, default) ACL xattr values, made by setfacl on a scratch dir; None if ACLs are unavailable."""
    d = scratch / ".acl-probe"
    d.mkdir()
    try:
        subprocess.run(["setfacl", "-m", "u:1234:rx,g:5678:r,m:rx", str(d)], check=True, capture_output=True)
        subprocess.run(["setfacl", "-d", "-m", "u::rwx,g::rx,o::-,u:1234:rwx,m:rwx", str(d)], check=True,
                       capture_output=True)
        return os.getxattr(d, "system.posix_acl_access"), os.getxattr(d, "system.posix_acl_default")
    except (OSError, subprocess.CalledProcessError, FileNotFoundError):
        return None
    finally:
        subprocess.run(["setfacl", "-b", "-k", str(d)], capture_output=True)
        d.rmdir()


def make_small_tree(root: Path) -> None:
    """A small tree (dirs, files, symlinks, xattrs) for fuzzing: a few KiB of image."""
    root.mkdir(parents=True)
    (root / "dir" / "sub").mkdir(parents=True)
    _write(root / "a.txt", b"hello world\n" * 3)
    _write(root / "dir" / "b.bin", _rand(7, 5000))
    _write(root / "dir" / "sub" / "c", b"")
    _write(root / "dir" / "big", _rand(8, 9000))
    os.symlink("a.txt", root / "link")
    os.symlink("../a.txt", root / "dir" / "uplink")
    os.mkfifo(root / "fifo")
    for p in (root / "a.txt", root / "dir" / "b.bin", root / "dir" / "big", root / "dir"):
        os.setxattr(p, "user.shared", b"same value everywhere")  # on > 2 inodes: mkfs.erofs shares it
    os.setxattr(root / "a.txt", "user.own", b"x" * 40)
    os.setxattr(root / "dir", "trusted.t", b"dir attr")
    for p in sorted(root.rglob("*"), reverse=True):
        os.utime(p, ns=(MTIME_DEFAULT, MTIME_DEFAULT), follow_symlinks=False)
    os.utime(root, ns=(MTIME_DIR, MTIME_DIR))


def make_tricky_tree(root: Path, *, name_max: int = 255) -> None:
    """Every file type, xattr namespace, size class, mode bit and timestamp oddity a builder has to get right.

    Needs root (device nodes, trusted.* xattrs, chown).  ``root`` must not exist yet.  ``name_max`` is the length of
    the long names (255, the EROFS limit; Debian's mkfs.erofs 1.5 fails on 255-byte names with ENOENT, so trees
    for it use 254).
    """
    root = Path(root)
    root.mkdir(parents=True)
    r = root

    # ---- regular files of awkward sizes, non-repetitive content
    (r / "sizes").mkdir()
    for i, n in enumerate([0, 1, 4095, 4096, 4097, MiB + 1, 3 * MiB + 12345]):
        _write(r / "sizes" / f"size-{n}", _rand(100 + i, n))
    _write(r / "empty", b"")

    # ---- sparse: 4 MiB, data at 0 and at 3 MiB, holes elsewhere
    fd = os.open(r / "sparse", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, _rand(200, 10000), 0)
        os.pwrite(fd, _rand(201, 5000), 3 * MiB)
        os.ftruncate(fd, 4 * MiB)
    finally:
        os.close(fd)

    # ---- special files
    (r / "dev").mkdir()
    os.mknod(r / "dev" / "null-like", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(r / "dev" / "chr-big-minor", stat.S_IFCHR | 0o600, os.makedev(240, 70000))
    os.mknod(r / "dev" / "loop0-like", stat.S_IFBLK | 0o660, os.makedev(7, 0))
    os.mknod(r / "dev" / "blk-odd", stat.S_IFBLK | 0o640, os.makedev(259, 3))
    os.mkfifo(r / "dev" / "fifo", 0o620)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(r / "dev" / "sock"))
    finally:
        s.close()
    os.chmod(r / "dev" / "sock", 0o755)

    # ---- symlinks
    (r / "links").mkdir()
    os.symlink("../sizes/size-4096", r / "links" / "relative")
    os.symlink("/etc/hostname", r / "links" / "absolute")
    os.symlink("does/not/exist", r / "links" / "dangling")
    os.symlink(LONG_SYMLINK_TARGET, r / "links" / "long-target")
    os.symlink(".", r / "links" / "self-dir")
    os.symlink("x", r / "links" / "one-char")

    # ---- hardlinks: 3 names in 3 dirs
    (r / "hl" / "a").mkdir(parents=True)
    (r / "hl" / "b").mkdir()
    _write(r / "hl" / "a" / "one", _rand(300, 20000))
    os.link(r / "hl" / "a" / "one", r / "hl" / "b" / "two")
    os.link(r / "hl" / "a" / "one", r / "three")
    # a second group, of an empty file
    _write(r / "hl" / "empty-1", b"")
    os.link(r / "hl" / "empty-1", r / "hl" / "empty-2")

    # ---- a big directory (many dirent blocks), with names of varied length
    (r / "bigdir").mkdir()
    rnd = random.Random(400)
    for i in range(3000):
        name = f"e{i:04d}-" + "n" * rnd.randrange(0, 40)
        if i % 500 == 0:
            _write(r / "bigdir" / name, f"entry {i}\n".encode())
        elif i % 7 == 0:
            os.symlink(f"target-{i}", r / "bigdir" / name)
        else:
            _write(r / "bigdir" / name, b"")

    # ---- names
    (r / "names").mkdir()
    _write(r / "names" / ("L" * name_max), b"long name\n")
    (r / "names" / ("D" * name_max)).mkdir()
    _write(r / "names" / ("D" * name_max) / ("f" * name_max), b"long dir, long name\n")
    for i, n in enumerate(UNICODE_NAMES):
        _write(r / "names" / n, n.encode() + b"\n")
    _write(os.path.join(os.fsencode(r / "names"), NON_UTF8_NAME), b"not utf-8\n")
    _write(r / "names" / " leading space", b"")
    _write(r / "names" / "-dash", b"")
    _write(r / "names" / "a\nnewline", b"")

    # ---- deep path (20 levels)
    deep = r / "deep"
    for i in range(20):
        deep = deep / f"level{i:02d}"
    deep.mkdir(parents=True)
    _write(deep / "bottom.txt", b"at the bottom\n")

    # ---- modes
    (r / "modes").mkdir()
    for name, mode in [("setuid", 0o4755), ("setgid", 0o2755), ("sticky-file", 0o1644), ("all-bits", 0o7777),
                       ("none", 0o000), ("exec", 0o755), ("private", 0o600)]:
        _write(r / "modes" / name, name.encode(), mode)
    (r / "modes" / "sticky-dir").mkdir()
    (r / "modes" / "setgid-dir").mkdir()

    # ---- owners (> 65535 needs extended inodes)
    (r / "owners").mkdir()
    for name, uid, gid in [("u1234-g5678", 1234, 5678), ("nobody", 65534, 65534), ("big", 100000, 100000),
                           ("mixed", 0, 70000), ("max", 2**32 - 2, 2**31)]:
        _write(r / "owners" / name, name.encode())
        os.chown(r / "owners" / name, uid, gid)
    os.symlink("u1234-g5678", r / "owners" / "link-owned")
    os.chown(r / "owners" / "link-owned", 4321, 8765, follow_symlinks=False)
    (r / "owners" / "dir-owned").mkdir()
    os.chown(r / "owners" / "dir-owned", 100001, 1001)

    # ---- xattrs
    (r / "xattrs").mkdir()
    x = r / "xattrs"
    _write(x / "user", b"u")
    os.setxattr(x / "user", "user.mime_type", b"text/plain")
    os.setxattr(x / "user", "user.comment", b"a comment with \x00 a NUL and \xff high bytes")
    _write(x / "trusted", b"t")
    os.setxattr(x / "trusted", "trusted.overlay.opaque", b"y")
    os.setxattr(x / "trusted", "trusted.md5sum", hashlib.md5(b"t").digest())
    _write(x / "security", b"s")
    os.setxattr(x / "security", "security.rafstest", b"label")
    _write(x / "large", b"l")
    os.setxattr(x / "large", "user.large", _rand(500, 1000))
    _write(x / "empty-value", b"e")
    os.setxattr(x / "empty-value", "user.empty", b"")
    _write(x / "many", b"m")
    for i in range(20):
        os.setxattr(x / "many", f"user.attr{i:02d}", f"value {i}".encode() * (i + 1))
    os.setxattr(x / "many", "user." + "k" * 200, b"long name")
    # the same xattr on several inodes of different types: mkfs.erofs puts it in the shared area
    os.symlink("user", x / "symlink")
    os.mknod(x / "fifo", stat.S_IFIFO | 0o644)
    shared_targets = [x / "user", x / "trusted", x / "security", x / "large", x / "many", x / "empty-value"]
    for p in shared_targets:
        os.setxattr(p, "user.shared", b"shared value")
        os.setxattr(p, "trusted.shared", b"another shared value")
    for p in (x / "symlink", x / "fifo"):  # user.* is not allowed on symlinks and fifos
        os.setxattr(p, "trusted.shared", b"another shared value", follow_symlinks=False)
    os.setxattr(x, "user.on-dir", b"dir value")
    os.setxattr(r / "dev" / "loop0-like", "security.rafstest", b"device label")

    # ---- POSIX ACLs on a directory (set after its children exist, so they do not inherit)
    acl = _acl_bytes(root)
    (r / "acl").mkdir()
    _write(r / "acl" / "child", b"c")
    if acl is not None:
        access, default = acl
        os.setxattr(r / "acl", "system.posix_acl_access", access)
        os.setxattr(r / "acl", "system.posix_acl_default", default)
        _write(r / "acl" / "file-with-acl", b"f")
        os.setxattr(r / "acl" / "file-with-acl", "system.posix_acl_access", access)

    # ---- timestamps: every non-dir gets MTIME_DEFAULT unless set below; dirs get MTIME_DIR last (deepest first)
    for dirpath, dirnames, filenames in os.walk(os.fsencode(r)):
        for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            os.utime(os.path.join(dirpath, n), ns=(MTIME_DEFAULT, MTIME_DEFAULT), follow_symlinks=False)
    (r / "times").mkdir()
    for name, ns in [("zero", MTIME_ZERO), ("one", MTIME_ONE), ("y2038", MTIME_2038), ("nsec", MTIME_NSEC),
                     ("nsec-1", 1_234_567_890_000_000_001), ("now-ish", 1_760_000_000_999_999_999)]:
        _write(r / "times" / name, name.encode())
        os.utime(r / "times" / name, ns=(ns, ns))
    os.symlink("zero", r / "times" / "link")
    os.utime(r / "times" / "link", ns=(MTIME_NSEC, MTIME_NSEC), follow_symlinks=False)
    (r / "times" / "dir-zero").mkdir()

    # modes of directories last-but-one (chmod does not change mtime), then dir mtimes deepest first
    os.chmod(r / "modes" / "sticky-dir", 0o1777)
    os.chmod(r / "modes" / "setgid-dir", 0o2750)
    os.chmod(r / "owners" / "dir-owned", 0o700)
    dirs = [os.fsencode(r)] + [os.path.join(dp, d) for dp, dns, _ in os.walk(os.fsencode(r)) for d in dns
                               if not os.path.islink(os.path.join(dp, d))]
    for d in sorted(dirs, key=lambda p: p.count(b"/"), reverse=True):
        os.utime(d, ns=(MTIME_DIR, MTIME_DIR))
    os.utime(r / "times" / "dir-zero", ns=(0, 0))
    os.utime(r / "times", ns=(MTIME_2038, MTIME_2038))
    os.chmod(r, 0o755)


# ---------------------------------------------------------------------------- snapshots
_TYPES = {stat.S_IFREG: "reg", stat.S_IFDIR: "dir", stat.S_IFLNK: "lnk", stat.S_IFCHR: "chr", stat.S_IFBLK: "blk",
          stat.S_IFIFO: "fifo", stat.S_IFSOCK: "sock"}


@dataclass
class Entry:
    type: str
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    mtime_ns: int
    size: int | None = None  # regular files and symlinks
    sha256: str | None = None  # regular files
    target: bytes | None = None  # symlinks
    rdev: tuple[int, int] | None = None  # (major, minor) of device nodes
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    hardlinks: tuple[bytes, ...] | None = None  # sorted paths sharing this inode, when more than one


def sha256_file(path: bytes | str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _xattrs(path: bytes) -> dict[bytes, bytes]:
    out = {}
    for name in os.listxattr(path, follow_symlinks=False):
        try:
            out[os.fsencode(name)] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:  # pragma: no cover - raced away
            out[os.fsencode(name)] = f"<error {e.errno}>".encode()
    return out


def snapshot_tree(root: Path | str | bytes) -> dict[bytes, Entry]:
    """Path (b"/"-rooted, relative to ``root``) -> :class:`Entry` for ``root`` and everything below it."""
    top = os.fsencode(root)
    out: dict[bytes, Entry] = {}
    inodes: dict[tuple[int, int], list[bytes]] = {}

    def visit(path: bytes, rel: bytes) -> None:
        st = os.lstat(path)
        fmt = stat.S_IFMT(st.st_mode)
        e = Entry(_TYPES.get(fmt, f"?{fmt:o}"), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                  xattrs=_xattrs(path))
        if fmt == stat.S_IFREG:
            e.size, e.sha256 = st.st_size, sha256_file(path)
        elif fmt == stat.S_IFLNK:
            e.target = os.readlink(path)
            e.size = st.st_size
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            e.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        out[rel] = e
        if fmt != stat.S_IFDIR:
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            return
        with os.scandir(path) as it:
            names = sorted(d.name for d in it)
        for n in names:
            visit(os.path.join(path, n), rel.rstrip(b"/") + b"/" + n)

    visit(top, b"/")
    return _mark_hardlinks(out, inodes.values())


def _fmt_path(p: bytes) -> str:
    return repr(os.fsdecode(p)) if not p.isascii() or b"\n" in p else p.decode()


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 120 else s[:117] + "..."


def diff_snapshots(a: dict[bytes, Entry], b: dict[bytes, Entry], *, check_mtime: bool = True,
                   check_dir_mtime: bool = True, check_symlink_mtime: bool = False, mtime_granularity_ns: int = 1,
                   check_owner: bool = True, check_root: bool = True, ignore_xattrs=(),
                   ignore_paths=()) -> list[str]:
    """Differences between two snapshots (``a`` is the expected one), one line each."""
    ignore_x = {os.fsencode(x) for x in ignore_xattrs}
    ignore_p = {os.fsencode(p) for p in ignore_paths}
    diffs: list[str] = []
    for p in sorted(set(a) | set(b)):
        if p in ignore_p or (p == b"/" and not check_root):
            continue
        if p not in b:
            diffs.append(f"{_fmt_path(p)}: missing (expected a {a[p].type})")
            continue
        if p not in a:
            diffs.append(f"{_fmt_path(p)}: unexpected {b[p].type}")
            continue
        ea, eb = a[p], b[p]
        if ea.type != eb.type:
            diffs.append(f"{_fmt_path(p)}: type {ea.type} != {eb.type}")
            continue
        fields = ["mode", "size", "sha256", "target", "rdev", "hardlinks"]
        if check_owner:
            fields += ["uid", "gid"]
        for f in fields:
            va, vb = getattr(ea, f), getattr(eb, f)
            if f == "mode":
                va, vb = oct(va), oct(vb)
            if va != vb:
                diffs.append(f"{_fmt_path(p)}: {f} {_short(va)} != {_short(vb)}")
        want_mtime = check_mtime and (check_dir_mtime if ea.type == "dir" else True) and \
            (check_symlink_mtime if ea.type == "lnk" else True)
        if want_mtime and ea.mtime_ns // mtime_granularity_ns != eb.mtime_ns // mtime_granularity_ns:
            diffs.append(f"{_fmt_path(p)}: mtime_ns {ea.mtime_ns} != {eb.mtime_ns}")
        xa = {k: v for k, v in ea.xattrs.items() if k not in ignore_x}
        xb = {k: v for k, v in eb.xattrs.items() if k not in ignore_x}
        if xa != xb:
            for k in sorted(set(xa) | set(xb)):
                if xa.get(k) != xb.get(k):
                    diffs.append(f"{_fmt_path(p)}: xattr {k.decode(errors='replace')} "
                                 f"{_short(xa.get(k))} != {_short(xb.get(k))}")
    return diffs


def assert_trees_equal(a: Path | str | bytes, b: Path | str | bytes, *, check_mtime: bool = True,
                       check_dir_mtime: bool = True, check_symlink_mtime: bool = False, mtime_granularity_ns: int = 1,
                       check_owner: bool = True, check_root: bool = True, ignore_xattrs=(), ignore_paths=()) -> None:
    """Raise AssertionError listing (up to 20) differences between tree ``a`` (expected) and tree ``b``.

    Compared: the set of paths, type, permission bits incl. setuid/setgid/sticky, uid, gid, mtime (ns; dirs unless
    ``check_dir_mtime=False``; symlinks only with ``check_symlink_mtime=True``; ``mtime_granularity_ns`` compares
    ``mtime // granularity`` for readers with coarser clocks), regular-file size and sha256, symlink targets, device
    numbers, all xattrs (except ``ignore_xattrs``), and hardlink groups.
    """
    diffs = diff_snapshots(snapshot_tree(a), snapshot_tree(b), check_mtime=check_mtime,
                           check_dir_mtime=check_dir_mtime, check_symlink_mtime=check_symlink_mtime,
                           mtime_granularity_ns=mtime_granularity_ns, check_owner=check_owner, check_root=check_root,
                           ignore_xattrs=ignore_xattrs, ignore_paths=ignore_paths)
    if diffs:
        raise AssertionError(format_diffs(diffs, f"trees differ between {os.fsdecode(a)} (expected) and "
                                                 f"{os.fsdecode(b)}"))


def snapshot_image(image, source=None) -> dict[bytes, Entry]:
    """The same snapshot as :func:`snapshot_tree`, taken from a :class:`rafsfs.image.RafsImage` through its API
    (``source`` reads blob data).  Lets reader bugs show up without the CLI or a mount."""
    out: dict[bytes, Entry] = {}
    by_nid: dict[int, list[bytes]] = {}
    for path, ino in image.walk():
        fmt = stat.S_IFMT(ino.mode)
        e = Entry(_TYPES.get(fmt, f"?{fmt:o}"), stat.S_IMODE(ino.mode), ino.uid, ino.gid,
                  ino.mtime * 1_000_000_000 + ino.mtime_nsec, xattrs=image.xattrs(ino))
        if fmt == stat.S_IFREG:
            h = hashlib.sha256()
            pos = 0
            while pos < ino.size:
                data = image.read(ino, pos, 4 * MiB, source)
                if not data:
                    raise AssertionError(f"{_fmt_path(path)}: short read at {pos} of {ino.size}")
                h.update(data)
                pos += len(data)
            e.size, e.sha256 = ino.size, h.hexdigest()
        elif fmt == stat.S_IFLNK:
            e.target = image.readlink(ino)
            e.size = len(e.target)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            e.rdev = (os.major(ino.rdev), os.minor(ino.rdev))
        out[path] = e
        if fmt != stat.S_IFDIR:
            by_nid.setdefault(ino.nid, []).append(path)
    return _mark_hardlinks(out, by_nid.values())


def _mark_hardlinks(out: dict[bytes, "Entry"], groups) -> dict[bytes, "Entry"]:
    """Record, on every path of each group of names sharing one inode, the sorted group."""
    for paths in groups:
        if len(paths) > 1:
            group = tuple(sorted(paths))
            for p in paths:
                out[p].hardlinks = group
    return out


def format_diffs(diffs: list[str], what: str) -> str:
    more = f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else ""
    return f"{what} ({len(diffs)} differences):\n  " + "\n  ".join(diffs[:20]) + more
