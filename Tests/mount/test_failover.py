"""Failover between two hosts sharing one store on GlusterFS: two FUSE client mounts of one
volume (served from a network namespace, backings.py) stand for two hosts, each with an encfsd
for the same store. While the first serves it, the second is refused by the store lock, which
GlusterFS forwards to the brick; the first is SIGKILLed mid-workload and its client mount
dropped; the second then mounts (its lock granted once the filesystem released the dead
holder's), replays what was interrupted, and must show every byte and every directory entry
whose fsync returned on the first, as recorded in a log kept outside both mounts. The roles
then swap, ten times."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
import time

import pytest

import backings
from conftest import Volume, run, wait_for, wait_pids_gone

REPETITIONS = 10


@pytest.fixture(scope="module")
def gluster(tmp_path_factory):
    backing = backings.Gluster(tmp_path_factory.mktemp("gluster"))
    try:
        backing.up()
        yield backing
    finally:
        backing.down()


class Workload(threading.Thread):
    """Creates, overwrites and extends files and makes directories, fsyncing each change (and
    the directory of each new entry) and only then logging it, to `log` outside the mounts. What
    is under way when the daemon dies is `in_flight`: the file may hold it or its logged state."""

    def __init__(self, mnt, log, rng: random.Random, round_: int):
        super().__init__(daemon=True)
        self.mnt, self.log, self.rng, self.round = mnt, log, rng, round_
        self.in_flight: tuple | None = None  # (name, the states it may hold, ...)
        self.logged = threading.Event()
        self.count = 0

    def attempt(self, name, *states):
        self.in_flight = (name, *states)

    def record(self, kind, name, data=b""):
        with open(self.log, "a") as f:
            f.write(f"{kind} {name} {hashlib.sha256(data).hexdigest()}\n")
            f.flush()
            os.fsync(f.fileno())
        self.count += 1
        if self.count >= 8:
            self.logged.set()

    def fsync_dir(self, path):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def run(self):
        try:
            directory = f"r{self.round}"
            os.mkdir(self.mnt / directory)
            self.fsync_dir(self.mnt)
            self.record("dir", directory)
            names = []
            for i in range(10_000):
                if names and self.rng.random() < 0.4:
                    name = self.rng.choice(names)
                    data = self.rng.randbytes(self.rng.randrange(1, 70_000))
                    # An overwrite is a truncate (committed at once) and a write: killed between
                    # them, the file is empty.
                    self.attempt(name, data, b"")
                    with open(self.mnt / name, "r+b") as f:
                        f.truncate(0)
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                else:
                    name = f"{directory}/f{i}"
                    data = self.rng.randbytes(self.rng.randrange(0, 70_000))
                    self.attempt(name, data)
                    with open(self.mnt / name, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    self.fsync_dir(self.mnt / directory)
                    names.append(name)
                self.record("file", name, data)
                self.in_flight = None
        except OSError:
            pass  # the daemon was killed: requests fail from then on


def expected_state(log):
    """name -> (kind, sha256) of the last fsynced state of each entry."""
    state = {}
    with open(log) as f:
        for line in f:
            kind, name, digest = line.split()
            state[name] = (kind, digest)
    return state


def check(mnt, log, in_flight):
    for name, (kind, digest) in expected_state(log).items():
        path = mnt / name
        if kind == "dir":
            assert path.is_dir(), f"fsynced directory {name} is missing after failover"
            continue
        assert path.exists(), f"fsynced file {name} is missing after failover"
        found = hashlib.sha256(path.read_bytes()).hexdigest()
        allowed = {digest} | ({hashlib.sha256(d).hexdigest() for d in in_flight[1:]} if in_flight and in_flight[0] == name else set())
        assert found in allowed, f"{name} holds neither its fsynced state nor the write in flight"
        if found != digest:
            # What the interrupted step left is what later checks hold the file to.
            with open(log, "a") as f:
                f.write(f"file {name} {found}\n")


def mount_when_released(volume: Volume):
    """Mounts as soon as the store lock is free: the dead holder's lock goes when GlusterFS has
    seen its descriptors close (or its client go); a refusal until then names the dead holder."""
    def mounted():
        result = run(volume.binary, "mount", volume.store, volume.mnt, "--log-file", volume.root / "daemon.log",
                     "--no-keyring", "--key-file", volume.key_file, check=False)
        if result.returncode == 0:
            return True
        assert "in use by encfsd" in result.stderr, result.stderr
        return False
    wait_for(mounted, 60, "the store lock to be released by GlusterFS")
    volume.pids = [int(p) for p in run("pgrep", "-f", f"mount {volume.store} {volume.mnt}", check=False).stdout.split()]


def test_failover_between_two_client_mounts(gluster, tmp_path, encfsd_bin, key_file, volumes):
    clients = [gluster.root, gluster.add_client(tmp_path / "client-b")]
    run(encfsd_bin, "init", clients[0] / "store", "--key-file", key_file)
    hosts = []
    for i, client in enumerate(clients):
        (tmp_path / f"host{i}").mkdir()
        hosts.append(Volume(encfsd_bin, tmp_path / f"host{i}", key_file, create=False, store=client / "store"))
    volumes.extend(hosts)
    log = tmp_path / "fsynced.log"
    rng = random.Random(13)
    in_flight = None
    active = 0
    mount_when_released(hosts[active])
    for repetition in range(REPETITIONS):
        first, second = hosts[active], hosts[1 - active]
        if repetition:
            check(first.mnt, log, in_flight)
        refused = run(encfsd_bin, "mount", second.store, second.mnt, "--no-keyring", "--key-file", key_file, check=False)
        assert refused.returncode != 0 and f"in use by encfsd pid {first.pids[0]} on host" in refused.stderr, refused.stderr

        workload = Workload(first.mnt, log, rng, repetition)
        workload.start()
        assert workload.logged.wait(120), "the workload logged nothing"
        time.sleep(rng.random() * 0.5)  # the kill lands anywhere in the next operations
        os.kill(first.pids[0], signal.SIGKILL)
        assert wait_pids_gone(first.pids, 30) == []
        workload.join(60)
        assert not workload.is_alive(), "the workload hung after the kill"
        in_flight = workload.in_flight
        run("umount", "-l", first.mnt, check=False)
        gluster.drop_client(clients[active])  # the first host goes away
        first.pids = []

        mount_when_released(second)
        clients[active] = gluster.add_client(clients[active])  # the first host comes back, as standby
        active = 1 - active
    check(hosts[active].mnt, log, in_flight)
    assert len(expected_state(log)) > REPETITIONS * 8
    hosts[active].unmount()
