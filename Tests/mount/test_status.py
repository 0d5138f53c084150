"""`encfsd status`, `encfsd info`, `--idle` and `--version`."""

from __future__ import annotations

import json
import os

import pytest

from conftest import daemon_pids, is_mounted, run, wait_pids_gone
from test_mount_helper import in_namespace

EXTENT = 16384


def status(volume, *extra) -> dict:
    [report] = json.loads(run(volume.binary, "status", volume.mnt, "--json", *extra).stdout)
    return report


def test_status_reports_daemon_policies_and_files(make_volume, tmp_path):
    volume = make_volume()
    report = status(volume)
    assert report["mountpoint"] == str(volume.mnt) and report["store"] == str(volume.store)
    assert report["pid"] in volume.pids and report["format_version"] == 3
    assert 0 <= report["uptime_seconds"] < 3600
    assert report["open_files"] == 0 and report["open_directories"] == 0
    # The root policy first; keys other tests left in root's keyring may follow (loaded at mount).
    assert report["policies"][0] == {"identifier": volume.policy, "root": True, "key": "present",
                                     "user_count": 1, "added_by_self": True}

    # A directory under a second policy, its key not yet added: known, absent.
    other_key = tmp_path / "other.key"
    run(volume.binary, "key", "generate", "-o", other_key)
    other = run(volume.binary, "init", tmp_path / "scratch", "--key-file", other_key).stdout.strip().rsplit(" ", 1)[-1]
    (volume.mnt / "work").mkdir()
    run(volume.binary, "policy", "set", volume.mnt / "work", other)
    policies = {p["identifier"]: p for p in status(volume)["policies"]}
    assert policies[other] == {"identifier": other, "root": False, "key": "absent", "user_count": 0, "added_by_self": False}

    text = run(volume.binary, "status", volume.mnt).stdout
    assert text.startswith(f"{volume.mnt}\n  store:          {volume.store}\n")
    assert f"{other}  Absent\n" in text and f"{volume.policy}  Present (user_count=1, added_by_self)  (root)\n" in text
    assert f"  daemon:         pid {report['pid']}, up " in text
    everything = run(volume.binary, "status", "--json").stdout
    assert str(volume.mnt) in [r["mountpoint"] for r in json.loads(everything)]

    with open(volume.mnt / "held", "wb") as held:
        held.write(b"x" * 100)
        held.flush()
        report = status(volume)
        assert report["open_files"] == 1
        assert report["buffered_bytes"] in (0, EXTENT)  # committed by the timer flush after 2 s
        assert run(volume.binary, "key", "remove", volume.mnt, volume.policy).stdout.endswith("but files still busy\n")
        root = [p for p in status(volume)["policies"] if p["root"]][0]
        assert root["key"] == "incompletely removed"
    assert status(volume)["open_files"] == 0


def test_status_counts_fuse_requests(make_volume):
    """The request counters a benchmark divides by its operations: every CREATE reaches the
    daemon, and evicted inodes come back as forget requests, counted apart."""
    volume = make_volume()
    before = status(volume)
    for i in range(10):
        (volume.mnt / f"counted-{i}").write_bytes(b"x")
    after = status(volume)
    assert after["requests"] - before["requests"] >= 10
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")
    assert status(volume)["forget_requests"] > after["forget_requests"]
    text = run(volume.binary, "status", volume.mnt).stdout
    assert "  requests:       " in text and " forgets)" in text


def test_status_of_a_non_mount_is_an_error(tmp_path, encfsd_bin):
    r = run(encfsd_bin, "status", tmp_path, check=False)
    assert r.returncode == 1 and "is not an encfsd mountpoint" in r.stderr


