"""A mount starts locked: without the key nothing can be created or read, and listing shows
only encrypted (base64url) names. As the README says, a locked directory can still be listed,
stat'ed and emptied: those must work, not answer ENOKEY."""

from __future__ import annotations

import os
import re
import stat

from conftest import ENOKEY, STORE_FILES, expect_errno, run

NO_KEY_NAME = re.compile(r"^(~[A-Za-z0-9_-]{43}|[A-Za-z0-9_-]+)$")
PLAINTEXT_NAMES = ["secret-file-one", "secret-directory", "another-secret-file", "x" * 200]


def test_fresh_mount_is_locked(make_volume):
    v = make_volume(unlock=False)
    assert os.listdir(v.mnt) == [], "a fresh locked root lists as empty"
    assert stat.S_ISDIR(os.stat(v.mnt).st_mode)
    expect_errno(ENOKEY, open, v.mnt / "x", "w")
    expect_errno(ENOKEY, os.mkdir, v.mnt / "d")
    expect_errno(ENOKEY, os.symlink, "target", v.mnt / "l")
    expect_errno(ENOKEY, os.mkfifo, v.mnt / "p")
    assert os.listdir(v.store) and set(os.listdir(v.store)) == STORE_FILES

    v.add_key()
    with open(v.mnt / "x", "w") as f:
        f.write("now it works")
    assert os.listdir(v.mnt) == ["x"]


def test_wrong_key_does_not_unlock(make_volume, tmp_path, encfsd_bin):
    v = make_volume(unlock=False)
    wrong = tmp_path / "wrong.key"
    run(encfsd_bin, "key", "generate", "-o", wrong)
    run(encfsd_bin, "key", "add", v.mnt, "--key-file", wrong, check=False)
    expect_errno(ENOKEY, open, v.mnt / "x", "w")


def test_remount_without_key_hides_names_and_contents(make_volume):
    v = make_volume()
    for name in PLAINTEXT_NAMES:
        if "directory" in name:
            os.mkdir(v.mnt / name)
            with open(v.mnt / name / "inner-secret", "w") as f:
                f.write("inner")
        else:
            with open(v.mnt / name, "w") as f:
                f.write(f"contents of {name}\n")
    os.symlink("secret-file-one", v.mnt / "secret-symlink")
    before = sorted(os.listdir(v.mnt))

    v.remount(unlock=False)
    listing = os.listdir(v.mnt)
    assert len(listing) == len(before), f"locked listing {listing} vs unlocked {before}"
    for name in listing:
        assert NO_KEY_NAME.match(name), f"locked listing shows {name!r}, not a base64url name"
        assert name not in before, f"locked listing shows plaintext name {name!r}"
    types = []
    for name in listing:
        path = v.mnt / name
        st = os.lstat(path)  # stat works locked ...
        types.append(stat.S_IFMT(st.st_mode))
        if stat.S_ISREG(st.st_mode):
            # ... but contents are not.
            def read_it(p=path):
                with open(p, "rb") as f:
                    return f.read()
            expect_errno(ENOKEY, read_it)
        elif stat.S_ISDIR(st.st_mode):
            inner = os.listdir(path)  # and listing works
            assert len(inner) == 1 and all(NO_KEY_NAME.match(n) for n in inner), inner
            assert "inner-secret" not in inner
            assert stat.S_ISREG(os.lstat(path / inner[0]).st_mode)
        elif stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(path)
            except OSError as e:
                assert e.errno == ENOKEY, e
            else:
                assert target != "secret-file-one"
    assert sorted(types) == sorted([stat.S_IFREG] * 3 + [stat.S_IFDIR, stat.S_IFLNK]), "locked stat shows the wrong types"
    # Nothing can be created in a locked directory either.
    expect_errno(ENOKEY, open, v.mnt / "new-file", "w")

    v.add_key()
    assert sorted(os.listdir(v.mnt)) == before
    with open(v.mnt / "secret-file-one") as f:
        assert f.read() == "contents of secret-file-one\n"


def test_key_needed_again_after_remount(make_volume):
    v = make_volume()
    with open(v.mnt / "file", "w") as f:
        f.write("data")
    v.remount(unlock=False)
    expect_errno(ENOKEY, open, v.mnt / "other", "w")
    v.add_key()
    with open(v.mnt / "file") as f:
        assert f.read() == "data"


def test_locked_directory_can_be_emptied(make_volume):
    v = make_volume()
    (v.mnt / "file").write_text("x")
    (v.mnt / "dir").mkdir()
    (v.mnt / "dir" / "inner").write_text("y")
    os.symlink("file", v.mnt / "link")
    v.remount(unlock=False)
    for name in os.listdir(v.mnt):
        path = v.mnt / name
        if stat.S_ISDIR(os.lstat(path).st_mode):
            for inner in os.listdir(path):
                os.unlink(path / inner)
            os.rmdir(path)
        else:
            os.unlink(path)
    assert os.listdir(v.mnt) == []
    assert set(os.listdir(v.store)) == STORE_FILES, "the backing store keeps removed entries"
