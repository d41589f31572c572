"""fanotify mode on the host kernel: real pre-content events, real file-backed EROFS, a real docker-registry.

* the probe: a cache directory on tmpfs is refused in one line; the ext4 one passes;
* the tricky tree mounted in fanotify mode equals the source (types, modes, owners, xattrs, bytes);
* a corrupt chunk is EIO for its file only (never zeros, also when asked again); a registry that dies mid-read
  gives EIO within the deadline and the mount works again once it is back;
* two images sharing a blob, mounted at once, fetch its bytes once;
* a daemon started again over a complete cache asks the registry nothing and places no marks;
* SIGTERM / umount leave no mount, group or process behind; a daemon killed as a whole leaves an orphaned mount
  that the check names in one line.

The mode needs root, Linux >= 6.14 and an ext4/xfs/btrfs cache directory; CI has all three, so there these tests
never skip (they fail with the probe's reason instead).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, is_mounted, run_rafsfs_proc
from registry_env import start_registry
from treeutil import assert_trees_equal

from fanotify_backend import records
from fanotify_backend.probe import unavailable_reason
from rafsfs.image import RafsImage
from rafsfs.storage.cache.chunk_cache import FAILURE_MEMORY
from rafsfs.storage.meta import MetaCache

MiB = 1 << 20
REPO_NAME = "test/fanotify"


def _availability() -> str | None:
    if os.geteuid() != 0:
        return "fanotify mode needs root"
    return unavailable_reason("/var/tmp/rafsfs-fanotify-probe")


_WHY = _availability()
if _WHY is not None and os.environ.get("CI"):  # CI runs as root on a 6.18 kernel: a refusal there is a failure
    pytest.fail(f"fanotify mode unavailable in CI: {_WHY}", pytrace=False)
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"fanotify mode unavailable: {_WHY}")


# ---------------------------------------------------------------------------------------------- the daemon
def fanotify_groups_marking(inode: int) -> list[str]:
    """``pid:fd`` of every fanotify group on the machine holding a mark on ``inode`` (from /proc/*/fdinfo)."""
    out = []
    pat = re.compile(rf"^fanotify ino:{inode:x} ", re.M)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[fanotify]":
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    if pat.search(f.read()):
                        out.append(f"{pid}:{fd}")
            except OSError:
                continue
    return out


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def fanotify_config(path: Path, work_dir: Path, *args) -> Path:
    """A nydusd config for ``--blob-dir DIR`` (local blobs) or ``--config FILE`` (as is), with its cache in
    ``work_dir``; ``--prefetch-all`` adds whole-blob prefetch."""
    args = [str(a) for a in args]
    if "--config" in args:
        cfg = json.loads(Path(args[args.index("--config") + 1]).read_text())
    else:
        cfg = {"device": {"backend": {"type": "localfs", "config": {"dir": args[args.index("--blob-dir") + 1]}}}}
    cfg["device"]["cache"] = {"type": "blobcache", "config": {"work_dir": str(work_dir)}}
    if "--prefetch-all" in args:
        cfg["fs_prefetch"] = {"enable": True, "prefetch_all": True}
    path.write_text(json.dumps(cfg))
    return path


class FanotifyMount:
    """``rafsfs mount --mode fanotify --foreground`` as a child process: the session's process is the supervisor;
    it forks the worker.  ``args``: ``--blob-dir DIR`` or ``--config FILE``, and ``--prefetch-all``."""

    live: set[int] = set()  # supervisors of mounts not stopped yet (their groups are expected)

    def __init__(self, boot: Path, mnt: Path, work_dir: Path, *args, timeout: float = 60):
        mnt.mkdir(parents=True, exist_ok=True)
        self.mnt = mnt
        self.work_dir = work_dir
        self.apisock = str(mnt) + ".sock"
        self.log = Path(str(mnt) + ".log")
        cfg = fanotify_config(Path(str(mnt) + ".json"), work_dir, *args)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rafsfs.cli", "-v", "mount", str(boot), str(mnt), "--foreground", "--mode",
             "fanotify", "--config", str(cfg), "--apisock", self.apisock],
            stdout=self._logf, stderr=self._logf, env=env, cwd=REPO, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not is_mounted(mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"mount did not come up:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        FanotifyMount.live.add(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def worker(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while True:
            kids = children(self.pid)
            if kids:
                return kids[0]
            assert time.monotonic() < deadline, "no worker"
            time.sleep(0.01)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> dict:
        from rafsfs.api.client import ApiClient

        return ApiClient(self.apisock).cache_metrics()

    def fanotify_stats(self, until=lambda st: True, timeout: float = 10) -> dict:
        """The worker's counters (published every 0.5 s: wait until ``until(stats)`` holds, or the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.metrics().get("fanotify") or {}
            if (st and until(st)) or time.monotonic() > deadline:
                return st
            time.sleep(0.1)

    def stop(self, how: str = "sigterm") -> None:
        """Stop it and check that nothing is left: no mount, no process, no group marking its data files."""
        worker = children(self.pid)
        if how == "sigterm":
            self.proc.send_signal(signal.SIGTERM)
        else:
            subprocess.run(["umount", str(self.mnt)], check=True)
        self.proc.wait(timeout=30)
        FanotifyMount.live.discard(self.proc.pid)
        self._logf.close()
        assert self.proc.returncode == 0, self.log_text()[-3000:]
        assert not is_mounted(self.mnt)
        for pid in worker:
            assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} left behind"
        others = {p for sup in FanotifyMount.live for p in (sup, *children(sup))}
        for f in self.work_dir.glob("*.blob.data"):
            left = [g for g in fanotify_groups_marking(os.stat(f).st_ino) if int(g.split(":")[0]) not in others]
            assert left == [], f"a group still marks {f}: {left}"
        assert records.read_record(str(self.mnt.resolve())) is None
        bad = [ln for ln in self.log_text().splitlines() if "Traceback" in ln or "rafsfs: error:" in ln]
        assert not bad, self.log_text()[-3000:]

    def kill(self) -> None:
        """After a failure: take everything down, unmounting first (the mount fails open once the group is gone)."""
        subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        FanotifyMount.live.discard(self.proc.pid)
        self._logf.close()


def drop_caches() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def read_errno(path: Path, offset: int = 0, size: int = -1) -> bytes | int:
    try:
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            return f.read(size if size >= 0 else os.fstat(f.fileno()).st_size)
    except OSError as e:
        return e.errno


# ---------------------------------------------------------------------------------------------- images
@pytest.fixture(scope="module")
def data_image(tmp_path_factory):
    """A 24 MiB file (24 chunks) and eight small one-chunk files, zstd: (dir, bootstrap, blob file, {path: bytes})."""
    d = tmp_path_factory.mktemp("fan-data")
    src = d / "src"
    (src / "small").mkdir(parents=True)
    rnd = random.Random(7)
    files = {"/big": rnd.randbytes(24 * MiB)}
    for i in range(8):
        files[f"/small/f{i}"] = rnd.randbytes(100_000 + i)
    for p, data in files.items():
        (src / p.lstrip("/")).write_bytes(data)
    run_rafsfs_proc("build", src, "--bootstrap", d / "boot", "--blob-dir", d / "blobs", "--compressor", "zstd",
                    check=0)
    blob = d / "blobs" / RafsImage.open(str(d / "boot")).blobs[0].blob_id
    return d, d / "boot", blob, files


def _config(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(autouse=True)
def _no_docker_credentials(tmp_path, monkeypatch):
    (tmp_path / "docker-config").mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    monkeypatch.setenv("RAFSFS_FANOTIFY_RUN", str(tmp_path / "run"))


# ---------------------------------------------------------------------------------------------- tests
def test_probe_refuses_tmpfs_in_one_line_and_auto_falls_back_to_fuse(data_image, tmp_path, caplog):
    from rafsfs.commands.mount import MountRequest, select_mode

    _, boot, _, _ = data_image
    assert unavailable_reason(str(tmp_path / "cache")) is None
    assert select_mode("auto", MountRequest(str(tmp_path / "cache"), ())) == "fanotify"
    tmpfs = tmp_path / "tmpfs"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(tmpfs)], check=True)
    try:
        why = unavailable_reason(str(tmpfs / "cache"))
        assert why is not None and "tmpfs" in why and "\n" not in why
        caplog.set_level(logging.INFO, logger="rafsfs")
        assert select_mode("auto", MountRequest(str(tmpfs / "cache"), ())) == "fuse"
        assert any("using fuse" in r.getMessage() and "tmpfs" in r.getMessage() for r in caplog.records)
        cfg = fanotify_config(tmp_path / "cfg.json", tmpfs / "cache", "--blob-dir", boot.parent / "blobs")
        p = run_rafsfs_proc("mount", boot, tmp_path, "--mode", "fanotify", "--config", cfg)
        assert p.returncode == 1
        assert p.stderr.count("\n") == 1 and "tmpfs" in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert not is_mounted(tmp_path)
    finally:
        subprocess.run(["umount", str(tmpfs)], check=True)


@pytest.mark.parametrize("compressor", ["zstd", "none"])
def test_tricky_tree_equals_source(tricky_src, tmp_path, compressor):
    d = tmp_path / "img"
    run_rafsfs_proc("build", tricky_src, "--bootstrap", d / "boot", "--blob-dir", d / "blobs", "--compressor",
                    compressor, check=0)
    m = FanotifyMount(d / "boot", tmp_path / "mnt", tmp_path / "cache", "--blob-dir", d / "blobs")
    try:
        assert "1 of 1 blob(s) marked" in m.log_text()
        assert_trees_equal(tricky_src, m.mnt, check_symlink_mtime=True)
        assert m.fanotify_stats(lambda st: st["events"] > 0)["events"] > 0  # the kernel asked, the daemon filled
    except BaseException:
        m.kill()
        raise
    m.stop(how="umount")


def test_corrupt_chunk_is_eio_for_its_file_only(data_image, tmp_path):
    d, boot, blob, files = data_image
    img = RafsImage.open(str(boot))
    (chunk,) = img.chunks(img.resolve("/small/f3"))
    bad_dir = tmp_path / "blobs"
    bad_dir.mkdir()
    raw = bytearray(blob.read_bytes())
    raw[chunk.info.compressed_offset + chunk.info.compressed_size // 2] ^= 0x01
    (bad_dir / blob.name).write_bytes(raw)
    m = FanotifyMount(boot, tmp_path / "mnt", tmp_path / "cache", "--blob-dir", bad_dir)
    try:
        for _ in range(2):  # and again: nothing (no zeros) was cached by the first attempt
            assert read_errno(m.mnt / "small/f3") == errno.EIO
            time.sleep(FAILURE_MEMORY)
        for p, data in files.items():
            if p != "/small/f3":
                assert read_errno(m.mnt / p.lstrip("/")) == data, p
        assert m.fanotify_stats(lambda st: st["denied"] >= 1)["denied"] >= 1
    except BaseException:
        m.kill()
        raise
    m.stop()


@pytest.mark.allow_log()
def test_counters_are_current_right_after_the_reads(data_image, tmp_path):
    """A client that reads the API right after its reads sees them counted (the e2e snapshotter test compares the
    counters across two containers): the last answers of a burst are published too, not only on the next 0.5 s
    turn of the worker's loop."""
    d, boot, blob, files = data_image
    m = FanotifyMount(boot, tmp_path / "mnt", tmp_path / "cache", "--blob-dir", d / "blobs")
    try:
        m.fanotify_stats(lambda st: "events" in st)
        time.sleep(0.6)  # the start's own publishing is over
        for p, data in files.items():  # a burst of cold reads, each raising events answered a few ms apart
            if p.startswith("/small/"):
                assert read_errno(m.mnt / p.lstrip("/")) == data, p
        time.sleep(0.1)  # the answers' publisher runs every 20 ms
        now = m.metrics()
        time.sleep(0.7)  # past the loop's 0.5 s turn
        later = m.metrics()
        assert now["fanotify"]["events"] >= 8
        assert (now["fanotify"]["events"], now["backend_requests"], now["bytes_fetched"]) == \
            (later["fanotify"]["events"], later["backend_requests"], later["bytes_fetched"])
    except BaseException:
        m.kill()
        raise
    m.stop()


def test_registry_dying_mid_read_is_eio_within_the_deadline(data_image, tmp_path):
    """timeout 1.5 s, connect 1 s, 1 retry: a 5 s deadline per backend read (doubled: the kernel asks for the
    readahead, then the page), plus slack for a loaded machine.  A fail-open would return zeros instead."""
    d, boot, blob, files = data_image
    big = files["/big"]
    limit = 2 * (1.0 + 1.5) * 2 + 5
    with start_registry(tmp_path / "reg") as reg:
        reg.push_blob(REPO_NAME, blob)
        cfg = _config(tmp_path / "nydusd.json", reg.nydusd_config(
            REPO_NAME, tmp_path / "cache", timeout=1.5, connect_timeout=1.0, retry_limit=1))
        m = FanotifyMount(boot, tmp_path / "mnt", tmp_path / "cache", "--config", cfg)
        try:
            assert read_errno(m.mnt / "big", 0, MiB) == big[:MiB]
            reg.kill()
            t0 = time.monotonic()
            got = read_errno(m.mnt / "big", 16 * MiB, MiB)
            took = time.monotonic() - t0
            assert got == errno.EIO and took < limit, (got if isinstance(got, int) else "data", took)
            reg.start()
            time.sleep(FAILURE_MEMORY)
            assert read_errno(m.mnt / "big", 16 * MiB, MiB) == big[16 * MiB:17 * MiB]
            assert read_errno(m.mnt / "big") == big
        except BaseException:
            m.kill()
            raise
        m.stop()


def test_restart_over_a_complete_cache_asks_nothing_and_marks_nothing(data_image, tmp_path):
    d, boot, blob, files = data_image
    with start_registry(tmp_path / "reg") as reg:
        reg.push_blob(REPO_NAME, blob)
        cfg = _config(tmp_path / "nydusd.json", reg.nydusd_config(REPO_NAME, tmp_path / "cache"))
        m = FanotifyMount(boot, tmp_path / "mnt", tmp_path / "cache", "--config", cfg, "--prefetch-all")
        try:
            deadline = time.monotonic() + 60
            while "is complete: mark removed" not in m.log_text():
                assert time.monotonic() < deadline, m.log_text()[-2000:]
                time.sleep(0.1)
            data_file = next((tmp_path / "cache").glob("*.blob.data"))
            assert fanotify_groups_marking(os.stat(data_file).st_ino) == []
        except BaseException:
            m.kill()
            raise
        m.stop()
        before = len(reg.requests())
        m = FanotifyMount(boot, tmp_path / "mnt", tmp_path / "cache", "--config", cfg)
        try:
            assert "0 of 1 blob(s) marked" in m.log_text()
            assert fanotify_groups_marking(os.stat(data_file).st_ino) == []
            drop_caches()
            for p, data in files.items():
                assert read_errno(m.mnt / p.lstrip("/")) == data, p
            time.sleep(1.0)  # two publications of the worker's counters
            assert m.fanotify_stats()["events"] == 0
        except BaseException:
            m.kill()
            raise
        m.stop(how="umount")
        assert len(reg.requests()) == before


def test_two_images_sharing_a_blob_fetch_it_once(tmp_path):
    """Two multi-layer images with the same bottom layer, mounted at the same time, every file of both read: the
    shared blob's bytes come from the registry once (both daemons' groups see each read; the second finds the
    chunks the first stored in the shared ready map)."""
    from oci_layers import write_layers

    layers = write_layers(tmp_path / "layers")
    assert len(layers) >= 2
    for name, ls in (("a", layers), ("b", layers[:1])):
        run_rafsfs_proc("build", *ls, "--bootstrap", tmp_path / f"{name}.boot", "--blob-dir", tmp_path / "blobs",
                        "--compressor", "zstd", check=0)
    a, b = RafsImage.open(str(tmp_path / "a.boot")), RafsImage.open(str(tmp_path / "b.boot"))
    shared = a.blobs[0]
    assert b.blobs[0].blob_id == shared.blob_id
    with start_registry(tmp_path / "reg") as reg, reg.counting_proxy() as px:
        for blob in {x.blob_id for x in (*a.blobs, *b.blobs)}:
            reg.push_blob(REPO_NAME, tmp_path / "blobs" / blob)
        cfg = _config(tmp_path / "nydusd.json", reg.nydusd_config(REPO_NAME, tmp_path / "cache", host=px.host))
        ma = FanotifyMount(tmp_path / "a.boot", tmp_path / "ma", tmp_path / "cache", "--config", cfg)
        try:
            mb = FanotifyMount(tmp_path / "b.boot", tmp_path / "mb", tmp_path / "cache", "--config", cfg)
        except BaseException:
            ma.kill()
            raise
        try:
            assert "sharing the data file of fanotify daemon" in mb.log_text()  # no events on its own writes
            for m in (mb, ma, mb):
                for root, _, names in os.walk(m.mnt):
                    for n in names:
                        p = Path(root) / n
                        if p.is_file() and not p.is_symlink():
                            p.read_bytes()
            assert px.blob_gets(shared.blob_id), "the shared blob was never fetched"
            raw = (tmp_path / "blobs" / shared.blob_id).read_bytes()
            meta = MetaCache(lambda blob, off, n: raw[off:off + n]).get(shared)
            infos = [meta.chunk_ref(ci).info for ci in range(shared.chunk_count)]
            for ci, info in enumerate(infos):  # each stored chunk came from the registry at most once
                span = (info.compressed_offset, info.compressed_offset + info.compressed_size)
                gets = [g for g in px.blob_gets(shared.blob_id, overlapping=span)
                        if g["range"] is None or g["range"][1] - g["range"][0] > 16]  # not a mount's 1-byte probe
                assert len(gets) <= 1, (ci, span, gets)
        except BaseException:
            ma.kill()
            mb.kill()
            raise
        mb.stop()
        ma.stop()


def test_whole_daemon_killed_leaves_an_orphan_the_check_names(data_image, tmp_path):
    d, boot, blob, files = data_image
    m = FanotifyMount(boot, tmp_path / "mnt", tmp_path / "cache", "--blob-dir", d / "blobs")
    target = str((tmp_path / "mnt").resolve())
    try:
        assert records.orphan_message(target) is None
        deadline = time.monotonic() + 10
        while (rec := records.read_record(target)) is None or rec.mount_id == records.UNKNOWN_MOUNT:
            assert time.monotonic() < deadline, "no mount record"
            time.sleep(0.02)
        worker = m.worker()
        os.kill(m.pid, signal.SIGKILL)
        m.proc.wait()
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{worker}"):  # PR_SET_PDEATHSIG: the worker follows its supervisor
            assert time.monotonic() < deadline, "the worker outlived its supervisor"
            time.sleep(0.02)
        msg = records.orphan_message(target)
        assert msg is not None and "orphaned" in msg and f"umount {target}" in msg and "\n" not in msg
        cfg = fanotify_config(tmp_path / "cfg.json", tmp_path / "cache", "--blob-dir", d / "blobs")
        for cmd in (("mount", boot, target, "--mode", "fanotify", "--config", cfg, "--foreground"),
                    ("stats", target)):
            p = run_rafsfs_proc(*cmd)
            assert p.returncode == 1 and "orphaned" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "mnt")], capture_output=True)
        m.kill()
    assert records.orphan_message(target) is None  # unmounted: the stale record is dropped


def _nydusd_fanotify(boot: Path, cfg: Path, mnt: Path, sock: Path, log: Path) -> subprocess.Popen:
    """``rafsfs-nydusd fuse`` as nydus-snapshotter starts it, in fanotify mode; returned once the API is RUNNING."""
    from rafsfs.api import ApiClient

    mnt.mkdir(exist_ok=True)
    p = subprocess.Popen([sys.executable, "-m", "rafsfs.nydusd", "fuse", "--config", str(cfg), "--bootstrap",
                          str(boot), "--mountpoint", str(mnt), "--apisock", str(sock), "--log-file", str(log)],
                         env=dict(os.environ, PYTHONPATH=str(REPO), RAFSFS_NYDUSD_MODE="fanotify"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-2000:]
            time.sleep(0.05)
        info = ApiClient(str(sock)).daemon_info()  # the query waits for the mount
        assert info["state"] == "RUNNING", (info, log.read_text()[-2000:])
    except BaseException:
        _nydusd_fanotify_stop(p, mnt)
        raise
    return p


def _nydusd_fanotify_stop(p: subprocess.Popen, mnt: Path) -> int:
    try:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        return p.wait(60)
    finally:
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)])


def test_nydusd_is_running_before_the_registry_is_asked(data_image, tmp_path):
    """rafsfs-nydusd in fanotify mode (as nydus-snapshotter starts it) mounts and reports RUNNING without asking the
    registry: the cache's entries come from the bootstrap; the HTTP stack comes after (in the worker; in the
    supervisor only to prefetch).  With the registry gone the mount still comes up (metadata from the kernel), a
    read is EIO (never zeros) and the log says why; SIGTERM then unmounts and exits 0.  (Before, the blob probe ran
    first and the daemon died.)  With the registry back and the snapshotter's prefetch_all, the whole blob arrives
    after RUNNING and its mark comes off."""
    d, boot, blob, files = data_image
    with start_registry(tmp_path / "reg") as reg:
        reg.push_blob(REPO_NAME, blob)
        cfg = _config(tmp_path / "nydusd.json", reg.nydusd_config(
            REPO_NAME, tmp_path / "cache", timeout=1.5, connect_timeout=1.0))
        reg.kill()
        mnt, log = tmp_path / "mnt", tmp_path / "nydusd.log"
        p = _nydusd_fanotify(boot, cfg, mnt, tmp_path / "api.sock", log)
        try:
            assert is_mounted(mnt) and sorted(os.listdir(mnt / "small")) == [f"f{i}" for i in range(8)]
            assert os.stat(mnt / "big").st_size == len(files["/big"])
            assert read_errno(mnt / "small" / "f3") == errno.EIO
            assert re.search(r"WARNING .*range \d+\+\d+: .*: EIO", log.read_text()), log.read_text()[-2000:]
        finally:
            rc = _nydusd_fanotify_stop(p, mnt)
        assert rc == 0 and not is_mounted(mnt), log.read_text()[-2000:]
        assert "Traceback" not in log.read_text()

        reg.start()
        pf = dict(json.loads(cfg.read_text()), fs_prefetch={"enable": True, "prefetch_all": True, "threads_count": 2})
        log2 = tmp_path / "nydusd-pf.log"
        p = _nydusd_fanotify(boot, _config(tmp_path / "pf.json", pf), mnt, tmp_path / "api-pf.sock", log2)
        try:
            deadline = time.monotonic() + 60
            while "is complete: mark removed" not in log2.read_text():
                assert time.monotonic() < deadline, log2.read_text()[-2000:]
                time.sleep(0.1)
            drop_caches()
            assert read_errno(mnt / "big") == files["/big"]
        finally:
            assert _nydusd_fanotify_stop(p, mnt) == 0


def test_nydusd_without_prefetch_asks_the_registry_only_for_reads(data_image, tmp_path):
    """With nothing to prefetch, a fanotify rafsfs-nydusd sends the registry nothing of its own (no blob probe from
    the supervisor, which would build a second HTTP stack while the container starts): the first request is a
    read's, and the bytes are right."""
    d, boot, blob, files = data_image
    with start_registry(tmp_path / "reg") as reg:
        reg.push_blob(REPO_NAME, blob)
        cfg = _config(tmp_path / "nydusd.json", reg.nydusd_config(REPO_NAME, tmp_path / "cache"))
        before = len(reg.requests())
        mnt, log = tmp_path / "mnt", tmp_path / "nydusd.log"
        p = _nydusd_fanotify(boot, cfg, mnt, tmp_path / "api.sock", log)
        try:
            time.sleep(1.5)  # the probe ran right after RUNNING before
            assert reg.requests()[before:] == [], reg.requests()[before:]
            assert read_errno(mnt / "small" / "f5") == files["/small/f5"]
            assert reg.requests()[before:]
        finally:
            assert _nydusd_fanotify_stop(p, mnt) == 0


def test_lazy_unmount_with_open_files_keeps_filling_until_they_close(data_image, tmp_path):
    """``umount -l`` detaches the mount but its superblock lives on while a file of it is open, and that file's
    holes still ask the group.  The daemon keeps the group and its worker (SIGTERM too waits) until the last file is
    closed, so the reader gets the right bytes, never zeros; then it exits 0.  (Before, it took the detach for an
    unmount, closed the group, and the kernel failed open: the unread file read as zeros.)"""
    d, boot, blob, files = data_image
    m = FanotifyMount(boot, tmp_path / "mnt", tmp_path / "cache", "--blob-dir", d / "blobs")
    try:
        f = open(m.mnt / "big", "rb", buffering=0)  # nothing of it read yet: every page is a hole
        try:
            subprocess.run(["umount", "-l", str(m.mnt)], check=True)
            assert not is_mounted(m.mnt)
            time.sleep(1.5)
            m.proc.send_signal(signal.SIGTERM)
            time.sleep(1.5)
            assert m.proc.poll() is None, m.log_text()[-2000:]
            assert "detached" in m.log_text()
            assert f.read() == files["/big"]
        finally:
            f.close()
        m.proc.wait(timeout=30)
        assert m.proc.returncode == 0, m.log_text()[-2000:]
        assert "the last file of the detached" in m.log_text()
        FanotifyMount.live.discard(m.proc.pid)
        m._logf.close()
    except BaseException:
        m.kill()
        raise


def test_a_detached_daemon_leaves_the_record_of_a_new_mount_alone(data_image, tmp_path):
    """While a daemon still fills a lazily unmounted mount, the same mountpoint is mounted again; when the old
    daemon finally exits it removes only its own record (the new mount's record is what orphan detection and blob
    sharing read)."""
    d, boot, blob, files = data_image
    old = FanotifyMount(boot, tmp_path / "mnt", tmp_path / "cache-old", "--blob-dir", d / "blobs")
    new = None
    try:
        f = open(old.mnt / "small" / "f2", "rb", buffering=0)
        subprocess.run(["umount", "-l", str(old.mnt)], check=True)
        (tmp_path / "again").symlink_to(tmp_path / "mnt")  # the same mountpoint; its own API socket and log
        new = FanotifyMount(boot, tmp_path / "again", tmp_path / "cache-new", "--blob-dir", d / "blobs")
        assert f.read() == files["/small/f2"]
        f.close()
        old.proc.wait(timeout=30)
        assert old.proc.returncode == 0, old.log_text()[-2000:]
        FanotifyMount.live.discard(old.proc.pid)
        old._logf.close()
        rec = records.read_record(str(new.mnt.resolve()))
        assert rec is not None and rec.pid == new.pid
        assert read_errno(new.mnt / "big") == files["/big"]
    except BaseException:
        for m in (new, old):
            if m is not None:
                m.kill()
        raise
    new.stop()
