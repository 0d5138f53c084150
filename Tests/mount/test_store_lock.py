"""One store, one daemon: the store lock (encfsd.lock) refuses a second mount and fsck while a
store is mounted, naming the holder; a killed daemon leaves no stale lock; whatever an attacker
plants at the lock's name is refused, never followed or written."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import stat
import struct
import subprocess
import time

import pytest

from conftest import is_mounted, run, wait_pids_gone

LOCK = "encfsd.lock"


def mounts_at(path) -> int:
    target = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return sum(1 for line in f if line.split()[1].encode().decode("unicode_escape") == target)


def refused(volume, *args) -> str:
    r = run(volume.binary, *args, check=False)
    assert r.returncode != 0, f"{args} succeeded: {r.stdout}"
    return r.stderr


@pytest.mark.parametrize("where", ["other mountpoint", "same mountpoint"])
def test_second_mount_is_refused_naming_the_holder(volume, where):
    (volume.mnt / "f").write_text("first daemon")
    [pid] = volume.pids
    target = volume.root / "mnt2" if where == "other mountpoint" else volume.mnt
    target.mkdir(exist_ok=True)
    message = refused(volume, "mount", volume.store, target, "--no-keyring")
    assert f"in use by encfsd pid {pid} on host {socket.gethostname()}" in message, message
    assert message.startswith("Error: cannot mount"), message
    assert mounts_at(volume.mnt) == 1
    assert target == volume.mnt or not is_mounted(target)
    assert (volume.mnt / "f").read_text() == "first daemon"  # the first daemon serves on


def test_mount_after_kill_9_is_not_blocked(volume):
    (volume.mnt / "f").write_text("kept")
    os.sync()
    [pid] = volume.pids
    os.kill(pid, signal.SIGKILL)
    assert wait_pids_gone([pid], 10) == []
    run("fusermount3", "-uz", volume.mnt)
    volume.mount()
    assert (volume.mnt / "f").read_text() == "kept"


def test_fsck_refuses_a_mounted_store_unless_forced(volume):
    [pid] = volume.pids
    r = run(volume.binary, "fsck", volume.store, check=False)
    assert r.returncode == 8, r
    assert f"in use by encfsd pid {pid}" in r.stderr and f"mounted at {volume.mnt}" in r.stderr, r.stderr
    assert run(volume.binary, "fsck", volume.store, "--force", "--key-file", volume.key_file).returncode == 0
    volume.unmount()
    r = run(volume.binary, "fsck", volume.store, "--key-file", volume.key_file)
    assert "0 problem(s) left" in r.stdout


def open_writer_once_read(fifo, reader: subprocess.Popen) -> int:
    """Opens the FIFO for writing as soon as `reader` has it open (ENXIO until then), failing
    rather than hanging if the reader exits first."""
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            assert e.errno == errno.ENXIO, e
        assert reader.poll() is None, f"exited before opening the FIFO: {reader.communicate()}"
        time.sleep(0.01)


def test_mount_is_refused_while_fsck_runs(make_volume, tmp_path):
    """fsck takes the lock before it reads its key files: with the key file a FIFO, it waits there
    holding the lock, until this test (whose open for writing returns only once fsck has opened the
    FIFO) writes the key."""
    volume = make_volume(mount=False)
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    fsck = subprocess.Popen([str(volume.binary), "fsck", str(volume.store), "--key-file", str(fifo)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        writer = open_writer_once_read(fifo, fsck)
        try:
            message = refused(volume, "mount", volume.store, volume.mnt)
            assert f"in use by encfsd pid {fsck.pid} on host {socket.gethostname()}" in message, message
            assert not is_mounted(volume.mnt)
            os.write(writer, volume.key_file.read_bytes())
        finally:
            os.close(writer)
        out, err = fsck.communicate(timeout=60)
        assert fsck.returncode == 0 and "0 problem(s) left" in out, (out, err)
    finally:
        if fsck.poll() is None:
            fsck.kill()
            fsck.wait()
    volume.mount()


def test_mount_is_refused_while_another_process_holds_the_lock(make_volume):
    """fsck holds the lock while it runs; any holder of it (here this test, with the same kind of
    lock) keeps mounts out, and a holder that recorded nothing is still refused."""
    volume = make_volume(mount=False)
    fd = os.open(volume.store / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        message = refused(volume, "mount", volume.store, volume.mnt)
        assert "in use by another encfsd" in message, message
        assert not is_mounted(volume.mnt)
        r = run(volume.binary, "fsck", volume.store, check=False)
        assert r.returncode == 8 and "in use by encfsd (holder unknown)" in r.stderr, r
    finally:
        os.close(fd)
    volume.mount()  # the lock went with the descriptor
    assert run(volume.binary, "key", "status", volume.mnt, volume.policy).stdout.startswith("Present")


def plant(kind: str, path, outside):
    if kind == "symlink":
        os.symlink(outside, path)
    elif kind == "hard link":
        os.link(outside, path)
    elif kind == "FIFO":
        os.mkfifo(path)
    elif kind == "device node":
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
    else:
        os.mkdir(path)


@pytest.mark.parametrize("kind,what", [("symlink", "a symbolic link"), ("hard link", "a file with other hard links"),
                                       ("FIFO", "a FIFO"), ("device node", "a device node"), ("directory", "a directory")])
def test_planted_lock_file_is_refused_and_never_written(make_volume, tmp_path, kind, what):
    volume = make_volume(mount=False)
    outside = tmp_path / "victim"
    outside.write_text("not yours to write\n")
    before = os.stat(outside)
    plant(kind, volume.store / LOCK, outside)
    planted = os.lstat(volume.store / LOCK)
    expected = f"{LOCK} in the store is {what}, not a regular file"
    message = refused(volume, "mount", volume.store, volume.mnt, "--no-keyring")
    assert expected in message, message
    assert not is_mounted(volume.mnt)
    r = run(volume.binary, "fsck", volume.store, check=False)
    assert r.returncode == 8 and expected in r.stderr, r
    after = os.stat(outside)
    assert outside.read_text() == "not yours to write\n"
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    now = os.lstat(volume.store / LOCK)
    assert (now.st_mode, now.st_ino, now.st_size) == (planted.st_mode, planted.st_ino, planted.st_size)
    # Nothing else in the store changed either: it mounts once the plant is gone.
    (os.rmdir if kind == "directory" else os.unlink)(volume.store / LOCK)
    volume.mount()
    assert os.listdir(volume.mnt) == []
