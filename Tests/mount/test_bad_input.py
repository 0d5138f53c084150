"""Bad input in the store: corrupted headers, extents, journal shadows and names each give EIO or a
clear fsck finding naming the file; the daemon never crashes or hangs; other files stay readable."""

from __future__ import annotations

import errno
import os
import random
import subprocess

import pytest

from conftest import Volume, _pid_alive, daemon_pids, expect_errno, run, wait_pids_gone
from test_crash import kill_leftovers, mount_armed


def backing_of(volume: Volume, path) -> str:
    """The backing object of a plaintext path (encfsd reports backing inode numbers)."""
    ino = os.lstat(path).st_ino
    found = run("find", volume.store, "-inum", str(ino)).stdout.split()
    assert len(found) == 1, found
    return found[0]


def populate(volume: Volume) -> dict[str, bytes]:
    files = {}
    (volume.mnt / "sub").mkdir()
    for name in ["victim", "bystander", "sub/inner"]:
        files[name] = random.Random(name).randbytes(40000)
        (volume.mnt / name).write_bytes(files[name])
    return files


def fsck(volume: Volume, *args) -> subprocess.CompletedProcess:
    return run(volume.binary, "fsck", volume.store, "--key-file", volume.key_file, *args, check=False)


def assert_others_fine(volume: Volume, files, damaged):
    for name, data in files.items():
        if name not in damaged:
            assert (volume.mnt / name).read_bytes() == data, name
    assert volume.pids and all(_pid_alive(p) for p in volume.pids), "the daemon is gone"


def corrupt(path: str, offset: int, length: int = 1, value: bytes | None = None):
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(length)
        f.seek(offset)
        f.write(value if value is not None else bytes(b ^ 0xFF for b in old))


@pytest.mark.parametrize("damage", ["both-header-slots", "truncated-to-nothing", "extent", "directory-header"])
def test_corrupted_objects(make_volume, damage):
    volume = make_volume()
    files = populate(volume)
    victim = backing_of(volume, volume.mnt / ("sub" if damage == "directory-header" else "victim"))
    volume.unmount()
    if damage == "both-header-slots":
        corrupt(victim, 100, 1)
        corrupt(victim, 2048 + 100, 1)
    elif damage == "truncated-to-nothing":
        os.truncate(victim, 100)
    elif damage == "extent":
        corrupt(victim, 4096 + 16384 + 32 + 500, 1)
    else:
        corrupt(victim + "/.d", 60, 4)
    r = fsck(volume)
    assert r.returncode == 4, r.stdout + r.stderr
    shown = "/sub" if damage == "directory-header" else "/victim"
    assert any(line.startswith("PROBLEM: " + shown) for line in r.stdout.splitlines()), r.stdout
    volume.mount()
    if damage == "extent":
        data = files["victim"]
        with open(volume.mnt / "victim", "rb") as f:
            assert f.read(16384) == data[:16384]
            f.seek(16384)
            expect_errno(errno.EIO, f.read, 100)
            f.seek(32768)
            assert f.read() == data[32768:]
        damaged = {"victim"}
    elif damage == "directory-header":
        expect_errno(errno.EIO, os.listdir, volume.mnt / "sub")
        damaged = {"sub/inner"}
    else:
        expect_errno(errno.EIO, os.stat, volume.mnt / "victim")
        damaged = {"victim"}
    assert_others_fine(volume, files, damaged)


def test_corrupted_name(make_volume):
    volume = make_volume()
    files = populate(volume)
    victim = backing_of(volume, volume.mnt / "victim")
    volume.unmount()
    head, name = os.path.split(victim)
    swapped = name[:10] + ("A" if name[10] != "A" else "B") + name[11:]
    os.rename(victim, os.path.join(head, swapped))
    r = fsck(volume)
    assert r.returncode == 4 and "name" in r.stdout, r.stdout
    volume.mount()
    assert "victim" not in os.listdir(volume.mnt)  # skipped, and logged, not shown as garbage
    expect_errno(errno.ENOENT, os.stat, volume.mnt / "victim")
    assert_others_fine(volume, files, {"victim"})
    assert "undecryptable entry" in volume.daemon_log()


@pytest.mark.parametrize("damage", ["shadow-flipped", "shadow-missing", "shadow-truncated"])
def test_damaged_journal_refuses_the_file_and_fsck_quarantines_it(make_volume, damage):
    volume = make_volume(mount=False)
    mount_armed(volume, "pending-flag-set")
    (volume.mnt / "bystander").write_bytes(b"untouched")
    (volume.mnt / "victim").write_bytes(bytes(20000))
    with pytest.raises(OSError):
        with open(volume.mnt / "victim", "r+b") as f:  # an overwrite: journaled; dies with the flag set
            f.write(b"x" * 100)
    kill_leftovers(volume)
    [shadow] = [volume.store / ".journal" / n for n in os.listdir(volume.store / ".journal")]
    if damage == "shadow-flipped":
        corrupt(str(shadow), 3000, 1)
    elif damage == "shadow-missing":
        os.unlink(shadow)
    else:
        os.truncate(shadow, 2000)
    r = fsck(volume)
    assert r.returncode == 4 and "/victim" in r.stdout and "interrupted write" in r.stdout, r.stdout
    volume.mount()
    expect_errno(errno.EIO, open, volume.mnt / "victim")  # never served half-written
    assert (volume.mnt / "bystander").read_bytes() == b"untouched"
    volume.unmount()
    r = fsck(volume, "--repair")
    assert r.returncode == 1, r.stdout
    assert "quarantine" in r.stdout
    quarantined = os.listdir(volume.store / ".quarantine")
    assert len(quarantined) == 1  # moved aside, not deleted
    volume.mount()
    assert sorted(os.listdir(volume.mnt)) == ["bystander"]
    assert fsck_after_repair_clean(volume)


def fsck_after_repair_clean(volume: Volume) -> bool:
    volume.unmount()
    r = fsck(volume)
    volume.mount()
    return r.returncode == 0


def test_fsck_repair_completes_a_pending_write(make_volume):
    volume = make_volume(mount=False)
    mount_armed(volume, "extents-applied")
    (volume.mnt / "f").write_bytes(bytes(20000))
    with pytest.raises(OSError):
        with open(volume.mnt / "f", "r+b") as f:
            f.write(b"y" * 100)
    kill_leftovers(volume)
    r = fsck(volume)
    assert r.returncode == 4 and "awaits recovery" in r.stdout, r.stdout
    r = fsck(volume, "--repair")
    assert r.returncode == 1 and "completed an interrupted write" in r.stdout, r.stdout
    assert fsck(volume).returncode == 0
    volume.mount()
    assert (volume.mnt / "f").read_bytes() == b"y" * 100 + bytes(19900)
