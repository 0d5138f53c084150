"""The epoch record and the header slots attacked from the backing side (docs/FORMAT.md 15.2): a
refused mount leaves no open epoch, an impossible record is damage (not a crash), a rewritten
sequence number is caught by the MAC of the other slot, a check writes nothing, and a
configuration edited down to version 1 is refused."""

from __future__ import annotations

import errno
import hashlib
import re
import struct

from conftest import expect_errno, run
from test_slot_damage import NEW, OLD, damage, fsck, newest_slot, slots, written, copy  # noqa: F401


def record_slot(state: int, epoch: int, unclean_plus1: int) -> bytes:
    b = b"EFSE" + struct.pack("<HBBQQ", 1, state, 0, epoch, unclean_plus1)
    return b + hashlib.sha256(b).digest()[:8]


def test_refused_mount_leaves_no_open_epoch(copy, tmp_path):
    """A mount refused after Volume.init (bad key file) must not leave an open epoch that the next
    mount reads as an unclean shutdown, turning a damaged slot's EIO into the older state."""
    v, backing = copy
    before = (v.store / "encfsd.epoch").read_bytes()
    short = tmp_path / "short-key"
    short.write_bytes(b"0123456789")
    r = run(v.binary, "mount", v.store, v.mnt, "--no-keyring", "--key-file", short, check=False)
    assert r.returncode != 0
    assert (v.store / "encfsd.epoch").read_bytes() == before, "a refused mount changed encfsd.epoch"
    damage(backing, "size", "flip")
    v.mount(by_key_file=True)
    expect_errno(errno.EIO, (v.mnt / "f").read_bytes)
    v.unmount()


def test_epoch_at_uint64_max_is_damage_not_a_crash(copy):
    """A record whose epoch is near the top of the range (the next would overflow) is not one encfsd
    wrote: it is damaged, so the mount serves, passes no damaged slot over, and fsck reports it."""
    v, _ = copy
    (v.store / "encfsd.epoch").write_bytes(record_slot(1, 2**64 - 1, 0) + bytes(32))
    rc, out = fsck(v)
    assert rc == 4 and "encfsd.epoch: damaged" in out, out
    v.mount(by_key_file=True)
    assert (v.mnt / "f").read_bytes() == NEW
    v.unmount()
    assert "arithmetic overflow" not in v.daemon_log()
    r = run(v.binary, "fsck", v.store, "--key-file", v.key_file, "--repair", check=False)
    assert r.returncode in (0, 1, 4) and "arithmetic overflow" not in r.stderr, r.stderr[-400:]


def test_forged_lower_sequence_in_newest_slot_is_not_silent(copy):
    """Without the key: the newest slot's sequence lowered by 2 (same parity) and the unkeyed checksum
    recomputed, so the older slot looks current. The other slot's MAC catches it: EIO, fsck exit 4."""
    v, backing = copy
    region = bytearray(backing.read_bytes()[:4096])
    n = newest_slot(backing)
    s = region[n * 2048:(n + 1) * 2048]
    length = struct.unpack_from("<H", s, 6)[0]
    struct.pack_into("<Q", s, 8, struct.unpack_from("<Q", s, 8)[0] - 2)
    s[length + 32:length + 40] = hashlib.sha256(bytes(s[:length + 32])).digest()[:8]
    with open(backing, "r+b") as f:
        f.seek(n * 2048)
        f.write(s)
    rc, out = fsck(v)
    assert rc == 4, out
    v.mount(by_key_file=True)
    try:
        data = (v.mnt / "f").read_bytes()
    except OSError as e:
        assert e.errno == errno.EIO
    else:
        assert data != OLD, "older state served silently"
        raise AssertionError("a forged slot was served")
    finally:
        v.unmount()


def test_fsck_without_repair_creates_no_journal(copy):
    v, _ = copy
    run("rm", "-rf", v.store / ".journal")
    fsck(v)
    assert not (v.store / ".journal").exists(), "fsck without --repair created .journal"


def test_config_downgrade_of_a_newer_store_is_refused(copy):
    """encfsd.conf is not authenticated: "version": 1 in a v2 or later store (whose root header is too) makes
    new objects v1 (no epoch), and with encfsd.epoch deleted their damaged slots are passed over
    (the v1 rule, U = 0). A v2 root header under a v1 config cannot happen legitimately."""
    v, _ = copy
    conf = v.store / "encfsd.conf"
    conf.write_text(re.sub(r'"version" : \d+', '"version" : 1', conf.read_text()))
    (v.store / "encfsd.epoch").unlink()
    r = run(v.binary, "mount", v.store, v.mnt, "--no-keyring", "--key-file", v.key_file, check=False)
    if r.returncode == 0:
        run("fusermount3", "-u", v.mnt, check=False)
    assert r.returncode != 0, "a v1 config over a v2 root header was mounted"
