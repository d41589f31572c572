"""FUSE mode on a real Debian rootfs (debootstrap minbase + python3, cached by tests/rootfs_cache.py):

* the FUSE mount of the rafsfs-built image equals the source tree and the kernel's EROFS mount of the same image;
* a real program runs from it: ``chroot MNT /usr/bin/python3 -c 'import json, sqlite3; print(42)'``;
* a 60 s soak: 32 threads read random ranges of random files, every byte checked against the source, while the
  daemon's resident memory is sampled and must stay bounded and flat.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import erofs_mount, run_rafsfs_proc
from test_fuse import FuseMount
from treeutil import assert_trees_equal

from rafsfs.image import RafsImage

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="FUSE mounts and chroot need root and /dev/fuse")

SOAK_SECONDS = 60
SOAK_THREADS = 32
RSS_LIMIT_MB = 400  # measured: 70-105 MiB peak during the soak (Python 3.11, pyfuse3 3.5, 16 MiB of recent chunks)
RSS_GROWTH_SLACK_MB = 24


@pytest.fixture(scope="module")
def images(rootfs, tmp_path_factory):
    """The rootfs built twice by rafsfs: zstd (the Nydus way) and uncompressed (mountable by the kernel)."""
    d = tmp_path_factory.mktemp("rootfs-img")
    for comp in ("zstd", "none"):
        run_rafsfs_proc("build", rootfs, "--bootstrap", d / f"{comp}.boot", "--blob-dir", d / "blobs",
                        "--compressor", comp, check=0)
    return d


def _cache_config(d: Path, images: Path) -> Path:
    """A nydusd config: local blobs behind the chunk cache (what a registry mount uses, minus the network)."""
    cfg = d / "nydusd.json"
    cfg.write_text(json.dumps({"device": {
        "backend": {"type": "localfs", "config": {"dir": str(images / "blobs")}},
        "cache": {"type": "blobcache", "config": {"work_dir": str(d / "cache")}}}}))
    return cfg


def test_rootfs_mount_equals_source_and_kernel(rootfs, images, tmp_path):
    boot = images / "none.boot"
    m = FuseMount(boot, tmp_path / "mnt", "--blob-dir", images / "blobs")
    try:
        assert_trees_equal(rootfs, m.mnt, check_symlink_mtime=True)
        blob = images / "blobs" / RafsImage.open(str(boot)).blobs[0].blob_id
        with erofs_mount(boot, tmp_path / "kmnt", [blob]) as kmnt:
            assert_trees_equal(kmnt, m.mnt, check_symlink_mtime=True)
        st = os.statvfs(m.mnt)
        assert st.f_files >= 8000 and st.f_blocks * st.f_frsize >= 150 << 20  # statfs reports the image
    finally:
        m.stop()


def test_chroot_python3_runs_from_the_mount(images, tmp_path):
    m = FuseMount(images / "zstd.boot", tmp_path / "mnt", "--config", _cache_config(tmp_path, images))
    try:
        p = subprocess.run(["chroot", str(m.mnt), "/usr/bin/python3", "-c", "import json, sqlite3; print(42)"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and p.stdout == "42\n", p.stderr
        # the interpreter, its stdlib and libsqlite3 really came through the daemon's cache
        assert any((tmp_path / "cache").iterdir())
    finally:
        m.stop()


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_soak_32_readers_random_ranges(rootfs, images, tmp_path):
    """32 threads x 60 s of random reads (random file, offset and size; the pages dropped after each read so the
    next one reaches the daemon): zero mismatches, and the daemon's RSS stays below a bound and does not creep up."""
    files: list[tuple[str, int]] = []
    for dirpath, _dirs, names in os.walk(rootfs):
        for n in names:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if st.st_mode & 0o170000 == 0o100000 and st.st_size > 0:
                files.append((os.path.relpath(p, rootfs), st.st_size))
    assert len(files) > 5000
    m = FuseMount(images / "zstd.boot", tmp_path / "mnt", "--config", _cache_config(tmp_path, images))
    pid = m.proc.pid
    errors: list[str] = []
    counts = [0] * SOAK_THREADS
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def reader(i: int) -> None:
        rnd = random.Random(i)
        try:
            while not stop.is_set():
                rel, size = rnd.choice(files)
                off = rnd.randrange(size)
                n = rnd.choice((1, 4096, 65536, 1 << 20, rnd.randrange(1, 300_000)))
                with open(os.path.join(rootfs, rel), "rb") as f:
                    want = os.pread(f.fileno(), n, off)
                fd = os.open(os.path.join(m.mnt, rel), os.O_RDONLY)
                try:
                    got = os.pread(fd, n, off)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the next read of it goes to the daemon
                finally:
                    os.close(fd)
                counts[i] += 1
                if got != want:
                    errors.append(f"{rel} @{off}+{n}: got {len(got)} bytes, want {len(want)}")
        except Exception as e:  # noqa: BLE001 - an EIO or a crash is a failure of the soak, reported below
            errors.append(f"reader {i}: {type(e).__name__}: {e}")

    def sampler() -> None:
        t0 = time.monotonic()
        while not stop.wait(0.5):
            samples.append((time.monotonic() - t0, _rss_kb(pid)))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(SOAK_THREADS)]
    threads.append(threading.Thread(target=sampler))
    try:
        for t in threads:
            t.start()
        stop.wait(SOAK_SECONDS)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        m.stop()
    assert not errors, errors[:10]
    assert min(counts) > 0 and sum(counts) > 2000, counts
    rss = [kb for _t, kb in samples]
    q = len(rss) // 4
    first, last = max(rss[:q]), max(rss[-q:])
    print(f"soak: {sum(counts)} reads, daemon RSS first-quarter max {first // 1024} MiB, last-quarter max "
          f"{last // 1024} MiB, overall max {max(rss) // 1024} MiB ({len(rss)} samples)")
    assert max(rss) < RSS_LIMIT_MB * 1024, f"daemon RSS peaked at {max(rss) // 1024} MiB"
    assert last <= first * 1.5 + RSS_GROWTH_SLACK_MB * 1024, f"daemon RSS grew from {first} KiB to {last} KiB"
