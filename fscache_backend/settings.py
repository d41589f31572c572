"""Where the fscache daemon keeps things.  One daemon serves every fscache mount on the machine (the kernel allows one
opener of /dev/cachefiles), so these are per machine, not per mount; environment variables override the defaults."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from .errors import FscacheError

MAX_DOMAIN = 24  # characters of RAFSFS_FSCACHE_DOMAIN


@dataclass(frozen=True)
class Settings:
    cache_dir: str  # cachefiles' cache directory: must be on ext4/xfs (the kernel's cache files live here)
    run_dir: str  # control socket, mount records, stats
    domain_id: str  # EROFS domain shared by all mounts: a blob used by several images is cached once
    tag: str | None = "rafsfs"  # fscache cache tag (None: the kernel's default, "CacheFiles")
    singleton: bool = False  # images are bound over the nydusd API and mounted by someone else (nydus-snapshotter):
    #                          the daemon neither unmounts them nor exits when none is left
    threads: int = 8  # worker threads fetching blob data for READs at once (nydusd's --fscache-threads)
    read_timeout: float = 120.0  # a READ is answered (failing with EIO) after this long, whatever the backend does

    @classmethod
    def from_env(cls) -> "Settings":
        domain = os.environ.get("RAFSFS_FSCACHE_DOMAIN", "rafsfs")
        if len(domain) > MAX_DOMAIN or not all(c.isalnum() or c in "-_." for c in domain):
            # the kernel names each mount "<domain>,<fsid>" in 36 characters: a long domain leaves no room for fsids
            raise FscacheError(f"RAFSFS_FSCACHE_DOMAIN {domain!r}: use up to {MAX_DOMAIN} letters, digits, '-', "
                               "'_' or '.'")
        timeout = os.environ.get("RAFSFS_FSCACHE_READ_TIMEOUT", "120")
        try:
            read_timeout = float(timeout)
        except ValueError:
            read_timeout = 0.0
        if not 0 < read_timeout <= 86400:
            raise FscacheError(f"RAFSFS_FSCACHE_READ_TIMEOUT {timeout!r}: expected seconds, more than 0")
        return cls(cache_dir=os.path.abspath(os.environ.get("RAFSFS_FSCACHE_DIR", "/var/cache/rafsfs/fscache")),
                   run_dir=os.path.abspath(os.environ.get("RAFSFS_FSCACHE_RUN", "/run/rafsfs/fscache")),
                   domain_id=domain, read_timeout=read_timeout)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        return cls(**json.loads(text))

    @property
    def control_path(self) -> str:
        return os.path.join(self.run_dir, "control.sock")

    @property
    def mounts_dir(self) -> str:
        return os.path.join(self.run_dir, "mounts")

    @property
    def images_dir(self) -> str:
        """Configs of images bound over the API (the PUT bodies: backend, credentials, prefetch)."""
        return os.path.join(self.run_dir, "images")

    @property
    def stats_path(self) -> str:
        return os.path.join(self.run_dir, "stats.json")
