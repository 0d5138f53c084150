"""POSIX behaviour on a real mount that the round-trip and differential tests do not reach:
other users with allow_other and default_permissions, stable inode numbers, fallocate, mmap,
locks, the fsync family, statfs, rename flags, set-group-ID inheritance, O_APPEND."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import Volume, expect_errno, purge_test_keys, wait_pids_gone
from test_crash import kill_leftovers

NOBODY = 65534
libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(old: Path, new: Path, flags: int):
    if libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def as_nobody(*command) -> subprocess.CompletedProcess:
    return subprocess.run(list(map(str, command)), user=NOBODY, group=NOBODY, capture_output=True, text=True)


@pytest.fixture
def public_volume(encfsd_bin, key_file):
    """A volume under a world-traversable directory, so another user can reach the mountpoint."""
    root = Path(tempfile.mkdtemp(prefix="encfsd-users-"))
    os.chmod(root, 0o755)
    v = Volume(encfsd_bin, root / "vol", key_file)
    os.chmod(v.root, 0o755)
    os.chmod(v.mnt, 0o755)
    try:
        yield v
    finally:
        problems = v.force_cleanup()
        purge_test_keys()
        shutil.rmtree(root, ignore_errors=True)
    assert problems == [], problems


def test_other_users_need_allow_other(public_volume):
    v = public_volume.mount()
    (v.mnt / "f").write_text("x")
    r = as_nobody("stat", v.mnt / "f")
    assert r.returncode != 0 and "Permission denied" in r.stderr, r


def test_allow_other_with_default_permissions_enforces_modes(public_volume):
    v = public_volume.mount(options="allow_other,default_permissions")
    (v.mnt / "public").write_text("everyone may read\n")
    os.chmod(v.mnt / "public", 0o644)
    (v.mnt / "private").write_text("root only\n")
    os.chmod(v.mnt / "private", 0o600)
    (v.mnt / "theirs").write_text("")
    os.chown(v.mnt / "theirs", NOBODY, NOBODY)

    assert as_nobody("cat", v.mnt / "public").stdout == "everyone may read\n"
    r = as_nobody("cat", v.mnt / "private")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = as_nobody("sh", "-c", f"echo more >> {v.mnt / 'public'}")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = as_nobody("mkdir", v.mnt / "newdir")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = as_nobody("sh", "-c", f"echo mine > {v.mnt / 'theirs'}")
    assert r.returncode == 0, r.stderr
    assert (v.mnt / "theirs").read_text() == "mine\n"
    st = os.stat(v.mnt / "theirs")
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)

    # A file a user creates is theirs.
    os.chmod(v.mnt, 0o777)
    assert as_nobody("touch", v.mnt / "created").returncode == 0
    assert os.stat(v.mnt / "created").st_uid == NOBODY


def test_inode_numbers_are_stable_across_remount(volume):
    (volume.mnt / "d").mkdir()
    (volume.mnt / "d" / "f").write_bytes(b"1")
    os.link(volume.mnt / "d" / "f", volume.mnt / "g")
    before = {p: os.lstat(volume.mnt / p).st_ino for p in ["d", "d/f", "g"]}
    assert before["d/f"] == before["g"]
    volume.remount()
    assert {p: os.lstat(volume.mnt / p).st_ino for p in before} == before


def test_fallocate_extends_with_zeros(volume):
    path = volume.mnt / "f"
    with open(path, "wb") as f:
        f.write(b"head")
        os.posix_fallocate(f.fileno(), 0, 1 << 20)
    assert os.stat(path).st_size == 1 << 20
    data = path.read_bytes()
    assert data[:4] == b"head" and data[4:] == bytes((1 << 20) - 4)
    volume.remount()
    assert path.read_bytes() == data


def test_shared_mmap_writes_persist(volume):
    path = volume.mnt / "mapped"
    path.write_bytes(bytes(3 * 16384 + 5))
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m[10:15] = b"hello"
        m[-5:] = b"tail!"
        m.flush()
    volume.remount()
    data = path.read_bytes()
    assert data[10:15] == b"hello" and data[-5:] == b"tail!" and len(data) == 3 * 16384 + 5


def test_locks(volume):
    path = volume.mnt / "locked"
    path.write_text("x")
    with open(path, "r+") as a, open(path, "r+") as b:
        fcntl.flock(a, fcntl.LOCK_EX)
        expect_errno((errno.EWOULDBLOCK, errno.EAGAIN), fcntl.flock, b, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(a, fcntl.LOCK_UN)
        fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
    # POSIX record locks are per process: a child sees the parent's lock.
    with open(path, "r+") as a:
        fcntl.lockf(a, fcntl.LOCK_EX)
        r = subprocess.run(["python3", "-c", f"import fcntl; f=open({str(path)!r},'r+'); fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB)"],
                           capture_output=True, text=True)
        assert r.returncode != 0 and ("Resource temporarily unavailable" in r.stderr or "Permission denied" in r.stderr)


def killed_and_remounted(volume):
    """SIGKILLs the daemon (no flush, no cleanup: a crash) and mounts again."""
    for pid in volume.pids:
        os.kill(pid, signal.SIGKILL)
    assert wait_pids_gone(volume.pids, 60) == []
    kill_leftovers(volume)
    volume.mount()


def test_fsync_family_commits(volume):
    """O_SYNC writes, fsync and fdatasync reach the daemon and commit before they return: the
    daemon buffers writes until a flush point, so each write survives a SIGKILL right after the
    call only if the call was answered by a commit (not ENOSYS, which the kernel would turn into
    success and never ask again). fsyncdir must succeed too."""
    path = volume.mnt / "f"
    expected = bytearray()
    for i, how in enumerate(["O_SYNC", "fsync", "fdatasync"]):
        data = f"data {i} by {how}".encode() * 100
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC * (i == 0) | (os.O_SYNC if how == "O_SYNC" else 0), 0o644)
        try:
            os.pwrite(fd, data, 4096 * i)
            if how == "fsync":
                os.fsync(fd)
            elif how == "fdatasync":
                os.fdatasync(fd)
            # (Not read back here: closing a reader's descriptor would flush the file.)
            expected[len(expected):] = bytes(max(0, 4096 * i - len(expected)))
            expected[4096 * i:4096 * i + len(data)] = data
            killed_and_remounted(volume)  # the descriptor is still open: no close, no flush
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
        assert path.read_bytes() == expected, f"the write synced by {how} was lost"
    dfd = os.open(volume.mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def test_statfs(volume):
    s = os.statvfs(volume.mnt)
    assert s.f_namemax == 255 and s.f_bsize > 0 and s.f_blocks > 0


def test_rename_flags(volume):
    a, b, c = volume.mnt / "a", volume.mnt / "b", volume.mnt / "c"
    a.write_text("A")
    b.write_text("B")
    expect_errno(errno.EEXIST, renameat2, a, b, RENAME_NOREPLACE)
    renameat2(a, b, RENAME_EXCHANGE)
    assert (a.read_text(), b.read_text()) == ("B", "A")
    expect_errno(errno.ENOENT, renameat2, a, c, RENAME_EXCHANGE)
    renameat2(a, c, RENAME_NOREPLACE)
    assert not a.exists() and c.read_text() == "B"
    (volume.mnt / "d1").mkdir()
    (volume.mnt / "d1" / "x").write_text("x")
    renameat2(volume.mnt / "d1", c, RENAME_EXCHANGE)  # a directory and a file trade places
    assert (volume.mnt / "c" / "x").read_text() == "x" and (volume.mnt / "d1").read_text() == "B"
    (volume.mnt / "empty").mkdir()
    os.rename(volume.mnt / "c", volume.mnt / "empty")  # directory over an empty directory
    assert (volume.mnt / "empty" / "x").read_text() == "x" and not (volume.mnt / "c").exists()
    (volume.mnt / "full").mkdir()
    (volume.mnt / "full" / "y").write_text("y")
    expect_errno(errno.ENOTEMPTY, os.rename, volume.mnt / "empty", volume.mnt / "full")
    volume.remount()
    assert (volume.mnt / "empty" / "x").read_text() == "x" and (volume.mnt / "d1").read_text() == "B"


def test_setgid_directory_passes_group_on(volume):
    d = volume.mnt / "shared"
    d.mkdir()
    os.chown(d, 0, 1234)
    os.chmod(d, 0o2775)
    (d / "file").write_text("x")
    (d / "sub").mkdir()
    assert os.stat(d / "file").st_gid == 1234
    assert os.stat(d / "sub").st_gid == 1234 and os.stat(d / "sub").st_mode & 0o2000


def test_append_and_chmod_keeps_mtime(volume):
    path = volume.mnt / "log"
    for line in ["one\n", "two\n", "three\n"]:
        with open(path, "a") as f:
            f.write(line)
    assert path.read_text() == "one\ntwo\nthree\n"
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))
    os.chmod(path, 0o600)
    st = os.stat(path)
    assert st.st_mtime_ns == 2_000_000_000 and st.st_mode & 0o777 == 0o600


def test_unlink_keeps_other_links_and_open_files(volume):
    a, b = volume.mnt / "a", volume.mnt / "b"
    a.write_text("shared")
    os.link(a, b)
    with open(a) as held:
        os.unlink(a)
        assert os.stat(b).st_nlink == 1 and b.read_text() == "shared"
        assert held.read() == "shared"
    volume.remount()
    assert b.read_text() == "shared"


def test_mtime_is_the_write_time_even_before_close(volume):
    import time
    path = volume.mnt / "f"
    path.write_text("x")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    with open(path, "r+b") as f:
        before = time.time_ns()
        f.write(b"y")
        f.flush()
        during = os.fstat(f.fileno()).st_mtime_ns
        time.sleep(0.05)
    after_close = os.stat(path).st_mtime_ns
    assert during >= before - 10_000_000, "mtime did not move at write"
    assert after_close == during, "the commit restamped mtime with its own time"


def test_directory_chmod_updates_ctime(volume):
    import time
    d = volume.mnt / "d"
    d.mkdir()
    before = os.stat(d).st_ctime_ns
    time.sleep(0.02)
    os.chmod(d, 0o700)
    assert os.stat(d).st_ctime_ns > before
