"""Review 4: attacks on this session's changes (killpriv v2, ~Copyable descriptors, keyed SIV
templates, the ExtentFile split). Each test is an attack that held, or the regression test of
the hole it found.

Killpriv: the paths test_killpriv.py does not take, where a write reaches the daemon by another
request than WRITE with a kill flag (fallocate, copy_file_range, O_DIRECT, a write through an
mmap, appends, a second handle), by the owner and by a member of the file's group, each compared
with a loop-mounted ext4.
"""

from __future__ import annotations

import mmap
import os

import pytest

from test_keys import readable_memory
from test_killpriv import OWNER, outcome, public_ext4  # noqa: F401 (a fixture)
from test_posix import public_volume  # noqa: F401 (a fixture)

GROUP_MEMBER = 1001
# Modes a member of the file's group may write (group write) with set-ID bits to lose.
WRITABLE_MODES = [0o6775, 0o6765, 0o4775, 0o2775, 0o2765]


def fallocate_extending(path):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, 8192)
    finally:
        os.close(fd)


def fallocate_punching(path):
    fd = os.open(path, os.O_WRONLY)
    try:
        # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, through the libc wrapper Python lacks.
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.fallocate(fd, 0x02 | 0x01, ctypes.c_long(0), ctypes.c_long(1)) != 0:
            raise OSError(ctypes.get_errno(), "fallocate")
    finally:
        os.close(fd)


def copy_range_into(path):
    source = path.with_name(path.name + ".src")
    fd_out = os.open(path, os.O_WRONLY)
    fd_in = os.open(source, os.O_RDONLY)
    try:
        assert os.copy_file_range(fd_in, fd_out, 2, 0, 1) == 2
    finally:
        os.close(fd_in)
        os.close(fd_out)


def direct_write(path):
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        buffer = mmap.mmap(-1, 4096)
        buffer.write(b"d" * 4096)
        os.pwritev(fd, [buffer], 0)
    finally:
        os.close(fd)


def mapped_write(path):
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 3) as m:
            m[0:1] = b"m"
            m.flush()
    finally:
        os.close(fd)


def append_write(path):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"a")
    finally:
        os.close(fd)


def second_handle_write(path):
    first = os.open(path, os.O_WRONLY)
    second = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(first, b"1", 0)
        os.pwrite(second, b"2", 1)
    finally:
        os.close(first)
        os.close(second)


def chown_changing_nothing(path):
    # chown(path, -1, -1): no owner changes, but on Linux the set-ID bits still go.
    os.chown(path, -1, -1)



ATTACKS = [chown_changing_nothing, fallocate_extending, fallocate_punching, copy_range_into, direct_write, mapped_write,
           append_write, second_handle_write]


def prepared_outcome(root, mode, caller, operation, capability):
    # copy_file_range reads from a file next to the target, readable by everyone.
    (root / f"f-{oct(mode)}-{caller}-{operation.__name__}-{capability}.src").write_bytes(b"src")
    return outcome(root, mode, caller, operation, capability)


def privileges(result):
    """The set-ID bits and whether the capability is left, from an `outcome`."""
    mode, capability = result
    return int(mode, 8) & 0o6000, capability


@pytest.mark.parametrize("options", ["allow_other", "allow_other,writeback_cache"])
def test_privileges_drop_as_on_ext4_on_other_write_paths(public_volume, public_ext4, options):  # noqa: F811
    """Before the fix, fallocate (either mode) and chown(f, -1, -1) by a caller without
    CAP_FSETID kept every set-ID bit, where ext4 drops them: the kernel sends the kill as a
    SETATTR that sets nothing, with no kill flag. Compared only where both filesystems let the
    call succeed (without default_permissions encfsd lets a group member chown(f, -1, -1)).

    Two differences remain, both known: a write through an mmap removes a capability ext4 keeps
    (every WRITE removes it, and writeback sends WRITEs), and root's chown(f, -1, -1) keeps the
    set-ID bits, since the kernel sends it exactly as it sends the capability-only kill before
    a fallocate by root, whose CAP_FSETID keeps them."""
    v = public_volume.mount(options=options)
    os.chmod(v.mnt, 0o777)
    kept, dropped, refused = [], [], []
    for operation in ATTACKS:
        for caller in (OWNER, GROUP_MEMBER, 0):
            for mode in WRITABLE_MODES:
                for capability in (False, True):
                    case = (operation.__name__, caller, oct(mode), capability)
                    try:
                        theirs = prepared_outcome(public_ext4, mode, caller, operation, capability)
                    except AssertionError:
                        continue
                    try:
                        ours = prepared_outcome(v.mnt, mode, caller, operation, capability)
                    except AssertionError:
                        refused.append(case)
                        continue
                    (our_bits, our_cap), (their_bits, their_cap) = privileges(ours), privileges(theirs)
                    if our_bits & ~their_bits or (our_cap and not their_cap):
                        kept.append((case, ours, theirs))
                    if their_bits & ~our_bits or (their_cap and not our_cap):
                        dropped.append((case, ours, theirs))
    assert refused == []
    assert [k for k in kept if k[0][1] != 0] == [], "a caller without CAP_FSETID keeps a privilege ext4 drops"
    assert {k[0][0] for k in kept} <= {"chown_changing_nothing"}, kept
    assert {(d[0][0], d[1][0] == d[2][0]) for d in dropped} <= {("mapped_write", True)}, dropped
    assert "error" not in v.daemon_log().lower()


