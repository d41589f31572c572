"""fscache mode under a kernel that has it: run INSIDE the test VM by tests/test_fscache.py (not collected on the host:
the file name does not start with test_).  The host builds the images, snapshots the source trees and starts the
registry; ``FSCACHE_TEST_PARAMS`` names the JSON file describing them.

Everything goes through the real pieces: ``rafsfs mount --mode fscache|auto`` (daemonized), the kernel's EROFS over
on-demand cachefiles on the guest's ext4 /tmp, ``rafsfs umount``; the daemon's counters come from its control socket.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, rafsfs_cmd
from fault_proxy import FaultProxy
from fault_readers import peak_rss, read_range, reset_peak_rss, sixteen_readers
from treeutil import diff_snapshots, format_diffs, snapshot_tree

from fscache_backend import control
from fscache_backend.objects import FAILURE_MEMORY
from rafsfs import sysmount
from fscache_backend.settings import Settings

PARAMS = json.loads(Path(os.environ.get("FSCACHE_TEST_PARAMS", "/nonexistent")).read_text()) \
    if os.environ.get("FSCACHE_TEST_PARAMS") else None
pytestmark = pytest.mark.skipif(PARAMS is None or not os.environ.get("IN_EROFS_VM"),
                                reason="runs inside the fscache test VM (tests/test_fscache.py starts it)")
MNT_ROOT = Path("/tmp/fscache-mnt")


def _expected(name: str):
    with open(PARAMS["snapshots"][name], "rb") as f:
        return pickle.load(f)


def _assert_tree(name: str, mnt: Path) -> None:
    diffs = diff_snapshots(_expected(name), snapshot_tree(mnt), check_symlink_mtime=True)
    assert not diffs, format_diffs(diffs, f"fscache mount {mnt} differs from source tree {name}")


class Session:
    """One daemon lifetime: its own cache dir, run dir and mounts; everything unmounted and the daemon gone at the
    end (also on failure)."""

    def __init__(self, name: str, **extra_env: str):
        self.name = name
        self.settings = Settings(cache_dir=f"/tmp/fscache-cache-{name}", run_dir=f"/run/rafsfs/fscache-{name}",
                                 domain_id="rafsfs")
        self.env = dict(os.environ, PYTHONPATH=str(REPO), RAFSFS_FSCACHE_DIR=self.settings.cache_dir,
                        RAFSFS_FSCACHE_RUN=self.settings.run_dir, **extra_env)
        self.mounts: list[Path] = []
        self.log = Path(f"/tmp/fscache-{name}.log")
        self.supervisor_pid: int | None = None

    def rafsfs(self, *args, check: int | None = 0, timeout: float = 120) -> subprocess.CompletedProcess:
        p = subprocess.run(rafsfs_cmd(*args), capture_output=True, text=True, env=self.env, cwd=REPO, timeout=timeout)
        if check is not None and p.returncode != check:
            raise AssertionError(f"rafsfs {' '.join(map(str, args))} exited {p.returncode}:\n{p.stderr[-3000:]}\n"
                                 f"--- daemon log ---\n{self.log_tail()}")
        return p

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])
        except OSError:
            return "(no log)"

    def mount(self, boot: str, tag: str, *args: str, mode: str | None = "fscache") -> Path:
        """``rafsfs mount`` (daemonized) with ``mode``; mode None: hand the mount to the running daemon over its
        control socket from here, as the CLI does, without paying a Python start-up under emulation."""
        mnt = MNT_ROOT / f"{self.name}-{tag}"
        mnt.mkdir(parents=True, exist_ok=True)
        if mode is None:
            from fscache_backend import service

            opts = dict(zip(args[::2], args[1::2]))
            req = service.mount_request(boot, str(mnt), opts.get("--blob-dir"), [], opts.get("--config"))
            assert service.delegate(req, self.settings) is not None, "no daemon is running"
            self.mounts.append(mnt)
            return mnt
        pid_file = Path(f"/tmp/fscache-{self.name}-{tag}.pid")
        p = self.rafsfs("mount", boot, mnt, "--mode", mode, "--log-file", self.log, "--pid-file", pid_file, *args)
        assert "fscache" in p.stdout, p.stdout + p.stderr
        self.mounts.append(mnt)
        self.supervisor_pid = int(pid_file.read_text())
        return mnt

    def request(self, op: str) -> dict:
        return control.request(self.settings.control_path, {"op": op}, timeout=30)

    def stats(self) -> dict:
        return self.request("stats")["stats"]

    def umount(self, mnt: Path, cli: bool = False) -> None:
        """``rafsfs umount`` with ``cli``, else umount(2) from here (saves a Python start-up under emulation)."""
        if cli:
            self.rafsfs("umount", mnt)
        else:
            sysmount.umount(str(mnt))
        self.mounts.remove(mnt)

    def wait_daemon_gone(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.supervisor_pid is not None and time.monotonic() < deadline:
            try:
                os.kill(self.supervisor_pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        raise AssertionError(f"the fscache daemon (pid {self.supervisor_pid}) did not exit:\n{self.log_tail()}")

    def close(self) -> None:
        for mnt in list(self.mounts):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        self.mounts.clear()
        if self.supervisor_pid is not None:
            try:
                self.wait_daemon_gone(30)
            except AssertionError:
                os.kill(self.supervisor_pid, signal.SIGKILL)


@contextlib.contextmanager
def session(name: str, **env: str):
    s = Session(name, **env)
    try:
        yield s
    finally:
        s.close()


def _read_all_files(root: Path) -> int:
    n = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as fh:
                    while data := fh.read(1 << 20):
                        n += len(data)
    return n


# ------------------------------------------------------------------------------------------------ local blobs
@pytest.fixture(scope="module")
def local():
    """One daemon serving six mounts: the tricky tree from local blobs and a small tree from the registry, each as
    zstd, lz4 and uncompressed images."""
    with session("local") as s:
        mnts = {}
        # the first mount starts the daemon; the second goes through auto mode, which must pick fscache here and
        # hand the mount to the running daemon; the others are handed over directly (the CLI's path, minus a start-up)
        modes = {"zstd": "fscache", "lz4": "auto", "none": None}
        for comp in ("zstd", "lz4", "none"):
            mnts[comp] = s.mount(PARAMS["images"][comp], comp, "--blob-dir", PARAMS["blob_dir"], mode=modes[comp])
        for comp, boot in PARAMS["registry_images"].items():
            mnts["reg-" + comp] = s.mount(boot, f"reg-{comp}", "--config", PARAMS["registry_config"],
                                          mode="fscache" if comp == "zstd" else None)
        yield s, mnts


@pytest.mark.parametrize("comp", ["zstd", "lz4", "none"])
def test_local_tree_equals_source(local, comp):
    s, mnts = local
    _assert_tree("tricky", mnts[comp])
    st = s.stats()
    assert st["read_failures"] == 0, st


@pytest.mark.parametrize("comp", ["zstd", "lz4", "none"])
def test_registry_tree_equals_source(local, comp):
    """Blobs read with HTTP Range requests from a docker-registry on the host's loopback (forwarded into the VM)."""
    s, mnts = local
    _assert_tree("small", mnts["reg-" + comp])
    st = s.stats()
    assert st["read_failures"] == 0, st


