"""Hostile and broken registries, through the fault proxy (fault_proxy.py) in front of a real docker-registry:
first the RegistryBackend in-process (one fault at a time, exact request counts), then a real mount in each mode
(FUSE; fanotify: the kernel's EROFS filled by pre-content events) under 16 concurrent readers per fault (right bytes
or EIO within the deadline, the daemon never dies, memory bounded, a failed range reads right once the fault is gone).
"""
from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from conftest import needs_fuse
from fault_readers import peak_rss, read_range, reset_peak_rss, sixteen_readers
from registry_env import start_registry
from test_fanotify import FanotifyMount, children
from test_fanotify import _availability as _fanotify_unavailable
from test_fuse import FuseMount

from rafsfs.builder import BuildOptions, build
from rafsfs.config import Endpoint, RegistryConfig
from rafsfs.errors import BlobUnavailable
from rafsfs.image import RafsImage
from rafsfs.storage.backend.base import BlobRef
from rafsfs.storage.backend.registry import RegistryBackend
from rafsfs.storage.cache.chunk_cache import FAILURE_MEMORY

MiB = 1 << 20
REPO = "rafsfs/faults"
BIG = 40  # MiB in /big: 40 one-MiB chunks, a ~40 MiB blob (random bytes do not compress)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> tuple[Path, Path, bytes]:
    d = tmp_path_factory.mktemp("faults-img")
    (d / "src").mkdir()
    big = random.Random(7).randbytes(BIG * MiB)
    (d / "src" / "big").write_bytes(big)
    build(BuildOptions(source=str(d / "src"), bootstrap=str(d / "boot"), blob_dir=str(d / "blobs")))
    return d / "boot", d / "blobs" / RafsImage.open(str(d / "boot")).blobs[0].blob_id, big


@pytest.fixture(scope="module")
def registry(image, tmp_path_factory):
    """(registry, blob digest, blob bytes): one registry for the module; each test brings its own proxy."""
    _, blob, _ = image
    with start_registry(tmp_path_factory.mktemp("faults-reg")) as reg:
        yield reg, reg.push_blob(REPO, blob), blob.read_bytes()


def _backend(host: str, **kw) -> RegistryBackend:
    kw.setdefault("timeout", 2.0)
    kw.setdefault("connect_timeout", 1.0)
    return RegistryBackend(RegistryConfig(host=host, repo=REPO, scheme="http", **kw))


def _timed(fn, limit: float):
    """(result or exception, seconds); the call runs in a thread, and still running after ``limit`` fails."""
    out: list = []

    def run() -> None:
        t0 = time.monotonic()
        try:
            out.append((fn(), time.monotonic() - t0))
        except Exception as e:  # noqa: BLE001 - the test inspects it
            out.append((e, time.monotonic() - t0))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    assert out, f"still running after {limit} s"
    return out[0]


# ---------------------------------------------------------------------------------------------- the backend
def test_cut_off_bodies_are_retried_then_a_clean_error(registry):
    """M2: a truncated or reset body is a temporary failure of the attempt: retried, then BlobUnavailable."""
    reg, digest, blob = registry
    ref = BlobRef(digest, 0)
    path = f"/v2/{REPO}/blobs/sha256:{digest}"
    with reg.fault_proxy() as px:
        be = _backend(px.host, retry_limit=2)
        try:
            for fault in ("truncate", "reset"):
                px.set(fault, after=1000, count=2)  # two bad answers, then good ones
                n0 = px.requests[path]
                assert be.read(ref, 3 * MiB, MiB) == blob[3 * MiB:4 * MiB]
                assert px.requests[path] - n0 == 3
                px.set(fault, after=1000)  # every answer bad: retry_limit + 1 attempts, then a clean error
                n0 = px.requests[path]
                with pytest.raises(BlobUnavailable, match="cut short|reset"):
                    be.read(ref, 3 * MiB, MiB)
                assert px.requests[path] - n0 == 3
        finally:
            be.close()


