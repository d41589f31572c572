"""``rafsfs pull`` and the registry side of ``rafsfs mount REF``: fetch a Nydus image's bootstrap (and, on
request, its blobs), and describe where a lazy mount reads the blobs from."""
from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ..atomic import replacing, write_text
from ..errors import BadImage, RafsError
from ..image import RafsImage
from .client import Manifest, RegistryClient
from .nydus import MAX_BOOTSTRAP, blob_descriptors, bootstrap_descriptor, extract_bootstrap
from .reference import Reference

log = logging.getLogger(__name__)


@dataclass
class PullResult:
    reference: str
    manifest_digest: str
    bootstrap: str
    blob_dir: str | None = None
    blobs: list[str] = field(default_factory=list)  # blob ids in the image's blob table
    bytes_fetched: int = 0


def _fetch_bootstrap(client: RegistryClient, manifest: Manifest, dest_dir: str) -> tuple[str, int]:
    desc = bootstrap_descriptor(manifest)
    if desc.size > MAX_BOOTSTRAP:
        raise BadImage(f"bootstrap layer of {desc.size} bytes is larger than the {MAX_BOOTSTRAP} allowed")
    # this process's own copy: another pull or mount of the same image may be fetching it right now
    layer = os.path.join(dest_dir, f".bootstrap-{desc.hex}-{os.getpid()}-{threading.get_ident()}.tar.gz")
    client.download_blob(desc, layer)
    boot = os.path.join(dest_dir, "image.boot")
    try:
        extract_bootstrap(layer, boot)
    finally:
        os.unlink(layer)
    try:
        with RafsImage.open(boot):  # a bad bootstrap fails here, before anything uses it
            pass
    except BaseException:
        os.unlink(boot)  # never left where a later mount would take it for a good one
        raise
    return boot, desc.size


def _usable(boot: str) -> bool:
    """A bootstrap stored earlier that still opens (stored files are fsync'ed before their rename, but one left by
    an older version, or damaged since, is fetched again instead of failing every mount)."""
    if not os.path.isfile(boot):
        return False
    try:
        with RafsImage.open(boot):
            return True
    except RafsError as e:
        log.warning("%s is unusable (%s): fetching it again", boot, e)
        return False


def pull(ref: Reference, dest_dir: str, *, blobs: bool = False, platform: str | None = None,
         ca_file: str | None = None, progress: Callable[[int, int], None] | None = None) -> PullResult:
    """Write ``image.boot``, ``manifest.json`` (and with ``blobs``, ``blobs/<id>`` for every blob) to
    ``dest_dir``."""
    os.makedirs(dest_dir, exist_ok=True)
    with RegistryClient(ref, ca_file=ca_file) as client:
        manifest = client.resolve(platform)
        boot, fetched = _fetch_bootstrap(client, manifest, dest_dir)
        with replacing(os.path.join(dest_dir, "manifest.json")) as f:
            f.write(manifest.raw)
        res = PullResult(str(ref), manifest.digest, boot, bytes_fetched=fetched)
        with RafsImage.open(boot) as image:
            res.blobs = [b.blob_id for b in image.blobs]
        if blobs:
            res.blob_dir = os.path.join(dest_dir, "blobs")
            by_digest = {d.hex: d for d in blob_descriptors(manifest)}
            total = sum(d.size for d in by_digest.values())
            done = 0
            for blob_id in res.blobs:
                d = by_digest.get(blob_id)
                if d is None:
                    raise BadImage(f"the bootstrap of {ref} names blob {blob_id}, which is not a layer of it")

                def step(n: int) -> None:
                    nonlocal done
                    done += n
                    if progress:
                        progress(done, total)

                client.download_blob(d, os.path.join(res.blob_dir, blob_id), step)
                res.bytes_fetched += d.size
    return res


def mount_config(ref: Reference, work_dir: str, *, ca_file: str | None = None) -> dict:
    """A nydusd-style config reading ``ref``'s blobs lazily from its registry through a cache in ``work_dir``.
    No credentials are written: the registry backend reads docker's config.json when it needs them."""
    backend: dict = {"host": ref.host, "repo": ref.repository, "scheme": ref.scheme}
    if ref.skip_verify:
        backend["skip_verify"] = True
    if ca_file:
        backend["ca_file"] = os.path.abspath(ca_file)
    return {"device": {"backend": {"type": "registry", "config": backend},
                       "cache": {"type": "blobcache", "config": {"work_dir": os.path.join(work_dir, "cache")}}},
            "digest_validate": True}


def prepare_mount(ref: Reference, work_dir: str, *, platform: str | None = None,
                  ca_file: str | None = None) -> tuple[str, str]:
    """Fetch only the bootstrap of ``ref`` into ``work_dir/<manifest digest>/`` and write a config for a lazy
    mount next to it.  Returns (bootstrap path, config path)."""
    with RegistryClient(ref, ca_file=ca_file) as client:
        manifest = client.resolve(platform)
        dest = os.path.join(work_dir, "images", manifest.digest.split(":", 1)[1])
        boot = os.path.join(dest, "image.boot")
        if not _usable(boot):
            os.makedirs(dest, exist_ok=True)
            _fetch_bootstrap(client, manifest, dest)
            log.info("%s: fetched bootstrap of %s", ref, manifest.digest)
    cfg_path = os.path.join(dest, "config.json")
    write_text(cfg_path, json.dumps(mount_config(ref, work_dir, ca_file=ca_file), indent=2))
    return boot, cfg_path
