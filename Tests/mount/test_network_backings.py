"""Stores on backings without O_TMPFILE, linkat of an open file or renameat2 flags: what the
probe finds, every fallback path through a real mount, and a daemon killed inside the exchange
fallback (its three fault points). The store is on ENCFSD_TEST_BACKING when that is set (the
backing stages of scripts/test.sh), else on a bindfs of this module's own."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

import backings
from conftest import BACKING, Volume, expect_errno, run
from test_crash import dies_at, kill_leftovers

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2

# What each backing lacks, as checked by hand on Debian 12 (bindfs 1.14, sshfs 3.7, GlusterFS 10).
FALLBACKS = {
    "bindfs": {"O_TMPFILE", "linkat-open-file", "RENAME_NOREPLACE", "RENAME_EXCHANGE"},
    "sshfs": {"O_TMPFILE", "linkat-open-file", "RENAME_NOREPLACE", "RENAME_EXCHANGE", "user-xattrs", "hard-links"},
    "gluster": {"O_TMPFILE", "linkat-open-file", "RENAME_NOREPLACE", "RENAME_EXCHANGE"},
}
LOCK_SCOPE = {"bindfs": "unknown", "sshfs": "this host only", "gluster": "all clients"}
KIND = BACKING or "bindfs"


def renameat2(old, new, flags):
    if libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@pytest.fixture(scope="module")
def store_parent(tmp_path_factory, backing_root):
    if backing_root is not None:
        yield backing_root
        return
    backing = backings.make("bindfs", tmp_path_factory.mktemp("bindfs"))
    try:
        yield backing.up()
    finally:
        backing.down()


@pytest.fixture
def volume(tmp_path, encfsd_bin, key_file, store_parent, volumes):
    store = store_parent / f"{tmp_path.name}-{os.getpid()}" / "store"
    store.parent.mkdir()
    v = Volume(encfsd_bin, tmp_path, key_file, store=store)
    volumes.append(v)
    return v


def leftovers(store):
    """encfsd's temporary names anywhere in the store (none may outlive an operation)."""
    found = []
    for directory, dirs, files in os.walk(store):
        found += [os.path.join(directory, n) for n in dirs + files if n.startswith((".nf-", ".xc-", ".mk-", ".rm-", ".probe-"))]
    return found + [n for n in os.listdir(store / ".journal") if n.startswith("xc-")]


def test_probe_finds_what_the_backing_lacks(volume):
    info = run(volume.binary, "info", volume.store).stdout
    for capability in FALLBACKS[KIND]:
        assert f"{capability} " in info and "missing" in info.split(capability, 1)[1].split("\n")[0], info
    assert f"lock scope         {LOCK_SCOPE[KIND]}" in info, info
    volume.mount(by_key_file=True)
    status = run(volume.binary, "status", volume.mnt).stdout
    assert "backing:" in status and f"{LOCK_SCOPE[KIND]}" in status, status
    for line in status.split("backing:", 1)[1].splitlines():
        name = line.split()[0] if line.split() else ""
        if name in FALLBACKS[KIND]:
            assert "missing:" in line, line
        elif name in {"fdatasync", "ofd-lock", "stable-inodes"}:
            assert line.split()[1] == "native", line


def test_every_namespace_operation_through_the_fallbacks(volume):
    volume.mount(by_key_file=True)
    mnt = volume.mnt
    (mnt / "a").write_bytes(b"A" * 5000)
    (mnt / "d").mkdir()
    (mnt / "d" / "b").write_bytes(b"B")
    os.symlink("a", mnt / "link")
    os.mkfifo(mnt / "fifo")
    expect_errno(errno.EEXIST, renameat2, mnt / "a", mnt / "d" / "b", RENAME_NOREPLACE)
    renameat2(mnt / "a", mnt / "d" / "a2", RENAME_NOREPLACE)
    renameat2(mnt / "d" / "a2", mnt / "d" / "b", RENAME_EXCHANGE)
    assert (mnt / "d" / "b").read_bytes() == b"A" * 5000 and (mnt / "d" / "a2").read_bytes() == b"B"
    (mnt / "e").mkdir()
    (mnt / "e" / "inside").write_bytes(b"E")
    renameat2(mnt / "d", mnt / "e", RENAME_EXCHANGE)  # two directories, each with contents
    assert (mnt / "d" / "inside").read_bytes() == b"E" and (mnt / "e" / "b").read_bytes() == b"A" * 5000
    expect_errno(errno.ENOENT, renameat2, mnt / "e" / "b", mnt / "missing", RENAME_EXCHANGE)
    os.rename(mnt / "e" / "a2", mnt / "d" / "inside")  # plain replace
    os.unlink(mnt / "d" / "inside")
    os.rmdir(mnt / "d")
    assert os.readlink(mnt / "link") == "a"
    # With or without user xattrs on the backing (without, all of them are in side objects).
    os.setxattr(mnt / "e" / "b", "user.k", b"v")
    assert os.getxattr(mnt / "e" / "b", "user.k") == b"v"
    assert (volume.store / ".xattrs").is_dir() == ("user-xattrs" in FALLBACKS[KIND])
    if "hard-links" in FALLBACKS[KIND]:
        expect_errno(errno.EPERM, os.link, mnt / "e" / "b", mnt / "hard")
    else:
        os.link(mnt / "e" / "b", mnt / "hard")
        assert os.stat(mnt / "hard").st_nlink == 2
    volume.unmount()
    assert leftovers(volume.store) == []
    volume.mount(by_key_file=True)
    assert sorted(os.listdir(mnt)) == sorted(["e", "link", "fifo"] + ([] if "hard-links" in FALLBACKS[KIND] else ["hard"]))
    assert (mnt / "e" / "b").read_bytes() == b"A" * 5000


@pytest.mark.parametrize("point", ["exchange-recorded", "exchange-first-moved", "exchange-second-moved"])
def test_daemon_killed_inside_the_exchange_fallback(volume, point):
    volume.mount(by_key_file=True)
    (volume.mnt / "x").write_bytes(b"X" * 20000)
    (volume.mnt / "sub").mkdir()
    (volume.mnt / "sub" / "y").write_bytes(b"Y")
    volume.unmount()
    volume.mount(by_key_file=True, env={**os.environ, "ENCFSD_FAULT_POINT": point})
    dies_at(volume, point, lambda: renameat2(volume.mnt / "x", volume.mnt / "sub" / "y", RENAME_EXCHANGE))
    volume.mount(by_key_file=True)
    x, y = (volume.mnt / "x").read_bytes(), (volume.mnt / "sub" / "y").read_bytes()
    # Before the first rename nothing moved; from it on, the durable record has the exchange completed.
    assert (x, y) == ((b"X" * 20000, b"Y") if point == "exchange-recorded" else (b"Y", b"X" * 20000))
    if point != "exchange-recorded":
        assert "completed an interrupted exchange" in volume.daemon_log()
    volume.unmount()
    assert leftovers(volume.store) == []


def test_daemon_killed_before_a_fallback_create_is_renamed_in(volume):
    volume.mount(by_key_file=True, env={**os.environ, "ENCFSD_FAULT_POINT": "create-header-written"})
    dies_at(volume, "create-header-written", lambda: (volume.mnt / "new").write_bytes(b"N"))
    kill_leftovers(volume)
    volume.mount(by_key_file=True)
    assert os.listdir(volume.mnt) == []  # the half-made file never had a name
    volume.unmount()
    out = run(volume.binary, "fsck", volume.store, "--repair", "--key-file", volume.key_file, check=False).stdout
    assert "removed an unfinished create" in out, out
    assert leftovers(volume.store) == []
