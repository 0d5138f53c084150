"""Attacks on this period's new code (review 3). From a caller of the mount: the inode flags the
daemon enforces, where the kernel's own checks do not reach a FUSE filesystem (capabilities of a
user namespace, O_APPEND cleared by fcntl, copy_file_range, ACLs, O_DIRECT, shared mappings, the
locked view). From whoever can write the backing store: the xattr side object directory moved
out while mounted, replaced by a symlink or a file, a directory at the next generation's name."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import expect_errno, run
from test_inode_flags import (FS_APPEND_FL, FS_IMMUTABLE_FL, RESTRICTED_SETTER, files_of_two_owners, lsattr, outcome,
                              set_flag)
from test_posix import NOBODY, public_volume  # noqa: F401 (a fixture)
from test_xattr_side import SIDE


def test_capabilities_of_a_user_namespace_do_not_count(public_volume):
    """An unprivileged user who makes its own user namespace has every capability there (its
    /proc status shows a full CapEff) but none over the mount: ext4 asks for CAP_LINUX_IMMUTABLE
    in the initial namespace and CAP_FOWNER over an owner mapped into the caller's. Through the
    restricted FS_IOC32_SETFLAGS, which the kernel passes to the daemon unchecked, such a caller
    must not set immutable on its own file, nor touch the flags of root's."""
    roots, own = files_of_two_owners(public_volume)

    def in_own_namespace(path, flags):
        r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                            "unshare", "--user", "--map-root-user", "python3", "-c", RESTRICTED_SETTER, str(path), str(flags)],
                           capture_output=True, text=True, check=True)
        return r.stdout.strip()

    assert in_own_namespace(own, FS_IMMUTABLE_FL) == str(errno.EPERM)
    assert in_own_namespace(roots, FS_APPEND_FL) == str(errno.EPERM)
    assert lsattr(own) == "" and lsattr(roots) == ""
    # Nor does such a caller's CAP_SYS_ADMIN show it trusted.* names in a listing.
    os.setxattr(roots, "trusted.secret", b"1")
    lister = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                             "unshare", "--user", "--map-root-user", "python3", "-c",
                             "import os, sys; print(os.listxattr(sys.argv[1]))", str(roots)],
                            capture_output=True, text=True, check=True)
    assert "trusted.secret" not in lister.stdout and "trusted.secret" in os.listxattr(roots)


def append_only_descriptor_games(path: Path) -> dict:
    """A descriptor opened with O_APPEND on an append-only file, O_APPEND then cleared."""
    path.write_bytes(b"0123456789")
    set_flag(path, FS_APPEND_FL)
    results = {}
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        results["clear O_APPEND"] = outcome(lambda: fcntl.fcntl(fd, fcntl.F_SETFL, 0))
        results["write at 0"] = outcome(lambda: os.pwrite(fd, b"X", 0))
        results["write at the end"] = outcome(lambda: os.pwrite(fd, b"+", os.fstat(fd).st_size))
    finally:
        os.close(fd)
    set_flag(path, 0)
    results["contents"] = path.read_bytes()
    return results


def test_an_append_only_file_keeps_its_start(volume, ext4_dir):
    """ext4 refuses to clear O_APPEND on a descriptor of an append-only file (fcntl's setfl tests
    IS_APPEND, which FUSE never sets, so on encfsd the fcntl succeeds): a descriptor the daemon
    let open only because it said O_APPEND must still write nowhere but at the end."""
    ext4 = append_only_descriptor_games(ext4_dir / "log")
    encfsd = append_only_descriptor_games(volume.mnt / "log")
    assert ext4 == {"clear O_APPEND": "EPERM", "write at 0": "ok", "write at the end": "ok", "contents": b"0123456789X+"}
    assert encfsd == {"clear O_APPEND": "ok", "write at 0": "EPERM", "write at the end": "ok", "contents": b"0123456789+"}
    # A descriptor opened with O_APPEND before the flag was set is held to it too (ext4's fcntl
    # tests the flag at the call); one opened without O_APPEND writes anywhere, as on ext4.
    f = volume.mnt / "early"
    f.write_bytes(b"0123456789")
    early = os.open(f, os.O_WRONLY | os.O_APPEND)
    plain = os.open(f, os.O_WRONLY)
    try:
        set_flag(f, FS_APPEND_FL)
        fcntl.fcntl(early, fcntl.F_SETFL, 0)
        assert outcome(lambda: os.pwrite(early, b"X", 0)) == "EPERM"
        assert outcome(lambda: os.pwrite(plain, b"Y", 1)) == "ok"
    finally:
        os.close(early)
        os.close(plain)
        set_flag(f, 0)
    assert f.read_bytes() == b"0Y23456789"


