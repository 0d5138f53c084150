"""A hostile store: at every name the daemon or fsck opens, an attacker with write access to the
backing store plants a symlink to something outside the store (a copy of the genuine object
where there is one, so that following it would *work*), a symlink to a path outside that does
not exist, a FIFO, a socket, a character device, a block device (a loop device over a file of this test),
or an object of the other type (a directory where a file belongs, a file where a directory
belongs). Then the mount and fsck are driven over it.

Required (issue 14):
- no path outside the store is opened, created, written, renamed into or followed: every file
  and directory of the outside tree is watched with inotify (an open, even read-only, is an
  event) and compared (content, size, mtime, xattrs) before and after; the dangling target must
  not come into existence;
- a planted FIFO or device is never opened at all, a planted file or directory of the wrong type
  never opened for writing (inotify on the planted object itself; O_PATH opens are silent);
- a store-wide name (encfsd.conf, the root's .d, .journal, encfsd.lock) that is planted makes the
  mount fail promptly; anything else is refused with EIO for that object only, the daemon stays
  alive and the rest of the store keeps working, before and after `fsck --repair`;
- fsck reports a planted object as a problem of that object (exit status bit 4), never aborts
  (bit 8) or crashes, and neither fsck nor the daemon hangs (every operation has a timeout).

Names and where FORMAT.md puts them: encfsd.conf and `.d` (2.1), entries (2.3, 2.4), the xattrs
of an object, which live on its backing file or backing directory itself (8), `.journal/<object
ID>` (9a; the object ID is at body offset 56 of a header slot, 4.3), `.quarantine` (9a),
`.mk-`/`.rm-` temporaries (2.5), the store lock `encfsd.lock`, and the epoch record `encfsd.epoch` (15.2).

One pristine store is built per module; each test plants into its own `cp -a` copy and mounts
with --key-file and --no-keyring (the test never touches the keyring)."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import (Volume, _pid_alive, call_with_timeout, daemon_pids, is_mounted, read_all, run,
                      wait_pids_gone)

E = 4096
MOUNT_TIMEOUT = 15
OP_TIMEOUT = 10
FSCK_TIMEOUT = 15

OK_TEXT = b"control file: must read back whatever was planted elsewhere\n"
BIG = random.Random(14).randbytes(5 * E + 100)          # 6 extents
PATCH_AT, PATCH = E + E // 2, random.Random(15).randbytes(100)
BIG_PATCHED = BIG[:PATCH_AT] + PATCH + BIG[PATCH_AT + len(PATCH):]
INNER = random.Random(16).randbytes(3000)
DEEP = random.Random(17).randbytes(E + 7)
LEFTOVER = ".mk-0123456789abcdef"
TRASH = ".rm-fedcba9876543210"


# --- inotify -----------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
IN_MODIFY, IN_CLOSE_WRITE, IN_OPEN = 0x2, 0x8, 0x20
IN_MOVED_TO, IN_CREATE = 0x80, 0x100
IN_ALL_EVENTS, IN_ISDIR, IN_IGNORED = 0xFFF, 0x40000000, 0x8000
EVENT_NAMES = {0x1: "ACCESS", 0x2: "MODIFY", 0x4: "ATTRIB", 0x8: "CLOSE_WRITE", 0x10: "CLOSE_NOWRITE",
               0x20: "OPEN", 0x40: "MOVED_FROM", 0x80: "MOVED_TO", 0x100: "CREATE", 0x200: "DELETE",
               0x400: "DELETE_SELF", 0x800: "MOVE_SELF"}


class Watch:
    """inotify watches on paths, each with the events that count as a violation there."""

    def __init__(self):
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.labels: dict[int, tuple[str, int]] = {}

    def add(self, path: Path, mask: int, label: str):
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        self.labels[wd] = (label, mask)

    def add_tree(self, top: Path, label: str):
        """Everything below `top` (which must exist), every event. A directory's watch also
        reports its files' events, so directories are watched, not files. The tree is listed
        before the first watch is added, so the listing itself is not an event."""
        for dirpath, _dirnames, _filenames in list(os.walk(top)):
            rel = os.path.relpath(dirpath, top)
            self.add(Path(dirpath), IN_ALL_EVENTS, label if rel == "." else f"{label}/{rel}")

    def violations(self) -> list[str]:
        """One line per path that had wanted events: "path: OPEN|MODIFY|..." (first seen first)."""
        found: dict[str, list[str]] = {}
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            i = 0
            while i < len(buf):
                wd, mask, _cookie, length = struct.unpack_from("iIII", buf, i)
                name = buf[i + 16:i + 16 + length].rstrip(b"\0").decode(errors="replace")
                i += 16 + length
                label, wanted = self.labels.get(wd, ("?", 0))
                if mask & IN_IGNORED or not mask & wanted:
                    continue
                kinds = found.setdefault(f"{label}/{name}" if name else label, [])
                kinds += [n for bit, n in EVENT_NAMES.items() if mask & bit & wanted and n not in kinds]
        return [f"{path}: {'|'.join(kinds)}" for path, kinds in found.items()]

    def close(self):
        os.close(self.fd)


def snapshot(top: Path) -> dict[str, tuple]:
    """Type, size, mtime, content hash and xattrs of everything below top (symlinks not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames, ""]:
            p = Path(dirpath, name) if name else Path(dirpath)
            st = os.lstat(p)
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            xattrs = {} if stat.S_ISLNK(st.st_mode) else {
                a: os.getxattr(p, a, follow_symlinks=False) for a in os.listxattr(p, follow_symlinks=False)}
            out[os.path.relpath(p, top)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, digest, xattrs)
    return out


