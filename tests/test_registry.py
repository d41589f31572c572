"""The data path against a REAL registry (Debian's docker-registry on 127.0.0.1, see registry_env.py): the
RegistryBackend and the chunk cache in-process, and real FUSE mounts (``rafsfs mount --config``) and CLI commands
with nydusd-style JSON configs.  Backend requests are counted at the registry (its request log), not by us.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import threading
import time
from pathlib import Path

import pytest

from conftest import needs_fuse, run_rafsfs_proc
from registry_env import USER, start_registry
from test_fuse import FuseMount
from treeutil import assert_trees_equal, diff_snapshots, format_diffs, snapshot_image, snapshot_tree

from rafsfs.builder import BuildOptions, build
from rafsfs.config import from_dict
from rafsfs.image import RafsImage
from rafsfs.storage.cache.blob_file import MAP_SUFFIX, entries_of, ready_map
from rafsfs.storage.cache.chunk_cache import FAILURE_MEMORY
from rafsfs.storage.factory import source_from_config

MiB = 1 << 20
REPO = "rafsfs/test"



# ---------------------------------------------------------------------------------------------- images
@pytest.fixture(scope="module")
def tricky_image(tricky_src, tmp_path_factory) -> tuple[Path, Path]:
    """The tricky tree as a zstd image: (bootstrap, blob file)."""
    d = tmp_path_factory.mktemp("reg-tricky")
    build(BuildOptions(source=str(tricky_src), bootstrap=str(d / "boot"), blob_dir=str(d / "blobs")))
    return d / "boot", d / "blobs" / RafsImage.open(str(d / "boot")).blobs[0].blob_id


@pytest.fixture(scope="module")
def data_image(tmp_path_factory) -> tuple[Path, Path, dict[str, bytes]]:
    """A 24 MiB file (24 chunks) and eight small one-chunk files: (bootstrap, blob file, {path: bytes})."""
    d = tmp_path_factory.mktemp("reg-data")
    src = d / "src"
    (src / "small").mkdir(parents=True)
    rnd = random.Random(42)
    files = {"/big": rnd.randbytes(24 * MiB)}
    for i in range(8):
        files[f"/small/f{i}"] = rnd.randbytes(100_000 + i)
    for p, data in files.items():
        (src / p.lstrip("/")).write_bytes(data)
    build(BuildOptions(source=str(src), bootstrap=str(d / "boot"), blob_dir=str(d / "blobs")))
    return d / "boot", d / "blobs" / RafsImage.open(str(d / "boot")).blobs[0].blob_id, files


@pytest.fixture(autouse=True)
def _no_docker_credentials(tmp_path, monkeypatch):
    """Credentials come from the test's config only, never from this machine's ~/.docker/config.json."""
    (tmp_path / "docker-config").mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))


def _write_config(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg))
    return path


def _read_all_files(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root``, read through the page cache after dropping its pages, so
    every byte is asked of the filesystem again."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                h = hashlib.sha256()
                while chunk := os.read(fd, MiB):
                    h.update(chunk)
            finally:
                os.close(fd)
            out[str(p.relative_to(root))] = h.hexdigest()
    return out


def _timed_read(path: Path, offset: int, size: int, limit: float) -> tuple[bytes | int, float]:
    """Read exactly [offset, offset+size) in a thread (``POSIX_FADV_RANDOM``: no kernel readahead beyond it):
    (bytes or errno, seconds).  A read still blocked after ``limit`` seconds fails the test (the thread is left to
    finish once the registry is back)."""
    result: list = []

    def run() -> None:
        t0 = time.monotonic()
        try:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            try:
                data = b""
                while len(data) < size:
                    piece = os.pread(fd, size - len(data), offset + len(data))
                    if not piece:
                        break
                    data += piece
                result.append((data, time.monotonic() - t0))
            finally:
                os.close(fd)
        except OSError as e:
            result.append((e.errno, time.monotonic() - t0))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    assert result, f"read of {path} at {offset} still blocked after {limit} s: a reader hangs"
    return result[0]


# ---------------------------------------------------------------------------------------------- whole images
@needs_fuse
def test_anonymous_whole_image_then_zero_requests_warm_and_after_restart(tricky_image, tricky_src, tmp_path):
    boot, blob = tricky_image
    with start_registry(tmp_path / "reg") as reg:
        digest = reg.push_blob(REPO, blob)
        assert digest == blob.name
        cfg = _write_config(tmp_path / "nydusd.json", reg.nydusd_config(REPO, tmp_path / "cache"))
        m = FuseMount(boot, tmp_path / "mnt", "--config", cfg)
        try:
            assert_trees_equal(tricky_src, m.mnt, check_symlink_mtime=True)
            cold = len(reg.blob_gets(digest))
            assert cold > 0
            # the same data again, its pages dropped from the page cache: every read reaches the daemon, which
            # serves it from the cache directory
            want = _read_all_files(tricky_src)
            assert _read_all_files(m.mnt) == want
            assert len(reg.blob_gets(digest)) == cold, "warm reads went to the registry"
        finally:
            m.stop()
        # a restarted daemon with the same work_dir: the blob is all in the cache, so neither the mount (which
        # probes only blobs it may need) nor any read asks the registry
        m = FuseMount(boot, tmp_path / "mnt", "--config", cfg)
        try:
            after_mount = len(reg.blob_gets(digest))
            assert after_mount == cold, reg.blob_gets(digest)[cold:]
            assert_trees_equal(tricky_src, m.mnt, check_symlink_mtime=True)
            assert len(reg.blob_gets(digest)) == after_mount, "reads after a restart went to the registry"
        finally:
            m.stop()


def test_basic_auth_whole_image_and_credential_errors(tricky_image, tricky_src, tmp_path):
    """htpasswd (bcrypt) Basic auth, credentials from the config's ``auth`` field (base64 user:password);
    wrong or missing credentials are one-line errors."""
    boot, blob = tricky_image
    with start_registry(tmp_path / "reg", auth="basic") as reg:
        digest = reg.push_blob(REPO, blob)
        cfg = _write_config(tmp_path / "nydusd.json", reg.nydusd_config(REPO, tmp_path / "cache"))
        run_rafsfs_proc("extract", boot, tmp_path / "out", "--config", cfg, check=0)
        assert_trees_equal(tricky_src, tmp_path / "out", check_symlink_mtime=True)
        assert len(reg.blob_gets(digest)) > 0

        bad = reg.nydusd_config(REPO, tmp_path / "cache2")
        bad["device"]["backend"]["config"]["auth"] = "cmFmcy11c2VyOndyb25n"  # rafs-user:wrong
        none = reg.nydusd_config(REPO, tmp_path / "cache3")
        del none["device"]["backend"]["config"]["auth"]
        for name, c, words in (("bad", bad, "access denied"), ("none", none, "requires credentials")):
            p = run_rafsfs_proc("cat", boot, "/sizes/size-4097", "--config",
                                _write_config(tmp_path / f"{name}.json", c))
            lines = p.stderr.strip().splitlines()
            assert p.returncode == 1 and len(lines) == 1 and words in lines[0], p.stderr
            assert p.stdout == ""


@needs_fuse
def test_bearer_token_expiring_during_a_mount(tricky_image, tricky_src, tmp_path):
    """The token server announces a 2 s lifetime and the registry enforces it; the mount reads one file, waits past
    the expiry, reads the whole tree: a fresh token was fetched and every byte is right.  (One file first: a single
    read never starts the cache's sequential readahead, so most chunks are still to be fetched after the wait.)"""
    boot, blob = tricky_image
    with start_registry(tmp_path / "reg", auth="token", token_expires_in=2, token_lifetime=2) as reg:
        ts = reg.token_server
        digest = reg.push_blob(REPO, blob)
        cfg = _write_config(tmp_path / "nydusd.json", reg.nydusd_config(REPO, tmp_path / "cache"))
        m = FuseMount(boot, tmp_path / "mnt", "--config", cfg)
        try:
            assert (m.mnt / "hl/a/one").read_bytes() == (tricky_src / "hl/a/one").read_bytes()
            first, gets_before = ts.ok_hits, len(reg.blob_gets(digest))
            assert first >= 1
            time.sleep(2.5)
            assert_trees_equal(tricky_src, m.mnt, check_symlink_mtime=True)
        finally:
            m.stop()
        assert len(reg.blob_gets(digest)) > gets_before  # data was fetched after the expiry...
        assert ts.ok_hits >= first + 1, ts.hits  # ...with a new token
        # every token request carried the config's credentials and asked for pull on our repository only
        assert all(h["user"] == "rafs-user" and h["scopes"] == [f"repository:{REPO}:pull"] for h in ts.hits)
        assert len(reg.blob_gets(digest)) > 0


def test_bearer_token_expiring_unannounced(tricky_image, tricky_src, tmp_path):
    """The token server claims 300 s but the registry stops accepting the token after ~2 s: the registry's 401
    makes the backend fetch a new token, and the read goes on."""
    boot, blob = tricky_image
    with start_registry(tmp_path / "reg", auth="token", token_expires_in=300, token_lifetime=2) as reg:
        ts = reg.token_server
        digest = reg.push_blob(REPO, blob)
        img = RafsImage.open(str(boot))
        source = source_from_config(from_dict(reg.nydusd_config(REPO, tmp_path / "cache", cache="none")))
        try:
            img.read(img.resolve("/sizes/size-4097"), 0, 4097, source)
            first = ts.ok_hits
            assert first >= 1
            time.sleep(2.5)
            diffs = diff_snapshots(snapshot_tree(tricky_src), snapshot_image(img, source), check_symlink_mtime=True)
            assert not diffs, format_diffs(diffs, "image read through the registry differs from the source")
        finally:
            source.close()
        assert ts.ok_hits >= first + 1, ts.hits
        rejected = [r for r in reg.requests() if r["status"] == 401 and digest in (r["uri"] or "")
                    and "invalid token" in r["msg"]]
        assert rejected, "the registry never rejected the expired token"


# ---------------------------------------------------------------------------------------------- single flight
def test_sixteen_readers_of_one_chunk_one_registry_request(data_image, tmp_path):
    """Counted by a proxy in front of the registry, which sees each request's Range: readahead of *other* chunks
    is allowed, a second request for this chunk is not."""
    boot, blob, files = data_image
    with start_registry(tmp_path / "reg") as reg, reg.counting_proxy() as px:
        digest = reg.push_blob(REPO, blob)
        img = RafsImage.open(str(boot))
        ino = img.resolve("/big")
        (chunk,) = img.chunks(ino, 5, 5)  # the chunk holding [5 MiB, 6 MiB) of the file
        span = (chunk.info.compressed_offset, chunk.info.compressed_offset + chunk.info.compressed_size)
        source = source_from_config(from_dict(reg.nydusd_config(REPO, tmp_path / "cache", host=px.host)))
        results: list[bytes] = []
        barrier = threading.Barrier(16)

        def reader(i: int) -> None:
            barrier.wait()
            off = 5 * MiB + i * 4096  # sixteen different pages of the same chunk
            results.append((off, img.read(ino, off, 4096, source)))

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
        try:
            reg.pause()  # the first reader's request waits at the registry, so all sixteen overlap
            for t in threads:
                t.start()
            time.sleep(0.7)
            assert all(t.is_alive() for t in threads)
            reg.resume()
            for t in threads:
                t.join(30)
        finally:
            reg.resume()
            source.close()
        assert len(results) == 16
        assert all(data == files["/big"][off:off + 4096] for off, data in results)
        gets = px.blob_gets(digest, overlapping=span)
        assert len(gets) == 1, gets
        assert len(reg.blob_gets(digest)) == len(px.blob_gets(digest))  # the registry saw what the proxy sent


# ---------------------------------------------------------------------------------------------- failures
@needs_fuse
def test_registry_stopped_mid_read_succeeds_in_time_or_eio_after_deadline(data_image, tmp_path):
    """Through a FUSE mount, so EIO is the real errno: timeout 1.5 s, connect 1 s, 1 retry -> a 5 s deadline.
    Each step reads one chunk that no earlier step is next to, so the cache's sequential readahead never fetched it
    before the registry stops."""
    boot, blob, files = data_image
    big = files["/big"]
    deadline = (1.0 + 1.5) * 2
    # a failed read is asked for twice by the kernel (readahead, then the page itself), each bounded by the
    # deadline; plus slack for a loaded 2-core machine.  A hang is far beyond it.
    limit = 2 * deadline + 5
    with start_registry(tmp_path / "reg") as reg:
        reg.push_blob(REPO, blob)
        cfg = _write_config(tmp_path / "nydusd.json", reg.nydusd_config(
            REPO, tmp_path / "cache", timeout=1.5, connect_timeout=1.0, retry_limit=1))
        m = FuseMount(boot, tmp_path / "mnt", "--config", cfg)
        f = m.mnt / "big"
        try:
            data, _ = _timed_read(f, 0, MiB, limit)
            assert data == big[:MiB]

            # paused for less than the request timeout: the read waits, then succeeds
            reg.pause()
            threading.Timer(1.0, reg.resume).start()
            data, took = _timed_read(f, 6 * MiB, MiB, limit)
            assert data == big[6 * MiB:7 * MiB]
            assert took >= 0.8, took

            # paused for longer than the deadline: EIO after the deadline, not a hang
            reg.pause()
            got, took = _timed_read(f, 12 * MiB, MiB, limit)
            assert got == errno.EIO, got
            assert 1.0 <= took < limit, took
            reg.resume()
            time.sleep(FAILURE_MEMORY)  # a failed chunk is answered EIO from memory for this long (kernel retries)
            data, _ = _timed_read(f, 12 * MiB, MiB, limit)  # nothing bad was cached; the mount lives on
            assert data == big[12 * MiB:13 * MiB]

            # killed: connections refused, EIO quickly; started again on the same port: reads work
            reg.kill()
            got, took = _timed_read(f, 18 * MiB, MiB, limit)
            assert got == errno.EIO and took < limit, (got, took)
            reg.start()
            time.sleep(FAILURE_MEMORY)
            data, _ = _timed_read(f, 18 * MiB, MiB, limit)
            assert data == big[18 * MiB:19 * MiB]
        finally:
            reg.resume()
            m.stop()


@needs_fuse
def test_flipped_byte_in_registry_blob_is_eio_and_never_cached(data_image, tmp_path):
    boot, blob, files = data_image
    img = RafsImage.open(str(boot))
    victim = img.resolve("/small/f3")
    (chunk,) = img.chunks(victim)
    span = (chunk.info.compressed_offset, chunk.info.compressed_offset + chunk.info.compressed_size)
    others = {i: img.chunks(img.resolve(f"/small/f{i}"))[0].ci_index for i in (0, 1, 2, 4, 5, 6, 7)}
    with start_registry(tmp_path / "reg") as reg, reg.counting_proxy() as px:
        digest = reg.push_blob(REPO, blob)
        stored = reg.blob_path(digest)
        good = stored.read_bytes()
        bad = bytearray(good)
        bad[chunk.info.compressed_offset + chunk.info.compressed_size // 2] ^= 0x01
        stored.write_bytes(bytes(bad))  # bit rot in the registry's storage: same size, served as is
        cfg = _write_config(tmp_path / "nydusd.json", reg.nydusd_config(REPO, tmp_path / "cache", host=px.host))
        m = FuseMount(boot, tmp_path / "mnt", "--config", cfg)
        try:
            with pytest.raises(OSError) as e:
                (m.mnt / "small/f3").read_bytes()
            assert e.value.errno == errno.EIO
            for i in (0, 1, 2, 4, 5, 6, 7):  # the other files are fine
                assert (m.mnt / f"small/f{i}").read_bytes() == files[f"/small/f{i}"]
            # the bad chunk is not marked ready in the cache's map
            (entry,) = entries_of(str(tmp_path / "cache"), digest.split(":")[-1])
            map_path = str(tmp_path / "cache" / (entry + MAP_SUFFIX))

            def on_disk(ci: int) -> bool:  # map bytes are written just after the data is durable (a moment later)
                deadline = time.monotonic() + 10
                while ready_map(map_path)[ci] != 1 and time.monotonic() < deadline:
                    time.sleep(0.02)
                return ready_map(map_path)[ci] == 1

            assert all(on_disk(ci) for ci in others.values())
            assert ready_map(map_path)[chunk.ci_index] == 0
            # the registry is repaired: the chunk is fetched again and served right, on the same mount
            stored.write_bytes(good)
            time.sleep(FAILURE_MEMORY)  # the failure is answered from memory until then
            before = len(px.blob_gets(digest, overlapping=span))
            assert before >= 1
            assert (m.mnt / "small/f3").read_bytes() == files["/small/f3"]
            assert len(px.blob_gets(digest, overlapping=span)) == before + 1
            assert on_disk(chunk.ci_index)
        finally:
            m.stop()


def test_tls_custom_ca_skip_verify_and_untrusted(data_image, tmp_path):
    boot, blob, files = data_image
    with start_registry(tmp_path / "reg", tls=True) as reg:
        reg.push_blob(REPO, blob)
        with_ca = reg.nydusd_config(REPO, tmp_path / "c1")
        no_ca = reg.nydusd_config(REPO, tmp_path / "c2")
        del no_ca["device"]["backend"]["config"]["ca_file"]
        skip = reg.nydusd_config(REPO, tmp_path / "c3", skip_verify=True)
        del skip["device"]["backend"]["config"]["ca_file"]
        for name, c in (("ca", with_ca), ("skip", skip)):
            p = run_rafsfs_proc("cat", boot, "/small/f5", "--config", _write_config(tmp_path / f"{name}.json", c),
                                text=False, check=0)
            assert p.stdout == files["/small/f5"]
        p = run_rafsfs_proc("cat", boot, "/small/f5", "--config", _write_config(tmp_path / "no.json", no_ca))
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and "certificate verify failed" in lines[0] \
            and "ca_file" in lines[0], p.stderr


# ---------------------------------------------------------------------------------------------- rafsfs-nydusd
def _nydusd_mount(boot: Path, cfg: Path, mnt: Path, sock: Path, log: Path):
    """``rafsfs-nydusd fuse`` as nydus-snapshotter starts it; returns the process once the API says RUNNING."""
    import subprocess

    from test_api import _env, _nydusd, _wait

    from rafsfs.api import ApiClient

    mnt.mkdir(exist_ok=True)
    p = subprocess.Popen(_nydusd("fuse", "--config", cfg, "--bootstrap", boot, "--mountpoint", mnt, "--apisock", sock,
                                 "--log-file", log), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    _wait(lambda: sock.exists() or p.poll() is not None, what="the API socket")
    assert p.poll() is None, p.communicate()
    assert ApiClient(str(sock)).daemon_info()["state"] == "RUNNING"  # the query waits for the mount
    return p


def _nydusd_stop(p, mnt: Path) -> None:
    import signal
    import subprocess

    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        assert p.wait(30) == 0
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)])


