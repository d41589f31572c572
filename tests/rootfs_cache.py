"""A small real Debian rootfs for the FUSE tests, made once and cached between runs.

``debootstrap --variant=minbase --include=python3 bookworm`` (python3 pulls in libpython3.11-stdlib, which carries
``json`` and the ``_sqlite3`` extension, and libsqlite3-0): about 10k entries.  The debootstrap, apt-source and tarball
caching code is bench/rootfs.py's :func:`ensure_rootfs` (the bench makes a bigger tree the same way); this module only
picks the package set and the cache folder, ``$RAFSFS_TEST_CACHE`` (default /var/cache/rafsfs-test):
``bookworm-minbase-python3/rootfs.tar`` (the tarball, numeric owners and xattrs), ``tree/`` (extracted from it) and
``meta.json``.  A later run reuses ``tree/`` or re-extracts the tarball; debootstrap runs once per machine.
A file lock keeps two test runs from debootstrapping into the same folder at once.
"""
from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("RAFSFS_TEST_CACHE", "/var/cache/rafsfs-test"))
INCLUDE = ("python3",)
NAME = "bookworm-minbase-python3"


def ensure_test_rootfs() -> Path:
    """The extracted rootfs tree (read-only for tests); debootstraps on first use (~1-2 min with network)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from bench.rootfs import ensure_rootfs

    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return ensure_rootfs(CACHE / NAME, include=INCLUDE, extra_tiers=())


if __name__ == "__main__":
    print(ensure_test_rootfs())
