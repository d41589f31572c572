"""Multi-layer builds: overlay merge semantics (unit level on trees), then real layer tarballs built into one
merged bootstrap + one blob per layer, read back through `rafsfs extract`, fsck.erofs and the kernel."""
from __future__ import annotations

import stat
import tarfile
import io
from pathlib import Path

import pytest

import oci_layers
import treeutil
from conftest import erofs_mount, run_rafsfs_proc, which_or_skip
from rafsfs.builder.merge import apply_layer, build_layers, lookup
from rafsfs.builder.tree import Node, new_dir
from rafsfs.errors import BuildError
from rafsfs.image import RafsImage


# ---------------------------------------------------------------------------------------------- tree merge
def f(data: bytes = b"", mtime: int = 0) -> Node:
    return Node(mode=stat.S_IFREG | 0o644, size=len(data), mtime=mtime)


def d(children: dict[bytes, Node] | None = None, mode: int = 0o755, mtime: int = 0, implicit: bool = False) -> Node:
    n = new_dir(mode, implicit=implicit)
    n.mtime = mtime
    n.children = dict(children or {})
    return n


def names(node: Node) -> list[bytes]:
    return sorted(node.children)


def test_whiteout_deletes_file_and_whole_directory():
    low = d({b"a": f(), b"dir": d({b"x": f(), b"sub": d({b"y": f()})}), b"keep": f()})
    apply_layer(low, d({b".wh.a": f(), b".wh.dir": f()}, implicit=True))
    assert names(low) == [b"keep"]


def test_whiteout_of_missing_entry_is_harmless_and_never_shown():
    low = d({b"a": f()})
    apply_layer(low, d({b".wh.nothere": f(), b"sub": d({b".wh.zz": f(), b"n": f()})}, implicit=True))
    assert names(low) == [b"a", b"sub"]
    assert names(low.children[b"sub"]) == [b"n"]  # a whiteout in a new directory hides nothing and is dropped


def test_opaque_directory_hides_lower_entries_but_keeps_its_own():
    low = d({b"o": d({b"old": f(), b"olddir": d({b"z": f()})}), b"other": f()})
    apply_layer(low, d({b"o": d({b".wh..wh..opq": f(), b"new": f()})}, implicit=True))
    assert names(low) == [b"o", b"other"]
    assert names(low.children[b"o"]) == [b"new"]


def test_file_replaces_directory_and_directory_replaces_file():
    low = d({b"x": d({b"child": f()}), b"y": f(b"file")})
    up_x, up_y = f(b"now a file"), d({b"inner": f(), b".wh.ghost": f()})
    apply_layer(low, d({b"x": up_x, b"y": up_y}, implicit=True))
    assert low.children[b"x"] is up_x
    assert low.children[b"y"] is up_y and names(up_y) == [b"inner"]


def test_directory_over_directory_merges_and_explicit_metadata_wins():
    keep = f(b"k")
    low = d({b"etc": d({b"keep": keep, b"conf": f(b"1")}, mode=0o755, mtime=5)})
    new_conf = f(b"2")
    apply_layer(low, d({b"etc": d({b"conf": new_conf}, mode=0o700, mtime=9)}, implicit=True))
    etc = low.children[b"etc"]
    assert etc.children[b"keep"] is keep and etc.children[b"conf"] is new_conf
    assert stat.S_IMODE(etc.mode) == 0o700 and etc.mtime == 9


def test_implied_directory_keeps_lower_metadata():
    low = d({b"usr": d({b"a": f()}, mode=0o750, mtime=7)})
    apply_layer(low, d({b"usr": d({b"b": f()}, implicit=True)}, implicit=True))
    usr = low.children[b"usr"]
    assert names(usr) == [b"a", b"b"] and stat.S_IMODE(usr.mode) == 0o750 and usr.mtime == 7


def test_lookup():
    leaf = f()
    root = d({b"a": d({b"b": leaf})})
    assert lookup(root, b"a/b") is leaf and lookup(root, b"a/b/c") is None and lookup(root, b"zz") is None


# ---------------------------------------------------------------------------------------------- real layers
@pytest.fixture(scope="module")
def layers(tmp_path_factory) -> list[Path]:
    return oci_layers.write_layers(tmp_path_factory.mktemp("layers"), gz=True)


@pytest.fixture(scope="module")
def expected(tmp_path_factory) -> Path:
    return oci_layers.expected_tree(tmp_path_factory)


