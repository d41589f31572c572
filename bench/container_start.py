"""Container start time: pull + run to first output, for one python3 image five ways, from one run.

    python bench/container_start.py               # 3 repetitions per way, median reported
    python bench/container_start.py --repeat 1    # one of each

The image: Debian bookworm debootstrap minbase + python3 (the e2e and FUSE tests' rootfs, tests/rootfs_cache.py)
as a one-layer OCI image (gzip) in a local docker-registry on 127.0.0.1.  The command: ``python3 -c 'print(42)'``.

    full pull  ``ctr images pull --plain-http`` (download + unpack onto overlayfs), then ``ctr run``
    rafsfs (FUSE)   the image converted with ``rafsfs convert``; ``ctr-remote images rpull --snapshotter nydus``
               (fetches only the bootstrap layer), then ``ctr run --snapshotter nydus``: nydus-snapshotter (Debian 13)
               starts ``rafsfs-nydusd`` (``RAFSFS_NYDUSD_MODE=fuse``), which reads chunks from the registry on demand
    rafsfs (fanotify)   the same with ``RAFSFS_NYDUSD_MODE=fanotify``: the kernel's EROFS mounts the bootstrap with
               the chunk cache's data file as its device, and the daemon only fills missing ranges on fanotify
               pre-content events (what ``auto`` picks on a 6.14+ kernel)
    rafsfs + prefetch_all   the same with ``fs_prefetch.prefetch_all`` (as in the snapshotter's shipped nydusd
               config): the daemon also fetches the whole blob in the background, behind on-demand reads
    SOCI       soci-snapshotter (Debian 13) with a SOCI index made by ``soci create`` and pushed next to the image;
               ``soci image rpull``, then ``ctr run --snapshotter soci``.  soci-snapshotter 0.4.1 fetches SOCI
               indexes over HTTPS only, so this way reads the same stored images through a second docker-registry
               process with TLS on loopback, named 0.0.0.0 (the other two use plain HTTP; TLS costs SOCI a little)

Each run gets a fresh containerd + snapshotter root (nothing cached locally) and dropped page caches; then the
programs themselves (ctr, runc, the shim, the snapshotters, the rafsfs daemon's Python modules) are read back in, as
on a node that runs containers all day, so only the image data is cold.  "first output" is when ``42`` reaches
ctr's stdout; "total" adds the pull.  Preparation (push, convert, SOCI index) is not
timed.  Results go to ``--out`` as JSON, CSV and a PNG bar chart.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench.common import Table, drop_caches, log, machine_info, parent_parser, save_plot  # noqa: E402
from containerd_env import (CI_CACHE, Containerd, Registry, push_oci_image,  # noqa: E402
                            python_rootfs_tar, short_tmpdir)

CMD = ("python3", "-c", "print(42)")
WAYS = ("full pull (overlayfs)", "rafsfs fanotify (nydus-snapshotter)", "rafsfs FUSE (nydus-snapshotter)",
        "SOCI (soci-snapshotter)", "rafsfs FUSE + prefetch_all")
FULL, FANOTIFY, FUSE, SOCI = WAYS[:4]


TOOLS = ("ctr", "ctr-remote", "soci", "runc", "containerd-shim-runc-v2", "containerd", "containerd-nydus-grpc",
         "soci-snapshotter-grpc", "docker-registry", "rafsfs-nydusd")
DAEMON_MODULES = ("rafsfs.nydusd", "fuse_backend.mount", "fanotify_backend.runner", "rafsfs.config", "rafsfs.image",
                  "rafsfs.storage.factory", "rafsfs.storage.backend.registry", "rafsfs.storage.cache.prefetch",
                  "rafsfs.tools")


def cold_image_warm_tools() -> None:
    """Drop the page cache, then read the programs back in (the tools' binaries and the rafsfs daemon's Python
    modules), as on a node that runs containers all day: only the image data is cold."""
    drop_caches()
    for tool in TOOLS:
        path = shutil.which(tool)
        if path:
            with open(path, "rb") as f:
                while f.read(1 << 20):
                    pass
    subprocess.run([sys.executable, "-c", "import " + ", ".join(DAEMON_MODULES)], check=True,
                   cwd=str(Path(__file__).resolve().parent.parent))


def run_to_output(ce: Containerd, argv: list[str], expect: str = "42") -> tuple[float, float]:
    """Start ``argv`` (a ctr command); seconds until ``expect`` is printed, and until the command exits."""
    full = [argv[0], "--address", ce.address, "--namespace", ce.NS, *argv[1:]]
    t0 = time.perf_counter()
    p = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    assert p.stdout is not None
    first = None
    for line in p.stdout:
        if line.strip() == expect and first is None:
            first = time.perf_counter() - t0
    err = p.stderr.read() if p.stderr else ""
    rc = p.wait()
    total = time.perf_counter() - t0
    if rc != 0 or first is None:
        raise RuntimeError(f"{' '.join(full)} exited {rc} without printing {expect}: {err[-2000:]}")
    return first, total


def _cpu_seconds(pid: int) -> float:
    """user + system CPU seconds a process has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(way: str, root: Path, refs: dict[str, str], ca_file: Path | None) -> dict:
    ce = Containerd(root, soci=way.startswith("SOCI"), ca_file=ca_file, prefetch_all=way.endswith("prefetch_all"),
                    nydusd_mode="fanotify" if way == FANOTIFY else "fuse")
    try:
        cold_image_warm_tools()
        name = f"b{time.monotonic_ns()}"
        t0 = time.perf_counter()
        if way.startswith("full"):
            ce.ctr("images", "pull", "--plain-http", refs["oci"])
            snap, ref = "overlayfs", refs["oci"]
        elif way.startswith("rafsfs"):  # every rafsfs way
            ce.rpull_nydus(refs["nydus"])
            snap, ref = "nydus", refs["nydus"]
        else:
            ce.soci("image", "rpull", "--tlscacert", str(ca_file), refs["oci_tls"])
            snap, ref = "soci", refs["oci_tls"]
        pull = time.perf_counter() - t0
        first, run_total = run_to_output(ce, ["ctr", "run", "--rm", "--snapshotter", snap, ref, name, *CMD])
        row = {"way": way, "pull_s": pull, "first_output_s": first, "run_s": run_total, "total_s": pull + first}
        if way.startswith("rafsfs"):
            from rafsfs.api.stats import read_stats

            socks = sorted((root / "nydus" / "socket").glob("*/api.sock"))
            if socks:
                s = read_stats(str(socks[0]))
                row.update(fetched_bytes=s["bytes_fetched"], backend_requests=s["backend_requests"])
            row["daemon_cpu_s"] = sum(_cpu_seconds(pid) for pid in ce.nydusd_pids())
        return row
    finally:
        ce.close()
        shutil.rmtree(root, ignore_errors=True)


