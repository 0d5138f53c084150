"""POSIX behaviour on a real mount that the round-trip and differential tests do not reach:
other users with allow_other and default_permissions, stable inode numbers, fallocate, mmap,
locks, the fsync family, statfs, rename flags, set-group-ID inheritance, O_APPEND; and, side by
side with a plain ext4 directory, POSIX ACLs, the trusted/security xattr namespaces, file
capabilities, whiteout renames and overlayfs on top, rewinddir, and timestamps."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import shutil
import stat
import struct
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import BACKING, Volume, expect_errno, purge_test_keys, wait_pids_gone
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
    if os.environ.get("ENCFSD_TEST_BACKING") == "sshfs":
        # SFTP stores whole seconds (README, "Stores on network filesystems"): the committed mtime
        # is the write time at the backing's precision.
        during -= during % 1_000_000_000
    assert after_close == during, "the commit restamped mtime with its own time"


def test_directory_chmod_updates_ctime(volume):
    import time
    d = volume.mnt / "d"
    d.mkdir()
    before = os.stat(d).st_ctime_ns
    time.sleep(0.02)
    os.chmod(d, 0o700)
    assert os.stat(d).st_ctime_ns > before


# --- metadata as on ext4: ACLs, xattr namespaces, whiteouts, rewinddir, timestamps ----------
# Each test runs the same operations on the mount and on a plain directory of the test's
# filesystem (ext4 here: the tests' temporary directories live on it) and compares.

RENAME_WHITEOUT = 4


@pytest.fixture
def side_by_side(public_volume):
    """(mount, reference): the mounted volume (allow_other, so other users reach it) and a plain
    directory beside it, both world-traversable."""
    v = public_volume.mount(options="allow_other")
    reference = v.root / "reference"
    reference.mkdir()
    os.chmod(reference, 0o755)
    os.chmod(v.mnt, 0o755)
    return v.mnt, reference


def getfacl(path: Path) -> str:
    r = subprocess.run(["getfacl", "--omit-header", "--absolute-names", str(path)], capture_output=True, text=True, check=True)
    return r.stdout


def setfacl(*args):
    subprocess.run(["setfacl", *map(str, args)], check=True, capture_output=True)


def with_umask(mask: int, fn):
    old = os.umask(mask)
    try:
        return fn()
    finally:
        os.umask(old)


def acl_workload(root: Path) -> dict:
    """ACL operations a user runs, and what each leaves: getfacl text, mode and xattr names."""
    seen = {}

    def record(label, rel):
        path = root / rel
        seen[label] = (getfacl(path), stat.filemode(os.lstat(path).st_mode), sorted(os.listxattr(path, follow_symlinks=False)))

    d = root / "d"
    d.mkdir()
    setfacl("-d", "-m", "u:1000:rwx,g:100:rx,o::-", d)
    record("default set", "d")
    with_umask(0o077, lambda: os.close(os.open(d / "f", os.O_CREAT | os.O_WRONLY, 0o666)))
    with_umask(0o077, lambda: os.mkdir(d / "sub", 0o777))
    with_umask(0o077, lambda: os.mkfifo(d / "fifo", 0o644))
    os.symlink("f", d / "link")
    for rel in ["d/f", "d/sub", "d/fifo"]:
        record("inherited " + rel, rel)
    with_umask(0o022, lambda: os.mkdir(d / "sub" / "deeper"))
    record("inherited twice", "d/sub/deeper")
    os.chmod(d / "f", 0o640)
    record("chmod keeps named entries", "d/f")
    setfacl("-m", "m::r", d / "f")
    record("mask sets group bits", "d/f")
    setfacl("-m", "u::rwx,g::r,o::r", root / "d" / "sub")
    record("base entries only", "d/sub")
    setfacl("-b", d / "f")
    record("removed", "d/f")
    setfacl("-k", d)
    record("default removed", "d")
    with_umask(0o027, lambda: os.close(os.open(d / "plain", os.O_CREAT | os.O_WRONLY, 0o666)))
    with_umask(0o027, lambda: os.mkdir(d / "plaindir", 0o777))
    record("umask without default", "d/plain")
    record("umask without default, dir", "d/plaindir")
    (root / "other").write_text("x")
    setfacl("-m", "u:65534:r", root / "other")
    record("named user", "other")
    return seen


def test_acls_match_ext4(side_by_side):
    mnt, reference = side_by_side
    ours, theirs = acl_workload(mnt), acl_workload(reference)
    for label in theirs:
        assert ours[label] == theirs[label], f"{label}: encfsd {ours[label]} ext4 {theirs[label]}"


def test_acls_are_enforced_and_survive_remount(public_volume):
    v = public_volume.mount(options="allow_other")
    os.chmod(v.mnt, 0o755)
    secret = v.mnt / "secret"
    secret.write_text("for nobody only\n")
    os.chmod(secret, 0o600)
    assert as_nobody("cat", secret).returncode != 0
    setfacl("-m", "u:65534:r", secret)
    assert as_nobody("cat", secret).stdout == "for nobody only\n"
    acl = getfacl(secret)
    v.unmount()
    v.mount(options="allow_other")
    assert getfacl(secret) == acl
    assert as_nobody("cat", secret).stdout == "for nobody only\n"
    setfacl("-x", "u:65534", secret)
    assert as_nobody("cat", secret).returncode != 0
    # Stored encrypted: no backing xattr names a namespace, no value holds the user's id.
    for dirpath, dirnames, filenames in os.walk(v.store):
        for name in dirnames + filenames:
            for attr in os.listxattr(os.path.join(dirpath, name), follow_symlinks=False):
                assert attr.startswith("user.encfsd."), attr


def namespace_workload(root: Path) -> dict:
    f = root / "f"
    f.write_text("x")
    os.chmod(f, 0o644)
    d = root / "dir"
    d.mkdir()
    os.chmod(d, 0o755)
    seen = {}
    for path in (f, d):
        for name, value in [("trusted.overlay.opaque", b"y"), ("security.test", b"label\0"), ("user.plain", b"v")]:
            os.setxattr(path, name, value)
        seen[path.name] = {n: os.getxattr(path, n) for n in sorted(os.listxattr(path))}
        # Another user: trusted.* is not listed and reads as absent; security.* may be read.
        r = as_nobody("python3", "-c", f"import os; print(sorted(os.listxattr({str(path)!r})))")
        seen[path.name + " as nobody"] = r.stdout
        r = as_nobody("getfattr", "-n", "trusted.overlay.opaque", path)
        seen[path.name + " trusted as nobody"] = ("No such attribute" in r.stderr, r.returncode)
        r = as_nobody("getfattr", "--only-values", "-n", "security.test", path)
        seen[path.name + " security as nobody"] = (r.stdout, r.returncode)
        r = as_nobody("setfattr", "-n", "security.test", "-v", "other", path)
        seen[path.name + " security write as nobody"] = r.returncode != 0
        try:
            os.setxattr(path, "system.nonsense", b"x")
            seen[path.name + " system.*"] = "ok"
        except OSError as e:
            seen[path.name + " system.*"] = errno.errorcode[e.errno]
        os.removexattr(path, "trusted.overlay.opaque")
        seen[path.name + " after remove"] = sorted(os.listxattr(path))
    return seen


def test_xattr_namespaces_match_ext4(side_by_side):
    mnt, reference = side_by_side
    ours, theirs = namespace_workload(mnt), namespace_workload(reference)
    assert ours == theirs


def capability_workload(root: Path) -> list:
    # A version 2 file capability (VFS_CAP_REVISION_2, effective): cap_net_raw permitted.
    cap = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
    path = root / "tool"
    path.write_bytes(b"#!/bin/sh\n")
    seen = []
    os.setxattr(path, "security.capability", cap)
    seen.append(("set", os.listxattr(path), os.getxattr(path, "security.capability")))
    with open(path, "ab") as f:
        f.write(b"exit 0\n")
    seen.append(("after write", os.listxattr(path)))
    os.setxattr(path, "security.capability", cap)
    os.truncate(path, 4)
    seen.append(("after truncate", os.listxattr(path)))
    os.setxattr(path, "security.capability", cap)
    os.chown(path, 0, 0)
    seen.append(("after chown", os.listxattr(path)))
    os.setxattr(path, "security.capability", cap)
    os.chmod(path, 0o755)
    seen.append(("chmod keeps it", os.listxattr(path)))
    return seen


def test_security_capability_is_cleared_as_on_ext4(side_by_side):
    mnt, reference = side_by_side
    assert capability_workload(mnt) == capability_workload(reference)


def whiteout_workload(root: Path) -> list:
    (root / "a").write_text("a")
    (root / "d").mkdir()
    renameat2(root / "a", root / "d" / "moved", RENAME_WHITEOUT)
    seen = []
    st = os.lstat(root / "a")
    seen.append(("whiteout", stat.S_ISCHR(st.st_mode), os.major(st.st_rdev), os.minor(st.st_rdev), st.st_mode & 0o7777))
    seen.append(("moved", (root / "d" / "moved").read_text()))
    (root / "b").write_text("b")
    (root / "c").write_text("c")
    seen.append(("noreplace", expect_errno(errno.EEXIST, renameat2, root / "b", root / "c",
                                           RENAME_WHITEOUT | RENAME_NOREPLACE).errno))
    seen.append(("with exchange", expect_errno(errno.EINVAL, renameat2, root / "b", root / "c",
                                               RENAME_WHITEOUT | RENAME_EXCHANGE).errno))
    renameat2(root / "b", root / "c", RENAME_WHITEOUT)
    seen.append(("replaced", (root / "c").read_text(), stat.S_ISCHR(os.lstat(root / "b").st_mode)))
    return seen


def test_whiteout_rename_matches_ext4(side_by_side):
    mnt, reference = side_by_side
    assert whiteout_workload(mnt) == whiteout_workload(reference)


def merged_view(root: Path) -> dict:
    view = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            view[rel] = "dir" if path.is_dir() else path.read_text()
    return view


def overlay_workload(lower: Path, upper_base: Path, merged: Path) -> list:
    upper, work = upper_base / "upper", upper_base / "work"
    upper.mkdir()
    work.mkdir()
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], check=True, capture_output=True)
    views = []
    try:
        (merged / "gone").unlink()                     # a whiteout
        (merged / "renamed").rename(merged / "moved")  # RENAME_WHITEOUT over the lower name
        shutil.rmtree(merged / "replaced")
        (merged / "replaced").mkdir()                  # an opaque directory (trusted.overlay.opaque)
        (merged / "replaced" / "fresh").write_text("fresh")
        (merged / "kept").write_text("changed")        # copy-up
        (merged / "new").write_text("new")
        views.append(merged_view(merged))
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], check=True, capture_output=True)
    try:
        views.append(merged_view(merged))
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    return views


def test_overlayfs_upper_and_work_on_encfsd(public_volume, tmp_path):
    """overlayfs with its upper and work directories on encfsd (trusted.* xattrs, whiteouts,
    opaque directories) shows what the same overlay shows with them on ext4, before and after
    both are mounted again."""
    lower = tmp_path / "lower"
    (lower / "replaced").mkdir(parents=True)
    (lower / "replaced" / "old").write_text("old")
    for name in ["gone", "renamed", "kept"]:
        (lower / name).write_text(name)
    merged = tmp_path / "merged"
    merged.mkdir()
    reference = tmp_path / "reference"
    reference.mkdir()
    theirs = overlay_workload(lower, reference, merged)
    v = public_volume.mount()
    ours = overlay_workload(lower, v.mnt, merged)
    assert ours == theirs
    v.remount()
    ours_after = overlay_workload_reopen(lower, v.mnt, merged)
    assert ours_after == theirs[-1]


def overlay_workload_reopen(lower: Path, upper_base: Path, merged: Path) -> dict:
    options = f"lowerdir={lower},upperdir={upper_base / 'upper'},workdir={upper_base / 'work'}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], check=True, capture_output=True)
    try:
        return merged_view(merged)
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def rewind_workload(root: Path) -> list:
    (root / "d").mkdir()
    (root / "d" / "early").write_text("")
    dirp = libc.opendir(os.fsencode(root / "d"))
    assert dirp
    try:
        first = read_names(dirp)
        (root / "d" / "late").write_text("")
        libc.rewinddir(dirp)
        second = read_names(dirp)
    finally:
        libc.closedir(dirp)
    return [sorted(first), sorted(second)]


class _Dirent(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_ulong), ("d_off", ctypes.c_long), ("d_reclen", ctypes.c_ushort),
                ("d_type", ctypes.c_ubyte), ("d_name", ctypes.c_char * 256)]


libc.opendir.restype = ctypes.c_void_p
libc.opendir.argtypes = [ctypes.c_char_p]
libc.readdir.restype = ctypes.POINTER(_Dirent)
libc.readdir.argtypes = [ctypes.c_void_p]
libc.rewinddir.argtypes = [ctypes.c_void_p]
libc.closedir.argtypes = [ctypes.c_void_p]


def read_names(dirp) -> list:
    names = []
    while entry := libc.readdir(dirp):
        names.append(entry.contents.d_name.decode())
    return names


def test_rewinddir_shows_entries_made_since_opendir(side_by_side):
    mnt, reference = side_by_side
    ours = rewind_workload(mnt)
    assert ours == rewind_workload(reference)
    assert "late" in ours[1] and "late" not in ours[0]


def test_new_objects_have_one_instant_and_later_ones_are_not_older(volume):
    made = []
    root = volume.mnt
    os.close(os.open(root / "file", os.O_CREAT | os.O_WRONLY, 0o644))
    made.append("file")
    os.symlink("file", root / "link")
    made.append("link")
    (root / "dir").mkdir()
    made.append("dir")
    os.mkfifo(root / "fifo")
    made.append("fifo")
    os.symlink("t" * 3000, root / "longlink")
    made.append("longlink")
    previous = 0
    for name in made:
        st = os.lstat(root / name)
        assert st.st_atime_ns == st.st_mtime_ns, (name, st)
        if BACKING == "bindfs":
            # bindfs's own FUSE client turns "now" into explicit times, so the backing's ctime is
            # the later instant at which bindfs applied them (README, backings table).
            assert st.st_ctime_ns >= st.st_mtime_ns, (name, st)
        else:
            assert st.st_mtime_ns == st.st_ctime_ns, (name, st)
        assert st.st_mtime_ns >= previous, f"{name} is older than the object made before it"
        previous = st.st_mtime_ns


def test_chown_to_the_same_owner_moves_ctime_as_on_ext4(side_by_side):
    mnt, reference = side_by_side
    moved = []
    for root in (mnt, reference):
        path = root / "f"
        path.write_text("x")
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
        before = os.stat(path).st_ctime_ns
        # ctime has nanosecond resolution on both: wait until the clock has moved past it.
        while time.time_ns() <= before:
            pass
        os.chown(path, -1, -1)
        moved.append(os.stat(path).st_ctime_ns > before)
    assert moved == [True, True]


def test_utimens_atime_survives_remount(volume):
    past, future = 1_000_000_000_123, 4_000_000_000_456_000_000
    (volume.mnt / "past").write_text("p")
    (volume.mnt / "future").write_text("f")
    (volume.mnt / "dir").mkdir()
    os.utime(volume.mnt / "past", ns=(past, past))
    os.utime(volume.mnt / "future", ns=(future, past))
    os.utime(volume.mnt / "dir", ns=(past, past))
    volume.remount()
    # The daemon's own reads (headers at lookup, extents at read) leave the stored atime alone.
    assert os.stat(volume.mnt / "future").st_atime_ns == future
    assert os.stat(volume.mnt / "past").st_atime_ns == past
    assert os.stat(volume.mnt / "dir").st_atime_ns == past


def test_locked_view_lists_objects_with_acls_and_labels(public_volume):
    """Without the key, the kernel's ACL fetch before a permission check and ls's security.*
    probes must read as absent, not fail: the locked view stays listable, by root and by others."""
    v = public_volume.mount(options="allow_other")
    os.chmod(v.mnt, 0o755)
    d = v.mnt / "d"
    d.mkdir(mode=0o755)
    (d / "f").write_text("x")
    setfacl("-m", "u:1000:r", d / "f")
    setfacl("-d", "-m", "u:1000:rx", d)
    os.setxattr(d / "f", "security.test", b"label")
    v.unmount()
    v.mount(unlock=False, options="allow_other")
    r = subprocess.run(["ls", "-lR", str(v.mnt)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    (locked_dir,) = [p for p in v.mnt.iterdir()]
    r = as_nobody("ls", "-l", locked_dir)
    assert r.returncode == 0 and r.stderr == "", r.stderr