@pytest.mark.parametrize("compressor", ["zstd", "none"])
def test_merged_build_extracts_to_the_expected_tree(layers, expected, tmp_path, compressor):
    res = build_layers([str(p) for p in layers], str(tmp_path / "boot"), str(tmp_path / "blobs"),
                       compressor=compressor, chunk_size=1 << 20)
    # layer 1 has no file data, so no blob; the others one each, in layer order
    assert [lr.blob_id is not None for lr in res.layers] == [True, False, True]
    with RafsImage.open(str(tmp_path / "boot")) as image:
        assert [b.blob_id for b in image.blobs] == res.blob_ids
        # the replaced file's chunks come from the upper blob, the base file's from the lower
        def blob_of(path: str) -> set[int]:
            ino = image.resolve(path)
            return {s.chunk.blob_index for s in image.map_range(ino, 0, ino.size)}
        assert blob_of("/etc/config") == {1} and blob_of("/etc/keep") == {0}
        assert blob_of("/data/big") == {0} and blob_of("/data/big2") == {1}
    out = tmp_path / "out"
    run_rafsfs_proc("extract", tmp_path / "boot", out, "--blob-dir", tmp_path / "blobs", check=0)
    treeutil.assert_trees_equal(expected, out, check_root=False)
    for gone in oci_layers.DELETED:
        assert not (out / gone).exists()
    p = run_rafsfs_proc("check", tmp_path / "boot", "--blob-dir", tmp_path / "blobs", check=0)
    assert "0 bad" in p.stdout


def test_merged_uncompressed_image_passes_fsck_and_mounts_in_the_kernel(layers, expected, tmp_path):
    fsck = which_or_skip("fsck.erofs")
    res = build_layers([str(p) for p in layers], str(tmp_path / "boot"), str(tmp_path / "blobs"),
                       compressor="none")
    devices = [tmp_path / "blobs" / b for b in res.blob_ids]  # device slots in blob table order
    import subprocess

    p = subprocess.run([fsck, *[f"--device={d}" for d in devices], str(tmp_path / "boot")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    with erofs_mount(tmp_path / "boot", tmp_path / "mnt", devices) as mnt:
        treeutil.assert_trees_equal(expected, mnt, check_root=False)


def test_cli_build_takes_several_layers(layers, expected, tmp_path):
    p = run_rafsfs_proc("build", *layers, "--bootstrap", tmp_path / "boot", "--blob-dir", tmp_path / "blobs",
                        check=0)
    assert "3 layers" in p.stdout and "2 blobs" in p.stdout
    run_rafsfs_proc("extract", tmp_path / "boot", tmp_path / "out", "--blob-dir", tmp_path / "blobs", check=0)
    treeutil.assert_trees_equal(expected, tmp_path / "out", check_root=False)


def test_build_is_deterministic(layers, tmp_path):
    a = build_layers([str(p) for p in layers], str(tmp_path / "a.boot"), str(tmp_path / "blobs"))
    b = build_layers([str(p) for p in layers], str(tmp_path / "b.boot"), str(tmp_path / "blobs"))
    assert a.blob_ids == b.blob_ids
    assert (tmp_path / "a.boot").read_bytes() == (tmp_path / "b.boot").read_bytes()


# ---------------------------------------------------------------------------------------------- bad layers
def _tar(tmp_path: Path, name: str, members: list[tuple[str, str, str]]) -> Path:
    """(path, type 'file'|'link', linkname) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for path, kind, link in members:
            ti = tarfile.TarInfo(path)
            if kind == "link":
                ti.type, ti.linkname = tarfile.LNKTYPE, link
                tf.addfile(ti)
            else:
                ti.size = 3
                tf.addfile(ti, io.BytesIO(b"abc"))
    p = tmp_path / name
    p.write_bytes(buf.getvalue())
    return p


@pytest.mark.parametrize("members, why", [
    ([("a", "file", ""), (".wh.", "file", "")], "invalid whiteout"),
    ([("a", "link", "missing")], "hardlink"),
    ([("../escape", "file", "")], "escapes"),
])
def test_bad_layers_are_one_line_errors(tmp_path, members, why):
    base = _tar(tmp_path, "base.tar", [("base", "file", "")])
    bad = _tar(tmp_path, "bad.tar", members)
    with pytest.raises(BuildError, match=why):
        build_layers([str(base), str(bad)], str(tmp_path / "boot"), str(tmp_path / "blobs"))
    p = run_rafsfs_proc("build", base, bad, "--bootstrap", tmp_path / "boot2", "--blob-dir", tmp_path / "b2")
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert p.returncode == 1 and len(errors) == 1 and why in errors[0] and str(bad) in errors[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not list((tmp_path / "b2").glob(".blob-*"))  # no temporary blob left behind


def test_hardlink_to_a_lower_layer_file(tmp_path):
    base = _tar(tmp_path, "base.tar", [("dir/target", "file", "")])
    up = _tar(tmp_path, "up.tar", [("alias", "link", "dir/target")])
    build_layers([str(base), str(up)], str(tmp_path / "boot"), str(tmp_path / "blobs"))
    with RafsImage.open(str(tmp_path / "boot")) as image:
        a, t = image.resolve("/alias"), image.resolve("/dir/target")
        assert a.nid == t.nid and a.nlink == 2
