"""Image references the way docker reads them: ``[REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST]``.

* The first path component is a registry when it has a ``.`` or a ``:`` or is ``localhost``; otherwise the
  registry is Docker Hub (``docker.io``, API at ``registry-1.docker.io``) and a one-component repository gets
  ``library/``.
* No tag and no digest means ``:latest``.
* A registry on ``localhost``, ``127.0.0.1`` or ``[::1]`` speaks plain HTTP, every other one HTTPS, unless
  ``plain_http`` says HTTP; ``insecure`` keeps HTTPS but skips certificate verification.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import RafsError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_LOOPBACK = ("localhost", "127.0.0.1", "[::1]", "::1")

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                   r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


class BadReference(RafsError):
    pass


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port] as written ("docker.io" for Docker Hub)
    repository: str  # e.g. "library/debian"
    tag: str | None = None
    digest: str | None = None  # "sha256:<hex>"
    scheme: str = "https"
    skip_verify: bool = False

    @property
    def host(self) -> str:
        """Where the distribution API is served."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def object(self) -> str:
        """What to ask ``/v2/<repo>/manifests/`` for: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def with_object(self, *, tag: str | None = None, digest: str | None = None) -> "Reference":
        return Reference(self.registry, self.repository, tag, digest, self.scheme, self.skip_verify)

    def __str__(self) -> str:
        s = f"{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def parse_reference(text: str, *, plain_http: bool = False, insecure: bool = False) -> Reference:
    """Parse a docker-style reference; raises :class:`BadReference` with a one-line reason."""
    ref = text.strip()
    if not ref or len(ref) > 1024 or any(c.isspace() for c in ref):
        raise BadReference(f"invalid image reference {text!r}")
    if "://" in ref:
        raise BadReference(f"invalid image reference {text!r}: give host/repository[:tag], not a URL")
    digest = None
    if "@" in ref:
        ref, digest = ref.rsplit("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise BadReference(f"invalid digest in {text!r} (expected sha256:<64 hex digits>)")
    tag = None
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        ref, tag = ref.rsplit(":", 1)
        if not _TAG.fullmatch(tag):
            raise BadReference(f"invalid tag {tag!r} in {text!r}")
    first, sep, rest = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, repo = first, rest
        if not _HOST.fullmatch(registry):
            raise BadReference(f"invalid registry {registry!r} in {text!r}")
    else:
        registry, repo = DOCKER_HUB, ref
        if "/" not in repo:
            repo = f"library/{repo}"
    if len(repo) > 255 or not all(_COMPONENT.fullmatch(c) for c in repo.split("/")):
        raise BadReference(f"invalid repository name {repo!r} in {text!r} (lower-case letters, digits, "
                           "separators . _ __ -, components joined by /)")
    if tag is None and digest is None:
        tag = "latest"
    hostname = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
    scheme = "http" if plain_http or hostname in _LOOPBACK else "https"
    return Reference(registry, repo, tag, digest, scheme, skip_verify=insecure and scheme == "https")
