"""Inode flags and atimes on a real mount (issue 12), side by side with ext4 and tmpfs.

chattr/lsattr (FS_IOC_GETFLAGS/SETFLAGS through the kernel's fileattr path) must give the same
flags as on ext4, and every operation a flag forbids must fail there with ext4's EPERM: the kernel
enforces none of them for FUSE, so the daemon does. The restricted ioctl form (FS_IOC32_SETFLAGS,
which reaches the daemon without the kernel's owner and capability checks) is refused by the
daemon's own. Atimes follow the mount's option as on a tmpfs mounted with the same option: a read
after a utimens to the past moves the atime once under relatime, at every read under strictatime,
never under noatime (nor for FS_NOATIME_FL files, O_NOATIME opens, or directories under
nodiratime); an atime update never moves the ctime, and it survives a remount."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Volume, expect_errno, run
from test_posix import NOBODY, killed_and_remounted, public_volume  # noqa: F401 (a fixture)

FS_IOC_GETFLAGS = 0x80086601
FS_IOC32_SETFLAGS = 0x40046602
FS_IMMUTABLE_FL, FS_APPEND_FL, FS_NODUMP_FL = 0x10, 0x20, 0x40
O_NOATIME = 0o1000000
# The letters lsattr prints for the flags encfsd keeps (E, encrypted, is encfsd's alone; e,
# extents, ext4's).
KEPT = set("iaAdSD")
PAST_NS = 978_307_200 * 10**9 + 123_456_789  # 2001-01-01, no clock of a test run


# A program that sets its argv[1]'s flags to argv[2] by FS_IOC32_SETFLAGS and prints ok or the errno.
RESTRICTED_SETTER = ("import fcntl, os, struct, sys\n"
                     "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
                     "try:\n"
                     f"    fcntl.ioctl(fd, {FS_IOC32_SETFLAGS}, struct.pack('<I', int(sys.argv[2])))\n"
                     "    print('ok')\n"
                     "except OSError as e:\n"
                     "    print(e.errno)\n")


def lsattr(path: Path) -> str:
    out = run("lsattr", "-d", path).stdout.split()[0]
    return "".join(sorted(set(out) & KEPT))


def chattr(path: Path, spec: str) -> str:
    r = subprocess.run(["chattr", spec, str(path)], capture_output=True, text=True)
    return "ok" if r.returncode == 0 else r.stderr.strip().split(" while ")[0].split(": ", 1)[-1]


def chattr_workload(root: Path) -> list:
    (root / "f").write_bytes(b"contents\n")
    (root / "d").mkdir()
    seen = []
    for target, spec in [("f", "+i"), ("f", "-i"), ("f", "+a"), ("f", "-a"), ("f", "+A"), ("f", "+d"), ("f", "+S"),
                         ("f", "-AdS"), ("f", "+D"), ("d", "+D"), ("d", "+i"), ("d", "-i"), ("d", "+a"), ("d", "+AdS"),
                         ("d", "-aAdSD"), ("f", "+iaAdS"), ("f", "-iaAdS")]:
        seen.append((target, spec, chattr(root / target, spec), lsattr(root / target)))
    # What new objects take from their directory.
    assert chattr(root / "d", "+aAdSD") == "ok"
    (root / "d" / "file").write_bytes(b"")
    (root / "d" / "dir").mkdir()
    os.symlink("file", root / "d" / "link")
    # (A FIFO or device inherits too, but FUSE sends flag ioctls for files and directories only.)
    seen += [(name, lsattr(root / "d" / name)) for name in ("file", "dir")]
    assert chattr(root / "d", "-aAdSD") == "ok"
    return seen


def test_chattr_and_lsattr_match_ext4(volume, ext4_dir):
    ext4, mnt = ext4_dir / "t", volume.mnt / "t"
    ext4.mkdir()
    mnt.mkdir()
    assert chattr_workload(mnt) == chattr_workload(ext4)
    assert run("lsattr", "-d", mnt / "f").stdout.split()[0].count("E") == 1  # every object is encrypted


def outcome(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]


def file_operations(root: Path, flag: int) -> dict:
    """Everything a file's immutable or append-only flag may forbid, on `f` (made by `prepare`);
    `held` was opened read-write before the flag was set."""
    f, results = root / "f", {}
    held = os.open(f, os.O_RDWR)
    try:
        set_flag(f, flag)
        def opened(flags):
            fd = os.open(f, flags)
            try:
                if flags & os.O_ACCMODE != os.O_RDONLY:
                    os.write(fd, b"+")
                else:
                    os.read(fd, 100)
            finally:
                os.close(fd)
        results["read"] = outcome(lambda: opened(os.O_RDONLY))
        results["open for writing"] = outcome(lambda: opened(os.O_WRONLY))
        results["open read-write"] = outcome(lambda: opened(os.O_RDWR))
        results["open to append"] = outcome(lambda: opened(os.O_WRONLY | os.O_APPEND))
        results["open to truncate"] = outcome(lambda: opened(os.O_WRONLY | os.O_APPEND | os.O_TRUNC))
        results["write at the end, held fd"] = outcome(lambda: os.pwrite(held, b"e", os.fstat(held).st_size))
        results["write in the middle, held fd"] = outcome(lambda: os.pwrite(held, b"m", 1))
        results["ftruncate, held fd"] = outcome(lambda: os.ftruncate(held, 2))
        results["fallocate, held fd"] = outcome(lambda: os.posix_fallocate(held, 0, 65536))
        results["truncate"] = outcome(lambda: os.truncate(f, 1))
        results["chmod"] = outcome(lambda: os.chmod(f, 0o600))
        results["chown"] = outcome(lambda: os.chown(f, 0, 0))
        results["utimens explicit"] = outcome(lambda: os.utime(f, ns=(PAST_NS, PAST_NS)))
        results["utimens now"] = outcome(lambda: os.utime(f))
        results["setxattr"] = outcome(lambda: os.setxattr(f, "user.new", b"1"))
        results["removexattr"] = outcome(lambda: os.removexattr(f, "user.old"))
        results["link"] = outcome(lambda: os.link(f, root / "link"))
        results["rename it"] = outcome(lambda: os.rename(f, root / "moved"))
        results["rename onto it"] = outcome(lambda: os.rename(root / "other", f))
        results["unlink"] = outcome(lambda: os.unlink(f))
        results["contents"] = f.read_bytes() if f.exists() else None
    finally:
        os.close(held)
        for name in ("f", "moved"):
            if (root / name).exists():
                set_flag(root / name, 0)
    return results


def directory_operations(root: Path, flag: int) -> dict:
    """Everything a directory's immutable or append-only flag may forbid."""
    d, results = root / "d", {}
    set_flag(d, flag)
    try:
        results["list"] = outcome(lambda: os.listdir(d))
        results["create"] = outcome(lambda: (d / "new").write_bytes(b"n"))
        results["mkdir"] = outcome(lambda: (d / "newdir").mkdir())
        results["symlink"] = outcome(lambda: os.symlink("target", d / "link"))
        results["link in"] = outcome(lambda: os.link(root / "other", d / "hard"))
        results["rename in"] = outcome(lambda: os.rename(root / "other2", d / "moved-in"))
        results["rename out"] = outcome(lambda: os.rename(d / "e", root / "moved-out"))
        results["rename onto an entry"] = outcome(lambda: os.rename(root / "other3", d / "e2"))
        results["unlink an entry"] = outcome(lambda: os.unlink(d / "e3"))
        results["rmdir an entry"] = outcome(lambda: os.rmdir(d / "sub"))
        results["write an entry"] = outcome(lambda: (d / "e4").write_bytes(b"changed"))
        results["chmod"] = outcome(lambda: os.chmod(d, 0o700))
        results["setxattr"] = outcome(lambda: os.setxattr(d, "user.new", b"1"))
        results["rename it"] = outcome(lambda: os.rename(d, root / "d2"))
        results["entries"] = sorted(os.listdir(d if d.exists() else root / "d2"))
    finally:
        set_flag(d if d.exists() else root / "d2", 0)
    return results


