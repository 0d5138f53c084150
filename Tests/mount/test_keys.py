"""Key management on a real mount beyond the fstests ports: stock xfs_io, the kernel's caches
after removal, key bytes gone from the daemon's memory, hostile ioctl arguments, passphrases,
unlocking from the keyring at mount, and --key-file."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import random
import re
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import (ENOKEY, Volume, daemon_pids, expect_errno, force_unmount, made_key_serials, purge_test_keys,
                      run, wait_for, wait_pids_gone)
from test_systemd import expand_unit_line, unit_lines

REMOVE_KEY = 0xC0406618
REMOVE_KEY_ALL = 0xC0406619
KEY_STATUS = 0xC080661A
GET_NONCE = 0x8010661B
ADD_KEY = 0xC0804501
SET_POLICY = 0x40204502
GET_POLICY = 0x80204503


def identifier_of(volume: Volume) -> str:
    return volume.policy


def test_stock_xfs_io_rm_enckey_and_enckey_status(volume):
    ident = identifier_of(volume)
    out = run("xfs_io", "-c", f"enckey_status {ident}", volume.mnt).stdout
    assert out == "Present (user_count=1, added_by_self)\n"
    out = run("xfs_io", "-c", f"rm_enckey {ident}", volume.mnt).stdout
    assert out == f"Removed encryption key with identifier {ident}\n"
    assert run("xfs_io", "-c", f"enckey_status {ident}", volume.mnt).stdout == "Absent\n"
    r = run("xfs_io", "-c", f"rm_enckey {ident}", volume.mnt, check=False)
    assert "Error removing encryption key: Required key not available" in r.stderr
    assert run("lsattr", "-d", volume.mnt).stdout.split()[0].count("E") == 1


def test_caches_forget_plaintext_once_removal_completes(volume):
    ident = identifier_of(volume)
    d = volume.mnt / "private"
    d.mkdir()
    (d / "diary.txt").write_text("dear diary\n")
    # Warm every kernel cache: the dentry, the attributes, and the page cache.
    assert (d / "diary.txt").read_text() == "dear diary\n"
    assert os.listdir(d) == ["diary.txt"]
    os.stat(d / "diary.txt")
    with open(d / "diary.txt") as held:
        out = run(volume.binary, "key", "remove", volume.mnt, ident).stdout
        assert out.endswith("but files still busy\n")
        assert held.read() == "dear diary\n"  # an open file keeps working
    out = run(volume.binary, "key", "remove", volume.mnt, ident).stdout
    assert out == f"Removed encryption key with identifier {ident}\n"
    # No remount: nothing the kernel cached may show plaintext now.
    expect_errno(errno.ENOENT, os.stat, volume.mnt / "private")
    listed = os.listdir(volume.mnt)
    assert "private" not in listed and len(listed) == 1
    nokey_dir = volume.mnt / listed[0]
    names = os.listdir(nokey_dir)
    assert names != ["diary.txt"] and len(names) == 1
    expect_errno(ENOKEY, open, nokey_dir / names[0])
    expect_errno(errno.ENOENT, open, d / "diary.txt")


def readable_memory(pid: int):
    """(maps line, bytes) of each readable region of the process under 1 GiB (root reads /proc/PID/mem)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if "r" not in fields[1] or end - start > 1 << 30:
                continue
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            yield line.strip(), chunk


def scan_memory(pid: int, needle: bytes) -> list[str]:
    """Regions of the process's memory that contain `needle`."""
    return [line for line, chunk in readable_memory(pid) if needle in chunk]


PASSPHRASE = "correct horse battery staple"
KEY_SOURCES = ["key-add", "keyring-at-mount", "passphrase", "key-file", "systemd-credential"]


