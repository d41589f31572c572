"""Full disks, crashes and power loss (review M1, M5): nothing wrong is ever served, and nothing half-written is
ever taken for whole.

* a cache directory on a small loop-mounted ext4 that fills up, under a real FUSE mount: every file reads right, and
  the daemon says once that it stopped caching;
* kill -9 of the FUSE daemon under 16 concurrent readers, then a new mount over the same cache directory: every file
  reads right;
* files replaced whole (bootstraps, manifests, blobs) are fsync'ed before their rename and get the umask's mode.
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import struct
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from conftest import is_mounted, needs_fuse, run_rafsfs_proc
from rafsfs.image import RafsImage
from rafsfs.storage.cache.blob_file import DATA_SUFFIX, MAP_SUFFIX, entries_of, ready_map


class SmallExt4:
    """A fresh ext4 of ``size_mib`` MiB, loop-mounted at ``where``; unmounted and removed by :meth:`remove`."""

    def __init__(self, where: Path, size_mib: int = 8):
        self.where = where
        self.img = where.with_suffix(".img")
        with open(self.img, "wb") as f:
            f.truncate(size_mib << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(self.img)], check=True, capture_output=True)
        where.mkdir()
        self.mount()

    def mount(self) -> None:
        subprocess.run(["mount", "-o", "loop", str(self.img), str(self.where)], check=True, capture_output=True)

    def umount(self) -> None:
        for _ in range(50):
            if subprocess.run(["umount", str(self.where)], capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"cannot unmount {self.where}")

    def power_cut(self) -> None:
        """What a power loss leaves: the file system stops where it is, with nothing more written (ext4's
        shutdown ioctl, flag NOLOGFLUSH: not even the journal), then it is mounted again."""
        fd = os.open(self.where, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
        finally:
            os.close(fd)
        self.umount()
        self.mount()

    def remove(self) -> None:
        if is_mounted(self.where):
            try:
                self.umount()
            except AssertionError:
                subprocess.run(["umount", "-l", str(self.where)], capture_output=True)  # never left behind
                raise
        self.img.unlink()


EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


@contextmanager
def small_ext4(where: Path, size_mib: int = 8):
    fs = SmallExt4(where, size_mib)
    try:
        yield fs
    finally:
        fs.remove()


def _image(d: Path, nfiles: int, size: int, seed: int) -> tuple[Path, Path, dict[str, bytes]]:
    src = d / "src"
    src.mkdir()
    rnd = random.Random(seed)
    files = {}
    for i in range(nfiles):
        files[f"f{i:02}"] = rnd.randbytes(size + i * 4099)  # incompressible: the cache holds what was fetched
        (src / f"f{i:02}").write_bytes(files[f"f{i:02}"])
    run_rafsfs_proc("build", src, "--bootstrap", d / "boot", "--blob-dir", d / "blobs", "--chunk-size", "256K",
                    check=0)
    return d / "boot", d / "blobs", files


def _config(path: Path, blobs: Path, work: Path) -> Path:
    path.write_text(json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}},
                                           "cache": {"type": "blobcache", "config": {"work_dir": str(work)}}}}))
    return path


def _read_concurrently(mnt: Path, files: dict[str, bytes], readers: int = 16, rounds: int = 2) -> list[str]:
    """``readers`` threads reading every file in pieces, each in its own order; the names of wrong files."""
    wrong: list[str] = []
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            for _ in range(rounds):
                for name in rnd.sample(sorted(files), len(files)):
                    with open(mnt / name, "rb") as f:
                        got = b""
                        while piece := f.read(rnd.choice([4096, 65536, 300_000])):
                            got += piece
                    if got != files[name]:
                        wrong.append(name)
        except BaseException as e:  # noqa: BLE001 -- reported by the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return wrong


@needs_fuse
def test_full_cache_disk_serves_every_file_and_says_so_once(tmp_path):
    """24 MiB of files through a cache on an 8 MiB ext4: the disk fills up mid-read; readers still get every byte
    (on the old code: EIO for every chunk whose write failed), and the daemon logs one line about it."""
    from test_fuse import FuseMount

    boot, blobs, files = _image(tmp_path, 12, 2 << 20, 1)
    with small_ext4(tmp_path / "small") as fs:
        small = fs.where
        cfg = _config(tmp_path / "cfg.json", blobs, small / "cache")
        m = FuseMount(boot, tmp_path / "mnt", "--config", cfg)
        try:
            assert _read_concurrently(m.mnt, files, readers=8, rounds=1) == []
            assert _read_concurrently(m.mnt, files, readers=4, rounds=1) == []  # partly cached, partly not
        finally:
            err = m.stop()
        st = os.statvfs(small)
        assert st.f_bavail * st.f_frsize < 1 << 20, "the cache disk never filled up: make the image bigger"
        lines = [ln for ln in err.splitlines() if "straight from the backend" in ln]
        assert len(lines) == 1 and "No space left on device" in lines[0], err[-3000:]
        # what did get stored is right: every ready chunk of the entry holds its verified bytes
        blob = RafsImage.open(str(boot)).blobs[0]
        (name,) = entries_of(str(small / "cache"), blob.blob_id)
        ready = ready_map(str(small / "cache" / (name + MAP_SUFFIX)))
        assert ready is not None and 0 < ready.count(1) < blob.chunk_count
        _assert_ready_chunks_right(boot, blobs, small / "cache" / (name + DATA_SUFFIX), ready)


def _assert_ready_chunks_right(boot: Path, blobs: Path, data_path: Path, ready: bytes) -> None:
    from rafsfs.compression import digest
    from rafsfs.storage.backend.localfs import LocalFsBackend
    from rafsfs.storage.cache.none import DirectChunkSource

    img = RafsImage.open(str(boot))
    blob = img.blobs[0]
    src = DirectChunkSource(LocalFsBackend(str(blobs)))
    with open(data_path, "rb") as f:
        for ci in range(blob.chunk_count):
            if ready[ci] == 1:
                ref = src.meta(blob).chunk_ref(ci)
                info, dg = ref.info, ref.digest
                f.seek(info.uncompressed_offset)
                assert digest(blob.digester, f.read(info.uncompressed_size)) == dg, f"chunk {ci}"


# ---------------------------------------------------------------------------- power loss (M5)
@needs_fuse
def test_replaced_files_and_blobs_survive_a_power_cut(tmp_path):
    """Files written through ``replacing`` (bootstraps, manifests, mount configs) and blobs written by the builder
    are whole after a power cut right after they were written (on the old code they were missing: no fsync, the
    journal never got them)."""
    from rafsfs.atomic import write_text
    from rafsfs.builder import BuildOptions, build

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(random.Random(3).randbytes(300_000))
    with small_ext4(tmp_path / "small") as fs:
        write_text(str(fs.where / "manifest.json"), "{}" * 10_000)
        build(BuildOptions(source=str(src), bootstrap=str(fs.where / "image.boot"), blob_dir=str(fs.where / "blobs"),
                           compressor="zstd"))
        (blob,) = (fs.where / "blobs").iterdir()
        fs.power_cut()
        assert (fs.where / "manifest.json").read_text() == "{}" * 10_000
        import hashlib

        assert hashlib.sha256((fs.where / "blobs" / blob.name).read_bytes()).hexdigest() == blob.name
        with RafsImage.open(str(fs.where / "image.boot")) as img:  # the bootstrap too
            assert img.blobs[0].blob_id == blob.name


@needs_fuse
def test_cached_chunks_are_durable_before_they_are_ready(tmp_path):
    """A read through the chunk cache, then a power cut: every chunk the map calls ready holds its verified bytes,
    and the bytes of every chunk the read stored are on the disk (fdatasync before the map bytes; on the old code
    nothing was synced and the chunks' bytes were lost)."""
    from rafsfs.storage.backend.localfs import LocalFsBackend
    from rafsfs.storage.cache.chunk_cache import CacheOptions, ChunkCache

    boot, blobs, files = _image(tmp_path, 4, 1 << 20, 2)
    img = RafsImage.open(str(boot))
    blob = img.blobs[0]
    with small_ext4(tmp_path / "small", 16) as fs:
        cache = ChunkCache(LocalFsBackend(str(blobs)), CacheOptions(work_dir=str(fs.where / "cache")))
        for p, ino in img.walk():
            if ino.is_reg():
                assert img.read(ino, 0, ino.size, cache) == files[os.fsdecode(p).lstrip("/")]
        cache.close()
        fs.power_cut()
        (name,) = entries_of(str(fs.where / "cache"), blob.blob_id)
        ready = ready_map(str(fs.where / "cache" / (name + MAP_SUFFIX))) or bytes(blob.chunk_count)
        _assert_ready_chunks_right(boot, blobs, fs.where / "cache" / (name + DATA_SUFFIX), ready)
        _assert_ready_chunks_right(boot, blobs, fs.where / "cache" / (name + DATA_SUFFIX), b"\1" * blob.chunk_count)


def test_replaced_files_get_the_umask_mode(tmp_path):
    """``replacing`` and the builder's blobs honour the umask (the old code forced 0644: a pull into a private
    directory published its files to every local user)."""
    from rafsfs.atomic import write_text
    from rafsfs.builder import BuildOptions, build

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 5000)
    old = os.umask(0o027)
    try:
        write_text(str(tmp_path / "t"), "text")
        build(BuildOptions(source=str(src), bootstrap=str(tmp_path / "boot"), blob_dir=str(tmp_path / "blobs")))
    finally:
        os.umask(old)
    (blob,) = (tmp_path / "blobs").iterdir()
    assert oct((tmp_path / "t").stat().st_mode & 0o777) == "0o640"
    assert oct(blob.stat().st_mode & 0o777) == "0o640"
    write_text(str(tmp_path / "t"), "again")  # the umask of the moment
    assert oct((tmp_path / "t").stat().st_mode & 0o777) == oct(0o666 & ~old)


