"""The mount's read-ahead. The kernel gives a FUSE mount the smaller of its default (128 KiB) and
what INIT asks for, so the daemon sets its own mount's (--read-ahead-kb, 4096 by default) once
INIT is done: streaming reads then arrive as 1 MiB READs that the fan-out spreads over the cores."""
from __future__ import annotations

import os
from pathlib import Path

from conftest import Volume


def read_ahead_kb(mnt: Path) -> int:
    device = os.stat(mnt).st_dev
    return int(Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb").read_text())


def test_a_mount_has_the_default_read_ahead(volume):
    assert read_ahead_kb(volume.mnt) == 4096
    data = os.urandom(3 << 20)
    (volume.mnt / "f").write_bytes(data)
    assert (volume.mnt / "f").read_bytes() == data


def test_the_read_ahead_option_sets_it_or_keeps_the_kernels(make_volume):
    v = make_volume(mount=False)
    v.mount(args=("--read-ahead-kb", "1024"))
    assert read_ahead_kb(v.mnt) == 1024
    v.unmount()
    v.mount(args=("--read-ahead-kb", "0"))
    assert read_ahead_kb(v.mnt) == 128


def test_a_mountpoint_whose_path_mountinfo_escapes_gets_it_too(tmp_path, encfsd_bin, key_file, volumes):
    # /proc/self/mountinfo writes space, tab and backslash as octal escapes.
    v = Volume(encfsd_bin, tmp_path / "a dir\twith \\ odd names", key_file)
    volumes.append(v)
    v.mount(by_key_file=True, args=("--read-ahead-kb", "2048"))
    assert read_ahead_kb(v.mnt) == 2048
