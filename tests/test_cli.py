"""The `rafsfs` command line, run for real (``python -m rafsfs.cli``): output, exit codes and one-line errors.

The Nydus fixture (shared/fixtures/nydus-v6-2.2) covers inspect/ls/cat/extract/check; small trees packed with
Debian's mkfs.erofs 1.5 cover the file types, xattrs, sparseness and the never-write-outside-DEST rule.
Full tree comparisons live in test_roundtrip_*.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import blake3
import pytest

from conftest import REPO, rafsfs_cmd, run_rafsfs_proc, which_or_skip
from rafsfs.format import superblock as sbf

BOOT = "rafs-v6-2.2.boot"
BLOB = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
# sha256 of the fixture's files as this reader produces them (every chunk also matched its recorded blake3)
SHA256 = {"lib.rs": "1810eba864521293bb0d6b55a3c82318d4d89f294ed761c456d9088a17de0c69",
          "sync_io.rs": "e629ab260ff0dc02a24648a3e0dd8c13a5daf233d535c330e3201925f5eeff96"}
COMMANDS = ["build", "inspect", "ls", "cat", "extract", "check"]


def one_line_error(p: subprocess.CompletedProcess, code: int = 1) -> str:
    """The process failed with ``code`` and said exactly one line, 'rafsfs: error: ...', on stderr."""
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rafsfs: error: "), p.stderr
    return lines[0]


@pytest.fixture
def boot(nydus_fixture) -> Path:
    return nydus_fixture / BOOT


@pytest.fixture
def blob_copy(nydus_fixture, tmp_path) -> Path:
    """A writable copy of the fixture directory."""
    d = tmp_path / "copy"
    d.mkdir()
    for f in (BOOT, BLOB):
        shutil.copyfile(nydus_fixture / f, d / f)
    return d


def mkfs(tree: Path, image: Path) -> Path:
    which_or_skip("mkfs.erofs")
    subprocess.run(["mkfs.erofs", "--quiet", "--preserve-mtime", str(image), str(tree)], check=True,
                   capture_output=True)
    return image


# ---------------------------------------------------------------------------------------------- parsing
def test_help_for_every_command():
    p = run_rafsfs_proc("--help", check=0)
    for c in COMMANDS:
        assert c in p.stdout
    for c in COMMANDS:
        p = run_rafsfs_proc(c, "--help", check=0)
        assert p.stdout.startswith(f"usage: rafsfs {c}")
        assert "--log-level" in p.stdout and "-v, --verbose" in p.stdout
    assert "--blob-dir DIR" in run_rafsfs_proc("check", "--help").stdout


def test_every_command_and_option_has_help():
    """--help is complete: each subcommand of rafsfs and each option of rafsfs and rafsfs-nydusd says what it does
    (rafsfs-nydusd's flags kept only for nydusd compatibility are hidden on purpose)."""
    import argparse

    from rafsfs.cli import build_parser
    from rafsfs.nydusd import build_parser as nydusd_parser

    missing = []

    def walk(p: argparse.ArgumentParser, name: str) -> None:
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                helps = {c.dest: c.help for c in a._choices_actions}
                for sub, sp in a.choices.items():
                    if not helps.get(sub):
                        missing.append(f"{name} {sub}")
                    walk(sp, f"{name} {sub}")
            elif a.help is None:
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}")

    walk(build_parser(), "rafsfs")
    walk(nydusd_parser(), "rafsfs-nydusd")
    assert missing == []


@pytest.mark.parametrize("args", [[], ["frob"], ["ls"], ["build", "x", "--bootstrap", "b", "--blob-dir", "d",
                                                         "--chunk-size", "3K"],
                                  ["build", "x", "--bootstrap", "b", "--blob-dir", "d", "--chunk-size", "1X"]])
def test_usage_errors_exit_2(args):
    p = run_rafsfs_proc(*args)
    assert p.returncode == 2 and "usage:" in p.stderr and "Traceback" not in p.stderr