def test_one_daemon_serves_all_mounts(local):
    s, mnts = local
    status = s.request("status")
    assert status["supervisor"] == s.supervisor_pid
    assert sorted(m["mountpoint"] for m in status["mounts"]) == sorted(str(m) for m in mnts.values())
    st = s.stats()
    assert all(n == 1 for n in st["blob_opens"].values()) and len(st["blob_opens"]) == 6, st


def test_second_read_after_drop_caches_makes_no_requests(local):
    s, mnts = local
    _read_all_files(mnts["zstd"])  # everything is in the cache files now
    before = s.stats()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    _assert_tree("tricky", mnts["zstd"])  # a full read (and walk) again, from the kernel's cache files
    after = s.stats()
    assert after["reads"] == before["reads"], (before, after)
    assert after["chunks_fetched"] == before["chunks_fetched"]


def test_stats_of_an_fscache_mount(local):
    """`rafsfs stats MNT` on an fscache mount: the daemon's counters (READs are misses; hits stay in the kernel)."""
    s, mnts = local
    _read_all_files(mnts["lz4"])
    p = s.rafsfs("stats", mnts["lz4"], "--json")
    st = json.loads(p.stdout)
    assert st["hits"] is None and st["misses"] > 0 and st["backend_requests"] > 0 and st["bytes_fetched"] > 0, st
    text = s.rafsfs("stats", mnts["lz4"]).stdout
    assert "kernel serves them" in text and "backend requests" in text, text


