"""The size limit: the documented maximum is exactly what works. A write, truncate or fallocate
that would pass it fails at the call with EFBIG; one that reaches it is acknowledged and kept
(through close and remount). The maximum is 2^50 bytes, or less where the backing filesystem
cannot hold the backing file (docs/FORMAT.md 5.1): on ext4, backing files stop at 16 TiB − 4 KiB."""

from __future__ import annotations

import errno
import os

import pytest

from conftest import expect_errno


def largest_backing_file(directory) -> int:
    """The largest length the backing filesystem accepts for a file (found with a sparse unnamed
    file), capped at what a 2^50-byte file at the smallest extent size needs."""
    cap = backing_length(1 << 50, 4096)
    fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        def fits(n):
            try:
                os.ftruncate(fd, n)
                return True
            except OSError as e:
                assert e.errno in (errno.EFBIG, errno.EINVAL), e
                return False
        if fits(cap):
            return cap
        low, high = 0, cap - 1
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(middle) else (low, middle - 1)
        return low
    finally:
        os.close(fd)


def backing_length(size: int, extent: int) -> int:
    """FORMAT.md 5.1: header slots, whole strides, and the last extent at its exact length."""
    count = -(-size // extent)
    if count == 0:
        return 4096
    return 4096 + (count - 1) * (extent + 32) + (size - (count - 1) * extent) + 32


def maximum_size(volume) -> int:
    limit = largest_backing_file(volume.store)
    low, high = 0, 1 << 50
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if backing_length(middle, volume.extent_size) <= limit else (low, middle - 1)
    return low


@pytest.fixture(params=[4096, 16384, 1 << 20], ids=lambda e: f"extent{e}")
def big(request, make_volume):
    volume = make_volume(extent_size=request.param)
    return volume, maximum_size(volume)


def test_write_of_the_last_byte_is_kept_and_one_past_fails_at_the_call(big):
    volume, maximum = big
    path = volume.mnt / "edge"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        assert os.pwrite(fd, b"z", maximum - 1) == 1
        expect_errno(errno.EFBIG, os.pwrite, fd, b"!", maximum)
        expect_errno(errno.EFBIG, os.pwrite, fd, b"!!", maximum - 1)  # crosses the limit
        os.fsync(fd)
    finally:
        os.close(fd)  # the acknowledged write is never lost at close
    volume.remount()
    assert os.stat(path).st_size == maximum
    with open(path, "rb") as f:
        f.seek(maximum - 2)
        assert f.read() == b"\0z"


def test_truncate_to_exactly_the_maximum_works_and_past_it_fails(big):
    volume, maximum = big
    path = volume.mnt / "long"
    path.write_bytes(b"head")
    os.truncate(path, maximum)
    expect_errno(errno.EFBIG, os.truncate, path, maximum + 1)
    expect_errno(errno.EFBIG, os.truncate, path, 1 << 51)
    assert os.stat(path).st_size == maximum
    volume.remount()
    assert os.stat(path).st_size == maximum
    with open(path, "rb") as f:
        assert f.read(4) == b"head"


def test_fallocate_up_to_the_maximum_works_and_past_it_fails(big):
    volume, maximum = big
    path = volume.mnt / "reserved"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        expect_errno(errno.EFBIG, os.posix_fallocate, fd, maximum - 10, 11)
        assert os.fstat(fd).st_size == 0  # the refused call changed nothing
        os.posix_fallocate(fd, maximum - 10, 10)
        assert os.fstat(fd).st_size == maximum
    finally:
        os.close(fd)
    volume.remount()
    assert os.stat(path).st_size == maximum
