"""The systemd unit: `systemd-analyze verify`, and a run of its ExecStart and ExecStop lines as
systemd would run them (credentials directory, notify socket)."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time
from pathlib import Path

from conftest import REPO, daemon_pids, is_mounted, run, wait_pids_gone

UNIT = REPO / "systemd" / "encfsd@.service"


def unit_for(binary: Path, directory: Path, instance: str = "demo") -> Path:
    """The unit with the installed binary path pointing at the build under test."""
    text = UNIT.read_text().replace("/usr/local/bin/encfsd", str(binary))
    (directory / "encfsd@.service").write_text(text)
    instance_path = directory / f"encfsd@{instance}.service"
    instance_path.symlink_to("encfsd@.service")
    return instance_path


def test_unit_verifies(tmp_path, encfsd_bin):
    r = run("systemd-analyze", "verify", "--man=no", unit_for(encfsd_bin, tmp_path), check=False)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    path = unit_for(encfsd_bin, broken)
    (broken / "encfsd@.service").write_text(UNIT.read_text().replace("Type=notify", "Type=sometimes"))
    r = run("systemd-analyze", "verify", "--man=no", path, check=False)
    assert r.returncode != 0 or "Type" in r.stderr, "verify accepted a broken unit: the check proves nothing"


def unit_lines(key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if line.startswith(key + "=")]


def expand_unit_line(line: str, binary: Path, store: Path, mnt: Path, credentials: Path, instance: str = "demo") -> list[str]:
    """A command line of the unit as systemd would run it for this store, mountpoint and credentials."""
    line = (line.replace("/usr/local/bin/encfsd", str(binary))
            .replace("/var/lib/encfsd/%i", str(store)).replace("/mnt/encfsd/%i", str(mnt))
            .replace("%i", instance).replace("${CREDENTIALS_DIRECTORY}", str(credentials)))
    return shlex.split(line)


def test_exec_start_mounts_unlocked_and_notifies_ready(tmp_path, encfsd_bin, key_file):
    instance = "demo"
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "key").write_bytes(key_file.read_bytes())
    run(encfsd_bin, "init", store, "--key-file", key_file)

    def expand(line: str) -> list[str]:
        return expand_unit_line(line, encfsd_bin, store, mnt, credentials, instance)

    for pre in unit_lines("ExecStartPre"):
        run(*expand(pre))
    assert mnt.is_dir()

    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(30)
    [start] = unit_lines("ExecStart")
    daemon = subprocess.Popen(expand(start), env={**os.environ, "NOTIFY_SOCKET": str(notify)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        message = listener.recv(4096).decode()
        assert "READY=1" in message
        assert is_mounted(mnt), "READY=1 came before the mount"
        (mnt / "hello").write_text("unlocked at start from the credential\n")
        assert (mnt / "hello").read_text() == "unlocked at start from the credential\n"
        [stop] = unit_lines("ExecStop")
        run(*expand(stop))
        assert daemon.wait(timeout=30) == 0, daemon.stderr.read().decode()
        assert "STOPPING=1" in listener.recv(4096).decode()
        assert not is_mounted(mnt)
    finally:
        if daemon.poll() is None:
            run("fusermount3", "-u", mnt, check=False)
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
        listener.close()