def set_flag(path: Path, flags: int):
    """FS_IOC_SETFLAGS through the kernel (as chattr does), keeping nothing else."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, 0x40086602, struct.pack("<q", flags))
    finally:
        os.close(fd)


def prepare(root: Path) -> Path:
    root.mkdir()
    r = root
    (r / "f").write_bytes(b"0123456789")
    os.setxattr(r / "f", "user.old", b"1")
    for name in ("other", "other2", "other3"):
        (r / name).write_bytes(b"x")
    (r / "d").mkdir()
    for name in ("e", "e2", "e3", "e4"):
        (r / "d" / name).write_bytes(b"y")
    (r / "d" / "sub").mkdir()
    return r


@pytest.mark.parametrize("flag", [FS_IMMUTABLE_FL, FS_APPEND_FL], ids=["immutable", "append-only"])
def test_what_a_flag_forbids_matches_ext4(volume, ext4_dir, flag):
    sides = {}
    for label, base in (("ext4", ext4_dir), ("encfsd", volume.mnt)):
        files = file_operations(prepare(base / "files"), flag)
        directories = directory_operations(prepare(base / "dirs"), flag)
        sides[label] = (files, directories)
    for i in (0, 1):
        diff = {k: (sides["encfsd"][i].get(k), sides["ext4"][i].get(k)) for k in sides["ext4"][i] if sides["encfsd"][i].get(k) != sides["ext4"][i].get(k)}
        assert diff == {}, diff


def files_of_two_owners(public_volume) -> tuple[Path, Path]:
    """Mounts `public_volume` for every user and makes a file of root's and one of nobody's."""
    v = public_volume.mount(options="allow_other")
    mine, theirs = v.mnt / "mine", v.mnt / "theirs"
    mine.write_bytes(b"root's")
    os.chmod(mine, 0o644)
    theirs.write_bytes(b"nobody's")
    os.chown(theirs, NOBODY, NOBODY)
    return mine, theirs


def test_restricted_setflags_is_checked_by_the_daemon(public_volume):
    """FS_IOC32_SETFLAGS from a 64-bit caller reaches the daemon as a plain FUSE ioctl, past the
    kernel's fileattr checks: the daemon checks the owner and CAP_LINUX_IMMUTABLE itself."""
    mine, theirs = files_of_two_owners(public_volume)
    setter = RESTRICTED_SETTER

    def as_nobody(path, flags):
        r = subprocess.run(["python3", "-c", setter, str(path), str(flags)], user=NOBODY, group=NOBODY,
                           capture_output=True, text=True, check=True)
        return r.stdout.strip()

    assert as_nobody(theirs, FS_NODUMP_FL) == "ok"  # the owner sets an ordinary flag
    assert as_nobody(mine, FS_NODUMP_FL) == str(errno.EPERM)  # not the owner, no CAP_FOWNER
    assert as_nobody(theirs, FS_NODUMP_FL | FS_APPEND_FL) == str(errno.EPERM)  # no CAP_LINUX_IMMUTABLE
    # Root without CAP_LINUX_IMMUTABLE either.
    r = subprocess.run(["setpriv", "--inh-caps=-linux_immutable", "--bounding-set=-linux_immutable",
                        "python3", "-c", setter, str(mine), str(FS_IMMUTABLE_FL)], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == str(errno.EPERM)
    assert lsattr(mine) == "" and lsattr(theirs) == "d"
    # An unknown flag is EOPNOTSUPP, as ext4 answers for flags it cannot set.
    fd = os.open(mine, os.O_RDONLY)
    try:
        expect_errno(errno.EOPNOTSUPP, fcntl.ioctl, fd, FS_IOC32_SETFLAGS, struct.pack("<I", 0x4))  # FS_COMPR_FL
        flags = struct.unpack("<q", fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8)))[0]
        assert flags == 0x800  # FS_ENCRYPT_FL only
    finally:
        os.close(fd)


