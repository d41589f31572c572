"""Where the fscache daemon keeps things.  One daemon serves every fscache mount on the machine (the kernel allows one
opener of /dev/cachefiles), so these are per machine, not per mount; environment variables override the defaults."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    cache_dir: str  # cachefiles' cache directory: must be on ext4/xfs (the kernel's cache files live here)
    run_dir: str  # control socket, mount records, stats
    domain_id: str  # EROFS domain shared by all mounts: a blob used by several images is cached once
    tag: str = "rafsfs"  # fscache cache tag

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(cache_dir=os.path.abspath(os.environ.get("RAFSFS_FSCACHE_DIR", "/var/cache/rafsfs/fscache")),
                   run_dir=os.path.abspath(os.environ.get("RAFSFS_FSCACHE_RUN", "/run/rafsfs/fscache")),
                   domain_id=os.environ.get("RAFSFS_FSCACHE_DOMAIN", "rafsfs"))

    @property
    def control_path(self) -> str:
        return os.path.join(self.run_dir, "control.sock")

    @property
    def mounts_dir(self) -> str:
        return os.path.join(self.run_dir, "mounts")

    @property
    def stats_path(self) -> str:
        return os.path.join(self.run_dir, "stats.json")
