"""Build and extract throughput of rafsfs on a large real tree, against the kernel/erofs-utils peers, in one run.

    python bench/build_extract.py            # Debian rootfs (>= 50k entries, >= 500 MiB), made once and cached
    python bench/build_extract.py --quick    # smoke run on a copy of /usr/include

build   ``mkfs.erofs IMG TREE`` (erofs-utils, uncompressed; also ``-zlz4`` for reference) against
        ``rafsfs build TREE --bootstrap B --blob-dir D --compressor none|zstd|lz4``.  The source tree is read once
        before (warm page cache) so the comparison is about the builder, not the disk; outputs are synced between
        runs, outside the timing.  Ratio: rafsfs throughput / ``mkfs.erofs`` (uncompressed) throughput.
extract the kernel's file-backed EROFS mount of the rafsfs ``--compressor none`` image copied with ``cp -a MNT/. DEST``
        against ``rafsfs extract B DEST --blob-dir D`` of the none and zstd images.  Caches are dropped before each
        run (cold); the timing ends when the command exits (dirty pages are synced afterwards, untimed).  Ratio:
        rafsfs throughput / ``cp -a`` throughput.  Every result is checked against the source: the full list of
        paths with type, mode, owner, size, mtime, link count, symlink target and device number, plus the sha256 and
        xattrs of a seeded sample of files.

rafsfs commands run as ``python -m rafsfs.cli`` subprocesses, so the times include interpreter start-up.  MiB/s
counts the tree's regular-file bytes (each inode once); entries/s counts every directory entry.  Results go to
``--out`` as JSON, CSV and a PNG bar chart.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pstats
import random
import shutil
import stat
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (REPO, Table, Timing, drop_caches, fmt_bytes, log, machine_info,  # noqa: E402
                          parent_parser, run_timed, save_plot, warm_tree)
from bench.rootfs import TreeInfo, get_tree  # noqa: E402

MiB = 1 << 20
RAFSFS = [sys.executable, "-m", "rafsfs.cli"]


# ---------------------------------------------------------------------------- verification
def manifest(root: str) -> dict[str, tuple]:
    """relpath -> (type, mode, uid, gid, size, mtime s, nlink, link target, rdev) for every entry under root."""
    out: dict[str, tuple] = {}
    stack = [""]
    root_st = os.lstat(root)
    out["."] = _entry(root_st, None, root)
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            for e in it:
                r = f"{rel}/{e.name}" if rel else e.name
                st = e.stat(follow_symlinks=False)
                out[r] = _entry(st, e.path, root)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(r)
    return out


def _entry(st: os.stat_result, path: str | None, _root: str) -> tuple:
    fmt = stat.S_IFMT(st.st_mode)
    is_dir = fmt == stat.S_IFDIR
    return (fmt, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
            st.st_size if fmt == stat.S_IFREG else 0,
            st.st_mtime_ns // 1_000_000_000,
            0 if is_dir else st.st_nlink,  # a directory's link count is the filesystem's business
            os.readlink(path) if fmt == stat.S_IFLNK and path else None,
            st.st_rdev if fmt in (stat.S_IFCHR, stat.S_IFBLK) else 0)


FIELDS = ("type", "mode", "uid", "gid", "size", "mtime", "nlink", "target", "rdev")


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        return {k: os.getxattr(path, k, follow_symlinks=False) for k in os.listxattr(path, follow_symlinks=False)}
    except OSError:
        return {}


def verify(src: str, src_manifest: dict[str, tuple], dest: str, sample: int) -> tuple[bool, str]:
    """Compare dest with the source: every entry's metadata, and content + xattrs of ``sample`` regular files."""
    got = manifest(dest)
    problems: list[str] = []
    missing = src_manifest.keys() - got.keys()
    extra = got.keys() - src_manifest.keys()
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {sorted(missing)[0]})")
    if extra:
        problems.append(f"{len(extra)} extra (e.g. {sorted(extra)[0]})")
    diff_by_field: dict[str, list[str]] = {}
    for rel in src_manifest.keys() & got.keys():
        a, b = src_manifest[rel], got[rel]
        if a != b:
            for name, x, y in zip(FIELDS, a, b):
                if x != y:
                    diff_by_field.setdefault(name, []).append(rel)
    for name, rels in diff_by_field.items():
        rel = sorted(rels)[0]
        i = FIELDS.index(name)
        problems.append(f"{name} differs on {len(rels)} (e.g. {rel}: {src_manifest[rel][i]!r} != {got[rel][i]!r})")
    regular = sorted(r for r, e in src_manifest.items() if e[0] == stat.S_IFREG and e[4] > 0 and r in got)
    rng = random.Random(20240601)
    picked = rng.sample(regular, min(sample, len(regular)))
    bad_data = [r for r in picked if _sha256(os.path.join(src, r)) != _sha256(os.path.join(dest, r))]
    bad_xattr = [r for r in picked if _xattrs(os.path.join(src, r)) != _xattrs(os.path.join(dest, r))]
    if bad_data:
        problems.append(f"sha256 differs on {len(bad_data)}/{len(picked)} sampled files (e.g. {bad_data[0]})")
    if bad_xattr:
        problems.append(f"xattrs differ on {len(bad_xattr)}/{len(picked)} sampled files (e.g. {bad_xattr[0]})")
    nbytes = sum(e[4] for e in got.values())
    if problems:
        return False, "; ".join(problems)
    return True, f"{len(got)} entries, {nbytes} bytes, {len(picked)} sha256 + xattrs match"


