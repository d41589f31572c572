"""Concurrent readers of a mounted file under a misbehaving registry, shared by the fault tests of every mode
(tests/test_faults_registry.py on the host: FUSE, fanotify; tests/vm/guest_fscache.py in the VM: fscache).  A read
returns its bytes or the errno it failed with, never raises, so a test can check every outcome."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

MiB = 1 << 20


def reset_peak_rss(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # the kernel resets VmHWM to the current RSS


def peak_rss(pid: int) -> int:
    """VmHWM of ``pid`` in bytes: its peak RSS since it started or since :func:`reset_peak_rss`."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def read_range(path: Path, offset: int, size: int) -> bytes | int:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return e.errno
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel readahead: the read asks for its range only
        data = b""
        while len(data) < size:
            piece = os.pread(fd, size - len(data), offset + len(data))
            if not piece:
                break
            data += piece
        return data
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)


def sixteen_readers(path: Path, chunks: list[int], limit: float) -> list[tuple[int, bytes | int, float]]:
    """16 threads at once, reader j reads 64 KiB of chunk ``chunks[j % len(chunks)]`` at its own page:
    [(offset, bytes or errno, seconds)]; a reader still blocked after ``limit`` fails the test."""
    results: list = []
    barrier = threading.Barrier(16)

    def reader(j: int) -> None:
        off = chunks[j % len(chunks)] * MiB + (j // len(chunks)) * (128 << 10)
        barrier.wait()
        t0 = time.monotonic()
        got = read_range(path, off, 64 << 10)
        results.append((off, got, time.monotonic() - t0))

    threads = [threading.Thread(target=reader, args=(j,), daemon=True) for j in range(16)]
    for t in threads:
        t.start()
    end = time.monotonic() + limit
    for t in threads:
        t.join(max(end - time.monotonic(), 0.1))
    assert len(results) == 16, f"{16 - len(results)} readers still blocked after {limit} s"
    return results