# --- the pristine store ------------------------------------------------------------------------

@dataclass
class Pristine:
    volume: Volume
    backing: dict[str, str]          # plaintext path -> backing path relative to the store
    big_oid: str = ""                # object ID of /big, 32 hex digits


def object_id(header_region: bytes) -> str:
    """The object ID of a header (FORMAT.md 4.3: body offset 56), from whichever slot is in use."""
    slot = header_region[:2048] if any(header_region[:2048]) else header_region[2048:4096]
    return slot[56:72].hex()


@pytest.fixture(scope="module")
def pristine(encfsd_bin, tmp_path_factory) -> Pristine:
    base = tmp_path_factory.mktemp("hostile")
    key = base / "master.key"
    run(encfsd_bin, "key", "generate", "-o", key)
    root = base / "pristine"
    root.mkdir()
    v = Volume(encfsd_bin, root, key, extent_size=E)
    v.mount(by_key_file=True)
    m, s = v.mnt, v.store
    backing = {}
    try:
        def make(path: str, data: bytes | None, parent: Path = s):
            if data is None:
                backing[path] = v.new_backing(parent, lambda: (m / path).mkdir())
            else:
                backing[path] = v.new_backing(parent, lambda: (m / path).write_bytes(data))

        make("ok.txt", OK_TEXT)
        make("big", BIG)
        os.setxattr(m / "big", "user.k", b"value of big")
        make("spare", b"spare file, renamed onto planted names")
        make("dir", None)
        os.setxattr(m / "dir", "user.k", b"value of dir")
        make("dir/inner.txt", INNER, s / backing["dir"])
        make("tagged", b"a file with xattrs")
        os.setxattr(m / "tagged", "user.tag", b"tag of the file")
        make("tagdir", None)
        os.setxattr(m / "tagdir", "user.tag", b"tag of the directory")
        make("ctl", None)
        make("ctl/deep.txt", DEEP, s / backing["ctl"])
        for name in ("empty", "empty2", "srcdir", "victim-dir"):
            make(name, None)
        make("victim", b"a file whose header the quarantine tests destroy")
        v.unmount()
    finally:
        v.force_cleanup()
    p = Pristine(v, backing)
    p.big_oid = object_id((s / backing["big"]).read_bytes()[:4096])
    return p


@pytest.fixture(scope="module")
def pending(pristine, tmp_path_factory) -> Pristine:
    """The pristine store with an interrupted overwrite of /big: its header carries the pending
    flag and `.journal/<object ID>` holds the genuine shadow (the daemon died at pending-flag-set,
    FORMAT.md 9a, 10.3). Recovery from the shadow gives BIG_PATCHED."""
    root = tmp_path_factory.mktemp("hostile-pending")
    v = Volume.copy_of(pristine.volume, root)
    try:
        v.mount(by_key_file=True, env={**os.environ, "ENCFSD_FAULT_POINT": "pending-flag-set"})
        try:
            with open(v.mnt / "big", "r+b") as f:
                f.seek(PATCH_AT)
                f.write(PATCH)
        except OSError:
            pass  # the daemon dies in the flush of close
        assert wait_pids_gone(v.pids, 10) == [], "the armed daemon did not die at pending-flag-set"
    finally:
        v.force_cleanup()
    shadow = v.store / ".journal" / pristine.big_oid
    assert shadow.stat().st_size > 2088, "no shadow was left for the interrupted write"
    return Pristine(v, pristine.backing, pristine.big_oid)


