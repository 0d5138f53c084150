"""Rekey (issue 11): a tree moves from key A to key B while mounted and in use; afterwards A
can be removed and everything reads back with B alone, and no byte of the store is still sealed
under A (checked by store_scanner, an independent reader of the format)."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import threading
from pathlib import Path

import pytest

from conftest import Volume, daemon_pids, force_unmount, purge_test_keys, run, wait_for, wait_pids_gone
from store_scanner import Scanner, identifier

KiB = 1 << 10
MiB = 1 << 20


def new_key(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(64))
    path.chmod(0o600)
    return path


def build_tree(top: Path, seed: int = 1):
    """Files of every size class, holes, hard links, long names, symlinks, xattrs and FIFOs."""
    rng = random.Random(seed)
    (top / "d" / "deeper").mkdir(parents=True)
    for size in [0, 1, 100, 16 * KiB - 1, 16 * KiB, 16 * KiB + 1, 200 * KiB, 3 * MiB + 5]:
        (top / f"f{size}").write_bytes(rng.randbytes(size))
        (top / "d" / f"g{size}").write_bytes(rng.randbytes(size // 3))
    with open(top / "holes", "wb") as f:
        f.write(b"start")
        f.seek(5 * MiB)
        f.write(b"middle")
        f.truncate(9 * MiB)
    os.link(top / "f100", top / "d" / "hardlink")
    long_name = "L" * 200
    (top / long_name).write_bytes(b"long name contents")
    (top / "d" / ("m" * 255)).mkdir()
    os.symlink("f100", top / "link")
    os.symlink("x" * 3000, top / "d" / "longlink")
    os.setxattr(top / "f1", "user.comment", b"hello")
    os.setxattr(top / "d", "user.dir", rng.randbytes(300))
    os.mkfifo(top / "fifo")
    os.mkfifo(top / "d" / "deeper" / "fifo2")
    (top / "d" / "deeper" / "leaf").write_bytes(rng.randbytes(50000))


def view(top: Path) -> dict:
    """Every name, type, mode, size, content, target, xattr and link count under top."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(top))
            st = os.lstat(p)
            item = {"type": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode), "nlink": st.st_nlink}
            if stat.S_ISLNK(st.st_mode):
                item["target"] = os.readlink(p)
            else:
                item["xattrs"] = {n: os.getxattr(p, n) for n in sorted(os.listxattr(p))}
            if stat.S_ISREG(st.st_mode):
                item["size"] = st.st_size
                item["data"] = p.read_bytes()
            if stat.S_ISDIR(st.st_mode):
                item["nlink"] = None  # a plain directory counts subdirectories, encfsd does not
            out[rel] = item
    return out


class Workload:
    """Writes, renames and reads in the mount and in the plain copy alike, until stopped."""

    def __init__(self, mnt: Path, plain: Path):
        self.tops = [mnt / "tree", plain]
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.rounds = 0
        self.thread = threading.Thread(target=self.run)

    def run(self):
        rng = random.Random(7)
        try:
            while not self.stop.is_set():
                n = self.rounds
                data = rng.randbytes(rng.choice([10, 20000, 70000]))
                offset = rng.randrange(0, 4 * MiB)
                for top in self.tops:
                    (top / f"w{n % 5}").write_bytes(data)
                    with open(top / "f3145733", "r+b") as f:
                        f.seek(offset)
                        f.write(data[:100])
                    os.rename(top / f"w{n % 5}", top / "d" / f"moved{n % 3}")
                    (top / "d" / "deeper" / "leaf").read_bytes()
                    assert (top / "f100").read_bytes() == (top / "d" / "hardlink").read_bytes()
                self.rounds += 1
        except BaseException as e:  # reported by the test
            self.error = e


def rekey_status(volume: Volume, path: Path) -> str:
    return run(volume.binary, "rekey", "status", path).stdout


