"""Both config shapes users already have map onto one typed config; bad values are one clear error."""
from __future__ import annotations

import base64
import json
import logging

import pytest

from rafsfs.config import ConfigError, from_dict, load_config

NYDUSD = {"device": {"backend": {"type": "registry",
                                 "config": {"host": "127.0.0.1:5000", "repo": "bench/python", "scheme": "http",
                                            "readahead": False, "proxy": {"fallback": False},
                                            "timeout": 5, "connect_timeout": 5, "retry_limit": 2,
                                            "auth": base64.b64encode(b"alice:s3cret").decode()}},
                     "cache": {"type": "blobcache", "config": {"work_dir": "/tmp/w", "disable_indexed_map": False}}},
          "mode": "direct", "digest_validate": False, "enable_xattr": True, "amplify_io": 262144,
          "fs_prefetch": {"enable": True, "prefetch_all": False, "threads_count": 2, "merging_size": 0,
                          "bandwidth_rate": 0}}

SEED = {"type": "bootstrap", "id": "img1", "domain_id": "d1",
        "config": {"id": "img1", "backend_type": "registry",
                   "backend_config": {"host": "reg.example:443", "repo": "lib/app", "scheme": "https",
                                      "skip_verify": True, "mirrors": [{"host": "mirror.local:5000"}]},
                   "cache_type": "fscache", "cache_config": {"work_dir": "/var/cache/x"},
                   "metadata_path": "/x/image.boot"}}


def test_nydusd_shape():
    cfg = from_dict(NYDUSD)
    r = cfg.backend.registry
    assert cfg.backend.type == "registry" and r is not None
    assert (r.host, r.repo, r.scheme, r.timeout, r.retry_limit) == ("127.0.0.1:5000", "bench/python", "http", 5.0, 2)
    assert (r.username, r.password) == ("alice", "s3cret")
    assert r.proxy is None
    assert (cfg.cache.type, cfg.cache.work_dir) == ("blobcache", "/tmp/w")
    assert cfg.digest_validate is False and cfg.amplify_io == 262144
    assert cfg.prefetch.enable and cfg.prefetch.threads == 2


def test_seed_shape():
    cfg = from_dict(SEED)
    r = cfg.backend.registry
    assert r is not None and r.skip_verify and r.scheme == "https"
    assert [m.base_url for m in r.mirrors] == ["https://mirror.local:5000"]
    assert (cfg.cache.type, cfg.cache.work_dir) == ("fscache", "/var/cache/x")
    assert cfg.digest_validate is True  # on unless the config says otherwise


