#!/usr/bin/env python3
"""Rekey benchmark (issue 11): re-encryption throughput against the streaming-write figure of the
same mount, and foreground streaming read and write speed during a rekey against their speed
without one. Run by scripts/bench-rekey.sh; prints one Markdown table.

    bench-rekey.py ENCFSD_BINARY WORKDIR SIZE_MIB ROUNDS

Rounds run one after another on fresh mounts (the machine is shared: a round's streaming write
and its rekey run back to back, so both see the same load); the medians decide the targets.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

binary, work, size_mib, rounds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
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


def one_round(work: Path) -> dict:
    """One mount: the streaming figures without a rekey, then the rekey with the probes during it."""
    store, mnt = work / "store", work / "mnt"
    mnt.mkdir(parents=True)
    a, b = work / "a.key", work / "b.key"
    for k in (a, b):
        k.write_bytes(os.urandom(64))
    run(binary, "init", store, "--key-file", a)
    run(binary, "mount", store, mnt, "--no-keyring", "--key-file", a, "--key-file", b, "--log-file", work / "daemon.log")
    r = {"load": os.getloadavg()[0]}
    try:
        # Without a rekey: the streaming figures, and the data to rekey (two files of SIZE).
        r["write"] = write_file(mnt / "data1", size_mib)
        write_file(mnt / "data2", size_mib)
        r["read"] = read_file(mnt / "data1")
        write_file(mnt / "probe", size_mib // 4)
        r["probe_read"] = read_file(mnt / "probe")
        r["probe_write"] = write_file(mnt / "probe-w", size_mib // 4)
        os.unlink(mnt / "probe-w")

        total = 2 * size_mib + size_mib // 4
        start = time.monotonic()
        run(binary, "rekey", "start", mnt, "--to", identifier(b))
        # Foreground during the rekey: a streaming read and a streaming write of a quarter of SIZE.
        during = rekey_running(mnt)
        r["read_during"] = read_file(mnt / "probe")
        r["write_during"] = write_file(mnt / "probe-w", size_mib // 4)
        r["overlapped"] = during and rekey_running(mnt)
        run(binary, "rekey", "wait", mnt, timeout=3600)
        r["rekey"] = total * MiB / 1e6 / (time.monotonic() - start)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
    r["load_end"] = os.getloadavg()[0]
    r["ratio"] = r["rekey"] / r["write"]
    r["read_slowdown"] = r["probe_read"] / r["read_during"]
    r["write_slowdown"] = r["probe_write"] / r["write_during"]
    return r


results = []
for i in range(rounds):
    results.append(one_round(work / f"round{i + 1}"))
    subprocess.run(["rm", "-rf", str(work / f"round{i + 1}")])

print(f"Each round is one fresh mount: streaming write, then the rekey right after it ({2 * size_mib + size_mib // 4} MiB).")
print()
print("| round | load avg (1 min, start/end) | streaming write (MB/s) | re-encryption (MB/s) | re-encryption / write | read during / without (MB/s) | write during / without (MB/s) |")
print("|---|---|---|---|---|---|---|")
for i, r in enumerate(results):
    print(f"| {i + 1} | {r['load']:.2f} / {r['load_end']:.2f} | {r['write']:.0f} | {r['rekey']:.0f} | {r['ratio']:.2f} | "
          f"{r['read_during']:.0f} / {r['probe_read']:.0f} ({r['read_slowdown']:.2f}x slower) | "
          f"{r['write_during']:.0f} / {r['probe_write']:.0f} ({r['write_slowdown']:.2f}x slower) |")
m = {k: statistics.median(r[k] for r in results) for k in ("write", "rekey", "ratio", "read_slowdown", "write_slowdown")}
print(f"| median | | {m['write']:.0f} | {m['rekey']:.0f} | {m['ratio']:.2f} | {m['read_slowdown']:.2f}x slower | {m['write_slowdown']:.2f}x slower |")
print()
print(f"- re-encryption at least half the streaming write (median ratio {m['ratio']:.2f}): {'met' if m['ratio'] >= 0.5 else 'NOT met'}")
print(f"- foreground read within 2x during a rekey (median {m['read_slowdown']:.2f}x): {'met' if m['read_slowdown'] <= 2 else 'NOT met'}")
print(f"- foreground write within 2x during a rekey (median {m['write_slowdown']:.2f}x): {'met' if m['write_slowdown'] <= 2 else 'NOT met'}")
if not all(r["overlapped"] for r in results):
    print("- in some round the rekey ended before a probe did (size too small to overlap): use a larger --size")
