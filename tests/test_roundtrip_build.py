"""`rafsfs build` end to end: the tricky tree and OCI layer tarballs in, and back out through `rafsfs extract`,
the Python API, fsck.erofs and the kernel.

What the kernel shows of a `--compressor none` image (checked on 6.18, file-backed and loop mounts): everything
assert_trees_equal compares, nanosecond mtimes of files, directories and symlinks included; no option is loosened.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

import treeutil
from conftest import erofs_mount, run_rafsfs_proc
from rafsfs.image import RafsImage
from rafsfs.storage.backend.localfs import LocalFsBackend
from rafsfs.storage.cache.none import DirectChunkSource

MiB = 1 << 20

# name: extra `rafsfs build` arguments
CONFIGS = {
    "none": ["--compressor", "none"],
    "none-64K": ["--compressor", "none", "--chunk-size", "64K"],
    "zstd": ["--compressor", "zstd"],
    "zstd-64K": ["--compressor", "zstd", "--chunk-size", "64K"],
    "lz4": ["--compressor", "lz4", "--chunk-size", "1M"],
    "zstd-sha256": ["--compressor", "zstd", "--digester", "sha256"],
    "lz4-64K-sha256": ["--compressor", "lz4", "--chunk-size", "64K", "--digester", "sha256"],
}
UNCOMPRESSED = ["none", "none-64K"]


class Built:
    def __init__(self, src: Path, out: Path):
        self.src = src
        self.bootstrap = out / "image.boot"
        self.blob_dir = out / "blobs"

    @property
    def blobs(self) -> list[Path]:
        return sorted(self.blob_dir.iterdir()) if self.blob_dir.is_dir() else []

    @property
    def blob(self) -> Path:
        (b,) = self.blobs
        return b

    def source(self):
        return DirectChunkSource(LocalFsBackend(str(self.blob_dir)))


def build(src, out: Path, *extra, check=0):
    out.mkdir(parents=True, exist_ok=True)
    b = Built(Path(src), out)
    p = run_rafsfs_proc("build", src, "--bootstrap", b.bootstrap, "--blob-dir", b.blob_dir, *extra, check=check)
    return b, p


@pytest.fixture(scope="module")
def built(tricky_src, tmp_path_factory) -> dict[str, Built]:
    """The tricky tree built once per configuration (lazily)."""
    base = tmp_path_factory.mktemp("built")

    class Lazy(dict):
        def __missing__(self, name):
            b, _ = build(tricky_src, base / name, *CONFIGS[name])
            self[name] = b
            return b

    return Lazy()


# ---------------------------------------------------------------------------- every configuration
@pytest.mark.parametrize("config", list(CONFIGS))
def test_blob_is_named_by_its_sha256(built, config):
    b = built[config]
    assert len(b.blobs) == 1, f"expected exactly one blob in {b.blob_dir}: {[p.name for p in b.blobs]}"
    assert hashlib.sha256(b.blob.read_bytes()).hexdigest() == b.blob.name
    with RafsImage.open(str(b.bootstrap)) as img:
        assert img.nydus
        assert [x.blob_id for x in img.blobs] == [b.blob.name]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_api_snapshot_equals_source(built, config):
    b = built[config]
    with RafsImage.open(str(b.bootstrap)) as img:
        got = treeutil.snapshot_image(img, b.source())
    diffs = treeutil.diff_snapshots(treeutil.snapshot_tree(b.src), got, check_symlink_mtime=True)
    assert not diffs, treeutil.format_diffs(diffs, f"RafsImage view of the {config} build differs from the source")


@pytest.mark.parametrize("config", list(CONFIGS))
def test_extract_equals_source(built, config, tmp_path):
    b = built[config]
    dest = tmp_path / "out"
    run_rafsfs_proc("extract", b.bootstrap, dest, "--blob-dir", b.blob_dir, check=0)
    treeutil.assert_trees_equal(b.src, dest)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_check_passes(built, config):
    b = built[config]
    p = run_rafsfs_proc("check", b.bootstrap, "--blob-dir", b.blob_dir, check=0)
    assert "Traceback" not in p.stdout + p.stderr


# ---------------------------------------------------------------------------- what other readers say
@pytest.mark.parametrize("config", UNCOMPRESSED)
def test_fsck_erofs(built, config):
    """erofs-utils 1.5's fsck.erofs has --device=X (checked with --help) and reads file data through it."""
    if shutil.which("fsck.erofs") is None:
        pytest.skip("fsck.erofs not installed")
    b = built[config]
    p = subprocess.run(["fsck.erofs", f"--device={b.blob}", str(b.bootstrap)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("config", UNCOMPRESSED)
def test_kernel_mount_equals_source(built, config, tmp_path):
    """File-backed mount: the kernel reads the blob through -o device=<blob file>."""
    b = built[config]
    with erofs_mount(b.bootstrap, tmp_path / "mnt", [b.blob]) as mnt:
        treeutil.assert_trees_equal(b.src, mnt, check_symlink_mtime=True)


def test_kernel_mount_via_mount8_and_loop(built, tmp_path):
    """What README shows: mount(8) puts the bootstrap on a loop device, so the blob must be one too."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    b = built["none"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    loop = subprocess.run(["losetup", "--find", "--show", "--read-only", str(b.blob)], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mount", "-t", "erofs", "-o", f"ro,device={loop}", str(b.bootstrap), str(mnt)], check=True,
                       capture_output=True, text=True)
        try:
            treeutil.assert_trees_equal(b.src, mnt, check_symlink_mtime=True)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)


# ---------------------------------------------------------------------------- determinism and dedup
@pytest.mark.parametrize("config", ["none", "zstd-64K", "lz4"])
def test_build_is_reproducible(built, config, tmp_path):
    first = built[config]
    again, _ = build(first.src, tmp_path / "again", *CONFIGS[config])
    assert again.bootstrap.read_bytes() == first.bootstrap.read_bytes()
    assert [p.name for p in again.blobs] == [p.name for p in first.blobs]
    assert again.blob.read_bytes() == first.blob.read_bytes()


@pytest.mark.parametrize("chunk", ["1M", "64K"])
def test_identical_files_are_stored_once(tmp_path, chunk):
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(5).randbytes(MiB)
    (src / "one").write_bytes(data)
    (src / "two").write_bytes(data)
    (src / "sub").mkdir()
    (src / "sub" / "three").write_bytes(data[:MiB // 2])  # a prefix: shares whole chunks only at 64K
    b, _ = build(src, tmp_path / "out", "--compressor", "none", "--chunk-size", chunk)
    size = b.blob.stat().st_size
    assert size < 2 * MiB, f"blob is {size} bytes: the identical files' chunks were stored twice"
    with RafsImage.open(str(b.bootstrap)) as img:
        src_ = b.source()
        one = img.chunks(img.resolve("/one"), source=src_)
        two = img.chunks(img.resolve("/two"), source=src_)
        assert [(c.blob_index, c.ci_index) for c in one] == [(c.blob_index, c.ci_index) for c in two]
        assert img.read(img.resolve("/two"), 0, MiB, src_) == data
        assert img.read(img.resolve("/sub/three"), 0, MiB, src_) == data[:MiB // 2]


def test_empty_tree(tmp_path):
    """A tree without file data: a bootstrap, and no blob or an empty one; it still reads back."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "empty").write_bytes(b"")
    os.symlink("d", src / "l")
    b, _ = build(src, tmp_path / "out")
    dest = tmp_path / "x"
    run_rafsfs_proc("extract", b.bootstrap, dest, "--blob-dir", b.blob_dir, check=0)
    treeutil.assert_trees_equal(src, dest)


# ---------------------------------------------------------------------------- OCI layer tarballs
def make_layer_tree(root: Path) -> None:
    """What an OCI layer holds: files, dirs, links, devices, whiteouts, xattrs; owners and ns mtimes."""
    root.mkdir()
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_bytes(b"layer\n")
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "usr" / "lib" / "big.so").write_bytes(random.Random(9).randbytes(3 * MiB + 7))
    (root / "usr" / "lib" / "small").write_bytes(b"x")
    os.link(root / "usr" / "lib" / "small", root / "etc" / "small-link")
    os.symlink("../usr/lib/big.so", root / "etc" / "big-link")
    os.symlink("dangling/target", root / "etc" / "dangling")
    (root / "removed-dir").mkdir()
    (root / "removed-dir" / ".wh..wh..opq").write_bytes(b"")  # opaque-directory marker
    (root / "removed-dir" / "kept").write_bytes(b"kept\n")
    (root / "etc" / ".wh.foo").write_bytes(b"")  # whiteout of etc/foo
    (root / ".wh.gone").write_bytes(b"")
    os.mknod(root / "etc" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "etc" / "disk", stat.S_IFBLK | 0o660, os.makedev(8, 0))
    os.mkfifo(root / "etc" / "fifo", 0o600)
    os.chmod(root / "usr" / "lib" / "small", 0o4755)
    os.chown(root / "usr" / "lib" / "small", 1000, 100000)
    os.setxattr(root / "usr" / "lib" / "big.so", "user.origin", b"layer")
    os.setxattr(root / "usr" / "lib" / "big.so", "security.capability",
                bytes.fromhex("0100000200200000000000000000000000000000"))  # cap_net_bind_service+ep (v2)
    os.setxattr(root / "removed-dir", "trusted.overlay.opaque", b"y")
    for i, (dp, dns, fns) in enumerate(sorted(os.walk(root, topdown=False))):
        for n in fns:
            os.utime(os.path.join(dp, n), ns=(0, 1_600_000_000_000_000_000 + i * 1000 + 123), follow_symlinks=False)
    for dp, dns, fns in sorted(os.walk(root, topdown=False), key=lambda t: -t[0].count("/")):
        os.utime(dp, ns=(0, 1_650_000_000_500_000_000))


def tar_of(root: Path, out: Path) -> None:
    """A PAX tar of ``root`` (the way layer tars are made), with exact ns mtimes and SCHILY.xattr headers;
    compression from the suffix (.tar, .tar.gz, .tar.zst)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        paths = [root] + sorted(root.rglob("*"))
        for p in paths:
            arc = "./" if p == root else "./" + str(p.relative_to(root))
            ti = tf.gettarinfo(str(p), arcname=arc)
            st = os.lstat(p)
            ti.uname = ti.gname = ""
            ti.pax_headers["mtime"] = "%d.%09d" % divmod(st.st_mtime_ns, 10**9)
            for name in os.listxattr(p, follow_symlinks=False):
                ti.pax_headers["SCHILY.xattr." + name] = os.getxattr(p, name, follow_symlinks=False).decode(
                    "utf-8", "surrogateescape")
            if ti.isreg():
                with open(p, "rb") as f:
                    tf.addfile(ti, f)
            else:
                tf.addfile(ti)
    raw = buf.getvalue()
    if out.name.endswith(".tar.gz"):
        raw = gzip.compress(raw, mtime=0)
    elif out.name.endswith(".tar.zst"):
        raw = zstandard.ZstdCompressor().compress(raw)
    out.write_bytes(raw)


@pytest.fixture(scope="module")
def layer(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layer") / "tree"
    make_layer_tree(root)
    return root


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tar.zst"])
def test_layer_tarball_roundtrip(layer, tmp_path, suffix):
    tar = tmp_path / f"layer{suffix}"
    tar_of(layer, tar)
    b, _ = build(tar, tmp_path / "out", "--compressor", "zstd")
    dest = tmp_path / "x"
    run_rafsfs_proc("extract", b.bootstrap, dest, "--blob-dir", b.blob_dir, check=0)
    # the tar's entries come back, whiteouts (.wh.*) as the plain files they are in the tar
    treeutil.assert_trees_equal(layer, dest, check_symlink_mtime=True)
    assert (dest / "etc" / ".wh.foo").is_file() and (dest / "removed-dir" / ".wh..wh..opq").is_file()
    run_rafsfs_proc("check", b.bootstrap, "--blob-dir", b.blob_dir, check=0)


def test_layer_tarball_build_is_reproducible(layer, tmp_path):
    tar = tmp_path / "layer.tar.zst"
    tar_of(layer, tar)
    b1, _ = build(tar, tmp_path / "a", "--compressor", "lz4")
    b2, _ = build(tar, tmp_path / "b", "--compressor", "lz4")
    assert b1.bootstrap.read_bytes() == b2.bootstrap.read_bytes()
    assert b1.blob.read_bytes() == b2.blob.read_bytes()


def test_layer_tarball_equals_directory_build(layer, tmp_path):
    """A directory and the tar made from it describe the same tree, so they read back the same."""
    tar = tmp_path / "layer.tar"
    tar_of(layer, tar)
    bt, _ = build(tar, tmp_path / "t", "--compressor", "none")
    bd, _ = build(layer, tmp_path / "d", "--compressor", "none")
    with RafsImage.open(str(bt.bootstrap)) as it, RafsImage.open(str(bd.bootstrap)) as idir:
        diffs = treeutil.diff_snapshots(treeutil.snapshot_image(idir, bd.source()),
                                        treeutil.snapshot_image(it, bt.source()), check_symlink_mtime=True)
    assert not diffs, treeutil.format_diffs(diffs, "tar build differs from directory build")


# ---------------------------------------------------------------------------- bad input
def _assert_one_line_error(p: subprocess.CompletedProcess) -> None:
    assert p.returncode != 0, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr + p.stdout
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{p.stderr}"


def test_build_nonexistent_source(tmp_path):
    _, p = build(tmp_path / "does-not-exist", tmp_path / "out", check=None)
    _assert_one_line_error(p)
    assert not (tmp_path / "out" / "image.boot").exists()


@pytest.mark.parametrize("name,content", [
    ("garbage.tar", random.Random(1).randbytes(5000)),
    ("garbage.tar.gz", random.Random(2).randbytes(5000)),
    ("garbage.tar.zst", random.Random(3).randbytes(5000)),
    ("gz-of-garbage.tar.gz", gzip.compress(random.Random(4).randbytes(5000), mtime=0)),
    ("empty.tar.zst", b""),
])
def test_build_garbage_tarball(tmp_path, name, content):
    src = tmp_path / name
    src.write_bytes(content)
    b, p = build(src, tmp_path / "out", check=None)
    _assert_one_line_error(p)
    assert not b.bootstrap.exists()


def test_build_truncated_tarball(layer, tmp_path):
    tar = tmp_path / "layer.tar"
    tar_of(layer, tar)
    data = tar.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:len(data) // 2 + 100])  # in the middle of big.so's data
    b, p = build(cut, tmp_path / "out", check=None)
    _assert_one_line_error(p)
    assert not b.bootstrap.exists()
    assert b.blobs == [], "a failed build left a blob behind"


def test_build_bad_options(tricky_src, tmp_path):
    for extra in (["--compressor", "brotli"], ["--chunk-size", "1000"], ["--digester", "md5"]):
        _, p = build(tricky_src, tmp_path / "out", *extra, check=None)
        assert p.returncode == 2, (extra, p.stderr)
        assert "Traceback" not in p.stderr
