"""FUSE mode with real mounts: the mounted tree equals the source and a kernel EROFS mount of the same image."""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, erofs_mount, is_mounted, needs_fuse, rafsfs_cmd, run_rafsfs_proc
from treeutil import assert_trees_equal

from rafsfs.image import RafsImage

pytestmark = needs_fuse



class FuseMount:
    """``rafsfs mount --foreground`` as a child process, as systemd or a test would run it."""

    def __init__(self, boot: Path, mnt: Path, *args):
        mnt.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.mnt = mnt
        self.proc = subprocess.Popen(rafsfs_cmd("mount", boot, mnt, "--foreground", "--mode", "fuse", *args),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 30
        while not is_mounted(mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"mount did not come up: {self.proc.communicate()[1][-2000:]}")
            time.sleep(0.05)

    def stop(self) -> str:
        self.proc.terminate()  # SIGTERM must unmount cleanly
        _, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        assert not is_mounted(self.mnt)
        return err


@pytest.fixture(scope="module")
def built(tricky_src, tmp_path_factory):
    d = tmp_path_factory.mktemp("fuse-img")
    out = {}
    for comp in ("zstd", "none"):
        run_rafsfs_proc("build", tricky_src, "--bootstrap", d / f"{comp}.boot", "--blob-dir", d / "blobs",
                        "--compressor", comp, check=0)
        out[comp] = d / f"{comp}.boot"
    return d, out


def test_mounted_tree_equals_source_and_kernel(built, tricky_src, tmp_path):
    d, boots = built
    m = FuseMount(boots["zstd"], tmp_path / "mnt", "--blob-dir", d / "blobs")
    try:
        assert_trees_equal(tricky_src, m.mnt, check_symlink_mtime=True)
        # the same image, uncompressed, through the kernel's own EROFS: the two views agree exactly
        blob = d / "blobs" / RafsImage.open(str(boots["none"])).blobs[0].blob_id
        with erofs_mount(boots["none"], tmp_path / "kmnt", [blob]) as kmnt:
            assert_trees_equal(kmnt, m.mnt, check_symlink_mtime=True)
        # inode numbers are stable and hardlinks share one inode with the right link count
        a, b, c = (os.lstat(m.mnt / p) for p in ("hl/a/one", "hl/b/two", "three"))
        assert a.st_ino == b.st_ino == c.st_ino and a.st_nlink == 3
        assert os.lstat(m.mnt / "hl/a/one").st_ino == a.st_ino  # stable across lookups
        # read-only: writes fail with EROFS
        with pytest.raises(OSError) as e:
            (m.mnt / "new-file").write_text("x")
        assert e.value.errno == 30
    finally:
        m.stop()


def test_concurrent_random_readers(built, tricky_src, tmp_path):
    """Many threads reading random ranges of random files: every byte matches the source."""
    d, boots = built
    files = [p.relative_to(tricky_src) for p in tricky_src.rglob("*")
             if p.is_file() and not p.is_symlink() and p.stat().st_size > 0]
    m = FuseMount(boots["zstd"], tmp_path / "mnt", "--blob-dir", d / "blobs")
    errors: list[str] = []
    reads = [0]

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            rel = rnd.choice(files)
            size = (tricky_src / rel).stat().st_size
            off = rnd.randrange(size)
            n = rnd.choice((1, 4096, 65536, 1 << 20))
            with open(tricky_src / rel, "rb") as f:
                f.seek(off)
                want = f.read(n)
            with open(m.mnt / rel, "rb") as f:
                f.seek(off)
                got = f.read(n)
            reads[0] += 1
            if got != want:
                errors.append(f"{rel} @{off}+{n}")

    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        m.stop()
    assert not errors, errors[:10]
    assert reads[0] > 100


def test_mount_errors_are_one_line(built, tmp_path):
    d, boots = built
    (tmp_path / "mnt").mkdir()
    bad = tmp_path / "bad.boot"
    bad.write_bytes(b"\0" * 8192)
    for args, words in (((bad, tmp_path / "mnt"), "bad magic"),
                        ((boots["zstd"], tmp_path / "nope"), "not a directory"),
                        ((boots["zstd"], tmp_path / "mnt", "--mode", "fscache"), "not available")):
        p = run_rafsfs_proc("mount", *args, "--foreground", "--blob-dir", d / "blobs")
        lines = [ln for ln in p.stderr.splitlines() if "error" in ln]
        assert p.returncode == 1 and len(lines) == 1 and words in lines[0], p.stderr
        assert "Traceback" not in p.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens here once the socket is closed


def _one_error_line(p: subprocess.CompletedProcess, words: str) -> None:
    lines = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert p.returncode == 1 and len(lines) == 1 and words in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_mount_on_busy_mountpoint_is_one_line(built, tmp_path):
    d, boots = built
    m = FuseMount(boots["zstd"], tmp_path / "mnt", "--blob-dir", d / "blobs")
    try:
        p = run_rafsfs_proc("mount", boots["zstd"], m.mnt, "--foreground", "--blob-dir", d / "blobs", timeout=60)
        _one_error_line(p, "busy")
        assert len(os.listdir(m.mnt)) > 0  # the first mount is untouched
    finally:
        m.stop()


@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_mount_with_unreachable_backend_is_one_line(built, tmp_path, daemon):
    """A registry nobody listens on: the mount stops before mounting and says why, instead of mounting a tree whose
    every read fails."""
    d, boots = built
    (tmp_path / "mnt").mkdir()
    cfg = tmp_path / "nydusd.json"
    cfg.write_text(json.dumps({"device": {
        "backend": {"type": "registry", "config": {"host": f"127.0.0.1:{_closed_port()}", "repo": "test/img",
                                                   "scheme": "http", "retry_limit": 1, "connect_timeout": 2}},
        "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "cache")}}}}))
    args = ["--log-file", tmp_path / "log"] if daemon else ["--foreground"]
    t0 = time.monotonic()
    p = run_rafsfs_proc("mount", boots["zstd"], tmp_path / "mnt", "--config", cfg, *args, timeout=120)
    _one_error_line(p, "cannot read blob")
    assert "failed: rafsfs:" not in p.stderr, p.stderr  # the daemon's own prefix is not repeated
    assert "ConnectionError" in p.stderr or "refused" in p.stderr.lower(), p.stderr
    assert time.monotonic() - t0 < 60
    assert not is_mounted(tmp_path / "mnt")


def test_mount_with_missing_blob_is_one_line(built, tmp_path):
    d, boots = built
    (tmp_path / "mnt").mkdir()
    (tmp_path / "empty").mkdir()
    p = run_rafsfs_proc("mount", boots["zstd"], tmp_path / "mnt", "--foreground", "--blob-dir", tmp_path / "empty",
                        timeout=60)
    _one_error_line(p, "cannot read blob")
    assert not is_mounted(tmp_path / "mnt")


def test_only_local_data_is_read_on_the_event_loop(tmp_path):
    """Small reads skip the thread pool only when no read can wait on the network."""
    from fuse_backend.mount import data_is_local
    from rafsfs.storage.factory import chunk_source_from_args

    (tmp_path / "blobs").mkdir()
    cfgs = {
        "localfs": {"type": "localfs", "config": {"dir": str(tmp_path / "blobs")}},
        "registry": {"type": "registry", "config": {"host": "127.0.0.1:1", "repo": "a/b", "scheme": "http"}},
    }
    for name, backend in cfgs.items():
        for cache in ({"type": "blobcache", "config": {"work_dir": str(tmp_path / "cache")}}, {"type": "none"}):
            f = tmp_path / f"{name}-{cache['type']}.json"
            f.write_text(json.dumps({"device": {"backend": backend, "cache": cache}}))
            src = chunk_source_from_args(None, None, str(f))
            try:
                assert data_is_local(src) == (name == "localfs"), (name, cache["type"])
            finally:
                src.close()
    src = chunk_source_from_args(str(tmp_path / "blobs"), None)
    assert data_is_local(src) and data_is_local(None)
    src.close()


def test_recent_chunks_serve_straddling_reads_from_memory(built, tricky_src):
    """Read-ahead windows that straddle chunk boundaries get the second copy of a chunk from memory; the memory
    stays within its byte bound and the bytes are the file's."""
    from rafsfs.storage.cache.none import DirectChunkSource
    from rafsfs.storage.factory import chunk_source_from_args

    d, boots = built
    rel = "sizes/size-" + str(3 * (1 << 20) + 12345)
    want = (tricky_src / rel).read_bytes()
    with RafsImage.open(str(boots["zstd"])) as image:
        inner = chunk_source_from_args(str(d / "blobs"), None)
        memo = DirectChunkSource(inner.backend, recent_bytes=2 << 20)  # remembers two 1 MiB chunks
        ino = image.resolve(rel)
        got, off = [], 0
        for size in (256 << 10, 512 << 10, 1 << 20, 1 << 20, 1 << 20, 1 << 20):  # a cat's read-ahead windows
            got.append(image.read(ino, off, size, memo))
            off += size
        inner.close()
    assert b"".join(got) == want
    assert memo.recent.misses == 4 and memo.recent.hits == 4  # each of the 4 chunks fetched once, then reused
    assert memo.recent._bytes <= 2 << 20


def test_daemon_mode_and_umount(built, tmp_path):
    d, boots = built
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = run_rafsfs_proc("mount", boots["zstd"], mnt, "--blob-dir", d / "blobs", "--log-file", tmp_path / "log",
                        "--pid-file", tmp_path / "pid", check=0)
    assert "mounted" in p.stdout and is_mounted(mnt)
    pid = int((tmp_path / "pid").read_text())
    assert len(os.listdir(mnt)) > 0
    run_rafsfs_proc("umount", mnt, check=0)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("daemon did not exit after umount")
    assert not is_mounted(mnt)


# ---------------------------------------------------------------------------------------------- review low items
def _local_config(path: Path, blobs: Path, **top) -> Path:
    path.write_text(json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}},
                                           "cache": {"type": "none"}}, **top}))
    return path


