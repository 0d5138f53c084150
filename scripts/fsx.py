#!/usr/bin/env python3
"""fsx for encfsd: a file system exerciser in the manner of xfstests' fsx, written for this project.

One file is driven by a seeded random sequence of reads, writes, mapped reads and writes,
truncates, fsyncs, close/reopens and every fallocate mode (allocate, keep-size allocate, punch
hole, zero range with and without keep-size, collapse range, insert range), against an in-memory
model of what the file must hold. Every read (and the whole file, every --check-every operations
and at the end) is compared with the model; the first difference stops the run with the recent
operations, which the seed reproduces.

As fsx does, each fallocate mode is tried once at start: a mode the filesystem refuses
(EOPNOTSUPP) is disabled for the run, and the start-up lines say which modes are on. Collapse and
insert use block-aligned offsets and lengths (the block being st_blksize), as ext4 requires.

Usage: fsx.py FILE [--ops N] [--seed S] [--max-size BYTES] [--check-every N]
The last line is "N passed, N failed" (1 passed for a clean run).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import mmap
import os
import random
import sys

KEEP_SIZE, PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE, INSERT_RANGE = 0x01, 0x02, 0x08, 0x10, 0x20
MODES = {
    "fallocate": 0,
    "fallocate-keep-size": KEEP_SIZE,
    "punch-hole": PUNCH_HOLE | KEEP_SIZE,
    "zero-range": ZERO_RANGE,
    "zero-range-keep-size": ZERO_RANGE | KEEP_SIZE,
    "collapse-range": COLLAPSE_RANGE,
    "insert-range": INSERT_RANGE,
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(fd: int, mode: int, offset: int, length: int):
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Failure(Exception):
    pass


class Exerciser:
    def __init__(self, path: str, seed: int, max_size: int):
        self.path = path
        self.seed = seed
        self.rng = random.Random(seed)
        self.max_size = max_size
        self.model = bytearray()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.block = os.fstat(self.fd).st_blksize
        self.log: list[str] = []
        self.counts: dict[str, int] = {}
        self.modes = self.probe_modes()

    def probe_modes(self) -> dict[str, int]:
        """The fallocate modes this filesystem accepts, tried on a scratch file as fsx does."""
        probe = self.path + ".probe"
        enabled = {}
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.pwrite(fd, bytes(4 * self.block), 0)
            for name, mode in MODES.items():
                try:
                    fallocate(fd, mode, self.block, self.block)
                    enabled[name] = mode
                    print(f"fsx: {name}: enabled")
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                        raise
                    print(f"fsx: {name}: disabled ({errno.errorcode[e.errno]}: the filesystem refuses it)")
        finally:
            os.close(fd)
            os.unlink(probe)
        return enabled

    def note(self, kind: str, text: str):
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.log.append(text)
        if len(self.log) > 40:
            del self.log[:20]

    # the model

    def model_resize(self, size: int):
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))

    def model_zero(self, offset: int, length: int):
        end = min(len(self.model), offset + length)
        if offset < end:
            self.model[offset:end] = bytes(end - offset)

    # checks

    def expect(self, what: str, got: bytes, offset: int):
        want = bytes(self.model[offset:offset + len(got)])
        if got != want:
            at = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]), min(len(got), len(want)))
            raise Failure(f"{what}: {len(got)} bytes differ from the model at file offset {offset + at}"
                          f" (got {got[at:at + 8].hex()}, model {want[at:at + 8].hex()})")

    def check_all(self, where: str):
        size = os.fstat(self.fd).st_size
        if size != len(self.model):
            raise Failure(f"{where}: size {size}, model {len(self.model)}")
        data = os.pread(self.fd, size + 1, 0)
        if len(data) != size:
            raise Failure(f"{where}: read {len(data)} bytes of a {size}-byte file")
        self.expect(where, data, 0)

    # operations

    def offset_and_length(self, aligned: bool = False) -> tuple[int, int]:
        size = len(self.model)
        if aligned:
            blocks = max(1, self.max_size // self.block)
            offset = self.rng.randrange(0, blocks) * self.block
            return offset, self.rng.randint(1, max(1, blocks // 8)) * self.block
        offset = self.rng.randrange(0, max(1, size + self.max_size // 8))
        return min(offset, self.max_size - 1), self.rng.randint(1, self.max_size // 8)

    def step(self, i: int):
        ops = ["read", "write", "mapread", "mapwrite", "truncate", "fsync", "reopen"] + list(self.modes)
        weights = [20, 20, 6, 6, 4, 1, 1] + [4] * len(self.modes)
        kind = self.rng.choices(ops, weights)[0]
        size = len(self.model)
        if kind == "read":
            offset, length = self.offset_and_length()
            self.note(kind, f"{i} read {offset} {length}")
            got = os.pread(self.fd, length, offset)
            if len(got) != max(0, min(length, size - offset)):
                raise Failure(f"read at {offset} of {length}: {len(got)} bytes, file is {size}")
            self.expect(f"read at {offset}", got, offset)
        elif kind == "write":
            offset, length = self.offset_and_length()
            length = min(length, self.max_size - offset)
            data = self.rng.randbytes(length)
            self.note(kind, f"{i} write {offset} {length}")
            if os.pwrite(self.fd, data, offset) != length:
                raise Failure(f"short write at {offset}")
            if offset > size:
                self.model_resize(offset)
            self.model[offset:offset + length] = data
        elif kind == "mapread":
            if size == 0:
                return
            offset = self.rng.randrange(0, size)
            length = self.rng.randint(1, size - offset)
            page = offset - offset % mmap.PAGESIZE
            self.note(kind, f"{i} mapread {offset} {length}")
            with mmap.mmap(self.fd, offset + length - page, prot=mmap.PROT_READ, offset=page) as view:
                got = bytes(view[offset - page:])
            self.expect(f"mapped read at {offset}", got, offset)
        elif kind == "mapwrite":
            offset, length = self.offset_and_length()
            length = min(length, self.max_size - offset)
            data = self.rng.randbytes(length)
            # A mapping cannot grow the file: extend it first, as fsx does.
            if offset + length > size:
                os.ftruncate(self.fd, offset + length)
                self.model_resize(offset + length)
            page = offset - offset % mmap.PAGESIZE
            self.note(kind, f"{i} mapwrite {offset} {length}")
            with mmap.mmap(self.fd, offset + length - page, offset=page) as view:
                view[offset - page:] = data
                view.flush()
            self.model[offset:offset + length] = data
        elif kind == "truncate":
            new = self.rng.randrange(0, self.max_size)
            self.note(kind, f"{i} truncate {size} -> {new}")
            os.ftruncate(self.fd, new)
            self.model_resize(new)
        elif kind == "fsync":
            self.note(kind, f"{i} fsync")
            os.fsync(self.fd)
        elif kind == "reopen":
            self.note(kind, f"{i} close and reopen")
            os.close(self.fd)
            self.fd = os.open(self.path, os.O_RDWR)
        else:
            self.fallocate_step(i, kind)

    def fallocate_step(self, i: int, kind: str):
        mode, size = self.modes[kind], len(self.model)
        shifting = kind in ("collapse-range", "insert-range")
        offset, length = self.offset_and_length(aligned=shifting)
        if not shifting:
            length = min(length, self.max_size - offset)
        if kind == "collapse-range" and (size == 0 or offset + length >= size):
            if size <= self.block:
                return
            # Collapse must end inside the file: pick a range that does.
            end_blocks = (size - 1) // self.block
            offset = self.rng.randrange(0, end_blocks) * self.block
            length = self.rng.randint(1, end_blocks - offset // self.block) * self.block
        if kind == "insert-range":
            if offset >= size or size + length > self.max_size:
                if size <= self.block or size + self.block > self.max_size:
                    return
                offset = self.rng.randrange(0, (size - 1) // self.block + 1) * self.block
                length = self.block * self.rng.randint(1, max(1, (self.max_size - size) // self.block))
                if offset >= size:
                    return
        self.note(kind, f"{i} {kind} {offset} {length} (size {size})")
        fallocate(self.fd, mode, offset, length)
        keep = bool(mode & KEEP_SIZE)
        if kind.startswith("fallocate"):
            if not keep and offset + length > size:
                self.model_resize(offset + length)
        elif kind.startswith("punch-hole") or kind.startswith("zero-range"):
            if kind.startswith("zero-range") and not keep and offset + length > size:
                self.model_resize(offset + length)
            self.model_zero(offset, length)
        elif kind == "collapse-range":
            del self.model[offset:offset + length]
        elif kind == "insert-range":
            self.model[offset:offset] = bytes(length)

    def close(self):
        os.close(self.fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("file")
    parser.add_argument("--ops", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=random.SystemRandom().randrange(1 << 31))
    parser.add_argument("--max-size", type=int, default=256 * 1024)
    parser.add_argument("--check-every", type=int, default=1000)
    args = parser.parse_args()
    print(f"fsx: seed {args.seed}, {args.ops} operations, file up to {args.max_size} bytes")
    ex = Exerciser(args.file, args.seed, args.max_size)
    print(f"fsx: block size {ex.block}")
    try:
        for i in range(args.ops):
            ex.step(i)
            if (i + 1) % args.check_every == 0:
                ex.check_all(f"check after operation {i}")
        ex.close()
        ex.fd = os.open(args.file, os.O_RDONLY)
        ex.check_all("final check")
    except (Failure, OSError) as e:
        print(f"fsx: FAILED (seed {args.seed}): {e}")
        print("fsx: recent operations:\n  " + "\n  ".join(ex.log[-20:]))
        print("0 passed, 1 failed")
        return 1
    finally:
        try:
            ex.close()
        except OSError:
            pass
    done = ", ".join(f"{k} {v}" for k, v in sorted(ex.counts.items()))
    print(f"fsx: {args.ops} operations, all reads matched the model ({done})")
    print("1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