def test_umount_stops_the_daemon(local):
    s, mnts = local
    for name, mnt in mnts.items():
        s.umount(mnt, cli=name in ("zstd", "reg-zstd"))
        assert not os.path.ismount(mnt)
    s.wait_daemon_gone()
    assert not os.path.exists(s.settings.control_path)


# ------------------------------------------------------------------------------------------------ shared blob
def test_shared_blob_is_fetched_once():
    a, b = PARAMS["shared"]["a"], PARAMS["shared"]["b"]
    with session("shared") as s:
        ma = s.mount(a, "a", "--blob-dir", PARAMS["blob_dir"])
        mb = s.mount(b, "b", "--blob-dir", PARAMS["blob_dir"], mode=None)
        _assert_tree("shared_a", ma)
        _assert_tree("shared_b", mb)
        st = s.stats()
        blob = PARAMS["shared"]["blob_id"]
        assert st["blob_opens"] == {blob: 1}, st  # one cache object for both images
        assert st["blob_chunks_fetched"][blob] == PARAMS["shared"]["chunks"], st  # each chunk once
        s.umount(ma)
        _assert_tree("shared_b", mb)  # the blob stays served for the other image
        s.umount(mb)
        s.wait_daemon_gone()
    # the cache files are linked into the cache directory once the daemon is gone: ONE file for the shared blob
    files = sorted(p.name for p in Path(s.settings.cache_dir, "cache").rglob("*") if p.is_file())
    assert len(files) == 3, files  # two bootstraps and one blob, all in the domain's volume


def test_unmounted_images_are_closed_and_concurrent_mounts_of_one_image_get_their_own_fsid():
    """Mount churn: image A mounted and unmounted again and again while image B (same blob) stays mounted.  The
    daemon keeps an unmounted image open only while a cache object may still read through it, so nothing piles
    up; B keeps reading right.  Then two mounts of one bootstrap requested at the same moment: two fsids, two
    working mounts."""
    from fscache_backend import service

    a, b = PARAMS["shared"]["a"], PARAMS["shared"]["b"]
    with session("churn") as s:
        mb = s.mount(b, "b", "--blob-dir", PARAMS["blob_dir"])
        for i in range(3):
            ma = s.mount(a, f"a{i}", "--blob-dir", PARAMS["blob_dir"], mode=None)
            _assert_tree("shared_a", ma)
            s.umount(ma)
        deadline = time.monotonic() + 30
        while True:
            mounts = [m["mountpoint"] for m in s.request("status")["mounts"]]
            retired = s.stats().get("retired_mounts")
            if mounts == [str(mb)] and retired == 0:
                break
            assert time.monotonic() < deadline, (mounts, retired, s.log_tail())
            time.sleep(0.5)
        _assert_tree("shared_b", mb)

        targets = [MNT_ROOT / f"churn-c{i}" for i in range(2)]
        errors: list = []

        def mount(t: Path) -> None:
            t.mkdir(parents=True, exist_ok=True)
            try:
                req = service.mount_request(a, str(t), PARAMS["blob_dir"], [], None)
                assert service.delegate(req, s.settings) is not None
                s.mounts.append(t)
            except Exception as e:  # noqa: BLE001 - asserted below
                errors.append(e)

        threads = [threading.Thread(target=mount, args=(t,)) for t in targets]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, (errors, s.log_tail())
        fsids = {m["mountpoint"]: m["fsid"] for m in s.request("status")["mounts"]}
        assert len({fsids[str(t)] for t in targets}) == 2, fsids
        for t in targets:
            _assert_tree("shared_a", t)