def test_info_needs_no_key(tmp_path, encfsd_bin, key_file):
    store = tmp_path / "store"
    policy = run(encfsd_bin, "init", store, "--key-file", key_file, "--extent-size", "65536").stdout.strip().rsplit(" ", 1)[-1]
    info = json.loads(run(encfsd_bin, "info", store, "--json").stdout)
    # What the probe of the backing found (a local disk here: every capability native).
    assert info.pop("backing")["fallbacks"] == {}
    assert info == {"store": str(store), "format_version": 3, "features": ["extent-key-groups"], "extent_size": 65536,
                    "root_policy": policy, "passphrases": [], "objects": 1}
    text = run(encfsd_bin, "info", store).stdout
    assert f"root policy:    {policy}\n" in text and "extent size:    65536\n" in text
    r = run(encfsd_bin, "info", tmp_path, check=False)
    assert r.returncode == 1 and "not an encfsd store" in r.stderr


def test_info_counts_objects_and_passphrase_parameters(make_volume, tmp_path, encfsd_bin):
    volume = make_volume()
    (volume.mnt / "a").mkdir()
    (volume.mnt / "a" / "f").write_text("f")
    os.link(volume.mnt / "a" / "f", volume.mnt / "g")  # a hard link is one object
    (volume.mnt / "s").symlink_to("a")
    volume.unmount()
    assert json.loads(run(encfsd_bin, "info", volume.store, "--json").stdout)["objects"] == 4
    store = tmp_path / "pass"
    run(encfsd_bin, "init", store, "--passphrase", "--scrypt-log-n", "10", input="secret words\n")
    [p] = json.loads(run(encfsd_bin, "info", store, "--json").stdout)["passphrases"]
    assert p["kdf"] == "scrypt" and p["n"] == 1024 and p["r"] > 0 and p["p"] > 0


def test_idle_unmount(tmp_path, encfsd_bin, key_file):
    """With --idle 2s the mount goes by itself once nothing is open and nothing asked; while a
    file is open it stays. Run in a private mount namespace, where no other process on the
    machine can see the mount (and so keep it busy). Waits on the event with a generous bound."""
    store, mnt, log = tmp_path / "store", tmp_path / "mnt", tmp_path / "daemon.log"
    mnt.mkdir()
    run(encfsd_bin, "init", store, "--key-file", key_file)
    script = f"""
{encfsd_bin} mount {store} {mnt} --idle 2s --log-file {log} --no-keyring --key-file {key_file}
exec 3> {mnt}/open-while-idle
echo "still here" >&3
# Held open for three idle periods: an open file keeps the mount.
for i in $(seq 30); do grep -q " {mnt} " /proc/self/mountinfo || {{ echo "unmounted while open"; exit 1; }}; sleep 0.2; done
exec 3>&-
for i in $(seq 600); do grep -q " {mnt} " /proc/self/mountinfo || break; sleep 0.1; done
if grep -q " {mnt} " /proc/self/mountinfo; then echo "still mounted 60 s after the last close"; umount {mnt}; exit 1; fi
"""
    r = in_namespace(script)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not wait_pids_gone(daemon_pids(mnt), 20), "the daemon did not exit after its idle unmount"
    assert f"idle for 2.0 seconds: unmounting {mnt}" in log.read_text()
    # What was written before the idle unmount is there.
    r = in_namespace(f"""
{encfsd_bin} mount {store} {mnt} --no-keyring --key-file {key_file}
cat {mnt}/open-while-idle
umount {mnt}
""")
    assert r.stdout == "still here\n", r.stdout + r.stderr
    assert not wait_pids_gone(daemon_pids(mnt), 20)


@pytest.mark.parametrize("value", ["0s", "10x", "-5s", "1.5s", "s", ""])
def test_bad_idle_durations_are_refused(tmp_path, encfsd_bin, key_file, value):
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    run(encfsd_bin, "init", store, "--key-file", key_file)
    r = run(encfsd_bin, "mount", store, mnt, "--idle", value, check=False)
    assert r.returncode != 0 and "--idle" in r.stderr, r.stderr
    assert not is_mounted(mnt)


def test_version(encfsd_bin):
    out = run(encfsd_bin, "--version").stdout.strip()
    assert out.count(".") == 2 and all(part.isdigit() for part in out.split("."))
