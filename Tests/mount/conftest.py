"""Shared fixtures for the real-mount tests of encfsd.

These tests mount real FUSE file systems, so they need /dev/fuse, fusermount3 and (for
most of them) root. The daemon binary comes from $ENCFSD, default <repo>/.build/debug/encfsd.

Fixtures:
  encfsd_bin   path to the binary (session)
  key_file     a freshly generated 64-byte key file
  make_volume  factory: make_volume(extent_size=None, unlocked=True) -> Volume, mounted
  volume       a mounted, unlocked Volume with the default extent size
  mounted      (store, mnt) of `volume`
  ext4_dir     a fresh ext4 filesystem mounted from a loop device, the reference for behaviour
  volumes      a list: every Volume a test appends (e.g. Volume.copy_of(...)) is torn down too
Every Volume created through these fixtures is unmounted in teardown, even when the test
fails: fusermount3 -u, then umount -l, then SIGKILL of any daemon still serving it.

Keys: the tests share root's user keyring (@u) with whoever else uses encfsd on the machine, so
they touch only keys they made. Every identifier that `encfsd init` or `encfsd key add` prints
through `run` is recorded (`made_identifiers`), and `purge_test_keys` unlinks only the `encfsd:`
entries of those identifiers. Mounts use --no-keyring unless a test asks for the keyring, so a
test daemon never even loads a key it was not given.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENOKEY = getattr(errno, "ENOKEY", 126)
# What encfsd keeps at a store's top besides the root's entries (.d is also in every directory).
STORE_FILES = {".d", "encfsd.conf", ".journal", "encfsd.lock", "encfsd.epoch"}


def _binary() -> Path:
    return Path(os.environ.get("ENCFSD", str(REPO / ".build" / "debug" / "encfsd")))


# Identifiers of the keys the tests made (printed by `encfsd init` and `encfsd key add`): the only
# ones whose keyring entries a test may remove.
made_identifiers: set[str] = set()
_IDENTIFIER = re.compile(r"\b[0-9a-f]{32}\b")


def _records_identifiers(args: list[str]) -> bool:
    words = [os.path.basename(a) if i == 0 else a for i, a in enumerate(args)]
    return "encfsd" in words[0] and ("init" in words[1:2] or words[1:3] == ["key", "add"])


def run(*args, check=True, timeout=60, **kwargs) -> subprocess.CompletedProcess:
    """Runs a command, capturing text output; on failure the output is in the exception. The key
    identifiers `encfsd init` and `encfsd key add` print are recorded in `made_identifiers`."""
    argv = [str(a) for a in args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if _records_identifiers(argv) and result.stdout:
        made_identifiers.update(_IDENTIFIER.findall(result.stdout))
    if check and result.returncode != 0:
        raise AssertionError(
            f"command failed ({result.returncode}): {' '.join(str(a) for a in args)}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}")
    return result


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1 and fields[1].encode().decode("unicode_escape") == target:
                return True
    return False


def _pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def daemon_pids(mnt: Path) -> list[int]:
    """Live encfsd processes whose command line names this mountpoint."""
    target = os.path.realpath(mnt)
    result = subprocess.run(["pgrep", "-f", "--", target], capture_output=True, text=True)
    pids = []
    for token in result.stdout.split():
        pid = int(token)
        if pid == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # Match the mountpoint as a whole argument, and only encfsd processes.
        if target.encode() in cmdline and any(b"encfsd" in c for c in cmdline[:1]) and _pid_alive(pid):
            pids.append(pid)
    return pids


def wait_pids_gone(pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if _pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _pid_alive(p)]
    return alive


def force_unmount(mnt: Path, pids=()) -> list[str]:
    """Best-effort teardown of a mount and its daemon (fusermount3 -u, then umount -l, then
    SIGKILL); returns a list of problems found (for reporting)."""
    problems = []
    pids = set(pids) | set(daemon_pids(mnt))
    if is_mounted(mnt):
        r = run("fusermount3", "-u", mnt, check=False)
        if r.returncode != 0:
            problems.append(f"fusermount3 -u: {r.stderr.strip()}")
            run("umount", "-l", mnt, check=False)
            if is_mounted(mnt):
                run("fusermount3", "-uz", mnt, check=False)
    left = wait_pids_gone(pids, 10.0)
    for pid in left:
        problems.append(f"daemon {pid} still alive after unmount; killed")
        _kill(pid)
    return problems


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    """Waits until `predicate()` is true (an event: a file appears, a key state, a log line),
    polling; fails naming `what` after `timeout` seconds, which should be generous: the machine
    may be loaded. Returns the predicate's value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Volume:
    """A store, its mountpoint and key, and the running daemon (if mounted)."""

    def __init__(self, binary: Path, root: Path, key_file: Path, extent_size: int | None = None,
                 create: bool = True, store: Path | None = None):
        self.binary = binary
        self.root = root
        self.store = store or root / "store"
        self.mnt = root / "mnt"
        self.key_file = key_file
        self.extent_size = extent_size or 4096
        self.pids: list[int] = []
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.policy = None
        if not create:
            return
        args = [binary, "init", self.store, "--key-file", key_file]
        if extent_size is not None:
            args += ["--extent-size", str(extent_size)]
        out = run(*args).stdout
        assert "Created store" in out and "root policy" in out, out
        self.policy = out.strip().rsplit(" ", 1)[-1]

    @classmethod
    def copy_of(cls, other: Volume, root: Path) -> Volume:
        """A Volume over a copy (`cp -a`, xattrs included) of other's unmounted store, at
        root/store, with the same key; not mounted."""
        v = cls(other.binary, root, other.key_file, other.extent_size, create=False)
        run("cp", "-a", other.store, v.store)
        v.policy = other.policy
        return v

    @classmethod
    def golden(cls, binary: Path, root: Path, version: str) -> Volume:
        """A Volume over a copy of the golden store Tests/Golden/<version> (its key: the bytes 1 to
        64), at root/store; not mounted."""
        key = root / "golden.key"
        key.write_bytes(bytes(range(1, 65)))
        v = cls(binary, root, key, create=False)
        shutil.copytree(REPO / "Tests" / "Golden" / version / "store", v.store, symlinks=True)
        return v

    # mounting

    def mount(self, unlock: bool = True, options: str | None = None, *, keyring: bool = False,
              by_key_file: bool = False, env: dict | None = None, timeout: float = 60, args: tuple = ()):
        """Mounts, then adds the key if `unlock`. The daemon loads keys from root's keyring only
        with `keyring` (that keyring holds keys of other users of the machine, which a test daemon
        has no business loading). With `by_key_file` it is unlocked by --key-file alone and the
        keyring is neither read nor changed, so the test cannot disturb (or be disturbed by) others.
        `args` go to `encfsd mount` as they are."""
        assert not is_mounted(self.mnt), f"{self.mnt} already mounted"
        extra = (["-o", options] if options else []) + list(args)
        if not keyring:
            extra.append("--no-keyring")
        if unlock and by_key_file:
            extra += ["--key-file", self.key_file]
        run(self.binary, "mount", self.store, self.mnt, "--log-file", self.root / "daemon.log", *extra,
            env=env, timeout=timeout)
        assert is_mounted(self.mnt), "mount returned but the mountpoint is not in /proc/mounts"
        self.pids = daemon_pids(self.mnt)
        if unlock and not by_key_file:
            self.add_key()
        return self

    def add_key(self, key_file: Path | None = None) -> str:
        out = run(self.binary, "key", "add", self.mnt, "--key-file", key_file or self.key_file).stdout
        assert out.startswith("Added encryption key with identifier "), out
        return out.strip().rsplit(" ", 1)[-1]

    def unmount(self, timeout: float = 20.0):
        """Clean unmount: fusermount3 -u, then wait for the daemon to exit (it may still be
        committing). Raises if anything needed force."""
        pids = self.pids or daemon_pids(self.mnt)
        if is_mounted(self.mnt):
            # Busy can be a passer-by (another test's scan of /proc or /tmp) for a moment.
            deadline = time.monotonic() + 5
            while (r := run("fusermount3", "-u", self.mnt, check=False)).returncode != 0:
                if "busy" not in r.stderr or time.monotonic() > deadline:
                    raise AssertionError(f"fusermount3 -u failed: {r.stderr.strip()}")
                time.sleep(0.1)
        left = wait_pids_gone(pids, timeout)
        self.pids = []
        if left:
            for pid in left:
                _kill(pid)
            raise AssertionError(f"daemon {left} did not exit within {timeout}s of unmount")

    def remount(self, unlock: bool = True):
        self.unmount()
        return self.mount(unlock=unlock)

    def force_cleanup(self) -> list[str]:
        """Best-effort teardown; returns a list of problems found (for reporting)."""
        problems = force_unmount(self.mnt, self.pids)
        self.pids = []
        return problems

    def daemon_log(self) -> str:
        try:
            return (self.root / "daemon.log").read_text(errors="replace")
        except OSError:
            return ""

    # backing-store helpers

    def backing_entries(self, directory: Path | None = None) -> set[str]:
        d = directory or self.store
        return {n for n in os.listdir(d) if n not in STORE_FILES}

    def new_backing(self, directory: Path, action) -> str:
        """Runs action (which creates one object through the mount) and returns the backing
        entry it added to the backing directory `directory`, relative to the store."""
        before = set(os.listdir(directory))
        action()
        added = set(os.listdir(directory)) - before
        assert len(added) == 1, f"expected one new backing entry in {directory}, got {added}"
        return os.path.relpath(directory / added.pop(), self.store)


