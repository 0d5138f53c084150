"""P1 (daemon death) at every fault point: a real daemon, armed to SIGKILL itself at one step of
the flush, recovery or rename protocol, runs a workload on a real mount and dies there. After a
remount every file must read in full as the state of its last completed flush, or of the flush
in flight when it died, never a mix, and nothing whose fsync returned may be lost."""

from __future__ import annotations

import errno
import os
import random
import struct

import pytest

from conftest import Volume, daemon_pids, is_mounted, run, wait_for, wait_pids_gone

# What a FUSE request answers once its daemon is dead.
DAEMON_GONE = (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED)

FILE_POINTS = [
    "append-extents-written", "append-header-written", "shadow-written", "pending-flag-set",
    "extents-applied", "final-header-written", "shadow-removed", "create-header-written",
    "rename-binding-added", "rename-done",
    # The fourth create (of "d") comes after the rename has completed: what was renamed away must
    # stay away.
    "create-header-written@4",
]


class Model:
    """Expected contents: for each name, the state after its last completed step, and the states
    the step in flight may leave (its result, and what its completed system calls made of it)."""

    def __init__(self):
        self.done: dict[str, bytes] = {}
        self.in_flight: dict[str, list] = {}


def workload(mnt, model: Model, rng: random.Random):
    def step(name, new, action, renamed_from=None, partial=()):
        model.in_flight = {name: [new, *partial]}
        if renamed_from:
            model.in_flight[renamed_from] = [None]
        action()
        model.done[name] = new
        if renamed_from:
            model.done.pop(renamed_from, None)
        model.in_flight = {}

    def write_all(name, data, fsync=False):
        def act():
            with open(mnt / name, "wb") as f:
                f.write(data)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
        return act

    def patch(name, offset, data):
        def act():
            with open(mnt / name, "r+b") as f:
                f.seek(offset)
                f.write(data)
        return act

    def append(name, data):
        def act():
            with open(mnt / name, "ab") as f:
                f.write(data)
        return act

    def truncate(name, size):
        def act():
            os.truncate(mnt / name, size)
        return act

    # open(O_CREAT|O_TRUNC) completes before the data's flush: "created, still empty" is a state.
    a = rng.randbytes(40000)
    step("a", a, write_all("a", a, fsync=True), partial=[b""])        # create, fast path, fsync
    b = rng.randbytes(100)
    step("b", b, write_all("b", b), partial=[b""])                    # create + first extent
    p = rng.randbytes(1000)
    a = a[:5000] + p + a[6000:]
    step("a", a, patch("a", 5000, p))                                 # overwrite: journaled
    more = rng.randbytes(20000)
    step("b", b + more, append("b", more))                            # partial last extent resealed: journaled
    b = b + more
    step("a", a[:20000], truncate("a", 20000))                        # shrink into an extent: journaled
    a = a[:20000]
    c = b"0123456789"
    step("c", c, write_all("c", c), partial=[b""])                    # another create
    step("e", b, lambda: os.rename(mnt / "b", mnt / "e"), renamed_from="b")
    step("a", a + bytes(30000), truncate("a", 50000))                 # grow: reseal + holes
    a = a + bytes(30000)
    q = rng.randbytes(3000)
    step("e", q + b[3000:], patch("e", 0, q))                         # overwrite after rename
    tail = rng.randbytes(50000)
    step("d", tail, write_all("d", tail), partial=[b""])              # multi-extent create


def kill_leftovers(volume: Volume):
    if is_mounted(volume.mnt):
        run("fusermount3", "-uz", volume.mnt, check=False)
    left = wait_pids_gone(daemon_pids(volume.mnt), 10)
    for pid in left:
        os.kill(pid, 9)
    volume.pids = []