@needs_fuse
def test_nydusd_reads_the_registry_and_a_dead_registry_is_eio_not_a_hang(data_image, tmp_path):
    """rafsfs-nydusd reports RUNNING before its registry source is built (that happens while the runtime sets the
    container up); reads then come from the registry.  With the registry gone the mount still comes up (the
    snapshotter waits for it), reads fail with EIO, and the log says why in one line."""
    boot, blob, files = data_image
    with start_registry(tmp_path / "reg") as reg:
        digest = reg.push_blob(REPO, blob)
        cfg = _write_config(tmp_path / "nydusd.json", reg.nydusd_config(REPO, tmp_path / "cache"))
        mnt, log = tmp_path / "mnt", tmp_path / "nydusd.log"
        p = _nydusd_mount(boot, cfg, mnt, tmp_path / "api.sock", log)
        try:
            for path, data in files.items():
                assert (mnt / path.lstrip("/")).read_bytes() == data
            assert reg.blob_gets(digest)
        finally:
            _nydusd_stop(p, mnt)
        # the snapshotter's shipped config prefetches whole blobs: started once the deferred source exists
        from rafsfs.api import ApiClient

        pf = dict(reg.nydusd_config(REPO, tmp_path / "cache-pf"),
                  fs_prefetch={"enable": True, "prefetch_all": True, "threads_count": 2})
        p = _nydusd_mount(boot, _write_config(tmp_path / "pf.json", pf), mnt, tmp_path / "api-pf.sock",
                          tmp_path / "pf.log")
        try:
            api = ApiClient(str(tmp_path / "api-pf.sock"))
            chunks = RafsImage.open(str(boot)).blobs[0].chunk_count
            deadline = time.monotonic() + 60
            while api.cache_metrics()["prefetched_chunks"] < chunks:  # nothing was read: all of it prefetched
                assert time.monotonic() < deadline, api.cache_metrics()
                time.sleep(0.2)
            assert api.cache_metrics()["misses"] == 0
        finally:
            _nydusd_stop(p, mnt)
        reg.kill()
        cfg2 = _write_config(tmp_path / "nydusd2.json", dict(reg.nydusd_config(REPO, tmp_path / "cache2")))
        log2 = tmp_path / "nydusd2.log"
        p = _nydusd_mount(boot, cfg2, mnt, tmp_path / "api2.sock", log2)
        try:
            t0 = time.monotonic()
            got, _ = _timed_read(mnt / "small" / "f3", 0, 4096, limit=60)
            assert got == errno.EIO
            assert time.monotonic() - t0 < 60
        finally:
            _nydusd_stop(p, mnt)
    errors = [line for line in log2.read_text().splitlines() if " ERROR " in line]
    assert errors and any("cannot read blob" in line for line in errors), log2.read_text()
    assert "Traceback" not in log2.read_text()


