"""Files only the store names (journal shadows) are never written through a planted hard link.

A hard link needs no symlink resolution, so O_NOFOLLOW and RESOLVE_NO_SYMLINKS do not see it:
someone who can write the store and another directory on the same filesystem can make
`.journal/<object ID>` another name of a file elsewhere. The daemon would truncate and overwrite
that file with a transaction's shadow; it must refuse the shadow instead (EIO for that object).
"""
import errno
import os
import shutil
from pathlib import Path

from conftest import daemon_pids, run


def journaled_overwrite_is_refused(path, otherwise: str):
    """Overwrites inside a stored extent of `path` (so the commit journals it) and requires the
    commit, at fsync, to fail with EIO."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * 100, 20000)
        try:
            os.fsync(fd)
            raise AssertionError(otherwise)
        except OSError as e:
            assert e.errno == errno.EIO, e
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # the failed commit is reported again at close


def test_hard_link_planted_as_a_journal_shadow_is_refused(volume, tmp_path):
    v = volume
    canary = tmp_path / "canary"
    canary.write_bytes(b"precious data outside the store\n" * 100)
    before = canary.stat()
    (v.mnt / "bystander").write_bytes(b"untouched")
    victim = v.mnt / "victim"
    victim.write_bytes(bytes(40000))
    object_id = run(v.binary, "nonce", victim).stdout.strip().split()[-1]
    assert len(object_id) == 32, object_id
    shadow = v.store / ".journal" / object_id
    os.link(canary, shadow)

    journaled_overwrite_is_refused(victim, "the commit wrote its journal through a planted hard link")

    after = canary.stat()
    assert canary.read_bytes() == b"precious data outside the store\n" * 100
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    assert daemon_pids(v.mnt) == v.pids
    assert (v.mnt / "bystander").read_bytes() == b"untouched"
    assert "links" in v.daemon_log()

    # With the planted name gone the file takes writes again, and its old contents were kept.
    os.unlink(shadow)
    assert victim.read_bytes()[20000:20100] in (bytes(100), b"x" * 100)
    with open(victim, "r+b") as f:
        f.seek(20000)
        f.write(b"y" * 100)
    assert victim.read_bytes()[20000:20100] == b"y" * 100


def backing_of(store, inode):
    """The backing entry (top level of the store) with this inode number."""
    [name] = [n for n in os.listdir(store) if os.lstat(os.path.join(store, n)).st_ino == inode]
    return store / name


def fill_below(directory, inode):
    """Takes free inode numbers below `inode`, so the next file made gets `inode` if it is free."""
    directory.mkdir(exist_ok=True)
    i = len(os.listdir(directory))
    while True:
        fd = os.open(directory / f"j{i}", os.O_CREAT | os.O_WRONLY, 0o600)
        got = os.fstat(fd).st_ino
        os.close(fd)
        i += 1
        if got > inode:
            return


def test_directory_header_replaced_by_hard_link_is_never_written(volume, tmp_path):
    v = volume
    (v.mnt / "d1").mkdir()
    os.listdir(v.mnt / "d1")
    victim = tmp_path / "dvictim"
    victim.write_bytes(b"OUTSIDE " * 1000)
    before = victim.stat()
    backing = backing_of(v.store, os.stat(v.mnt / "d1").st_ino)
    os.unlink(backing / ".d")
    os.link(victim, backing / ".d")
    try:
        os.chmod(v.mnt / "d1", 0o700)
        raise AssertionError("chmod rewrote a header that is a hard link to a file outside the store")
    except OSError as e:
        assert e.errno == errno.EIO, e
    assert victim.read_bytes() == b"OUTSIDE " * 1000
    assert victim.stat().st_mtime_ns == before.st_mtime_ns
    assert daemon_pids(v.mnt) == v.pids


def test_a_reused_inode_number_is_never_adopted(volume):
    """An object deleted behind the daemon's back while the kernel still holds its node frees its
    inode number; the next file made may get it. The new file must be new: empty, writable, its
    own, and never served with the old node's header or contents."""
    v = volume
    reproduced = 0
    for attempt in range(20):
        old = v.mnt / f"old{attempt}"
        old.write_bytes(b"TOP SECRET %d\n" % attempt)
        pin = os.open(old, os.O_PATH)  # keeps the kernel's node (and so the daemon's) alive
        try:
            inode = os.fstat(pin).st_ino
            stolen = backing_of(v.store, inode)
            copy = stolen.read_bytes()
            fill_below(v.root / "fill", inode)
            os.unlink(stolen)
            new = v.mnt / f"new{attempt}"
            os.close(os.open(new, os.O_CREAT | os.O_WRONLY, 0o644))
            if os.stat(new).st_ino != inode:
                continue
            reproduced += 1
            assert new.read_bytes() == b""
            new.write_bytes(b"mine")
            assert new.read_bytes() == b"mine"
            # The deleted object's bytes written over the new backing file never read as plaintext
            # under the new name: its header is not bound there.
            with open(backing_of(v.store, inode), "r+b") as f:
                f.write(copy)
                f.truncate(len(copy))
            try:
                got = new.read_bytes()
            except OSError as e:
                assert e.errno == errno.EIO, e
            else:
                assert got in (b"", b"mine"), got
        finally:
            os.close(pin)
        if reproduced >= 3:
            break
    assert reproduced, "the backing filesystem never reused an inode number in 20 tries"
    assert daemon_pids(v.mnt) == v.pids


