"""Describe a bootstrap: superblock, flavour, flags by name, blobs, device slots, prefetch table, tree counts."""
from __future__ import annotations

import os
import stat
import uuid
from collections import Counter
from typing import Any

from ..compression import COMPRESSOR_NAMES, DIGESTER_NAMES
from ..format import blob_table as bt
from ..format import superblock as sbf
from ..image import RafsImage
from . import format_bytes


def _bit_names(module: Any, prefix: str) -> dict[int, str]:
    """Single-bit constants named PREFIX* in a format module, by value."""
    return {v: k[len(prefix):] for k, v in vars(module).items()
            if k.startswith(prefix) and isinstance(v, int) and v > 0 and v & (v - 1) == 0}


COMPAT_NAMES = _bit_names(sbf, "COMPAT_")
INCOMPAT_NAMES = _bit_names(sbf, "INCOMPAT_")
RAFS_FLAG_NAMES = _bit_names(sbf, "FLAG_")
BLOB_FEATURE_NAMES = _bit_names(bt, "FEAT_")
# RAFS superblock flag -> the compressor / digester it announces
_FLAG_COMPRESSOR = {sbf.FLAG_COMPRESSION_NONE: "none", sbf.FLAG_COMPRESSION_LZ4: "lz4_block",
                    sbf.FLAG_COMPRESSION_GZIP: "gzip", sbf.FLAG_COMPRESSION_ZSTD: "zstd"}
_FLAG_DIGESTER = {sbf.FLAG_HASH_BLAKE3: "blake3", sbf.FLAG_HASH_SHA256: "sha256"}
FILE_TYPES = {stat.S_IFDIR: "directory", stat.S_IFREG: "regular", stat.S_IFLNK: "symlink",
              stat.S_IFCHR: "char_device", stat.S_IFBLK: "block_device", stat.S_IFIFO: "fifo",
              stat.S_IFSOCK: "socket"}


def decode_bits(value: int, names: dict[int, str]) -> list[str]:
    """Names of the bits set in ``value``; unknown bits as one hex number."""
    out = [name for bit, name in sorted(names.items()) if value & bit]
    rest = value & ~sum(names)
    if rest:
        out.append(f"0x{rest:x}")
    return out


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="backslashreplace")


def inspect_image(image: RafsImage) -> dict[str, Any]:
    """Everything ``rafsfs inspect`` reports, as JSON-ready data.  Walks the whole tree."""
    sb, ext = image.sb, image.ext
    info: dict[str, Any] = {
        "image": image.name,
        "image_size": len(image.buf),
        "flavour": "nydus-rafs-v6" if image.nydus else "erofs",
        "block_size": image.blksz,
        "chunk_size": image.chunk_size or None,
        "superblock": {
            "feature_compat": sb.feature_compat,
            "feature_compat_names": decode_bits(sb.feature_compat, COMPAT_NAMES),
            "feature_incompat": sb.feature_incompat,
            "feature_incompat_names": decode_bits(sb.feature_incompat, INCOMPAT_NAMES),
            "checksum": sb.checksum,
            "root_nid": sb.root_nid,
            "inos": sb.inos,
            "blocks": sb.blocks,
            "build_time": sb.build_time,
            "build_time_nsec": sb.build_time_nsec,
            "meta_blkaddr": sb.meta_blkaddr,
            "xattr_blkaddr": sb.xattr_blkaddr,
            "uuid": str(uuid.UUID(bytes=sb.uuid)),
            "volume_name": _text(sb.volume_name),
            "extra_devices": sb.extra_devices,
            "devt_slotoff": sb.devt_slotoff,
            "xattr_prefix_count": sb.xattr_prefix_count,
        },
        "rafs": None,
        "blobs": [],
        "devices": [],
        "prefetch": [],
    }
    if ext is not None:
        info["rafs"] = {
            "flags": ext.flags,
            "flag_names": decode_bits(ext.flags, RAFS_FLAG_NAMES),
            "compressor": _one(ext.flags, _FLAG_COMPRESSOR),
            "digester": _one(ext.flags, _FLAG_DIGESTER),
            "explicit_uid_gid": bool(ext.flags & sbf.FLAG_EXPLICIT_UID_GID),
            "blob_table": [ext.blob_table_offset, ext.blob_table_size],
            "chunk_table": [ext.chunk_table_offset, ext.chunk_table_size],
            "prefetch_table": [ext.prefetch_table_offset, ext.prefetch_table_size],
        }
    for b in image.blobs:
        blob: dict[str, Any] = {"index": b.index, "blob_id": b.blob_id, "nydus": b.nydus,
                                "uncompressed_size": b.uncompressed_size}
        if b.nydus:
            blob.update({
                "chunk_count": b.chunk_count,
                "chunk_size": b.chunk_size,
                "compressed_size": b.compressed_size,
                "compressor": COMPRESSOR_NAMES.get(b.compressor, str(b.compressor)),
                "digester": DIGESTER_NAMES.get(b.digester, str(b.digester)),
                "features": b.features,
                "feature_names": decode_bits(b.features, BLOB_FEATURE_NAMES),
                "ci_version": 2 if b.ci_v2 else 1,
                "ci_compressor": COMPRESSOR_NAMES.get(b.ci_compressor, str(b.ci_compressor)),
                "ci_offset": b.ci_offset,
                "ci_compressed_size": b.ci_compressed_size,
                "ci_uncompressed_size": b.ci_uncompressed_size,
                "toc_size": b.toc_size,
            })
        info["blobs"].append(blob)
    for i, d in enumerate(image.devices):
        info["devices"].append({"slot": i, "device_id": i + 1, "tag": _text(d.tag), "blocks": d.blocks,
                                "mapped_blkaddr": d.mapped_blkaddr})

    prefetch = image.prefetch_nids
    wanted = set(prefetch)
    paths: dict[int, bytes] = {}
    seen: set[int] = set()
    types: Counter[str] = Counter()
    npaths = reg_bytes = hardlinked = with_xattrs = 0
    for path, ino in image.walk():
        npaths += 1
        if ino.nid in seen:
            continue
        seen.add(ino.nid)
        if ino.nid in wanted:
            paths[ino.nid] = path
        types[FILE_TYPES[stat.S_IFMT(ino.mode)]] += 1
        if ino.is_reg():
            reg_bytes += ino.size
        if not ino.is_dir() and ino.nlink > 1:
            hardlinked += 1
        if ino.xattr_icount and image.listxattr(ino):
            with_xattrs += 1
    info["prefetch"] = [{"nid": nid, "path": os.fsdecode(paths[nid]) if nid in paths else None}
                        for nid in prefetch]
    info["counts"] = {"inodes": len(seen), "paths": npaths, "by_type": dict(sorted(types.items())),
                      "regular_bytes": reg_bytes, "hardlinked_inodes": hardlinked, "xattr_inodes": with_xattrs}
    return info