@needs_fuse
@pytest.mark.allow_log("cannot read blob", "chunk source")
def test_nydusd_first_read_with_a_hung_registry_fails_within_seconds(data_image, tmp_path):
    """H3/L3: the registry accepts connections and never answers (SIGSTOP).  With nydusd's defaults (no timeout
    keys in the config: 5 s, 5 s, no retries) the mount's blob probe gives up after a few seconds and the first read
    fails with EIO in about 10 s, not after the probe's and the read's full deadlines (~280 s before)."""
    boot, blob, files = data_image
    with start_registry(tmp_path / "reg") as reg:
        reg.push_blob(REPO, blob)
        cfg = _write_config(tmp_path / "nydusd.json", reg.nydusd_config(REPO, tmp_path / "cache"))
        mnt, log = tmp_path / "mnt", tmp_path / "nydusd.log"
        reg.pause()
        try:
            p = _nydusd_mount(boot, cfg, mnt, tmp_path / "api.sock", log)
            try:
                got, took = _timed_read(mnt / "small" / "f3", 0, 4096, limit=40)
                assert got == errno.EIO, got
                assert took < 20, took
                reg.resume()
                time.sleep(FAILURE_MEMORY)
                assert (mnt / "small" / "f3").read_bytes() == files["/small/f3"]  # the mount lives on
            finally:
                reg.resume()
                _nydusd_stop(p, mnt)
        finally:
            reg.resume()
    assert "Traceback" not in log.read_text()


