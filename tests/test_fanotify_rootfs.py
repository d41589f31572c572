"""fanotify mode on a real Debian rootfs (tests/rootfs_cache.py), host kernel:

* the mount equals the source tree (types, modes, owners, xattrs, bytes); python3 runs from it under ``chroot``
  (exec and the loader's mmap of its libraries, all page faults on a cold cache), and an mmap'd library reads back
  byte-exact;
* 32 readers x random reads for ``RAFSFS_FANOTIFY_SOAK`` seconds (60 in CI), page cache dropped now and then so the
  kernel keeps asking: zero mismatches, zero errors;
* kill -9 of the filling worker at random moments during cold reads from a registry: not one byte differs from the
  source (EIO would be allowed; zeros are not), and the mount keeps working with the successor.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import run_rafsfs_proc
from registry_env import start_registry
from test_fanotify import _WHY, REPO_NAME, FanotifyMount, _config, children, drop_caches
from treeutil import assert_trees_equal

from rafsfs.image import RafsImage

pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"fanotify mode unavailable: {_WHY}")

SOAK_SECONDS = float(os.environ.get("RAFSFS_FANOTIFY_SOAK", "60"))
SOAK_THREADS = 32
KILLS = 6


@pytest.fixture(scope="module")
def image(rootfs, tmp_path_factory):
    d = tmp_path_factory.mktemp("fan-rootfs")
    run_rafsfs_proc("build", rootfs, "--bootstrap", d / "zstd.boot", "--blob-dir", d / "blobs", "--compressor", "zstd",
                    check=0)
    return d / "zstd.boot", d / "blobs"


@pytest.fixture(scope="module")
def files(rootfs) -> list[tuple[str, int]]:
    """(relative path, size) of every non-empty regular file of the rootfs."""
    out = []
    for root, _, names in os.walk(rootfs):
        for n in names:
            p = os.path.join(root, n)
            if os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p):
                out.append((os.path.relpath(p, rootfs), os.path.getsize(p)))
    return sorted(out)


@pytest.fixture(autouse=True)
def _run_dir(tmp_path, monkeypatch):
    (tmp_path / "docker-config").mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    monkeypatch.setenv("RAFSFS_FANOTIFY_RUN", str(tmp_path / "run"))


def test_rootfs_equals_source_and_runs_python_mmap_exec(rootfs, image, tmp_path):
    boot, blobs = image
    m = FanotifyMount(boot, tmp_path / "mnt", tmp_path / "cache", "--blob-dir", blobs)
    try:
        # cold: exec of python3 and the loader's mmap of its libraries are page faults the daemon fills
        p = subprocess.run(["chroot", str(m.mnt), "/usr/bin/python3", "-c", "import json, sqlite3; print(42)"],
                           capture_output=True, text=True, timeout=120)
        assert (p.returncode, p.stdout.strip()) == (0, "42"), p.stderr
        libs = sorted((rootfs / "usr/lib/x86_64-linux-gnu").glob("libsqlite3.so.*"))
        lib = next(x for x in libs if x.is_file() and not x.is_symlink())
        rel = lib.relative_to(rootfs)
        drop_caches()
        with open(m.mnt / rel, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
            want = lib.read_bytes()
            order = list(range(0, len(want), 4096))
            random.Random(3).shuffle(order)
            for off in order:  # faults in random order
                assert mm[off:off + 4096] == want[off:off + 4096], off
        assert_trees_equal(rootfs, m.mnt, check_symlink_mtime=True)
        st = m.fanotify_stats(lambda st: st["events"] > 0)
        assert st["events"] > 0 and st["denied"] == 0
    except BaseException:
        m.kill()
        raise
    m.stop()


def test_32_readers_random_reads_no_mismatch(rootfs, image, files, tmp_path):
    boot, blobs = image
    m = FanotifyMount(boot, tmp_path / "mnt", tmp_path / "cache", "--blob-dir", blobs)
    stop = time.monotonic() + SOAK_SECONDS
    reads, bad, errors = [0], [], []
    lock = threading.Lock()

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        while time.monotonic() < stop and not bad:
            rel, size = rnd.choice(files)
            off = rnd.randrange(size)
            n = rnd.choice((1, 4096, 65536, 1 << 20))
            try:
                with open(m.mnt / rel, "rb", buffering=0) as f:
                    if rnd.random() < 0.05:  # evict: the next miss asks the daemon again (while the mark stays)
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                    got = os.pread(f.fileno(), n, off)
                with open(rootfs / rel, "rb", buffering=0) as f:
                    want = os.pread(f.fileno(), n, off)
            except OSError as e:
                errors.append(f"{rel}@{off}: {e}")
                return
            with lock:
                reads[0] += 1
                if got != want:
                    bad.append(f"{rel}@{off}+{n}")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(SOAK_THREADS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(SOAK_SECONDS + 120)
        assert not any(t.is_alive() for t in threads), "a reader hung"
        assert bad == [] and errors == [], (bad[:5], errors[:5])
        assert reads[0] > 1000, reads
        assert m.fanotify_stats(lambda st: st["events"] > 0)["events"] > 0
    except BaseException:
        m.kill()
        raise
    m.stop()


@pytest.mark.allow_log()
def test_kill9_of_the_filler_during_cold_reads_never_differs(rootfs, image, files, tmp_path):
    """Cold reads of every file from a loopback registry by 16 concurrent readers while the worker is SIGKILLed KILLS times at
    random moments (mid-fetch, between read and answer, ...): every byte read equals the source (an EIO would be
    allowed, zeros never); the successor answers the orphans and the mount reads the whole tree right after."""
    boot, blobs = image
    blob_id = RafsImage.open(str(boot)).blobs[0].blob_id
    with start_registry(tmp_path / "reg") as reg:
        reg.push_blob(REPO_NAME, blobs / blob_id)
        cfg = _config(tmp_path / "nydusd.json", reg.nydusd_config(REPO_NAME, tmp_path / "cache"))
        m = FanotifyMount(boot, tmp_path / "mnt", tmp_path / "cache", "--config", cfg)
        order = list(files)
        random.Random(11).shuffle(order)
        bad, eio, done = [], [], threading.Event()

        def reader(part: list[tuple[str, int]]) -> None:
            for rel, _ in part:
                try:
                    got = hashlib.sha256((m.mnt / rel).read_bytes()).digest()
                except OSError as e:
                    eio.append(f"{rel}: {e}")
                    continue
                if got != hashlib.sha256((rootfs / rel).read_bytes()).digest():
                    bad.append(rel)

        kills = []

        def killer() -> None:
            rnd = random.Random(5)
            while len(kills) < KILLS and not done.is_set():
                time.sleep(rnd.uniform(0.1, 2.0))
                kids = children(m.pid)
                if kids:
                    os.kill(kids[0], signal.SIGKILL)
                    kills.append(kids[0])

        threads = [threading.Thread(target=reader, args=(order[i::16],)) for i in range(16)]
        k = threading.Thread(target=killer)
        try:
            for t in threads:
                t.start()
            k.start()
            for t in threads:
                t.join(600)
            done.set()
            k.join()
            assert bad == [], bad[:10]
            assert len(kills) >= 3, kills
            assert m.log_text().count("died (signal 9)") == len(kills)
            drop_caches()  # and the mount keeps working with the last successor
            assert_trees_equal(rootfs, m.mnt)
        except BaseException:
            done.set()
            m.kill()
            raise
        m.stop()
        print(f"{len(kills)} kills, {len(eio)} EIO reads, recovered: "
              f"{m.log_text().count('left by the previous filler')} times")
