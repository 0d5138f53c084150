"""The fast paths on a real mount: reads decrypting in parallel beside a writer, readdirplus,
requests large enough to be sealed and opened on several cores, and the optional kernel
writeback cache."""

from __future__ import annotations

import os
import random
import threading

from conftest import run

BLOCK = 64 * 1024
BLOCKS = 64


def _pattern(value: int) -> bytes:
    return bytes([value]) * BLOCK


def test_concurrent_reads_beside_writes_never_see_a_torn_extent(volume):
    """Readers decrypt outside the file's lock while a writer commits in place: every 64 KiB
    block read must hold a single byte value (one whole write), never a mix and never EIO."""
    path = volume.mnt / "shared"
    with open(path, "wb") as f:
        for b in range(BLOCKS):
            f.write(_pattern(b))
    stop = threading.Event()
    failures: list[str] = []

    def reader(seed: int):
        rng = random.Random(seed)
        # Direct I/O on both sides, so every read and write is one request to the daemon (the
        # page cache gives no atomicity between a buffered read and a concurrent write).
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            while not stop.is_set():
                b = rng.randrange(BLOCKS)
                data = os.pread(fd, BLOCK, b * BLOCK)
                if len(data) != BLOCK or data.count(data[0]) != BLOCK:
                    failures.append(f"block {b} torn: values {sorted(set(data))[:4]}")
                    return
        except OSError as e:
            failures.append(f"read failed: {e}")
        finally:
            os.close(fd)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    rng = random.Random(7)
    expected = list(range(BLOCKS))
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        for i in range(300):
            b = rng.randrange(BLOCKS)
            value = rng.randrange(256)
            os.pwrite(fd, _pattern(value), b * BLOCK)
            expected[b] = value
            if i % 10 == 0:
                os.fsync(fd)
    finally:
        os.close(fd)
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures
    volume.unmount()
    volume.mount()
    data = (volume.mnt / "shared").read_bytes()
    assert data == b"".join(_pattern(v) for v in expected)


def test_large_unaligned_requests_round_trip(volume):
    """1 MiB requests are sealed and opened across cores; unaligned ones mix whole and partial
    extents at both ends."""
    rng = random.Random(11)
    model = bytearray(os.urandom(5 * 1024 * 1024 + 123))
    path = volume.mnt / "big"
    path.write_bytes(model)
    fd = os.open(path, os.O_RDWR)
    try:
        for _ in range(40):
            offset = rng.randrange(0, len(model) + 4096)
            data = os.urandom(rng.randrange(1, 1 << 20))
            os.pwrite(fd, data, offset)
            if offset > len(model):
                model.extend(bytes(offset - len(model)))
            model[offset:offset + len(data)] = data
            length = rng.randrange(1, 1 << 20)
            start = rng.randrange(0, len(model))
            assert os.pread(fd, length, start) == bytes(model[start:start + length])
        os.ftruncate(fd, len(model) - 20000)
        del model[len(model) - 20000:]
    finally:
        os.close(fd)
    volume.unmount()
    volume.mount()
    assert (volume.mnt / "big").read_bytes() == bytes(model)


def test_readdirplus_listing_matches_lookups(volume):
    """A directory listed with attributes (readdirplus) reports what a lookup of each name
    reports, and removing everything afterwards leaks no references (the unmount is clean)."""
    d = volume.mnt / "many"
    d.mkdir()
    for i in range(300):
        (d / f"file-{i:04d}").write_bytes(b"x" * i)
    os.symlink("file-0001", d / "link")
    volume.unmount()
    volume.mount()
    listed = {e.name: e.stat(follow_symlinks=False) for e in os.scandir(d)}
    assert len(listed) == 301
    for name, st in listed.items():
        again = os.lstat(d / name)
        assert (st.st_ino, st.st_size, st.st_mode) == (again.st_ino, again.st_size, again.st_mode)
        if name.startswith("file-"):
            assert st.st_size == int(name[5:])
    run("rm", "-rf", d)
    assert not d.exists()
    volume.unmount()


def test_readdirplus_in_the_locked_view(make_volume):
    """Without the key, a listing with attributes shows no-key names whose stat works."""
    vol = make_volume()
    for i in range(20):
        (vol.mnt / f"secret-{i}").write_bytes(b"data")
    vol.unmount()
    vol.mount(unlock=False)
    names = os.listdir(vol.mnt)
    assert len(names) == 20 and not any(n.startswith("secret-") for n in names)
    for n in names:
        assert os.lstat(vol.mnt / n).st_size > 0
    vol.unmount()


def test_writeback_cache_option(volume):
    """With -o writeback_cache the kernel buffers writes: appends, O_WRONLY partial-page writes
    (which need the daemon to serve reads on a write-only handle) and explicit mtimes hold."""
    volume.unmount()
    volume.mount(options="writeback_cache")
    path = volume.mnt / "wb"
    path.write_bytes(b"a" * 10000)
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, b"B" * 10, 4095)
    os.close(fd)
    with open(path, "ab") as f:
        f.write(b"tail")
    os.utime(path, (1_000_000, 1_000_000))
    expected = b"a" * 4095 + b"B" * 10 + b"a" * (10000 - 4105) + b"tail"
    assert path.read_bytes() == expected
    volume.unmount()
    volume.mount()
    assert path.read_bytes() == expected
    assert os.stat(path).st_mtime == 1_000_000
