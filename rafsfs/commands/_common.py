"""What several commands share: argument types, the parent parsers, output, and the chunk source of a command that
reads file data."""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import RafsError
from ..tools import clear_progress, require_source

if TYPE_CHECKING:
    from ..config import RafsConfig
    from ..image import RafsImage
    from ..storage.source import ChunkSource

_SIZE = re.compile(r"(\d+)\s*([KMG]?)(?:i?B)?", re.IGNORECASE)


# ------------------------------------------------------------------------------------------------ argument types
def parse_size(text: str) -> int:
    """'1048576', '64K', '1M', '1MiB' -> bytes (binary units)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 65536, 64K, 1M)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


def chunk_size(text: str) -> int:
    n = parse_size(text)
    if n < 4096 or n > 16 << 20 or n & (n - 1):
        raise argparse.ArgumentTypeError(f"chunk size {text} must be a power of two from 4K to 16M")
    return n


# ------------------------------------------------------------------------------------------------ parsers
@dataclass(frozen=True)
class Parents:
    """Parent parsers a command may take its options from."""

    common: argparse.ArgumentParser  # logging options: every command has them
    data: argparse.ArgumentParser  # where file data is: --blob-dir, --device, --config


def make_parents() -> Parents:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("logging")
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="log debug messages and show a traceback for internal errors")
    g.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=argparse.SUPPRESS,
                   help="log threshold on stderr (default: info, or debug with -v); 'warning' hides progress")

    data = argparse.ArgumentParser(add_help=False)
    g = data.add_argument_group(
        "file data", "Where the image's data blobs are.  Not needed when all data is inside the image file.")
    g.add_argument("--blob-dir", metavar="DIR",
                   help="directory holding the blobs, each named by its 64-hex-digit blob id")
    g.add_argument("--device", metavar="FILE", action="append", default=[],
                   help="file for the next device slot, in slot order (like the kernel's -o device=); repeat for "
                        "several; slots without one are looked up in --blob-dir")
    g.add_argument("--config", metavar="FILE",
                   help="storage configuration: nydusd's JSON config or the fscache-shaped one "
                        "({\"type\": \"bootstrap\", \"config\": {\"backend_type\": ...}}); names the backend "
                        "(localfs or registry) and the cache; --blob-dir/--device override its blob location")
    return Parents(common=common, data=data)


def add_command(sub, parents: Parents, name: str, run: Callable[[argparse.Namespace], int], help: str,
                description: str, *extra: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A subcommand with the logging options, ``extra`` parent parsers, and ``run`` as its function."""
    p = sub.add_parser(name, parents=[parents.common, *extra], help=help, description=description)
    p.set_defaults(func=run)
    return p


def registry_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("registry", "localhost and 127.0.0.1 registries speak plain HTTP, others HTTPS")
    g.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="the image to use from a multi-platform index (default: this host's)")
    g.add_argument("--plain-http", action="store_true", help="use plain HTTP for every registry")
    g.add_argument("--insecure", action="store_true", help="HTTPS without certificate verification")


# ------------------------------------------------------------------------------------------------ output
def println(text: str = "") -> None:
    """Print to stdout; names decoded with surrogateescape go back out as their original bytes."""
    sys.stdout.buffer.write(os.fsencode(text) + b"\n")


def one_line(text: str) -> str:
    return " ".join(text.split("\n")).replace("\r", " ") or "(no message)"


def error(text: str) -> None:
    """``rafsfs: TEXT`` on stderr, as one line."""
    clear_progress()
    sys.stderr.write(f"rafsfs: {one_line(text)}\n")
    sys.stderr.flush()


# ------------------------------------------------------------------------------------------------ data
@contextmanager
def open_source(args: argparse.Namespace, image: "RafsImage",
                cfg: "RafsConfig | None" = None) -> Iterator["ChunkSource | None"]:
    """The chunk source named by --blob-dir / --device / --config (or by ``cfg``), checked against the image."""
    from ..storage.factory import config_from_args, source_from_config

    if cfg is None:
        cfg = config_from_args(args.blob_dir, args.device, args.config)
    source = None if cfg is None else source_from_config(cfg)
    try:
        if len(args.device) > len(image.devices):
            raise RafsError(f"{len(args.device)} --device files given, but the image has "
                            f"{len(image.devices)} device slot(s)")
        require_source(image, source)
        yield source
    finally:
        if source is not None:
            source.close()


def is_reference(source: str) -> bool:
    """SOURCE names a registry image rather than a file: it does not exist, does not look like a path and has a
    repository part (a bare name is taken as a missing file, not as a Docker Hub image)."""
    return not os.path.exists(source) and "/" in source and not source.startswith(("/", "./", "../", "~"))


def reference(args: argparse.Namespace, text: str):
    from ..oci.reference import parse_reference

    return parse_reference(text, plain_http=args.plain_http, insecure=args.insecure)
