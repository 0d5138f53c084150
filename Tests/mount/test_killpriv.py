"""Killing privileges in the daemon (FUSE_HANDLE_KILLPRIV_V2), side by side with ext4.

With killpriv v2 the kernel no longer asks for `security.capability` before every write; it tells
the daemon when set-ID bits must go (a flag on WRITE, SETATTR and OPEN), and the daemon clears
them and removes the capability. These tests run each case (write, O_TRUNC open, ftruncate,
truncate, chown) by a caller without CAP_FSETID and by root, on files with every combination of
set-ID bits that matters, with and without a file capability, on encfsd and on a loop-mounted
ext4, and compare what is left; under the default mount and `-o writeback_cache`, where the
kernel takes a write from a caller who must drop bits past its cache. And they count the
requests a run of 4 KiB writes sends (through the `fuse:fuse_request_send` tracepoint, in a
tracing instance of the test's own, filtered to this mount's connection): one GETXATTR for the
file's first write, then none.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest

from conftest import loop_ext4
from test_posix import public_volume  # noqa: F401 (a fixture)

OWNER = 1000
# A version 2 file capability (VFS_CAP_REVISION_2, effective): cap_net_raw permitted.
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
MODES = [0o6775, 0o6765, 0o4755, 0o2755, 0o2745, 0o755]
TRACING = Path("/sys/kernel/tracing")


@pytest.fixture
def public_ext4():
    """A fresh ext4 on a loop device, mounted under a world-traversable directory."""
    root = Path(tempfile.mkdtemp(prefix="encfsd-killpriv-ext4-"))
    os.chmod(root, 0o755)
    try:
        with loop_ext4(root, 64 << 20) as mnt:
            os.chmod(mnt, 0o777)
            yield mnt
    finally:
        shutil.rmtree(root, ignore_errors=True)


def as_caller(uid: int, action, path: Path):
    """Runs action(path) in a child: as root (CAP_FSETID), or as `uid` with the file's group as
    its only group and no capabilities. Raises if the action failed."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if uid != 0:
                os.setgroups([])
                os.setresgid(OWNER, OWNER, OWNER)
                os.setresuid(uid, uid, uid)
            action(path)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"{action.__name__} of {path} as {uid} failed"


def write(path):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, b"w")
        os.write(fd, b"x")
    finally:
        os.close(fd)


def open_truncating(path):
    os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))


def ftruncate(path):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, 1)
    finally:
        os.close(fd)


def truncate(path):
    os.truncate(path, 2)


def chown(path):
    # The owner may give the file a group it is in; root, any owner.
    if os.getuid() == 0:
        os.chown(path, 0, 0)
    else:
        os.chown(path, -1, OWNER)


OPERATIONS = [write, open_truncating, ftruncate, truncate, chown]


def outcome(root: Path, mode: int, caller: int, operation, capability: bool):
    """The mode and whether the capability is left after `operation` by `caller` on a file of
    `mode` owned by OWNER (a fresh file each time)."""
    path = root / f"f-{oct(mode)}-{caller}-{operation.__name__}-{capability}"
    path.write_bytes(b"abc")
    os.chown(path, OWNER, OWNER)
    os.chmod(path, mode)
    if capability:
        os.setxattr(path, "security.capability", CAPABILITY)
    as_caller(caller, operation, path)
    try:
        os.getxattr(path, "security.capability")
        kept = True
    except OSError:
        kept = False
    return oct(os.stat(path).st_mode & 0o7777), kept


@pytest.mark.parametrize("options", ["allow_other", "allow_other,writeback_cache"])
def test_privileges_drop_as_on_ext4(public_volume, public_ext4, options):  # noqa: F811
    v = public_volume.mount(options=options)
    os.chmod(v.mnt, 0o777)
    differences = []
    for operation in OPERATIONS:
        for caller in (OWNER, 0):
            for mode in MODES:
                for capability in (False, True):
                    ours = outcome(v.mnt, mode, caller, operation, capability)
                    theirs = outcome(public_ext4, mode, caller, operation, capability)
                    if ours != theirs:
                        differences.append((operation.__name__, caller, oct(mode), capability, ours, theirs))
    assert differences == []
    assert "error" not in v.daemon_log().lower()


class RequestTrace:
    """Counts the FUSE requests one mount's connection sends, through a tracing instance of its
    own (other tracing users and other mounts are unaffected)."""

    def __init__(self, mountpoint: Path):
        st = os.stat(mountpoint)
        # The tracepoint's dev_t is the kernel's encoding (MKDEV: major << 20 | minor).
        self.connection = os.major(st.st_dev) << 20 | os.minor(st.st_dev)
        self.instance = TRACING / "instances" / f"encfsd-killpriv-{os.getpid()}"

    def __enter__(self):
        assert (TRACING / "events" / "fuse" / "fuse_request_send").is_dir(), "tracefs with the fuse events is needed"
        self.instance.mkdir()
        event = self.instance / "events" / "fuse" / "fuse_request_send"
        (event / "filter").write_text(f"connection == {self.connection}\n")
        (event / "enable").write_text("1\n")
        return self

    def counts(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for line in (self.instance / "trace").read_text().splitlines():
            if line.startswith("#") or "(FUSE_" not in line:
                continue
            opcode = line.split("(FUSE_", 1)[1].split(")", 1)[0]
            found[opcode] = found.get(opcode, 0) + 1
        return found

    def __exit__(self, *exc):
        (self.instance / "events" / "fuse" / "fuse_request_send" / "enable").write_text("0\n")
        self.instance.rmdir()


def test_writes_send_no_capability_probe(public_volume):  # noqa: F811
    """Without killpriv every WRITE followed a GETXATTR of security.capability; now the kernel asks
    once per inode (before the first write) and then takes the daemon's word."""
    v = public_volume.mount()
    path = v.mnt / "random-writes"
    path.write_bytes(b"\0" * (256 << 10))
    writes = 64
    fd = os.open(path, os.O_WRONLY)
    try:
        with RequestTrace(v.mnt) as trace:
            for i in range(writes):
                os.pwrite(fd, os.urandom(4096), ((i * 37) % 64) * 4096)
            counts = trace.counts()
    finally:
        os.close(fd)
    assert counts.get("WRITE") == writes, counts
    assert counts.get("GETXATTR", 0) <= 1, counts
