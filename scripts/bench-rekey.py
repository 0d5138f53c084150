#!/usr/bin/env python3
"""Rekey benchmark (issue 11): re-encryption throughput against the streaming-write figure of the
same mount, and foreground streaming read and write speed during a rekey against their speed
without one. Run by scripts/bench-rekey.sh; prints one Markdown table.

    bench-rekey.py ENCFSD_BINARY WORKDIR SIZE_MIB
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

binary, work, size_mib = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
MiB = 1 << 20
CHUNK = os.urandom(MiB)


def run(*args, **kw):
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True, **kw)


def drop_caches():
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def write_file(path: Path, mib: int) -> float:
    """MB/s of a streaming write of mib MiB in 1 MiB blocks, fsync at the end (as scripts/bench.sh's dd)."""
    start = time.monotonic()
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(CHUNK)
        os.fsync(f.fileno())
    return mib * MiB / 1e6 / (time.monotonic() - start)


def read_file(path: Path) -> float:
    drop_caches()
    start = time.monotonic()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            n += len(chunk)
    return n / 1e6 / (time.monotonic() - start)


def identifier(key: Path) -> str:
    import hashlib
    import hmac
    prk = hmac.new(b"\0" * 64, key.read_bytes(), hashlib.sha512).digest()
    return hmac.new(prk, b"fscrypt\0\x01\x01", hashlib.sha512).digest()[:16].hex()


def rekey_running(mnt: Path) -> bool:
    return "re-encrypted" in run(binary, "rekey", "status", mnt).stdout


store, mnt = work / "store", work / "mnt"
mnt.mkdir(parents=True)
a, b = work / "a.key", work / "b.key"
for k in (a, b):
    k.write_bytes(os.urandom(64))
run(binary, "init", store, "--key-file", a)
run(binary, "mount", store, mnt, "--no-keyring", "--key-file", a, "--key-file", b, "--log-file", work / "daemon.log")
try:
    # Without a rekey: the streaming figures, and the data to rekey (two files of SIZE).
    write_plain = write_file(mnt / "data1", size_mib)
    write_file(mnt / "data2", size_mib)
    read_plain = read_file(mnt / "data1")
    write_file(mnt / "probe", size_mib // 4)
    read_probe_plain = read_file(mnt / "probe")
    probe_write_plain = write_file(mnt / "probe-w", size_mib // 4)
    os.unlink(mnt / "probe-w")

    total = 2 * size_mib + size_mib // 4
    start = time.monotonic()
    run(binary, "rekey", "start", mnt, "--to", identifier(b))
    # Foreground during the rekey: a streaming read and a streaming write of a quarter of SIZE.
    during = rekey_running(mnt)
    read_during = read_file(mnt / "probe")
    write_during = write_file(mnt / "probe-w", size_mib // 4)
    during = during and rekey_running(mnt)
    run(binary, "rekey", "wait", mnt, timeout=3600)
    elapsed = time.monotonic() - start
    rekey_rate = total * MiB / 1e6 / elapsed
finally:
    subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)

print(f"| metric | value |")
print(f"|---|---|")
print(f"| streaming write, no rekey (MB/s) | {write_plain:.0f} |")
print(f"| streaming read, no rekey (MB/s) | {read_plain:.0f} |")
print(f"| re-encryption throughput ({total} MiB, MB/s; includes the foreground probes) | {rekey_rate:.0f} ({rekey_rate / write_plain:.2f} of the streaming write) |")
print(f"| foreground read during the rekey / without (MB/s) | {read_during:.0f} / {read_probe_plain:.0f} ({read_probe_plain / read_during:.2f}x slower) |")
print(f"| foreground write during the rekey / without (MB/s) | {write_during:.0f} / {probe_write_plain:.0f} ({probe_write_plain / write_during:.2f}x slower) |")
print(f"| rekey was running through both probes | {'yes' if during else 'no (size too small to overlap)'} |")