def _one(flags: int, names: dict[int, str]) -> str | None:
    found = [n for bit, n in names.items() if flags & bit]
    return "+".join(found) if found else None


def format_inspect(info: dict[str, Any]) -> str:
    """The human-readable report."""
    sb, rafs, counts = info["superblock"], info["rafs"], info["counts"]
    lines = [
        f"image:             {info['image']} ({info['image_size']} bytes)",
        f"flavour:           {'Nydus RAFS v6' if rafs else 'plain EROFS'}",
        f"block size:        {info['block_size']}",
    ]
    if info["chunk_size"]:
        lines.append(f"chunk size:        {info['chunk_size']} ({format_bytes(info['chunk_size'])})")
    lines += [
        f"feature compat:    0x{sb['feature_compat']:08x} {' '.join(sb['feature_compat_names'])}".rstrip(),
        f"feature incompat:  0x{sb['feature_incompat']:08x} {' '.join(sb['feature_incompat_names'])}".rstrip(),
        f"root nid:          {sb['root_nid']}",
        f"inodes (sb):       {sb['inos']}",
        f"blocks:            {sb['blocks']}",
        f"meta / xattr blk:  {sb['meta_blkaddr']} / {sb['xattr_blkaddr']}",
        f"build time:        {sb['build_time']}.{sb['build_time_nsec']:09d}",
        f"uuid:              {sb['uuid']}",
    ]
    if sb["volume_name"]:
        lines.append(f"volume name:       {sb['volume_name']}")
    if rafs:
        lines += [
            f"rafs flags:        0x{rafs['flags']:x} {' '.join(rafs['flag_names'])}".rstrip(),
            f"compressor:        {rafs['compressor'] or '(not set)'}",
            f"digester:          {rafs['digester'] or '(not set)'}",
            "blob table:        offset {} size {}".format(*rafs["blob_table"]),
            "chunk table:       offset {} size {}".format(*rafs["chunk_table"]),
            "prefetch table:    offset {} size {}".format(*rafs["prefetch_table"]),
        ]
    lines.append(f"blobs:             {len(info['blobs'])}")
    for b in info["blobs"]:
        if b["nydus"]:
            lines += [
                f"  [{b['index']}] {b['blob_id']}",
                f"      {b['chunk_count']} chunks of up to {format_bytes(b['chunk_size'])}, "
                f"{b['compressor']}/{b['digester']}, chunk info v{b['ci_version']} ({b['ci_compressor']})",
                f"      compressed {b['compressed_size']} bytes, uncompressed {b['uncompressed_size']} bytes",
                f"      features 0x{b['features']:x} {' '.join(b['feature_names'])}".rstrip(),
            ]
        else:
            lines.append(f"  [{b['index']}] {b['blob_id'] or '(no tag)'}: plain EROFS device, "
                         f"{b['uncompressed_size']} bytes")
    lines.append(f"device slots:      {len(info['devices'])}")
    for d in info["devices"]:
        lines.append(f"  device {d['device_id']}: tag {d['tag'] or '(none)'}, {d['blocks']} blocks, "
                     f"mapped at block {d['mapped_blkaddr']}")
    if info["prefetch"]:
        lines.append(f"prefetch:          {len(info['prefetch'])} entries")
        for p in info["prefetch"]:
            lines.append(f"  nid {p['nid']}: {p['path'] if p['path'] is not None else '(not in the tree)'}")
    else:
        lines.append("prefetch:          (none)")
    by_type = ", ".join(f"{n} {t}" for t, n in counts["by_type"].items())
    lines += [
        f"inodes:            {counts['inodes']} ({counts['paths']} paths): {by_type}",
        f"regular bytes:     {counts['regular_bytes']} ({format_bytes(counts['regular_bytes'])})",
        f"hardlinked inodes: {counts['hardlinked_inodes']}",
        f"inodes w/ xattrs:  {counts['xattr_inodes']}",
    ]
    return "\n".join(lines)
