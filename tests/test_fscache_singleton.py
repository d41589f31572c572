"""``rafsfs-nydusd singleton``: nydusd's shared fscache daemon under the real nydus-snapshotter, in the test VM.

The host builds what the guest needs and boots the VM ONCE (``../shared/vm/run-in-vm.sh``) to run
tests/vm/guest_singleton.py inside; every guest test is reported as one test here, with the guest's failure text.

* local images (a small tree, zstd) for the API-level tests: the singleton started by hand, images bound with
  ``PUT /api/v2/blobs`` and mounted with ``mount -t erofs -o fsid=``, as the snapshotter does;
* a busybox-based OCI image (the host's static busybox, plus a layer with one 32 MiB file) in a real
  ``docker-registry``, converted with ``rafsfs convert``; the guest reaches it through a relay whose pace the guest
  sets (tests/containerd_env.ThrottleProxy) and runs containerd + nydus-snapshotter (Debian 13's) with
  ``--fs-driver fscache --daemon-mode shared --nydusd rafsfs-nydusd``.

Nothing is skipped: a host without qemu, the shared VM or the container tools fails (CI installs them).
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import REPO, run_rafsfs_proc
from containerd_env import (CI_CACHE, Registry, ThrottleProxy, busybox_layer_tar, guest_test_names, push_oci_image,
                            run_guest_pytest)
from treeutil import make_small_tree, snapshot_tree

from rafsfs.image import RafsImage

GUEST_FILE = REPO / "tests" / "vm" / "guest_singleton.py"
VM_TIMEOUT = 900  # the whole guest session; its budget is 8 minutes on two emulated cores
BIG_MIB = 32
TOOLS = ("containerd", "runc", "ctr", "ctr-remote", "containerd-nydus-grpc", "docker-registry")
pytestmark = pytest.mark.slow


def _build(src: Path, boot: Path, blobs: Path) -> str:
    run_rafsfs_proc("build", src, "--bootstrap", boot, "--blob-dir", blobs, "--compressor", "zstd",
                    "--chunk-size", "64K", check=0)
    with RafsImage.open(str(boot)) as img:
        return img.blobs[0].blob_id


def _big_layer(dst: Path, data: bytes) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        d = tarfile.TarInfo("data")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 0
        t.addfile(d)
        f = tarfile.TarInfo("data/big.bin")
        f.size, f.mode, f.mtime = len(data), 0o644, 0
        t.addfile(f, io.BytesIO(data))
    dst.write_bytes(buf.getvalue())
    return dst


@pytest.fixture(scope="module")
def vm_results(tmp_path_factory, shared_dir):
    import pickle

    run_in_vm = shared_dir / "vm" / "run-in-vm.sh"
    assert run_in_vm.is_file(), f"{run_in_vm} is missing"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    assert not missing, f"not installed: {missing} (.ci/install installs them)"
    assert os.path.isfile("/bin/busybox"), "no static busybox: apt-get install busybox-static (.ci/install)"
    work = tmp_path_factory.mktemp("singleton-vm")

    # local images for the API-level tests
    small = work / "small"
    make_small_tree(small)
    (small / "more.bin").write_bytes(random.Random(6).randbytes(300_000))
    blobs = work / "blobs"
    blob_id = _build(small, work / "small.boot", blobs)
    shutil.copytree(blobs, work / "blobs2")  # the same blob behind another backend
    with open(work / "small.pickle", "wb") as f:
        pickle.dump(snapshot_tree(small), f)
    with RafsImage.open(str(work / "small.boot")) as img:
        chunks = img.blobs[0].chunk_count

    # the container image: busybox + one big file, converted to a Nydus image in a real registry
    big = random.Random(32).randbytes(BIG_MIB << 20)
    reg = Registry(work / "registry")
    proxy = None
    try:
        layers = [busybox_layer_tar(shared_dir, work / "busybox.tar"), _big_layer(work / "big.tar", big)]
        oci = push_oci_image(reg, "vmtest/busybox", "oci", layers, CI_CACHE / "layers")
        run_rafsfs_proc("convert", oci, f"{reg.host}/vmtest/busybox:nydus", "--log-level", "warning", check=0,
                        timeout=600)
        manifest = reg.get_manifest("vmtest/busybox", "nydus")
        data_layers = [x for x in manifest["layers"]
                       if x["mediaType"] == "application/vnd.oci.image.layer.nydus.blob.v1"]
        big_blob = max(data_layers, key=lambda x: x["size"])["digest"].split(":", 1)[1]
        proxy = ThrottleProxy(reg.port, work / "throttle")
        # the daemon's byte code, compiled once here: the guest's Python would compile it at every start
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "rafsfs"), str(REPO / "fscache_backend")],
                       check=False, capture_output=True, env=dict(os.environ, PYTHONDONTWRITEBYTECODE=""))
        params = {
            "blob_dir": str(blobs), "blob_dir2": str(work / "blobs2"), "small": str(work / "small.boot"),
            "small_snapshot": str(work / "small.pickle"), "small_blob": blob_id, "small_chunks": chunks,
            "image": f"10.0.2.100:{proxy.port}/vmtest/busybox:nydus", "throttle": str(work / "throttle"),
            "busybox_sha256": hashlib.sha256(Path("/bin/busybox").read_bytes()).hexdigest(),
            "big_sha256": hashlib.sha256(big).hexdigest(), "big_blob": big_blob, "notes": str(work / "notes.jsonl"),
        }
        results, output, seconds = run_guest_pytest(run_in_vm, GUEST_FILE, work, params, [proxy.port], VM_TIMEOUT)
    finally:
        if proxy is not None:
            proxy.close()
        reg.close()
    notes = (work / "notes.jsonl").read_text() if (work / "notes.jsonl").exists() else ""
    output += f"\n--- measured in the guest ---\n{notes}"
    print(output)
    if not results:
        pytest.fail(f"the VM produced no test report\n{output}", pytrace=False)
    return results, output, seconds


@pytest.mark.parametrize("name", guest_test_names(GUEST_FILE))
def test_in_vm(vm_results, name):
    results, output, _ = vm_results
    if name not in results:
        pytest.fail(f"guest test {name} did not run\n{output}", pytrace=False)
    status, text = results[name]
    if status != "passed":  # skipped counts as a failure: these tests must run in the VM
        pytest.fail(f"guest test {name} {status}:\n{text[-6000:]}", pytrace=False)


def test_vm_session_within_budget(vm_results):
    """The whole VM session (boot included) stays within its CI budget: 8 minutes on two emulated cores."""
    _, output, seconds = vm_results
    assert seconds < 480, f"the singleton VM session took {seconds:.0f} s\n{output[-3000:]}"


# ------------------------------------------------------------------------------------------------ on the host
def test_singleton_without_ondemand_cachefiles_is_one_line(tmp_path):
    """This host's kernel has no on-demand cachefiles: the singleton's API comes up, then the bind fails in one line
    and exit status 1, naming the reason (the snapshotter logs it)."""
    from fscache_backend.device import probe

    ok, why = probe()
    if ok:
        pytest.skip(f"this kernel supports fscache mode ({why})")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "rafsfs.nydusd", "singleton", "--fscache", str(tmp_path / "cache"),
                        "--apisock", str(tmp_path / "sock" / "api.sock"), "--log-level", "info",
                        "--log-rotation-size", "100", "--fscache-threads", "4"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if "ERROR" in ln or "error:" in ln]
    assert errors and all("cachefiles" in ln for ln in errors), p.stderr
    assert not (tmp_path / "sock" / "api.sock").exists()  # the socket goes with the daemon


@pytest.mark.parametrize("args, words", [
    (["--apisock", "A"], "--fscache DIR"),
    (["--fscache", "D"], "--apisock"),
    (["--fscache", "D", "--apisock", "A", "--fscache-threads", "lots"], "--fscache-threads"),
])
def test_singleton_bad_arguments_are_one_line(tmp_path, args, words):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    args = [str(tmp_path / a) if a in ("A", "D") else a for a in args]
    p = subprocess.run([sys.executable, "-m", "rafsfs.nydusd", "singleton", *args], capture_output=True, text=True,
                       env=env, timeout=60)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and words in lines[0], p.stderr


def test_put_bodies_the_daemon_cannot_use_are_refused_in_one_line(tmp_path):
    """PUT /api/v2/blobs bodies are checked before anything reaches the daemon: nydusd's error shape (code
    UNDEFINED), a 4xx for a malformed body, the reason in one line."""
    from fscache_backend.singleton import Front, settings_for

    from rafsfs.api.model import ApiError

    front = Front(settings_for(str(tmp_path / "cache"), str(tmp_path / "api.sock"), None, None))
    boot = tmp_path / "image.boot"
    boot.write_bytes(b"\0" * 8192)
    cases = [
        ([1, 2], 400, "JSON object"),
        ({"type": "datablob", "id": "x", "config": {}}, 400, "only 'bootstrap'"),
        ({"type": "bootstrap", "id": "x"}, 400, "'config' must be an object"),
        ({"type": "bootstrap", "config": {"metadata_path": str(boot)}}, 400, "'id' is missing"),
        ({"type": "bootstrap", "id": "x", "config": {}}, 400, "metadata_path"),
        ({"type": "bootstrap", "id": "x", "config": {"metadata_path": str(tmp_path / "nope")}}, 500, "no such file"),
        ({"type": "bootstrap", "id": "../x", "config": {"metadata_path": str(boot)}}, 400, "letters, digits"),
    ]
    for body, status, words in cases:
        with pytest.raises(ApiError) as e:
            front.put_blobs({}, body)
        assert e.value.status == status and e.value.code == "UNDEFINED" and words in str(e.value), (body, e.value)
        assert "\n" not in str(e.value)
    with pytest.raises(ApiError) as e:
        front.delete_blobs({}, None)
    assert e.value.status == 400 and "domain_id or blob_id" in str(e.value)


def test_images_share_a_blob_in_a_domain_only_when_chunk_table_and_backend_agree(tmp_path):
    """The kernel keeps one cache object per (domain, blob id), filled through whichever image names the blob: a
    second image may join only with the same chunk table and the same backend (else its bytes would be served as
    the first one's, or the reverse)."""
    from fscache_backend.errors import FscacheError
    from fscache_backend.mounts import MountTable
    from fscache_backend.served import close_served, open_served
    from fscache_backend.settings import Settings
    from fscache_backend.state import MountRecord

    src = tmp_path / "src"
    make_small_tree(src)
    blobs = tmp_path / "blobs"
    blob_id = _build(src, tmp_path / "a.boot", blobs)
    shutil.copytree(blobs, tmp_path / "blobs2")
    table = MountTable(Settings(cache_dir=str(tmp_path), run_dir=str(tmp_path / "run"), domain_id="d",
                                singleton=True), None, set)

    def served(fsid: str, blob_dir: Path, domain: str = "d"):
        return open_served(MountRecord(fsid=fsid, domain_id=domain, bootstrap=str(tmp_path / "a.boot"),
                                       mountpoint="", blob_dir=str(blob_dir), bound=True))

    first = served("one", blobs)
    table.mounts["one"] = first
    try:
        same = served("two", blobs)
        table.check_sharing(same)  # same table, same backend: shared
        close_served(same)
        other = served("three", tmp_path / "blobs2")
        with pytest.raises(FscacheError, match=f"blob {blob_id} is already served in domain d"):
            table.check_sharing(other)
        other.rec.domain_id = "elsewhere"  # its own domain: its own cache object
        table.check_sharing(other)
        close_served(other)
    finally:
        table.close_all()


def test_fscache_mode_options_it_cannot_honour_are_one_line(tmp_path):
    """L5: fscache mode refuses --apisock in one line (whatever the kernel: before the probe) and takes
    --prefetch-files, whose paths are checked before any daemon starts (relative paths and paths the image
    lacks)."""
    from fscache_backend import service
    from fscache_backend.errors import FscacheError

    from rafsfs.commands.mount import PROBES, MountRequest
    from rafsfs.errors import RafsError

    problem, _ = PROBES["fscache"](MountRequest(cache_dir=None, options=("--prefetch-files", "--apisock")))
    assert problem == "fscache mode does not take --apisock"
    src = tmp_path / "src"
    make_small_tree(src)
    _build(src, tmp_path / "a.boot", tmp_path / "blobs")
    (tmp_path / "mnt").mkdir()
    with pytest.raises(FscacheError, match="not an absolute path"):
        service.mount_request(str(tmp_path / "a.boot"), str(tmp_path / "mnt"), str(tmp_path / "blobs"), [], None,
                              ["dir/more.bin"])
    req = service.mount_request(str(tmp_path / "a.boot"), str(tmp_path / "mnt"), str(tmp_path / "blobs"), [], None,
                                ["/no/such/file"])
    with pytest.raises(RafsError, match="no/such/file|such"):
        service.preflight(req)
    service.preflight(service.mount_request(str(tmp_path / "a.boot"), str(tmp_path / "mnt"), str(tmp_path / "blobs"),
                                            [], None, ["/"]))