@pytest.mark.allow_log("failed .*trying", "ignores Range")
def test_mirror_falls_back_to_the_origin(registry):
    """A mirror that cuts bodies off, ignores Range or answers the wrong range: the origin serves the read."""
    reg, digest, blob = registry
    ref = BlobRef(digest, 0)
    with reg.fault_proxy() as px:
        be = _backend(reg.host, retry_limit=1, mirrors=[Endpoint(px.url)])
        try:
            for fault in ("truncate", "wrong_range", "ignore_range"):
                px.set(fault)
                assert be.read(ref, 5 * MiB + 17, 300_000) == blob[5 * MiB + 17:5 * MiB + 17 + 300_000], fault
                assert px.blob_gets(digest)[-1]["fault"] == fault
            # the mirror ignored Range: for a while it is asked only after the origin
            n0 = len(px.blob_gets(digest))
            assert be.read(ref, 7 * MiB, 1000) == blob[7 * MiB:7 * MiB + 1000]
            assert len(px.blob_gets(digest)) == n0
        finally:
            be.close()


def test_wrong_content_range_is_an_error_never_wrong_bytes(registry):
    """M3: a 206 whose Content-Range is not the range asked for fails the endpoint."""
    reg, digest, _ = registry
    with reg.fault_proxy() as px:
        be = _backend(px.host, retry_limit=1)
        px.set("wrong_range", shift=4096)
        try:
            with pytest.raises(BlobUnavailable, match="Content-Range"):
                be.read(BlobRef(digest, 0), MiB, 64 << 10)
        finally:
            be.close()


@pytest.mark.allow_log("ignores Range")
def test_ignored_range_is_streamed_not_buffered(registry):
    """M3: the only endpoint answers 200 with the whole ~40 MiB blob: the read skips to its offset and keeps only
    its own bytes (memory is the read's size, not the blob's)."""
    reg, digest, blob = registry
    with reg.fault_proxy() as px:
        be = _backend(px.host)
        px.set("ignore_range")
        try:
            tracemalloc.start()
            try:
                got = be.read(BlobRef(digest, 0), 20 * MiB + 5, 256 << 10)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        finally:
            be.close()
        assert got == blob[20 * MiB + 5:20 * MiB + 5 + (256 << 10)]
        assert peak < 4 * MiB, f"peak {peak / MiB:.1f} MiB for a 256 KiB read"
        assert px.blob_gets(digest)[-1]["fault"] == "ignore_range"


def test_trickling_and_stalled_servers_cannot_hold_a_read_past_its_deadline(registry):
    """M4: one byte every 0.3 s, of the body or of the headers (each socket read returns in time), or nothing at
    all: the read fails within its 3 s deadline plus one socket timeout, instead of after ~1 MiB x 0.3 s."""
    reg, digest, _ = registry
    with reg.fault_proxy() as px:
        be = _backend(px.host, timeout=2.0, retry_limit=3, deadline=3.0)
        try:
            for fault, params in (("trickle", {"interval": 0.3}), ("slow_headers", {"interval": 0.3}),
                                  ("stall", {})):
                px.set(fault, **params)
                err, took = _timed(lambda: be.read(BlobRef(digest, 0), 2 * MiB, MiB), limit=20)
                assert isinstance(err, BlobUnavailable), err
                assert took < 3.0 + 2.0 + 1.0, (fault, took)
                px.clear()
        finally:
            be.close()


def test_status_bursts_honour_retry_after(registry):
    """500/503/429 are retried; Retry-After is honoured (bounded by the deadline) for 503 and 429 alike."""
    reg, digest, blob = registry
    with reg.fault_proxy() as px:
        be = _backend(px.host, retry_limit=3)
        try:
            for code in (500, 503, 429):
                px.set("status", code=code, count=2, retry_after=1)
                t0 = time.monotonic()
                assert be.read(BlobRef(digest, 0), 0, 4096) == blob[:4096]
                assert time.monotonic() - t0 >= 1.9, code  # two waits of at least 1 s
            px.set("status", code=503)  # a registry that stays down: a clean error
            with pytest.raises(BlobUnavailable, match="HTTP 503"):
                be.read(BlobRef(digest, 0), 0, 4096)
        finally:
            be.close()