@pytest.fixture(scope="module")
def loop_device(tmp_path_factory):
    """A loop device over a file of this module, so a planted block device is harmless to open
    and an open of it shows (inotify) and a write to it would land in the file."""
    backing = tmp_path_factory.mktemp("loop") / "disk"
    backing.write_bytes(random.Random(18).randbytes(1 << 20))
    device = run("losetup", "--find", "--show", backing).stdout.strip()
    try:
        yield os.stat(device).st_rdev, backing
    finally:
        run("losetup", "-d", device, check=False)


# --- planting ----------------------------------------------------------------------------------

KINDS = ["symlink", "dangling-symlink", "fifo", "socket", "chardev", "blockdev", "wrong-type"]
SPECIAL = ("fifo", "socket", "chardev", "blockdev")


@dataclass
class Site:
    """A name in the store. `where` gives its path relative to the store (from the backing map
    and the object ID); `expects` is the type encfsd expects there; `scope` "store" means the
    mount must be refused, "object" that only what lives there may fail."""
    where: Callable[[Pristine], str]
    expects: str                       # "file" or "dir"
    scope: str = "object"
    drive: Callable | None = None      # drive(ctx) on the mount, for scope "object"
    fsck_finds: bool = False           # fsck must report a problem (exit bit 4)
    store: str = "pristine"            # or "pending"
    prepare: Callable | None = None    # prepare(store) before planting
    kinds: list = field(default_factory=lambda: KINDS)


def plant(site_path: Path, kind: str, expects: str, outside: Path, rdev_block: int) -> list[Path]:
    """Replaces whatever is at site_path by a planted object of `kind`; returns the planted paths
    that must never be opened (special files) or written (wrong-type objects)."""
    genuine = None
    if os.path.lexists(site_path):
        genuine = outside / ("genuine-" + site_path.name)
        # Keep the genuine object, outside: a followed symlink then finds something that works.
        run("cp", "-a", site_path, genuine)
        if site_path.is_dir() and not site_path.is_symlink():
            shutil.rmtree(site_path)
        else:
            site_path.unlink()
    site_path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "symlink":
        target = genuine or (outside / ("canary-dir" if expects == "dir" else "canary"))
        os.symlink(target, site_path)
        return []
    if kind == "dangling-symlink":
        os.symlink(outside / "must-not-exist", site_path)
        return []
    if kind == "fifo":
        os.mkfifo(site_path, 0o600)
    elif kind == "socket":
        # bound from the directory itself: a socket's path must fit in 108 bytes
        run(sys.executable, "-c", f"import socket; socket.socket(socket.AF_UNIX).bind({site_path.name!r})",
            cwd=site_path.parent)
    elif kind == "chardev":
        os.mknod(site_path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))    # a /dev/null
    elif kind == "blockdev":
        os.mknod(site_path, 0o600 | stat.S_IFBLK, rdev_block)
    elif kind == "wrong-type":
        if expects == "file":
            site_path.mkdir(mode=0o700)
        else:
            site_path.write_bytes(bytes(4096))
    elif kind == "links-inside":
        # A directory of our leftover shape whose contents point outside.
        site_path.mkdir(mode=0o700)
        os.symlink(outside / "canary", site_path / ".d")
        os.symlink(outside / "canary-dir", site_path / "sub")
        os.symlink(outside / "must-not-exist", site_path / "gone")
        return []
    else:
        raise AssertionError(kind)
    return [site_path]


# --- running operations with timeouts ----------------------------------------------------------