# ---------------------------------------------------------------------------------------------
# Keys: nothing derived from a removed key stays in the daemon's memory.

def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    import hmac
    return hmac.new(prk, info + b"\x01", "sha512").digest()[:length]


def scan_all(pid: int, needles: dict[str, bytes]) -> list[str]:
    """Names of the needles found anywhere in the process's readable memory."""
    return sorted({name for _line, chunk in readable_memory(pid) for name, needle in needles.items() if needle in chunk})


def test_removed_key_leaves_no_derived_key_in_any_thread_context(tmp_path, encfsd_bin, key_file):
    """After soft removal completes: not the HKDF PRK (the keyed HMAC-SHA512 template keeps a copy
    of its key), not either half of the name or xattr SIV key (one AES-256 schedule each, which
    starts with the key), not the last extent key a thread's AES-256-GCM context was keyed with,
    not the last header MAC key its HMAC-SHA256 context was keyed with (OpenSSL keeps a copy)."""
    import fcntl
    import hmac
    from test_keys import UnlockedStore, wait_for_status
    s = UnlockedStore("key-file", tmp_path, encfsd_bin, key_file)
    try:
        d = s.mnt / "private"
        d.mkdir()
        (d / "diary.txt").write_bytes(b"dear diary\n" * 100)
        os.setxattr(d / "diary.txt", "user.mood", b"calm")
        assert os.getxattr(d / "diary.txt", "user.mood") == b"calm"
        with open(d / "diary.txt", "rb") as f:
            object_id = fcntl.ioctl(f.fileno(), 0x8010661B, b"\0" * 16)  # FS_IOC_GET_ENCRYPTION_NONCE
            assert f.read(11) == b"dear diary\n"
        prk = hmac.new(b"\0" * 64, s.raw, "sha512").digest()
        name_key = hkdf_expand(prk, b"fscrypt\0\x82", 64)
        xattr_keys = hkdf_expand(prk, b"fscrypt\0\x83", 64)
        needles = {"prk": prk, "name key [0..32)": name_key[:32], "name key [32..64)": name_key[32:],
                   "xattr key [0..32)": xattr_keys[:32], "xattr key [32..64)": xattr_keys[32:],
                   "header key": hkdf_expand(prk, b"fscrypt\0\x81" + object_id, 32)}
        for backing in s.store.rglob("*"):
            if backing.is_file() and not backing.is_symlink() and backing.stat().st_size > 4096 + 16:
                nonce = backing.read_bytes()[4096:4112]
                needles[f"extent key of {backing.name}"] = hkdf_expand(prk, b"fscrypt\0\x80" + nonce, 32)
        present = scan_all(s.pid, needles)
        assert "name key [0..32)" in present, f"the scan cannot see the daemon's keys: {present}"
        run_remove = __import__("test_keys").run
        run_remove(encfsd_bin, "key", "remove", s.mnt, s.policy)
        wait_for_status(encfsd_bin, s.mnt, s.policy, "Absent")
        assert scan_all(s.pid, needles) == []
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------
# Descriptors: error paths give back every descriptor they took.

