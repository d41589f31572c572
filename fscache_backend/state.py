"""Mount records: what the daemon needs to serve a mount, persisted so that a daemon restarted after a crash can
answer the kernel's re-OPENs (which carry only the volume and cookie keys)."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field

from rafsfs.atomic import write_text

log = logging.getLogger(__name__)


@dataclass
class MountRecord:
    fsid: str  # the bootstrap cookie key
    domain_id: str
    bootstrap: str  # absolute path of the bootstrap file
    mountpoint: str
    blob_dir: str | None = None
    devices: list[str] = field(default_factory=list)
    config: str | None = None  # nydusd / fscache-shaped JSON config file
    bound: bool = False  # bound over the API (PUT /api/v2/blobs): mounted by someone else, kept until unbound
    prefetch_files: list[str] = field(default_factory=list)  # paths in the image fetched in the background

    @property
    def volume_key(self) -> str:
        return f"erofs,{self.domain_id or self.fsid}"

    @property
    def options(self) -> str:
        return f"fsid={self.fsid}" + (f",domain_id={self.domain_id}" if self.domain_id else "")


def _path(mounts_dir: str, fsid: str) -> str:
    return os.path.join(mounts_dir, fsid + ".json")


def save(mounts_dir: str, rec: MountRecord) -> None:
    os.makedirs(mounts_dir, exist_ok=True)
    write_text(_path(mounts_dir, rec.fsid), json.dumps(asdict(rec)))


def remove(mounts_dir: str, fsid: str) -> None:
    try:
        os.unlink(_path(mounts_dir, fsid))
    except FileNotFoundError:
        pass


def load_all(mounts_dir: str) -> list[MountRecord]:
    out = []
    try:
        names = sorted(os.listdir(mounts_dir))
    except FileNotFoundError:
        return []
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(mounts_dir, name)) as f:
                out.append(MountRecord(**json.load(f)))
        except (OSError, ValueError, TypeError) as e:
            log.warning("ignoring unreadable mount record %s: %s", name, e)
    return out


def clear(mounts_dir: str) -> None:
    for rec in load_all(mounts_dir):
        remove(mounts_dir, rec.fsid)
