"""Full disks, crashes and power loss (review M1, M5): nothing wrong is ever served, and nothing half-written is
ever taken for whole.

* a cache directory on a small loop-mounted ext4 that fills up, under a real FUSE mount: every file reads right, and
  the daemon says once that it stopped caching;
* kill -9 of the FUSE daemon under 16 concurrent readers, then a new mount over the same cache directory: every file
  reads right;
* files replaced whole (bootstraps, manifests, blobs) are fsync'ed before their rename and get the umask's mode.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import is_mounted, needs_fuse, run_rafsfs_proc
from rafsfs.image import RafsImage
from rafsfs.storage.cache.blob_file import DATA_SUFFIX, MAP_SUFFIX, entries_of, ready_map


@contextmanager
def small_ext4(where: Path, size_mib: int = 8):
    """A fresh ext4 of ``size_mib`` MiB, loop-mounted at ``where``; unmounted and removed afterwards."""
    img = where.with_suffix(".img")
    with open(img, "wb") as f:
        f.truncate(size_mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(img)], check=True, capture_output=True)
    where.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(where)], check=True, capture_output=True)
    try:
        yield where
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(where)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        img.unlink()


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
    with small_ext4(tmp_path / "small") as small:
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
    from rafsfs.storage.direct import DirectChunkSource

    img = RafsImage.open(str(boot))
    blob = img.blobs[0]
    src = DirectChunkSource(LocalFsBackend(str(blobs)))
    with open(data_path, "rb") as f:
        for ci in range(blob.chunk_count):
            if ready[ci] == 1:
                info, dg = img.chunk_info(blob.index, ci, src)
                f.seek(info.uncompressed_offset)
                assert digest(blob.digester, f.read(info.uncompressed_size)) == dg, f"chunk {ci}"