def test_localfs_and_defaults(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": "/blobs"}}}}))
    cfg = load_config(str(p))
    assert cfg.backend.type == "localfs" and cfg.backend.blob_dir == "/blobs"
    assert cfg.cache.type == "blobcache" and cfg.digest_validate


@pytest.mark.parametrize("bad, words", [
    ({"device": {"backend": {"type": "s3", "config": {}}}}, "unsupported backend type"),
    ({"device": {"backend": {"type": "registry", "config": {"host": "h"}}}}, "needs 'host' and 'repo'"),
    ({"device": {"backend": {"type": "registry", "config": {"host": "h", "repo": "r", "timeout": "x"}}}},
     "timeout: expected float"),
    ({"device": {"backend": {"type": "registry", "config": {"host": "h", "repo": "r", "scheme": "ftp"}}}},
     "scheme"),
    ({"device": {"backend": {"type": "localfs", "config": {"dir": "/b"}}}, "amplify_io": -1}, "positive"),
    ({"device": {"backend": {"type": "localfs", "config": {"dir": "/b"}}, "cache": {"type": "weird"}}},
     "unsupported cache type"),
])
def test_invalid_values(bad, words):
    with pytest.raises(ConfigError, match=words):
        from_dict(bad)


@pytest.mark.allow_log("unknown key")
def test_unknown_keys_warned(caplog):
    caplog.set_level(logging.WARNING, logger="rafsfs.config")
    from_dict({"device": {"backend": {"type": "localfs", "config": {"dir": "/b", "bogus": 1}}}, "whatever": 2})
    text = caplog.text
    assert "bogus" in text and "whatever" in text


def test_unreadable_and_invalid_json(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(str(tmp_path / "bad.json"))


# ---------------------------------------------------------------------------------------------- registry keys
def _reg(**kw) -> dict:
    return {"device": {"backend": {"type": "registry", "config": {"host": "h:5000", "repo": "r", **kw}}}}


def test_registry_defaults_are_nydusds():
    """nydusd (api/src/config.rs): timeout 5 s, connect_timeout 5 s, retry_limit 0 -- a read of a dead registry
    fails within 10 s, not (5 + 30) x 4 = 140 s."""
    r = from_dict(_reg()).backend.registry
    assert (r.timeout, r.connect_timeout, r.retry_limit, r.deadline) == (5.0, 5.0, 0, 0.0)
    assert r.read_deadline == 10.0
    assert from_dict(_reg(deadline=3)).backend.registry.read_deadline == 3.0
    assert from_dict(_reg(retry_limit=2, timeout=1)).backend.registry.read_deadline == 18.0


@pytest.mark.parametrize("key, value", [
    ("retry_limit", -1), ("retry_limit", 256), ("retry_limit", 1.5), ("retry_limit", True),
    ("timeout", 0), ("timeout", -3), ("timeout", 1e9), ("timeout", float("nan")),
    ("connect_timeout", 0), ("connect_timeout", 601),
    ("deadline", -1), ("deadline", 1e6),
])
def test_registry_numbers_are_bounded(key, value):
    with pytest.raises(ConfigError) as e:
        from_dict(_reg(**{key: value}))
    msg = str(e.value)
    assert f"config.device.backend.config.{key}" in msg and "\n" not in msg


@pytest.mark.parametrize("mirror, words", [
    ({"host": "m", "headers": {"X-A": 1}}, "mirrors[0].headers.X-A"),
    ({"host": "m", "headers": {"X-A": "a\r\nInjected: 1"}}, "mirrors[0].headers.X-A"),
    ({"host": "m", "headers": ["X-A"]}, "mirrors[0].headers: expected dict"),
    ({"host": "m", "auth_through": "yes"}, "mirrors[0].auth_through: expected bool"),
    ({"host": "m", "auth": "%%%"}, "mirrors[0].auth: not base64"),
    ({}, "mirrors[0].host: required"),
])
def test_registry_mirror_keys_checked(mirror, words):
    with pytest.raises(ConfigError) as e:
        from_dict(_reg(mirrors=[mirror]))
    assert words in str(e.value)


def test_registry_mirror_and_proxy_credentials_are_their_own():
    r = from_dict(_reg(auth=base64.b64encode(b"origin:pw").decode(), proxy={"url": "http://p:1", "auth_through": True},
                       mirrors=[{"host": "http://m1", "auth_through": True, "headers": {"X-Mirror": "1"}},
                                {"host": "http://m2", "auth": base64.b64encode(b"mirror:pw2").decode()}]))\
        .backend.registry
    assert (r.username, r.password) == ("origin", "pw")
    m1, m2 = r.mirrors
    assert m1.auth_through and m1.headers == {"X-Mirror": "1"} and m1.username is None
    assert not m2.auth_through and (m2.username, m2.password) == ("mirror", "pw2")
    assert r.proxy.auth_through and not r.proxy.is_origin


def test_config_imports_no_storage():
    """Issue 13: the registry config lives in rafsfs.config, which imports nothing from storage (the backend
    imports it, as Nydus's backend imports nydus_api::RegistryConfig)."""
    import subprocess
    import sys

    code = "import sys, rafsfs.config; print(sorted(m for m in sys.modules if m.startswith('rafsfs.storage')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


LOCAL = {"backend": {"type": "localfs", "config": {"dir": "/b"}}}


@pytest.mark.parametrize("bad, key", [
    ({"device": LOCAL, "amplify_io": 1 << 30}, "config.amplify_io"),  # one request would hold 1 GiB
    ({"device": LOCAL, "amplify_io": 0}, "config.amplify_io"),
    ({"device": LOCAL, "fs_prefetch": {"enable": True, "threads_count": 0}}, "config.fs_prefetch.threads_count"),
    ({"device": LOCAL, "fs_prefetch": {"enable": True, "threads_count": -2}}, "config.fs_prefetch.threads_count"),
    ({"device": LOCAL, "fs_prefetch": {"threads_count": 100000}}, "config.fs_prefetch.threads_count"),
    ({"device": LOCAL, "fs_prefetch": {"threads": 0}}, "config.fs_prefetch.threads"),
    ({"device": {**LOCAL, "cache": {"type": "blobcache", "config": {"work_dir": ""}}}},
     "config.device.cache.config.work_dir"),
    ({"type": "bootstrap", "config": {"backend_type": "localfs", "backend_config": {"dir": "/b"},
                                      "amplify_io": 1 << 40}}, "config.config.amplify_io"),
])
def test_non_registry_values_are_bounded_and_named(bad, key):
    """L8: out-of-range values are one error naming the key (amplify_io had no upper bound; prefetch threads were
    clamped silently; an empty work_dir was taken)."""
    with pytest.raises(ConfigError) as e:
        from_dict(bad)
    assert str(e.value).startswith(key + ":") and "\n" not in str(e.value)


def test_snapshotter_put_body_with_zero_valued_prefetch_is_taken():
    """nydus-snapshotter's fscache PUT body carries every prefetch_config field, threads_count 0 when prefetch is
    off (its zero value): that is no prefetch at the default thread count, not an error (the singleton refused every
    image).  Enabled with 0 threads stays an error."""
    body = {"type": "bootstrap", "id": "img", "config": {
        "id": "img", "backend_type": "registry", "backend_config": {"host": "r.example", "repo": "a/b"},
        "cache_type": "fscache", "metadata_path": "/x/image.boot",
        "prefetch_config": {"enable": False, "threads_count": 0, "merging_size": 0, "bandwidth_rate": 0}}}
    cfg = from_dict(body)
    assert not cfg.prefetch.enable and cfg.prefetch.threads >= 1
    body["config"]["prefetch_config"]["enable"] = True
    with pytest.raises(ConfigError, match="threads_count"):
        from_dict(body)


def test_enable_xattr_is_read_from_both_shapes():
    assert from_dict({"device": LOCAL, "enable_xattr": False}).enable_xattr is False
    seed = {"type": "bootstrap", "config": {"backend_type": "localfs", "backend_config": {"dir": "/b"},
                                            "enable_xattr": False}}
    assert from_dict(seed).enable_xattr is False
    assert from_dict({"device": LOCAL}).enable_xattr is True