def test_flags_survive_remount_and_sync_flag_writes_survive_a_kill(volume):
    f, d = volume.mnt / "f", volume.mnt / "d"
    f.write_bytes(b"")
    d.mkdir()
    assert chattr(f, "+S") == "ok" and chattr(d, "+D") == "ok"
    fd = os.open(f, os.O_WRONLY)
    os.write(fd, b"durable at once")  # no fsync, no close: FS_SYNC_FL commits it before the reply
    killed_and_remounted(volume)
    expect_errno(errno.ENOTCONN, os.close, fd)  # the descriptor belonged to the killed daemon's mount
    assert f.read_bytes() == b"durable at once"
    assert chattr(f, "+i") == "ok"
    volume.remount()
    assert lsattr(f) == "Si" and lsattr(d) == "D"
    expect_errno(errno.EPERM, os.unlink, f)
    assert chattr(f, "-i") == "ok"


def test_a_version_2_store_refuses_flags_until_upgraded(tmp_path, encfsd_bin):
    v = Volume.golden(encfsd_bin, tmp_path, "v2")
    try:
        v.mount(by_key_file=True)
        assert chattr(v.mnt / "one-byte", "+d") == "Operation not supported"
        assert lsattr(v.mnt / "one-byte") == ""
        v.unmount()
        assert "run `encfsd upgrade" in v.daemon_log()
        run(encfsd_bin, "upgrade", v.store)
        v.mount(by_key_file=True)
        assert chattr(v.mnt / "one-byte", "+d") == "ok"
        v.remount(unlock=False)
        v.add_key()
        assert lsattr(v.mnt / "one-byte") == "d"
        v.unmount()
    finally:
        v.force_cleanup()


