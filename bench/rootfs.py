"""A large real tree to benchmark on: a Debian bookworm rootfs made once by debootstrap and cached.

    python bench/rootfs.py            # make (or reuse) the rootfs and print its counts
    python bench/rootfs.py --quick    # the small smoke-run tree instead
    python bench/rootfs.py --rebuild  # throw the cached rootfs away and debootstrap again

The cache lives in ``$RAFSFS_BENCH_CACHE`` (default /var/cache/rafsfs-bench): ``<name>/rootfs.tar`` (the tree as
made, numeric owners, xattrs) and ``<name>/tree`` (extracted), plus ``<name>/meta.json`` with what went in and the
counts.  A later run reuses ``tree`` (or re-extracts it from ``rootfs.tar``) and never runs debootstrap again.

The Debian mirror is the one this machine's apt already uses (read from /etc/apt/sources.list and
/etc/apt/sources.list.d/*); the system's apt sources are never changed.

Size targets: at least 50k entries and 500 MiB of file data.  ``debootstrap --variant=minbase
--include=python3,gcc,g++,perl`` comes first; when that is smaller, tiers of extra development packages are
installed into it (apt-get in a chroot) until it is big enough, and both sets of counts are recorded.

If debootstrap fails the full bench falls back to a copy of /usr/share, and ``--quick`` uses a copy of /usr/include;
both are labelled as such wherever the numbers are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fmt_bytes, log  # noqa: E402

CACHE = Path(os.environ.get("RAFSFS_BENCH_CACHE", "/var/cache/rafsfs-bench"))
SUITE = "bookworm"
BASE_INCLUDE = ("python3", "gcc", "g++", "perl")
# Installed in order, one tier at a time, only while the tree is below the targets (minbase + python3,gcc,g++,perl
# alone is ~14k entries, ~600 MiB).  Development packages a build image would plausibly carry: libboost-dev alone is
# ~15k header files, the kernel headers ~11k.
EXTRA_TIERS: tuple[tuple[str, ...], ...] = (
    ("python3-dev", "libboost-dev", "git", "make"),
    ("linux-headers-amd64",),
    ("vim-runtime", "python3-numpy", "perl-doc", "manpages-dev", "cmake"),
    ("golang-go",),
)
MIN_ENTRIES = 50_000
MIN_BYTES = 500 << 20


@dataclass
class TreeInfo:
    path: Path  # the tree to build images from
    kind: str  # "debootstrap" | "fallback" | "quick"
    label: str  # one line saying what the tree is
    entries: int  # every directory entry including the root (dirs, files, symlinks, devices, ...)
    files: int  # regular files (each hard link counted)
    bytes: int  # regular-file bytes, each inode once
    meta: dict = field(default_factory=dict)

    def summary(self) -> str:
        return f"{self.label}: {self.entries} entries, {self.files} files, {fmt_bytes(self.bytes)}"

    def to_json(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


# ---------------------------------------------------------------------------- counting
def count_tree(root: str | os.PathLike) -> tuple[int, int, int]:
    """(entries, regular files, regular-file bytes with each inode once), without following symlinks."""
    entries = 1
    files = 0
    nbytes = 0
    seen: set[tuple[int, int]] = set()
    stack = [os.fspath(root)]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                entries += 1
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    files += 1
                    st = e.stat(follow_symlinks=False)
                    if st.st_nlink > 1:
                        key = (st.st_dev, st.st_ino)
                        if key in seen:
                            continue
                        seen.add(key)
                    nbytes += st.st_size
    return entries, files, nbytes


def big_enough(entries: int, nbytes: int) -> bool:
    return entries >= MIN_ENTRIES and nbytes >= MIN_BYTES


# ---------------------------------------------------------------------------- apt sources
def _one_line_sources(text: str) -> list[tuple[list[str], str, list[str]]]:
    """(types, uri, suites) from the one-line ``deb [opts] uri suite comps`` format."""
    out = []
    for ln in text.splitlines():
        ln = ln.split("#", 1)[0].strip()
        if not ln:
            continue
        ln = re.sub(r"\[[^\]]*\]", " ", ln)
        parts = ln.split()
        if len(parts) >= 3 and parts[0] in ("deb", "deb-src"):
            out.append(([parts[0]], parts[1], [parts[2]]))
    return out


def _deb822_sources(text: str) -> list[tuple[list[str], str, list[str]]]:
    """(types, uri, suites) for every URI of every stanza of a deb822 ``.sources`` file."""
    out = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for ln in stanza.splitlines():
            if ln.startswith("#") or not ln.strip():
                continue
            if ln[0].isspace() and key:
                fields[key] += " " + ln.strip()
                continue
            if ":" in ln:
                key, val = ln.split(":", 1)
                key = key.strip().lower()
                fields[key] = val.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        types = fields.get("types", "").split()
        for uri in fields.get("uris", "").split():
            out.append((types, uri, fields.get("suites", "").split()))
    return out


def find_debian_mirror(suite: str = SUITE) -> str:
    """The URI this machine's apt uses for ``deb ... <suite>`` (the main archive, not -security/-updates)."""
    entries: list[tuple[list[str], str, list[str]]] = []
    main = Path("/etc/apt/sources.list")
    files = [main] if main.is_file() else []
    d = Path("/etc/apt/sources.list.d")
    if d.is_dir():
        files += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))  # what apt itself reads
    for p in files:
        try:
            text = p.read_text()
        except OSError:
            continue
        entries += _deb822_sources(text) if p.suffix == ".sources" else _one_line_sources(text)
    for types, uri, suites in entries:
        if "deb" in types and suite in suites:
            return uri
    raise RuntimeError(f"no 'deb' source for suite {suite!r} in /etc/apt/sources.list(.d); cannot debootstrap")