def test_parse_size():
    from rafsfs.cli import chunk_size, parse_size

    assert parse_size("1048576") == 1 << 20
    assert parse_size("64K") == 65536 and parse_size("64k") == 65536
    assert parse_size("1M") == parse_size("1MiB") == 1 << 20
    assert chunk_size("16M") == 16 << 20
    for bad in ("3K", "32M", "1000", "2048"):
        with pytest.raises(Exception):
            chunk_size(bad)


# ---------------------------------------------------------------------------------------------- the Nydus fixture
def test_inspect(boot):
    text = run_rafsfs_proc("inspect", boot, check=0).stdout
    assert "Nydus RAFS v6" in text and BLOB in text and "HAS_TOC" in text and "zstd" in text
    info = json.loads(run_rafsfs_proc("inspect", boot, "--json", check=0).stdout)
    assert info["flavour"] == "nydus-rafs-v6"
    assert (info["block_size"], info["chunk_size"]) == (4096, 1 << 20)
    assert info["superblock"]["feature_incompat_names"] == ["CHUNKED_FILE", "DEVICE_TABLE"]
    assert (info["rafs"]["compressor"], info["rafs"]["digester"]) == ("zstd", "blake3")
    assert "INLINED_CHUNK_DIGEST" in info["rafs"]["flag_names"]
    [b] = info["blobs"]
    assert (b["blob_id"], b["index"], b["chunk_count"], b["ci_version"]) == (BLOB, 0, 2, 1)
    assert (b["compressed_size"], b["uncompressed_size"]) == (14554, 36864)
    assert b["feature_names"] == ["ALIGNED", "INLINED_CHUNK_DIGEST", "HAS_TAR_HEADER", "HAS_TOC", "CAP_TAR_TOC"]
    assert info["devices"] == [{"slot": 0, "device_id": 1, "tag": BLOB, "blocks": 9, "mapped_blkaddr": 512}]
    assert info["prefetch"] == []
    assert info["counts"] == {"inodes": 3, "paths": 3, "by_type": {"directory": 1, "regular": 2},
                              "regular_bytes": 30331, "hardlinked_inodes": 0, "xattr_inodes": 0}


def test_ls(boot):
    assert run_rafsfs_proc("ls", boot, check=0).stdout.splitlines() == ["lib.rs", "sync_io.rs"]
    lines = run_rafsfs_proc("ls", boot, "/", "-l", check=0).stdout.splitlines()
    assert [ln.split()[:5] for ln in lines] == [["-rw-r--r--", "1", "0", "0", "16931"],
                                                ["-rw-r--r--", "1", "0", "0", "13400"]]
    assert lines[0].endswith(" lib.rs")
    one = run_rafsfs_proc("ls", boot, "/sync_io.rs", "-l", check=0).stdout.splitlines()
    assert len(one) == 1 and one[0].split()[4] == "13400" and one[0].endswith(" sync_io.rs")
    one_line_error(run_rafsfs_proc("ls", boot, "/nope"))


def test_cat_is_stable_and_equals_extract(boot, nydus_fixture, tmp_path):
    dest = tmp_path / "out"
    p = run_rafsfs_proc("extract", boot, dest, "--blob-dir", nydus_fixture, check=0)
    assert "2 files" in p.stdout and "30331 bytes" in p.stdout
    assert sorted(os.listdir(dest)) == sorted(SHA256)
    for name, sha in SHA256.items():
        outs = [run_rafsfs_proc("cat", boot, "/" + name, "--blob-dir", nydus_fixture, text=False, check=0).stdout
                for _ in range(2)]
        assert outs[0] == outs[1]
        assert hashlib.sha256(outs[0]).hexdigest() == sha
        data = (dest / name).read_bytes()
        assert blake3.blake3(data).digest() == blake3.blake3(outs[0]).digest()
        st = (dest / name).lstat()
        assert stat.filemode(st.st_mode) == "-rw-r--r--"
    # mtimes with nanoseconds, from the image
    assert (dest / "lib.rs").lstat().st_mtime_ns == 1676819553_628661334
    # the device-slot form works too
    out = run_rafsfs_proc("cat", boot, "/lib.rs", "--device", nydus_fixture / BLOB, text=False, check=0).stdout
    assert hashlib.sha256(out).hexdigest() == SHA256["lib.rs"]