class UnlockedStore:
    """A mounted store unlocked through one key source; `raw` is the master key it used."""

    def __init__(self, source, tmp_path, binary, key_file):
        self.source, self.binary = source, binary
        self.store, self.mnt = tmp_path / "store", tmp_path / "mnt"
        self.mnt.mkdir()
        self.daemon = None
        if source == "passphrase":
            run(binary, "init", self.store, "--passphrase", "--scrypt-log-n", "12", input=PASSPHRASE + "\n")
            [p] = json.loads((self.store / "encfsd.conf").read_text())["passphrases"]
            self.raw = hashlib.scrypt(PASSPHRASE.encode(), salt=bytes.fromhex(p["salt"]), n=p["n"], r=p["r"], p=p["p"], dklen=64)
        else:
            run(binary, "init", self.store, "--key-file", key_file)
            self.raw = key_file.read_bytes()
        self.policy = json.loads((self.store / "encfsd.conf").read_text())["rootPolicy"]
        purge_test_keys()
        if source == "key-add":
            self.mount("--no-keyring")
            run(binary, "key", "add", self.mnt, "--key-file", key_file)
        elif source == "keyring-at-mount":
            # `key add` leaves the key in the keyring; the next daemon loads it from there at start.
            self.mount("--no-keyring")
            run(binary, "key", "add", self.mnt, "--key-file", key_file)
            pids = daemon_pids(self.mnt)
            run("fusermount3", "-u", self.mnt)
            assert wait_pids_gone(pids, 20) == []
            self.mount()
        elif source == "passphrase":
            self.mount("--no-keyring")
            run(binary, "key", "add", self.mnt, "--passphrase", input=PASSPHRASE + "\n")
        elif source == "key-file":
            self.mount("--no-keyring", "--key-file", key_file)
        else:
            self.start_unit(tmp_path, key_file)
        self.pid = self.daemon.pid if self.daemon else daemon_pids(self.mnt)[0]

    def mount(self, *extra):
        run(self.binary, "mount", self.store, self.mnt, *extra)

    def start_unit(self, tmp_path, key_file):
        """The unit's ExecStart line, with the key in a credentials directory, as systemd runs it."""
        credentials = tmp_path / "credentials"
        credentials.mkdir(mode=0o700)
        (credentials / "key").write_bytes(key_file.read_bytes())
        [line] = unit_lines("ExecStart")
        notify = tmp_path / "notify.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(str(notify))
        listener.settimeout(30)
        self.daemon = subprocess.Popen(expand_unit_line(line, self.binary, self.store, self.mnt, credentials), env={**os.environ, "NOTIFY_SOCKET": str(notify)},
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert "READY=1" in listener.recv(4096).decode()
        finally:
            listener.close()

    def close(self):
        run("fusermount3", "-u", self.mnt, check=False)
        pids = [self.daemon.pid] if self.daemon else daemon_pids(self.mnt)
        for pid in wait_pids_gone(pids, 20):
            os.kill(pid, 9)
        if self.daemon:
            self.daemon.wait(timeout=10)
        purge_test_keys()


def wait_for_status(binary, mnt, ident, wanted: str) -> str:
    """The kernel sends RELEASE after close(2) returns, so the last close reaches the daemon a
    moment later: wait for the status (an event, generously bounded)."""
    wait_for(lambda: run(binary, "key", "status", mnt, ident).stdout.strip() == wanted, 60, f"key status {wanted}")
    return wanted


@pytest.mark.parametrize("source", KEY_SOURCES)
def test_removed_key_is_wiped_for_every_key_source(source, tmp_path, encfsd_bin, key_file):
    """Whatever brought the key in, soft removal ends the same way once the last file closes: the
    key is absent, names are in no-key form, and neither the raw key nor a derived key is left in
    the daemon's memory."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    s = UnlockedStore(source, tmp_path, encfsd_bin, key_file)
    try:
        # The daemon keeps no raw key, only derived keys; the name key (HKDF context 0x82) proves
        # the scan can see key material while it is present.
        name_key = HKDF(hashes.SHA512(), 64, None, b"fscrypt\0\x82").derive(s.raw)
        (s.mnt / "private").mkdir()
        (s.mnt / "private" / "diary.txt").write_text("dear diary\n")
        assert os.listdir(s.mnt) == ["private"]
        assert scan_memory(s.pid, s.raw) == []
        assert scan_memory(s.pid, name_key) != [], "the scan cannot see the daemon's keys: it proves nothing"
        with open(s.mnt / "private" / "diary.txt") as held:
            out = run(encfsd_bin, "key", "remove", s.mnt, s.policy).stdout
            assert out.endswith("but files still busy\n"), out
            assert run(encfsd_bin, "key", "status", s.mnt, s.policy).stdout == "Incompletely removed\n"
            assert held.read() == "dear diary\n"
        assert wait_for_status(encfsd_bin, s.mnt, s.policy, "Absent") == "Absent"
        listed = os.listdir(s.mnt)
        assert listed != ["private"] and len(listed) == 1, listed
        assert scan_memory(s.pid, s.raw) == []
        assert scan_memory(s.pid, name_key) == []
    finally:
        s.close()


def test_keyring_entry_is_revoked_when_key_is_wiped(volume):
    ident = identifier_of(volume)
    serials = [s for s in run("keyctl", "rlist", "@u").stdout.split()
               if f";encfsd:{ident}:" in run("keyctl", "rdescribe", s, check=False).stdout]
    assert len(serials) == 1
    run(volume.binary, "key", "remove", volume.mnt, ident)
    # Revoked on a thread of its own once the key is wiped: wait for that.
    wait_for(lambda: run("keyctl", "print", serials[0], check=False).returncode != 0, 60,
             "the keyring entry to become unreadable after the key was wiped")
    # Invalidated, not merely revoked: the kernel unlinks it (a revoked key stays linked, counting
    # against the quota, until the garbage collector's delay of 300 s, far beyond this wait).
    wait_for(lambda: serials[0] not in run("keyctl", "rlist", "@u").stdout.split(), 60,
             "the wiped key's entry to leave the keyring (revoked but still linked counts against the quota)")


def ioctl_raw(path, command: int, payload: bytes) -> bytes:
    buf = bytearray(payload)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, command, buf, True)
    finally:
        os.close(fd)
    return bytes(buf)


def mount_state(volume: Volume, ident: str) -> dict:
    """What a hostile ioctl must not change: the key's status, this test's keyring entries, the
    plaintext listing and contents, and the backing store's names and bytes."""
    files = {}
    for dirpath, _, names in os.walk(volume.mnt):
        for name in names:
            path = os.path.join(dirpath, name)
            files[os.path.relpath(path, volume.mnt)] = Path(path).read_bytes()
    backing = {}
    for dirpath, _, names in os.walk(volume.store):
        for name in names:
            path = os.path.join(dirpath, name)
            backing[os.path.relpath(path, volume.store)] = Path(path).read_bytes()
    return {"status": run(volume.binary, "key", "status", volume.mnt, ident).stdout,
            "keyring": made_key_serials([ident]), "files": files, "backing": backing}


def test_hostile_ioctl_arguments_get_einval_and_change_nothing(volume):
    # The state compared includes the backing bytes, which the plaintext reads of mount_state
    # would change by moving atimes (headers rewritten at close): noatime keeps them still.
    volume.unmount()
    volume.mount(options="noatime")
    ident = identifier_of(volume)
    (volume.mnt / "kept").write_bytes(os.urandom(40000))
    (volume.mnt / "d").mkdir()
    (volume.mnt / "d" / "inner").write_text("inner")
    before = mount_state(volume, ident)
    assert before["status"].startswith("Present") and before["keyring"], before["status"]
    rng = random.Random(1)
    sizes = {ADD_KEY: 128, REMOVE_KEY: 64, REMOVE_KEY_ALL: 64, KEY_STATUS: 128, SET_POLICY: 32}
    for command, size in sizes.items():
        for _ in range(50):
            junk = bytes(rng.getrandbits(8) for _ in range(size))
            # Junk fails the first field checked (the key-specifier type, or encfsd's protocol
            # version), so the answer is EINVAL, whatever the command, and nothing is done.
            assert junk[:4] not in ((2).to_bytes(4, "little"), (1).to_bytes(4, "little")), "junk that is not junk"
            expect_errno(errno.EINVAL, ioctl_raw, volume.mnt, command, junk)
    # A specifier with a reserved byte set, an unknown key-spec type, an oversized raw key.
    spec = (2).to_bytes(4, "little") + bytes(4) + bytes.fromhex(ident) + bytes(16)
    bad_reserved = bytearray(spec + bytes(24))
    bad_reserved[60] = 1
    expect_errno(errno.EINVAL, ioctl_raw, volume.mnt, REMOVE_KEY, bytes(bad_reserved))
    expect_errno(errno.EINVAL, ioctl_raw, volume.mnt, REMOVE_KEY, (1).to_bytes(4, "little") + spec[4:] + bytes(24))
    expect_errno(errno.EINVAL, ioctl_raw, volume.mnt, KEY_STATUS, spec[:40] + b"\x01" + bytes(87))
    expect_errno(errno.ENOTTY, ioctl_raw, volume.mnt, 0xC0084599, bytes(8))
    # Well formed, for a key nobody added: removal is ENOKEY, status Absent.
    unknown = (2).to_bytes(4, "little") + bytes(4) + bytes(range(16)) + bytes(16)
    expect_errno(ENOKEY, ioctl_raw, volume.mnt, REMOVE_KEY, unknown + bytes(24))
    expect_errno(ENOKEY, ioctl_raw, volume.mnt, REMOVE_KEY_ALL, unknown + bytes(24))
    reply = ioctl_raw(volume.mnt, KEY_STATUS, unknown + bytes(88))
    assert int.from_bytes(reply[64:68], "little") == 1, "status of an unknown key is not Absent"
    # Nothing changed.
    after = mount_state(volume, ident)
    for what in before:
        assert after[what] == before[what], f"{what} changed"
    (volume.mnt / "still").write_text("works")
    assert (volume.mnt / "still").read_text() == "works"


def test_keys_in_the_keyring_unlock_at_mount(volume):
    (volume.mnt / "f").write_text("kept")
    volume.unmount()
    volume.mount(unlock=False, keyring=True)  # no key add after the restart
    assert (volume.mnt / "f").read_text() == "kept"


def test_mount_with_key_file(volume):
    (volume.mnt / "f").write_text("kept")
    volume.unmount()
    purge_test_keys([volume.policy])  # this test's key only: the keyring holds others' too
    assert made_key_serials([volume.policy]) == []
    run(volume.binary, "mount", volume.store, volume.mnt, "--no-keyring", "--key-file", volume.key_file)
    volume.pids = daemon_pids(volume.mnt)
    assert (volume.mnt / "f").read_text() == "kept"


def test_passphrase_keys(tmp_path, encfsd_bin):
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    run(encfsd_bin, "init", store, "--passphrase", "--scrypt-log-n", "12", input="correct horse battery staple\n")
    config = (store / "encfsd.conf").read_text()
    assert '"passphrases"' in config and "correct horse" not in config
    try:
        run(encfsd_bin, "mount", store, mnt, "--no-keyring")
        r = run(encfsd_bin, "key", "add", mnt, "--passphrase", input="wrong\n", check=False)
        assert r.returncode != 0 and "wrong passphrase" in r.stderr
        out = run(encfsd_bin, "key", "add", mnt, "--passphrase", input="correct horse battery staple\n").stdout
        assert re.fullmatch(r"Added encryption key with identifier [0-9a-f]{32}\n", out)
        (mnt / "secret").write_text("s")
        assert (mnt / "secret").read_text() == "s"
    finally:
        problems = force_unmount(mnt)
        purge_test_keys()
    assert problems == []


@pytest.mark.parametrize("planted,why", [({"p": 1_000_000}, "scrypt p = 1000000 is not 1 to 4"),
                                         ({"n": 1 << 20, "r": 15}, "over the maximum 1024 MiB"),
                                         ({"n": 3 << 12}, "is not a power of two"),
                                         ({"salt": "00" * 8}, "the salt is not 32 bytes")])
def test_planted_passphrase_parameters_are_refused_before_scrypt(tmp_path, encfsd_bin, planted, why):
    """encfsd.conf is in the store, which an attacker may write while it is mounted: a config asking
    scrypt for more than the documented maximum (p = 10^6 would run for hours, N·r = 15 GiB would
    exhaust memory) is refused with the reason, before any derivation, and changes nothing."""
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    run(encfsd_bin, "init", store, "--passphrase", "--scrypt-log-n", "12", input=PASSPHRASE + "\n")
    run(encfsd_bin, "mount", store, mnt, "--no-keyring")
    try:
        config = json.loads((store / "encfsd.conf").read_text())
        config["passphrases"][0].update(planted)
        (store / "encfsd.conf").write_text(json.dumps(config))
        r = run(encfsd_bin, "key", "add", mnt, "--passphrase", input=PASSPHRASE + "\n", check=False)
        assert r.returncode != 0
        assert "asks for passphrase parameters encfsd refuses" in r.stderr and why in r.stderr, r.stderr
        # Nothing reached the keyring under this store's key (other keys are other tests').
        serials = run("keyctl", "rlist", "@u", check=False).stdout.split()
        described = [run("keyctl", "rdescribe", s, check=False).stdout for s in serials]
        assert not [d for d in described if f"encfsd:{config['rootPolicy']}" in d], described
        assert run(encfsd_bin, "key", "status", mnt, config["rootPolicy"]).stdout == "Absent\n"
    finally:
        run("fusermount3", "-u", mnt, check=False)
