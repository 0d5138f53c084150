"""Differential test: a seeded random sequence of file system operations is applied to the
mount and to a plain directory (on tmpfs); every result (data or errno) and, periodically, the whole tree
must match: names, types, modes, owners, sizes, contents, nlink, hard-link groups, symlink
targets, user xattrs, and mtimes where an operation set them explicitly (utimens with a time in
2001, which no real clock of a test run gives; a time the clock set is compared only as "now").
Set ENCFSD_DIFF_SEED / ENCFSD_DIFF_OPS to reproduce or lengthen a run, ENCFSD_DIFF_COMPARE_EVERY=1 to
compare the trees after every operation."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from conftest import read_all, run

OPS = int(os.environ.get("ENCFSD_DIFF_OPS", "3000"))
PARENTS = ["", "da", "db", "da/n0"]
NAMES = [f"n{i}" for i in range(6)]
TOP_DIRS = ["da", "db"]
FULL_COMPARE_EVERY = int(os.environ.get("ENCFSD_DIFF_COMPARE_EVERY", "100"))  # 1: find the first op that differs
MAX_HELD = 3

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
AT_FDCWD = -100

# errno values POSIX lets differ for the same condition.
EQUIVALENT = {errno.EEXIST: errno.ENOTEMPTY}

# utimens sets times from 2001 on (seconds 978307200 + up to a year, any nanoseconds); a time
# before this limit can only have come from such an explicit set, and is compared exactly.
EXPLICIT_TIME_LIMIT_NS = 1_010_000_000 * 10**9
OWNERS = [0, 1000, 65534]
XATTR_NAMES = ["user.a", "user.b", "user.long_" + "x" * 100]
# Symlink targets stay inside the tree (no "..", nothing absolute): some resolve, some dangle.
SYMLINK_TARGETS = ["n0", "n1", "n2", "da", "da/n1", "missing", "db/n0/deeper", "t" * 255, "/".join(["s" * 200] * 20)]


def renameat2(src: str, dst: str, flags: int):
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), src, None, dst)


class Mismatch(AssertionError):
    pass


class Side:
    """One of the two trees, with its held-open descriptors."""

    def __init__(self, root: Path, label: str):
        self.root = root
        self.label = label
        self.held: dict[int, int] = {}  # slot -> fd

    def p(self, rel: str) -> str:
        return str(self.root / rel) if rel else str(self.root)

    def close_all(self):
        for fd in self.held.values():
            os.close(fd)
        self.held.clear()


def outcome(fn):
    try:
        return ("ok", fn())
    except OSError as e:
        return ("err", EQUIVALENT.get(e.errno, e.errno))


def fmt(o):
    if o[0] == "err":
        return f"error {errno.errorcode.get(o[1], o[1])}"
    v = o[1]
    if isinstance(v, bytes):
        return f"{len(v)} bytes sha256={hashlib.sha256(v).hexdigest()[:12]} zeros={v == bytes(len(v))}"
    return f"ok {v!r:.200}"


def explicit_time(ns: int):
    """An mtime as compared: exact when utimens set it, else only "now" (each side's clock)."""
    return ns if ns < EXPLICIT_TIME_LIMIT_NS else "now"


def stat_summary(st):
    return (stat.filemode(st.st_mode), st.st_size if not stat.S_ISDIR(st.st_mode) else None, st.st_nlink,
            st.st_uid, st.st_gid, explicit_time(st.st_mtime_ns))


def xattrs(path: Path) -> dict:
    """User xattrs of a file or directory (symlinks have none: the kernel refuses user.* on them)."""
    return {n: hashlib.sha256(os.getxattr(path, n, follow_symlinks=False)).hexdigest()[:16]
            for n in sorted(os.listxattr(path, follow_symlinks=False)) if n.startswith("user.")}


def tree(side: Side) -> dict:
    """Names, types, modes, owners, sizes, contents, nlink, symlink targets, user xattrs,
    explicitly set mtimes, and the hard-link partition of a tree."""
    entries = {}
    by_ino: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(side.root):
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            rel = str(full.relative_to(side.root))
            st = os.lstat(full)
            info = {"mode": stat.filemode(st.st_mode), "nlink": st.st_nlink, "uid": st.st_uid, "gid": st.st_gid,
                    "mtime": explicit_time(st.st_mtime_ns)}
            if stat.S_ISLNK(st.st_mode):
                info["target"] = os.readlink(full)
                info["size"] = st.st_size
            else:
                info["xattrs"] = xattrs(full)
            if stat.S_ISREG(st.st_mode):
                info["size"] = st.st_size
                with open(full, "rb") as f:
                    data = f.read()
                info["sha256"] = hashlib.sha256(data).hexdigest()[:16]
                if len(data) != st.st_size:
                    info["read_length"] = len(data)
                by_ino.setdefault(st.st_ino, []).append(rel)
            entries[rel] = info
    groups = sorted(sorted(g) for g in by_ino.values() if len(g) > 1)
    return {"entries": entries, "links": groups}


def compare_trees(ref: Side, mnt: Side, where: str):
    a, b = tree(ref), tree(mnt)
    problems = []
    for rel in sorted(set(a["entries"]) | set(b["entries"])):
        ea, eb = a["entries"].get(rel), b["entries"].get(rel)
        if ea != eb:
            problems.append(f"{rel}: reference {ea} mount {eb}")
    if a["links"] != b["links"]:
        problems.append(f"hard-link groups: reference {a['links']} mount {b['links']}")
    if problems:
        raise Mismatch(f"{where}: trees differ:\n  " + "\n  ".join(problems[:30]))


class Runner:
    def __init__(self, seed: int, ref: Side, mnt: Side):
        self.seed = seed
        self.rng = random.Random(seed)
        self.ref = ref
        self.mnt = mnt
        self.log: list[str] = []

    # choosing targets

    def any_path(self, top_dirs: bool = False) -> str:
        if top_dirs and self.rng.random() < 0.15:
            return self.rng.choice(TOP_DIRS)
        return "/".join(x for x in (self.rng.choice(PARENTS), self.rng.choice(NAMES)) if x)

    def ref_size(self, rel: str) -> int:
        try:
            return os.stat(self.ref.p(rel)).st_size
        except OSError:
            return 0

    def random_size(self) -> int:
        r = self.rng.random()
        if r < 0.3:
            return self.rng.randint(1, 100)
        if r < 0.6:
            return self.rng.randint(1, 8192)
        if r < 0.75:
            return self.rng.choice([4095, 4096, 4097, 16383, 16384, 16385, 32768])
        return self.rng.randint(1, 100 * 1024)

    def random_offset(self, rel: str) -> int:
        size = self.ref_size(rel)
        r = self.rng.random()
        if r < 0.3:
            return self.rng.randint(0, size)
        if r < 0.45:
            return size  # append
        if r < 0.6:
            return self.rng.choice([0, 4096, 16384, 16384 * 2 - 1, 16384 * 3])
        return self.rng.randint(0, size + 200 * 1024)  # often past EOF: a gap

    # one operation

    def step(self, index: int):
        rng = self.rng
        kind = rng.choices(
            ["write", "write_trunc", "append", "truncate", "rename", "link", "unlink", "mkdir", "rmdir",
             "chmod", "fsync", "read", "stat", "hold", "held_write", "held_read", "held_truncate",
             "held_fstat", "release", "rmtree", "symlink", "readlink", "chown", "utimens", "setxattr",
             "getxattr", "listxattr", "removexattr"],
            weights=[18, 2, 3, 6, 8, 6, 5, 2, 3, 3, 2, 10, 5, 2, 4, 3, 1, 2, 2, 1, 3, 2, 3, 3, 3, 2, 1, 1])[0]
        ops = None
        if kind in ("write", "write_trunc", "append"):
            rel = self.any_path()
            size = self.random_size()
            offset = self.random_offset(rel)
            data = rng.randbytes(size)
            create = rng.random() < 0.8
            flags = os.O_WRONLY | (os.O_CREAT if create else 0)
            if kind == "write_trunc":
                flags |= os.O_TRUNC
            if kind == "append":
                flags |= os.O_APPEND
            desc = f"{kind} {rel} off={offset} len={size} create={create}"

            def ops(s, rel=rel, flags=flags, data=data, offset=offset, kind=kind):
                fd = os.open(s.p(rel), flags, 0o644)
                try:
                    if kind == "append":
                        return os.write(fd, data)
                    return os.pwrite(fd, data, offset)
                finally:
                    os.close(fd)
        elif kind == "truncate":
            rel = self.any_path()
            size = self.ref_size(rel)
            new = rng.choice([0, rng.randint(0, size + 1), rng.randint(0, size + 300 * 1024),
                              rng.choice([4096, 16384, 16385, 65536]), max(0, size - 1), size + 1])
            desc = f"truncate {rel} to {new} (was {size})"

            def ops(s, rel=rel, new=new):
                return os.truncate(s.p(rel), new)
        elif kind == "rename":
            src, dst = self.any_path(True), self.any_path(True)
            flags = rng.choices([0, RENAME_NOREPLACE, RENAME_EXCHANGE], weights=[6, 2, 2])[0]
            desc = f"rename {src} -> {dst} flags={flags}"

            def ops(s, src=src, dst=dst, flags=flags):
                if flags == 0:
                    return os.rename(s.p(src), s.p(dst))
                return renameat2(s.p(src), s.p(dst), flags)
        elif kind == "link":
            src, dst = self.any_path(), self.any_path()
            desc = f"link {src} -> {dst}"

            def ops(s, src=src, dst=dst):
                return os.link(s.p(src), s.p(dst))
        elif kind == "unlink":
            rel = self.any_path()
            desc = f"unlink {rel}"

            def ops(s, rel=rel):
                return os.unlink(s.p(rel))
        elif kind == "mkdir":
            rel = self.any_path(True)
            mode = rng.choice([0o755, 0o700, 0o777, 0o151])
            desc = f"mkdir {rel} {mode:o}"

            def ops(s, rel=rel, mode=mode):
                return os.mkdir(s.p(rel), mode)
        elif kind == "rmdir":
            rel = self.any_path(True)
            desc = f"rmdir {rel}"

            def ops(s, rel=rel):
                return os.rmdir(s.p(rel))
        elif kind == "rmtree":
            rel = self.any_path(True)
            desc = f"rmtree {rel}"

            def ops(s, rel=rel):
                # In name order, symlinks unlinked: the same steps on both sides whatever order
                # each lists a directory in, so a failure part-way leaves the same tree.
                def remove(p):
                    if not stat.S_ISDIR(os.lstat(p).st_mode):
                        raise OSError(errno.ENOTDIR, "not a directory")
                    for name in sorted(os.listdir(p)):
                        child = os.path.join(p, name)
                        if stat.S_ISDIR(os.lstat(child).st_mode):
                            remove(child)
                        else:
                            os.unlink(child)
                    os.rmdir(p)
                remove(s.p(rel))
        elif kind == "chmod":
            rel = self.any_path(True)
            mode = rng.choice([0o644, 0o600, 0o000, 0o777, 0o755, 0o4755, 0o2750, 0o1777, rng.randint(0, 0o7777)])
            desc = f"chmod {rel} {mode:o}"

            def ops(s, rel=rel, mode=mode):
                return os.chmod(s.p(rel), mode)
        elif kind == "symlink":
            rel = self.any_path(True)
            target = rng.choice(SYMLINK_TARGETS)
            desc = f"symlink {rel} -> {target[:40]} ({len(target)} bytes)"

            def ops(s, rel=rel, target=target):
                return os.symlink(target, s.p(rel))
        elif kind == "readlink":
            rel = self.any_path(True)
            desc = f"readlink {rel}"

            def ops(s, rel=rel):
                return os.readlink(s.p(rel))
        elif kind == "chown":
            rel = self.any_path(True)
            uid, gid = rng.choice(OWNERS), rng.choice(OWNERS + [-1])
            follow = rng.random() < 0.7
            desc = f"{'chown' if follow else 'lchown'} {rel} {uid}:{gid}"

            def ops(s, rel=rel, uid=uid, gid=gid, follow=follow):
                return os.chown(s.p(rel), uid, gid, follow_symlinks=follow)
        elif kind == "utimens":
            rel = self.any_path(True)
            times = tuple(978307200 * 10**9 + rng.randint(0, 365 * 86400 * 10**9) for _ in range(2))
            desc = f"utimens {rel} {times}"

            def ops(s, rel=rel, times=times):
                return os.utime(s.p(rel), ns=times)
        elif kind in ("setxattr", "getxattr", "removexattr"):
            rel = self.any_path(True)
            name = rng.choice(XATTR_NAMES)
            value = rng.randbytes(rng.choice([0, 1, 100, rng.randint(0, 3000)]))
            flags = rng.choice([0, 0, os.XATTR_CREATE, os.XATTR_REPLACE])
            desc = f"{kind} {rel} {name[:12]} len={len(value)} flags={flags}"

            def ops(s, rel=rel, name=name, value=value, flags=flags, kind=kind):
                if kind == "setxattr":
                    return os.setxattr(s.p(rel), name, value, flags)
                if kind == "getxattr":
                    return os.getxattr(s.p(rel), name)
                return os.removexattr(s.p(rel), name)
        elif kind == "listxattr":
            rel = self.any_path(True)
            desc = f"listxattr {rel}"

            def ops(s, rel=rel):
                return sorted(n for n in os.listxattr(s.p(rel)) if n.startswith("user."))
        elif kind == "fsync":
            rel = self.any_path()
            desc = f"fsync {rel}"

            def ops(s, rel=rel):
                fd = os.open(s.p(rel), os.O_RDONLY)
                try:
                    return os.fsync(fd)
                finally:
                    os.close(fd)
        elif kind == "read":
            rel = self.any_path()
            size = self.ref_size(rel)
            if rng.random() < 0.4:
                offset, count = 0, size + 10
            else:
                offset, count = rng.randint(0, size + 10), self.random_size()
            desc = f"read {rel} off={offset} len={count}"

            def ops(s, rel=rel, offset=offset, count=count):
                fd = os.open(s.p(rel), os.O_RDONLY)
                try:
                    return os.pread(fd, count, offset)
                finally:
                    os.close(fd)
        elif kind == "stat":
            rel = self.any_path(True)
            desc = f"stat {rel}"

            def ops(s, rel=rel):
                return stat_summary(os.lstat(s.p(rel)))
        elif kind == "hold":
            slot = rng.randrange(MAX_HELD)
            rel = self.any_path()
            create = rng.random() < 0.5
            desc = f"hold slot{slot} = open {rel} O_RDWR create={create}"

            def ops(s, slot=slot, rel=rel, create=create):
                if slot in s.held:
                    os.close(s.held.pop(slot))
                s.held[slot] = os.open(s.p(rel), os.O_RDWR | (os.O_CREAT if create else 0), 0o640)
                return None
        elif kind in ("held_write", "held_read", "held_truncate", "held_fstat"):
            held = sorted(self.ref.held)
            slot = rng.choice(held) if held and rng.random() < 0.9 else rng.randrange(MAX_HELD)
            offset = rng.choice([0, rng.randint(0, 150 * 1024)])
            size = self.random_size()
            data = rng.randbytes(size) if kind == "held_write" else b""
            desc = f"{kind} slot{slot} off={offset} len={size}"

            def ops(s, slot=slot, offset=offset, size=size, data=data, kind=kind):
                fd = s.held.get(slot)
                if fd is None:
                    raise OSError(errno.EBADF, "slot empty")
                if kind == "held_write":
                    return os.pwrite(fd, data, offset)
                if kind == "held_read":
                    return os.pread(fd, size, offset)
                if kind == "held_truncate":
                    return os.ftruncate(fd, offset)
                return stat_summary(os.fstat(fd))
        elif kind == "release":
            slot = rng.randrange(MAX_HELD)
            desc = f"release slot{slot}"

            def ops(s, slot=slot):
                if slot in s.held:
                    os.close(s.held.pop(slot))
                return None

        self.log.append(f"{index}: {desc}")
        a = outcome(lambda: ops(self.ref))
        b = outcome(lambda: ops(self.mnt))
        if a != b:
            raise Mismatch(f"seed {self.seed} op {index}: {desc}\n  reference: {fmt(a)}\n  mount:     {fmt(b)}")

    def restore_top_dirs(self, index: int):
        """Puts back da and db when they are gone (or files), as ordinary compared ops, so the
        namespace does not collapse into ENOTDIR for the rest of the run."""
        for d in TOP_DIRS + ["da/n0"]:
            try:
                is_dir = stat.S_ISDIR(os.lstat(self.ref.p(d)).st_mode)
            except FileNotFoundError:
                is_dir = None
            except NotADirectoryError:
                continue
            if is_dir:
                continue
            steps = [] if is_dir is None else [(f"unlink {d}", lambda s, d=d: os.unlink(s.p(d)))]
            steps.append((f"mkdir {d}", lambda s, d=d: os.mkdir(s.p(d))))
            for desc, fn in steps:
                self.log.append(f"{index}: (restore) {desc}")
                a, b = outcome(lambda: fn(self.ref)), outcome(lambda: fn(self.mnt))
                if a != b:
                    raise Mismatch(f"seed {self.seed} op {index}: {desc}\n  reference: {fmt(a)}\n  mount:     {fmt(b)}")

    def setup(self):
        for side in (self.ref, self.mnt):
            for d in TOP_DIRS:
                os.mkdir(side.p(d))

    def close_all(self):
        self.ref.close_all()
        self.mnt.close_all()

    def explained(self, e: Mismatch) -> Mismatch:
        """`e` with the operations that led to it, for reproducing."""
        recent = "\n    ".join(self.log[-15:])
        return Mismatch(f"{e}\n  recent ops (ENCFSD_DIFF_SEED={self.seed}):\n    {recent}")


def run_sequence(volume, tmp_path, seed: int, remount_at=()):
    # On tmpfs, whose xattr space per file is not one 4 KiB block as ext4's: encfsd's is its own
    # documented one (64 KiB per value, a side object beyond the backing's), not the backing's.
    ref_root = Path(tempfile.mkdtemp(prefix="encfsd-diff-ref-", dir="/dev/shm"))
    try:
        run_sequence_in(volume, ref_root, seed, remount_at)
    finally:
        shutil.rmtree(ref_root, ignore_errors=True)


def run_sequence_in(volume, ref_root: Path, seed: int, remount_at=()):
    work = volume.mnt / "w"
    os.mkdir(work)
    os.mkdir(ref_root / "w")
    runner = Runner(seed, Side(ref_root / "w", "reference"), Side(work, "mount"))
    old_umask = os.umask(0o022)
    try:
        runner.setup()
        for i in range(OPS):
            try:
                runner.step(i)
            except Mismatch as e:
                raise runner.explained(e) from None
            if (i + 1) % 25 == 0:
                runner.restore_top_dirs(i)
            if (i + 1) % FULL_COMPARE_EVERY == 0:
                try:
                    compare_trees(runner.ref, runner.mnt, f"seed {seed} after op {i}")
                except Mismatch as e:
                    raise runner.explained(e) from None
            if i in remount_at:
                runner.close_all()
                compare_trees(runner.ref, runner.mnt, f"seed {seed} before remount after op {i}")
                volume.remount()
                compare_trees(runner.ref, runner.mnt, f"seed {seed} right after remount after op {i}")
        runner.close_all()
        compare_trees(runner.ref, runner.mnt, f"seed {seed} at the end")
        volume.remount()
        compare_trees(runner.ref, runner.mnt, f"seed {seed} after the final remount")
    finally:
        runner.close_all()
        os.umask(old_umask)


SEED = os.environ.get("ENCFSD_DIFF_SEED")


@pytest.mark.parametrize("seed", [int(SEED)] if SEED else [1, 3, 4])
def test_differential(make_volume, tmp_path, seed):
    run_sequence(make_volume(), tmp_path, seed)


@pytest.mark.parametrize("seed", [int(SEED)] if SEED else [2, 5])
def test_differential_small_extents_with_remounts(make_volume, tmp_path, seed):
    run_sequence(make_volume(extent_size=4096), tmp_path, seed, remount_at={OPS // 3, OPS // 2, 2 * OPS // 3})


# --- file data: fallocate modes, SEEK_DATA/SEEK_HOLE, mixed direct/buffered/mmap I/O ------------
#
# The reference for these is ext4 (tmpfs refuses collapse and insert), on a loop device of the
# test's own. The mount uses 4096-byte extents, so an encfsd extent and an ext4 block are the same
# range and holes fall in the same places on both sides.

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
FALLOCATE_MODES = {
    "allocate": 0,
    "allocate-keep-size": FALLOC_FL_KEEP_SIZE,
    "punch": FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
    "zero": FALLOC_FL_ZERO_RANGE,
    "zero-keep-size": FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
    "collapse": FALLOC_FL_COLLAPSE_RANGE,
    "insert": FALLOC_FL_INSERT_RANGE,
}
# The FUSE kernel module answers these itself with EOPNOTSUPP, before any daemon sees them
# (fs/fuse/file.c, fuse_file_fallocate: only KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE are forwarded).
# The mount may refuse them that way; when it does, the reference is left as it was, and when a
# kernel forwards them the results must match ext4's like every other mode.
KERNEL_REFUSED = {"collapse", "insert"}
SEEK_DATA, SEEK_HOLE = 3, 4
BLOCK = 4096
DATA_FILES = ["f0", "f1", "f2"]
DATA_OPS = int(os.environ.get("ENCFSD_DIFF_DATA_OPS", "1500"))

_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(fd: int, mode: int, offset: int, length: int):
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def seek_map(fd: int, size: int) -> list:
    """Every (data start, hole start) pair of a file, walked with SEEK_DATA and SEEK_HOLE."""
    pairs, at = [], 0
    while at < size:
        try:
            data = os.lseek(fd, at, SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            break
        hole = os.lseek(fd, data, SEEK_HOLE)
        pairs.append((data, hole))
        at = hole
    return pairs


def seek_or_none(fd: int, offset: int, whence: int):
    try:
        return os.lseek(fd, offset, whence)
    except OSError as e:
        if e.errno != errno.ENXIO:
            raise
        return None


class DataRunner:
    """Random writes, reads, truncates, every fallocate mode and seeks on a few files held open
    on both sides; each result (data, errno) must match, and so must the data/hole map.

    The map matches exactly while a file has only been written, truncated and punched. ext4 turns
    fallocated and zeroed ranges into unwritten extents and later writes some of them out as
    zeros (its own heuristics), so after an allocate or a zero range its holes are only a subset
    of encfsd's: every range ext4 reports as a hole must be a hole on the mount too (and every
    hole reads as zeros, which the content comparison checks)."""

    def __init__(self, seed: int, ref_root: Path, mnt_root: Path):
        self.rng = random.Random(seed)
        self.seed = seed
        self.roots = {"reference": ref_root, "mount": mnt_root}
        self.fds: dict[str, dict[str, int]] = {}
        self.log: list[str] = []
        self.refused: dict[str, int] = {}
        self.applied: dict[str, int] = {}
        self.exact = {name: True for name in DATA_FILES}

    def open_all(self):
        for label, root in self.roots.items():
            self.fds[label] = {n: os.open(root / n, os.O_RDWR | os.O_CREAT, 0o644) for n in DATA_FILES}

    def close_all(self):
        for fds in self.fds.values():
            for fd in fds.values():
                os.close(fd)
        self.fds.clear()

    def size(self, name: str) -> int:
        return os.fstat(self.fds["reference"][name]).st_size

    def position(self, name: str, limit: int = 1 << 20) -> int:
        r = self.rng.random()
        size = self.size(name)
        if r < 0.5:
            return self.rng.randrange(0, max(1, size + 1)) // BLOCK * BLOCK  # block-aligned
        if r < 0.6:
            return size
        return self.rng.randrange(0, max(1, min(limit, size + 64 * BLOCK)))

    def length(self) -> int:
        if self.rng.random() < 0.5:
            return self.rng.randint(1, 16) * BLOCK
        return self.rng.randint(1, 12 * BLOCK)

    def both(self, desc: str, fn):
        self.log.append(desc)
        a = outcome(lambda: fn(self.fds["reference"]))
        b = outcome(lambda: fn(self.fds["mount"]))
        if a != b:
            raise Mismatch(f"seed {self.seed}: {desc}\n  reference: {fmt(a)}\n  mount:     {fmt(b)}")

    def compare_file(self, name: str, where: str):
        fa, fb = self.fds["reference"][name], self.fds["mount"][name]
        sa, sb = os.fstat(fa).st_size, os.fstat(fb).st_size
        if sa != sb:
            raise Mismatch(f"{where}: {name} size reference {sa} mount {sb}")
        da, db = os.pread(fa, sa + 1, 0), os.pread(fb, sb + 1, 0)
        if da != db:
            first = next(i for i in range(min(len(da), len(db))) if da[i] != db[i]) if len(da) == len(db) else None
            raise Mismatch(f"{where}: {name} contents differ (first at {first})")
        ma, mb = seek_map(fa, sa), seek_map(fb, sb)
        if self.exact[name] and ma != mb:
            raise Mismatch(f"{where}: {name} data/hole map reference {ma} mount {mb}")
        # Holes as block sets: the reference's must all be holes on the mount.
        def holes(pairs):
            data = set()
            for start, end in pairs:
                data.update(range(start // BLOCK, (end + BLOCK - 1) // BLOCK))
            return set(range((sa + BLOCK - 1) // BLOCK)) - data
        if not holes(ma) <= holes(mb):
            raise Mismatch(f"{where}: {name} reference holes {sorted(holes(ma) - holes(mb))[:20]} are data on the mount"
                           f" (reference map {ma}, mount {mb})")

    def step(self, index: int):
        rng = self.rng
        name = rng.choice(DATA_FILES)
        self.log.append(f"{index}: {name} is {self.size(name)} bytes")
        kind = rng.choices(["write", "read", "truncate", "fallocate", "seek", "fsync"],
                           weights=[30, 15, 6, 30, 15, 4])[0]
        if kind == "write":
            offset, data = self.position(name), rng.randbytes(self.length())
            self.both(f"{index}: pwrite {name} at {offset} {len(data)} bytes",
                      lambda fds: os.pwrite(fds[name], data, offset))
        elif kind == "read":
            offset, count = self.position(name), self.length()
            self.both(f"{index}: pread {name} at {offset} {count}", lambda fds: os.pread(fds[name], count, offset))
        elif kind == "truncate":
            size = self.position(name) if rng.random() < 0.9 else 0
            self.both(f"{index}: ftruncate {name} to {size}", lambda fds: os.ftruncate(fds[name], size))
            if size == 0:
                self.exact[name] = True
        elif kind == "fsync":
            self.both(f"{index}: fsync {name}", lambda fds: os.fsync(fds[name]))
        elif kind == "seek":
            offset, whence = self.position(name), rng.choice([SEEK_DATA, SEEK_HOLE])
            label = "SEEK_DATA" if whence == SEEK_DATA else "SEEK_HOLE"
            desc = f"{index}: lseek {name} {offset} {label}"
            if self.exact[name]:
                self.both(desc, lambda fds: os.lseek(fds[name], offset, whence))
                return
            self.log.append(desc)
            a = seek_or_none(self.fds["reference"][name], offset, whence)
            b = seek_or_none(self.fds["mount"][name], offset, whence)
            size = self.size(name)
            # More holes on the mount: data starts no earlier, a hole no later (None: ENXIO).
            if offset >= size:
                ok = a is None and b is None
            elif whence == SEEK_DATA:
                ok = a is None and b is None or a is not None and (b is None or b >= a)
            else:
                ok = b is not None and a is not None and offset <= b <= a
            if not ok:
                raise Mismatch(f"seed {self.seed}: {desc}\n  reference: {a}\n  mount:     {b}")
        else:
            mode_name = rng.choice(sorted(FALLOCATE_MODES))
            mode = FALLOCATE_MODES[mode_name]
            offset, length = self.position(name), self.length()
            desc = f"{index}: fallocate {name} {mode_name} at {offset} length {length}"
            self.log.append(desc)
            b = outcome(lambda: fallocate(self.fds["mount"][name], mode, offset, length))
            if b == ("err", errno.EOPNOTSUPP) and mode_name in KERNEL_REFUSED:
                self.refused[mode_name] = self.refused.get(mode_name, 0) + 1
                return
            a = outcome(lambda: fallocate(self.fds["reference"][name], mode, offset, length))
            if a != b:
                raise Mismatch(f"seed {self.seed}: {desc}\n  reference: {fmt(a)}\n  mount:     {fmt(b)}")
            if a[0] == "ok":
                self.applied[mode_name] = self.applied.get(mode_name, 0) + 1
                if mode_name.startswith(("allocate", "zero")):
                    self.exact[name] = False

    def explained(self, e: Mismatch) -> Mismatch:
        recent = "\n    ".join(self.log[-int(os.environ.get('ENCFSD_DIFF_DATA_LOG', '30')):])
        return Mismatch(f"{e}\n  recent ops (ENCFSD_DIFF_SEED={self.seed}):\n    {recent}")


@pytest.mark.parametrize("seed", [int(SEED)] if SEED else [7, 8])
def test_differential_fallocate_and_seek(make_volume, ext4_dir, seed):
    volume = make_volume(extent_size=BLOCK)
    runner = DataRunner(seed, ext4_dir, volume.mnt)
    runner.open_all()
    try:
        for i in range(DATA_OPS):
            try:
                runner.step(i)
                if (i + 1) % 50 == 0:
                    for name in DATA_FILES:
                        runner.compare_file(name, f"seed {seed} after op {i}")
                if (i + 1) % 500 == 0:
                    runner.close_all()
                    volume.remount()
                    runner.open_all()
                    for name in DATA_FILES:
                        runner.compare_file(name, f"seed {seed} after the remount after op {i}")
            except Mismatch as e:
                raise runner.explained(e) from None
    finally:
        runner.close_all()
    # Every mode the mount offers was exercised and succeeded somewhere; a refused one was
    # refused every time, by the kernel, as documented.
    offered = set(FALLOCATE_MODES) - set(runner.refused)
    assert offered >= set(FALLOCATE_MODES) - KERNEL_REFUSED
    assert all(runner.applied.get(m, 0) > 0 for m in offered), (runner.applied, runner.refused)
    assert not set(runner.refused) & set(runner.applied), (runner.applied, runner.refused)


# Mixed I/O on one file from several threads: asynchronous O_DIRECT writes (io_submit) with
# buffered readers racing them, buffered writes checked by direct reads, writes through a shared
# mapping checked by direct and buffered reads, synchronous direct writes checked through a
# mapping. Each writer owns its regions, so after every write it knows what any read must return,
# whatever the cache holds; the final file must equal ext4's.

REGION = 64 * 1024
REGIONS_PER_WRITER = 4
WRITERS = ["aio-direct", "buffered", "mmap", "sync-direct"]
MIXED_ROUNDS = int(os.environ.get("ENCFSD_DIFF_MIXED_ROUNDS", "40"))
_SYS_IO_SETUP, _SYS_IO_DESTROY, _SYS_IO_GETEVENTS, _SYS_IO_SUBMIT = 206, 207, 208, 209
_libc.syscall.restype = ctypes.c_long
O_DIRECT = 0o40000


class _IOCB(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32), ("rw_flags", ctypes.c_uint32),
                ("opcode", ctypes.c_uint16), ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_int64),
                ("reserved2", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]


class _IOEvent(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]


def _sys(number, *args) -> int:
    r = _libc.syscall(number, *args)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def aio_write_all(fd: int, writes: list[tuple[int, object]]):
    """Submits every (offset, aligned buffer) at once as asynchronous writes and waits for all."""
    ctx = ctypes.c_ulong(0)
    _sys(_SYS_IO_SETUP, ctypes.c_int(len(writes)), ctypes.byref(ctx))
    try:
        iocbs = (_IOCB * len(writes))()
        pointers = (ctypes.POINTER(_IOCB) * len(writes))()
        keep = []
        for i, (offset, buffer) in enumerate(writes):
            address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
            keep.append(buffer)
            iocbs[i] = _IOCB(data=i, opcode=1, fildes=fd, buf=address, nbytes=len(buffer), offset=offset)
            pointers[i] = ctypes.pointer(iocbs[i])
        submitted = _sys(_SYS_IO_SUBMIT, ctx, ctypes.c_long(len(writes)), pointers)
        assert submitted == len(writes)
        events = (_IOEvent * len(writes))()
        done = 0
        while done < len(writes):
            done += _sys(_SYS_IO_GETEVENTS, ctx, ctypes.c_long(1), ctypes.c_long(len(writes) - done),
                         ctypes.byref(events, done * ctypes.sizeof(_IOEvent)), None)
        for event in events:
            assert event.res == REGION, f"asynchronous write failed: {event.res}"
    finally:
        _libc.syscall(_SYS_IO_DESTROY, ctx)


def pattern(writer: int, region: int, round_: int) -> int:
    return 1 + (writer * 37 + region * 11 + round_ * 7) % 254


def mixed_workload(path: Path) -> tuple[bytes, list[str]]:
    """Runs every writer and the racing readers on `path`; returns the final contents and every
    stale or torn read seen."""
    import mmap
    import threading

    size = len(WRITERS) * REGIONS_PER_WRITER * REGION
    with open(path, "wb") as f:
        f.write(bytes(size))
    problems: list[str] = []
    stop = threading.Event()

    def offset_of(writer: int, region: int) -> int:
        return (writer * REGIONS_PER_WRITER + region) * REGION

    def aligned(byte: int):
        buffer = mmap.mmap(-1, REGION)
        buffer.write(bytes([byte]) * REGION)
        return buffer

    def expect(what: str, got: bytes, byte: int):
        if got != bytes([byte]) * REGION:
            wrong = next(i for i in range(len(got)) if got[i] != byte) if len(got) == REGION else None
            problems.append(f"{what}: expected 0x{byte:02x}, got 0x{got[wrong]:02x} at {wrong}" if wrong is not None
                            else f"{what}: short read of {len(got)}")

    def direct_read(fd: int, offset: int) -> bytes:
        buffer = mmap.mmap(-1, REGION)
        n = os.preadv(fd, [buffer], offset)
        return bytes(buffer[:n])

    def aio_direct(w: int):
        dfd, bfd = os.open(path, os.O_RDWR | O_DIRECT), os.open(path, os.O_RDONLY)
        try:
            for k in range(MIXED_ROUNDS):
                buffers = [(offset_of(w, r), aligned(pattern(w, r, k))) for r in range(REGIONS_PER_WRITER)]
                aio_write_all(dfd, buffers)
                for r in range(REGIONS_PER_WRITER):
                    expect(f"buffered read after async direct write, round {k} region {r}",
                           os.pread(bfd, REGION, offset_of(w, r)), pattern(w, r, k))
        finally:
            os.close(dfd)
            os.close(bfd)

    def buffered(w: int):
        bfd, dfd = os.open(path, os.O_RDWR), os.open(path, os.O_RDONLY | O_DIRECT)
        try:
            for k in range(MIXED_ROUNDS):
                for r in range(REGIONS_PER_WRITER):
                    os.pwrite(bfd, bytes([pattern(w, r, k)]) * REGION, offset_of(w, r))
                    expect(f"direct read after buffered write, round {k} region {r}",
                           direct_read(dfd, offset_of(w, r)), pattern(w, r, k))
        finally:
            os.close(bfd)
            os.close(dfd)

    def mapped(w: int):
        fd, dfd, bfd = os.open(path, os.O_RDWR), os.open(path, os.O_RDONLY | O_DIRECT), os.open(path, os.O_RDONLY)
        view = mmap.mmap(fd, REGIONS_PER_WRITER * REGION, offset=offset_of(w, 0))
        try:
            for k in range(MIXED_ROUNDS):
                for r in range(REGIONS_PER_WRITER):
                    view[r * REGION:(r + 1) * REGION] = bytes([pattern(w, r, k)]) * REGION
                    view.flush(r * REGION, REGION)
                    expect(f"direct read after mmap write, round {k} region {r}",
                           direct_read(dfd, offset_of(w, r)), pattern(w, r, k))
                    expect(f"buffered read after mmap write, round {k} region {r}",
                           os.pread(bfd, REGION, offset_of(w, r)), pattern(w, r, k))
        finally:
            view.close()
            for d in (fd, dfd, bfd):
                os.close(d)

    def sync_direct(w: int):
        dfd, fd = os.open(path, os.O_RDWR | O_DIRECT), os.open(path, os.O_RDONLY)
        view = mmap.mmap(fd, REGIONS_PER_WRITER * REGION, prot=mmap.PROT_READ, offset=offset_of(w, 0))
        try:
            for k in range(MIXED_ROUNDS):
                for r in range(REGIONS_PER_WRITER):
                    os.pwrite(dfd, aligned(pattern(w, r, k)), offset_of(w, r))
                    expect(f"mapped read after direct write, round {k} region {r}",
                           bytes(view[r * REGION:(r + 1) * REGION]), pattern(w, r, k))
        finally:
            view.close()
            os.close(dfd)
            os.close(fd)

    def racing_reader(seed: int):
        rng = random.Random(seed)
        fd = os.open(path, os.O_RDONLY)
        try:
            while not stop.is_set():
                # Buffered reads of the regions direct writes are changing: they fill the page
                # cache with whatever the file holds at that moment.
                w = rng.choice([0, 3])
                os.pread(fd, REGION, offset_of(w, rng.randrange(REGIONS_PER_WRITER)))
        finally:
            os.close(fd)

    def guarded(fn, *args):
        def run_it():
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - reported as a problem of the run
                problems.append(f"{fn.__name__}: {e!r}")
        return run_it

    writers = [threading.Thread(target=guarded(fn, w)) for w, fn in enumerate([aio_direct, buffered, mapped, sync_direct])]
    readers = [threading.Thread(target=guarded(racing_reader, s)) for s in range(3)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    with open(path, "rb") as f:
        return f.read(), problems


def test_differential_mixed_direct_buffered_mmap(make_volume, ext4_dir):
    volume = make_volume()
    expected = b"".join(bytes([pattern(w, r, MIXED_ROUNDS - 1)]) * REGION
                        for w in range(len(WRITERS)) for r in range(REGIONS_PER_WRITER))
    reference, reference_problems = mixed_workload(ext4_dir / "mixed")
    assert reference_problems == [] and reference == expected, reference_problems[:5]
    mounted, problems = mixed_workload(volume.mnt / "mixed")
    assert problems == [], f"{len(problems)} stale or failed reads on the mount, first: {problems[:5]}"
    assert mounted == reference
    volume.remount()
    assert read_all(volume.mnt / "mixed") == reference
