"""The mount session (rafsfs/daemon.py) with a mode that is neither FUSE nor a kernel mode: what a new mode gets,
when, and what is left after it returns or fails.  No mount is made, so this runs anywhere, fast."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rafsfs.api import ApiClient
from rafsfs.config import load_config
from rafsfs.daemon import MountError, MountSession, MountSpec, ServedMount, parse_prefetch_list
from rafsfs.errors import RafsError

FILES = {"/a.bin": 300_000, "/sub/b.bin": 100_000}


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from rafsfs.builder import BuildOptions, build

    d = tmp_path_factory.mktemp("session")
    src = d / "src"
    rnd = __import__("random").Random(3)
    for name, size in FILES.items():
        (src / name[1:]).parent.mkdir(parents=True, exist_ok=True)
        (src / name[1:]).write_bytes(rnd.randbytes(size))
    build(BuildOptions(source=str(src), bootstrap=str(d / "img.boot"), blob_dir=str(d / "blobs"),
                       chunk_size=64 << 10))
    return d, src


def _config(d: Path, work: Path, **prefetch) -> Path:
    cfg = {"device": {"backend": {"type": "localfs", "config": {"dir": str(d / "blobs")}},
                      "cache": {"type": "blobcache", "config": {"work_dir": str(work / "cache")}}}}
    if prefetch:
        cfg["fs_prefetch"] = prefetch
    p = work / "cfg.json"
    p.write_text(json.dumps(cfg))
    return p


class ProbeRunner:
    """A mode that mounts nothing: it records what it is given and reads through the session's source."""

    name = "probe"
    source_before_mount = False

    def __init__(self, sock: Path, fail: bool = False):
        self.sock, self.fail = sock, fail
        self.preflighted: list[str] = []
        self.seen: dict = {}

    def preflight(self, mountpoint: str) -> None:
        self.preflighted.append(mountpoint)
        assert not self.sock.exists()  # preflight comes before anything is served

    def run(self, m: ServedMount) -> None:
        api = ApiClient(str(self.sock))
        self.seen["before_ready"] = api.daemon_info()["state"]
        m.ready()
        info = api.daemon_info()
        self.seen["after_ready"] = info["state"]
        self.seen["collection"] = info["backend_collection"]
        self.seen["is_local"] = m.is_local
        ino = m.image.resolve("/sub/b.bin")
        self.seen["bytes"] = m.image.read(ino, 0, ino.size, m.source)
        self.seen["metrics"] = api.cache_metrics()
        if self.fail:
            raise RafsError("the mode failed")


def test_a_mode_plugs_in_with_a_runner(image, tmp_path):
    d, src = image
    sock = tmp_path / "api.sock"
    (tmp_path / "mnt").mkdir()
    (tmp_path / "list").write_text("# prefetch\n/a.bin\n\n")
    runner = ProbeRunner(sock)
    spec = MountSpec(bootstrap=str(d / "img.boot"), mountpoint=str(tmp_path / "mnt"),
                     config=load_config(str(_config(d, tmp_path))), apisock=str(sock),
                     prefetch=str(tmp_path / "list"), pid_file=str(tmp_path / "pid"))
    with MountSession(spec, runner) as session:
        assert (tmp_path / "pid").read_text() == f"{os.getpid()}\n"
        session.serve()
        prefetchers = list(session._prefetchers)
        for p in prefetchers:
            assert p.join(30)
    assert runner.preflighted == [str(tmp_path / "mnt")]
    assert runner.seen["before_ready"] == "INIT" and runner.seen["after_ready"] == "RUNNING"
    assert list(runner.seen["collection"]) == [str(tmp_path / "mnt")]
    assert runner.seen["collection"][str(tmp_path / "mnt")]["mode"] == "probe"
    assert runner.seen["is_local"] is True
    assert runner.seen["bytes"] == (src / "sub" / "b.bin").read_bytes()
    m = runner.seen["metrics"]
    assert m["bytes_served"] >= 100_000 and m["store_path"] == str(tmp_path / "cache")
    # teardown: the API is gone, the source and the image are closed
    assert not sock.exists()
    assert session.source is None and session.image is None and session.api is None
    # --prefetch-files fetched /a.bin into the cache (5 chunks of 64 KiB), behind the read
    assert len(prefetchers) == 1 and prefetchers[0].plan.paths == ["/a.bin"]
    assert prefetchers[0].done_chunks == 5 and prefetchers[0].failed_chunks == 0