def test_check_passes(boot, nydus_fixture):
    p = run_rafsfs_proc("check", boot, "--blob-dir", nydus_fixture, check=0)
    assert "2 files" in p.stdout and "2 chunks verified" in p.stdout and "0 bad" in p.stdout
    assert "unverified" not in p.stdout


def test_check_names_the_corrupt_file(blob_copy):
    blob = blob_copy / BLOB
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF  # inside lib.rs's chunk (compressed range 0..4828)
    blob.write_bytes(bytes(data))
    p = run_rafsfs_proc("check", blob_copy / BOOT, "--blob-dir", blob_copy)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    bad = p.stderr.strip().splitlines()
    assert len(bad) == 1 and bad[0].startswith("rafsfs: bad: /lib.rs: "), p.stderr
    assert "1 chunks verified" in p.stdout and "1 bad" in p.stdout
    # cat of the damaged file fails with one line; the other file still reads
    one_line_error(run_rafsfs_proc("cat", blob_copy / BOOT, "/lib.rs", "--blob-dir", blob_copy))
    run_rafsfs_proc("cat", blob_copy / BOOT, "/sync_io.rs", "--blob-dir", blob_copy, check=0)


@pytest.mark.parametrize("cmd", [["cat", "/lib.rs"], ["extract", "{dest}"], ["check"]])
def test_missing_blob_is_one_line(boot, tmp_path, cmd):
    cmd = [c.replace("{dest}", str(tmp_path / "dest")) for c in cmd]
    line = one_line_error(run_rafsfs_proc(cmd[0], boot, *cmd[1:], "--blob-dir", tmp_path / "nonexistent"))
    assert "nonexistent" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    p = run_rafsfs_proc(cmd[0], boot, *cmd[1:], "--blob-dir", empty)
    if cmd[0] == "check":  # check reports the unreadable file, then its summary
        assert p.returncode == 1 and "Traceback" not in p.stderr and "/lib.rs" in p.stderr
    else:
        assert BLOB in one_line_error(p)
    line = one_line_error(run_rafsfs_proc(cmd[0], boot, *cmd[1:]))  # no data location given at all
    assert "--blob-dir" in line


def test_argument_errors_are_one_line(boot, nydus_fixture, tmp_path):
    line = one_line_error(run_rafsfs_proc("cat", boot, "/lib.rs", "--config", tmp_path / "c.json"))
    assert "cannot read config" in line
    (tmp_path / "bad.json").write_text('{"device": {"backend": {"type": "s3", "config": {}}}}')
    assert "unsupported backend type" in one_line_error(run_rafsfs_proc("cat", boot, "/lib.rs", "--config",
                                                                        tmp_path / "bad.json"))
    one_line_error(run_rafsfs_proc("cat", boot, "/lib.rs", "--device", nydus_fixture / BLOB,
                                   "--device", nydus_fixture / BLOB))  # two files for one slot
    one_line_error(run_rafsfs_proc("cat", boot, "/", "--blob-dir", nydus_fixture))  # a directory
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "not empty" in one_line_error(run_rafsfs_proc("extract", boot, tmp_path / "full",
                                                         "--blob-dir", nydus_fixture))
    one_line_error(run_rafsfs_proc("extract", boot, tmp_path / "no" / "parent", "--blob-dir", nydus_fixture))