# ---------------------------------------------------------------------------- debootstrap
def _stream(argv: list[str], logfile: Path, env: dict | None = None, prefix: str = "  ") -> None:
    """Run argv, appending its output to logfile and echoing the interesting lines as progress."""
    log("$ " + " ".join(argv))
    with open(logfile, "ab") as lf:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert p.stdout is not None
        last = 0.0
        for raw in p.stdout:
            lf.write(raw)
            line = raw.decode(errors="replace").rstrip()
            # debootstrap: "I: Retrieving ...", "I: Unpacking ..."; apt: "Unpacking x", "Setting up x"
            if "Is /dev/pts mounted?" in line:  # apt's terminal log needs a pty; harmless in a chroot
                continue
            if line.startswith(("I: ", "W: ", "E: ")) or "Err" in line or "error" in line.lower():
                now = time.monotonic()
                if not line.startswith("I: ") or now - last > 2 or "Base system installed" in line:
                    print(prefix + line, file=sys.stderr, flush=True)
                    last = now
        rc = p.wait()
    if rc:
        raise RuntimeError(f"{argv[0]} failed with exit code {rc} (full log: {logfile})")


def _ensure_debootstrap() -> None:
    if shutil.which("debootstrap"):
        return
    log("debootstrap is not installed: apt-get install -y debootstrap")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "debootstrap"], check=True, env=env)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        targets = [ln.split()[1].encode().decode("unicode_escape") for ln in f]
    return sorted((t for t in targets if t.startswith(prefix)), key=len, reverse=True)


def _umount_all_under(path: Path) -> None:
    from rafsfs.sysmount import umount

    for t in _mounts_under(path):
        log(f"unmounting leftover {t}")
        umount(t, lazy=True)


def _rmtree(path: Path) -> None:
    if path.exists() or path.is_symlink():
        _umount_all_under(path)  # never recurse into a leftover /proc mount
        shutil.rmtree(path)


