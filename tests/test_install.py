"""The installer's choices that can be checked without installing anything."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def test_debian13_source_is_the_systems_own_mirror():
    """.ci/install_containers fetches the Debian 13 .debs from the mirror this machine's apt sources use (the rule
    bench/rootfs.py follows for debootstrap), not from a host written into the script."""
    sys.path.insert(0, str(REPO))
    from bench.rootfs import find_debian_mirror

    with open("/etc/os-release") as f:
        codename = dict(ln.rstrip("\n").split("=", 1) for ln in f if "=" in ln).get("VERSION_CODENAME", "bookworm")
    script = REPO / ".ci" / "install_containers"
    assert "deb.debian.org" not in script.read_text()
    p = subprocess.run(["bash", str(script)], env=dict(os.environ, RAFSFS_CI_PRINT_SOURCE="1"), cwd="/",
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    mirror = find_debian_mirror(codename.strip('"'))
    assert p.stdout == (f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror} trixie main\n")