def check_p1(volume: Volume, model: Model):
    names = set(os.listdir(volume.mnt))
    # A name the model does not allow (one renamed away, never created) must not be there.
    allowed_names = {n for n in model.done} | {n for n, states in model.in_flight.items() if states != [None]}
    assert names <= allowed_names, f"names outside the model: {sorted(names - allowed_names)}"
    for name in set(model.done) | set(model.in_flight):
        allowed = ([model.done[name]] if name in model.done else [None]) + model.in_flight.get(name, [])
        if name not in names:
            assert None in allowed, f"{name} is gone"
            continue
        data = (volume.mnt / name).read_bytes()  # any EIO here fails the test
        assert data in allowed, f"{name}: {len(data)} bytes, neither its last completed state nor one the step in flight may leave"


def mount_armed(volume: Volume, point: str | None):
    volume.mount(env={**os.environ, "ENCFSD_FAULT_POINT": point} if point else None)


def dies_at(volume: Volume, point: str, action) -> OSError:
    """Runs `action` on a daemon armed at `point` and asserts that it died there: the action fails
    as requests to a dead daemon do, the daemon is gone, and its log says it reached `point`
    (once more than before)."""
    spec = point.split("@")[0]
    reached = f"fault point {spec} reached"
    before = volume.daemon_log().count(reached)
    try:
        action()
    except OSError as e:
        error = e
    else:
        raise AssertionError(f"fault point {point} was never reached by the workload")
    assert error.errno in DAEMON_GONE, error
    assert wait_pids_gone(volume.pids, 60) == [], "the armed daemon did not die"
    assert volume.daemon_log().count(reached) == before + 1, f"the daemon died, but not at {point}"
    kill_leftovers(volume)
    return error


@pytest.mark.parametrize("point", FILE_POINTS)
def test_daemon_killed_at_fault_point(make_volume, point):
    volume = make_volume(mount=False)
    mount_armed(volume, point)
    model = Model()
    dies_at(volume, point, lambda: workload(volume.mnt, model, random.Random(point)))
    volume.mount()
    check_p1(volume, model)


@pytest.mark.parametrize("point", ["recovery-extents-applied", "recovery-header-written"])
def test_daemon_killed_during_recovery(make_volume, point):
    volume = make_volume(mount=False)
    mount_armed(volume, "pending-flag-set@2")
    model = Model()
    dies_at(volume, "pending-flag-set@2", lambda: workload(volume.mnt, model, random.Random(1)))

    # The next mount recovers on first open, and dies in the middle of that recovery.
    def read_all():
        for name in sorted(os.listdir(volume.mnt)):
            (volume.mnt / name).read_bytes()
    mount_armed(volume, point)
    dies_at(volume, point, read_all)
    volume.mount()
    check_p1(volume, model)
    if point == "recovery-extents-applied":  # the pending flag is still set: recovery runs again
        assert "recovered an interrupted write" in volume.daemon_log()


def header_sequence(path) -> int:
    """The newest sequence number in a backing object's two header slots (u64 at byte 8 of a
    slot, docs/FORMAT.md): it goes up with every commit of the object."""
    with open(path, "rb") as f:
        region = f.read(4096)
    slots = [region[i:i + 2048] for i in (0, 2048)]
    return max(struct.unpack_from("<Q", slot, 8)[0] for slot in slots if slot[:4] == b"EFS1")


def test_timer_flush_commits_files_nobody_closes(make_volume):
    volume = make_volume()
    f = open(volume.mnt / "held", "wb")
    try:
        [backing] = volume.backing_entries()
        created = header_sequence(volume.store / backing)
        f.write(b"written, never closed or synced")
        f.flush()
        # The timer commits changes older than 2 s: the header's sequence moves when it has.
        wait_for(lambda: header_sequence(volume.store / backing) > created, 60, "a timer commit of the held file")
        for pid in volume.pids:
            os.kill(pid, 9)
        assert wait_pids_gone(volume.pids, 60) == []
    finally:
        try:
            f.close()
        except OSError:
            pass
    kill_leftovers(volume)
    volume.mount()
    assert (volume.mnt / "held").read_bytes() == b"written, never closed or synced"