# Atimes

def atime_workload(root: Path) -> list:
    """What each step did to the atime and the ctime: (step, atime moved, ctime moved)."""
    f, d, plain = root / "f", root / "d", root / "plain"
    f.write_bytes(b"to be read\n" * 100)
    plain.write_bytes(b"to be read\n")
    d.mkdir()
    (d / "entry").write_bytes(b"")
    subprocess.run(["chattr", "+A", str(plain)], check=True)
    steps = []

    def step(label, path, action):
        before = os.stat(path)
        action()
        after = os.stat(path)
        steps.append((label, after.st_atime_ns != before.st_atime_ns, after.st_ctime_ns != before.st_ctime_ns))

    def read(path, flags=0):
        fd = os.open(path, os.O_RDONLY | flags)
        try:
            os.read(fd, 1 << 20)
        finally:
            os.close(fd)

    def set_atime(path, ns):
        os.utime(path, ns=(ns, os.stat(path).st_mtime_ns))

    for path in (f, d, plain):
        set_atime(path, PAST_NS)
    step("read after utimens to the past", f, lambda: read(f))
    # An atime after the mtime and ctime and not a day old: relatime leaves it, strictatime moves
    # it (back to now: a change whatever the clock's granularity).
    set_atime(f, time.time_ns() + 3600 * 10**9)
    step("read with a recent atime", f, lambda: read(f))
    step("O_NOATIME read", f, lambda: read(f, O_NOATIME))
    step("stat", f, lambda: os.stat(f))
    step("read of an FS_NOATIME_FL file", plain, lambda: read(plain))
    step("list after utimens to the past", d, lambda: os.listdir(d))
    set_atime(d, time.time_ns() + 3600 * 10**9)
    step("list with a recent atime", d, lambda: os.listdir(d))
    set_atime(f, PAST_NS)  # a moved atime is then a change whatever the clock's granularity
    step("write", f, lambda: f.write_bytes(b"rewritten"))
    step("read after a write", f, lambda: read(f))
    return steps


