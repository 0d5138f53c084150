"""Bad input to the CLI gets a clear error, a non-zero exit, and changes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from conftest import run


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def fails(binary, *args, expect: str):
    r = run(binary, *args, check=False)
    assert r.returncode != 0, f"{args} succeeded: {r.stdout}"
    assert expect in r.stderr, f"{args}: expected {expect!r} in {r.stderr!r}"


def test_bad_cli_input(tmp_path, encfsd_bin, key_file):
    short = tmp_path / "short.key"
    short.write_bytes(os.urandom(10))
    full = tmp_path / "full"
    full.mkdir()
    (full / "precious").write_text("keep me")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fails(encfsd_bin, "init", full, "--key-file", key_file, expect="is not empty")
    assert (full / "precious").read_text() == "keep me" and os.listdir(full) == ["precious"]
    fails(encfsd_bin, "init", tmp_path / "s1", "--key-file", short, expect="a key must be 16 to 64 bytes; got 10")
    fails(encfsd_bin, "init", tmp_path / "s2", "--key-file", tmp_path / "missing", expect="cannot read key file")
    fails(encfsd_bin, "init", tmp_path / "s3", "--key-file", key_file, "--extent-size", "5000", expect="power of two")
    assert not any((tmp_path / s).exists() for s in ["s1", "s2", "s3"])
    fails(encfsd_bin, "mount", tmp_path / "nowhere", mnt, expect="No such file or directory")
    fails(encfsd_bin, "mount", full, mnt, expect="not an encfsd store")
    fails(encfsd_bin, "key", "add", tmp_path, "--key-file", key_file, expect="not on an encfsd mount")
    fails(encfsd_bin, "key", "generate", "-o", key_file, expect="File exists")
    fails(encfsd_bin, "mount", expect="Missing expected argument")
    fails(encfsd_bin, "frobnicate", expect="Unexpected argument")


def test_unsupported_store_is_refused_unchanged(tmp_path, encfsd_bin, key_file):
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    run(encfsd_bin, "init", store, "--key-file", key_file)
    conf = store / "encfsd.conf"
    made = json.loads(conf.read_text())["version"]
    conf.write_text(conf.read_text().replace(f'"version" : {made}', '"version" : 7'))
    before = tree_digest(store)
    fails(encfsd_bin, "mount", store, mnt, expect="format version 7")
    assert tree_digest(store) == before, "a refused mount changed the store"
    config = json.loads(conf.read_text().replace('"version" : 7', f'"version" : {made}'))
    config["features"].append("x")
    conf.write_text(json.dumps(config))
    before = tree_digest(store)
    fails(encfsd_bin, "mount", store, mnt, expect="features")
    assert tree_digest(store) == before, "a refused mount changed the store"
    assert not os.listdir(mnt)


def test_wrong_root_policy_is_refused(tmp_path, encfsd_bin, key_file):
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    run(encfsd_bin, "init", store, "--key-file", key_file)
    conf = store / "encfsd.conf"
    text = conf.read_text()
    policy = text.split('"rootPolicy" : "')[1][:32]
    conf.write_text(text.replace(policy, "0" * 32))
    fails(encfsd_bin, "mount", store, mnt, expect="differs from encfsd.conf")