def descriptor_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_error_paths_leak_no_descriptors(make_volume):
    """Objects replaced (store written while unmounted) by a FIFO, a symlink, a character device,
    a directory, and one with a damaged extent and one with both header slots damaged; each is
    opened, read, written, stat'ed and listed 20 times, every one failing with EIO (or the
    damaged extent's read alone). Then files held open while the key is removed are closed. The
    daemon's descriptor count is back where it was after the same operations on healthy files."""
    import errno
    from conftest import daemon_pids
    v = make_volume()
    kinds = ["healthy", "fifo", "symlink", "device", "directory", "damaged-extent", "damaged-header"]
    backing = {k: v.new_backing(v.store, lambda k=k: (v.mnt / k).write_bytes(os.urandom(3 * 4096 + 5))) for k in kinds}
    v.unmount()
    for kind, name in backing.items():
        path = v.store / name
        if kind == "fifo":
            path.unlink()
            os.mkfifo(path)
        elif kind == "symlink":
            path.unlink()
            path.symlink_to("/etc/passwd")
        elif kind == "device":
            path.unlink()
            os.mknod(path, 0o600 | 0o020000, os.makedev(1, 3))
        elif kind == "directory":
            path.unlink()
            path.mkdir()
        elif kind == "damaged-extent":
            with open(path, "r+b") as f:
                f.seek(4096 + 4096 + 40)
                f.write(b"\xff" * 8)
        elif kind == "damaged-header":
            with open(path, "r+b") as f:
                f.write(b"\xff" * 4096)
    v.mount()
    pid = daemon_pids(v.mnt)[0]

    def exercise(kind):
        path = v.mnt / kind
        for action in (lambda: os.stat(path), lambda: path.read_bytes(), lambda: os.listxattr(path),
                       lambda: os.truncate(path, 5), lambda: open(path, "r+b").write(b"x")):
            try:
                action()
            except OSError as e:
                assert e.errno == errno.EIO, (kind, e)
        os.listdir(v.mnt)

    exercise("healthy")
    baseline = descriptor_count(pid)
    for _ in range(20):
        for kind in kinds[1:]:
            exercise(kind)
    held = [open(v.mnt / "healthy", "rb") for _ in range(3)]
    from test_keys import run as run_cli
    ident = v.add_key()
    run_cli(v.binary, "key", "remove", v.mnt, ident)
    for f in held:
        f.close()
    from test_keys import wait_for_status
    wait_for_status(v.binary, v.mnt, ident, "Absent")
    assert descriptor_count(pid) <= baseline, sorted(os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd"))


# ---------------------------------------------------------------------------------------------
# Flush transactions: a commit that fails for want of space, and what follows it.

def test_failed_commits_on_a_full_backing_leave_a_consistent_store(tmp_path, encfsd_bin, key_file):
    """The store on a 3 MiB tmpfs: a file is written and fsynced (acknowledged), the backing is
    filled, then the file is overwritten and extended (its commit fails with ENOSPC), truncated,
    written again, read and closed while the backing stays full. Every call either succeeds or
    fails with ENOSPC, nothing fails authentication; once space is back and the store is
    remounted the file reads without EIO, and what it holds is, extent by extent, the
    acknowledged data or data written after it; fsck finds nothing wrong."""
    import errno
    import subprocess
    from conftest import Volume, purge_test_keys, run
    backing = tmp_path / "small"
    backing.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", backing], check=True)
    v = None
    try:
        v = Volume(encfsd_bin, tmp_path / "vol", key_file, store=backing / "store")
        v.mount()
        acknowledged = os.urandom(256 << 10)
        later = os.urandom(1 << 20)
        path = v.mnt / "precious"
        with open(path, "wb") as f:
            f.write(acknowledged)
            os.fsync(f.fileno())
        filler = v.mnt / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(os.urandom(64 << 10))
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                assert e.errno == errno.ENOSPC, e

        refused = []

        def tolerate(action):
            try:
                return action()
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                refused.append(e)
                return None

        fd = os.open(path, os.O_RDWR)
        succeeded = {}
        succeeded["overwrite"] = tolerate(lambda: os.pwrite(fd, later, 0)) is not None
        tolerate(lambda: os.fsync(fd))
        succeeded["truncate"] = tolerate(lambda: os.ftruncate(fd, 100 << 10) or True) is not None
        succeeded["patch"] = tolerate(lambda: os.pwrite(fd, later[:5000], 50 << 10)) is not None
        tolerate(lambda: os.fsync(fd))
        assert tolerate(lambda: os.pread(fd, 1 << 20, 0)) is not None
        tolerate(lambda: os.close(fd))
        assert refused, "the backing never ran out of space: the test proves nothing"
        os.unlink(filler)
        v.unmount()
        v.mount()
        data = (v.mnt / "precious").read_bytes()
        v.unmount()
        assert "integrity failure" not in v.daemon_log()

        # Every state the file may be in: each call that succeeded may or may not have reached
        # the backing (a failed fsync promises nothing), in order.
        def state(overwrite, truncate, patch):
            b = bytearray(acknowledged)
            if overwrite:
                b[0:len(later)] = later
            if truncate:
                del b[100 << 10:]
            if patch:
                b[50 << 10:(50 << 10) + 5000] = later[:5000]
            return bytes(b)
        import itertools
        states = [state(*c) for c in itertools.product(*[[False, True] if succeeded[k] else [False]
                                                         for k in ("overwrite", "truncate", "patch")])]
        assert len(data) in {len(st) for st in states}, (len(data), succeeded)
        extent = 16384
        for start in range(0, len(data), extent):
            piece = data[start:start + extent]
            assert any(st[start:start + extent] == piece for st in states), (start, succeeded)
        fsck = run(encfsd_bin, "fsck", v.store, "--key-file", key_file, check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    finally:
        if v is not None:
            v.force_cleanup()
        purge_test_keys()
        subprocess.run(["umount", "-l", backing], check=False)