# ------------------------------------------------------------------------------------------------ crash + restore
def test_kill9_during_reads_then_restore_then_sigterm():
    big = PARAMS["big"]
    throttle = Path(big["throttle"])
    throttle.write_text(str(2 << 20))  # the registry relay at 2 MiB/s: the reader is mid-file at the kill
    with session("crash") as s:
        mnt = s.mount(big["image"], "big", "--config", big["config"])
        result: dict = {}

        def reader() -> None:
            h = hashlib.sha256()
            try:
                with open(mnt / big["path"], "rb") as f:
                    while data := f.read(1 << 17):
                        h.update(data)
                result["sha256"] = h.hexdigest()
            except OSError as e:
                result["error"] = e

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        deadline = time.monotonic() + 60
        while s.stats()["reads_blob"] < 1:
            assert time.monotonic() < deadline, "no blob READs arrive"
            time.sleep(0.1)
        old = s.request("status")["pid"]
        os.kill(old, signal.SIGKILL)
        assert t.is_alive(), "the reader finished before the kill: the test proves nothing"
        deadline = time.monotonic() + 60
        while True:  # the supervisor starts a new daemon, which restores the kernel's pending requests
            try:
                status = s.request("status")
                if status["pid"] != old:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no new daemon:\n{s.log_tail()}"
            time.sleep(0.2)
        assert status["restored"] and status["supervisor"] == s.supervisor_pid
        throttle.write_text("")  # full speed again: the rest of the file need not crawl
        t.join(120)
        assert not t.is_alive(), f"the reader hangs after the restore:\n{s.log_tail()}"
        assert "error" not in result, f"{result.get('error')}\n{s.log_tail()}"
        assert result["sha256"] == big["sha256"]
        st = s.stats()
        assert st["restored"] and st["reads_blob"] > 0 and st["read_failures"] == 0, st
        log = s.log.read_text()
        assert "restarting it" in log and "sent 'restore'" in log, log[-2000:]
        os.kill(s.supervisor_pid, signal.SIGTERM)  # graceful shutdown: unmount everything, then exit
        s.wait_daemon_gone()
        assert not os.path.ismount(mnt)
        s.mounts.remove(mnt)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_image_and_missing_blobs_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.boot"
    bad.write_bytes(os.urandom(8192))
    with session("errors") as s:
        (MNT_ROOT / "errors").mkdir(parents=True, exist_ok=True)
        for args, words in (((bad, MNT_ROOT / "errors", "--blob-dir", PARAMS["blob_dir"]), "bad magic"),
                            ((PARAMS["images"]["zstd"], MNT_ROOT / "errors"), "blob")):
            p = s.rafsfs("mount", *args, "--mode", "fscache", "--foreground", check=None)
            lines = [ln for ln in p.stderr.splitlines() if ln.startswith("rafsfs: error")]
            assert p.returncode == 1 and len(lines) == 1 and words in lines[0], p.stderr
            assert "Traceback" not in p.stderr
            assert not os.path.ismount(MNT_ROOT / "errors")
        assert not os.path.exists(s.settings.control_path)  # no daemon left behind


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))