def _chroot_install(tree: Path, packages: tuple[str, ...], logfile: Path, need_update: bool) -> None:
    """apt-get install packages inside the debootstrapped tree (its own sources.list points at the same mirror)."""
    from rafsfs.sysmount import mount, umount

    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C", LANG="C",
               PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    resolv = tree / "etc/resolv.conf"
    saved = resolv.read_bytes() if resolv.is_file() and not resolv.is_symlink() else None
    policy = tree / "usr/sbin/policy-rc.d"
    mount("proc", str(tree / "proc"), "proc", "", 0)
    try:
        if Path("/etc/resolv.conf").is_file():
            if resolv.is_symlink():
                resolv.unlink()
            shutil.copyfile("/etc/resolv.conf", resolv)
        policy.write_text("#!/bin/sh\nexit 101\n")  # no service starts inside the chroot
        policy.chmod(0o755)
        if need_update:
            _stream(["chroot", str(tree), "apt-get", "update"], logfile, env)
        _stream(["chroot", str(tree), "apt-get", "install", "-y", "--no-install-recommends", *packages], logfile, env)
        _stream(["chroot", str(tree), "apt-get", "clean"], logfile, env)
    finally:
        umount(str(tree / "proc"), lazy=True)
        policy.unlink(missing_ok=True)
        if saved is not None:
            resolv.write_bytes(saved)
        else:
            resolv.unlink(missing_ok=True)


def _debootstrap(workdir: Path, include: tuple[str, ...], extra_tiers: tuple[tuple[str, ...], ...]) -> dict:
    """debootstrap into workdir/tree.partial, top it up, tar it, then rename to tree.  Returns the metadata."""
    _ensure_debootstrap()
    mirror = find_debian_mirror(SUITE)
    logfile = workdir / "debootstrap.log"
    partial = workdir / "tree.partial"
    _rmtree(partial)
    logfile.unlink(missing_ok=True)
    log(f"debootstrap {SUITE} (minbase + {','.join(include)}) from {mirror} into {partial}; log in {logfile}")
    t0 = time.monotonic()
    _stream(["debootstrap", "--variant=minbase", f"--include={','.join(include)}", SUITE, str(partial), mirror],
            logfile)
    e, f, b = count_tree(partial)
    meta: dict = {"suite": SUITE, "mirror": mirror, "variant": "minbase", "include": list(include),
                  "base_counts": {"entries": e, "files": f, "bytes": b}, "extra_packages": [],
                  "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    log(f"debootstrap done in {time.monotonic() - t0:.0f}s: {e} entries, {f} files, {fmt_bytes(b)}")
    for i, tier in enumerate(extra_tiers):
        if big_enough(e, b):
            break
        log(f"below the targets ({MIN_ENTRIES} entries, {fmt_bytes(MIN_BYTES)}): adding {' '.join(tier)}")
        _chroot_install(partial, tier, logfile, need_update=(i == 0))
        meta["extra_packages"] += list(tier)
        e, f, b = count_tree(partial)
        log(f"now {e} entries, {f} files, {fmt_bytes(b)}")
    lists = partial / "var/lib/apt/lists"
    if lists.is_dir():  # like container images: no apt lists in the image
        for p in lists.iterdir():
            if p.is_file():
                p.unlink()
    e, f, b = count_tree(partial)
    meta["counts"] = {"entries": e, "files": f, "bytes": b}
    if extra_tiers and not big_enough(e, b):  # no tiers: a small tree on purpose (the tests' rootfs)
        log(f"WARNING: the rootfs is still below the targets after all extra tiers: {e} entries, {fmt_bytes(b)}")
    meta["seconds"] = round(time.monotonic() - t0, 1)
    tar = workdir / "rootfs.tar"
    log(f"caching the tree as {tar}")
    subprocess.run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-cf", str(tar) + ".partial",
                    "-C", str(partial), "."], check=True)
    os.replace(str(tar) + ".partial", tar)
    os.replace(partial, workdir / "tree")
    return meta


