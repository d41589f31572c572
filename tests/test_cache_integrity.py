"""Cached bytes belong to the reader's image (review H2, L1, L2, L4).

Two images can name one blob id with different contents (a crafted image naming a popular layer's id, or a broken
one): whichever reads first, through one shared cache directory, in one process or several, each reads only its
own bytes.  Images that agree on the blob's chunk table share one entry and fetch each chunk once.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rafsfs.builder import BuildOptions, build
from rafsfs.errors import BlobUnavailable
from rafsfs.image import RafsImage
from rafsfs.storage.backend.localfs import LocalFsBackend
from rafsfs.storage.cache.blob_file import DATA_SUFFIX, MAP_SUFFIX, BlobCacheFile, EntryBusy, entries_of, ready_map
from rafsfs.storage.cache.chunk_cache import CacheOptions, ChunkCache
from test_chunk_cache import CountingBackend

CS = 64 << 10


def _build(d: Path, name: str, files: dict[str, bytes], compressor: str = "zstd",
           blob_id: str | None = None) -> tuple[Path, Path]:
    """Build ``files`` into ``d/name.boot`` and a blob directory of its own; with ``blob_id``, the image is then
    made to name that id for its blob (bootstrap rewritten, blob file renamed): same id, other contents."""
    src = d / f"src-{name}"
    src.mkdir()
    for fn, data in files.items():
        (src / fn).write_bytes(data)
    boot, blobs = d / f"{name}.boot", d / f"blobs-{name}"
    build(BuildOptions(source=str(src), bootstrap=str(boot), blob_dir=str(blobs), compressor=compressor,
                       chunk_size=CS))
    if blob_id is not None:
        own = RafsImage.open(str(boot)).blobs[0].blob_id
        if own != blob_id:
            boot.write_bytes(boot.read_bytes().replace(own.encode(), blob_id.encode()))
            (blobs / own).rename(blobs / blob_id)
    return boot, blobs


def _read_all(boot: Path, cache: ChunkCache) -> dict[str, bytes]:
    img = RafsImage.open(str(boot))
    return {os.fsdecode(p).lstrip("/"): img.read(ino, 0, ino.size, cache) for p, ino in img.walk() if ino.is_reg()}


def _pair(d: Path, seed: int, sizes: list[int], edit: int | None, compressor: str = "zstd"):
    """Image A, and image B naming A's blob id: B's files are A's with one byte changed (``edit``: an offset into
    the first file; most chunks then agree, digests included) or other random files (``edit`` None)."""
    rnd = random.Random(seed)
    files_a = {f"f{i}": rnd.randbytes(n) for i, n in enumerate(sizes)}
    if edit is None:
        files_b = {f"f{i}": rnd.randbytes(n + 4096 * i) for i, n in enumerate(sizes)}
    else:
        files_b = dict(files_a)
        first = bytearray(files_a["f0"])
        first[edit % len(first)] ^= 0x5A
        files_b["f0"] = bytes(first)
    boot_a, blobs_a = _build(d, "a", files_a, compressor)
    blob_id = RafsImage.open(str(boot_a)).blobs[0].blob_id
    boot_b, blobs_b = _build(d, "b", files_b, compressor, blob_id=blob_id)
    assert RafsImage.open(str(boot_b)).blobs[0].blob_id == blob_id
    return (boot_a, blobs_a, files_a), (boot_b, blobs_b, files_b)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), sizes=st.lists(st.integers(1, 3 * CS + 100), min_size=1, max_size=3),
       edit=st.one_of(st.none(), st.integers(0, 1 << 20)), b_first=st.booleans(),
       compressor=st.sampled_from(["zstd", "none"]))
def test_two_images_naming_one_blob_id_read_only_their_own_bytes(seed, sizes, edit, b_first, compressor):
    with tempfile.TemporaryDirectory() as t:
        d = Path(t)
        a, b = _pair(d, seed, sizes, edit, compressor)
        work = str(d / "cache")
        first, second = (b, a) if b_first else (a, b)
        # two caches open at once over one directory: as two daemons of one node (flock is per open file)
        c1 = ChunkCache(LocalFsBackend(str(first[1])), CacheOptions(work_dir=work))
        c2 = ChunkCache(LocalFsBackend(str(second[1])), CacheOptions(work_dir=work))
        try:
            assert _read_all(first[0], c1) == first[2]
            assert _read_all(second[0], c2) == second[2]
            assert _read_all(first[0], c1) == first[2]
        finally:
            c1.close()
            c2.close()
        # restarted daemons, each finding the other's entry on disk (and a backend that must not be asked)
        for boot, blobs, files in (second, first):
            c = ChunkCache(CountingBackend(str(blobs)), CacheOptions(work_dir=work))
            try:
                assert _read_all(boot, c) == files
                assert not c.backend.requests, "its own entry is complete: nothing to fetch"
            finally:
                c.close()


def _config(path: Path, blobs: Path, work: Path) -> Path:
    path.write_text(json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}},
                                           "cache": {"type": "blobcache", "config": {"work_dir": str(work)}}}}))
    return path


@pytest.mark.parametrize("b_first", [False, True])
def test_across_processes(tmp_path, b_first):
    """`rafsfs extract` (a process of its own) through the cache directory another process holds open."""
    from conftest import run_rafsfs_proc
    from treeutil import assert_trees_equal

    a, b = _pair(tmp_path, 3, [2 * CS + 7, CS], edit=CS + 5)
    work = tmp_path / "cache"
    here, there = (b, a) if b_first else (a, b)
    c = ChunkCache(LocalFsBackend(str(here[1])), CacheOptions(work_dir=str(work)))
    try:
        assert _read_all(here[0], c) == here[2]  # filled, and held open while the other process reads
        cfg = _config(tmp_path / "there.json", there[1], work)
        run_rafsfs_proc("extract", there[0], tmp_path / "out", "--config", cfg, check=0)
        assert_trees_equal(tmp_path / f"src-{'a' if there is a else 'b'}", tmp_path / "out", check_mtime=False)
        assert _read_all(here[0], c) == here[2]
    finally:
        c.close()
    # and the other way round, both entries now complete on disk
    run_rafsfs_proc("extract", here[0], tmp_path / "out2", "--config", _config(tmp_path / "here.json", here[1],
                                                                                    work), check=0)
    assert_trees_equal(tmp_path / f"src-{'a' if here is a else 'b'}", tmp_path / "out2", check_mtime=False)
    assert len(entries_of(str(work), RafsImage.open(str(a[0])).blobs[0].blob_id)) == 2


def test_identical_tables_share_one_entry_and_fetch_once(tmp_path):
    """Two bootstraps of one layer (built twice), read from two different blob directories (two registries):
    one entry, each chunk fetched once."""
    import shutil

    rnd = random.Random(8)
    files = {"x": rnd.randbytes(5 * CS), "y": rnd.randbytes(CS // 3)}
    boot1, blobs1 = _build(tmp_path, "one", files)
    boot2, blobs2 = _build(tmp_path, "two", files)
    shutil.rmtree(blobs2)
    shutil.copytree(blobs1, blobs2)
    work = str(tmp_path / "cache")
    c1 = ChunkCache(CountingBackend(str(blobs1)), CacheOptions(work_dir=work))
    c2 = ChunkCache(CountingBackend(str(blobs2)), CacheOptions(work_dir=work))
    try:
        assert _read_all(boot1, c1) == files
        assert c1.backend.requests
        c1.close()
        assert _read_all(boot2, c2) == files
        assert not c2.backend.requests
    finally:
        c2.close()
    assert len(entries_of(work, RafsImage.open(str(boot1)).blobs[0].blob_id)) == 1


def test_an_unverifying_reader_never_feeds_a_verifying_one(tmp_path):
    """A daemon with digest_validate off stores what its backend gives it; a verifying daemon of the same image
    never serves those bytes (on the old code it did: the chunks were marked ready)."""
    import shutil

    rnd = random.Random(9)
    files = {"x": rnd.randbytes(3 * CS)}
    boot, good = _build(tmp_path, "img", files, compressor="none")
    bad = tmp_path / "bad-blobs"
    shutil.copytree(good, bad)
    (blob_file,) = bad.iterdir()
    raw = bytearray(blob_file.read_bytes())
    raw[CS + 100] ^= 0xFF  # inside the second chunk's bytes (uncompressed blob: same offsets)
    blob_file.write_bytes(bytes(raw))
    work = str(tmp_path / "cache")
    lax = ChunkCache(LocalFsBackend(str(bad)), CacheOptions(work_dir=work, verify=False))
    try:
        assert _read_all(boot, lax)["x"] != files["x"]
    finally:
        lax.close()
    strict = ChunkCache(LocalFsBackend(str(good)), CacheOptions(work_dir=work))
    try:
        assert _read_all(boot, strict) == files
    finally:
        strict.close()


def _fds() -> int:
    import gc

    gc.collect()  # fds of files other tests left to the garbage collector
    return len(os.listdir("/proc/self/fd"))


def test_entry_in_use_with_another_header_is_never_reset(tmp_path):
    """Creating and resetting happen under the exclusive lock: an entry another opener holds is never reset under
    it (the second opener is refused and reads without the cache); once it is free, it is reset."""
    img = RafsImage.open(str(_build(tmp_path, "img", {"x": random.Random(1).randbytes(2 * CS)})[0]))
    blob = img.blobs[0]
    work = str(tmp_path / "cache")
    os.makedirs(work)
    key = bytes(range(32))
    held = BlobCacheFile(work, blob, key, verified=True)
    held.write_chunk(0, 0, b"\x11" * CS)
    held.commit([0])
    with pytest.raises(EntryBusy):
        BlobCacheFile(work, blob, key, verified=False)  # same name, other header (unverified)
    assert held.read(0, CS) == b"\x11" * CS and ready_map(held.map_path)[0] == 1
    again = BlobCacheFile(work, blob, key, verified=True)  # the same header: shared, not reset
    assert again.is_ready(0)
    again.close()
    held.close()
    reset = BlobCacheFile(work, blob, key, verified=False)
    assert not reset.is_ready(0) and reset.read(0, CS) == bytes(CS)
    reset.close()


@pytest.mark.allow_log(r"cannot create cache entry")
@pytest.mark.parametrize("size", [1 << 62, (1 << 63) + 4096])
def test_an_entry_too_big_to_create_is_a_clean_error(tmp_path, size):
    """ftruncate fails (EFBIG, or the size does not fit off_t): a one-line error, no fd or lock kept, no files
    left; reads of that blob go to the backend."""
    import dataclasses

    boot, blobs = _build(tmp_path, "img", {"x": random.Random(2).randbytes(2 * CS)})
    img = RafsImage.open(str(boot))
    blob = dataclasses.replace(img.blobs[0], uncompressed_size=size)
    work = tmp_path / "cache"
    work.mkdir()
    before = _fds()
    for _ in range(3):
        with pytest.raises(BlobUnavailable, match="cannot create cache entry"):
            BlobCacheFile(str(work), blob, bytes(32), verified=True)
    assert _fds() == before
    assert list(work.iterdir()) == []
    img.blobs[0] = blob  # the image now claims the huge size
    c = ChunkCache(LocalFsBackend(str(blobs)), CacheOptions(work_dir=str(work)))
    try:
        ino = img.resolve("/x")
        assert img.read(ino, 0, ino.size, c) == random.Random(2).randbytes(2 * CS)
    finally:
        c.close()
    assert _fds() <= before


def test_check_verifies_cached_bytes(tmp_path):
    """`rafsfs check --config` hashes what the cache hands back: a flipped byte in the data file is found (on the
    old code cached chunks counted as verified unread)."""
    from conftest import run_rafsfs_proc

    files = {"x": random.Random(4).randbytes(3 * CS), "y": random.Random(5).randbytes(CS)}
    boot, blobs = _build(tmp_path, "img", files)
    work = tmp_path / "cache"
    cfg = _config(tmp_path / "cfg.json", blobs, work)
    p = run_rafsfs_proc("check", boot, "--config", cfg, check=0)
    assert "0 bad" in p.stdout
    (name,) = entries_of(str(work), RafsImage.open(str(boot)).blobs[0].blob_id)
    assert (ready_map(str(work / (name + MAP_SUFFIX))) or b"").count(1) == 4
    data = work / (name + DATA_SUFFIX)
    raw = bytearray(data.read_bytes())
    raw[CS + 7] ^= 1  # in /x's second chunk
    data.write_bytes(bytes(raw))
    p = run_rafsfs_proc("check", boot, "--config", cfg)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    bad = [ln for ln in p.stderr.splitlines() if ln.startswith("rafsfs: bad:")]
    assert len(bad) == 1 and bad[0].startswith("rafsfs: bad: /x: chunk ") and \
        bad[0].endswith("does not match its digest"), p.stderr


def test_a_fully_cached_blob_needs_no_backend(tmp_path):
    """Once every chunk is in the image's entry, a new process (the mount-time probe) sees it fully cached and
    reads it with the backend gone."""
    files = {"x": random.Random(6).randbytes(3 * CS + 5)}
    boot, blobs = _build(tmp_path, "img", files)
    work = str(tmp_path / "cache")
    c = ChunkCache(LocalFsBackend(str(blobs)), CacheOptions(work_dir=work))
    img = RafsImage.open(str(boot))
    assert not c.fully_cached(img.blobs[0])
    assert _read_all(boot, c) == files
    c.close()
    (tmp_path / "empty").mkdir()
    c = ChunkCache(CountingBackend(str(tmp_path / "empty")), CacheOptions(work_dir=work))
    try:
        img = RafsImage.open(str(boot))
        assert c.fully_cached(img.blobs[0])
        assert _read_all(boot, c) == files and not c.backend.requests
    finally:
        c.close()


def test_an_opener_racing_an_eviction_gets_a_linked_entry(tmp_path, monkeypatch):
    """An entry is evicted while another process opens it: whatever the opener gets, its data file and its map are
    the ones in the directory.  On the old code the evictor unlinked the map first: an opener coming in between the
    two unlinks made a new map over the old data file, which the evictor then unlinked: its chunks went into a file
    nobody could see (and a kernel given ``data_path`` would have found nothing there)."""
    import fcntl
    import threading
    import time

    from rafsfs.storage.cache import store

    img = RafsImage.open(str(_build(tmp_path, "img", {"x": random.Random(4).randbytes(2 * CS)})[0]))
    blob = img.blobs[0]
    work = str(tmp_path / "cache")
    os.makedirs(work)
    key = bytes(range(32))
    BlobCacheFile(work, blob, key, verified=True).close()
    (name,) = entries_of(work, blob.blob_id)

    real_unlink, real_flock = os.unlink, fcntl.flock
    waiting = threading.Event()  # the opener is blocked on the evictor's lock
    opened: list = []

    def flock(fd, op):
        if op == fcntl.LOCK_SH:
            waiting.set()
        return real_flock(fd, op)

    def open_entry() -> None:
        opened.append(BlobCacheFile(work, blob, key, verified=True))

    opener = threading.Thread(target=open_entry)

    def unlink(path, *a, **kw):
        real_unlink(path, *a, **kw)
        if not opener.is_alive() and not opened:  # between the evictor's two unlinks: an opener comes in
            opener.start()
            t_end = time.monotonic() + 30
            while opener.is_alive() and not waiting.is_set() and time.monotonic() < t_end:
                time.sleep(0.01)

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(os, "unlink", unlink)
    assert store.remove_entry(work, name)
    monkeypatch.undo()
    opener.join(30)
    (bc,) = opened
    try:
        assert os.fstat(bc.data_fd).st_nlink == 1 and os.path.samestat(os.fstat(bc.data_fd), os.stat(bc.data_path))
        assert os.fstat(bc.map_fd).st_nlink == 1 and os.path.samestat(os.fstat(bc.map_fd), os.stat(bc.map_path))
        bc.write_chunk(0, 0, b"\x22" * CS)
        bc.commit([0])
    finally:
        bc.close()
    again = BlobCacheFile(work, blob, key, verified=True)
    try:
        assert again.is_ready(0) and again.read(0, CS) == b"\x22" * CS
    finally:
        again.close()


def test_a_look_at_a_new_entry_does_not_turn_its_creator_away(tmp_path):
    """``rafsfs cache ls`` or another daemon's eviction pass tests every map with a brief exclusive lock.  An opener
    creating that entry at the same moment waits for it, then creates the entry: it is not refused as "in use by
    another process" (on the old code it was: EntryBusy, and that blob went uncached for the daemon's lifetime)."""
    import fcntl
    import threading

    from rafsfs.storage.cache.blob_file import entry_name

    img = RafsImage.open(str(_build(tmp_path, "img", {"x": random.Random(5).randbytes(2 * CS)})[0]))
    blob = img.blobs[0]
    work = tmp_path / "cache"
    work.mkdir()
    key = bytes(range(32))
    map_path = work / (entry_name(blob, key) + MAP_SUFFIX)
    map_path.write_bytes(b"")  # the creator's O_CREAT: the file is there, still empty
    looker = os.open(map_path, os.O_RDONLY)
    fcntl.flock(looker, fcntl.LOCK_EX | fcntl.LOCK_NB)  # store._busy() looking at it
    threading.Timer(0.2, os.close, (looker,)).start()
    bc = BlobCacheFile(str(work), blob, key, verified=True)
    try:
        bc.write_chunk(0, 0, b"\x33" * CS)
        bc.commit([0])
        assert ready_map(bc.map_path)[0] == 1
    finally:
        bc.close()


