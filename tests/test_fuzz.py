"""Mutated bootstraps: whatever the bytes, the reader raises only RafsError subclasses, and always finishes.

Three seeds: a small mkfs.erofs image (dirs, symlinks, fifo, inline data, shared and inline xattrs), the same tree as a
chunked mkfs.erofs image with a blob device, and the real Nydus fixture bootstrap (read through its blob).  Mutations:
bit flips and byte overwrites in the first three blocks (superblock, Nydus ext superblock, blob table, inodes) and
anywhere, truncation at any length, spliced garbage, and runs of 0x00/0xFF.

With CI set, hypothesis is derandomized (same examples every run); otherwise each run explores new ones.
"""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import struct
import subprocess
import traceback
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import treeutil
from conftest import run_rafsfs_proc
from rafsfs.errors import RafsError
from rafsfs.format import blob_table as bt
from rafsfs.format import superblock as sbf
from rafsfs.format.chunk import ChunkTableEntry
from rafsfs.format.inode import InodeCompact, InodeExtended
from rafsfs.image import RafsImage
from rafsfs.storage.backend.localfs import LocalFsBackend
from rafsfs.storage.cache.none import DirectChunkSource
from rafsfs.storage.meta import fetch_meta

HANG_SECONDS = 10  # signal.alarm guard per example: a hang fails instead of stalling the suite
READ_WINDOW = 64 << 10  # bytes read at the start, middle and end of each file (sizes may be absurd)
MAX_ENTRIES = 20000  # entries visited per image (a mutated image may be a huge, but finite, tree)


class Hang(Exception):
    """Not a RafsError: an example that runs past HANG_SECONDS fails the property."""


@contextmanager
def alarm(seconds: int = HANG_SECONDS):
    def on_alarm(signum, frame):
        raise Hang(f"operation did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Seed:
    name: str
    data: bytes
    blob_dir: str | None = None
    devices: tuple[str, ...] = ()

    def source(self):
        if self.blob_dir is None and not self.devices:
            return None
        return DirectChunkSource(LocalFsBackend(self.blob_dir, list(self.devices)))


def exercise(data: bytes, source) -> int:
    """Open and use every part of the image; RafsError is fine anywhere, and each failing part is skipped so the
    rest is still exercised.  Returns how many operations succeeded (for sanity checks on unmutated images)."""
    ok = 0

    def attempt(fn, *args):
        nonlocal ok
        try:
            r = fn(*args)
            ok += 1
            return r
        except RafsError:
            return None

    try:
        img = RafsImage(data, name="fuzz")
    except RafsError:
        return 0
    attempt(lambda: img.prefetch_nids)
    attempt(img.chunk_table)
    for blob in img.blobs:
        if source is not None:
            attempt(fetch_meta, blob, source.read_raw)
            if blob.nydus:
                attempt(source.meta, blob)
    visited = 0
    stack = [(b"/", img.root_nid, 0)]
    seen_dirs: set[int] = set()
    while stack and visited < MAX_ENTRIES:
        path, nid, depth = stack.pop()
        ino = attempt(img.inode, nid)
        if ino is None:
            continue
        visited += 1
        names = attempt(img.listxattr, ino) or []
        for n in names[:50]:
            attempt(img.getxattr, ino, n)
        attempt(img.xattrs, ino)
        attempt(img.getxattr, ino, b"user.does-not-exist")
        if ino.is_symlink():
            attempt(img.readlink, ino)
        elif ino.is_reg():
            size = ino.size
            for off in {0, max(0, size // 2 - READ_WINDOW // 2), max(0, size - READ_WINDOW)}:
                attempt(img.read, ino, off, READ_WINDOW, source)
            attempt(img.map_range, ino, 0, READ_WINDOW, source)
            if ino.layout == 4:
                attempt(img.chunks, ino, 0, 3, source)
        elif ino.is_dir():
            if nid in seen_dirs or depth > 64:
                continue
            seen_dirs.add(nid)
            entries = attempt(lambda: list(img.readdir(ino))) or []
            for e in entries[:2000]:
                if e.name in (b".", b".."):
                    continue
                stack.append((path.rstrip(b"/") + b"/" + e.name, e.nid, depth + 1))
                if len(stack) < 50:
                    attempt(img.lookup, ino, e.name)
            attempt(img.lookup, ino, b"\xffno-such-name")
            attempt(img.resolve, path)
    attempt(lambda: sum(1 for _ in zip(range(MAX_ENTRIES), img.walk())))
    return ok


# ---------------------------------------------------------------------------- seeds
@pytest.fixture(scope="session")
def fuzz_seeds(tmp_path_factory, nydus_fixture) -> list[Seed]:
    seeds = []
    if shutil.which("mkfs.erofs"):
        d = tmp_path_factory.mktemp("fuzz-seeds")
        treeutil.make_small_tree(d / "src")
        subprocess.run(["mkfs.erofs", "--quiet", "--preserve-mtime", str(d / "small.img"), str(d / "src")],
                       check=True, capture_output=True)
        seeds.append(Seed("mkfs-inline", (d / "small.img").read_bytes()))
        subprocess.run(["mkfs.erofs", "--quiet", "--preserve-mtime", "--chunksize=4096", f"--blobdev={d / 'blob'}",
                        str(d / "chunked.img"), str(d / "src")], check=True, capture_output=True)
        seeds.append(Seed("mkfs-chunked", (d / "chunked.img").read_bytes(), devices=(str(d / "blob"),)))
    seeds.append(Seed("nydus-2.2", (nydus_fixture / "rafs-v6-2.2.boot").read_bytes(), blob_dir=str(nydus_fixture)))
    return seeds


def test_seeds_are_fully_readable(fuzz_seeds):
    """Unmutated, every seed works end to end (else the fuzzing below proves little)."""
    closers = []
    for seed in fuzz_seeds:
        with alarm():
            img = RafsImage(seed.data)
            src = seed.source()
            if src is not None:
                closers.append(src.backend)
            n = 0
            for path, ino in img.walk():
                n += 1
                if ino.is_reg():
                    assert len(img.read(ino, 0, ino.size, src)) == ino.size
            assert n >= 3, seed.name
            assert exercise(seed.data, src) > 10
    for c in closers:
        c.close()


# ---------------------------------------------------------------------------- mutations
@st.composite
def mutation(draw, size: int):
    """A list of edits to apply to a seed of ``size`` bytes."""
    head = min(size, 3 * 4096)
    kind = draw(st.sampled_from(["bits-head", "bytes-head", "bytes-anywhere", "truncate", "splice", "runs"]))
    edits = []
    if kind == "bits-head":
        for _ in range(draw(st.integers(1, 8))):
            edits.append(("xor", draw(st.integers(0, head - 1)), 1 << draw(st.integers(0, 7))))
    elif kind == "bytes-head":
        for _ in range(draw(st.integers(1, 16))):
            edits.append(("set", draw(st.integers(0, head - 1)), draw(st.integers(0, 255))))
    elif kind == "bytes-anywhere":
        for _ in range(draw(st.integers(1, 32))):
            edits.append(("set", draw(st.integers(0, size - 1)), draw(st.integers(0, 255))))
    elif kind == "truncate":
        edits.append(("truncate", draw(st.integers(0, size - 1))))
    elif kind == "splice":
        edits.append(("splice", draw(st.integers(0, size)), draw(st.binary(min_size=1, max_size=300)),
                      draw(st.integers(0, 300))))
    else:  # runs of 0x00 / 0xFF: zeroed or saturated fields (counts, sizes, addresses, nids)
        for _ in range(draw(st.integers(1, 4))):
            edits.append(("run", draw(st.integers(0, head - 1)), draw(st.integers(1, 16)),
                          draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]))))
    return kind, edits


