"""Where the fscache daemon keeps things.  One daemon serves every fscache mount on the machine (the kernel allows one
opener of /dev/cachefiles), so these are per machine, not per mount; environment variables override the defaults."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import FscacheError

MAX_DOMAIN = 24  # characters of RAFSFS_FSCACHE_DOMAIN


@dataclass(frozen=True)
class Settings:
    cache_dir: str  # cachefiles' cache directory: must be on ext4/xfs (the kernel's cache files live here)
    run_dir: str  # control socket, mount records, stats
    domain_id: str  # EROFS domain shared by all mounts: a blob used by several images is cached once
    tag: str = "rafsfs"  # fscache cache tag

    @classmethod
    def from_env(cls) -> "Settings":
        domain = os.environ.get("RAFSFS_FSCACHE_DOMAIN", "rafsfs")
        if len(domain) > MAX_DOMAIN or not all(c.isalnum() or c in "-_." for c in domain):
            # the kernel names each mount "<domain>,<fsid>" in 36 characters: a long domain leaves no room for fsids
            raise FscacheError(f"RAFSFS_FSCACHE_DOMAIN {domain!r}: use up to {MAX_DOMAIN} letters, digits, '-', "
                               "'_' or '.'")
        return cls(cache_dir=os.path.abspath(os.environ.get("RAFSFS_FSCACHE_DIR", "/var/cache/rafsfs/fscache")),
                   run_dir=os.path.abspath(os.environ.get("RAFSFS_FSCACHE_RUN", "/run/rafsfs/fscache")),
                   domain_id=domain)

    @property
    def control_path(self) -> str:
        return os.path.join(self.run_dir, "control.sock")

    @property
    def mounts_dir(self) -> str:
        return os.path.join(self.run_dir, "mounts")

    @property
    def stats_path(self) -> str:
        return os.path.join(self.run_dir, "stats.json")
