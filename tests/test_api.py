"""The daemon API with real daemons: ``rafsfs mount`` and ``rafsfs-nydusd fuse`` mount an image, the tests talk to the
unix socket (as nydus-snapshotter and ``rafsfs stats`` do) and watch the counters move as files are read."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, is_mounted, needs_fuse, run_rafsfs_proc

from rafsfs.api import ApiClient, ApiError, ApiServer, default_apisock
from rafsfs.api.server import DaemonHooks




def _wait(cond, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """An image of a few files spanning several 64K chunks, and a nydusd config reading it through the cache."""
    d = tmp_path_factory.mktemp("api-img")
    src = d / "src"
    (src / "sub").mkdir(parents=True)
    rnd = __import__("random").Random(6)
    files = {"a.bin": 300_000, "b.bin": 200_000, "sub/c.txt": 5000}
    for name, size in files.items():
        (src / name).write_bytes(rnd.randbytes(size))
    run_rafsfs_proc("build", src, "--bootstrap", d / "img.boot", "--blob-dir", d / "blobs", "--chunk-size", "64K",
                    check=0)
    return d, src


def _config(d: Path, work: Path) -> Path:
    cfg = work / "nydusd.json"
    cfg.write_text(json.dumps({
        "device": {"backend": {"type": "localfs", "config": {"dir": str(d / "blobs")}},
                   "cache": {"type": "blobcache", "config": {"work_dir": str(work / "cache")}}},
        "mode": "direct", "digest_validate": True, "enable_xattr": True}))
    return cfg


def _stats(*args) -> dict:
    return json.loads(run_rafsfs_proc("stats", *args, "--json", check=0).stdout)


# ---------------------------------------------------------------------------------------- rafsfs mount + stats
@needs_fuse
def test_mount_daemon_serves_api_and_stats_move(image, tmp_path):
    d, src = image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = default_apisock(str(mnt))
    run_rafsfs_proc("mount", d / "img.boot", mnt, "--config", _config(d, tmp_path), "--mode", "fuse",
                    "--log-file", tmp_path / "log", check=0)
    try:
        assert os.path.exists(sock), "rafsfs mount made no API socket at the default path"
        info = ApiClient(sock).daemon_info()
        assert info["state"] == "RUNNING"
        assert set(info["version"]) >= {"package_ver", "git_commit", "build_time", "profile", "rustc"}
        assert str(mnt) in info["backend_collection"]

        before = _stats(mnt)
        assert before["state"] == "RUNNING" and before["bytes_served"] == 0 and before["misses"] == 0

        assert (mnt / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
        after = _stats(mnt)
        assert after["misses"] >= 1  # 300,000 bytes = 5 chunks of 64K, none cached before
        assert after["hits"] + after["misses"] >= 5  # (the cache may fetch some ahead of the reader)
        assert after["bytes_fetched"] > 0
        assert after["bytes_served"] >= 300_000
        assert after["backend_requests"] >= 1 and after["inflight"] == 0
        assert after["latency_ms"]["p50"] is not None and after["latency_ms"]["p99"] >= after["latency_ms"]["p50"]

        # the same numbers by --apisock, and as the text table people read
        assert _stats("--apisock", sock)["misses"] == after["misses"]
        text = run_rafsfs_proc("stats", mnt, check=0).stdout
        for word in ("hits", "misses", "bytes fetched", "bytes served", "p50", "p90", "p99", "in flight"):
            assert word in text
        assert re.search(rf"^misses +{after['misses']}$", text, re.M), text

        # a second file: more served, and its chunks are new misses; re-reading a.bin through a new open after
        # dropping the page cache fetches nothing
        assert (mnt / "b.bin").read_bytes() == (src / "b.bin").read_bytes()
        mid = _stats(mnt)
        assert mid["bytes_served"] >= after["bytes_served"] + 200_000
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        assert (mnt / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
        last = _stats(mnt)
        # served locally: from the cache file (hits) or the FUSE layer's memory of recent chunks; never refetched
        assert last["misses"] == mid["misses"] and last["bytes_fetched"] == mid["bytes_fetched"]
        assert last["backend_requests"] == mid["backend_requests"]
    finally:
        run_rafsfs_proc("umount", mnt)
    _wait(lambda: not os.path.exists(sock), what="the daemon to remove its socket")
    assert not is_mounted(mnt)
    p = run_rafsfs_proc("stats", mnt)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "no daemon API socket" in p.stderr


@needs_fuse
def test_api_errors_and_exit(image, tmp_path):
    d, _ = image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = tmp_path / "api.sock"
    run_rafsfs_proc("mount", d / "img.boot", mnt, "--blob-dir", d / "blobs", "--mode", "fuse", "--apisock", sock,
                    "--log-file", tmp_path / "log", "--pid-file", tmp_path / "pid", check=0)
    pid = int((tmp_path / "pid").read_text())
    try:
        c = ApiClient(str(sock))
        with pytest.raises(ApiError) as e:
            c.get("/api/v1/nope")
        assert e.value.status == 404 and e.value.code == "NotFound"
        with pytest.raises(ApiError) as e:
            c.request("DELETE", "/api/v1/daemon")
        assert e.value.status == 405
        with pytest.raises(ApiError) as e:  # shared-mode mounts are not something this daemon does
            c.request("POST", "/api/v1/mount?mountpoint=/x", {"fs_type": "rafs", "source": "/b", "config": "{}"})
        assert e.value.status == 501 and "not supported" in str(e.value)
        with pytest.raises(ApiError) as e:
            c.request("PUT", "/api/v2/blobs", "not json")
        assert e.value.status in (400, 501)
        assert c.get("/api/v1/metrics/inflight") == []
        assert c.get("/api/v1/metrics")["data_read"] == 0  # nothing read yet (no local cache: direct source)
        assert c.request("PUT", "/api/v1/daemon/start") is None  # 204
        assert c.request("PUT", "/api/v1/daemon/exit") is None  # 204, then the daemon unmounts and exits
        _wait(lambda: not is_mounted(mnt), what="unmount after PUT /api/v1/daemon/exit")
        _wait(lambda: not Path(f"/proc/{pid}").exists(), what="the daemon to exit")
        assert not sock.exists()
    finally:
        if is_mounted(mnt):
            run_rafsfs_proc("umount", mnt)


# ---------------------------------------------------------------------------------------- rafsfs-nydusd
def _nydusd(*args) -> list[str]:
    return [sys.executable, "-m", "rafsfs.nydusd", *map(str, args)]


def _env() -> dict:
    # these tests check FUSE-mode counters (bytes served by the daemon, hits per read); on a kernel with fanotify
    # pre-content events auto would serve with the kernel, which counts neither (tests/test_fanotify*.py)
    return dict(os.environ, PYTHONPATH=str(REPO), RAFSFS_NYDUSD_MODE="fuse")


@needs_fuse
def test_nydusd_fuse_mode_as_the_snapshotter_runs_it(image, tmp_path):
    """The argv nydus-snapshotter 0.13 uses (plus flags it may add), the socket wait and the RUNNING poll, reads,
    metrics, then SIGTERM: unmounted, socket gone, exit 0."""
    d, src = image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = tmp_path / "socket" / "dc5rknhksduarpijtta0" / "api.sock"  # the snapshotter does not create the dir
    logf = tmp_path / "logs" / "nydusd.log"
    p = subprocess.Popen(_nydusd("fuse", "--config", _config(d, tmp_path), "--bootstrap", d / "img.boot",
                                 "--mountpoint", mnt, "--apisock", sock, "--log-level", "info",
                                 "--log-rotation-size", "100", "--log-file", logf, "--thread-num", "4",
                                 "--some-future-flag", "x"),
                         env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: sock.exists() or p.poll() is not None, what="the API socket")
        assert p.poll() is None, p.communicate()[1]
        c = ApiClient(str(sock))
        _wait(lambda: c.daemon_info()["state"] == "RUNNING", what="state RUNNING")
        assert is_mounted(mnt)  # RUNNING means the mount is complete
        # the Go client keeps connections alive: two requests on one connection
        conn = http.client.HTTPConnection("unix")
        conn.sock = socket.socket(socket.AF_UNIX)
        conn.sock.connect(str(sock))
        for _ in range(2):
            conn.request("GET", "/api/v1/daemon", headers={"Host": "unix", "Accept-Encoding": "gzip"})
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["state"] == "RUNNING"
        conn.close()

        assert (mnt / "sub" / "c.txt").read_bytes() == (src / "sub" / "c.txt").read_bytes()
        assert (mnt / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
        fs = c.get("/api/v1/metrics")
        assert fs["data_read"] >= 305_000
        cache = c.get("/api/v1/metrics/blobcache")
        assert cache["misses"] >= 1 and cache["hits"] + cache["misses"] >= 6  # 6 chunks read (some fetched ahead)
        assert cache["store_path"] == str(tmp_path / "cache")
        assert c.get("/api/v1/metrics/backend")["read_amount_total"] == cache["bytes_fetched"] > 0
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)])
    assert not is_mounted(mnt)
    assert not sock.exists()
    log = logf.read_text()
    assert "ignoring arguments" in log and "--some-future-flag" in log and "unmounted" in log


def test_nydusd_version():
    p = subprocess.run(_nydusd("--version"), capture_output=True, text=True, env=_env())
    assert p.returncode == 0
    keys = [line.split(":", 1)[0] for line in p.stdout.splitlines()]
    assert keys == ["Version", "Git Commit", "Build Time", "Profile", "Rustc"]
    assert p.stdout.startswith("Version: \tv")


@needs_fuse
@pytest.mark.parametrize("case", ["bad-bootstrap", "bad-config", "no-mountpoint", "socket-in-use",
                                  "relative-prefetch-path", "registry-cache-dir-impossible"])
def test_nydusd_bad_input_is_one_line(image, tmp_path, case):
    d, _ = image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    boot, cfg = d / "img.boot", _config(d, tmp_path)
    sock = tmp_path / "api.sock"
    live = None
    extra: list = []
    if case in ("relative-prefetch-path", "registry-cache-dir-impossible"):
        # a registry config: its source is built after the mount is up, yet these are caught before it
        (tmp_path / "a-file").write_text("")
        work = tmp_path / ("cache" if case == "relative-prefetch-path" else "a-file/cache")
        cfg.write_text(json.dumps({"device": {
            "backend": {"type": "registry", "config": {"host": "127.0.0.1:9", "repo": "x/y", "scheme": "http"}},
            "cache": {"type": "blobcache", "config": {"work_dir": str(work)}}}}))
        if case == "relative-prefetch-path":
            extra = ["--prefetch-files", "etc/passwd"]
    elif case == "bad-bootstrap":
        boot = tmp_path / "junk.boot"
        boot.write_bytes(os.urandom(8192))
    elif case == "bad-config":
        cfg.write_text('{"device": {"backend": {"type": "s3", "config": {}}}}')
    elif case == "no-mountpoint":
        mnt = tmp_path / "missing"
    else:
        live = socket.socket(socket.AF_UNIX)
        live.bind(str(sock))
        live.listen()
    try:
        p = subprocess.run(_nydusd("fuse", "--config", cfg, "--bootstrap", boot, "--mountpoint", mnt,
                                   "--apisock", sock, *extra), capture_output=True, text=True, env=_env(), timeout=60)
    finally:
        if live is not None:
            live.close()
    assert p.returncode == 1
    errors = [ln for ln in p.stderr.splitlines() if "ERROR" in ln]  # (INFO lines may come before it)
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
    assert not is_mounted(mnt) if mnt.exists() else True
    if case != "socket-in-use":
        assert not sock.exists()


@needs_fuse
def test_stale_socket_is_replaced(image, tmp_path):
    """A daemon killed with -9 leaves its socket behind; the next one on the same path takes it over."""
    d, src = image
    sock = tmp_path / "api.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    s.close()  # a socket file nobody listens on
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = subprocess.Popen(_nydusd("fuse", "--bootstrap", d / "img.boot", "--mountpoint", mnt, "--apisock", sock,
                                 "--config", _config(d, tmp_path)), env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        c = ApiClient(str(sock))

        def running() -> bool:
            assert p.poll() is None, p.communicate()[1]
            try:
                return c.daemon_info()["state"] == "RUNNING"
            except ApiError:
                return False

        _wait(running, what="RUNNING on the old socket path")
        assert (mnt / "b.bin").read_bytes() == (src / "b.bin").read_bytes()
    finally:
        p.terminate()
        p.wait(30)
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)])


# ---------------------------------------------------------------------------------------- the server alone
def test_server_states_and_metrics_shapes(tmp_path):
    """Without a mount: INIT until the daemon says RUNNING; the blobcache answer carries nydusd's keys and ours."""
    snap = {"hits": 3, "misses": 2, "errors": 0, "backend_requests": 2, "inflight": 1, "bytes_fetched": 10,
            "bytes_served": 20, "latency_ms": {"p50": 1.0, "p90": 2.0, "p99": 3.0}}
    server = ApiServer(str(tmp_path / "s.sock"), "id0", DaemonHooks(metrics=lambda: snap, work_dir="/w")).start()
    try:
        c = ApiClient(str(tmp_path / "s.sock"))
        assert c.daemon_info()["state"] == "INIT"
        server.running()
        assert c.daemon_info()["state"] == "RUNNING"
        m = c.cache_metrics()
        assert m["whole_hits"] == 3 and m["total"] == 5 and m["store_path"] == "/w"
        assert m["latency_ms"]["p99"] == 3.0 and m["inflight"] == 1
        with pytest.raises(ApiError) as e:
            c.request("PUT", "/api/v1/daemon/exit")  # no exit hook: the API cannot stop this one
        assert e.value.status == 501
        with pytest.raises(ApiError, match="in use"):
            ApiServer(str(tmp_path / "s.sock"), "id1").start()
    finally:
        server.close()
    assert not (tmp_path / "s.sock").exists()
    with pytest.raises(ApiError, match="no daemon API socket"):
        ApiClient(str(tmp_path / "s.sock")).daemon_info()