# ---------------------------------------------------------------------------- kill -9 of the daemon
def _ready_count(work: Path, blob_id: str) -> int:
    names = entries_of(str(work), blob_id)
    if not names:
        return 0
    try:
        return (ready_map(str(work / (names[0] + MAP_SUFFIX))) or b"").count(1)
    except FileNotFoundError:
        return 0


@needs_fuse
def test_kill_9_of_the_fuse_daemon_under_16_readers(tmp_path):
    """The FUSE daemon is killed with SIGKILL while 16 readers fill its cache (at a different point each round):
    no reader ever got wrong bytes, and a new mount over the same cache directory serves every file right."""
    from test_fuse import FuseMount

    boot, blobs, files = _image(tmp_path, 16, 1 << 20, 5)
    blob = RafsImage.open(str(boot)).blobs[0]
    work = tmp_path / "cache"
    cfg = _config(tmp_path / "cfg.json", blobs, work)
    rnd = random.Random(6)
    kills = 0
    for round_ in range(3):
        m = FuseMount(boot, tmp_path / f"mnt{round_}", "--config", cfg)
        wrong: list[str] = []
        done = threading.Event()

        def readers() -> None:
            try:
                wrong.extend(_read_until_dead(m.mnt, files, 16, seed=round_))
            finally:
                done.set()

        t = threading.Thread(target=readers)
        t.start()
        target = int(blob.chunk_count * rnd.uniform(0.1, 0.8))
        while not done.is_set() and _ready_count(work, blob.blob_id) < target:
            time.sleep(0.005)
        if not done.is_set():
            m.proc.send_signal(signal.SIGKILL)
            kills += 1
        m.proc.wait()
        t.join()
        subprocess.run(["umount", "-l", str(m.mnt)], capture_output=True)
        m.proc.communicate()
        assert wrong == [], f"round {round_}: wrong bytes read from {wrong}"
        (name,) = entries_of(str(work), blob.blob_id)
        _assert_ready_chunks_right(boot, blobs, work / (name + DATA_SUFFIX),
                                   ready_map(str(work / (name + MAP_SUFFIX))) or b"")
    assert kills >= 1, "every round finished before the kill: make the image bigger"
    m = FuseMount(boot, tmp_path / "mnt-final", "--config", cfg)
    try:
        assert _read_concurrently(m.mnt, files, readers=16, rounds=1) == []
    finally:
        m.stop()


def _read_until_dead(mnt: Path, files: dict[str, bytes], readers: int, seed: int) -> list[str]:
    """Like :func:`_read_concurrently`, but a reader stops at the first error (the daemon is gone): only bytes
    that were returned are judged."""
    wrong: list[str] = []

    def run(i: int) -> None:
        rnd = random.Random(seed * 100 + i)
        try:
            for _ in range(2):
                for name in rnd.sample(sorted(files), len(files)):
                    with open(mnt / name, "rb") as f:
                        got = f.read()
                    if got != files[name]:
                        wrong.append(name)
        except OSError:
            return

    threads = [threading.Thread(target=run, args=(i,)) for i in range(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return wrong