def test_chunks_another_process_stored_are_not_fetched_again_before_their_map_bytes(tmp_path, monkeypatch):
    """Two daemons sharing an entry (fanotify mode: both groups see each read, one after the other): the second
    takes the chunks the first stored as soon as their bytes are in the data file and match its own digests, even
    while their map bytes still wait for the first daemon's fdatasync; a chunk never written is fetched."""
    rnd = random.Random(11)
    files = {"x": rnd.randbytes(4 * CS)}
    boot, blobs = _build(tmp_path, "one", files)
    img = RafsImage.open(str(boot))
    blob = img.blobs[0]
    work = str(tmp_path / "cache")
    c1 = ChunkCache(CountingBackend(str(blobs)), CacheOptions(work_dir=work, readahead=0))
    c2 = ChunkCache(CountingBackend(str(blobs)), CacheOptions(work_dir=work, readahead=0))
    monkeypatch.setattr(c1._committer, "add", lambda bc, cis: None)  # c1's map bytes never reach the disk
    try:
        refs = [c1.meta(blob).chunk_ref(ci) for ci in range(blob.chunk_count)]
        c1.fill(blob, refs[:2])
        assert c1.backend.requests
        c2.fill(blob, [c2.meta(blob).chunk_ref(ci) for ci in range(2)])
        assert not c2.backend.requests, "the first daemon's verified bytes are in the shared data file"
        c2.fill(blob, [c2.meta(blob).chunk_ref(2)])
        assert c2.backend.requests, "a chunk nobody stored is fetched"
        with open(c2.data_path(blob), "rb") as f:
            data = f.read()
        assert data[:len(files["x"])][:3 * CS] == files["x"][:3 * CS]
    finally:
        c1.close()
        c2.close()


def test_a_readahead_claim_keeps_a_second_process_from_fetching_the_same_chunks(tmp_path):
    files = {"x": random.Random(12).randbytes(4 * CS)}
    boot, blobs = _build(tmp_path, "one", files)
    blob = RafsImage.open(str(boot)).blobs[0]
    work = str(tmp_path / "cache")
    c1 = ChunkCache(CountingBackend(str(blobs)), CacheOptions(work_dir=work))
    c2 = ChunkCache(CountingBackend(str(blobs)), CacheOptions(work_dir=work))
    try:
        e1, e2 = c1.entry(blob), c2.entry(blob)
        assert e1.claim(0, 3)
        assert not e2.claim(2, 4), "chunk 2 is claimed by the other open entry"
        assert e2.claim(3, 4)
        e1.release(0, 3)
        assert e2.claim(0, 3)
    finally:
        c1.close()
        c2.close()