def test_default_apisock_fits_a_unix_socket():
    assert default_apisock("/mnt/x") == "/run/rafsfs/mnt_x.sock"
    long = "/tmp/" + "d" * 200
    p = default_apisock(long)
    assert len(p) < 108 and p.startswith("/run/rafsfs/mnt-") and p == default_apisock(long)


def test_state_query_during_init_is_answered_when_the_mount_is_ready(tmp_path):
    """With hold_init, a poll made while INIT waits for the state change instead of costing another poll."""
    import threading

    server = ApiServer(str(tmp_path / "h.sock"), "id0", hold_init=10).start()
    try:
        answers: list[tuple[str, float]] = []
        t0 = time.monotonic()
        t = threading.Thread(target=lambda: answers.append(
            (ApiClient(str(tmp_path / "h.sock")).daemon_info()["state"], time.monotonic() - t0)))
        t.start()
        time.sleep(0.5)
        assert not answers  # still held
        server.running()
        t.join(10)
        assert answers and answers[0][0] == "RUNNING" and 0.5 <= answers[0][1] < 5
    finally:
        server.close()


@needs_fuse
@pytest.mark.parametrize("how", ["fs_prefetch", "prefetch-files"])
def test_nydusd_prefetch(image, tmp_path, how):
    """nydusd's prefetch knobs: fs_prefetch.prefetch_all fetches every chunk in the background; --prefetch-files
    (a file listing paths, as the snapshotter's prefetch plugin gives it) fetches those files; nothing is read."""
    d, src = image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cfg = _config(d, tmp_path)
    extra: list = []
    if how == "fs_prefetch":
        c = json.loads(cfg.read_text())
        c["fs_prefetch"] = {"enable": True, "prefetch_all": True, "threads_count": 2}
        cfg.write_text(json.dumps(c))
    else:
        (tmp_path / "list").write_text("/b.bin\n")
        extra = ["--prefetch-files", tmp_path / "list"]
    sock = tmp_path / "api.sock"
    p = subprocess.Popen(_nydusd("fuse", "--config", cfg, "--bootstrap", d / "img.boot", "--mountpoint", mnt,
                                 "--apisock", sock, *extra), env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: sock.exists() or p.poll() is not None, what="the API socket")
        c = ApiClient(str(sock), timeout=60)  # a state query is held while INIT (up to 30 s)
        want = 8 if how == "fs_prefetch" else 4  # 300,000 + 200,000 + 5,000 bytes in 64K chunks / b.bin alone
        _wait(lambda: c.cache_metrics().get("prefetched_chunks", 0) >= want, what="prefetch")
        assert c.daemon_info()["state"] == "RUNNING"  # prefetch may finish before the mount is up: wait for it
        m = c.cache_metrics()
        assert m["bytes_served"] == 0 and m["misses"] == 0  # nobody read anything: it was all prefetch
        assert (mnt / "b.bin").read_bytes() == (src / "b.bin").read_bytes()
        after = c.cache_metrics()
        assert after["misses"] == 0 and after["hits"] >= 4  # every chunk of b.bin came from the cache
    finally:
        p.terminate()
        p.wait(30)
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)])


