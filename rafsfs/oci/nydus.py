"""The Nydus image shape (RAFS v6, "fs-version 6") as nydusify writes it and nydus-snapshotter reads it.

Manifest layers, in order:

* one data layer per blob: media type :data:`NYDUS_BLOB`, digest ``sha256:<blob id>`` (our blob id is the
  sha256 of the blob file), annotation ``containerd.io/snapshot/nydus-blob: "true"``;
* last, the bootstrap layer: ``application/vnd.oci.image.layer.v1.tar+gzip`` holding ``image/image.boot``, with
  annotations ``containerd.io/snapshot/nydus-bootstrap: "true"``, ``containerd.io/snapshot/nydus-fs-version: "6"``
  and ``containerd.io/uncompressed: <sha256 of the tar>``.

The image config's ``rootfs.diff_ids`` are the blob digests then the bootstrap tar's uncompressed digest.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from dataclasses import dataclass

from ..atomic import replacing
from ..errors import BadImage
from .client import Descriptor, Manifest

NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"
LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ANN_BLOB = "containerd.io/snapshot/nydus-blob"
ANN_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
ANN_FS_VERSION = "containerd.io/snapshot/nydus-fs-version"
ANN_UNCOMPRESSED = "containerd.io/uncompressed"
BOOTSTRAP_NAME = "image/image.boot"
MAX_BOOTSTRAP = 1 << 30


@dataclass
class BootstrapLayer:
    tar_gz: bytes
    diff_id: str  # sha256 of the uncompressed tar
    descriptor: Descriptor


def blob_descriptor(blob_id: str, size: int) -> Descriptor:
    return Descriptor(NYDUS_BLOB, f"sha256:{blob_id}", size, {ANN_BLOB: "true"})


def bootstrap_layer(bootstrap_path: str) -> BootstrapLayer:
    """The bootstrap packed as nydusify packs it (deterministic: fixed owner, mode and times)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        d = tarfile.TarInfo("image")
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        tf.addfile(d)
        ti = tarfile.TarInfo(BOOTSTRAP_NAME)
        ti.size, ti.mode = os.path.getsize(bootstrap_path), 0o644
        with open(bootstrap_path, "rb") as f:
            tf.addfile(ti, f)
    raw = buf.getvalue()
    gz = gzip.compress(raw, compresslevel=6, mtime=0)
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    desc = Descriptor(LAYER_TAR_GZIP, "sha256:" + hashlib.sha256(gz).hexdigest(), len(gz),
                      {ANN_BOOTSTRAP: "true", ANN_FS_VERSION: "6", ANN_UNCOMPRESSED: diff_id})
    return BootstrapLayer(gz, diff_id, desc)


def is_nydus(manifest: Manifest) -> bool:
    return bool(manifest.layers) and manifest.layers[-1].annotations.get(ANN_BOOTSTRAP) == "true"


def bootstrap_descriptor(manifest: Manifest) -> Descriptor:
    if not is_nydus(manifest):
        raise BadImage(f"manifest {manifest.digest} is not a Nydus image (its last layer is not annotated "
                       f"{ANN_BOOTSTRAP}=true)")
    desc = manifest.layers[-1]
    if desc.annotations.get(ANN_FS_VERSION, "6") != "6":
        raise BadImage(f"Nydus image with fs-version {desc.annotations[ANN_FS_VERSION]!r}: only RAFS v6 is supported")
    return desc


def blob_descriptors(manifest: Manifest) -> list[Descriptor]:
    return [d for d in manifest.layers[:-1] if d.media_type == NYDUS_BLOB or d.annotations.get(ANN_BLOB) == "true"]


def extract_bootstrap(layer_path: str, dest: str) -> None:
    """Take ``image/image.boot`` out of a (gzip'd) bootstrap layer tar into ``dest``; nothing else is written."""
    try:
        with tarfile.open(layer_path, mode="r:*") as tf:
            member = None
            for m in tf:
                if m.name.removeprefix("./") == BOOTSTRAP_NAME:
                    member = m
            if member is None or not member.isreg():
                raise BadImage(f"bootstrap layer has no regular file {BOOTSTRAP_NAME}")
            if member.size > MAX_BOOTSTRAP:
                raise BadImage(f"bootstrap of {member.size} bytes is too large")
            src = tf.extractfile(member)
            assert src is not None
            with replacing(dest) as out:
                while piece := src.read(1 << 20):
                    out.write(piece)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, OSError) as e:
        if isinstance(e, OSError) and e.filename:
            raise
        raise BadImage(f"bootstrap layer is not a valid tar.gz ({e})") from None