class _HostileTokenServer:
    """A registry on 127.0.0.1 that answers every blob GET with a Bearer challenge naming its own ``/token`` realm,
    whose answer is ``mode``: ``huge`` (64 MiB of one JSON string, fast), ``trickle`` (a JSON string growing one byte
    every 0.2 s, for at most 30 s), ``deep`` (a JSON array nested 200,000 deep) or ``cut`` (11 of 100 bytes)."""

    def __init__(self, mode: str):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        owner = self
        self.mode = mode
        self.token_requests = 0
        self.stop = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                try:
                    if not self.path.startswith("/token"):
                        self.send_response(401)
                        self.send_header("WWW-Authenticate", f'Bearer realm="{owner.url}/token",service="t"')
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    owner.token_requests += 1
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Connection", "close")
                    if owner.mode == "cut":  # a token answer cut off: a temporary failure like a cut-off blob body
                        self.send_header("Content-Length", "100")
                        self.end_headers()
                        self.wfile.write(b'{"token": "')
                        return
                    self.end_headers()
                    if owner.mode == "deep":
                        self.wfile.write(b"[" * 200_000)
                        return
                    self.wfile.write(b'{"token": "')
                    t_end = time.monotonic() + 30
                    for _ in range(64 if owner.mode == "huge" else 150):
                        if owner.stop.is_set() or time.monotonic() > t_end:
                            return
                        if owner.mode == "huge":
                            self.wfile.write(b"a" * MiB)
                        else:
                            self.wfile.write(b"a")
                            self.wfile.flush()
                            owner.stop.wait(0.2)
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.url = f"http://{self.host}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_hostile_token_realm_is_bounded_in_time_and_memory():
    """A registry names a token realm that answers 64 MiB, trickles its answer one byte at a time, or nests its
    JSON 200,000 deep: each read fails with a one-line BlobUnavailable within its deadline, holding a bounded amount
    of memory.  (On the old code the token answer was read whole by ``requests``: ~64 MiB held, the trickle held the
    read for 30 s, and the deep JSON escaped the backend as a RecursionError.)"""
    for mode in ("huge", "trickle", "deep"):
        srv = _HostileTokenServer(mode)
        be = _backend(srv.host, timeout=2.0, retry_limit=0, deadline=3.0)
        tracemalloc.start()
        try:
            err, took = _timed(lambda: be.read(BlobRef("ab" * 32, 0), 0, 4096), limit=40)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            be.close()
            srv.close()
        assert isinstance(err, BlobUnavailable), (mode, repr(err))
        assert "\n" not in str(err)
        assert took < 3.0 + 2.0 + 1.0, (mode, took)
        assert peak < 8 * MiB, (mode, peak)
    srv = _HostileTokenServer("cut")
    be = _backend(srv.host, timeout=2.0, retry_limit=2, deadline=10.0)
    try:
        with pytest.raises(BlobUnavailable, match="cut short"):
            be.read(BlobRef("ab" * 32, 0), 0, 4096)
        assert srv.token_requests == 3  # retried like any cut-off body
    finally:
        be.close()
        srv.close()


def test_push_closes_the_file_of_every_attempt(registry, tmp_path):
    """L10: a blob pushed from a file, with a 503 on the first PUT: both attempts' files are closed."""
    import gc
    import warnings

    from rafsfs.oci.client import RegistryClient
    from rafsfs.oci.reference import parse_reference

    reg, _, _ = registry
    data = os.urandom(100_000)
    f = tmp_path / "layer"
    f.write_bytes(data)
    import hashlib

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with reg.fault_proxy() as px:
        px.set("status", code=503, count=1, path="/blobs/uploads/", method="PUT")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            with RegistryClient(parse_reference(f"{px.host}/{REPO}:x", plain_http=True)) as c:
                assert c.push_blob(digest, len(data), path=str(f))
            gc.collect()
        leaked = [w for w in caught if issubclass(w.category, ResourceWarning) and str(f) in str(w.message)]
        assert not leaked, leaked
        assert reg.admin_session(REPO).get(f"{reg.url}/v2/{REPO}/blobs/{digest}").content == data