# ------------------------------------------------------------------------------------------------ a dead registry
def _pread_thread(path: Path, offset: int, out: list) -> threading.Thread:
    def run() -> None:
        t0 = time.monotonic()
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.pread(fd, 4096, offset)
            finally:
                os.close(fd)
            out.append(("ok", time.monotonic() - t0))
        except OSError as e:
            out.append((e.errno, time.monotonic() - t0))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_stalled_registry_never_holds_up_metadata():
    """Ten reads of a blob whose registry answers nothing hold more READs than there are fetch threads; mounting
    another image and walking its tree (bootstrap READs, local file copies) still takes moments, not the registry's
    deadline: bootstrap copies have their own workers."""
    big = PARAMS["big"]
    throttle = Path(big["throttle"])
    with session("stall") as s:
        s.mount(PARAMS["images"]["zstd"], "first", "--blob-dir", PARAMS["blob_dir"])  # starts the daemon
        mb = s.mount(big["image"], "big", "--config", big["config"], mode=None)
        throttle.write_text("0")
        results: list = []
        threads = []
        try:
            threads = [_pread_thread(mb / big["path"], i << 20, results) for i in range(10)]
            deadline = time.monotonic() + 60
            while (st := s.stats()).get("reads_started", 0) - st["reads"] < 8:
                assert time.monotonic() < deadline, f"the READs do not arrive: {s.stats()}"
                time.sleep(0.1)
            t0 = time.monotonic()
            other = s.mount(PARAMS["images"]["lz4"], "other", "--blob-dir", PARAMS["blob_dir"], mode=None)
            n = sum(len(files) + len(dirs) for _, dirs, files in os.walk(other))
            elapsed = time.monotonic() - t0
            assert n > 10 and elapsed < 20, (n, elapsed)
            assert not results, results  # the stalled reads are still waiting: the point of the test
        finally:
            throttle.write_text("")
            for t in threads:
                t.join(120)
        assert len(results) == 10, results


def test_read_timeout_really_ends_a_read():
    """A READ the backend never serves is answered (EIO) after the daemon's READ timeout, although its fetch thread
    is still waiting for the registry (it finishes in the background)."""
    big = PARAMS["big"]
    throttle = Path(big["throttle"])
    with session("timeout", RAFSFS_FSCACHE_READ_TIMEOUT="3") as s:
        mnt = s.mount(big["image"], "big", "--config", big["config"])
        throttle.write_text("0")
        results: list = []
        try:
            _pread_thread(mnt / big["path"], 5 << 20, results).join(60)
        finally:
            throttle.write_text("")
        assert results and results[0][0] == errno.EIO and results[0][1] < 30, results
        assert "timed out after 3 s" in s.log.read_text()
        assert s.stats()["read_failures"] >= 1


