"""Tampering with the backing store (while unmounted) makes reads of exactly the affected
range fail with EIO; everything else stays readable.

Backing regular file layout: 4096-byte header, then extent i at 4096 + i*(E+32), each stored
as nonce(16) || ciphertext(len) || tag(16)."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from conftest import expect_errno, read_all, read_range

E = 4096
HEADER = 4096
STRIDE = E + 32


def extent_offset(i: int) -> int:
    return HEADER + i * STRIDE


def swap_bytes(path_a: Path, off_a: int, path_b: Path, off_b: int, length: int):
    with open(path_a, "r+b") as fa, open(path_b, "r+b") as fb:
        fa.seek(off_a)
        a = fa.read(length)
        fb.seek(off_b)
        b = fb.read(length)
        assert len(a) == len(b) == length
        fa.seek(off_a)
        fa.write(b)
        fa.flush()
        fb.seek(off_b)
        fb.write(a)


def tamper_bitflip(files):
    path = files["A"]["backing"]
    with open(path, "r+b") as f:
        at = extent_offset(1) + 16 + 100
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))
    return {("A", 1)}


def tamper_swap_within(files):
    path = files["A"]["backing"]
    with open(path, "r+b") as f:
        f.seek(extent_offset(0))
        e0 = f.read(STRIDE)
        e1 = f.read(STRIDE)
        assert e0 != e1
        f.seek(extent_offset(0))
        f.write(e1 + e0)
    return {("A", 0), ("A", 1)}


def tamper_swap_across(files):
    swap_bytes(files["A"]["backing"], extent_offset(1), files["B"]["backing"], extent_offset(1), STRIDE)
    return {("A", 1), ("B", 1)}


def tamper_truncate(files):
    path = files["A"]["backing"]
    size = os.path.getsize(path)
    assert size == HEADER + 4 * STRIDE, size
    os.truncate(path, size - STRIDE)
    return {("A", 3)}


def tamper_zero(files):
    path = files["A"]["backing"]
    with open(path, "r+b") as f:
        f.seek(extent_offset(1))
        f.write(bytes(STRIDE))
    return {("A", 1)}


def tamper_name_swap(files):
    a, b = files["A"]["backing"], files["B"]["backing"]
    tmp = a.with_name("tmp-swap")
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)
    return {"A", "B"}  # whole files: lookup fails


TAMPERS = {
    "bitflip": tamper_bitflip,
    "swap_extents_within_file": tamper_swap_within,
    "swap_extents_across_files": tamper_swap_across,
    "truncate_one_extent": tamper_truncate,
    "zero_extent": tamper_zero,
    "swap_backing_names": tamper_name_swap,
}


@pytest.fixture
def tamper_setup(make_volume):
    """Three files in the root plus one in a subdirectory; returns (volume, files) where
    files[name] = {"path", "backing", "data"}."""
    v = make_volume(extent_size=E)
    rng = random.Random(77)
    files = {}
    sizes = {"A": 4 * E, "B": 4 * E, "C": 2 * E + 100}
    for name, size in sizes.items():
        before = v.backing_entries()
        data = rng.randbytes(size)
        path = v.mnt / f"file-{name}"
        with open(path, "wb") as f:
            f.write(data)
        new = v.backing_entries() - before
        assert len(new) == 1, f"expected one new backing entry for {path}, got {new}"
        files[name] = {"path": path, "data": data, "backing": v.store / new.pop()}
    (v.mnt / "subdir").mkdir()
    files["D"] = {"path": v.mnt / "subdir" / "file-D", "data": rng.randbytes(3 * E), "backing": None}
    with open(files["D"]["path"], "wb") as f:
        f.write(files["D"]["data"])
    v.unmount()
    for name in "ABC":
        size = os.path.getsize(files[name]["backing"])
        n = len(files[name]["data"])
        expected = HEADER + sum(min(E, n - i * E) + 32 for i in range((n + E - 1) // E))
        assert size == expected, f"backing size of {name} is {size}, expected {expected}"
    return v, files


@pytest.mark.parametrize("kind", list(TAMPERS))
def test_tamper_detected(tamper_setup, kind):
    v, files = tamper_setup
    affected = TAMPERS[kind](files)
    v.mount()

    problems = []

    def check_good(name, offset, count):
        expected = files[name]["data"][offset:offset + count]
        try:
            got = read_range(files[name]["path"], offset, count)
        except OSError as e:
            problems.append(f"{name}[{offset}:{offset + count}] should be intact but read failed: {e}")
            return
        if got != expected:
            problems.append(f"{name}[{offset}:{offset + count}] should be intact but read different bytes "
                            f"({len(got)} bytes, zeros={got == bytes(len(got))})")

    def check_eio(what, fn, *args):
        try:
            result = fn(*args)
        except OSError as e:
            if e.errno != errno.EIO:
                problems.append(f"{what}: expected EIO, got {errno.errorcode.get(e.errno, e.errno)} ({e})")
            return
        problems.append(f"{what}: expected EIO but it succeeded"
                        + (f" ({len(result)} bytes, zeros={result == bytes(len(result))})"
                           if isinstance(result, bytes) else f" ({result!r:.80})"))

    def extents(name):
        n = len(files[name]["data"])
        return [(i, i * E, min(E, n - i * E)) for i in range((n + E - 1) // E)]

    whole_files = {a for a in affected if isinstance(a, str)}
    bad_extents = {a for a in affected if isinstance(a, tuple)}

    # Good ranges first, then the bad ones, then good ones again: failures must not be sticky.
    for rounds in range(2):
        for name in "ABCD":
            if name in whole_files:
                continue
            for i, off, length in extents(name):
                if (name, i) not in bad_extents:
                    check_good(name, off, length)
            if rounds == 0:
                for i, off, length in extents(name):
                    if (name, i) in bad_extents:
                        check_eio(f"read of {name} extent {i}", read_range, files[name]["path"], off, length)
                if any(n == name for n, _ in bad_extents):
                    check_eio(f"read of all of {name}", read_all, files[name]["path"])

    for name in sorted(whole_files):
        path = files[name]["path"]
        check_eio(f"stat of {name}", os.stat, path)
        check_eio(f"open of {name}", read_all, path)
    if whole_files:
        try:
            listing = sorted(os.listdir(v.mnt))
        except OSError as e:
            problems.append(f"listing the root failed: {e}")
        else:
            if listing != ["file-A", "file-B", "file-C", "subdir"]:
                problems.append(f"root lists as {listing}")

    # The file system stays usable: new files can be written and read back.
    with open(v.mnt / "after-tamper", "wb") as f:
        f.write(b"still writable")
    if read_all(v.mnt / "after-tamper") != b"still writable":
        problems.append("new file after tamper reads back differently")

    assert not problems, f"tamper {kind}:\n  " + "\n  ".join(problems)


def test_untampered_store_reads_fine(tamper_setup):
    """Control: the setup itself (unmount, remount) leaves every file intact."""
    v, files = tamper_setup
    v.mount()
    for name, f in files.items():
        assert read_all(f["path"]) == f["data"], name