def test_oci_download_retries_a_cut_off_body(registry, tmp_path):
    """M2 for the OCI client (pull, convert): a layer download cut off twice is started over and completes, the
    progress callback counting each byte once; cut off every time, it is a one-line error and no file."""
    from rafsfs.errors import RafsError
    from rafsfs.oci.client import PULL_RETRIES, Descriptor, RegistryClient
    from rafsfs.oci.reference import parse_reference

    reg, digest, blob = registry
    desc = Descriptor("application/octet-stream", f"sha256:{digest}", len(blob))
    seen: list[int] = []
    with reg.fault_proxy() as px, RegistryClient(parse_reference(f"{px.host}/{REPO}:x", plain_http=True)) as c:
        px.set("truncate", after=3 * MiB, count=2)
        c.download_blob(desc, str(tmp_path / "layer"), progress=seen.append)
        assert (tmp_path / "layer").read_bytes() == blob
        assert sum(seen) == len(blob)
        px.set("truncate", after=MiB)
        with pytest.raises(RafsError, match="cut short") as e:
            c.download_blob(desc, str(tmp_path / "layer2"))
        assert "\n" not in str(e.value)
        assert not (tmp_path / "layer2").exists()
        assert len(px.blob_gets(digest)) == 3 + PULL_RETRIES + 1


# ---------------------------------------------------------------------------------------------- a FUSE mount
class _Daemon:
    """A mount under test, whatever its mode: its mountpoint, the processes that make it up (their RSS is the
    daemon's memory), whether they all still live, and how to stop it."""

    def __init__(self, mode: str, boot: Path, tmp_path: Path, cfg: Path):
        self.mode = mode
        if mode == "fuse":
            self.m = FuseMount(boot, tmp_path / "mnt", "--config", cfg)
            self.pids = [self.m.proc.pid]
        else:  # the supervisor (the session's process) and the worker it forked: neither may die or be replaced
            self.m = FanotifyMount(boot, tmp_path / "mnt", tmp_path / "cache", "--config", cfg)
            self.pids = [self.m.pid, self.m.worker()]
        self.mnt = self.m.mnt

    def dead(self) -> list[int]:
        """The pids of the daemon that are gone (a worker replaced by a new one counts as gone)."""
        gone = [pid for pid in self.pids if not os.path.exists(f"/proc/{pid}")]
        if self.m.proc.poll() is not None:
            gone.append(self.m.proc.pid)
        if self.mode == "fanotify" and children(self.pids[0]) != self.pids[1:]:
            gone.extend(p for p in self.pids[1:] if p not in gone)
        return gone

    def reset_peak_rss(self) -> int:
        for pid in self.pids:
            reset_peak_rss(pid)
        return self.peak_rss()

    def peak_rss(self) -> int:
        return sum(peak_rss(pid) for pid in self.pids)

    def stop(self) -> None:
        self.m.stop()

    def kill(self) -> None:
        if self.mode == "fuse":
            subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
            self.m.proc.kill()
            self.m.proc.wait()
        else:
            self.m.kill()


def _fanotify_param():
    why = _fanotify_unavailable()
    return pytest.param("fanotify", marks=pytest.mark.skipif(why is not None, reason=f"fanotify: {why}"))