def test_rmdir_never_deletes_a_planted_tree(volume, tmp_path):
    v = volume
    (v.mnt / "empty").mkdir()
    os.listdir(v.mnt / "empty")
    planted = tmp_path / "planted"
    (planted / "sub").mkdir(parents=True)
    (planted / "sub" / "file").write_bytes(b"precious")
    os.rename(planted, backing_of(v.store, os.stat(v.mnt / "empty").st_ino) / "not-an-entry")
    try:
        os.rmdir(v.mnt / "empty")
        raise AssertionError("rmdir deleted a tree encfsd did not make")
    except OSError as e:
        assert e.errno == errno.EIO, e  # the directory holds what the store never makes
    [survivor] = [p for p in v.store.rglob("file") if p.parent.name == "sub"]
    assert survivor.read_bytes() == b"precious"


def test_fsck_repair_leaves_a_planted_leftover_tree(volume, tmp_path):
    v = volume
    v.unmount()
    planted = v.store / ".mk-0000000000000000"
    (planted / "sub").mkdir(parents=True)
    (planted / "sub" / "file").write_bytes(b"precious")
    r = run(v.binary, "fsck", v.store, "--repair", "--key-file", v.key_file, check=False)
    assert r.returncode == 4, r.stdout + r.stderr
    assert ".mk-0000000000000000" in r.stdout and "left alone" in r.stdout, r.stdout
    assert (planted / "sub" / "file").read_bytes() == b"precious"
    # A real leftover (only a header, as a crashed mkdir leaves it) is still removed.
    os.rename(planted, tmp_path / "kept")
    real = v.store / ".mk-1111111111111111"
    real.mkdir()
    (real / ".d").write_bytes(b"\0" * 4096)
    r = run(v.binary, "fsck", v.store, "--repair", "--key-file", v.key_file, check=False)
    assert r.returncode == 1 and not real.exists(), r.stdout + r.stderr


def test_a_directory_moved_out_of_the_store_receives_nothing(volume, tmp_path):
    v = volume
    (v.mnt / "d2").mkdir()
    os.listdir(v.mnt / "d2")
    moved = tmp_path / "moved-d2"
    os.rename(backing_of(v.store, os.stat(v.mnt / "d2").st_ino), moved)
    before = set(os.listdir(moved))
    try:
        (v.mnt / "d2" / "planted").write_bytes(b"hi")
        raise AssertionError("a file was created in a directory moved out of the store")
    except OSError as e:
        assert e.errno in (errno.EIO, errno.ENOENT), e
    assert set(os.listdir(moved)) == before

    (v.mnt / "jfile").write_bytes(bytes(40000))
    moved_journal = tmp_path / "moved-journal"
    os.rename(v.store / ".journal", moved_journal)
    os.mkdir(v.store / ".journal")
    journaled_overwrite_is_refused(v.mnt / "jfile", "a journal shadow was written into a directory outside the store")
    assert os.listdir(moved_journal) == []
    assert daemon_pids(v.mnt) == v.pids


def test_a_nested_directory_moved_out_receives_nothing_even_with_a_decoy_in_its_place(volume, tmp_path):
    """The boundary check resolves the path the daemon knows for a directory and accepts it only
    if it leads to the same directory: a decoy planted at that path must not pass for it."""
    v = volume
    (v.mnt / "a" / "b" / "c").mkdir(parents=True)
    (v.mnt / "a" / "b" / "c" / "kept").write_bytes(b"x")
    # Held open, so the requests below reach the moved directory's node whatever the kernel's
    # dentry timeouts do.
    held = os.open(v.mnt / "a" / "b" / "c", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.listdir(held)
        os.stat("kept", dir_fd=held)
        inode = os.fstat(held).st_ino
        [backing] = [Path(top) / d for top, dirs, _ in os.walk(v.store) for d in dirs
                     if os.lstat(Path(top) / d).st_ino == inode]
        # Beside the store, on its filesystem (a rename to another one would fail with EXDEV).
        moved = v.store.parent / "moved-c"
        os.rename(backing, moved)
        os.mkdir(backing)
        shutil.copy(moved / ".d", backing / ".d")
        before = set(os.listdir(moved))
        for attempt in (lambda: os.close(os.open("planted", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=held)),
                        lambda: os.unlink("kept", dir_fd=held),
                        lambda: os.mkdir("sub", dir_fd=held)):
            try:
                attempt()
                raise AssertionError("a directory moved out of the store was changed")
            except OSError as e:
                assert e.errno == errno.EIO, e
        assert set(os.listdir(moved)) == before
        assert os.listdir(backing) == [".d"]
    finally:
        os.close(held)
    assert daemon_pids(v.mnt) == v.pids


def test_a_burst_of_renames_never_runs_out_of_binding_space(volume):
    """Renames leave the old name's binding in the header until the rename is durable (dropping
    it first could lose the file to a power cut); a header full of them drops them at once."""
    v = volume
    (v.mnt / "n0").write_bytes(b"moving")
    for i in range(300):
        os.rename(v.mnt / f"n{i}", v.mnt / f"n{i + 1}")
    assert os.listdir(v.mnt) == ["n300"]
    assert (v.mnt / "n300").read_bytes() == b"moving"
    v.unmount()
    r = run(v.binary, "fsck", v.store, "--key-file", v.key_file, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    v.mount()
    assert (v.mnt / "n300").read_bytes() == b"moving"
