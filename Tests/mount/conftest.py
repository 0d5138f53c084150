"""Shared fixtures for the real-mount tests of encfsd.

These tests mount real FUSE file systems, so they need /dev/fuse, fusermount3 and (for
most of them) root. The daemon binary comes from $ENCFSD, default <repo>/.build/debug/encfsd.

Fixtures:
  encfsd_bin   path to the binary (session)
  key_file     a freshly generated 64-byte key file
  make_volume  factory: make_volume(extent_size=None, unlocked=True) -> Volume, mounted
  volume       a mounted, unlocked Volume with the default extent size
  mounted      (store, mnt) of `volume`
  volumes      a list: every Volume a test appends (e.g. Volume.copy_of(...)) is torn down too
Every Volume created through these fixtures is unmounted in teardown, even when the test
fails: fusermount3 -u, then umount -l, then SIGKILL of any daemon still serving it.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENOKEY = getattr(errno, "ENOKEY", 126)
# What encfsd keeps at a store's top besides the root's entries (.d is also in every directory).
STORE_FILES = {".d", "encfsd.conf", ".journal", "encfsd.lock"}


def _binary() -> Path:
    return Path(os.environ.get("ENCFSD", str(REPO / ".build" / "debug" / "encfsd")))


def run(*args, check=True, timeout=60, **kwargs) -> subprocess.CompletedProcess:
    """Runs a command, capturing text output; on failure the output is in the exception."""
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)
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


class Volume:
    """A store, its mountpoint and key, and the running daemon (if mounted)."""

    def __init__(self, binary: Path, root: Path, key_file: Path, extent_size: int | None = None,
                 create: bool = True):
        self.binary = binary
        self.root = root
        self.store = root / "store"
        self.mnt = root / "mnt"
        self.key_file = key_file
        self.extent_size = extent_size or 16384
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

    # mounting

    def mount(self, unlock: bool = True, options: str | None = None, *, keyring: bool = True,
              env: dict | None = None, timeout: float = 60):
        """Mounts. With keyring=False the daemon neither reads nor changes the user keyring: it
        is unlocked by --key-file alone, so the test cannot disturb (or be disturbed by) others."""
        assert not is_mounted(self.mnt), f"{self.mnt} already mounted"
        extra = ["-o", options] if options else []
        if not unlock or not keyring:
            # The key this test added sits in root's keyring; a locked mount must not use it.
            extra.append("--no-keyring")
        if unlock and not keyring:
            extra += ["--key-file", self.key_file]
        run(self.binary, "mount", self.store, self.mnt, "--log-file", self.root / "daemon.log", *extra,
            env=env, timeout=timeout)
        assert is_mounted(self.mnt), "mount returned but the mountpoint is not in /proc/mounts"
        self.pids = daemon_pids(self.mnt)
        if unlock and keyring:
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
        problems = []
        pids = set(self.pids) | set(daemon_pids(self.mnt))
        if is_mounted(self.mnt):
            r = run("fusermount3", "-u", self.mnt, check=False)
            if r.returncode != 0:
                problems.append(f"fusermount3 -u: {r.stderr.strip()}")
                run("umount", "-l", self.mnt, check=False)
                if is_mounted(self.mnt):
                    run("fusermount3", "-uz", self.mnt, check=False)
        left = wait_pids_gone(pids, 10.0)
        for pid in left:
            problems.append(f"daemon {pid} still alive after unmount; killed")
            _kill(pid)
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


def purge_encfsd_keys():
    """Unlinks every encfsd: key from the user keyring, so tests do not unlock each other."""
    listed = subprocess.run(["keyctl", "rlist", "@u"], capture_output=True, text=True).stdout.split()
    for serial in listed:
        described = subprocess.run(["keyctl", "rdescribe", serial], capture_output=True, text=True).stdout
        if described.startswith("user;") and ";encfsd:" in described:
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
        purge_encfsd_keys()
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
    # Such volumes are meant to be mounted with keyring=False: nothing of theirs is in the keyring.
    _tear_down(made, request, purge_keys=False)


@pytest.fixture
def make_volume(tmp_path, encfsd_bin, key_file, request):
    volumes: list[Volume] = []

    def make(extent_size: int | None = None, unlock: bool = True, mount: bool = True, name: str | None = None) -> Volume:
        root = tmp_path / (name or f"vol{len(volumes)}")
        root.mkdir()
        v = Volume(encfsd_bin, root, key_file, extent_size)
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