def test_rekey_every_object_type_while_in_use(volume: Volume, tmp_path):
    a_key = volume.key_file.read_bytes()
    b_file = new_key(tmp_path, "b.key")
    c_file = new_key(tmp_path, "c.key")
    b_id = volume.add_key(b_file)
    c_id = volume.add_key(c_file)
    plain = tmp_path / "plain"
    plain.mkdir()
    tree = volume.mnt / "tree"
    tree.mkdir()
    for top in (tree, plain):
        build_tree(top)
    # A nested policy root, left alone by the rekey of the tree around it.
    (tree / "nested").mkdir()
    run(volume.binary, "policy", "set", tree / "nested", c_id)
    (plain / "nested").mkdir()
    for top in (tree / "nested", plain / "nested"):
        (top / "inner").write_bytes(b"under C" * 1000)

    work = Workload(volume.mnt, plain)
    work.thread.start()
    try:
        out = run(volume.binary, "rekey", "start", volume.mnt, "--to", b_id).stdout
        assert "started" in out
        assert "->" in run(volume.binary, "policy", "get", volume.mnt).stdout or "done" in rekey_status(volume, volume.mnt)
        wait_for(lambda: work.rounds >= 3 or work.error, 120, "the workload to run during the rekey")
        run(volume.binary, "rekey", "wait", volume.mnt, timeout=600)
    finally:
        work.stop.set()
        work.thread.join()
    assert work.error is None, work.error
    assert "done" in rekey_status(volume, volume.mnt)
    assert view(tree) == view(plain)

    # A goes; the tree remounts with B (and C for the nested root) alone.
    run(volume.binary, "key", "remove", volume.mnt, volume.policy)
    volume.unmount()
    config = json.loads((volume.store / "encfsd.conf").read_text())
    assert config["version"] == 3 and config["rootPolicy"] == b_id and "rekeys" not in config
    volume.mount(unlock=False)
    volume.add_key(b_file)
    volume.add_key(c_file)
    assert view(tree) == view(plain)

    report = Scanner([b_file.read_bytes(), c_file.read_bytes()]).scan(volume.store)
    assert report.problems == [], report.problems[:20]
    assert identifier(a_key) not in report.sealed
    assert report.sealed[b_id] > report.objects
    fsck = run(volume.binary, "fsck", volume.store, "--key-file", b_file, "--key-file", c_file, "--force", check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_removing_the_old_key_early_gives_enokey_only_for_what_it_still_seals(volume: Volume, tmp_path):
    b_file = new_key(tmp_path, "b.key")
    b_id = volume.add_key(b_file)
    for i in range(40):
        (volume.mnt / f"file{i}").write_bytes(random.Random(i).randbytes(300 * KiB))
    volume.unmount()
    # A mount that stops after the first rekeyed files: the rekey is left part way.
    volume.mount(options=None, env={**os.environ, "ENCFSD_FAULT_POINT": "rekey-batch-committed@5"})
    volume.add_key(b_file)
    pids = volume.pids
    run(volume.binary, "rekey", "start", volume.mnt, "--to", b_id)
    assert wait_pids_gone(pids, 60) == []
    volume.force_cleanup()
    volume.mount(unlock=False)
    volume.add_key(b_file)
    readable, locked = 0, 0
    for i in range(40):
        try:
            assert (volume.mnt / f"file{i}").read_bytes() == random.Random(i).randbytes(300 * KiB)
            readable += 1
        except OSError as e:
            assert e.errno == 126, e  # ENOKEY, never EIO
            locked += 1
    assert readable > 0 and locked > 0
    status = rekey_status(volume, volume.mnt)
    assert "read ENOKEY" in status, status
    volume.unmount()

    # fsck of the half-rekeyed store: clean with both keys; with either, clean but saying what it
    # could not check; and --repair with only one key loses nothing.
    def fsck(*keys, repair=False):
        args = [a for k in keys for a in ("--key-file", k)] + (["--repair"] if repair else [])
        return run(volume.binary, "fsck", volume.store, *args, check=False)
    # Only the key files count: the keys `key add` left in the keyring would make every check a
    # check with both.
    purge_test_keys([volume.policy, b_id])
    # The kill may have caught the other lane's batch mid-transaction: --repair with the new key
    # alone completes it (exit 0 or 1, nothing quarantined).
    repaired = fsck(b_file, repair=True)
    assert repaired.returncode in (0, 1) and "quarantine" not in repaired.stdout, repaired.stdout + repaired.stderr
    both = fsck(volume.key_file, b_file)
    assert both.returncode == 0 and "not checked" not in both.stdout, both.stdout + both.stderr
    for one in (volume.key_file, b_file):
        r = fsck(one)
        assert r.returncode == 0 and "not checked" in r.stdout, r.stdout + r.stderr
    volume.mount(by_key_file=True)
    volume.add_key(b_file)
    run(volume.binary, "rekey", "wait", volume.mnt, timeout=300)
    for i in range(40):
        assert (volume.mnt / f"file{i}").read_bytes() == random.Random(i).randbytes(300 * KiB)


@pytest.mark.parametrize("round_", range(20))
def test_kill_during_rekey_resumes_and_completes(make_volume, tmp_path, round_):
    volume = make_volume()
    rng = random.Random(round_)
    b_file = new_key(tmp_path, "b.key")
    b_id = volume.add_key(b_file)
    files = {}
    for i in range(12):
        files[f"f{i}"] = rng.randbytes(rng.choice([1, 100, 40 * KiB, 1 * MiB + 3]))
        (volume.mnt / f"f{i}").write_bytes(files[f"f{i}"])
    (volume.mnt / "sub").mkdir()
    (volume.mnt / "sub" / "inner").write_bytes(b"inner")
    files["sub/inner"] = b"inner"
    os.setxattr(volume.mnt / "f1", "user.x", b"y")
    volume.unmount()
    point = rng.choice(["rekey-batch-committed", "rekey-header-converted", "rekey-name-moved",
                        "shadow-written", "pending-flag-set", "extents-applied"])
    volume.mount(env={**os.environ, "ENCFSD_FAULT_POINT": f"{point}@{rng.randrange(1, 8)}"}, by_key_file=True)
    volume.add_key(b_file)
    pids = volume.pids
    run(volume.binary, "rekey", "start", volume.mnt, "--to", b_id, check=False)
    # The daemon dies at the fault point, or the rekey finishes before reaching it.
    wait_for(lambda: not all(p in daemon_pids(volume.mnt) for p in pids) or
             "done" in run(volume.binary, "rekey", "status", volume.mnt, check=False).stdout, 120, "death or completion")
    # Every point is reached at least seven times in this tree: the daemon died there.
    assert wait_pids_gone(pids, 60) == [], f"the daemon did not die at {point}"
    volume.force_cleanup()
    volume.mount(by_key_file=True)
    volume.add_key(b_file)
    for name, data in files.items():
        assert (volume.mnt / name).read_bytes() == data, name
    assert os.getxattr(volume.mnt / "f1", "user.x") == b"y"
    run(volume.binary, "rekey", "wait", volume.mnt, timeout=300)
    for name, data in files.items():
        assert (volume.mnt / name).read_bytes() == data, name
    volume.unmount()
    fsck = run(volume.binary, "fsck", volume.store, "--key-file", b_file, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    report = Scanner([b_file.read_bytes()]).scan(volume.store)
    assert report.problems == [], report.problems[:20]


def test_change_passphrase_retires_the_old_one(tmp_path, encfsd_bin):
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    run(encfsd_bin, "init", store, "--passphrase", "--scrypt-log-n", "12", input="old passphrase\n")
    old = json.loads((store / "encfsd.conf").read_text())["rootPolicy"]
    try:
        run(encfsd_bin, "mount", store, mnt, "--no-keyring")
        run(encfsd_bin, "key", "add", mnt, "--passphrase", input="old passphrase\n")
        (mnt / "d").mkdir()
        (mnt / "d" / "f").write_bytes(b"contents" * 5000)
        out = run(encfsd_bin, "key", "change-passphrase", mnt, "--scrypt-log-n", "12", input="new passphrase\n",
                  timeout=300).stdout
        assert "done" in out, out
        run("fusermount3", "-u", mnt)
        wait_for(lambda: not daemon_pids(mnt), 30, "the daemon to exit")
        config = json.loads((store / "encfsd.conf").read_text())
        assert config["rootPolicy"] != old and [p["identifier"] for p in config["passphrases"]] == [config["rootPolicy"]]
        purge_test_keys()
        run(encfsd_bin, "mount", store, mnt, "--no-keyring")
        r = run(encfsd_bin, "key", "add", mnt, "--passphrase", input="old passphrase\n", check=False)
        assert r.returncode != 0 and "wrong passphrase" in r.stderr
        run(encfsd_bin, "key", "add", mnt, "--passphrase", input="new passphrase\n")
        assert (mnt / "d" / "f").read_bytes() == b"contents" * 5000
    finally:
        problems = force_unmount(mnt)
        purge_test_keys()
    assert problems == []


def test_v1_store_is_upgraded_only_by_upgrade_or_rekey(tmp_path, encfsd_bin):
    v = Volume.golden(encfsd_bin, tmp_path, "v1")
    config_path = v.store / "encfsd.conf"
    try:
        v.mount(by_key_file=True)
        (v.mnt / "new-file").write_bytes(b"written on a v1 store")
        v.unmount()
        assert json.loads(config_path.read_text())["version"] == 1, "a mount upgraded the store"
        assert "Upgraded" in run(encfsd_bin, "upgrade", v.store).stdout
        assert json.loads(config_path.read_text())["version"] == 3
        # Files made from now on seal in key groups; the ones already there keep their layout.
        assert json.loads(config_path.read_text())["features"] == ["extent-key-groups"]
        assert "already" in run(encfsd_bin, "upgrade", v.store).stdout
        v.mount(by_key_file=True)
        assert (v.mnt / "new-file").read_bytes() == b"written on a v1 store"
        grouped = bytes((i * 13) & 0xff for i in range(50 * 4096 + 7))
        (v.mnt / "after-upgrade").write_bytes(grouped)
        v.unmount()
        v.mount(by_key_file=True)
        assert (v.mnt / "after-upgrade").read_bytes() == grouped
        assert (v.mnt / "new-file").read_bytes() == b"written on a v1 store"
        v.unmount()
    finally:
        v.force_cleanup()
