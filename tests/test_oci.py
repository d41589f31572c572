"""Registry images end to end against a real docker-registry: a three-layer OCI image (whiteouts, an opaque
directory, replaced files and directories, hard links) pushed as-is, `rafsfs convert` to a Nydus RAFS v6 image,
the pushed manifest checked field by field, `rafsfs pull`, and `rafsfs mount REF` through FUSE (only the bootstrap
layer fetched at mount time; the mounted tree equals the hand-written merged tree)."""
from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import requests

import oci_layers
import treeutil
from conftest import run_rafsfs_proc
from rafsfs.image import RafsImage
from rafsfs.oci.reference import BadReference, parse_reference
from registry_env import PASSWORD, USER, start_registry
from test_fuse import FuseMount

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"
TAR_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"


# ---------------------------------------------------------------------------------------------- helpers
def push_oci_image(reg, repo: str, tag: str, layers: list[list[oci_layers.E]], arch: str = "amd64") -> dict:
    """Push an ordinary OCI image (gzip layers, config with history) the way any registry client would."""
    descs, diff_ids = [], []
    for entries in layers:
        raw = oci_layers.layer_tar(entries)
        gz = gzip.compress(raw, mtime=0)
        descs.append({"mediaType": TAR_GZ, "digest": "sha256:" + reg.push_blob(repo, gz), "size": len(gz)})
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
    config = json.dumps({"architecture": arch, "os": "linux", "config": {"Cmd": ["/bin/sh"], "Env": ["A=1"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids},
                         "history": [{"created_by": f"layer {i}"} for i in range(len(layers))]}).encode()
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": "sha256:" + reg.push_blob(repo, config), "size": len(config)},
                "layers": descs}
    put_manifest(reg, repo, tag, manifest, OCI_MANIFEST)
    return manifest


def put_manifest(reg, repo: str, tag: str, obj: dict, media_type: str) -> str:
    raw = json.dumps(obj).encode()
    with reg._admin_session(repo) as s:
        r = s.put(f"{reg.url}/v2/{repo}/manifests/{tag}", data=raw, headers={"Content-Type": media_type})
    assert r.status_code == 201, r.text
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def get(reg, repo: str, what: str, accept: str = OCI_MANIFEST) -> requests.Response:
    with reg._admin_session(repo) as s:
        r = s.get(f"{reg.url}/v2/{repo}/{what}", headers={"Accept": accept})
    assert r.status_code == 200, r.text
    return r


@pytest.fixture(scope="module")
def expected(tmp_path_factory) -> Path:
    return oci_layers.expected_tree(tmp_path_factory)


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    with start_registry(tmp_path_factory.mktemp("oci-registry")) as r:
        yield r


@pytest.fixture(scope="module")
def converted(reg):
    """The source image pushed, converted once; returns (source ref, nydus ref, convert output)."""
    push_oci_image(reg, "src/app", "1.0", oci_layers.LAYERS)
    src, dst = f"{reg.host}/src/app:1.0", f"{reg.host}/nydus/app:1.0"
    p = run_rafsfs_proc("convert", src, dst, check=0)
    return src, dst, p


# ---------------------------------------------------------------------------------------------- references
@pytest.mark.parametrize("text, registry, repo, tag, scheme", [
    ("debian", "docker.io", "library/debian", "latest", "https"),
    ("user/app:1.2", "docker.io", "user/app", "1.2", "https"),
    ("localhost:5000/a/b", "localhost:5000", "a/b", "latest", "http"),
    ("127.0.0.1:5000/a:v1", "127.0.0.1:5000", "a", "v1", "http"),
    ("ghcr.io/o/r:t", "ghcr.io", "o/r", "t", "https"),
    ("[::1]:5000/x", "[::1]:5000", "x", "latest", "http"),
])
def test_reference_parsing(text, registry, repo, tag, scheme):
    r = parse_reference(text)
    assert (r.registry, r.repository, r.tag, r.scheme) == (registry, repo, tag, scheme)


def test_reference_options_and_errors():
    assert parse_reference("reg.example:443/a", plain_http=True).scheme == "http"
    r = parse_reference("reg.example/a", insecure=True)
    assert r.scheme == "https" and r.skip_verify
    d = "sha256:" + "ab" * 32
    r = parse_reference(f"reg.example/a@{d}")
    assert r.digest == d and r.tag is None and r.object == d
    assert parse_reference("docker.io/library/x").host == "registry-1.docker.io"
    for bad in ("", "UPPER/case", "a b", "http://reg/x", "reg.example/a@sha256:12", "a:bad/tag", "reg/a:"):
        with pytest.raises(BadReference):
            parse_reference(bad)