class Ctx:
    """One test's volume and the problems found, with helpers that time out instead of hanging."""

    def __init__(self, volume: Volume, watch: Watch):
        self.v = volume
        self.watch = watch
        self.m = volume.mnt
        self.problems: list[str] = []
        self.hung = False
        self.refusal = ""                # why the last mount was refused
        self.fsck_output = ""            # every fsck run's status and output, for the report

    def phase_done(self, phase: str):
        """Charges the events seen so far to `phase` (after its processes exited, so that the
        close events are in)."""
        self.problems += [f"touched during {phase}: {event}" for event in self.watch.violations()]

    def call(self, what: str, fn: Callable, timeout: float = OP_TIMEOUT):
        """("ok", value) | ("err", errno) | ("hang", None) | ("skipped", None)."""
        if self.hung:
            return "skipped", None
        status, value = call_with_timeout(fn, timeout)
        if status == "hang":
            self.problems.append(f"{what}: hung (no answer in {timeout}s); daemon killed")
            self.hung = True
            kill_daemon(self.v)
        return status, value

    def expect(self, what: str, fn: Callable, allowed: set, check: Callable | None = None):
        """allowed: errno values and/or "ok"; check(value) -> problem text or None on success."""
        status, value = self.call(what, fn)
        if status == "ok":
            if "ok" not in allowed:
                shown = f"{len(value)} bytes" if isinstance(value, bytes) else f"{value!r:.80}"
                self.problems.append(f"{what}: expected {names(allowed)} but it succeeded ({shown})")
            elif check and (why := check(value)):
                self.problems.append(f"{what}: {why}")
        elif status == "err" and value not in allowed:
            self.problems.append(f"{what}: expected {names(allowed)}, got {errno.errorcode.get(value, value)}")
        return status, value

    def eio(self, what: str, fn: Callable):
        return self.expect(what, fn, {errno.EIO})

    def ok(self, what: str, fn: Callable, expected=None):
        return self.expect(what, fn, {"ok"},
                           None if expected is None else lambda got: None if got == expected else "wrong result")

    def alive_and_working(self, when: str):
        """The daemon answers and the rest of the store reads and writes correctly."""
        if self.hung:
            return
        dead = [p for p in self.v.pids if not _pid_alive(p)]
        if dead or not self.v.pids:
            self.problems.append(f"{when}: daemon {dead or '(none found)'} is not running")
            return
        self.ok(f"{when}: read ok.txt", lambda: (self.m / "ok.txt").read_bytes(), OK_TEXT)
        self.ok(f"{when}: read ctl/deep.txt", lambda: (self.m / "ctl" / "deep.txt").read_bytes(), DEEP)
        self.ok(f"{when}: list the root", lambda: "ok.txt" in os.listdir(self.m), True)
        probe = self.m / f"probe-{when.replace(' ', '-')}"
        self.ok(f"{when}: write a new file", lambda: probe.write_bytes(b"probe") and probe.read_bytes(), b"probe")


def names(allowed) -> list:
    return sorted(a if a == "ok" else errno.errorcode.get(a, str(a)) for a in allowed)