# ---------------------------------------------------------------------------------------------- credentials (M6)
def _read_one(cfg: dict, img: RafsImage, path: str = "/sizes/size-4097") -> bytes:
    source = source_from_config(from_dict(cfg))
    try:
        ino = img.resolve(path)
        return img.read(ino, 0, 4097, source)
    finally:
        source.close()


@pytest.mark.allow_log("failed .*trying")
def test_origin_credentials_go_only_to_the_origin_and_its_realm(tricky_image, tricky_src, tmp_path):
    """M6: a token registry with credentials and a registry_token, and a mirror in front of it (the fault proxy)
    that challenges for Basic credentials, names its own token realm, or just passes the registry's challenge on:
    the mirror sees no Authorization header and its realm no credentials; every read falls back to the origin.
    With ``auth_through`` the mirror is trusted like the origin and serves the reads itself."""
    boot, blob = tricky_image
    img = RafsImage.open(str(boot))
    want = (tricky_src / "sizes/size-4097").read_bytes()
    with start_registry(tmp_path / "reg", auth="token") as reg, reg.fault_proxy() as px:
        ts = reg.token_server
        reg.push_blob(REPO, blob)
        for n, (fault, params) in enumerate((("challenge", {"header": 'Basic realm="mirror"'}),
                                             ("challenge", {"header": f'Bearer realm="{px.url}/token",service="m"',
                                                            "path": "/"}),
                                             (None, {}))):
            px.clear()
            if fault:
                px.set(fault, **params)
            cfg = reg.nydusd_config(REPO, tmp_path / f"cache{n}", cache="none", registry_token="pre-issued",
                                    mirrors=[{"host": px.url}])
            assert _read_one(cfg, img) == want
        assert px.records, "the mirror was never asked"
        assert all(r["authorization"] is None for r in px.records), [r for r in px.records if r["authorization"]]
        assert any(r["path"].startswith("/token") for r in px.records)  # the mirror's realm was asked, anonymously
        assert {h["user"] for h in ts.hits} <= {USER, None}  # the real realm: credentials from the origin only

        # auth_through: the mirror is asked with the origin's credentials and serves the read
        px.clear()
        before = len(px.records)
        cfg = reg.nydusd_config(REPO, tmp_path / "cache-through", cache="none",
                                mirrors=[{"host": px.url, "auth_through": True}])
        assert _read_one(cfg, img) == want
        gets = [r for r in px.records[before:] if r["method"] == "GET" and "/blobs/" in r["path"]]
        assert gets and gets[-1]["authorization"].startswith("Bearer ")


def test_no_credentials_to_a_plain_http_realm_of_an_https_registry(tricky_image, tmp_path):
    """M6: an HTTPS registry whose token realm is plain HTTP: the credentials are not sent; one-line error."""
    boot, blob = tricky_image
    with start_registry(tmp_path / "reg", auth="token", tls=True) as reg:
        reg.push_blob(REPO, blob)
        cfg = _write_config(tmp_path / "c.json", reg.nydusd_config(REPO, tmp_path / "cache"))
        p = run_rafsfs_proc("cat", boot, "/sizes/size-4097", "--config", cfg)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and "plain-HTTP token realm" in lines[0], p.stderr
        assert reg.token_server.hits == []
