"""Files only the store names (journal shadows) are never written through a planted hard link.

A hard link needs no symlink resolution, so O_NOFOLLOW and RESOLVE_NO_SYMLINKS do not see it:
someone who can write the store and another directory on the same filesystem can make
`.journal/<object ID>` another name of a file elsewhere. The daemon would truncate and overwrite
that file with a transaction's shadow; it must refuse the shadow instead (EIO for that object).
"""
import errno
import os

from conftest import daemon_pids, run


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

    fd = os.open(victim, os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * 100, 20000)  # inside a stored extent: the commit journals it
        try:
            os.fsync(fd)
            raise AssertionError("the commit wrote its journal through a planted hard link")
        except OSError as e:
            assert e.errno == errno.EIO, e
    finally:
        try:
            os.close(fd)
        except OSError:
            pass

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
