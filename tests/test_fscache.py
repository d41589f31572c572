"""fscache mode, tested under a real kernel with EROFS over on-demand cachefiles: the shared test VM (a 6.12 kernel
under qemu, ``../shared/vm/run-in-vm.sh``) is booted ONCE for this module and runs tests/vm/guest_fscache.py inside.

The host side builds the images (zstd, lz4, uncompressed; two images sharing one blob; two big files), snapshots the
source trees, starts a real ``docker-registry`` on 127.0.0.1 holding the zstd blob (forwarded into the VM with
``--fwd``), boots the VM and reports every guest test as one test here, with the guest's failure text.
Nothing here is skipped: a host without qemu or the shared VM fails (CI installs qemu-system-x86 and socat).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, run_rafsfs_proc
from containerd_env import ThrottleProxy, guest_test_names, run_guest_pytest
from registry_env import start_registry
from treeutil import make_small_tree, make_tricky_tree, snapshot_tree

from rafsfs.image import RafsImage

GUEST_FILE = REPO / "tests" / "vm" / "guest_fscache.py"
VM_TIMEOUT = 900  # the whole guest session; it normally takes a few minutes under TCG emulation


def _build(src: Path, boot: Path, blobs: Path, comp: str, chunk: str = "1M") -> str:
    run_rafsfs_proc("build", src, "--bootstrap", boot, "--blob-dir", blobs, "--compressor", comp, "--chunk-size",
                    chunk, check=0)
    with RafsImage.open(str(boot)) as img:
        return img.blobs[0].blob_id


@pytest.fixture(scope="module")
def vm_results(tmp_path_factory, shared_dir):
    run_in_vm = shared_dir / "vm" / "run-in-vm.sh"
    assert run_in_vm.is_file(), f"{run_in_vm} is missing"
    work = tmp_path_factory.mktemp("fscache-vm")
    blobs = work / "blobs"
    snaps = work / "snapshots"
    snaps.mkdir()

    def snapshot(name: str, root: Path) -> str:
        path = snaps / f"{name}.pickle"
        with open(path, "wb") as f:
            pickle.dump(snapshot_tree(root), f)
        return str(path)

    tricky = work / "tricky"
    make_tricky_tree(tricky)
    images = {c: str(work / f"tricky-{c}.boot") for c in ("zstd", "lz4", "none")}
    for c in images:
        _build(tricky, Path(images[c]), blobs, c)

    # two images sharing one blob: the same file data, and an extra empty directory in the second tree
    shared_a, shared_b = work / "shared-a", work / "shared-b"
    for root in (shared_a, shared_b):
        make_small_tree(root)
        (root / "dir" / "more.bin").write_bytes(random.Random(5).randbytes(300_000))
    (shared_b / "only-in-b").mkdir()
    ida = _build(shared_a, work / "shared-a.boot", blobs, "zstd", "64K")
    idb = _build(shared_b, work / "shared-b.boot", blobs, "zstd", "64K")
    assert ida == idb, "the two shared-blob images do not share their blob"
    with RafsImage.open(str(work / "shared-a.boot")) as img:
        shared_chunks = img.blobs[0].chunk_count

    small = work / "small"  # served from the registry, in all three compressions
    make_small_tree(small)
    (small / "more.bin").write_bytes(random.Random(6).randbytes(200_000))
    registry_images = {c: str(work / f"small-{c}.boot") for c in ("zstd", "lz4", "none")}
    registry_blobs = [_build(small, Path(registry_images[c]), blobs, c, "64K") for c in registry_images]

    big = work / "big"
    big.mkdir()
    data = random.Random(9).randbytes(12 << 20)
    (big / "big.bin").write_bytes(data)
    big_blob = _build(big, work / "big.boot", blobs, "zstd")

    # read through a fault proxy the guest starts: 36 one-MiB chunks of random bytes (a ~36 MiB blob)
    faults = work / "faults"
    faults.mkdir()
    (faults / "data.bin").write_bytes(random.Random(12).randbytes(36 << 20))
    faults_blob = _build(faults, work / "faults.boot", blobs, "zstd")

    with start_registry(work / "registry") as reg:
        for blob_id in registry_blobs + [big_blob, faults_blob]:
            reg.push_blob("rafsfs/fscache", blobs / blob_id)
        port = reg.port
        # the big image reads through a relay whose pace the guest sets: slow enough to kill the daemon mid-read
        proxy = ThrottleProxy(port, work / "throttle")
        big_cfg = work / "big.json"
        big_cfg.write_text(json.dumps({"device": {
            "backend": {"type": "registry", "config": {"host": f"10.0.2.100:{proxy.port}", "repo": "rafsfs/fscache",
                                                        "scheme": "http", "timeout": 60}},
            "cache": {"type": "none"}}}))
        reg_cfg = work / "registry.json"
        reg_cfg.write_text(json.dumps({"device": {
            "backend": {"type": "registry", "config": {"host": f"10.0.2.100:{port}", "repo": "rafsfs/fscache",
                                                        "scheme": "http", "timeout": 60}},
            "cache": {"type": "none"}}}))
        params = {
            "blob_dir": str(blobs), "images": images, "registry_config": str(reg_cfg),
            "registry_images": registry_images,
            "snapshots": {"tricky": snapshot("tricky", tricky), "small": snapshot("small", small),
                          "shared_a": snapshot("shared_a", shared_a),
                          "shared_b": snapshot("shared_b", shared_b)},
            "shared": {"a": str(work / "shared-a.boot"), "b": str(work / "shared-b.boot"), "blob_id": ida,
                       "chunks": shared_chunks},
            "big": {"image": str(work / "big.boot"), "path": "big.bin", "sha256": hashlib.sha256(data).hexdigest(),
                    "config": str(big_cfg), "throttle": str(work / "throttle")},
            "faults": {"image": str(work / "faults.boot"), "path": "data.bin", "source": str(faults / "data.bin"),
                       "blob_id": faults_blob, "registry": ["10.0.2.100", port], "repo": "rafsfs/fscache"},
        }
        try:
            results, output, _ = run_guest_pytest(run_in_vm, GUEST_FILE, work, params, [port, proxy.port],
                                                  VM_TIMEOUT)
        finally:
            proxy.close()
    print(output)  # the guest's summary and durations (shown with -s or -rA)
    if not results:
        pytest.fail(f"the VM produced no test report\n{output}", pytrace=False)
    return results, output


@pytest.mark.parametrize("name", guest_test_names(GUEST_FILE))
def test_in_vm(vm_results, name):
    results, output = vm_results
    if name not in results:
        pytest.fail(f"guest test {name} did not run\n{output}", pytrace=False)
    status, text = results[name]
    if status != "passed":  # skipped counts as a failure: these tests must run in the VM
        pytest.fail(f"guest test {name} {status}:\n{text[-6000:]}", pytrace=False)


def test_forced_fscache_on_a_kernel_without_it_is_one_line(tmp_path):
    """This host's kernel has no on-demand cachefiles (the VM's has): forcing fscache is one line and exit 1."""
    from fscache_backend.device import probe

    ok, why = probe()
    if ok:
        pytest.skip(f"this kernel supports fscache mode ({why})")
    boot = tmp_path / "t.boot"
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    run_rafsfs_proc("build", src, "--bootstrap", boot, "--blob-dir", tmp_path / "blobs", check=0)
    (tmp_path / "mnt").mkdir()
    p = run_rafsfs_proc("mount", boot, tmp_path / "mnt", "--mode", "fscache", "--blob-dir", tmp_path / "blobs")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "fscache is not available" in lines[0] and why in lines[0], p.stderr


# ------------------------------------------------------------------------------------------------ host-side pieces
def test_protocol_parses_kernel_messages():
    import struct

    from fscache_backend import protocol

    vol, cookie = b"erofs,rafsfs\0", b"f" * 64
    msg = struct.pack("=IIII", 7, protocol.OP_OPEN, 32 + len(vol) + len(cookie), 3) + \
        struct.pack("=IIII", len(vol), len(cookie), 12, 0) + vol + cookie
    assert protocol.parse(msg) == protocol.OpenMsg(7, 3, "erofs,rafsfs", "f" * 64, 12, 0)
    read = struct.pack("=IIII", 8, protocol.OP_READ, 32, 3) + struct.pack("=QQ", 1 << 20, 131072)
    assert protocol.parse(read) == protocol.ReadMsg(8, 3, 1 << 20, 131072)
    assert protocol.parse(struct.pack("=IIII", 9, protocol.OP_CLOSE, 16, 3)) == protocol.CloseMsg(9, 3)
    for bad in (msg[:20], msg[:-1], read + b"x", struct.pack("=IIII", 1, 9, 16, 1),
                struct.pack("=IIII", 1, protocol.OP_OPEN, 32, 1) + struct.pack("=IIII", 100, 100, 3, 0)):
        with pytest.raises(protocol.ProtocolError):
            protocol.parse(bad)
    assert protocol.IOC_READ_COMPLETE == 0x40049801


def test_blob_address_space_is_the_uncompressed_layout(tmp_path):
    """What the daemon writes into a blob's cache file (chunks from ``blob_chunks`` at their uncompressed offsets)
    is byte for byte the uncompressed layout: for a --compressor none image that is the blob file itself, which the
    kernel's file-backed EROFS reads with blkaddr * 4096."""
    from fscache_backend.objects import _uncovered
    from fscache_backend.sources import open_source

    src = tmp_path / "src"
    make_small_tree(src)
    (src / "big").write_bytes(random.Random(3).randbytes(300_000))
    blobs = tmp_path / "blobs"
    ids = {c: _build(src, tmp_path / f"{c}.boot", blobs, c, "64K") for c in ("zstd", "none")}
    plain = (blobs / ids["none"]).read_bytes()
    source = open_source(str(blobs), [], None).source
    with RafsImage.open(str(tmp_path / "zstd.boot")) as img:
        blob = img.blobs[0]
        layout = bytearray(len(plain))
        chunks = source.meta(blob).chunks_at(0, blob.uncompressed_size)
        assert len(chunks) == blob.chunk_count
        for c, data in zip(chunks, source.read_chunks(blob, chunks)):
            layout[c.info.uncompressed_offset:c.info.uncompressed_offset + len(data)] = data
            assert plain[c.info.uncompressed_offset:c.info.uncompressed_offset + len(data)] == data
        # a range in the middle of a chunk finds that chunk; a range past the data finds nothing
        mid = chunks[1].info.uncompressed_offset + 4096
        assert [c.ci_index for c in source.meta(blob).chunks_at(mid, 4096)] == [chunks[1].ci_index]
        assert source.meta(blob).chunks_at(blob.uncompressed_size + 8192, 4096) == []
        # padding after a chunk's last byte, up to the next page, is a gap the daemon fills with zeros
        last = chunks[-1].info
        end = last.uncompressed_offset + last.uncompressed_size
        gaps = _uncovered(last.uncompressed_offset, 3 * 4096 + (end - last.uncompressed_offset), [chunks[-1]])
        assert gaps and all(o % 4096 == 0 and o >= end for o, _n in gaps)
    source.close()