def prepare(reg: Registry, work: Path, soci: bool, tls_host: str) -> dict[str, str]:
    # the daemon's bytecode, as `pip install` compiles it: from a source checkout with PYTHONDONTWRITEBYTECODE set
    # (as on this machine) every daemon start would compile every rafsfs module again, ~40 ms
    subprocess.run([sys.executable, "-m", "compileall", "-q", "rafsfs", "fuse_backend", "fanotify_backend"], check=True,
                   cwd=str(Path(__file__).resolve().parent.parent))
    tar = python_rootfs_tar()
    log(f"pushing the OCI image ({tar.stat().st_size >> 20} MiB rootfs tar, gzip)")
    oci = push_oci_image(reg, "bench/python", "oci", [tar], CI_CACHE / "layers")
    nydus = f"{reg.host}/bench/python:nydus"
    log("rafsfs convert")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rafsfs.cli", "convert", oci, nydus, "--log-level", "warning"],
                   check=True, cwd=str(Path(__file__).resolve().parent.parent))
    log(f"converted in {time.perf_counter() - t0:.1f}s")
    if soci:
        log("making and pushing the SOCI index")
        ce = Containerd(work / "soci-prep", soci=True)
        try:
            ce.ctr("images", "pull", "--plain-http", oci)
            ce.soci("create", oci)
            ce.soci("push", "--plain-http", oci)
        finally:
            ce.close()
            shutil.rmtree(work / "soci-prep", ignore_errors=True)
    return {"oci": oci, "nydus": nydus, "oci_tls": oci.replace(reg.host, tls_host)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[parent_parser()])
    ap.add_argument("--repeat", type=int, default=3, help="runs per way; the median is reported (default 3)")
    ap.add_argument("--no-soci", action="store_true", help="leave SOCI out")
    ap.add_argument("--no-prefetch", action="store_true", help="leave the rafsfs + prefetch_all way out")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("container_start: needs root")
    ways = [w for w in WAYS if not (args.no_soci and w.startswith("SOCI"))
            and not (args.no_prefetch and w.endswith("prefetch_all"))]
    args.out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    work = short_tmpdir("rfbench.")
    reg = Registry(work / "reg")
    # the same images over HTTPS for SOCI (see containerd_env.Containerd): a second registry on the same storage
    reg_tls = Registry(work / "reg-tls", tls=True, storage=reg.storage)
    runs: dict[str, list[dict]] = {w: [] for w in ways}
    try:
        # 0.0.0.0 reaches the 127.0.0.1 listener (Linux routes it to loopback) but, unlike 127.0.0.1, is not taken for
        # "localhost" by soci-snapshotter, which would then fetch layers over plain HTTP from this TLS registry
        refs = prepare(reg, work, soci=not args.no_soci, tls_host=f"0.0.0.0:{reg_tls.port}")
        for i in range(args.repeat):
            for way in ways:  # interleaved, so drift on a shared machine hits every way alike
                row = one_run(way, work / f"r{i}-{ways.index(way)}", refs, reg_tls.ca_file)
                log(f"run {i + 1}/{args.repeat} {way}: pull {row['pull_s']:.2f}s + first output "
                    f"{row['first_output_s']:.2f}s = {row['total_s']:.2f}s")
                runs[way].append(row)
    finally:
        reg_tls.close()
        reg.close()
        shutil.rmtree(work, ignore_errors=True)

    table = Table(title=f"Container start: pull + run to first output of python3 -c 'print(42)' "
                        f"(median of {args.repeat}, fresh snapshotter root and cold image data each run)",
                  columns=[("way", "way", None), ("pull_s", "pull s", "{:.2f}"),
                           ("first_output_s", "run to output s", "{:.2f}"), ("total_s", "total s", "{:.2f}"),
                           ("vs_full", "vs full pull", "{:.2f}x"), ("fetched", "fetched", None),
                           ("daemon_cpu_s", "daemon CPU s", "{:.2f}")])
    med = {}
    for way in ways:
        rows = runs[way]
        med[way] = {k: statistics.median(r[k] for r in rows) for k in ("pull_s", "first_output_s", "total_s")}
    full = med[FULL]["total_s"]
    for way in ways:
        m = med[way]
        fetched = [r.get("fetched_bytes") for r in runs[way] if r.get("fetched_bytes") is not None]
        cpu = [r["daemon_cpu_s"] for r in runs[way] if "daemon_cpu_s" in r]
        table.add(way=way, **m, vs_full=m["total_s"] / full, daemon_cpu_s=statistics.median(cpu) if cpu else None,
                  fetched=f"{statistics.median(fetched) / 2**20:.1f} MiB" if fetched else None,
                  totals=[r["total_s"] for r in runs[way]])
    raf, fan = med[FUSE]["total_s"], med[FANOTIFY]["total_s"]
    table.notes.append(f"goal: rafsfs <= 0.2x the full pull: fanotify {fan / full:.2f}x, FUSE {raf / full:.2f}x "
                       f"({'met' if min(raf, fan) <= 0.2 * full else 'NOT met'})")
    table.notes.append(f"goal: fanotify ahead of FUSE: {fan:.2f}s vs {raf:.2f}s ({'met' if fan < raf else 'NOT met'})")
    if SOCI in med:
        soci = med[SOCI]["total_s"]
        table.notes.append(f"goal: rafsfs ahead of SOCI: fanotify {fan:.2f}s, FUSE {raf:.2f}s vs {soci:.2f}s "
                           f"({'met' if fan < soci else 'NOT met'} for fanotify)")
    table.notes.append(f"load average (1 min) at start {load0:.1f}, at end {os.getloadavg()[0]:.1f} on "
                       f"{os.cpu_count()} CPUs: other work on the machine slows every way, the Python daemon most")
    table.print()
    base = args.out / "container_start"
    table.save_json(f"{base}.json", machine=machine_info(), runs=runs)
    table.save_csv(f"{base}.csv")
    save_plot(f"{base}.png", list(ways), [med[w]["total_s"] for w in ways],
              title="container start (pull + run to first output), lower is better", xlabel="seconds",
              colors=[{FULL: "#999999", FANOTIFY: "#1b5e20", SOCI: "#d08a2a"}.get(w, "#2a7ab0") for w in ways],
              annotate=[f"{med[w]['total_s']:.2f}s ({med[w]['total_s'] / full:.2f}x)" for w in ways])
    return 0


if __name__ == "__main__":
    sys.exit(main())
