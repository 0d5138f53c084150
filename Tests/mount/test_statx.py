"""statx(2) on the mount, against ext4: the birth time an object's header keeps (format v2 and
later) comes back as stx_btime with STX_BTIME in stx_mask, as ext4 reports its own, through the
daemon's answer to FUSE_STATX; every other field is what stat(2) (GETATTR) gives. Objects whose
header has no birth time (a v1 store's) report none. Also: the daemon's own request loop stops
cleanly on SIGTERM with idle threads blocked reading the device."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

from conftest import Volume, daemon_pids, force_unmount, read_all, wait_pids_gone

STATX_BASIC_STATS = 0x07FF
STATX_BTIME = 0x0800
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_STATX_FORCE_SYNC = 0x2000
GOLDEN_V1 = Path(__file__).resolve().parent.parent / "Golden" / "v1"


class StatxTimestamp(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_uint32), ("reserved", ctypes.c_int32)]


class Statx(ctypes.Structure):
    _fields_ = [
        ("mask", ctypes.c_uint32), ("blksize", ctypes.c_uint32), ("attributes", ctypes.c_uint64),
        ("nlink", ctypes.c_uint32), ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32),
        ("mode", ctypes.c_uint16), ("spare0", ctypes.c_uint16),
        ("ino", ctypes.c_uint64), ("size", ctypes.c_uint64), ("blocks", ctypes.c_uint64),
        ("attributes_mask", ctypes.c_uint64),
        ("atime", StatxTimestamp), ("btime", StatxTimestamp), ("ctime", StatxTimestamp), ("mtime", StatxTimestamp),
        ("rdev_major", ctypes.c_uint32), ("rdev_minor", ctypes.c_uint32),
        ("dev_major", ctypes.c_uint32), ("dev_minor", ctypes.c_uint32),
        ("spare", ctypes.c_uint64 * 14),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(Statx)]


def statx(path, mask: int = STATX_BASIC_STATS | STATX_BTIME, sync: bool = False) -> Statx:
    """statx of `path` itself (a symlink is not followed); `sync` makes the kernel ask the
    filesystem instead of answering from its cache."""
    result = Statx()
    flags = AT_SYMLINK_NOFOLLOW | (AT_STATX_FORCE_SYNC if sync else 0)
    if _libc.statx(AT_FDCWD, os.fsencode(path), flags, mask, ctypes.byref(result)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))
    return result


def birth(sx: Statx):
    """(seconds, nanoseconds) when the mask has STX_BTIME, else None."""
    return (sx.btime.tv_sec, sx.btime.tv_nsec) if sx.mask & STATX_BTIME else None


def basic_fields(sx: Statx) -> dict:
    def t(ts):
        return ts.tv_sec * 1_000_000_000 + ts.tv_nsec
    return {"ino": sx.ino, "mode": sx.mode, "nlink": sx.nlink, "uid": sx.uid, "gid": sx.gid, "size": sx.size,
            "blocks": sx.blocks, "blksize": sx.blksize, "atime": t(sx.atime), "mtime": t(sx.mtime),
            "ctime": t(sx.ctime), "rdev": os.makedev(sx.rdev_major, sx.rdev_minor)}


def stat_fields(st: os.stat_result) -> dict:
    return {"ino": st.st_ino, "mode": st.st_mode, "nlink": st.st_nlink, "uid": st.st_uid, "gid": st.st_gid,
            "size": st.st_size, "blocks": st.st_blocks, "blksize": st.st_blksize, "atime": st.st_atime_ns,
            "mtime": st.st_mtime_ns, "ctime": st.st_ctime_ns, "rdev": st.st_rdev}


def assert_matches_stat(path):
    """statx's basic fields, asked of the filesystem, equal lstat's (read on both sides of it, so
    nothing moved in between)."""
    before = stat_fields(os.lstat(path))
    sx = statx(path, sync=True)
    after = stat_fields(os.lstat(path))
    assert before == after, f"{path} changed while being read"
    assert sx.mask & STATX_BASIC_STATS == STATX_BASIC_STATS, f"{path}: mask {sx.mask:#x}"
    assert basic_fields(sx) == before, f"{path}: statx {basic_fields(sx)} stat {before}"


OBJECTS = ("file", "dir", "link", "fifo", "device")


def make_objects(root: Path) -> int:
    """One object of each type, in OBJECTS order; returns the wall clock just after."""
    (root / "file").write_bytes(b"first contents")
    (root / "dir").mkdir()
    os.symlink("file", root / "link")
    os.mkfifo(root / "fifo")
    os.mknod(root / "device", 0o600 | 0o020000, os.makedev(1, 3))
    return time.time_ns()


def change_everything(root: Path):
    """Renames, mode and owner changes, writes, truncation, explicit times, links and xattrs:
    none of it may move a birth time."""
    os.rename(root / "file", root / "moved")
    os.chmod(root / "moved", 0o600)
    with open(root / "moved", "ab") as f:
        f.write(b"more" * 5000)
    os.truncate(root / "moved", 3)
    os.utime(root / "moved", ns=(1_000_000_000, 2_000_000_000))
    os.link(root / "moved", root / "hardlink")
    os.setxattr(root / "moved", "user.k", b"v")
    os.chmod(root / "dir", 0o700)
    (root / "dir" / "child").write_bytes(b"x")
    os.rename(root / "dir", root / "dir2")
    os.chown(root / "link", 0, 0, follow_symlinks=False)
    os.chmod(root / "fifo", 0o640)
    os.chmod(root / "device", 0o640)


def renamed(name: str) -> str:
    return {"file": "moved", "dir": "dir2"}.get(name, name)


def births(root: Path, *, after_changes: bool = False, sync: bool = False) -> dict:
    return {name: birth(statx(root / (renamed(name) if after_changes else name), sync=sync)) for name in OBJECTS}


def test_statx_birth_time_as_on_ext4(volume, ext4_dir):
    """Every object type has a birth time on both, no later than the clock after its creation
    and in creation order; renames, chmod, chown, writes, truncation, utimes, links and xattrs
    leave it alone, asked of the filesystem or of the kernel's cache."""
    for side in (ext4_dir, volume.mnt):
        created_by = make_objects(side)
        born = births(side)
        assert all(b is not None for b in born.values()), f"{side}: no STX_BTIME for {born}"
        stamps = [born[name][0] * 1_000_000_000 + born[name][1] for name in OBJECTS]
        assert all(0 < s <= created_by for s in stamps), f"{side}: birth times {born} after {created_by}"
        assert stamps == sorted(stamps), f"{side}: birth times out of creation order: {born}"
        assert births(side, sync=True) == born
        change_everything(side)
        assert births(side, after_changes=True) == born, side
        assert births(side, after_changes=True, sync=True) == born, side
        assert birth(statx(side / "hardlink", sync=True)) == born["file"]
        assert birth(statx(side / "dir2" / "child")) is not None


