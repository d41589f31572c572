"""Shared fixtures and the "no unexpected log records" check.

* ``shared_dir`` / ``nydus_fixture``: the project's shared/ folder (``RAFSFS_SHARED`` overrides) and the real Nydus
  fixture in it.
* ``run_rafsfs(*args, check=None, input=None, timeout=...)``: runs ``python -m rafsfs.cli ARGS`` and returns the
  CompletedProcess (text mode); ``check=0`` asserts the exit code and shows stderr when it differs.
* ``tricky_src``: a session-wide tree made by :func:`treeutil.make_tricky_tree` (read-only for tests).
* The s3ql habit: a test fails if any logger under ``rafsfs``, ``fuse_backend`` or ``fscache_backend`` emitted a
  WARNING or worse, unless the test says it expects it with ``@pytest.mark.allow_log("regex", ...)`` (no argument:
  any message is allowed).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))  # so test modules can `import treeutil`

import treeutil  # noqa: E402

WATCHED_LOGGERS = ("rafsfs", "fuse_backend", "fscache_backend")

# CI runs the same hypothesis examples every time (a red CI is reproducible); developers explore new ones
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_log(*patterns): the test expects WARNING/ERROR records from rafsfs "
                                       "loggers whose message matches one of the regexes (none given: any)")
    config.addinivalue_line("markers", "needs_root: the test needs root (mounts, mknod, trusted.* xattrs)")
    config.addinivalue_line("markers", "slow: long-running tests (still run in CI)")


# ---------------------------------------------------------------------------- paths
def _shared() -> Path:
    env = os.environ.get("RAFSFS_SHARED")
    return Path(env) if env else REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    p = _shared()
    if not p.is_dir():
        pytest.fail(f"shared folder {p} not found (set RAFSFS_SHARED)")
    return p


@pytest.fixture(scope="session")
def nydus_fixture(shared_dir) -> Path:
    """The folder holding rafs-v6-2.2.boot and its one blob."""
    p = shared_dir / "fixtures" / "nydus-v6-2.2"
    if not (p / "rafs-v6-2.2.boot").is_file():
        pytest.fail(f"Nydus fixture missing in {p}")
    return p


# ---------------------------------------------------------------------------- running the CLI
def rafsfs_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "rafsfs.cli", *map(str, args)]


def run_rafsfs_proc(*args, check: int | None = None, input: bytes | str | None = None,
                    timeout: float = 600, text: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    kw = {"encoding": "utf-8", "errors": "replace"} if text else {}
    p = subprocess.run(rafsfs_cmd(*args), capture_output=True, input=input, timeout=timeout, env=env, cwd=REPO,
                       **kw)
    if check is not None and p.returncode != check:
        raise AssertionError(f"rafsfs {' '.join(map(str, args))} exited {p.returncode} (expected {check})\n"
                             f"--- stdout ---\n{p.stdout[-4000:]}\n--- stderr ---\n{p.stderr[-4000:]}")
    return p


@pytest.fixture
def run_rafsfs():
    return run_rafsfs_proc


# ---------------------------------------------------------------------------- trees
@pytest.fixture(scope="session")
def tricky_src(tmp_path_factory) -> Path:
    """The full tricky tree (built once per session; tests must not modify it)."""
    root = tmp_path_factory.mktemp("tricky") / "src"
    treeutil.make_tricky_tree(root)
    return root


@pytest.fixture(scope="session")
def rootfs() -> Path:
    """The small real Debian rootfs (tests/rootfs_cache.py), made once per machine; read-only for tests."""
    from rootfs_cache import ensure_test_rootfs

    try:
        return ensure_test_rootfs()
    except Exception as e:  # debootstrap needs the Debian mirror: say so in one line
        pytest.fail(f"cannot make the Debian test rootfs: {e}", pytrace=False)


needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="FUSE mounts need root and /dev/fuse")


def is_mounted(path) -> bool:
    """Something is mounted at ``path`` (mountinfo: no stat() that a hung FUSE daemon could block)."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


@pytest.fixture(scope="session")
def have_root() -> bool:
    return os.geteuid() == 0


def _dmesg_tail() -> str:
    p = subprocess.run(["dmesg"], capture_output=True, text=True)
    return "\n".join(p.stdout.splitlines()[-5:])


def kernel_has_erofs() -> bool:
    if shutil.which("modprobe"):
        subprocess.run(["modprobe", "erofs"], capture_output=True)
    try:
        return any(line.split()[-1] == "erofs" for line in open("/proc/filesystems"))
    except OSError:
        return False


@contextlib.contextmanager
def erofs_mount(image, mountpoint, devices=()):
    """Mount an EROFS / RAFS v6 image read-only with the kernel, ``devices`` bound to its device slots in order.

    A file-backed mount (mount(2) on the image file itself, Linux >= 6.12; device= paths may then be regular files);
    on kernels without file-backed EROFS (ENOTBLK), loop devices for the image and every device.  Skips only when
    mounting is impossible here (not root, no EROFS in the kernel); a mount the kernel refuses fails the test.
    """
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    if not kernel_has_erofs():
        pytest.skip("the kernel has no EROFS")
    from rafsfs import sysmount

    mnt = Path(mountpoint)
    mnt.mkdir(parents=True, exist_ok=True)
    loops: list[str] = []
    try:
        sysmount.mount_erofs(str(image), str(mnt), [str(d) for d in devices])
    except OSError as e:
        if e.errno != errno.ENOTBLK:
            pytest.fail(f"the kernel refuses to mount {image}: {e}\n{_dmesg_tail()}", pytrace=False)
        try:
            for f in [image, *devices]:
                loops.append(subprocess.run(["losetup", "--find", "--show", "--read-only", str(f)], check=True,
                                            capture_output=True, text=True).stdout.strip())
            opts = ",".join(["ro"] + [f"device={d}" for d in loops[1:]])
            subprocess.run(["mount", "-t", "erofs", "-o", opts, loops[0], str(mnt)], check=True,
                           capture_output=True, text=True)
        except subprocess.CalledProcessError as e2:
            for lo in loops:
                subprocess.run(["losetup", "-d", lo], capture_output=True)
            pytest.fail(f"cannot mount {image} via loop devices: {e2.stderr}\n{_dmesg_tail()}", pytrace=False)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        for lo in loops:
            subprocess.run(["losetup", "-d", lo], capture_output=True)


def which_or_skip(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


# ---------------------------------------------------------------------------- log check (s3ql's habit)
class _Collector(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        if record.name.split(".", 1)[0] in WATCHED_LOGGERS:
            self.records.append(record)


@pytest.fixture(autouse=True)
def check_logs(request):
    handler = _Collector()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
    marker = request.node.get_closest_marker("allow_log")
    patterns = [re.compile(p) for p in marker.args] if marker else []
    bad = []
    for r in handler.records:
        msg = r.getMessage()
        if marker and (not patterns or any(p.search(msg) for p in patterns)):
            continue
        bad.append(f"{r.levelname} {r.name}: {msg}")
    if bad:
        pytest.fail("unexpected log records (declare them with @pytest.mark.allow_log):\n  " + "\n  ".join(bad[:20]),
                    pytrace=False)