def test_adjacent_chunks_go_out_in_one_aligned_write(tmp_path):
    """Chunks that follow each other page by page are written as one run: bytes in place, zeros in the padding."""
    from fscache_backend import protocol
    from fscache_backend.objects import _runs

    from rafsfs.blob import ChunkRef
    from rafsfs.format.blob_meta import ChunkInfo

    def chunk(ci, off, size):
        return ChunkRef(0, ci, ChunkInfo(off, size, off, size, False)), bytes([ci + 1]) * size

    pairs = [chunk(1, 8192, 100), chunk(0, 0, 5000), chunk(2, 20480, 4096)]  # 0 and 1 adjacent, 2 after a hole
    runs = _runs(pairs)
    assert [[c.ci_index for c, _d in r] for r in runs] == [[0, 1], [2]]
    path = tmp_path / "cache"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        for r in runs:
            start = r[0][0].info.uncompressed_offset
            end = r[-1][0].info.uncompressed_offset + r[-1][0].info.uncompressed_size
            protocol.write_run(fd, start, [(c.info.uncompressed_offset, d) for c, d in r], end - start)
        with pytest.raises(ValueError):
            protocol.write_run(fd, 100, [(100, b"x")], 1)  # unaligned
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[:5000] == b"\1" * 5000 and data[5000:8192] == bytes(3192)
    assert data[8192:8292] == b"\2" * 100 and data[8292:12288] == bytes(3996)
    assert data[12288:20480] == bytes(8192) and data[20480:24576] == b"\3" * 4096 and len(data) == 24576