# ---------------------------------------------------------------------------------------------- review low items
def test_distinct_mountpoints_never_share_a_socket_or_log():
    """L7: '/mnt/a/b' and '/mnt/a_b' used to map to one socket (the second daemon then failed) and one log."""
    paths = ["/mnt/a/b", "/mnt/a_b", "/mnt/a%5Fb", "/mnt/a-b", "/", "/root", "/mnt/a b", "/mnt/" + "d" * 200,
             "/mnt/" + "e" * 200]
    socks = [default_apisock(p) for p in paths]
    assert len(set(socks)) == len(paths), socks

    from rafsfs.daemonize import default_log_file  # what rafsfs mount logs to

    logs = [default_log_file(p) for p in paths]
    assert len(set(logs)) == len(paths), logs
    for s in socks + logs:
        assert os.path.dirname(s) == "/run/rafsfs" and "/" not in os.path.basename(s) and len(s) < 108


def test_api_socket_is_never_open_to_others(tmp_path):
    """L11: the socket used to be chmod'ed after bind(), so a daemon started with umask 0 had a moment in which
    anyone could connect; now it is created 0600."""
    from rafsfs.api import server as srv

    modes = []
    bind = srv._UnixHTTPServer.server_bind

    def watched_bind(self):
        bind(self)
        modes.append(stat.S_IMODE(os.stat(self.server_address).st_mode))  # the moment right after bind

    old = os.umask(0)
    try:
        srv._UnixHTTPServer.server_bind = watched_bind
        server = ApiServer(str(tmp_path / "s.sock"), "id").start()
    finally:
        srv._UnixHTTPServer.server_bind = bind
        os.umask(old)
    try:
        assert modes == [0o600] and stat.S_IMODE(os.stat(tmp_path / "s.sock").st_mode) == 0o600
        assert os.umask(old) == old  # the process umask is as it was
    finally:
        server.close()


