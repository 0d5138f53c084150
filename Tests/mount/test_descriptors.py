"""Backing descriptors scale with open files, not with the tree the kernel has cached.

The daemon's descriptor limit is lowered to 1,024 (a hard limit it cannot raise), then a tree
far larger than that is created, listed, stat'ed, read, renamed and removed through the mount.
And when clients hold so many files open that the daemon's budget runs out, only the opens that
need a new descriptor fail; everything else keeps working.
"""
import errno
import os
import resource
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import daemon_pids, run

LIMIT = 1024
FILES = int(os.environ.get("ENCFSD_DESCRIPTOR_TEST_FILES", "100000"))
PER_DIRECTORY = 1000


@pytest.fixture
def limited(make_volume):
    """A volume whose daemon runs with RLIMIT_NOFILE 1024:1024."""
    v = make_volume(mount=False)
    run("prlimit", f"--nofile={LIMIT}:{LIMIT}", v.binary, "mount", v.store, v.mnt,
        "--log-file", v.root / "daemon.log")
    v.pids = daemon_pids(v.mnt)
    v.add_key()
    assert len(v.pids) == 1
    limits = Path(f"/proc/{v.pids[0]}/limits").read_text()
    assert any(line.startswith("Max open files") and f"{LIMIT}" in line for line in limits.splitlines()), limits
    return v


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_tree_larger_than_the_descriptor_limit(limited):
    v = limited
    pid = v.pids[0]
    directories = [v.mnt / f"d{i:03}" for i in range((FILES + PER_DIRECTORY - 1) // PER_DIRECTORY)]

    def files(k):
        return [(directories[k] / f"file-{i}", i) for i in range(k * PER_DIRECTORY, min(FILES, (k + 1) * PER_DIRECTORY))]

    def create(k):
        directories[k].mkdir()
        for p, i in files(k):
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.write(fd, f"contents of {i}\n".encode())
            os.close(fd)

    def check(k):
        with os.scandir(directories[k]) as entries:
            listed = {e.name: e.stat().st_size for e in entries}
        assert len(listed) == len(files(k))
        for p, i in files(k):
            assert listed[p.name] == len(f"contents of {i}\n")
            assert p.read_bytes() == f"contents of {i}\n".encode()

    def rename_and_remove(k):
        for p, i in files(k):
            os.rename(p, p.with_name(f"renamed-{i}"))
        for p, i in files(k):
            os.unlink(p.with_name(f"renamed-{i}"))
        directories[k].rmdir()

    most = 0
    # Several clients at once, as an untar or a copy with parallel workers would be; the daemon
    # serves them on its worker threads. Each step's errors surface through .result().
    with ThreadPoolExecutor(max_workers=4) as pool:
        for step in (create, check, rename_and_remove):
            for future in [pool.submit(step, k) for k in range(len(directories))]:
                future.result()
                most = max(most, open_descriptors(pid))
    assert os.listdir(v.mnt) == []
    # Well under the limit all along: descriptors are bounded by open files and the directory cache.
    assert most < LIMIT, most
    print(f"{FILES} files under a {LIMIT}-descriptor daemon; at most {most} descriptors held")


def test_exhausted_budget_fails_only_new_opens(limited):
    v = limited
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4 * LIMIT), max(hard, 4 * LIMIT)))
    held = []
    try:
        first = v.mnt / "kept-open"
        first.write_bytes(b"first")
        keep = os.open(first, os.O_RDWR)
        held.append(keep)
        refused = None
        for i in range(2 * LIMIT):
            p = v.mnt / f"f{i}"
            try:
                held.append(os.open(p, os.O_CREAT | os.O_RDWR, 0o644))
            except OSError as e:
                refused = e
                break
        assert refused is not None, "the daemon never ran out of descriptors"
        assert refused.errno in (errno.EMFILE, errno.ENFILE), refused
        # Refused before its entry was made: no name is left behind.
        assert not p.exists() and p.name not in os.listdir(v.mnt)
        # Everything that needs no new backing descriptor keeps working.
        assert "kept-open" in os.listdir(v.mnt)
        assert os.stat(first).st_size == 5
        os.pwrite(keep, b"still writable", 0)
        os.fsync(keep)
        assert os.pread(keep, 14, 0) == b"still writable"
        (v.mnt / "dir-at-limit").mkdir()
        assert daemon_pids(v.mnt) == v.pids
        # And once files close, opens work again.
        for fd in held[1:]:
            os.close(fd)
        held = held[:1]
        assert (v.mnt / "f0").read_bytes() == b""
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