def test_cache_dir_filesystem_is_checked_before_any_daemon_starts(tmp_path):
    """cachefiles cannot keep its cache on tmpfs and the like (bind fails with EOPNOTSUPP only after a daemon
    started): the mode probe names the filesystem instead, so auto picks FUSE and a forced fscache says why."""
    from fscache_backend.device import CACHE_FILESYSTEMS, cache_dir_problem, filesystem_of

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    t = tmp_path / "shm"
    t.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "rafsfs-test", str(t)], check=True)
    try:
        assert filesystem_of(str(t / "not" / "yet" / "made")) == "tmpfs"  # the nearest existing directory counts
        problem = cache_dir_problem(str(t / "cache"))
        assert problem is not None and "tmpfs" in problem and "RAFSFS_FSCACHE_DIR" in problem
    finally:
        subprocess.run(["umount", str(t)], check=True)
    fstype = filesystem_of(str(tmp_path))
    assert fstype is not None
    assert (cache_dir_problem(str(tmp_path / "cache")) is None) == (fstype in CACHE_FILESYSTEMS)


def test_fsids_differ_within_the_kernels_sysfs_name():
    """The kernel names an fscache-mode mount in sysfs "<domain>,<fsid>" cut to 36 characters and refuses a second
    mount whose name is the same: twelve mounts of one bootstrap get twelve names that differ within that length."""
    from fscache_backend.mounts import SYSFS_NAME_MAX, MountTable
    from fscache_backend.settings import Settings

    for domain in ("rafsfs", "a-longer-domain-name", ""):
        d = MountTable(Settings(cache_dir="/nonexistent", run_dir="/nonexistent", domain_id=domain), None, set)
        prefix = f"{domain}," if domain else ""
        base = "0123456789abcdef" * 3
        names, fsids = set(), []
        for _ in range(12):
            fsid = d.unique_fsid(base, fsids)
            name = (prefix + fsid)[:SYSFS_NAME_MAX]
            assert name not in names, (domain, fsid, fsids)
            names.add(name)
            fsids.append(fsid)
        assert fsids[0] == base  # the first mount keeps the content-derived fsid (its cached bootstrap is reused)


def test_a_domain_too_long_for_the_kernels_mount_names_is_one_line(monkeypatch):
    from fscache_backend.errors import FscacheError
    from fscache_backend.mounts import MountTable
    from fscache_backend.settings import Settings

    monkeypatch.setenv("RAFSFS_FSCACHE_DOMAIN", "d" * 34)
    with pytest.raises(FscacheError, match="RAFSFS_FSCACHE_DOMAIN"):
        Settings.from_env()
    d = MountTable(Settings(cache_dir="/nonexistent", run_dir="/nonexistent", domain_id="d" * 34), None, set)
    with pytest.raises(FscacheError, match="too long"):  # never a loop that stops the daemon
        d.unique_fsid("0" * 40, ["0" * 40])


def test_device_errors_keep_their_errno():
    """A busy /dev/cachefiles (another daemon starting) is told apart by its errno, not by the message's words."""
    import errno

    from fscache_backend.errors import device_error

    busy = device_error(OSError(errno.EBUSY, "Device or resource busy"), "cannot open /dev/cachefiles")
    assert busy.errno == errno.EBUSY and "in use by another cache daemon" in str(busy)
    assert device_error(OSError(errno.EACCES, "Permission denied"), "x").errno == errno.EACCES