# ---------------------------------------------------------------------------- helpers
def _rm(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fresh_dir(path: Path) -> Path:
    _rm(path)
    path.mkdir(parents=True)
    return path


def _blob_of(blob_dir: Path) -> Path:
    blobs = [p for p in blob_dir.iterdir() if p.is_file()]
    if len(blobs) != 1:
        raise RuntimeError(f"expected exactly one blob in {blob_dir}, found {len(blobs)}")
    return blobs[0]


def _median_run(n: int, prepare, argv: list, **kw) -> tuple[Timing, list[float]]:
    """Run ``prepare()`` then argv ``n`` times; the Timing of the median-wall run and all wall times."""
    runs = []
    for _ in range(n):
        prepare()
        runs.append(run_timed(argv, cwd=REPO, **kw))
    walls = [r.wall for r in runs]
    med = sorted(runs, key=lambda r: r.wall)[(len(runs) - 1) // 2]
    return med, walls


def _row(table: Table, tree: TreeInfo, phase: str, tool: str, cmd: list, t: Timing, walls: list[float],
         **extra) -> dict:
    return table.add(phase=phase, tool=tool, command=" ".join(str(a) for a in cmd), seconds=t.wall, runs=walls,
                     mib_s=tree.bytes / MiB / t.wall, entries_s=tree.entries / t.wall, cpu_s=t.cpu,
                     rss_mib=t.maxrss_kb / 1024, **extra)


def profile(argv_tail: list[str], out: Path, name: str, prepare=None, top: int = 15) -> list[dict]:
    """Re-run one rafsfs command under cProfile (untimed) and return its top functions by cumulative time."""
    prof = out / f"profile-{name}.pstats"
    if prepare:
        prepare()
    run_timed([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "rafsfs.cli", *argv_tail], cwd=REPO)
    st = pstats.Stats(str(prof))
    rows = []
    for func, (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        filename, line, fn = func
        rows.append({"function": fn, "where": f"{os.path.relpath(filename, REPO) if filename.startswith('/') else filename}:{line}",
                     "calls": nc, "tottime": tt, "cumtime": ct})
    rows.sort(key=lambda r: r["cumtime"], reverse=True)
    # skip the interpreter/runpy frames at the top: keep what lives in the project, plus the heaviest C calls
    mine = [r for r in rows if r["where"].startswith(("rafsfs/", "fuse_backend/", "fscache_backend/"))][:top]
    by_self = sorted(rows, key=lambda r: r["tottime"], reverse=True)[:top]
    log(f"profile of {name} saved to {prof}")
    print(f"\nprofile: {name} (top by cumulative time, project code)")
    for r in mine:
        print(f"  {r['cumtime']:8.2f}s cum {r['tottime']:8.2f}s self {r['calls']:>9}  {r['function']}  {r['where']}")
    print(f"profile: {name} (top by self time)")
    for r in by_self:
        print(f"  {r['tottime']:8.2f}s self {r['cumtime']:8.2f}s cum {r['calls']:>9}  {r['function']}  {r['where']}")
    return mine + [dict(r, by="self") for r in by_self]


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[parent_parser()],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--work", type=Path, help="scratch directory for images and extracted trees (default OUT/work)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement; the median is reported (default 1)")
    ap.add_argument("--build-compressors", default="none,zstd,lz4", help="rafsfs build runs (default none,zstd,lz4)")
    ap.add_argument("--extract-compressors", default="none,zstd", help="rafsfs extract runs (default none,zstd)")
    ap.add_argument("--sample", type=int, default=200, help="files whose sha256 and xattrs are compared (default 200)")
    ap.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                    help="re-run rafsfs commands under cProfile (untimed): 'auto' when more than 10x slower than the "
                         "peer (default)")
    ap.add_argument("--keep", action="store_true", help="keep the images in the work directory")
    ap.add_argument("--rebuild-rootfs", action="store_true", help="debootstrap the rootfs again")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("run as root: dropping caches and mounting EROFS need it")
    build_comps = [c for c in args.build_compressors.split(",") if c]
    extract_comps = [c for c in args.extract_compressors.split(",") if c]
    for c in extract_comps:
        if c not in build_comps:
            build_comps.append(c)
    if "none" not in build_comps:
        build_comps.insert(0, "none")  # the kernel mount needs the uncompressed image

    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work: Path = (args.work or out / "work").resolve()
    work.mkdir(parents=True, exist_ok=True)

    tree = get_tree(quick=args.quick, rebuild=args.rebuild_rootfs)
    src = str(tree.path)
    log(f"tree: {tree.summary()}")

    log("reading the source tree once (warm page cache for the builds)")
    t0 = time.perf_counter()
    warm_tree(src)
    src_manifest = manifest(src)
    log(f"warmed in {time.perf_counter() - t0:.1f}s; source manifest: {len(src_manifest)} entries")

    table = Table(
        title=f"rafsfs build/extract vs peers on {tree.label}\n"
              f"  {tree.entries} entries, {tree.files} regular files, {fmt_bytes(tree.bytes)} of file data "
              f"({os.cpu_count()} CPUs, kernel {os.uname().release}; median of {args.repeat} run(s))",
        columns=[("phase", "phase", None), ("tool", "tool", None), ("seconds", "seconds", "{:.2f}"),
                 ("mib_s", "MiB/s", "{:.1f}"), ("entries_s", "entries/s", "{:.0f}"), ("cpu_s", "CPU s", "{:.2f}"),
                 ("rss_mib", "peak RSS MiB", "{:.0f}"), ("output", "output", None),
                 ("ratio", "vs peer", "{:.2f}x"), ("verify", "verify", None)])
    table.notes += [
        "build: source read once before (warm page cache); outputs synced between runs (untimed);",
        "       'vs peer' = rafsfs throughput / mkfs.erofs (uncompressed) throughput.",
        "extract: caches dropped before each run (cold); timing ends at exit (dest not synced);",
        "         'vs peer' = rafsfs throughput / cp -a from the kernel EROFS mount of the rafsfs none image.",
        "rafsfs runs as `python -m rafsfs.cli` subprocesses (start-up included); MiB/s over the tree's file bytes.",
    ]
    profiles: dict[str, list[dict]] = {}
    images: dict[str, tuple[Path, Path]] = {}  # compressor -> (bootstrap, blob dir)
    mnt = work / "mnt"
    mounted = False
    from rafsfs.sysmount import mount_erofs, umount

    try:
        # ------------------------------------------------------------ build
        peer_build = None
        for label, extra_opts in (("mkfs.erofs", []), ("mkfs.erofs -zlz4", ["-zlz4"])):
            img = work / ("erofs" + "".join(extra_opts) + ".img")
            cmd = ["mkfs.erofs", "--quiet", *extra_opts, str(img), src]
            t, walls = _median_run(args.repeat, lambda: (_rm(img), os.sync()), cmd)
            if peer_build is None:
                peer_build = t.wall
            _row(table, tree, "build", label, cmd, t, walls, output=fmt_bytes(img.stat().st_size),
                 output_bytes=img.stat().st_size, ratio=peer_build / t.wall if label == "mkfs.erofs" else None)
            _rm(img)
        assert peer_build is not None
        for comp in build_comps:
            boot, blobs = work / f"rafsfs-{comp}.boot", work / f"blobs-{comp}"
            cmd = [*RAFSFS, "--log-level", "warning", "build", src, "--bootstrap", str(boot), "--blob-dir", str(blobs),
                   "--compressor", comp]

            def prepare(boot=boot, blobs=blobs):
                _rm(boot)
                _fresh_dir(blobs)
                os.sync()

            t, walls = _median_run(args.repeat, prepare, cmd)
            images[comp] = (boot, blobs)
            bsize, osize = boot.stat().st_size, _blob_of(blobs).stat().st_size
            _row(table, tree, "build", f"rafsfs build --compressor {comp}", cmd, t, walls,
                 output=f"{fmt_bytes(bsize + osize)} ({fmt_bytes(bsize)} meta)", output_bytes=bsize + osize,
                 bootstrap_bytes=bsize, blob_bytes=osize, ratio=peer_build / t.wall, summary=t.stdout.strip())
            slow = peer_build / t.wall < 0.1
            if args.profile == "always" or (args.profile == "auto" and slow):
                log(f"rafsfs build --compressor {comp} is {t.wall / peer_build:.1f}x slower than mkfs.erofs: profiling")
                profiles[f"build-{comp}"] = profile(cmd[3:], out, f"build-{comp}", prepare)
        os.sync()

        # ------------------------------------------------------------ extract
        def extract_row(tool: str, cmd: list, dest: Path, before=None, after=None, peer: float | None = None,
                        name: str = "") -> Timing:
            walls = []
            runs = []
            for _ in range(args.repeat):
                _rm(dest)
                if before:
                    before()
                drop_caches()
                runs.append(run_timed(cmd, cwd=REPO))
                walls.append(runs[-1].wall)
                if after:
                    after()
                if len(runs) < args.repeat:
                    _rm(dest)
            t = sorted(runs, key=lambda r: r.wall)[(len(runs) - 1) // 2]
            os.sync()
            log(f"verifying {dest}")
            ok, detail = verify(src, src_manifest, str(dest), args.sample)
            log(("PASS: " if ok else "FAIL: ") + detail)
            _row(table, tree, "extract", tool, cmd, t, walls, output=fmt_bytes(tree.bytes),
                 ratio=(peer / t.wall) if peer else 1.0, verify="PASS" if ok else "FAIL", verify_detail=detail,
                 summary=t.stdout.strip())
            _rm(dest)
            return t

        boot, blobs = images["none"]
        mnt.mkdir(exist_ok=True)
        dest = work / "dest"

        def do_mount():
            nonlocal mounted
            mount_erofs(str(boot), str(mnt), [str(_blob_of(blobs))])
            mounted = True

        def do_umount():
            nonlocal mounted
            umount(str(mnt))
            mounted = False

        # cp -a MNT/. DEST needs DEST to exist; it is created before the caches are dropped
        t = extract_row("cp -a (kernel EROFS mount, none)", ["cp", "-a", f"{mnt}/.", str(dest)], dest,
                        before=lambda: (do_mount(), dest.mkdir()), after=do_umount)
        peer_extract = t.wall
        for comp in extract_comps:
            boot, blobs = images[comp]
            cmd = [*RAFSFS, "--log-level", "warning", "extract", str(boot), str(dest), "--blob-dir", str(blobs)]
            t = extract_row(f"rafsfs extract ({comp})", cmd, dest, peer=peer_extract)
            slow = peer_extract / t.wall < 0.1
            if args.profile == "always" or (args.profile == "auto" and slow):
                log(f"rafsfs extract ({comp}) is {t.wall / peer_extract:.1f}x slower than cp -a: profiling")
                profiles[f"extract-{comp}"] = profile(cmd[3:], out, f"extract-{comp}",
                                                      lambda: (_rm(dest), drop_caches()))
                _rm(dest)
    finally:
        if mounted:
            try:
                umount(str(mnt))
            except OSError as e:
                log(f"WARNING: {e}; unmounting lazily")
                umount(str(mnt), lazy=True)
        if not args.keep:
            for boot, blobs in images.values():
                _rm(boot)
                _rm(blobs)
            _rm(work / "dest")

    # ---------------------------------------------------------------- report
    print()
    table.print()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = out / ("build_extract-quick" if args.quick else "build_extract")
    meta = {"tree": tree.to_json(), "machine": machine_info(), "repeat": args.repeat, "when": stamp,
            "profiles": profiles}
    table.save_json(f"{base}.json", **meta)
    table.save_csv(f"{base}.csv")
    labels = [f"{r['phase']}: {r['tool']}" for r in table.rows]
    values = [r["mib_s"] for r in table.rows]
    colors = ["#4c72b0" if r["tool"].startswith(("mkfs", "cp")) else "#dd8452" for r in table.rows]
    notes = [f"{r['mib_s']:.1f} MiB/s" + (f"  ({r['ratio']:.2f}x)" if r.get("ratio") else "") for r in table.rows]
    save_plot(f"{base}.png", labels, values, colors=colors, annotate=notes, xlabel="MiB/s of file data",
              title=f"rafsfs vs peers (blue) on {tree.entries} entries, {fmt_bytes(tree.bytes)}")
    log(f"results: {base}.json, {base}.csv")
    return 0 if all(r.get("verify") in (None, "PASS") for r in table.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