# ---------------------------------------------------------------------------------------------- convert
def test_convert_pushes_the_nydus_image_shape(reg, converted):
    src, dst, p = converted
    assert "converted" in p.stdout and "2 blobs" in p.stdout
    man = get(reg, "nydus/app", "manifests/1.0").json()
    assert man["mediaType"] == OCI_MANIFEST and man["schemaVersion"] == 2
    *blobs, boot = man["layers"]
    # one blob per source layer with file data (layer 1 has only whiteouts and a chmod), then the bootstrap
    assert len(blobs) == 2
    for b in blobs:
        assert b["mediaType"] == NYDUS_BLOB
        assert b["annotations"] == {"containerd.io/snapshot/nydus-blob": "true"}
        data = get(reg, "nydus/app", f"blobs/{b['digest']}").content
        assert "sha256:" + hashlib.sha256(data).hexdigest() == b["digest"] and len(data) == b["size"]
    assert boot["mediaType"] == TAR_GZ
    tar_gz = get(reg, "nydus/app", f"blobs/{boot['digest']}").content
    raw = gzip.decompress(tar_gz)
    assert boot["annotations"] == {"containerd.io/snapshot/nydus-bootstrap": "true",
                                   "containerd.io/snapshot/nydus-fs-version": "6",
                                   "containerd.io/uncompressed": "sha256:" + hashlib.sha256(raw).hexdigest()}
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        assert "image/image.boot" in tf.getnames()
        bootstrap = tf.extractfile("image/image.boot").read()
    assert bootstrap[1024:1028] == bytes.fromhex("e2e1f5e0")  # the RAFS v6 / EROFS magic
    image = RafsImage(bootstrap)
    assert ["sha256:" + b.blob_id for b in image.blobs] == [b["digest"] for b in blobs]
    # the config: the source's, with diff_ids = blobs + bootstrap tar, history dropped
    cfg = get(reg, "nydus/app", f"blobs/{man['config']['digest']}").json()
    assert man["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": [b["digest"] for b in blobs]
                             + [boot["annotations"]["containerd.io/uncompressed"]]}
    assert cfg["config"]["Cmd"] == ["/bin/sh"] and "history" not in cfg


def test_convert_twice_uploads_nothing_new(reg, converted):
    src, dst, _ = converted
    p = run_rafsfs_proc("convert", src, f"{reg.host}/nydus/app:again", check=0)
    assert "0 uploaded" in p.stdout  # blob ids are content hashes: the same layers give the same blobs
    a = get(reg, "nydus/app", "manifests/1.0").content
    b = get(reg, "nydus/app", "manifests/again").content
    assert a == b


def test_convert_picks_the_platform_from_an_index(reg, tmp_path):
    amd = push_oci_image(reg, "src/multi", "amd64-only", oci_layers.LAYERS)
    arm = push_oci_image(reg, "src/multi", "arm64-only", [[oci_layers.E("only-on-arm", data=b"arm\n")]], "arm64")
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "size": len(json.dumps(m).encode()),
         "digest": "sha256:" + hashlib.sha256(json.dumps(m).encode()).hexdigest(),
         "platform": {"os": "linux", "architecture": a}} for m, a in ((amd, "amd64"), (arm, "arm64"))]}
    put_manifest(reg, "src/multi", "latest", index, OCI_INDEX)
    run_rafsfs_proc("convert", f"{reg.host}/src/multi", f"{reg.host}/nydus/multi:arm", "--platform", "linux/arm64",
                    check=0)
    run_rafsfs_proc("pull", f"{reg.host}/nydus/multi:arm", tmp_path / "arm", "--blobs", check=0)
    run_rafsfs_proc("extract", tmp_path / "arm/image.boot", tmp_path / "x", "--blob-dir", tmp_path / "arm/blobs",
                    check=0)
    assert sorted(os.listdir(tmp_path / "x")) == ["only-on-arm"]
    p = run_rafsfs_proc("convert", f"{reg.host}/src/multi", f"{reg.host}/nydus/multi:s390x",
                        "--platform", "linux/s390x")
    assert p.returncode == 1 and "no image for platform linux/s390x" in p.stderr
    assert "linux/amd64" in p.stderr and "linux/arm64" in p.stderr


