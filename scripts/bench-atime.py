#!/usr/bin/env python3
"""What the atime options cost (issue 12): open, read and close of many small files, under
noatime, relatime and strictatime, in interleaved rounds on one store. The first pass of a mount
moves every atime under relatime (the files were written since their last read); the second pass
is the one measured: under relatime it finds no atime due, so it costs the rule's check only, and
under strictatime every close writes a header. Prints one Markdown table of medians.

    bench-atime.py ENCFSD_BINARY [FILES] [ROUNDS]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

binary = Path(sys.argv[1])
files = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
OPTIONS = ["noatime", "relatime", "strictatime", "strictatime,lazytime"]


def run(*args):
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True)


def main():
    root = Path(tempfile.mkdtemp(prefix="encfsd-bench-atime-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    key, store, mnt = root / "key", root / "store", root / "mnt"
    mnt.mkdir()
    run(binary, "key", "generate", "-o", key)
    run(binary, "init", store, "--key-file", key)

    def mount(option):
        run(binary, "mount", store, mnt, "--key-file", key, "--no-keyring", "-o", option)

    def unmount():
        run("fusermount3", "-u", mnt)
        while any(line.split()[1] == str(mnt) for line in Path("/proc/mounts").read_text().splitlines()):
            time.sleep(0.05)

    try:
        mount("relatime")
        for i in range(files):
            (mnt / f"f{i}").write_bytes(b"x" * 100)
        unmount()
        rates = {option: [] for option in OPTIONS}
        for _ in range(rounds):
            for option in OPTIONS:
                mount(option)
                try:
                    for _ in range(2):
                        start = time.perf_counter()
                        for i in range(files):
                            fd = os.open(mnt / f"f{i}", os.O_RDONLY)
                            os.read(fd, 4096)
                            os.close(fd)
                        elapsed = time.perf_counter() - start
                    rates[option].append(files / elapsed)
                finally:
                    unmount()
        print(f"| option ({files} files, median of {rounds} rounds) | open+read+close per second (second pass) |")
        print("|---|---|")
        for option in OPTIONS:
            print(f"| `{option}` | {statistics.median(rates[option]):,.0f} |")
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        subprocess.run(["rm", "-rf", str(root)])


main()
