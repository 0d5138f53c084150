"""No silent reversion (docs/FORMAT.md 15.2), on a real mount.

A byte flipped or zeroed in any part of a file's newest header slot (body, MAC, checksum,
padding) after a clean unmount makes the file read EIO, logged, and fsck reports it (exit 4);
`fsck --repair` rewrites the slot from the intact one (exit 1). After an unclean end (the daemon
killed with SIGKILL) the same damage can be a write torn in flight: the older state is served,
and the fallback is logged and reported by fsck. Never an older state without a word."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from conftest import Volume, expect_errno, run, wait_pids_gone

# One full extent, then an append: two commits with no extent overwritten (no journal), so the
# older slot holds exactly the state OLD.
OLD = bytes(range(256)) * 64
NEW = OLD + b"the newest contents\n" * 1000


def slots(path):
    with open(path, "rb") as f:
        region = f.read(4096)
    return [region[i:i + 2048] for i in (0, 2048)]


def newest_slot(path) -> int:
    seqs = [struct.unpack_from("<Q", s, 8)[0] if s[:4] == b"EFS1" else -1 for s in slots(path)]
    return seqs.index(max(seqs))


def offset_in_slot(path, part: str) -> int:
    """Where a part of the newest slot lies: body fields, the MAC, the checksum, the padding."""
    slot = slots(path)[newest_slot(path)]
    length = struct.unpack_from("<H", slot, 6)[0]
    return {"sequence": 8, "size": 48, "epoch": 112, "inode flags": 144, "atime": 152, "ctime kept": 168, "MAC": length + 5, "checksum": length + 33,
            "padding": length + 60, "last byte": 2047}[part]


def damage(path, part: str, how: str):
    at = newest_slot(path) * 2048 + offset_in_slot(path, part)
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x01 if how == "flip" else 0]))


def fsck(volume: Volume, *args) -> tuple[int, str]:
    r = run(volume.binary, "fsck", volume.store, "--key-file", volume.key_file, *args, check=False)
    return r.returncode, r.stdout + r.stderr


@pytest.fixture(scope="module")
def written(tmp_path_factory, encfsd_bin):
    """A store whose file `f` was committed twice (both slots used), cleanly unmounted."""
    root = tmp_path_factory.mktemp("slot-damage")
    key = root / "key"
    key.write_bytes(bytes(range(1, 65)))
    v = Volume(encfsd_bin, root / "base", key)
    v.mount(by_key_file=True)
    try:
        (v.mnt / "f").write_bytes(OLD)
        with open(v.mnt / "f", "ab") as f:
            f.write(NEW[len(OLD):])
    finally:
        v.unmount()
    return v


@pytest.fixture
def copy(written, tmp_path, volumes):
    v = Volume.copy_of(written, tmp_path)
    volumes.append(v)
    [backing] = v.backing_entries()
    return v, v.store / backing


# Padding is zero already: there a byte can only be flipped.
CASES = [(part, how) for part in ["sequence", "size", "epoch", "MAC", "checksum"] for how in ("flip", "zero")] \
    + [("padding", "flip"), ("last byte", "flip"), ("atime", "flip"), ("inode flags", "flip"), ("ctime kept", "flip")]


@pytest.mark.parametrize("part,how", CASES)
def test_damage_after_clean_unmount_is_eio(copy, part, how):
    v, backing = copy
    before = backing.read_bytes()
    damage(backing, part, how)
    assert backing.read_bytes() != before
    v.mount(by_key_file=True)
    expect_errno(errno.EIO, (v.mnt / "f").read_bytes)
    v.unmount()
    assert "is damaged, and the store has shut down cleanly" in v.daemon_log()
    rc, out = fsck(v)
    assert rc == 4 and "header slot" in out and "refuses the object (EIO)" in out, out
    rc, out = fsck(v, "--repair")
    assert rc == 1 and "rewrote it from the intact slot" in out, out
    # Repaired: both slots intact again, the state fsck reported is served, and fsck is clean.
    assert fsck(v)[0] == 0
    v.mount(by_key_file=True)
    assert (v.mnt / "f").read_bytes() == OLD
    v.unmount()


@pytest.mark.parametrize("part", ["size", "MAC", "padding", "inode flags"])
def test_damage_after_unclean_end_serves_older_state_logged(copy, part):
    v, backing = copy
    v.mount(by_key_file=True)
    assert (v.mnt / "f").read_bytes() == NEW
    # An unclean end: the epoch of this mount stays open.
    for pid in v.pids:
        os.kill(pid, 9)
    assert wait_pids_gone(v.pids, 30) == []
    run("fusermount3", "-uz", v.mnt, check=False)
    v.pids = []
    damage(backing, part, "flip")
    rc, out = fsck(v)
    assert rc == 4 and "the daemon serves the other slot" in out, out
    v.mount(by_key_file=True)
    assert (v.mnt / "f").read_bytes() == OLD
    v.unmount()
    assert "is damaged; serving sequence" in v.daemon_log()


def test_damaged_epoch_record_passes_nothing_over(copy):
    v, backing = copy
    v.mount(by_key_file=True)
    for pid in v.pids:
        os.kill(pid, 9)
    assert wait_pids_gone(v.pids, 30) == []
    run("fusermount3", "-uz", v.mnt, check=False)
    v.pids = []
    # The open record of the killed mount damaged: it no longer counts as evidence of a crash.
    with open(v.store / "encfsd.epoch", "r+b") as f:
        f.seek(9)
        byte = f.read(1)[0]
        f.seek(9)
        f.write(bytes([byte ^ 0x01]))
    damage(backing, "size", "flip")
    rc, out = fsck(v)
    assert rc == 4 and "encfsd.epoch" in out and "refuses the object (EIO)" in out, out
    v.mount(by_key_file=True)
    expect_errno(errno.EIO, (v.mnt / "f").read_bytes)
    v.unmount()