def made_key_serials(identifiers=None) -> list[str]:
    """Serials of the `encfsd:<identifier>:<nonce>` entries in root's keyring whose identifier is
    one the tests made (default: every one recorded so far)."""
    wanted = made_identifiers if identifiers is None else set(identifiers)
    listed = subprocess.run(["keyctl", "rlist", "@u"], capture_output=True, text=True).stdout.split()
    serials = []
    for serial in listed:
        described = subprocess.run(["keyctl", "rdescribe", serial], capture_output=True, text=True).stdout.strip()
        fields = described.split(";", 4)
        if len(fields) == 5 and fields[0] == "user" and fields[4].startswith("encfsd:"):
            if fields[4].split(":")[1] in wanted:
                serials.append(serial)
    return serials


def purge_test_keys(identifiers=None):
    """Unlinks from root's keyring the entries of keys the tests made, and no other: the machine's
    own keys and other test runs' keys stay."""
    for serial in made_key_serials(identifiers):
        subprocess.run(["keyctl", "unlink", serial, "@u"], capture_output=True)


def _kill(pid: int):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    wait_pids_gone([pid], 5.0)


@pytest.fixture(scope="session")
def encfsd_bin() -> Path:
    binary = _binary()
    if not binary.exists():
        pytest.fail(f"encfsd binary not found at {binary}; build it or set ENCFSD")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is not available")
    return binary