def _error_line(p) -> str:
    lines = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert p.returncode == 1 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def test_convert_and_pull_errors_are_one_line(reg, converted, tmp_path):
    src, dst, _ = converted
    assert "manifest not found" in _error_line(run_rafsfs_proc("convert", f"{reg.host}/src/app:nope", dst))
    assert "already a Nydus image" in _error_line(run_rafsfs_proc("convert", dst, f"{reg.host}/nydus/x:y"))
    assert "not a Nydus image" in _error_line(run_rafsfs_proc("pull", src, tmp_path / "p"))
    assert "invalid" in _error_line(run_rafsfs_proc("pull", "Bad/Ref", tmp_path / "p"))
    # a layer whose stored bytes no longer match its digest is refused
    push_oci_image(reg, "src/corrupt", "1", [[oci_layers.E("f", data=b"payload " * 100)]])
    man = get(reg, "src/corrupt", "manifests/1").json()
    blob = reg.blob_path(man["layers"][0]["digest"].split(":")[1])
    data = bytearray(blob.read_bytes())
    data[-20] ^= 0xFF
    blob.write_bytes(bytes(data))
    assert "digest" in _error_line(run_rafsfs_proc("convert", f"{reg.host}/src/corrupt:1",
                                                   f"{reg.host}/nydus/corrupt:1"))


