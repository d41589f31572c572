"""Images made by Debian's mkfs.erofs 1.5 from the tricky tree, read back by rafsfs (API and `rafsfs extract`) and by
the kernel.

Notes on mkfs.erofs 1.5 (checked, not assumed):
* it fails with ENOENT ("Could not format the device") on 255-byte names, so these trees use 254-byte long names;
* ``--preserve-mtime`` stores every inode whose mtime differs from the build time as an extended inode, with
  nanoseconds; ``--ignore-mtime`` makes compact inodes (mtime = the superblock's build time) where uid/gid allow;
* ``-E noinline_data`` stops tail-packing of regular files only: directories and symlinks stay FLAT_INLINE;
* xattrs used by more than 2 inodes (``-x`` default 2) go to the shared xattr area;
* ``--chunksize=65536 --blobdev=BLOB`` writes chunk-based regular files whose data lives in BLOB (device 1, block
  map entries of 4 bytes), and identical chunks are stored once.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import treeutil
from conftest import erofs_mount, run_rafsfs_proc
from rafsfs.format.inode import LAYOUT_CHUNK_BASED, LAYOUT_FLAT_INLINE, LAYOUT_FLAT_PLAIN
from rafsfs.format.xattr import XattrIbodyHeader
from rafsfs.image import RafsImage
from rafsfs.storage.backend.localfs import LocalFsBackend
from rafsfs.storage.cache.none import DirectChunkSource

pytestmark = pytest.mark.skipif(shutil.which("mkfs.erofs") is None, reason="mkfs.erofs (erofs-utils) not installed")

VARIANTS = {
    # name: (mkfs.erofs options, has a blob device, keeps mtimes)
    "plain": (["--preserve-mtime", "-Enoinline_data"], False, True),
    "inline": (["--preserve-mtime"], False, True),
    "chunked": (["--preserve-mtime", "--chunksize=65536"], True, True),
    "compact": (["--ignore-mtime"], False, False),
}


class Built:
    def __init__(self, src: Path, image: Path, blob: Path | None):
        self.src, self.image, self.blob = src, image, blob

    @property
    def device_args(self) -> list[str]:
        return ["--device", str(self.blob)] if self.blob else []

    @property
    def devices(self) -> list[Path]:
        return [self.blob] if self.blob else []

    def source(self):
        return DirectChunkSource(LocalFsBackend(devices=[str(d) for d in self.devices])) if self.blob else None


@pytest.fixture(scope="module")
def mkfs_src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mkfs-tree") / "src"
    treeutil.make_tricky_tree(root, name_max=254)
    return root


@pytest.fixture(scope="module")
def mkfs_images(mkfs_src, tmp_path_factory) -> dict[str, Built]:
    out = tmp_path_factory.mktemp("mkfs-images")
    built = {}
    for name, (opts, has_blob, _) in VARIANTS.items():
        img = out / f"{name}.erofs"
        blob = out / f"{name}.blob" if has_blob else None
        cmd = ["mkfs.erofs", "--quiet", *opts] + ([f"--blobdev={blob}"] if blob else []) + [str(img), str(mkfs_src)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        assert p.returncode == 0, f"{' '.join(cmd)} failed: {p.stderr}"
        built[name] = Built(mkfs_src, img, blob)
    return built


@pytest.fixture(params=list(VARIANTS))
def variant(request, mkfs_images):
    return request.param, mkfs_images[request.param], VARIANTS[request.param][2]


# ---------------------------------------------------------------------------- the images are what we think
def test_images_exercise_what_they_should(mkfs_images):
    def stats(b: Built):
        with RafsImage.open(str(b.image)) as img:
            layouts: dict[int, int] = {}
            reg_layouts: dict[int, int] = {}
            extended = compact = shared = 0
            for _, ino in img.walk():
                layouts[ino.layout] = layouts.get(ino.layout, 0) + 1
                if ino.is_reg():
                    reg_layouts[ino.layout] = reg_layouts.get(ino.layout, 0) + 1
                extended += ino.extended
                compact += not ino.extended
                if ino.xattr_icount:
                    shared += XattrIbodyHeader.unpack_from(img.buf, ino.offset + ino.inode_size).shared_count > 0
            return reg_layouts, extended, compact, shared, len(img.blobs)

    reg, ext, comp, shared, nblobs = stats(mkfs_images["plain"])
    assert LAYOUT_FLAT_INLINE not in reg and LAYOUT_FLAT_PLAIN in reg
    assert comp == 0 and shared > 0 and nblobs == 0
    reg, *_ = stats(mkfs_images["inline"])
    assert reg.get(LAYOUT_FLAT_INLINE, 0) > 10
    reg, _, _, _, nblobs = stats(mkfs_images["chunked"])
    assert reg.get(LAYOUT_CHUNK_BASED, 0) > 10 and nblobs == 1
    _, ext, comp, _, _ = stats(mkfs_images["compact"])
    assert comp > 3000 and 0 < ext < 20  # only the inodes whose uid/gid do not fit 16 bits


# ---------------------------------------------------------------------------- the comparator itself
def test_comparator_detects_differences(mkfs_src, tmp_path):
    """assert_trees_equal must see every kind of change it claims to compare."""
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(mkfs_src), str(copy)], check=True)
    treeutil.assert_trees_equal(mkfs_src, copy)  # cp -a keeps everything we look at
    with open(copy / "sizes" / "size-4097", "r+b") as f:
        f.seek(4096)
        last = f.read(1)[0]
        f.seek(4096)
        f.write(bytes([last ^ 1]))
    os.utime(copy / "sizes" / "size-4097", ns=(treeutil.MTIME_DEFAULT, treeutil.MTIME_DEFAULT))
    os.chmod(copy / "modes" / "setuid", 0o755)
    os.utime(copy / "times" / "nsec", ns=(0, treeutil.MTIME_NSEC + 1))
    os.chown(copy / "owners" / "big", 100000, 100001)
    os.setxattr(copy / "xattrs" / "user", "user.mime_type", b"text/html")
    os.removexattr(copy / "acl", "system.posix_acl_default")
    os.unlink(copy / "links" / "dangling")
    os.symlink("does/not/exist2", copy / "links" / "dangling")
    os.unlink(copy / "three")
    shutil.copy2(copy / "hl" / "a" / "one", copy / "three")
    (copy / "new-file").write_bytes(b"")
    os.unlink(copy / "dev" / "fifo")
    os.utime(copy / "deep", ns=(0, 1))
    with pytest.raises(AssertionError) as ei:
        treeutil.assert_trees_equal(mkfs_src, copy)
    msg = str(ei.value)
    for needle in ["/sizes/size-4097: sha256", "/modes/setuid: mode", "/times/nsec: mtime_ns",
                   "/owners/big: gid", "/xattrs/user: xattr user.mime_type", "/acl: xattr system.posix_acl_default",
                   "/links/dangling: target", "/three: hardlinks", "/new-file: unexpected", "/dev/fifo: missing",
                   "/deep: mtime_ns"]:
        assert needle in msg, f"{needle!r} not reported in:\n{msg}"
    # and the options that loosen it do exactly that
    diffs = treeutil.diff_snapshots(treeutil.snapshot_tree(mkfs_src), treeutil.snapshot_tree(copy),
                                    check_dir_mtime=False, ignore_xattrs=["system.posix_acl_default"])
    assert not any("/deep:" in d or "posix_acl_default" in d for d in diffs)
    assert any("/times/nsec: mtime_ns" in d for d in diffs)


def test_kernel_mount_of_plain_image_equals_source(mkfs_images, tmp_path):
    """The kernel is the reference reader: if this fails, the comparator (or the tree) is wrong, not rafsfs."""
    b = mkfs_images["plain"]
    with erofs_mount(b.image, tmp_path / "mnt") as mnt:
        treeutil.assert_trees_equal(b.src, mnt)


@pytest.mark.parametrize("name", ["inline", "chunked"])
def test_kernel_mount_of_other_images_equals_source(mkfs_images, tmp_path, name):
    b = mkfs_images[name]
    with erofs_mount(b.image, tmp_path / "mnt", b.devices) as mnt:
        treeutil.assert_trees_equal(b.src, mnt)


# ---------------------------------------------------------------------------- rafsfs reads them
def test_api_snapshot_equals_source(variant):
    """RafsImage through its Python API (no CLI, no mount) sees exactly the source tree."""
    name, b, keeps_mtime = variant
    src = b.source()
    with RafsImage.open(str(b.image)) as img:
        got = treeutil.snapshot_image(img, src)
    diffs = treeutil.diff_snapshots(treeutil.snapshot_tree(b.src), got, check_mtime=keeps_mtime,
                                    check_symlink_mtime=keeps_mtime)
    assert not diffs, treeutil.format_diffs(diffs, f"RafsImage view of the {name} image differs from the source")


def test_api_snapshot_of_compact_image_equals_kernel(mkfs_images, tmp_path):
    """Compact inodes take their mtime from the superblock: the kernel is the oracle for what that means."""
    b = mkfs_images["compact"]
    with RafsImage.open(str(b.image)) as img:
        got = treeutil.snapshot_image(img)
    with erofs_mount(b.image, tmp_path / "mnt") as mnt:
        want = treeutil.snapshot_tree(mnt)
    diffs = treeutil.diff_snapshots(want, got, check_symlink_mtime=True)
    assert not diffs, treeutil.format_diffs(diffs, "RafsImage view of the compact image differs from the kernel's")


def test_extract_equals_source(variant, tmp_path):
    name, b, keeps_mtime = variant
    dest = tmp_path / "out"
    run_rafsfs_proc("extract", b.image, dest, *b.device_args, check=0)
    treeutil.assert_trees_equal(b.src, dest, check_mtime=keeps_mtime)


def test_extract_of_compact_image_equals_kernel_mount(mkfs_images, tmp_path):
    b = mkfs_images["compact"]
    dest = tmp_path / "out"
    run_rafsfs_proc("extract", b.image, dest, check=0)
    with erofs_mount(b.image, tmp_path / "mnt") as mnt:
        treeutil.assert_trees_equal(mnt, dest)


def test_check_passes(variant):
    name, b, _ = variant
    p = run_rafsfs_proc("check", b.image, *b.device_args, check=0)
    assert "Traceback" not in p.stderr


def test_check_fails_on_corrupt_blob(mkfs_images, tmp_path):
    """`rafsfs check` reads data too: a changed byte in a plain EROFS device cannot be verified by digest (EROFS
    keeps none), but a truncated device must be reported."""
    b = mkfs_images["chunked"]
    short = tmp_path / "short.blob"
    short.write_bytes(b.blob.read_bytes()[:4096])
    p = run_rafsfs_proc("check", b.image, "--device", short)
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr + p.stdout
    assert "/sparse" in p.stdout + p.stderr  # the damaged file is named