def _cache_dir(include: tuple[str, ...], extra_tiers: tuple[tuple[str, ...], ...]) -> Path:
    import hashlib

    key = json.dumps([SUITE, list(include), [list(t) for t in extra_tiers], MIN_ENTRIES, MIN_BYTES])
    return CACHE / f"{SUITE}-minbase-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def ensure_rootfs(path: str | os.PathLike | None = None, include: tuple[str, ...] = BASE_INCLUDE,
                  extra_tiers: tuple[tuple[str, ...], ...] = EXTRA_TIERS, rebuild: bool = False) -> Path:
    """The cached Debian rootfs tree (made on first use).  ``path`` is the cache directory for this rootfs
    (default: a directory under $RAFSFS_BENCH_CACHE named after the package set); returns ``path/tree``."""
    workdir = Path(path) if path else _cache_dir(include, extra_tiers)
    workdir.mkdir(parents=True, exist_ok=True)
    tree, tar, metaf = workdir / "tree", workdir / "rootfs.tar", workdir / "meta.json"
    if rebuild:
        _rmtree(tree)
        tar.unlink(missing_ok=True)
        metaf.unlink(missing_ok=True)
    if tree.is_dir() and metaf.is_file():
        log(f"using the cached rootfs {tree}")
        return tree
    if tar.is_file() and metaf.is_file():
        log(f"extracting the cached {tar}")
        partial = workdir / "tree.partial"
        _rmtree(partial)
        partial.mkdir()
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", str(tar),
                        "-C", str(partial)], check=True)
        _rmtree(tree)
        os.replace(partial, tree)
        return tree
    _rmtree(tree)
    meta = _debootstrap(workdir, include, extra_tiers)
    metaf.write_text(json.dumps(meta, indent=2) + "\n")
    return tree


def _copy_tree(src: str, name: str) -> Path:
    workdir = CACHE / name
    tree = workdir / "tree"
    if tree.is_dir() and (workdir / "meta.json").is_file():
        return tree
    workdir.mkdir(parents=True, exist_ok=True)
    _rmtree(tree)
    log(f"copying {src} to {tree}")
    subprocess.run(["cp", "-a", src, str(tree)], check=True)
    (workdir / "meta.json").write_text(json.dumps({"copy_of": src, "created": time.strftime("%F %T")}) + "\n")
    return tree


def get_tree(quick: bool = False, rebuild: bool = False) -> TreeInfo:
    """The tree a bench runs on, with its counts: the Debian rootfs, or (labelled) a copy of a system dir."""
    if quick:
        path, kind, label = _copy_tree("/usr/include", "quick-usr-include"), "quick", \
            "QUICK smoke tree (copy of /usr/include, not the benchmark)"
        meta: dict = {"copy_of": "/usr/include"}
    else:
        try:
            path = ensure_rootfs(rebuild=rebuild)
            kind = "debootstrap"
            meta = json.loads((path.parent / "meta.json").read_text())
            extra = meta.get("extra_packages") or []
            label = (f"Debian {meta.get('suite', SUITE)} rootfs (debootstrap minbase + "
                     f"{','.join(meta.get('include', BASE_INCLUDE))}" + (f" + {' '.join(extra)}" if extra else "") + ")")
        except Exception as e:  # noqa: BLE001 - any failure: fall back, loudly
            log(f"WARNING: debootstrap rootfs unavailable ({e}); FALLING BACK to a copy of /usr/share")
            path, kind = _copy_tree("/usr/share", "fallback-usr-share"), "fallback"
            label = "FALLBACK tree (copy of /usr/share; debootstrap failed)"
            meta = {"copy_of": "/usr/share", "error": str(e)}
    entries, files, nbytes = count_tree(path)
    info = TreeInfo(path=path, kind=kind, label=label, entries=entries, files=files, bytes=nbytes, meta=meta)
    if kind != "quick" and not big_enough(entries, nbytes):
        log(f"WARNING: tree below the targets ({MIN_ENTRIES} entries, {fmt_bytes(MIN_BYTES)}): {info.summary()}")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the small smoke tree (copy of /usr/include)")
    ap.add_argument("--rebuild", action="store_true", help="discard the cached rootfs and debootstrap again")
    args = ap.parse_args(argv)
    info = get_tree(quick=args.quick, rebuild=args.rebuild)
    print(info.summary())
    print(f"path: {info.path}")
    base = info.meta.get("base_counts")
    if base:
        print(f"minbase + {','.join(info.meta['include'])} alone: {base['entries']} entries, {base['files']} files, "
              f"{fmt_bytes(base['bytes'])}; extra packages: {' '.join(info.meta['extra_packages']) or 'none'}")
    print(f"targets: >= {MIN_ENTRIES} entries, >= {fmt_bytes(MIN_BYTES)}: "
          f"{'met' if big_enough(info.entries, info.bytes) else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