@pytest.mark.parametrize("kind", ["truncated", "garbage", "missing", "empty"])
@pytest.mark.parametrize("cmd", [["inspect"], ["ls"], ["cat", "/lib.rs"], ["extract", "{dest}"], ["check"]])
def test_bad_bootstrap_is_one_line(boot, nydus_fixture, tmp_path, kind, cmd):
    bad = tmp_path / "bad.boot"
    if kind == "truncated":
        bad.write_bytes(boot.read_bytes()[:3000])
    elif kind == "garbage":
        bad.write_bytes(os.urandom(20480))
    elif kind == "empty":
        bad.write_bytes(b"")
    extra = ["--blob-dir", str(nydus_fixture)] if cmd[0] in ("cat", "extract", "check") else []
    cmd = [c.replace("{dest}", str(tmp_path / "dest")) for c in cmd]
    one_line_error(run_rafsfs_proc(cmd[0], bad, *cmd[1:], *extra))


def test_internal_error_is_one_line_and_traceback_only_with_v(boot):
    code = ("import sys, rafsfs.tools.listing as m\n"
            "def boom(*a, **k): raise ValueError('kaboom')\n"
            "m.list_path = boom\n"
            "from rafsfs.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for verbose in (False, True):
        args = [sys.executable, "-c", code, "ls", str(boot)] + (["-v"] if verbose else [])
        p = subprocess.run(args, capture_output=True, text=True, env=env)
        assert p.returncode == 70
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("rafsfs: internal error: ValueError: kaboom")
        if verbose:
            assert "Traceback" in p.stderr
        else:
            assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
            assert "run with -v" in last


# ---------------------------------------------------------------------------------------------- mkfs.erofs images
def test_mkfs_erofs_smoke(tmp_path):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "file").write_bytes(b"hello world\n" * 1000)
    (tree / "sub" / "inner").write_bytes(os.urandom(10000))
    os.chmod(tree / "sub" / "inner", 0o600)
    os.symlink("../file", tree / "sub" / "link")
    os.mkfifo(tree / "fifo", 0o640)
    os.setxattr(tree / "file", b"user.foo", b"bar")
    os.utime(tree / "file", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    image = mkfs(tree, tmp_path / "out.img")

    assert run_rafsfs_proc("ls", image, check=0).stdout.splitlines() == ["fifo", "file", "sub"]
    info = json.loads(run_rafsfs_proc("inspect", image, "--json", check=0).stdout)
    assert info["flavour"] == "erofs" and info["rafs"] is None
    assert info["counts"]["by_type"] == {"directory": 2, "fifo": 1, "regular": 2, "symlink": 1}
    assert info["counts"]["xattr_inodes"] == 1
    p = run_rafsfs_proc("check", image, check=0)
    assert "unverified" in p.stdout and "0 bad" in p.stdout
    assert run_rafsfs_proc("cat", image, "/sub/inner", text=False, check=0).stdout == \
        (tree / "sub" / "inner").read_bytes()

    dest = tmp_path / "dest"
    run_rafsfs_proc("extract", image, dest, check=0)
    for rel in ("", "file", "sub", "sub/inner", "sub/link", "fifo"):
        a, b = (tree / rel).lstat(), (dest / rel).lstat()
        assert stat.filemode(a.st_mode) == stat.filemode(b.st_mode), rel
        assert a.st_mtime_ns == b.st_mtime_ns, rel
    for rel in ("", "sub"):
        assert sorted(os.listdir(tree / rel)) == sorted(os.listdir(dest / rel))
    for rel in ("file", "sub/inner"):
        assert (tree / rel).read_bytes() == (dest / rel).read_bytes()
    assert os.readlink(dest / "sub" / "link") == "../file"
    assert os.getxattr(dest / "file", b"user.foo") == b"bar"


@pytest.mark.skipif(os.geteuid() != 0, reason="device nodes, owners and trusted.* xattrs need root")
def test_extract_special_files(tmp_path):
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "a").write_bytes(b"data")
    os.link(tree / "a", tree / "d" / "hard")
    os.mknod(tree / "cdev", stat.S_IFCHR | 0o620, os.makedev(1, 3))
    os.mknod(tree / "bdev", stat.S_IFBLK | 0o600, os.makedev(259, 70000))
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tree / "sock"))
    s.close()
    with open(tree / "sparse", "wb") as f:
        f.truncate(8 << 20)
        f.seek(3 << 20)
        f.write(b"x")
    (tree / "suid").write_bytes(b"#!/bin/sh\n")
    os.chown(tree / "suid", 1234, 5678)
    os.chmod(tree / "suid", 0o6755)
    os.chmod(tree / "d", 0o1777)
    os.symlink("a", tree / "link")
    os.setxattr(tree / "link", b"trusted.t", b"on a symlink", follow_symlinks=False)
    os.setxattr(tree / "suid", b"security.capability",
                bytes.fromhex("0000000200200000000000000000000000000000"))
    image = mkfs(tree, tmp_path / "out.img")

    dest = tmp_path / "dest"
    p = run_rafsfs_proc("extract", image, dest, check=0)
    assert "1 hard links" in p.stdout
    assert os.path.samefile(dest / "a", dest / "d" / "hard") and (dest / "a").stat().st_nlink == 2
    for rel in ("cdev", "bdev", "sock", "suid", "d", "link", "sparse"):
        a, b = (tree / rel).lstat(), (dest / rel).lstat()
        assert (a.st_mode, a.st_uid, a.st_gid, a.st_rdev) == (b.st_mode, b.st_uid, b.st_gid, b.st_rdev), rel
        assert a.st_mtime_ns == b.st_mtime_ns, rel
    assert os.getxattr(dest / "link", b"trusted.t", follow_symlinks=False) == b"on a symlink"
    assert os.getxattr(dest / "suid", b"security.capability") == os.getxattr(tree / "suid", b"security.capability")
    assert (dest / "sparse").read_bytes() == (tree / "sparse").read_bytes()
    assert (dest / "sparse").stat().st_blocks * 512 <= 64 << 10  # stayed sparse


