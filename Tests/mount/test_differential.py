"""Differential test: a seeded random sequence of file system operations is applied to the
mount and to a plain directory; every result (data or errno) and, periodically, the whole tree
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
import stat
from pathlib import Path

import pytest

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
    ref_root = tmp_path / "reference"
    ref_root.mkdir()
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