@pytest.mark.parametrize("mode", [pytest.param("fuse", marks=needs_fuse), _fanotify_param()])
@pytest.mark.allow_log("cannot read blob", "ignores Range", "failed")
def test_mount_under_each_fault_sixteen_readers(mode, image, registry, tmp_path, monkeypatch):
    """One ``rafsfs mount --mode MODE --config`` whose registry is the fault proxy (deadline 5 s, 2 retries); each
    fault gets four chunks nobody read before (nor fetched ahead) and 16 concurrent readers.  Every read returns the
    source's bytes or EIO within 2 deadlines (+ slack), transient faults are invisible, the daemon (in fanotify mode
    the supervisor and its worker) lives on, and a registry ignoring Range does not make the daemon's peak RSS grow
    by the blob's size.  Once the registry is well again, every range that failed reads right: nothing (no zeros,
    no error) was remembered for it -- in fanotify mode a denied fill must leave the kernel's EROFS nothing cached."""
    boot, _, big = image
    reg, digest, _ = registry
    monkeypatch.setenv("RAFSFS_FANOTIFY_RUN", str(tmp_path / "run"))
    deadline = 5.0
    limit = 2 * deadline + 8
    phases = [  # (fault, params, every read must succeed)
        ("truncate", {"after": 4096, "count": 4}, True),
        ("reset", {"after": 100_000, "count": 4}, True),
        ("status", {"code": 503, "count": 4, "retry_after": 1}, True),
        ("wrong_range", {}, False),
        ("status", {"code": 429, "retry_after": 1}, False),
        ("stall", {"seconds": 60}, False),
        ("trickle", {"interval": 0.5, "seconds": 60}, False),
        ("ignore_range", {}, True),  # last: its chunks are the lowest, the least to skip on a loaded machine
    ]
    outcome: list[str] = []
    failed: list[int] = []
    with reg.fault_proxy() as px:
        cfg = reg.nydusd_config(REPO, tmp_path / "cache", host=px.host, timeout=2, connect_timeout=1, retry_limit=2,
                                deadline=deadline)
        (tmp_path / "cfg.json").write_text(json.dumps(cfg))
        d = _Daemon(mode, boot, tmp_path, tmp_path / "cfg.json")
        f = d.mnt / "big"
        try:
            for i, (fault, params, must_succeed) in enumerate(phases):
                # phases go down the file and a phase's chunks are 9 apart: no read continues an in-order stream,
                # so the cache's readahead never fetches a later phase's chunks early
                chunks = [8 - i + 9 * k for k in range(4)]
                if fault == "ignore_range":
                    hwm0 = d.reset_peak_rss()
                px.set(fault, **params)
                results = sixteen_readers(f, chunks, limit)
                px.clear()
                for off, got, took in results:
                    if isinstance(got, int):
                        assert got == errno.EIO and not must_succeed, (fault, off, errno.errorcode.get(got))
                        failed.append(off)
                    else:
                        assert got == big[off:off + len(got)] and len(got) == 64 << 10, (fault, off)
                    assert took < limit, (fault, took)
                eio = sum(isinstance(g, int) for _, g, _ in results)
                outcome.append(f"{mode} {fault}: {16 - eio} right, {eio} EIO, slowest "
                               f"{max(t for _, _, t in results):.1f} s")
                if not must_succeed:
                    assert eio, f"{fault}: nothing failed"
                if fault == "ignore_range":
                    grew = d.peak_rss() - hwm0
                    outcome[-1] += f", peak RSS +{grew / MiB:.1f} MiB"
                    assert grew < BIG * MiB // 2, f"peak RSS grew {grew / MiB:.0f} MiB (blob {BIG} MiB)"
                    assert any(r["fault"] == "ignore_range" for r in px.blob_gets(digest))
                assert not d.dead(), f"the daemon died under {fault}: {d.dead()}"
            # the registry is well again: every range a failed phase left behind is served right
            time.sleep(FAILURE_MEMORY)
            for off in failed:
                assert read_range(f, off, 64 << 10) == big[off:off + (64 << 10)], ("after the faults", off)
            assert not d.dead()
        except BaseException:
            print("\n".join(outcome))  # shown with the failure
            d.kill()
            raise
        finally:
            px.clear()
        print("\n" + "\n".join(outcome))
        d.stop()