def test_statx_fields_are_those_of_stat(volume, ext4_dir):
    """Asked with or without the birth time, statx gives the attributes stat gives, for every
    object type and after changes, on encfsd as on ext4."""
    for side in (ext4_dir, volume.mnt):
        make_objects(side)
        for name in OBJECTS:
            assert_matches_stat(side / name)
            assert statx(side / name, mask=STATX_BASIC_STATS, sync=True).mask & STATX_BASIC_STATS == STATX_BASIC_STATS
        change_everything(side)
        for name in OBJECTS:
            assert_matches_stat(side / renamed(name))
        assert_matches_stat(side)


def test_statx_birth_time_survives_remount(volume):
    """The birth time is the header's: the same to the nanosecond after a remount, and after
    changes made on the remounted store."""
    mnt = volume.mnt
    make_objects(mnt)
    root_birth = birth(statx(mnt))
    born = births(mnt)
    volume.remount()
    assert births(mnt) == born and birth(statx(mnt)) == root_birth
    change_everything(mnt)
    volume.remount()
    assert births(mnt, after_changes=True) == born
    assert (mnt / "moved").read_bytes() == b"fir"


def test_statx_no_birth_time_for_v1_objects(tmp_path, encfsd_bin):
    """A v1 header has no birth time: statx reports none (mask without STX_BTIME, zero time),
    for the golden store's objects and for one created on the mounted v1 store, whose header is
    written as v1 too; every other field is still stat's."""
    key = tmp_path / "golden.key"
    key.write_bytes(bytes(range(1, 65)))
    v = Volume(encfsd_bin, tmp_path, key, create=False)
    shutil.copytree(GOLDEN_V1 / "store", v.store, symlinks=True)
    manifest = json.loads((GOLDEN_V1 / "manifest.json").read_text())
    try:
        v.mount(by_key_file=True)
        (v.mnt / "new-on-v1").write_bytes(b"new")
        names = [Path(n) for n in manifest["files"]] + [Path("dir"), Path("dir/nested"), Path("new-on-v1")]
        names += [Path(n) for n in manifest["fifos"]]
        for name in names:
            for sync in (False, True):
                sx = statx(v.mnt / name, sync=sync)
                assert sx.mask & STATX_BTIME == 0, f"{name}: mask {sx.mask:#x}"
                assert (sx.btime.tv_sec, sx.btime.tv_nsec) == (0, 0), name
            assert_matches_stat(v.mnt / name)
        assert statx(v.mnt).mask & STATX_BTIME == 0
        v.remount(unlock=False)
        v.add_key()
        assert statx(v.mnt / "new-on-v1", sync=True).mask & STATX_BTIME == 0
        assert json.loads((v.store / "encfsd.conf").read_text())["version"] == 1
    finally:
        problems = v.force_cleanup()
    assert problems == []