def test_enable_xattr_false_hides_xattrs(built, tricky_src, tmp_path):
    """L8: the config's enable_xattr was parsed and ignored; false now hides every xattr: readers get EOPNOTSUPP
    (the daemon answers ENOSYS, as nydusd does, and the kernel stops asking)."""
    d, boots = built
    cfg = _local_config(tmp_path / "cfg.json", d / "blobs", enable_xattr=False)
    m = FuseMount(boots["zstd"], tmp_path / "mnt", "--config", cfg)
    try:
        f = m.mnt / "xattrs" / "user"
        assert os.listxattr(tricky_src / "xattrs" / "user")  # the image has them
        for _ in range(2):  # the second time the kernel answers by itself
            for call in (lambda: os.listxattr(f), lambda: os.getxattr(f, "user.mime_type")):
                with pytest.raises(OSError) as e:
                    call()
                assert e.value.errno == errno.EOPNOTSUPP
        assert f.read_bytes() == (tricky_src / "xattrs" / "user").read_bytes()
    finally:
        m.stop()


@pytest.mark.allow_log("No space left on device")
def test_daemon_errors_reach_readers_as_eio(caplog):
    """L9: an OSError of the daemon's own (EBADF, EMFILE, ENOSPC on its cache files) used to be forwarded as the
    reader's errno; it is EIO, and the log keeps the original.  The core's errors keep their own errno."""
    import pyfuse3
    from fuse_backend.operations import _fuse_errors, errno_of
    from rafsfs.errors import CorruptChunk, NoXattr, NotFound

    assert errno_of(NotFound("x")) == errno.ENOENT and errno_of(NoXattr("x")) == errno.ENODATA
    assert errno_of(CorruptChunk("x")) == errno.EIO
    for code in (errno.EBADF, errno.EMFILE, errno.ENOSPC, errno.EACCES):
        assert errno_of(OSError(code, os.strerror(code))) == errno.EIO
    assert errno_of(ValueError("a bug")) == errno.EIO
    caplog.set_level(logging.ERROR, logger="fuse_backend")
    with pytest.raises(pyfuse3.FUSEError) as e:
        with _fuse_errors("read"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.errno == errno.EIO
    assert "No space left on device" in caplog.text