def test_side_object_directory_moved_out_of_the_store_gets_no_writes(volume, tmp_path):
    """`.xattrs` is opened once and kept. Someone who can write the backing store moves it out
    (to a directory of theirs on the same filesystem) while the store is mounted: encfsd must
    neither create a side object there nor remove one, as it refuses for a moved journal."""
    f = volume.mnt / "f"
    f.write_bytes(b"contents")
    os.setxattr(f, "user.big", b"\1" * 65536)  # past what the backing takes: a side object
    [first] = os.listdir(volume.store / SIDE)
    outside = volume.store.parent / "outside-the-store"
    os.rename(volume.store / SIDE, outside)
    try:
        expect_errno(errno.EIO, os.setxattr, f, "user.second", b"\2" * 65536)
        assert os.listdir(outside) == [first]
    finally:
        os.rename(outside, volume.store / SIDE)
    # Back in place, the object's xattrs are what they were and change again.
    assert os.getxattr(f, "user.big") == b"\1" * 65536
    os.setxattr(f, "user.second", b"\2" * 65536)
    assert sorted(os.listxattr(f)) == ["user.big", "user.second"]


def plant_symlink_to_a_copy(store: Path, outside: Path):
    shutil.copytree(store / SIDE, outside)
    shutil.rmtree(store / SIDE)
    os.symlink(outside, store / SIDE)


def plant_file(store: Path, outside: Path):
    outside.mkdir()
    shutil.rmtree(store / SIDE)
    (store / SIDE).write_bytes(b"not a directory")


@pytest.mark.parametrize("plant", [plant_symlink_to_a_copy, plant_file], ids=lambda p: p.__name__)
def test_something_planted_as_the_side_object_directory(volume, plant):
    """`.xattrs` replaced while unmounted by a symlink to a copy of itself outside the store, or a
    file: the objects whose headers name side objects read EIO for their xattrs only, a change
    makes nothing outside, and objects without side objects keep their xattrs."""
    f, plain = volume.mnt / "f", volume.mnt / "plain"
    f.write_bytes(b"contents")
    plain.write_bytes(b"plain")
    os.setxattr(f, "user.big", b"\1" * 65536)
    os.setxattr(plain, "user.small", b"s")
    volume.unmount()
    outside = volume.store.parent / "outside-the-store"
    plant(volume.store, outside)
    before = sorted(os.listdir(outside))
    volume.mount()
    expect_errno(errno.EIO, os.getxattr, f, "user.big")
    expect_errno(errno.EIO, os.setxattr, f, "user.second", b"\2" * 65536)
    expect_errno(errno.EIO, os.setxattr, plain, "user.big", b"\3" * 65536)
    assert f.read_bytes() == b"contents"
    assert os.getxattr(plain, "user.small") == b"s"
    assert sorted(os.listdir(outside)) == before


def test_a_directory_planted_at_the_next_generation(volume):
    """A directory (which unlink cannot remove) at the name the next generation will take: the
    change fails, and the object keeps the set it had, before and after a remount."""
    f = volume.mnt / "f"
    f.write_bytes(b"contents")
    os.setxattr(f, "user.big", b"\1" * 65536)
    [current] = os.listdir(volume.store / SIDE)
    object_id, generation = current.split(".")
    (volume.store / SIDE / f"{object_id}.{int(generation, 16) + 1:016x}").mkdir()
    try:
        os.setxattr(f, "user.second", b"\2" * 65536)
        changed = True
    except OSError as e:
        assert e.errno in (errno.EIO, errno.EISDIR), e
        changed = False
    expected = ["user.big", "user.second"] if changed else ["user.big"]
    assert sorted(os.listxattr(f)) == expected
    volume.unmount()
    volume.mount()
    assert sorted(os.listxattr(f)) == expected and os.getxattr(f, "user.big") == b"\1" * 65536