# ------------------------------------------------------------------------------------------------ a hostile registry
def test_fault_matrix_sixteen_readers():
    """fscache mode under a misbehaving registry: a fault proxy (tests/fault_proxy.py) started here, in front of
    the host's registry, is the image's registry (timeout 3 s, deadline 6 s).  Per fault, 16 concurrent readers of
    four chunks nobody read before: each gets the source's bytes or EIO within two deadlines (+ slack for the
    emulation), the daemon serving them is the same process before and after (no crash, no restart by the
    supervisor), a registry ignoring Range does not grow its peak RSS by half the ~36 MiB blob, and once the fault
    is cleared every read that failed returns the right bytes."""
    f = PARAMS["faults"]
    source = Path(f["source"]).read_bytes()
    deadline = 6.0
    limit = 2 * deadline + 30  # emulation: a loaded TCG guest is 5-20x slower than the host
    phases = [  # (fault, params); the phases' chunks go down the file, 9 apart: the daemon's read-ahead (forward
        # from a READ) never fetches a later phase's chunks early
        ("truncate", {"after": 4096}),
        ("reset", {"after": 100_000}),
        ("wrong_range", {}),
        ("stall", {"seconds": 20}),
        ("ignore_range", {}),  # last, on the lowest chunks: the least to skip through the emulated network
    ]
    host, port = f["registry"]
    outcome: dict[str, str] = {}
    with FaultProxy(port, upstream_host=host) as px, session("faults") as s:
        cfg = Path("/tmp/fscache-faults.json")
        cfg.write_text(json.dumps({"device": {
            "backend": {"type": "registry", "config": {"host": px.host, "repo": f["repo"], "scheme": "http",
                                                        "timeout": 3, "connect_timeout": 2, "retry_limit": 1,
                                                        "deadline": deadline}},
            "cache": {"type": "none"}}}))
        mnt = s.mount(f["image"], "faults", "--config", cfg)
        path = mnt / f["path"]
        pid = s.request("status")["pid"]
        failed: set[int] = set()
        for i, (fault, params) in enumerate(phases):
            chunks = [0, 1, 2, 3] if fault == "ignore_range" else [8 - i + 9 * k for k in range(4)]
            if fault == "ignore_range":
                reset_peak_rss(pid)
                rss0 = peak_rss(pid)
            px.set(fault, **params)
            t0 = time.monotonic()
            results = sixteen_readers(path, chunks, limit)
            px.clear()
            for off, got, took in results:
                if isinstance(got, int):
                    assert got == errno.EIO, (fault, off, errno.errorcode.get(got), s.log_tail())
                    failed.add(off)
                else:
                    assert len(got) == 64 << 10 and got == source[off:off + len(got)], (fault, off)
                assert took < limit, (fault, off, took)
            assert any(r["fault"] == fault for r in px.blob_gets(f["blob_id"])), f"{fault} was never applied"
            n_eio = sum(isinstance(g, int) for _, g, _ in results)
            gets = [r for r in px.blob_gets(f["blob_id"]) if r["time"] >= t0]
            outcome[fault] = (f"{16 - n_eio} right, {n_eio} EIO, slowest {max(t for _, _, t in results):.1f} s, "
                              f"{len(gets)} GETs")
            if fault == "ignore_range":
                grew = peak_rss(pid) - rss0
                outcome[fault] += f", peak RSS +{grew / (1 << 20):.1f} MiB"
                assert grew < len(source) // 2, f"peak RSS grew {grew / (1 << 20):.0f} MiB under ignore_range"
            status = s.request("status")
            assert status["pid"] == pid, f"the daemon was replaced under {fault}:\n{s.log_tail()}"
            time.sleep(FAILURE_MEMORY + 0.5)  # the blob's failure is no longer answered from memory
        print("fault matrix:", outcome)  # shown in the VM's output (-rA) for the report
        assert failed, "no read failed: the faults were not in the readers' way"
        for off in sorted(failed):  # the registry is well again: every read that failed is served right
            got = read_range(path, off, 64 << 10)
            assert got == source[off:off + (64 << 10)], (off, got if isinstance(got, int) else len(got))
        assert s.request("status")["pid"] == pid


# ------------------------------------------------------------------------------------------------ --prefetch-files
def test_prefetch_files_are_fetched_before_any_read():
    """A mount request with prefetch files (what ``--prefetch-files`` gives): once the kernel opens the blob the
    daemon writes those files' chunks into the cache file in the background; reading them sends no blob READ."""
    from fscache_backend import service

    a = PARAMS["shared"]["a"]
    with session("prefetch") as s:
        s.mount(PARAMS["images"]["zstd"], "first", "--blob-dir", PARAMS["blob_dir"])  # starts the daemon
        mnt = MNT_ROOT / "prefetch-a"
        mnt.mkdir(parents=True, exist_ok=True)
        req = service.mount_request(a, str(mnt), PARAMS["blob_dir"], [], None, ["/"])
        assert service.delegate(req, s.settings) is not None
        s.mounts.append(mnt)
        deadline = time.monotonic() + 60
        while not s.stats().get("prefetches_done"):
            assert time.monotonic() < deadline, (s.stats(), s.log_tail())
            time.sleep(0.2)
        reads = s.stats()["reads_blob"]
        assert s.stats()["chunks_prefetched"] > 0
        _assert_tree("shared_a", mnt)
        st = s.stats()
        assert st["reads_blob"] == reads and st["read_failures"] == 0, st