def apply(data: bytes, edits) -> bytes:
    buf = bytearray(data)
    for e in edits:
        op = e[0]
        if op == "xor" and e[1] < len(buf):
            buf[e[1]] ^= e[2]
        elif op == "set" and e[1] < len(buf):
            buf[e[1]] = e[2]
        elif op == "truncate":
            del buf[e[1]:]
        elif op == "splice":
            pos, garbage, replace = e[1], e[2], e[3]
            buf[pos:pos + replace] = garbage
        elif op == "run":
            pos, n, value = e[1], e[2], e[3]
            buf[pos:pos + n] = bytes([value]) * len(buf[pos:pos + n])
    return bytes(buf)


FUZZ_SETTINGS = dict(deadline=5000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                     print_blob=True)


def _check(seed: Seed, edits) -> None:
    data = apply(seed.data, edits)
    source = seed.source()
    try:
        with alarm():
            exercise(data, source)
    finally:
        if source is not None:
            source.close()


def _seed(fuzz_seeds, name) -> Seed:
    for s in fuzz_seeds:
        if s.name == name:
            return s
    pytest.skip(f"seed {name} not available (mkfs.erofs missing?)")


@settings(max_examples=110, **FUZZ_SETTINGS)
@given(data=st.data())
def test_fuzz_mkfs_inline(fuzz_seeds, data):
    seed = _seed(fuzz_seeds, "mkfs-inline")
    _kind, edits = data.draw(mutation(len(seed.data)))
    _check(seed, edits)


@settings(max_examples=80, **FUZZ_SETTINGS)
@given(data=st.data())
def test_fuzz_mkfs_chunked(fuzz_seeds, data):
    seed = _seed(fuzz_seeds, "mkfs-chunked")
    _kind, edits = data.draw(mutation(len(seed.data)))
    _check(seed, edits)