@pytest.fixture(scope="session", autouse=True)
def no_test_key_left():
    """At the end of the run, no key a test made is left in root's keyring."""
    yield
    left = made_key_serials()
    purge_test_keys()
    assert left == [], f"test keys left in root's keyring (now unlinked): {left}"


@pytest.fixture
def key_file(tmp_path, encfsd_bin) -> Path:
    path = tmp_path / "master.key"
    run(encfsd_bin, "key", "generate", "-o", path)
    assert path.stat().st_size == 64
    assert path.stat().st_mode & 0o777 == 0o600
    return path


def _tear_down(volumes: list[Volume], request, purge_keys: bool = True):
    problems = []
    for v in volumes:
        problems += v.force_cleanup()
    if purge_keys:
        purge_test_keys()
    for v in volumes:
        log = v.daemon_log()
        if log.strip():
            # Shown by pytest with -rA or on failure; handy for integrity diagnostics.
            print(f"--- daemon log {v.root} ---\n{log[-4000:]}")
    if problems and not getattr(request.node, "_call_failed", False):
        pytest.fail("teardown: " + "; ".join(problems))


@pytest.fixture
def volumes(request):
    made: list[Volume] = []
    yield made
    # Such volumes are meant to be mounted with by_key_file=True: nothing of theirs is in the keyring.
    _tear_down(made, request, purge_keys=False)


# ENCFSD_TEST_BACKING=bindfs|sshfs|gluster puts every store the fixtures make on that backing
# filesystem (backings.py), set up once for the session; unset, stores are on the local disk.
BACKING = os.environ.get("ENCFSD_TEST_BACKING", "")


@pytest.fixture(scope="session")
def backing_root(tmp_path_factory):
    """Where make_volume puts stores: None for the local disk, else a directory on the backing."""
    if not BACKING:
        yield None
        return
    import backings
    work = tmp_path_factory.mktemp(f"backing-{BACKING}")
    backing = backings.make(BACKING, work)
    try:
        yield backing.up()
    finally:
        backing.down()


def backing_capabilities(store: Path) -> dict:
    """What `encfsd info` finds of the backing a store is on."""
    import json
    return json.loads(run(_binary(), "info", store, "--json").stdout)["backing"]