def kill_daemon(v: Volume):
    for pid in set(v.pids) | set(daemon_pids(v.mnt)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_pids_gone(v.pids, 10)
    if is_mounted(v.mnt):
        run("umount", "-l", v.mnt, check=False)
    v.pids = []


def fsck(ctx: Ctx, repair: bool) -> int | None:
    what = "fsck --repair" if repair else "fsck"
    args = [ctx.v.binary, "fsck", ctx.v.store, "--key-file", ctx.v.key_file] + (["--repair"] if repair else [])
    try:
        r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=FSCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        ctx.problems.append(f"{what}: hung (no exit in {FSCK_TIMEOUT}s)")
        return None
    finally:
        ctx.phase_done(what)
    if r.returncode < 0 or r.returncode >= 16:
        ctx.problems.append(f"{what}: crashed or misused (status {r.returncode}): {r.stderr.strip()[-300:]}")
        return None
    ctx.fsck_output += f"--- {what} ({r.returncode})\n{r.stdout}{r.stderr}"
    return r.returncode


def try_mount(ctx: Ctx) -> bool:
    try:
        ctx.v.mount(by_key_file=True, timeout=MOUNT_TIMEOUT)
        return True
    except subprocess.TimeoutExpired:
        ctx.problems.append(f"mount: hung (did not return in {MOUNT_TIMEOUT}s)")
        kill_daemon(ctx.v)
    except AssertionError as e:
        ctx.refusal = str(e)
    if is_mounted(ctx.v.mnt):
        kill_daemon(ctx.v)
    return False


# --- what is driven at each site ---------------------------------------------------------------

def read_of(path: Path):
    return lambda: read_all(path)


def drive_file(ctx: Ctx, name: str = "big"):
    m, p = ctx.m, ctx.m / name
    ctx.eio(f"stat {name}", lambda: os.stat(p))
    ctx.eio(f"read {name}", read_of(p))

    def overwrite():
        with open(p, "r+b") as f:
            f.seek(PATCH_AT)
            f.write(PATCH)
    ctx.eio(f"open {name} r+ and write", overwrite)
    ctx.eio(f"truncate {name}", lambda: os.truncate(p, 10))
    ctx.eio(f"chmod {name}", lambda: os.chmod(p, 0o600))
    ctx.eio(f"rename {name}", lambda: os.rename(p, m / f"{name}-renamed"))
    ctx.eio(f"rename spare onto {name}", lambda: os.rename(m / "spare", p))
    ctx.eio(f"link {name}", lambda: os.link(p, m / f"{name}-link"))
    drive_xattrs(ctx, name, "user.k")
    ctx.eio(f"unlink {name}", lambda: os.unlink(p))


def drive_xattrs(ctx: Ctx, name: str, attr: str):
    p = ctx.m / name
    ctx.eio(f"getxattr {name}", lambda: os.getxattr(p, attr))
    ctx.eio(f"setxattr {name}", lambda: os.setxattr(p, "user.new", b"written through a planted name"))
    ctx.eio(f"listxattr {name}", lambda: os.listxattr(p))
    ctx.eio(f"removexattr {name}", lambda: os.removexattr(p, attr))


def drive_dir(ctx: Ctx, name: str = "dir"):
    m, p = ctx.m, ctx.m / name
    ctx.eio(f"stat {name}", lambda: os.stat(p))
    ctx.eio(f"list {name}", lambda: os.listdir(p))
    ctx.eio(f"read {name}/inner.txt", read_of(p / "inner.txt"))
    ctx.eio(f"create in {name}", lambda: (p / "new").write_bytes(b"x"))
    ctx.eio(f"mkdir in {name}", lambda: os.mkdir(p / "sub"))
    ctx.eio(f"chmod {name}", lambda: os.chmod(p, 0o700))
    ctx.eio(f"rename spare into {name}", lambda: os.rename(m / "spare", p / "spare"))
    ctx.eio(f"rename {name}", lambda: os.rename(p, m / f"{name}-renamed"))
    drive_xattrs(ctx, name, "user.k")
    ctx.eio(f"rmdir {name}", lambda: os.rmdir(p))


def drive_overwrite(ctx: Ctx):
    """An in-place overwrite of stored extents, which goes through `.journal/<object ID>`. The
    flush may fail (EIO) or succeed (the daemon replaced the foreign object); the file then reads
    as one of its two states, never anything else."""
    p = ctx.m / "big"

    def overwrite():
        with open(p, "r+b") as f:
            f.seek(PATCH_AT)
            f.write(PATCH)
            f.flush()
            os.fsync(f.fileno())
    ctx.expect("overwrite big in place and fsync", overwrite, {"ok", errno.EIO})
    ctx.expect("read big after the overwrite", read_of(p), {"ok", errno.EIO}, one_of_big)
    ctx.ok("read dir/inner.txt", read_of(ctx.m / "dir" / "inner.txt"), INNER)


def one_of_big(data: bytes):
    return None if data in (BIG, BIG_PATCHED) else f"{len(data)} bytes, neither state of big"


def drive_pending(ctx: Ctx):
    """/big has an interrupted write whose shadow is not a usable file: it cannot be recovered."""
    ctx.eio("read big (interrupted write, shadow unusable)", read_of(ctx.m / "big"))
    ctx.eio("open big r+", lambda: open(ctx.m / "big", "r+b").close())


def drive_victim(ctx: Ctx):
    ctx.eio("read victim (header destroyed)", read_of(ctx.m / "victim"))


def drive_listing(ctx: Ctx):
    ctx.ok("list the root (a leftover is no entry)", lambda: sorted(os.listdir(ctx.m)),
           sorted(["ok.txt", "big", "spare", "dir", "tagged", "tagdir", "ctl", "empty", "empty2", "srcdir",
                   "victim-dir", "victim"]))
    ctx.ok("mkdir and rmdir", lambda: (os.mkdir(ctx.m / "made"), os.rmdir(ctx.m / "made")), (None, None))


def drive_rmdir(ctx: Ctx):
    """rmdir of a directory that holds only a leftover: the leftover goes with it (2.5)."""
    ctx.expect("rmdir empty (holding a planted leftover)", lambda: os.rmdir(ctx.m / "empty"), {"ok", errno.EIO})


def drive_rename_over(ctx: Ctx):
    """A rename replacing an empty directory takes the target out through `.rm-` (7.3)."""
    ctx.expect("rename srcdir over empty2 (holding a planted leftover)",
               lambda: os.rename(ctx.m / "srcdir", ctx.m / "empty2"), {"ok", errno.EIO})


def destroy_victim(store: Path, backing: dict):
    path = store / backing["victim"]
    with open(path, "r+b") as f:
        f.write(bytes(4096))


SITES = {
    "encfsd.conf": Site(lambda p: "encfsd.conf", "file", "store"),
    "root-.d": Site(lambda p: ".d", "file", "store"),
    ".journal": Site(lambda p: ".journal", "dir", "store"),
    "encfsd.lock": Site(lambda p: "encfsd.lock", "file", "store"),
    "encfsd.epoch": Site(lambda p: "encfsd.epoch", "file", "store"),
    "entry-file": Site(lambda p: p.backing["big"], "file", drive=drive_file, fsck_finds=True),
    "entry-dir": Site(lambda p: p.backing["dir"], "dir", drive=drive_dir, fsck_finds=True),
    "dir-.d": Site(lambda p: p.backing["dir"] + "/.d", "file", drive=drive_dir, fsck_finds=True),
    "xattrs-of-file": Site(lambda p: p.backing["tagged"], "file", fsck_finds=True,
                           drive=lambda ctx: drive_xattrs(ctx, "tagged", "user.tag")),
    "xattrs-of-dir": Site(lambda p: p.backing["tagdir"], "dir", fsck_finds=True,
                          drive=lambda ctx: drive_xattrs(ctx, "tagdir", "user.tag")),
    "journal-shadow": Site(lambda p: f".journal/{p.big_oid}", "file", drive=drive_overwrite),
    "pending-shadow": Site(lambda p: f".journal/{p.big_oid}", "file", drive=drive_pending, fsck_finds=True,
                           store="pending"),
    ".quarantine": Site(lambda p: ".quarantine", "dir", drive=drive_victim, fsck_finds=True,
                        prepare=destroy_victim),
    "mk-leftover": Site(lambda p: LEFTOVER, "dir", drive=drive_listing, kinds=KINDS + ["links-inside"]),
    "rm-leftover": Site(lambda p: p.backing["empty"] + "/" + TRASH, "dir", drive=drive_rmdir,
                        kinds=KINDS + ["links-inside"]),
    "leftover-in-rename-target": Site(lambda p: p.backing["empty2"] + "/" + LEFTOVER, "dir",
                                      drive=drive_rename_over, kinds=KINDS + ["links-inside"]),
}

CASES = [pytest.param(name, kind, id=f"{name}/{kind}") for name, site in SITES.items() for kind in site.kinds]


@pytest.mark.parametrize("site_name, kind", CASES)
def test_hostile_store(site_name, kind, pristine, pending, loop_device, volumes, tmp_path):
    site = SITES[site_name]
    source = pending if site.store == "pending" else pristine
    v = Volume.copy_of(source.volume, tmp_path / "vol")
    volumes.append(v)
    if site.prepare:
        site.prepare(v.store, source.backing)

    outside = tmp_path / "outside"
    (outside / "canary-dir").mkdir(parents=True)
    (outside / "canary").write_bytes(b"canary: nothing may open, change, replace or follow me\n")
    os.setxattr(outside / "canary", "user.canary", b"untouched")
    (outside / "canary-dir" / "resident").write_bytes(b"a file in an outside directory\n")
    rdev_block, loop_file = loop_device
    loop_before = hashlib.sha256(loop_file.read_bytes()).hexdigest()
    site_path = v.store / site.where(source)
    planted = plant(site_path, kind, site.expects, outside, rdev_block)

    before = snapshot(outside)
    watch = Watch()
    try:
        watch.add_tree(outside, "outside")
        for p in planted:
            special = kind in SPECIAL
            # A regular file at an entry name looks like any file object, so opening it read-write
            # is fair; writing to it, or creating in a planted directory, is not.
            watch.add(p, (IN_OPEN | IN_MODIFY | IN_CLOSE_WRITE) if special
                      else (IN_MODIFY | IN_CREATE | IN_MOVED_TO), f"planted {kind}")
        ctx = Ctx(v, watch)
        scenario(ctx, site)
        v.force_cleanup()
        ctx.phase_done("cleanup")
    finally:
        watch.close()
        v.force_cleanup()
    after = snapshot(outside)
    for path in sorted(set(before) | set(after)):
        if before.get(path) != after.get(path):
            ctx.problems.append(f"outside {path}: {'created' if path not in before else 'removed' if path not in after else 'changed'}")
    if os.path.lexists(outside / "must-not-exist"):
        ctx.problems.append("the dangling symlink's target outside the store was created")
    if hashlib.sha256(loop_file.read_bytes()).hexdigest() != loop_before:
        ctx.problems.append("the block device's contents changed")
    assert not ctx.problems, (f"{site_name} planted as {kind}:\n  " + "\n  ".join(ctx.problems)
                              + f"\n{ctx.fsck_output}")


def scenario(ctx: Ctx, site: Site):
    v = ctx.v
    if site.scope == "store":
        if try_mount(ctx):
            ctx.problems.append("mount: not refused")
            kill_daemon(v)
        ctx.phase_done("mount")
        for repair in (False, True):
            rc = fsck(ctx, repair)
            # The lock's meaning for fsck is its own; the other names make the store unusable.
            if rc == 0 and site.where(None) != "encfsd.lock":
                ctx.problems.append(f"fsck{' --repair' if repair else ''}: accepted the store (status 0)")
        return

    if not try_mount(ctx):
        ctx.problems.append(f"mount: refused ({ctx.refusal[:300]})")
        return
    site.drive(ctx)
    end_mount(ctx, "the mount")
    for repair in (False, True):
        rc = fsck(ctx, repair)
        if rc is None:
            continue
        what = "fsck --repair" if repair else "fsck"
        if rc & 8:
            ctx.problems.append(f"{what}: aborted (status {rc}) instead of reporting the one object")
        elif site.fsck_finds and not repair and not rc & 4:
            ctx.problems.append(f"{what}: found nothing (status {rc})")
    ctx.hung = False
    if try_mount(ctx):
        end_mount(ctx, "the mount after fsck --repair")
    else:
        ctx.problems.append(f"mount after fsck --repair: refused ({ctx.refusal[:300]})")


def end_mount(ctx: Ctx, phase: str):
    """Checks the daemon still serves the rest of the store, unmounts cleanly (the daemon must
    exit), and charges what was touched meanwhile to `phase`."""
    ctx.alive_and_working(f"at the end of {phase}")
    if not ctx.hung:
        try:
            ctx.v.unmount()
        except AssertionError as e:
            ctx.problems.append(f"unmount after {phase}: {e}")
    ctx.v.force_cleanup()
    ctx.phase_done(phase)


def test_pending_shadow_control(pending, volumes, tmp_path):
    """Control for the pending-shadow cases: with its genuine shadow in place the interrupted
    write is recovered, so there the shadow is what decides, and refusing is the only outcome."""
    v = Volume.copy_of(pending.volume, tmp_path / "vol")
    volumes.append(v)
    v.mount(by_key_file=True)
    assert read_all(v.mnt / "big") == BIG_PATCHED
    assert (v.mnt / "ok.txt").read_bytes() == OK_TEXT


def test_detectors_can_fail(tmp_path):
    """The checks above can fail: opens through a symlink, of a FIFO, of a device and writes
    are seen; O_PATH opens (how encfsd looks at an object before trusting it) are not."""
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "canary").write_bytes(b"canary")
    store = tmp_path / "store"
    store.mkdir()
    os.symlink(outside / "canary", store / "link")
    os.mkfifo(store / "fifo")
    os.mknod(store / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    before = snapshot(outside)
    watch = Watch()
    try:
        watch.add_tree(outside, "outside")
        watch.add(store / "fifo", IN_OPEN, "fifo")
        watch.add(store / "null", IN_OPEN, "null")
        for name in ("link", "fifo", "null"):
            os.close(os.open(store / name, os.O_PATH | os.O_NOFOLLOW))
        assert watch.violations() == []
        os.close(os.open(store / "link", os.O_RDONLY))
        os.close(os.open(store / "fifo", os.O_RDWR))
        os.close(os.open(store / "null", os.O_WRONLY))
        (outside / "sub" / "new").write_bytes(b"")
        seen = watch.violations()
    finally:
        watch.close()
    assert [s.split(":")[0] for s in seen] == ["outside/canary", "fifo", "null", "outside/sub/new"], seen
    os.utime(outside / "canary", ns=(0, 0))
    after = snapshot(outside)
    assert set(after) - set(before) == {"sub/new"} and after["canary"] != before["canary"]
