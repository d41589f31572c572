"""``rafsfs convert``: an OCI image in a registry -> a Nydus RAFS v6 image pushed to a registry.

Steps: resolve the source manifest (an index to one platform), download each layer (digest-checked), build one
blob per layer and one merged bootstrap (:mod:`rafsfs.builder.merge`), then push the blobs, the bootstrap layer,
the config (``rootfs.diff_ids`` rewritten, history dropped) and the manifest (:mod:`rafsfs.oci.nydus`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

from ..builder.merge import MAX_LAYERS, build_layers
from ..errors import RafsError
from .client import OCI_CONFIG, OCI_MANIFEST, Descriptor, OciError, RegistryClient, json_object
from .nydus import blob_descriptor, bootstrap_layer, is_nydus
from .reference import Reference

log = logging.getLogger(__name__)

LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
}

# what the progress callback is told: (stage, done, total) with stage "download", "build" or "push"
ProgressFn = Callable[[str, int, int], None]


@dataclass
class ConvertOptions:
    source: Reference
    target: Reference
    platform: str | None = None  # os/arch[/variant] when the source is an index (default: this host's)
    compressor: str = "zstd"
    chunk_size: int = 1 << 20
    digester: str = "blake3"
    work_dir: str | None = None  # kept when given; a temporary directory (removed afterwards) otherwise
    ca_file: str | None = None
    progress: ProgressFn | None = None


@dataclass
class ConvertResult:
    target: str
    manifest_digest: str
    manifest: dict
    blob_ids: list[str] = field(default_factory=list)
    layers: int = 0
    source_bytes: int = 0
    blob_bytes: int = 0
    bootstrap_bytes: int = 0
    pushed_blobs: int = 0


def convert(opts: ConvertOptions) -> ConvertResult:
    if opts.target.digest:
        raise RafsError(f"destination {opts.target} must be a tag, not a digest")
    own_tmp = opts.work_dir is None
    work = opts.work_dir or tempfile.mkdtemp(prefix="rafsfs-convert-")
    os.makedirs(work, exist_ok=True)
    try:
        return _convert(opts, work)
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)


def _convert(opts: ConvertOptions, work: str) -> ConvertResult:
    progress = opts.progress or (lambda stage, done, total: None)
    with RegistryClient(opts.source, ca_file=opts.ca_file) as src:
        manifest = src.resolve(opts.platform)
        if is_nydus(manifest):
            raise OciError(f"{opts.source} is already a Nydus image")
        if not manifest.layers or len(manifest.layers) > MAX_LAYERS:
            raise OciError(f"{opts.source} has {len(manifest.layers)} layers (1 to {MAX_LAYERS} can be converted)")
        for i, d in enumerate(manifest.layers):
            if d.media_type not in LAYER_TYPES:
                raise OciError(f"{opts.source}: layer {i} has unsupported media type {d.media_type!r}")
        config = json_object(src.get_blob_bytes(manifest.config), "image config")
        total = sum(d.size for d in manifest.layers)
        log.info("%s: manifest %s, %d layers, %d bytes", opts.source, manifest.digest, len(manifest.layers), total)
        layer_paths = []
        done = 0
        for i, d in enumerate(manifest.layers):
            path = os.path.join(work, "layers", d.hex)
            if not _have(path, d):
                def step(n: int) -> None:
                    nonlocal done
                    done += n
                    progress("download", done, total)

                src.download_blob(d, path, step)
            else:
                done += d.size
            log.info("layer %d/%d %s (%d bytes)", i + 1, len(manifest.layers), d.digest, d.size)
            layer_paths.append(path)

    boot_path = os.path.join(work, "image.boot")
    blob_dir = os.path.join(work, "blobs")
    built_before = [0] * len(layer_paths)

    def build_step(layer: int, done_in_layer: int, _size: int) -> None:
        built_before[layer] = done_in_layer
        progress("build", sum(built_before), 0)

    result = build_layers(layer_paths, boot_path, blob_dir, compressor=opts.compressor,
                          chunk_size=opts.chunk_size, digester=opts.digester, progress=build_step)
    boot = bootstrap_layer(boot_path)

    layers: list[Descriptor] = [blob_descriptor(lr.blob_id, lr.blob_size)
                                for lr in result.layers if lr.blob_id]
    layers.append(boot.descriptor)
    config["rootfs"] = {"type": "layers", "diff_ids": [d.digest for d in layers[:-1]] + [boot.diff_id]}
    config.pop("history", None)  # its entries described the source layers
    config_raw = json.dumps(config, separators=(",", ":"), sort_keys=True).encode()
    config_desc = Descriptor(OCI_CONFIG, "sha256:" + hashlib.sha256(config_raw).hexdigest(), len(config_raw))
    manifest_obj = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc.to_json(),
                    "layers": [d.to_json() for d in layers]}
    manifest_raw = json.dumps(manifest_obj, indent=2).encode()

    res = ConvertResult(target=str(opts.target), manifest_digest="", manifest=manifest_obj,
                        blob_ids=result.blob_ids, layers=len(manifest.layers), source_bytes=total,
                        blob_bytes=sum(lr.blob_size for lr in result.layers), bootstrap_bytes=boot.descriptor.size)
    push_total = res.blob_bytes + boot.descriptor.size + len(config_raw)
    pushed = 0
    with RegistryClient(opts.target, ca_file=opts.ca_file) as dst:
        for lr in result.layers:
            if lr.blob_id and lr.blob_path:
                res.pushed_blobs += dst.push_blob(f"sha256:{lr.blob_id}", lr.blob_size, path=lr.blob_path)
                pushed += lr.blob_size
                progress("push", pushed, push_total)
        dst.push_blob(boot.descriptor.digest, boot.descriptor.size, data=boot.tar_gz)
        dst.push_blob(config_desc.digest, config_desc.size, data=config_raw)
        progress("push", push_total, push_total)
        res.manifest_digest = dst.put_manifest(opts.target.object, OCI_MANIFEST, manifest_raw)
    log.info("pushed %s (%s): %d blobs, bootstrap %d bytes", opts.target, res.manifest_digest,
             len(res.blob_ids), boot.descriptor.size)
    return res


def _have(path: str, d: Descriptor) -> bool:
    """A layer already downloaded into the work dir (only complete, verified files are renamed into place)."""
    try:
        return os.path.getsize(path) == d.size
    except OSError:
        return False