MAP_AND_WRITE = ("import mmap, os, sys\n"
                 "fd = os.open(sys.argv[1], os.O_RDWR | os.O_APPEND)\n"
                 "try:\n"
                 "    m = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)\n"
                 "    m[0:1] = b'M'\n"
                 "    m.flush()\n"
                 "    print('ok')\n"
                 "except OSError as e:\n"
                 "    print(e.errno)\n")


def immutable_side_doors(root: Path) -> dict:
    """Ways to change an immutable file that pass beside write(2) and setattr, through a
    descriptor opened read-write before the flag was set."""
    f, source = root / "f", root / "source"
    f.write_bytes(b"0123456789" * 500)
    source.write_bytes(b"S" * 100)
    held = os.open(f, os.O_RDWR)
    src = os.open(source, os.O_RDONLY)
    run("chattr", "+i", f)  # chattr keeps ext4's extents flag, which clearing it would refuse
    try:
        results = {
            "copy_file_range": outcome(lambda: os.copy_file_range(src, held, 10, 0, 0)),
            "setfacl": "ok" if subprocess.run(["setfacl", "-m", f"u:{NOBODY}:rwx", str(f)], capture_output=True).returncode == 0 else "refused",
            "open O_DIRECT read-write": outcome(lambda: os.close(os.open(f, os.O_RDWR | os.O_DIRECT))),
        }
    finally:
        os.close(src)
        os.close(held)
        run("chattr", "-i", f)
    results["contents"] = f.read_bytes() == b"0123456789" * 500
    return results


def test_immutable_file_side_doors_match_ext4(volume, ext4_dir):
    assert immutable_side_doors(volume.mnt) == immutable_side_doors(ext4_dir)


def test_shared_mapping_of_an_append_only_file_writes_nothing(volume, ext4_dir):
    """ext4 refuses a writable shared mapping of an append-only file (IS_APPEND in mmap), which a
    FUSE inode never shows: on encfsd the mapping is made, and its writeback through the O_APPEND
    handle is refused (msync gives EPERM), so the backing keeps the file's start. (The kernel keeps
    the refused page in its cache until it drops it: a remount shows what is stored.)"""
    results = {}
    for label, base in (("ext4", ext4_dir), ("encfsd", volume.mnt)):
        f = base / "log"
        f.write_bytes(b"0123456789" * 500)
        run("chattr", "+a", f)
        results[label] = subprocess.run(["python3", "-c", MAP_AND_WRITE, str(f)], capture_output=True, text=True, check=True).stdout.strip()
        run("chattr", "-a", f)
    assert results == {"ext4": str(errno.EACCES), "encfsd": str(errno.EPERM)}
    volume.remount()
    assert (volume.mnt / "log").read_bytes() == b"0123456789" * 500


def test_an_immutable_file_stays_in_a_locked_directory(make_volume):
    """Without the key (a locked view, where fscrypt lets a directory be emptied) an immutable
    file still cannot be unlinked."""
    v = make_volume()
    (v.mnt / "d").mkdir()
    (v.mnt / "d" / "keep").write_bytes(b"kept")
    set_flag(v.mnt / "d" / "keep", FS_IMMUTABLE_FL)
    v.remount(unlock=False)
    [d] = os.listdir(v.mnt)
    [name] = os.listdir(v.mnt / d)
    expect_errno(errno.EPERM, os.unlink, v.mnt / d / name)
    v.add_key()
    assert (v.mnt / "d" / "keep").read_bytes() == b"kept"
    set_flag(v.mnt / "d" / "keep", 0)