def test_a_failing_mode_leaves_nothing_behind(image, tmp_path):
    d, _ = image
    sock = tmp_path / "api.sock"
    (tmp_path / "mnt").mkdir()
    spec = MountSpec(bootstrap=str(d / "img.boot"), mountpoint=str(tmp_path / "mnt"),
                     config=load_config(str(_config(d, tmp_path, enable=True, prefetch_all=True))),
                     apisock=str(sock))
    runner = ProbeRunner(sock, fail=True)
    with pytest.raises(RafsError, match="the mode failed"):
        with MountSession(spec, runner) as session:
            session.serve()
    assert runner.seen["bytes"]  # it ran
    assert not sock.exists() and session.source is None and session.image is None


@pytest.mark.parametrize("case", ["bad-image", "relative-prefetch", "missing-blob"])
def test_setup_failures_are_one_error_and_nothing_is_left(image, tmp_path, case):
    d, _ = image
    sock = tmp_path / "api.sock"
    (tmp_path / "mnt").mkdir()
    boot, prefetch, cfg = str(d / "img.boot"), None, load_config(str(_config(d, tmp_path)))
    if case == "bad-image":
        (tmp_path / "junk").write_bytes(b"\0" * 8192)
        boot = str(tmp_path / "junk")
    elif case == "relative-prefetch":
        prefetch = "etc/passwd"
    else:
        cfg.backend.blob_dir = str(tmp_path)  # no blobs here
    runner = ProbeRunner(sock)
    with pytest.raises(RafsError) as e:
        with MountSession(MountSpec(bootstrap=boot, mountpoint=str(tmp_path / "mnt"), config=cfg,
                                    apisock=str(sock), prefetch=prefetch), runner) as session:
            session.serve()
    assert "\n" not in str(e.value)
    assert not sock.exists() and not runner.seen  # the runner never ran


def test_prefetch_list_parser(tmp_path):
    f = tmp_path / "list"
    f.write_text("# comment\n/a\n\n  /b/c  \n")
    assert parse_prefetch_list(str(f)) == ["/a", "/b/c"]
    assert parse_prefetch_list("/x,/y /z") == ["/x", "/y", "/z"]  # nydusd's inline form
    assert parse_prefetch_list(None) == [] and parse_prefetch_list("") == []
    f.write_text("/a\nrelative\n")
    with pytest.raises(MountError, match=r"line 2: 'relative' is not an absolute path"):
        parse_prefetch_list(str(f))
    with pytest.raises(MountError, match="neither a file nor an absolute path"):
        parse_prefetch_list("no-such-list.txt")


def test_prefetch_threads_beyond_what_is_used_are_said(image, tmp_path, caplog):
    """L8: fs_prefetch.threads_count above what the prefetcher uses was clamped silently."""
    import logging

    d, _ = image
    sock = tmp_path / "api.sock"
    (tmp_path / "mnt").mkdir()
    caplog.set_level(logging.INFO, logger="rafsfs.daemon")
    spec = MountSpec(bootstrap=str(d / "img.boot"), mountpoint=str(tmp_path / "mnt"), apisock=str(sock),
                     config=load_config(str(_config(d, tmp_path, enable=True, prefetch_all=True, threads_count=8))))
    with MountSession(spec, ProbeRunner(sock)) as session:
        session.serve()
    assert "prefetch: 8 threads configured, 4 used" in caplog.text
