"""Prefetch through a real FUSE mount: ``rafsfs mount --prefetch-files`` and the config's ``fs_prefetch`` fill the
chunk cache in the background; files not asked for stay unfetched."""
from __future__ import annotations

import json
import time

import pytest

from conftest import needs_fuse, run_rafsfs_proc
from test_fuse import FuseMount

from rafsfs.image import RafsImage
from rafsfs.storage.backend.localfs import LocalFsBackend
from rafsfs.storage.cache.blob_file import MAP_SUFFIX, entries_of, ready_map
from rafsfs.storage.cache.none import DirectChunkSource

pytestmark = needs_fuse


@pytest.fixture(scope="module")
def img(tmp_path_factory):
    d = tmp_path_factory.mktemp("prefetch-mount")
    src = d / "src"
    (src / "app" / "lib").mkdir(parents=True)
    rnd = __import__("random").Random(9)
    for i in range(3):
        (src / "app" / "lib" / f"m{i}.so").write_bytes(rnd.randbytes(300_000))
    (src / "app" / "main").write_bytes(rnd.randbytes(200_000))
    (src / "big-unused").write_bytes(rnd.randbytes(1_000_000))
    run_rafsfs_proc("build", src, "--bootstrap", d / "boot", "--blob-dir", d / "blobs", "--chunk-size", "64K",
                    check=0)
    return d


def _ready(d, work, path: str) -> list[bool]:
    image = RafsImage.open(str(d / "boot"))
    blob = image.blobs[0]
    names = entries_of(str(work), blob.blob_id)
    ready = (ready_map(str(work / (names[0] + MAP_SUFFIX))) or b"") if names else b""
    src = DirectChunkSource(LocalFsBackend(str(d / "blobs")))
    refs = image.chunks(image.resolve(path), source=src)
    return [c.ci_index < len(ready) and ready[c.ci_index] == 1 for c in refs]


def _wait(pred, timeout=60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def _config(d, work, **prefetch) -> str:
    cfg = {"device": {"backend": {"type": "localfs", "config": {"dir": str(d / "blobs")}},
                      "cache": {"type": "blobcache", "config": {"work_dir": str(work)}}}}
    if prefetch:
        cfg["fs_prefetch"] = prefetch
    path = work.parent / f"{work.name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_prefetch_files_fill_the_cache_in_background(img, tmp_path):
    work = tmp_path / "cache"
    (tmp_path / "list").write_text("# startup set\n/app/lib\n/app/main\n")
    m = FuseMount(img / "boot", tmp_path / "mnt", "--config", _config(img, work), "--prefetch-files",
                  tmp_path / "list")
    try:
        assert _wait(lambda: all(_ready(img, work, "/app/main")) and all(
            all(_ready(img, work, f"/app/lib/m{i}.so")) for i in range(3)))
        assert not any(_ready(img, work, "/big-unused"))
        assert (m.mnt / "app/lib/m1.so").read_bytes() == (img / "src/app/lib/m1.so").read_bytes()
    finally:
        err = m.stop()
    assert "prefetch started" in err


def test_config_prefetch_all_fetches_every_chunk(img, tmp_path):
    work = tmp_path / "cache"
    m = FuseMount(img / "boot", tmp_path / "mnt", "--config", _config(img, work, enable=True, prefetch_all=True))
    try:
        assert _wait(lambda: all(_ready(img, work, "/big-unused")) and all(_ready(img, work, "/app/main")))
    finally:
        m.stop()