@pytest.mark.parametrize("first", ["symlink", "dir"])
def test_extract_never_writes_outside_dest(tmp_path, first):
    """A crafted image with a symlink and a directory of the same name: the file meant for the directory must not
    land where the symlink points."""
    outside = tmp_path / "outside"
    outside.mkdir()
    tree = tmp_path / "tree"
    link, other = ("zzaaaaaa", "zzbbbbbb") if first == "symlink" else ("zzbbbbbb", "zzaaaaaa")
    (tree / other).mkdir(parents=True)
    (tree / other / "payload").write_bytes(b"must not escape")
    os.symlink(str(outside), tree / link)
    image = mkfs(tree, tmp_path / "out.img")
    raw = bytearray(image.read_bytes())
    assert raw.count(other.encode()) == 1
    i = raw.index(other.encode())
    raw[i:i + len(link)] = link.encode()  # the directory now has the symlink's name
    sb = sbf.SuperBlock.unpack_from(raw, sbf.SB_OFFSET)
    if sb.feature_compat & sbf.COMPAT_SB_CHKSUM:  # keep the superblock checksum valid
        blk = bytearray(raw[sbf.SB_OFFSET:1 << sb.blkszbits])
        blk[4:8] = bytes(4)
        raw[sbf.SB_OFFSET + 4:sbf.SB_OFFSET + 8] = sbf.crc32c(bytes(blk)).to_bytes(4, "little")
    image.write_bytes(bytes(raw))
    assert run_rafsfs_proc("ls", image, check=0).stdout.splitlines() == [link, link]

    p = run_rafsfs_proc("extract", image, tmp_path / "dest")
    assert f"/{link}: the image has two entries of this name" in one_line_error(p)
    assert os.listdir(outside) == []


def test_extract_creates_nothing_through_existing_nodes(tmp_path):
    """The last line of defence under the duplicate-name check: O_EXCL/O_NOFOLLOW creation relative to a directory
    fd refuses to go through a symlink that is already in DEST."""
    from rafsfs.image import RafsImage
    from rafsfs.tools.extract import _Extractor

    outside = tmp_path / "outside"
    outside.mkdir()
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f").write_bytes(b"x")
    image = mkfs(tree, tmp_path / "out.img")
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(outside, dest / "d")  # as if an earlier entry had planted it
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with RafsImage.open(str(image)) as im:
            ex = _Extractor(im, None, str(dest), fd, None)
            with pytest.raises(OSError):
                ex.run()
            f = im.resolve("/d/f")
            with pytest.raises(OSError):  # opening the parent "d" must not follow the symlink
                ex._create(b"d", b"f", f)
    finally:
        os.close(fd)
    assert os.listdir(outside) == []