def _push_raw_manifest(reg, repo: str, tag: str, layers: list[tuple[bytes, str, dict]]) -> None:
    """A manifest over arbitrary layer bytes (media type, annotations): what a hostile registry could serve."""
    descs = [{"mediaType": mt, "digest": "sha256:" + reg.push_blob(repo, data), "size": len(data),
              "annotations": ann} for data, mt, ann in layers]
    cfg = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    put_manifest(reg, repo, tag, {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": descs,
                                  "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                             "digest": "sha256:" + reg.push_blob(repo, cfg), "size": len(cfg)}},
                 OCI_MANIFEST)


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_hostile_images_are_refused_in_one_line(reg, tmp_path):
    boot_ann = {"containerd.io/snapshot/nydus-bootstrap": "true", "containerd.io/snapshot/nydus-fs-version": "6"}
    _push_raw_manifest(reg, "bad/img", "media", [(b"x" * 10, "application/vnd.example.unknown", {})])
    assert "unsupported media type" in _error_line(run_rafsfs_proc("convert", f"{reg.host}/bad/img:media",
                                                                   f"{reg.host}/bad/out:1"))
    _push_raw_manifest(reg, "bad/img", "notgz", [(b"not a tarball at all", TAR_GZ, boot_ann)])
    assert "not a valid tar.gz" in _error_line(run_rafsfs_proc("pull", f"{reg.host}/bad/img:notgz", tmp_path / "a"))
    _push_raw_manifest(reg, "bad/img", "noboot", [(_tar_gz({"image/other": b"x"}), TAR_GZ, boot_ann)])
    assert "no regular file image/image.boot" in _error_line(
        run_rafsfs_proc("pull", f"{reg.host}/bad/img:noboot", tmp_path / "b"))
    _push_raw_manifest(reg, "bad/img", "garbage", [(_tar_gz({"image/image.boot": os.urandom(8192)}), TAR_GZ,
                                                    boot_ann)])
    for argv in (("pull", f"{reg.host}/bad/img:garbage", tmp_path / "c"),
                 ("mount", f"{reg.host}/bad/img:garbage", tmp_path / "mnt", "--work-dir", tmp_path / "w")):
        (tmp_path / "mnt").mkdir(exist_ok=True)
        assert "image" in _error_line(run_rafsfs_proc(*argv))
    assert not os.path.ismount(tmp_path / "mnt")
    assert not list((tmp_path / "w").rglob("image.boot")), "a bad bootstrap was left in the work dir"
    _push_raw_manifest(reg, "bad/img", "v5", [(_tar_gz({"image/image.boot": b"x"}), TAR_GZ,
                                               {**boot_ann, "containerd.io/snapshot/nydus-fs-version": "5"})])
    assert "only RAFS v6" in _error_line(run_rafsfs_proc("pull", f"{reg.host}/bad/img:v5", tmp_path / "d"))


# ---------------------------------------------------------------------------------------------- pull and mount
def test_pull_fetches_only_the_bootstrap_unless_asked(reg, converted, expected, tmp_path):
    _, dst, _ = converted
    man = get(reg, "nydus/app", "manifests/1.0").json()
    blob_digests = [lay["digest"].split(":")[1] for lay in man["layers"][:-1]]
    before = {d: len(reg.blob_gets(d)) for d in blob_digests}
    p = run_rafsfs_proc("pull", dst, tmp_path / "meta", check=0)
    assert (tmp_path / "meta/image.boot").is_file() and not (tmp_path / "meta/blobs").exists()
    assert json.loads((tmp_path / "meta/manifest.json").read_bytes()) == man
    assert {d: len(reg.blob_gets(d)) for d in blob_digests} == before, "pull without --blobs fetched a blob"
    assert "2 blobs (not fetched)" in p.stdout
    run_rafsfs_proc("pull", dst, tmp_path / "all", "--blobs", check=0)
    assert sorted(os.listdir(tmp_path / "all/blobs")) == sorted(blob_digests)
    run_rafsfs_proc("extract", tmp_path / "all/image.boot", tmp_path / "x", "--blob-dir", tmp_path / "all/blobs",
                    check=0)
    treeutil.assert_trees_equal(expected, tmp_path / "x", check_root=False)


def test_mount_reference_lazily_shows_the_merged_tree(reg, converted, expected, tmp_path):
    _, dst, _ = converted
    man = get(reg, "nydus/app", "manifests/1.0").json()
    blob_digests = [lay["digest"].split(":")[1] for lay in man["layers"][:-1]]
    before = len(reg.blob_gets())
    m = FuseMount(dst, tmp_path / "mnt", "--work-dir", tmp_path / "work")
    try:
        # mounting fetched the bootstrap layer, and of the data blobs no more than a probe (the mount checks that
        # each blob is reachable): file data comes on demand
        gets = reg.blob_gets()[before:]
        boot_digest = man["layers"][-1]["digest"].split(":")[1]
        assert [g["uri"].rsplit(":", 1)[1] for g in gets].count(boot_digest) == 1
        data_bytes = sum(g["bytes"] for g in gets if g["uri"].rsplit(":", 1)[1] in blob_digests)
        assert data_bytes <= 4096 * len(blob_digests), gets
        mnt = m.mnt
        assert (mnt / "etc/config").read_bytes() == b"version three, longer\n"  # replaced in layer 2
        assert (mnt / "dir2file").read_bytes() == b"now a file\n"  # a directory replaced by a file
        assert (mnt / "file2dir").is_dir()  # a file replaced by a directory
        for gone in oci_layers.DELETED:  # whiteouts and the opaque directory
            assert not os.path.lexists(mnt / gone), gone
        assert sorted(os.listdir(mnt / "opq")) == ["new", "newempty"]
        assert not [n for n in os.listdir(mnt) if n.startswith(".wh.")]
        treeutil.assert_trees_equal(expected, mnt, check_root=False)
        fetched = {g["uri"].rsplit(":", 1)[1] for g in reg.blob_gets()[before:]}
        assert set(blob_digests) <= fetched  # both blobs were read, from the registry, with ranges
    finally:
        m.stop()
    assert (tmp_path / "work/cache").is_dir()


@pytest.mark.parametrize("auth_kind", ["basic", "token"])
def test_mount_and_convert_with_docker_credentials(tmp_path, expected, monkeypatch, auth_kind):
    """A registry with htpasswd auth or bearer tokens: convert (pull, then push with a push-scoped token) and
    mount REF take credentials from docker's config.json."""
    docker = tmp_path / "docker"
    docker.mkdir()
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    with start_registry(tmp_path / "reg", auth=auth_kind) as reg:
        (docker / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
        push_oci_image(reg, "src/app", "1", oci_layers.LAYERS)
        src, dst = f"{reg.host}/src/app:1", f"{reg.host}/nydus/app:1"
        p = run_rafsfs_proc("convert", src, dst)
        assert "credentials" in _error_line(p) or "401" in _error_line(p)  # no config.json yet
        monkeypatch.setenv("DOCKER_CONFIG", str(docker))
        run_rafsfs_proc("convert", src, dst, check=0)
        m = FuseMount(dst, tmp_path / "mnt", "--work-dir", tmp_path / "work")
        try:
            treeutil.assert_trees_equal(expected, m.mnt, check_root=False)
        finally:
            m.stop()


def test_concurrent_preparations_of_one_image_do_not_trip_over_each_other(reg, converted, tmp_path):
    """Eight threads preparing the same reference in one work dir at once (eight `rafsfs mount REF` started
    together): each gets a good bootstrap and config, and no temporary file is left behind."""
    import threading

    from rafsfs.oci.pull import prepare_mount

    _, dst, _ = converted
    ref = parse_reference(dst)
    results, errors = [], []
    barrier = threading.Barrier(8)

    def one() -> None:
        barrier.wait()
        try:
            results.append(prepare_mount(ref, str(tmp_path / "work")))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(set(results)) == 1
    boot, cfg = results[0]
    with RafsImage.open(boot) as img:
        assert img.blobs
    assert json.loads(Path(cfg).read_text())["device"]["backend"]["type"] == "registry"
    leftovers = [p for p in (tmp_path / "work").rglob(".*") if p.is_file()]
    assert leftovers == []


def test_replacing_is_all_or_nothing(tmp_path):
    from rafsfs.atomic import replacing, write_text

    target = tmp_path / "f"
    write_text(str(target), "old")
    with pytest.raises(RuntimeError):
        with replacing(str(target), "w") as f:
            f.write("half of the new")
            raise RuntimeError("writer died")
    assert target.read_text() == "old"
    write_text(str(target), "new")
    assert target.read_text() == "new" and oct(target.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
