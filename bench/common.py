"""The shared runner for bench scripts: timing, cache control, a result table, an optional plot, common arguments.

Every bench script answers one question, measures rafsfs against a peer in the same run, and prints a table
(plus a plot where a picture helps) instead of asserting a speed in a test.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "out"  # git-ignored


# ---------------------------------------------------------------------------- logging
def log(msg: str) -> None:
    """A progress line on stderr, stamped with the time since the script started."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


_T0 = time.perf_counter()


# ---------------------------------------------------------------------------- arguments
def parent_parser() -> argparse.ArgumentParser:
    """The arguments every bench script takes; use as ``argparse.ArgumentParser(parents=[parent_parser()])``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"directory for results (table JSON/CSV, plots, scratch files); default {DEFAULT_OUT}")
    p.add_argument("--quick", action="store_true",
                   help="smoke run on a small tree (the numbers are not the benchmark)")
    return p


# ---------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """One timed run: wall seconds, and for child processes their CPU time and peak RSS."""

    wall: float
    user: float = 0.0  # CPU seconds of the child (and its waited-for descendants)
    sys: float = 0.0
    maxrss_kb: int = 0  # peak resident set size of the child, KiB (0 when not a child process)
    returncode: int = 0
    stdout: str = ""
    stderr: str = ""

    @property
    def cpu(self) -> float:
        return self.user + self.sys


class timer:
    """``with timer() as t: ...`` then ``t.wall``: perf_counter seconds of an in-process block."""

    def __enter__(self) -> "timer":
        self._t = time.perf_counter()
        self.wall = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t


def run_timed(argv: Sequence[str], *, cwd: str | os.PathLike | None = None, env: dict | None = None,
              check: bool = True, quiet: bool = False) -> Timing:
    """Run ``argv``, timing its wall clock and reading its own rusage (CPU, peak RSS) with wait4(2).

    stdout/stderr are captured (into temporary files, so a chatty child cannot block on a pipe).  With ``check`` a
    non-zero exit raises RuntimeError carrying the tail of stderr.
    """
    import tempfile

    if not quiet:
        log("$ " + " ".join(shlex.quote(str(a)) for a in argv))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen([str(a) for a in argv], cwd=cwd, env=env, stdout=out, stderr=err,
                             stdin=subprocess.DEVNULL)
        _pid, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
        out.seek(0)
        err.seek(0)
        t = Timing(wall=wall, user=ru.ru_utime, sys=ru.ru_stime, maxrss_kb=ru.ru_maxrss, returncode=p.returncode,
                   stdout=out.read().decode(errors="replace"), stderr=err.read().decode(errors="replace"))
    if check and t.returncode != 0:
        tail = "\n".join(t.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{argv[0]} exited with {t.returncode}:\n{tail}")
    return t


def children_maxrss_kb() -> int:
    """Peak RSS (KiB) of the largest child waited for so far: compare before/after to see if a run raised it."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


# ---------------------------------------------------------------------------- caches
def drop_caches() -> bool:
    """sync, then drop the page cache, dentries and inodes (needs root).  False (and a log line) if not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        log(f"WARNING: cannot drop caches ({e.strerror}); the 'cold' numbers are warm")
        return False
    return True


def warm_tree(root: str | os.PathLike) -> tuple[int, int]:
    """Read every regular file under ``root`` once (and lstat everything) so it sits in the page cache.

    Returns (entries, regular-file bytes).
    """
    entries = 0
    nbytes = 0
    buf = bytearray(1 << 20)
    for dirpath, dirs, files in os.walk(root):
        entries += 1
        for name in dirs:
            if os.path.islink(os.path.join(dirpath, name)):
                entries += 1  # os.walk lists symlinks to directories as dirs but does not descend
        for name in files:
            entries += 1
            p = os.path.join(dirpath, name)
            try:
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue  # symlinks, sockets, devices we may not open
            try:
                if os.fstat(fd).st_mode & 0o170000 == 0o100000:
                    with open(fd, "rb", closefd=False) as f:
                        while n := f.readinto(buf):
                            nbytes += n
            finally:
                os.close(fd)
    return entries, nbytes


# ---------------------------------------------------------------------------- sizes
def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def du_bytes(path: str | os.PathLike) -> int:
    """Apparent size of a file, or the sum of regular-file sizes under a directory."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            if st.st_mode & 0o170000 == 0o100000:
                total += st.st_size
    return total