def test_broken_pipe_is_quiet(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(4 << 20))
    image = mkfs(tree, tmp_path / "out.img")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(rafsfs_cmd("cat", image, "/big"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    assert proc.stdout is not None and proc.stderr is not None
    assert len(proc.stdout.read(1000)) == 1000
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141
    assert err == b""


# ---------------------------------------------------------------------------------------------- build
def test_build_then_inspect_check_extract(tmp_path):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    payload = os.urandom(200_000)
    (tree / "sub" / "one").write_bytes(payload)
    (tree / "two").write_bytes(payload)  # identical chunks are stored once
    (tree / "prefetch.list").write_text("# hot files\n/sub/one\n\n/two\n")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    boot = tmp_path / "image.boot"
    p = run_rafsfs_proc("build", tree, "--bootstrap", boot, "--blob-dir", blobs, "--chunk-size", "64K",
                        "--compressor", "lz4", "--digester", "sha256",
                        "--prefetch-list", tree / "prefetch.list", check=0)
    [blob_id] = os.listdir(blobs)
    summary = p.stdout.strip().splitlines()
    assert len(summary) == 1 and blob_id in summary[0] and "3 files" in summary[0]
    info = json.loads(run_rafsfs_proc("inspect", boot, "--json", check=0).stdout)
    assert info["chunk_size"] == 65536
    assert (info["rafs"]["compressor"], info["rafs"]["digester"]) == ("lz4_block", "sha256")
    assert [e["path"] for e in info["prefetch"]] == ["/sub/one", "/two"]
    p = run_rafsfs_proc("check", boot, "--blob-dir", blobs, check=0)
    assert "0 bad" in p.stdout
    dest = tmp_path / "dest"
    run_rafsfs_proc("extract", boot, dest, "--blob-dir", blobs, check=0)
    assert (dest / "two").read_bytes() == payload and (dest / "sub" / "one").read_bytes() == payload

    (tree / "bad.list").write_text("relative/path\n")
    one_line_error(run_rafsfs_proc("build", tree, "--bootstrap", tmp_path / "b2", "--blob-dir", blobs,
                                   "--prefetch-list", tree / "bad.list"))


def test_config_file_reads_through_the_cache(boot, nydus_fixture, tmp_path):
    """--config (nydusd JSON, localfs backend, blobcache) gives the same bytes and fills the cache dir."""
    import json

    work = tmp_path / "cache"
    cfg = {"device": {"backend": {"type": "localfs", "config": {"dir": str(nydus_fixture)}},
                      "cache": {"type": "blobcache", "config": {"work_dir": str(work)}}}, "digest_validate": True}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    via_cfg = run_rafsfs_proc("cat", boot, "/lib.rs", "--config", tmp_path / "c.json")
    direct = run_rafsfs_proc("cat", boot, "/lib.rs", "--blob-dir", nydus_fixture)
    assert via_cfg.returncode == 0 and via_cfg.stdout == direct.stdout and len(direct.stdout) == 16931
    assert any(p.name.endswith(".blob.data") for p in work.iterdir())


# ---------------------------------------------------------------------------------------------- review low items
def test_fscache_mode_refuses_apisock_and_takes_prefetch_files(boot, nydus_fixture, tmp_path):
    """L5: --mode fscache does not take --apisock: one line naming it, whatever the kernel (before, it was dropped
    silently where fscache works).  --prefetch-files it honours: whatever stops the mount here, it is not that."""
    (tmp_path / "mnt").mkdir()
    base = ("mount", boot, tmp_path / "mnt", "--mode", "fscache", "--blob-dir", nydus_fixture)
    line = one_line_error(run_rafsfs_proc(*base, "--foreground", "--apisock", "/tmp/x.sock"))
    assert "--mode fscache is not available" in line and "--apisock" in line
    p = run_rafsfs_proc(*base, "--prefetch-files", "/lib.rs")  # in the background: returns once mounted
    if p.returncode != 0:  # no on-demand fscache on this kernel: refused for that reason alone
        assert "--prefetch-files" not in one_line_error(p)
    else:  # mounted by the machine's fscache daemon, which exits with its last mount
        subprocess.run(["umount", str(tmp_path / "mnt")], check=True)


def test_forced_mode_that_cannot_work_is_one_line(boot, nydus_fixture, tmp_path):
    (tmp_path / "mnt").mkdir()
    line = one_line_error(run_rafsfs_proc("mount", boot, tmp_path / "mnt", "--mode", "fanotify", "--foreground",
                                          "--blob-dir", nydus_fixture))
    assert "--mode fanotify is not available: " in line


def test_missing_optional_dependency_is_one_line_with_the_fix(boot, nydus_fixture, tmp_path):
    """A FUSE mount without pyfuse3 says what is missing and how to install it (was: internal error,
    ModuleNotFoundError, exit 70); so does rafsfs-nydusd."""
    (tmp_path / "mnt").mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for module, argv in (("rafsfs.cli", ["mount", str(boot), str(tmp_path / "mnt"), "--mode", "fuse",
                                         "--foreground", "--blob-dir", str(nydus_fixture)]),
                         ("rafsfs.nydusd", ["fuse", "--bootstrap", str(boot), "--mountpoint", str(tmp_path / "mnt"),
                                            "--apisock", str(tmp_path / "api.sock")])):
        code = ("import sys\nsys.modules['pyfuse3'] = None  # as if it were not installed\n"
                f"from {module} import main\nsys.exit(main(sys.argv[1:]))\n")
        p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        errors = [ln for ln in p.stderr.splitlines() if "error" in ln.lower()]
        assert len(errors) == 1 and "pyfuse3" in errors[0] and "pip install" in errors[0], p.stderr
        assert "internal error" not in p.stderr
        assert not (tmp_path / "api.sock").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown the destination to another user")
@pytest.mark.parametrize("how", ["group-writable", "other-writable", "foreign-owner"])
def test_extract_refuses_a_dest_others_can_write(boot, nydus_fixture, tmp_path, how):
    """L6: another user who can write DEST could swap a just-made entry for a symlink before its chmod."""
    dest = tmp_path / "dest"
    dest.mkdir()
    if how == "foreign-owner":
        os.chown(dest, 65534, 65534)
        os.chmod(dest, 0o755)
    else:
        os.chmod(dest, 0o770 if how == "group-writable" else 0o707)
    line = one_line_error(run_rafsfs_proc("extract", boot, dest, "--blob-dir", nydus_fixture))
    assert ("owned by uid 65534" if how == "foreign-owner" else "writable by group or others") in line
    assert os.listdir(dest) == []


def test_extract_sets_modes_without_following_a_symlink(tmp_path):
    """L6: if a made entry is replaced by a symlink before its metadata is applied, its mode goes nowhere: the
    symlink's target keeps its mode (chmod used to follow the link)."""
    from rafsfs.image import RafsImage
    from rafsfs.tools.extract import _Extractor

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"x")
    os.chmod(tree / "f", 0o4777)
    image = mkfs(tree, tmp_path / "out.img")
    victim = tmp_path / "victim"
    victim.write_bytes(b"secret")
    os.chmod(victim, 0o600)
    dest = tmp_path / "dest"
    dest.mkdir(mode=0o700)
    os.symlink(victim, dest / "f")  # the swap, between creation and chmod
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with RafsImage.open(str(image)) as im:
            ex = _Extractor(im, None, str(dest), fd, None)
            with pytest.raises(Exception):
                ex._apply_meta(b"", b"f", im.resolve("/f"))
            ex._drop_parent()
    finally:
        os.close(fd)
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o600