def test_sigterm_stops_every_request_thread(volume):
    """With several request threads started (parallel reads) and then idle, blocked reading the
    device, SIGTERM ends the daemon: the loop wakes each of them, the daemon closes the store
    cleanly, and the store mounts again with its contents."""
    mnt = volume.mnt
    for i in range(8):
        (mnt / f"f{i}").write_bytes(bytes([i]) * 300_000)
    pids = daemon_pids(mnt)
    assert len(pids) == 1
    errors = []

    def reader(i):
        try:
            for _ in range(20):
                os.stat(mnt / f"f{i}")
                assert read_all(mnt / f"f{i}") == bytes([i]) * 300_000
        except Exception as e:  # reported below
            errors.append(e)

    workers = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    os.kill(pids[0], signal.SIGTERM)
    assert wait_pids_gone(pids, 30) == [], "the daemon did not exit on SIGTERM"
    assert "unmounted" in volume.daemon_log(), "the daemon did not close the store cleanly"
    # As before this loop: the mount of a signalled daemon stays until unmounted (ENOTCONN).
    assert force_unmount(mnt) == []
    volume.pids = []
    volume.mount()
    assert all((mnt / f"f{i}").read_bytes() == bytes([i]) * 300_000 for i in range(8))


def test_statx_from_many_threads(volume):
    """statx and ordinary requests at once from several threads: each statx answer is the
    right object's (its inode and birth time), which a reply sent for the wrong request would
    break."""
    mnt = volume.mnt
    expected = {}
    for i in range(12):
        p = mnt / f"o{i}"
        p.write_bytes(b"x" * i)
        expected[p] = (os.lstat(p).st_ino, birth(statx(p)))
    errors = []

    def hammer():
        try:
            for _ in range(50):
                for p, (ino, born) in expected.items():
                    sx = statx(p, sync=True)
                    assert (sx.ino, birth(sx), sx.size) == (ino, born, int(p.name[1:]))
                    os.listdir(mnt)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