@pytest.fixture
def tmpfs(tmp_path):
    mounts = []

    def mount(options: str) -> Path:
        where = tmp_path / f"tmpfs{len(mounts)}"
        where.mkdir()
        run("mount", "-t", "tmpfs", "-o", options, "tmpfs", where)
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        run("umount", where, check=False)


@pytest.mark.parametrize("option", ["relatime", "strictatime", "noatime", "relatime,nodiratime", "strictatime,lazytime"])
def test_atime_follows_the_mount_option_as_on_tmpfs(make_volume, tmpfs, option):
    v = make_volume(mount=False)
    v.mount(options=option)
    tmpfs_options = option.replace(",lazytime", "")
    assert atime_workload(v.mnt) == atime_workload(tmpfs(tmpfs_options))
    # What the reads left survives a remount, and the ctime with it.
    kept = {name: os.stat(v.mnt / name) for name in ("f", "d", "plain")}
    v.unmount()
    v.mount(options=option)
    for name, before in kept.items():
        after = os.stat(v.mnt / name)
        assert (after.st_atime_ns, after.st_ctime_ns, after.st_mtime_ns) == (before.st_atime_ns, before.st_ctime_ns, before.st_mtime_ns), name


def test_an_open_that_moves_the_atime_tells_the_kernel_at_the_read(make_volume, tmpfs):
    """The atime an open moves reaches the kernel's attribute cache at the first read the daemon
    serves or at the close, not at the open: a reader's fstat right after its open is answered
    from the cache, with the atime from before, as on tmpfs (where the atime moves at the read)."""
    v = make_volume()

    def workload(root: Path):
        f = root / "f"
        f.write_bytes(b"x" * 100_000)
        os.utime(f, ns=(PAST_NS, os.stat(f).st_mtime_ns))
        seen = [os.stat(f).st_atime_ns == PAST_NS]
        fd = os.open(f, os.O_RDONLY)
        try:
            seen.append(os.fstat(fd).st_atime_ns == PAST_NS)
            # Its pages leave the cache, so the read reaches the filesystem.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.read(fd, 100_000) == b"x" * 100_000
            seen.append(os.fstat(fd).st_atime_ns == PAST_NS)
        finally:
            os.close(fd)
        seen.append(os.stat(f).st_atime_ns == PAST_NS)
        # An open and close with no read between: the close tells the kernel.
        os.utime(f, ns=(PAST_NS, os.stat(f).st_mtime_ns))
        os.close(os.open(f, os.O_RDONLY))
        seen.append(os.stat(f).st_atime_ns == PAST_NS)
        return seen

    ours = workload(v.mnt)
    assert ours[:4] == workload(tmpfs("relatime"))[:4] == [True, True, False, False]
    # tmpfs moves no atime without a read; encfsd counts the open (its reads may never reach it).
    assert ours[4] is False


def test_a_read_only_mount_moves_no_atime(make_volume):
    """As on any read-only mount: reads through `-o ro` leave the atime, in the kernel's view and
    in the store."""
    v = make_volume()
    f = v.mnt / "f"
    f.write_bytes(b"x" * 10_000)
    os.utime(f, ns=(PAST_NS, os.stat(f).st_mtime_ns))
    v.unmount()
    v.mount(options="ro")
    with open(f, "rb") as r:
        os.posix_fadvise(r.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert r.read() == b"x" * 10_000
    assert os.stat(f).st_atime_ns == PAST_NS
    v.unmount()
    v.mount()
    assert os.stat(f).st_atime_ns == PAST_NS


def test_noatime_reaches_the_vfs_mount(make_volume):
    v = make_volume(mount=False)
    v.mount(options="noatime")
    with open("/proc/self/mountinfo") as f:
        line = next(line for line in f if line.split()[4] == str(v.mnt))
    assert "noatime" in line.split()[5].split(",")
