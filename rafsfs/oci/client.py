"""The OCI distribution API: manifests (an index resolved to one platform), blobs, and pushes.

Authentication, retries and redirects are the registry backend's (:class:`RegistryBackend.request`), so a
convert or pull authenticates exactly like a lazy mount.  Everything a registry sends is untrusted: manifests are
size-capped and type-checked, and every blob is checked against its digest and size before use.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform as _platform
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..atomic import replacing
from ..config import MAX_DEADLINE, RegistryConfig
from ..errors import RafsError
from ..storage.backend.registry import RegistryBackend
from .reference import Reference

log = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MAX_MANIFEST = 4 << 20  # bytes; also the cap for image configs
PULL_RETRIES = 3  # attempts after a failed one, for every request of a pull, convert or push


class OciError(RafsError):
    """A registry answered something unusable (bad manifest, digest mismatch, unsupported media type)."""


@dataclass
class Descriptor:
    media_type: str
    digest: str  # "sha256:<hex>"
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, Any] | None = None

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    @classmethod
    def parse(cls, obj: Any, where: str) -> "Descriptor":
        if not isinstance(obj, dict):
            raise OciError(f"{where}: not an object")
        mt, dg, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
        if not isinstance(mt, str) or not isinstance(dg, str) or not isinstance(size, int) or size < 0:
            raise OciError(f"{where}: needs mediaType, digest and a size")
        check_digest(dg, where)
        ann = obj.get("annotations") or {}
        if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
            raise OciError(f"{where}: annotations must map strings to strings")
        plat = obj.get("platform")
        if plat is not None and not isinstance(plat, dict):
            raise OciError(f"{where}: platform must be an object")
        return cls(mt, dg, size, dict(ann), plat)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d


def check_digest(digest: str, where: str = "digest") -> None:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or len(hexd) != 64 or any(c not in "0123456789abcdef" for c in hexd):
        raise OciError(f"{where}: unsupported digest {digest[:80]!r} (only sha256)")


@dataclass
class Manifest:
    media_type: str
    digest: str
    raw: bytes
    config: Descriptor
    layers: list[Descriptor]

    @classmethod
    def parse(cls, raw: bytes, media_type: str, digest: str) -> "Manifest":
        obj = json_object(raw, "manifest")
        mt = obj.get("mediaType") or media_type
        if mt not in MANIFEST_TYPES:
            raise OciError(f"manifest has unsupported media type {mt!r}")
        layers = obj.get("layers")
        if not isinstance(layers, list):
            raise OciError("manifest has no layer list")
        return cls(mt, digest, raw, Descriptor.parse(obj.get("config"), "manifest config"),
                   [Descriptor.parse(x, f"manifest layer {i}") for i, x in enumerate(layers)])


def json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise OciError(f"{what} is not valid JSON") from None
    if not isinstance(obj, dict):
        raise OciError(f"{what} is not a JSON object")
    return obj


def host_platform() -> str:
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm/v7", "i686": "386", "ppc64le": "ppc64le",
            "s390x": "s390x", "riscv64": "riscv64"}.get(_platform.machine(), _platform.machine())
    return f"linux/{arch}"


def _platform_matches(plat: dict[str, Any] | None, want: str) -> bool:
    if not plat:
        return False
    parts = want.split("/")
    if plat.get("os") != parts[0] or (len(parts) > 1 and plat.get("architecture") != parts[1]):
        return False
    return len(parts) < 3 or plat.get("variant") == parts[2]


class RegistryClient:
    """One repository of one registry."""

    def __init__(self, ref: Reference, *, ca_file: str | None = None, timeout: float = 120.0):
        self.ref = ref
        # a pull or convert is not a lazy read: a blip is retried, and a large layer may take its time
        self.backend = RegistryBackend(RegistryConfig(host=ref.host, repo=ref.repository, scheme=ref.scheme,
                                                      skip_verify=ref.skip_verify, ca_file=ca_file,
                                                      timeout=timeout, retry_limit=PULL_RETRIES,
                                                      deadline=MAX_DEADLINE))
        self.base = f"/v2/{ref.repository}"

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ manifests
    def get_manifest_raw(self, obj: str) -> tuple[str, bytes, str]:
        """(media type, bytes, digest) of the manifest or index named by a tag or digest."""
        accept = ", ".join([*MANIFEST_TYPES, *INDEX_TYPES])

        def read(r: Any, deadline: float) -> tuple[int, bytes, str]:
            if r.status_code == 404:
                return 404, b"", ""
            return 200, self._read_capped(r, deadline, MAX_MANIFEST, "manifest"), \
                r.headers.get("Content-Type", "").split(";")[0].strip()

        status, raw, mt = self.backend.request("GET", f"{self.base}/manifests/{obj}", {"Accept": accept},
                                               ok=(200, 404), read=read)
        if status == 404:
            raise OciError(f"{self.ref.registry}/{self.ref.repository}:{obj}: manifest not found")
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        if obj.startswith("sha256:") and obj != digest:
            raise OciError(f"manifest {obj} has digest {digest}")
        body_mt = json_object(raw, "manifest").get("mediaType")
        if isinstance(body_mt, str) and body_mt:
            mt = body_mt
        return mt, raw, digest

    def resolve(self, platform: str | None = None) -> Manifest:
        """The image manifest for this reference; an index is resolved to ``platform`` (default: this host's)."""
        mt, raw, digest = self.get_manifest_raw(self.ref.object)
        if mt in INDEX_TYPES or (mt not in MANIFEST_TYPES and "manifests" in json_object(raw, "manifest")):
            want = platform or host_platform()
            entries = json_object(raw, "index").get("manifests")
            if not isinstance(entries, list):
                raise OciError("image index has no manifest list")
            descs = [Descriptor.parse(e, f"index entry {i}") for i, e in enumerate(entries)]
            chosen = next((d for d in descs if _platform_matches(d.platform, want)), None)
            if chosen is None:
                have = sorted({"/".join(str(d.platform.get(k)) for k in ("os", "architecture", "variant")
                                        if d.platform.get(k)) for d in descs if d.platform})
                raise OciError(f"{self.ref} has no image for platform {want} (it has: {', '.join(have) or 'none'})")
            log.info("%s: index -> %s manifest %s", self.ref, want, chosen.digest)
            mt, raw, digest = self.get_manifest_raw(chosen.digest)
        elif platform:
            log.info("%s is a single-platform manifest; --platform %s not checked", self.ref, platform)
        return Manifest.parse(raw, mt, digest)

    def put_manifest(self, obj: str, media_type: str, raw: bytes) -> str:
        """Push a manifest under a tag (or its digest); returns its digest."""
        self.backend.request("PUT", f"{self.base}/manifests/{obj}", {"Content-Type": media_type}, body=raw,
                             ok=(201, 200))
        return "sha256:" + hashlib.sha256(raw).hexdigest()

    # ------------------------------------------------------------------ blobs
    def get_blob_bytes(self, desc: Descriptor, cap: int = MAX_MANIFEST) -> bytes:
        if desc.size > cap:
            raise OciError(f"blob {desc.digest} is {desc.size} bytes, more than the {cap} allowed here")
        data = self.backend.request("GET", f"{self.base}/blobs/{desc.digest}",
                                    read=lambda r, d: self._read_capped(r, d, cap, f"blob {desc.digest}"))
        _verify(data, desc)
        return data

    def download_blob(self, desc: Descriptor, dest: str,
                      progress: Callable[[int], None] | None = None) -> str:
        """Stream a blob into ``dest`` (written atomically, after its digest and size are checked)."""
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        reported = 0  # bytes given to ``progress`` so far: a retried attempt reports only what is new

        with replacing(dest) as f:

            def read(r: Any, deadline: float) -> tuple[int, str]:
                """One attempt: the file starts over, so a body cut short and retried leaves nothing behind."""
                nonlocal reported
                f.seek(0)
                f.truncate()
                h = hashlib.sha256()
                n = 0
                for piece in self.backend.iter_body(r, deadline):
                    n += len(piece)
                    if n > desc.size:
                        raise OciError(f"blob {desc.digest} is longer than its {desc.size} bytes")
                    h.update(piece)
                    f.write(piece)
                    if progress and n > reported:
                        progress(n - reported)
                        reported = n
                return n, "sha256:" + h.hexdigest()

            n, got = self.backend.request("GET", f"{self.base}/blobs/{desc.digest}", read=read)
            if n != desc.size or got != desc.digest:
                raise OciError(f"blob {desc.digest}: got {n} bytes with digest {got}")
        return dest

    def blob_exists(self, digest: str) -> bool:
        r = self.backend.request("HEAD", f"{self.base}/blobs/{digest}", ok=(200, 404))
        return r.status_code == 200

    def push_blob(self, digest: str, size: int, path: str | None = None, data: bytes | None = None) -> bool:
        """Upload a blob (from ``path`` or ``data``) unless the registry has it; returns True if uploaded."""
        check_digest(digest)
        if self.blob_exists(digest):
            log.debug("blob %s already in %s", digest, self.ref.repository)
            return False
        r = self.backend.request("POST", f"{self.base}/blobs/uploads/", ok=(202,))
        loc = r.headers.get("Location")
        if not loc:
            raise OciError("registry started an upload without a Location")
        target = self._same_origin_path(loc)
        sep = "&" if "?" in target else "?"
        body: Any = data if path is None else (lambda: open(path, "rb"))
        self.backend.request("PUT", f"{target}{sep}digest={digest}",
                             {"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                             body=body, ok=(201,))
        return True

    def _read_capped(self, r: Any, deadline: float, cap: int, what: str) -> bytes:
        out = bytearray()
        for piece in self.backend.iter_body(r, deadline):
            out += piece
            if len(out) > cap:
                raise OciError(f"{what} is larger than {cap} bytes")
        return bytes(out)

    def _same_origin_path(self, location: str) -> str:
        u = urllib.parse.urlsplit(location)
        if u.scheme or u.netloc:
            if u.netloc != self.ref.host:
                raise OciError(f"upload location {location[:100]!r} is on another host (not supported)")
        path = u.path if u.path.startswith("/") else urllib.parse.urljoin(f"{self.base}/blobs/uploads/", u.path)
        return path + (f"?{u.query}" if u.query else "")


def _verify(data: bytes, desc: Descriptor) -> None:
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if len(data) != desc.size or got != desc.digest:
        raise OciError(f"blob {desc.digest}: got {len(data)} bytes with digest {got}")