@settings(max_examples=110, **FUZZ_SETTINGS)
@given(data=st.data())
def test_fuzz_nydus_fixture(fuzz_seeds, data):
    seed = _seed(fuzz_seeds, "nydus-2.2")
    _kind, edits = data.draw(mutation(len(seed.data)))
    _check(seed, edits)


# ---------------------------------------------------------------------------- the CLI on mutated bootstraps
def test_cli_check_on_mutated_bootstraps(fuzz_seeds, tmp_path):
    """`rafsfs check` exits 0 (the damage missed anything it looks at) or 1 (reported), never with a traceback."""
    rnd = random.Random(20240601)
    runs = 0
    for seed in fuzz_seeds:
        for i in range(4):
            buf = bytearray(seed.data)
            if i == 3:
                del buf[rnd.randrange(1024, len(buf)):]
            else:
                for _ in range(1 + i * 3):
                    pos = rnd.randrange(1024, min(len(buf), 3 * 4096))
                    buf[pos] ^= 1 << rnd.randrange(8)
            path = tmp_path / f"{seed.name}-{i}.img"
            path.write_bytes(buf)
            args = ["check", path]
            if seed.blob_dir:
                args += ["--blob-dir", seed.blob_dir]
            for dev in seed.devices:
                args += ["--device", dev]
            p = run_rafsfs_proc(*args, timeout=60)
            out = p.stdout + p.stderr
            assert p.returncode in (0, 1), f"{path}: exit {p.returncode}\n{out[-3000:]}"
            assert "Traceback" not in out, f"{path}:\n{out[-3000:]}"
            if p.returncode == 1:
                assert p.stderr.strip() or "BAD" in p.stdout, f"{path}: exit 1 without saying why"
            runs += 1
    assert runs >= 8


# ---------------------------------------------------------------------------- every field at its extremes
def _int_fields(cls, base: int):
    """(name, offset, struct code) of each integer field of a Record placed at ``base``."""
    off = base
    for f in dataclasses.fields(cls):
        code = f.metadata["code"]
        size = struct.calcsize("<" + code)
        if not code.endswith("s"):
            yield f.name, off, code
        off += size


def _extreme_edits(seed: Seed):
    """One image per (record field, extreme value): superblock, Nydus ext superblock, blob table, chunk table,
    device slots and every inode (compact or extended)."""
    img = RafsImage(seed.data)
    places = [("sb", sbf.SuperBlock, sbf.SB_OFFSET)]
    if img.nydus:
        places.append(("ext", sbf.SuperBlockExt, sbf.EXT_SB_OFFSET))
        for i in range(len(img.blobs)):
            places.append((f"blob[{i}]", bt.BlobEntry, img.ext.blob_table_offset + i * bt.BLOB_ENTRY_SIZE))
        for i in range(img.ext.chunk_table_size // 80):
            places.append((f"chunktable[{i}]", ChunkTableEntry, img.ext.chunk_table_offset + i * 80))
    for i in range(img.sb.extra_devices):
        places.append((f"device[{i}]", sbf.DeviceSlot, img.sb.devt_slotoff * 128 + i * 128))
    for path, ino in img.walk():
        places.append((f"inode {os.fsdecode(path)}", InodeExtended if ino.extended else InodeCompact, ino.offset))
    for where, cls, base in places:
        for name, off, code in _int_fields(cls, base):
            bits = struct.calcsize("<" + code) * 8
            for value in {0, 1, (1 << bits) - 1, 1 << (bits - 1), (1 << (bits - 1)) - 1}:
                yield f"{where}.{name}={value:#x}", off, struct.pack("<" + code, value)


@pytest.mark.parametrize("seed_name", ["mkfs-inline", "mkfs-chunked", "nydus-2.2"])
def test_field_extremes(fuzz_seeds, seed_name):
    """Set each integer field of each record to 0, 1, max, min-signed and max-signed in turn; every resulting image
    must open-and-exercise with nothing but RafsError.  All failures are listed (each line is a reproducer)."""
    seed = _seed(fuzz_seeds, seed_name)
    failures = []
    runs = 0
    for label, off, raw in _extreme_edits(seed):
        buf = bytearray(seed.data)
        buf[off:off + len(raw)] = raw
        source = seed.source()
        try:
            with alarm():
                exercise(bytes(buf), source)
        except Exception as e:  # noqa: BLE001 - the property is "only RafsError", so collect everything else
            tb = traceback.extract_tb(e.__traceback__)[-1]
            failures.append(f"{label} (at byte {off}): {type(e).__name__}: {e} "
                            f"[{os.path.basename(tb.filename)}:{tb.lineno}]")
        finally:
            if source is not None:
                source.close()
        runs += 1
    assert runs > 100
    assert not failures, f"{len(failures)} of {runs} field edits raised a non-RafsError:\n  " + \
        "\n  ".join(failures[:30])