@pytest.fixture
def make_volume(tmp_path, encfsd_bin, key_file, request, backing_root):
    volumes: list[Volume] = []

    def make(extent_size: int | None = None, unlock: bool = True, mount: bool = True, name: str | None = None) -> Volume:
        root = tmp_path / (name or f"vol{len(volumes)}")
        root.mkdir()
        store = None
        if backing_root is not None:
            label = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:80]
            store = backing_root / f"{label}-{os.getpid()}-{len(volumes)}-{time.monotonic_ns()}" / "store"
            store.parent.mkdir()
        v = Volume(encfsd_bin, root, key_file, extent_size, store=store)
        volumes.append(v)
        if mount:
            v.mount(unlock=unlock)
        return v

    yield make
    _tear_down(volumes, request)


@pytest.fixture
def volume(make_volume) -> Volume:
    return make_volume()


@pytest.fixture
def mounted(volume):
    return volume.store, volume.mnt


_SUMMARY_LINES = pytest.StashKey[list]()


@contextlib.contextmanager
def loop_ext4(directory: Path, size: int = 256 << 20):
    """A fresh ext4 filesystem (4 KiB blocks) on a loop device, mounted at directory/ext4; the
    mount and the device removed after (the image, directory/ext4.img, stays with directory).
    256-byte inodes, as mkfs gives a filesystem of ordinary size (this one is small enough for
    its 128-byte default), so files have a birth time like on any ext4 a user meets."""
    image = directory / "ext4.img"
    with open(image, "wb") as f:
        f.truncate(size)
    run("mkfs.ext4", "-q", "-F", "-b", "4096", "-I", "256", image)
    device = run("losetup", "--find", "--show", image).stdout.strip()
    mnt = directory / "ext4"
    mnt.mkdir()
    try:
        run("mount", "-t", "ext4", device, mnt)
        try:
            yield mnt
        finally:
            run("umount", mnt, check=False)
    finally:
        run("losetup", "-d", device, check=False)


@pytest.fixture
def ext4_dir(tmp_path):
    """`loop_ext4` in the test's temporary directory."""
    with loop_ext4(tmp_path) as mnt:
        yield mnt


@pytest.fixture
def summary_line(request):
    """summary_line(text): shows text in the terminal summary at the end of the run, whether or
    not output is captured (-q included)."""
    return lambda text: request.config.stash.setdefault(_SUMMARY_LINES, []).append(text)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for text in config.stash.get(_SUMMARY_LINES, []):
        terminalreporter.write_line(text)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.when == "call":
        item._call_failed = rep.failed
    return rep


def expect_errno(expected, fn, *args, **kwargs):
    """Calls fn and asserts it raises OSError with one of the expected errno values."""
    expected = (expected,) if isinstance(expected, int) else tuple(expected)
    try:
        result = fn(*args, **kwargs)
    except OSError as e:
        assert e.errno in expected, (
            f"{getattr(fn, '__name__', fn)}{args}: expected {[errno.errorcode.get(x, x) for x in expected]}, "
            f"got {errno.errorcode.get(e.errno, e.errno)} ({e})")
        return e
    raise AssertionError(
        f"{getattr(fn, '__name__', fn)}{args}: expected {[errno.errorcode.get(x, x) for x in expected]}, "
        f"but it succeeded (returned {result!r:.200})")


def read_range(path: Path, offset: int, count: int) -> bytes:
    """pread loop on a raw descriptor (no Python buffering): bytes up to count or EOF."""
    fd = os.open(path, os.O_RDONLY)
    try:
        out = bytearray()
        while len(out) < count:
            chunk = os.pread(fd, min(count - len(out), 1 << 20), offset + len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


def read_all(path: Path) -> bytes:
    return read_range(path, 0, 1 << 30)


def call_with_timeout(fn, timeout: float):
    """Runs fn in a thread: ("ok", result), ("err", errno) for an OSError, or ("hang", None) if it
    has not returned within timeout seconds (a file system operation that the daemon never
    answers; the thread stays blocked until the daemon is killed). Other exceptions propagate."""
    box = {}

    def target():
        try:
            box["ok"] = fn()
        except OSError as e:
            box["err"] = e.errno
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["exc"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return "hang", None
    if "exc" in box:
        raise box["exc"]
    return ("err", box["err"]) if "err" in box else ("ok", box["ok"])