@pytest.mark.parametrize("mode, words", [("fanotify", "RAFSFS_NYDUSD_MODE fanotify is not available"),
                                         ("fscache", "RAFSFS_NYDUSD_MODE fscache is not supported here")])
def test_nydusd_forced_mode_that_cannot_work_is_one_line(image, tmp_path, mode, words):
    """rafsfs-nydusd picks its mode where rafsfs mount does; a forced one that cannot serve (fanotify without a
    cache, or fscache, which is the singleton daemon's) is one ERROR line, before any socket."""
    d, _ = image
    (tmp_path / "mnt").mkdir()
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": str(d / "blobs")}},
                                          "cache": {"type": "none"}}}))
    p = subprocess.run(_nydusd("fuse", "--config", cfg, "--bootstrap", d / "img.boot", "--mountpoint",
                               tmp_path / "mnt", "--apisock", tmp_path / "api.sock"),
                       capture_output=True, text=True, env=dict(_env(), RAFSFS_NYDUSD_MODE=mode), timeout=60)
    errors = [ln for ln in p.stderr.splitlines() if "ERROR" in ln]
    assert p.returncode == 1 and len(errors) == 1 and words in errors[0], p.stderr
    assert not (tmp_path / "api.sock").exists()


def test_a_backend_adds_its_own_routes(tmp_path):
    """DaemonHooks.routes: a backend's own API (fscache's v2 blob routes) without editing the server."""
    seen = []
    hooks = DaemonHooks(routes={("PUT", "/api/v2/blobs"): lambda q, b: seen.append(b) or {"ok": True},
                                ("GET", "/api/v2/extra"): lambda q, b: None})
    server = ApiServer(str(tmp_path / "s.sock"), "id", hooks).start()
    try:
        c = ApiClient(str(tmp_path / "s.sock"))
        assert c.request("PUT", "/api/v2/blobs", {"blob_id": "x"}) == {"ok": True} and seen == [{"blob_id": "x"}]
        assert c.get("/api/v2/extra") is None
        with pytest.raises(ApiError, match="405|not allowed"):
            c.request("POST", "/api/v2/extra")
    finally:
        server.close()