# ---------------------------------------------------------------------------- table
@dataclass
class Table:
    """Rows of dicts printed as an aligned text table and saved as JSON / CSV.

    ``columns`` is a list of (key, header, format) where format is a str.format spec like ``"{:.2f}"`` (or None
    for str()).  Rows may hold extra keys: they go to JSON/CSV but not to the printed table.
    """

    title: str
    columns: list[tuple[str, str, str | None]]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, **row: Any) -> dict[str, Any]:
        self.rows.append(row)
        return row

    def _cell(self, row: dict[str, Any], key: str, fmt: str | None) -> str:
        v = row.get(key)
        if v is None or v == "":
            return "-"
        if fmt is None:
            return str(v)
        try:
            return fmt.format(v)
        except (ValueError, TypeError):
            return str(v)

    def render(self) -> str:
        headers = [h for _k, h, _f in self.columns]
        cells = [[self._cell(r, k, f) for k, _h, f in self.columns] for r in self.rows]
        widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

        def line(vals: list[str]) -> str:
            # first column left-aligned (a label), the others right-aligned (numbers)
            return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths)))

        out = [self.title, line(headers), "  ".join("-" * w for w in widths)]
        out += [line(c) for c in cells]
        out += self.notes
        return "\n".join(out)

    def print(self) -> None:
        print(self.render(), flush=True)

    def save_json(self, path: str | os.PathLike, **meta: Any) -> None:
        with open(path, "w") as f:
            json.dump({"title": self.title, "notes": self.notes, "meta": meta, "rows": self.rows}, f, indent=2,
                      default=str)
            f.write("\n")

    def save_csv(self, path: str | os.PathLike) -> None:
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)


# ---------------------------------------------------------------------------- plot
def save_plot(path: str | os.PathLike, labels: Sequence[str], values: Sequence[float], *, title: str,
              xlabel: str, colors: Sequence[str] | None = None, annotate: Sequence[str] | None = None) -> bool:
    """A horizontal bar chart (one bar per label) saved as PNG; skipped with a log line without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib is not installed (pip install matplotlib): skipping plot {path}")
        return False
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.4))
    ys = list(range(len(labels)))[::-1]
    bars = ax.barh(ys, values, color=list(colors) if colors else None)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    for bar, text in zip(bars, annotate or [f"{v:.1f}" for v in values]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + text, va="center", fontsize=8)
    ax.set_xlim(0, max(values or [1]) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"plot saved to {path}")
    return True


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (goes into the JSON)."""
    info: dict[str, Any] = {"python": sys.version.split()[0], "kernel": os.uname().release, "cpus": os.cpu_count()}
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_kb"] = int(f.readline().split()[1])
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    info["cpu"] = ln.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["git"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True, check=False).stdout.strip()
    except OSError:
        pass
    return info


# ---------------------------------------------------------------------------- a daemon serving one mount
def is_mounted(path: str | os.PathLike) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def _tree_cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` and its live descendants (the fanotify daemon forks its filler)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total


class MountDaemon:
    """``python3 -m rafsfs.cli mount ... --foreground`` as a child process, up when its mount is in mountinfo and
    its processes have gone idle (start-up work such as table parsing or the filler's start would otherwise be
    charged to the first workload; the container-start bench measures start-up on its own)."""

    def __init__(self, mount_args: Sequence[str], mnt: str | os.PathLike, *, label: str = "rafsfs",
                 python: Sequence[str] = (sys.executable,), timeout: float = 120.0):
        self.mnt, self.label = Path(mnt), label
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.log_path = Path(str(mnt) + ".log")  # a file, not a pipe: a chatty daemon never blocks on its log
        with open(self.log_path, "w") as logf:
            self.proc: subprocess.Popen | None = subprocess.Popen(
                [*python, "-m", "rafsfs.cli", "--log-level", "warning", "mount", *mount_args, str(mnt),
                 "--foreground"], env=dict(os.environ, PYTHONPATH=str(REPO)), stdin=subprocess.DEVNULL, stderr=logf)
        deadline = time.monotonic() + timeout
        while not is_mounted(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()  # SIGTERM: a daemon that mounted meanwhile unmounts before it exits
                raise RuntimeError(f"{label} mount did not come up: {self.log_tail()}")
            time.sleep(0.02)
        self.settle(deadline)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def settle(self, deadline: float, quiet: float = 0.3) -> None:
        """Wait until the daemon's process tree has used no CPU for ``quiet`` seconds (or the deadline)."""
        assert self.proc is not None
        last, since = _tree_cpu_ticks(self.proc.pid), time.monotonic()
        while time.monotonic() - since < quiet and time.monotonic() < deadline:
            time.sleep(0.05)
            now = _tree_cpu_ticks(self.proc.pid)
            if now != last:
                last, since = now, time.monotonic()

    def rss_kb(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))

    def cpu_s(self) -> float:
        assert self.proc is not None
        return _tree_cpu_ticks(self.proc.pid) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.returncode != 0:
            log(f"WARNING: {self.label} daemon exited {self.proc.returncode}: {self.log_tail(1000)}")
        self.proc = None
