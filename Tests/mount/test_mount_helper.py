"""encfsd at home on Linux: mount(8) and fstab through the helper, systemd's fstab units, and
the daemon's log in syslog.

mount(8) only looks for helpers in /sbin, and the daemon logs to /dev/log: rather than touch
the real system, each test runs in a private mount namespace (unshare) where the helper is laid
over /usr/sbin with an overlay, or /dev/log is the test's own socket. A FUSE mount made in there
is invisible outside, so the mount, the I/O and the unmount all run in one script inside it."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import daemon_pids, purge_test_keys, run, wait_pids_gone

GENERATOR = Path("/lib/systemd/system-generators/systemd-fstab-generator")


def in_namespace(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs `script` with sh -eu in a private mount namespace; output captured."""
    return run("unshare", "--mount", "--propagation", "private", "sh", "-euc", script, check=False, timeout=timeout)


def with_helper(tmp: Path, binary: Path | None, link_name: str = "mount.fuse.encfsd", over: str = "/usr/sbin") -> str:
    """Script lines that lay `link_name` -> binary over `over` (an overlay on a tmpfs); with no
    binary, hide `link_name` there instead (an overlay whiteout), e.g. an installed helper."""
    layer = tmp / ("layer" + over.replace("/", "-"))
    layer.mkdir(exist_ok=True)
    entry = f"ln -s {binary} {layer}/up/{link_name}" if binary else f"mknod {layer}/up/{link_name} c 0 0"
    return f"""
mount -t tmpfs tmpfs {layer}
mkdir {layer}/up {layer}/work
{entry}
mount -t overlay overlay -o lowerdir={over},upperdir={layer}/up,workdir={layer}/work {over}
"""


@pytest.fixture
def store(tmp_path, encfsd_bin, key_file):
    """An initialised store and an empty mountpoint; any daemon left serving it is killed."""
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    run(encfsd_bin, "init", store, "--key-file", key_file)
    yield store, mnt
    left = wait_pids_gone(daemon_pids(mnt), 20)
    for pid in left:
        os.kill(pid, 9)
    purge_test_keys()
    assert not left, f"daemon {left} still serving after the test's unmount"


def round_trip(store: Path, mnt: Path, mount_command: str) -> str:
    """Mount with `mount_command`, write and read back a file, check mountinfo, umount(8)."""
    return f"""
{mount_command}
grep -q " {mnt} .* - fuse.encfsd {store} " /proc/self/mountinfo
echo "written through mount(8)" > {mnt}/greeting
cat {mnt}/greeting
umount {mnt}
if grep -q " {mnt} " /proc/self/mountinfo; then echo "still mounted"; exit 1; fi
"""


def test_mount_t_fuse_encfsd(tmp_path, encfsd_bin, key_file, store):
    store, mnt = store
    log = tmp_path / "daemon.log"
    options = f"allow_other,nofail,x-systemd.automount,_netdev,noauto,defaults,key_file={key_file},threads=4,log_file={log}"
    r = in_namespace(with_helper(tmp_path, encfsd_bin)
                     + round_trip(store, mnt, f"mount -t fuse.encfsd {store} {mnt} -o {options}"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "written through mount(8)" in r.stdout
    # log_file= reached the daemon, and so did key_file= (the greeting could be written).
    assert f"mounted {store} on {mnt}" in log.read_text()


def test_fstab_line(tmp_path, encfsd_bin, key_file, store):
    store, mnt = store
    # A key file whose path has a space, as fstab(5) spells it: \040.
    spaced = tmp_path / "my keys"
    spaced.mkdir()
    shutil.copy(key_file, spaced / "vault.key")
    fstab = tmp_path / "fstab"
    escaped = str(spaced / "vault.key").replace(" ", "\\040")
    fstab.write_text(f"# encfsd\n{store} {mnt} fuse.encfsd allow_other,nofail,x-systemd.automount,key_file={escaped} 0 0\n")
    r = in_namespace(with_helper(tmp_path, encfsd_bin)
                     + round_trip(store, mnt, f"mount --fstab {fstab} {mnt}"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "written through mount(8)" in r.stdout


def test_through_mount_fuse3(tmp_path, encfsd_bin, key_file, store):
    """Without mount.fuse.encfsd, mount(8) runs mount.fuse3, which runs `encfsd STORE DIR -o ...`
    through /bin/sh with the default PATH (mount(8) drops the caller's): encfsd is laid over
    /usr/local/bin, the first directory of that PATH with no encfsd of its own."""
    store, mnt = store
    options = f"nofail,x-systemd.automount,key_file={key_file}"
    r = in_namespace(with_helper(tmp_path, encfsd_bin, link_name="encfsd", over="/usr/local/bin")
                     + with_helper(tmp_path, None)  # an installed mount.fuse.encfsd would be used first
                     + f"test ! -e /sbin/mount.fuse.encfsd\n"
                     + round_trip(store, mnt, f"mount -t fuse.encfsd {store} {mnt} -o {options}"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "written through mount(8)" in r.stdout


@pytest.mark.parametrize("options, expect", [
    ("frobnicate", "unknown mount option frobnicate"),
    ("threads=many", "bad value in mount option threads=many"),
    ("threads=0", "bad value in mount option threads=0"),
    ("read_ahead_kb=lots", "bad value in mount option read_ahead_kb=lots"),
    ("idle=10x", "bad value in mount option idle=10x"),
    ("idle=-5s", "bad value in mount option idle=-5s"),
    ("key_file=", "bad value in mount option key_file="),
    ("log_level=loud", "bad value in mount option log_level=loud"),
    ("threads=2,threads=3", "mount option threads given twice"),
    ("allow_other=yes", "unknown mount option allow_other=yes"),
])
def test_bad_options_are_refused_and_change_nothing(tmp_path, encfsd_bin, store, options, expect):
    store, mnt = store
    before = sorted(os.listdir(store))
    r = in_namespace(with_helper(tmp_path, encfsd_bin)
                     + f"if mount -t fuse.encfsd {store} {mnt} -o {options}; then echo MOUNTED; fi\n"
                     + f"grep -q ' {mnt} ' /proc/self/mountinfo && echo MOUNTED || true\n")
    assert "MOUNTED" not in r.stdout, r.stdout + r.stderr
    assert expect in r.stderr, r.stderr
    assert sorted(os.listdir(store)) == before and os.listdir(mnt) == []


def test_helper_flags(tmp_path, encfsd_bin, key_file, store):
    """The helper as libmount runs it: -f (fake) checks and mounts nothing; -s (sloppy) drops
    unknown options; -t must name encfsd; -N is refused."""
    store, mnt = store
    helper = tmp_path / "mount.fuse.encfsd"
    helper.symlink_to(encfsd_bin)
    r = run(helper, store, mnt, "-f", "-o", f"key_file={key_file},frob", "-s", "-t", "fuse.encfsd")
    assert r.returncode == 0 and os.listdir(mnt) == []
    r = run(helper, store, mnt, "-f", "-o", "frob", check=False)
    assert r.returncode == 1 and "unknown mount option frob" in r.stderr
    r = run(helper, store, mnt, "-f", "-t", "fuse.sshfs", check=False)
    assert r.returncode == 1 and "not fuse.encfsd" in r.stderr
    r = run(helper, store, mnt, "-N", "1", check=False)
    assert r.returncode == 1 and "namespace" in r.stderr
    r = run(helper, store, check=False)
    assert r.returncode == 1 and "usage" in r.stderr
    r = run(helper, tmp_path / "nowhere", mnt, check=False)
    assert r.returncode == 32 and "No such file or directory" in r.stderr


def test_fstab_generator_units_verify(tmp_path, key_file):
    """systemd-fstab-generator turns the documented fstab line into units systemd accepts."""
    if not GENERATOR.exists() or shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-fstab-generator or systemd-analyze is not installed (apt-get install systemd)")
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    fstab, out = tmp_path / "fstab", tmp_path / "units"
    out.mkdir()
    fstab.write_text(f"{store} {mnt} fuse.encfsd allow_other,nofail,x-systemd.automount,key_file={key_file} 0 0\n")
    run(GENERATOR, out, out, out, env={**os.environ, "SYSTEMD_FSTAB": str(fstab)})
    unit = run("systemd-escape", "--path", "--suffix=mount", mnt).stdout.strip()
    automount = unit.removesuffix(".mount") + ".automount"
    text = (out / unit).read_text()
    assert "Type=fuse.encfsd" in text and f"What={store}" in text and f"key_file={key_file}" in text
    assert (out / automount).exists() and (out / "local-fs.target.wants" / automount).exists()
    r = run("systemd-analyze", "verify", "--man=no", out / unit, out / automount, check=False, cwd=out)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


def test_background_daemon_logs_to_syslog(tmp_path, encfsd_bin, key_file, store):
    """A background daemon logs to /dev/log as encfsd, facility daemon: here the test's own
    socket, over /dev/log in the namespace. A key added is a notice; a tampered extent read
    back is an error naming the file by its plaintext path and the extent."""
    store, mnt = store
    sock = tmp_path / "log.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock))
    dev = tmp_path / "dev"
    dev.mkdir()
    b, k = shlex.quote(str(encfsd_bin)), shlex.quote(str(key_file))
    script = f"""
mount -t tmpfs tmpfs {dev}
for n in fuse null zero full random urandom; do touch {dev}/$n; mount --bind /dev/$n {dev}/$n; done
touch {dev}/log
mount --bind {sock} {dev}/log
mount --rbind {dev} /dev
{b} mount {store} {mnt} --no-keyring
{b} key add {mnt} --key-file {k}
mkdir {mnt}/notes
head -c 5000 /dev/urandom > {mnt}/notes/plan
umount {mnt}
while grep -q " {mnt} " /proc/self/mountinfo; do sleep 0.1; done
for f in {store}/*/*; do
  case "$f" in */.d) ;; *) printf 'X' | dd of="$f" bs=1 seek=4200 conv=notrunc status=none ;; esac
done
{b} mount {store} {mnt} --no-keyring --key-file {k}
if cat {mnt}/notes/plan > /dev/null 2>&1; then echo "tampered read succeeded"; exit 1; fi
umount {mnt}
"""
    try:
        r = in_namespace(script)
        assert r.returncode == 0, r.stdout + r.stderr
        listener.settimeout(10)
        messages = []
        while not any("integrity failure" in m for m in messages):
            messages.append(listener.recv(8192).decode(errors="replace"))
    finally:
        listener.close()
    entries = []
    for m in messages:
        priority, rest = m[1:].split(">", 1)
        entries.append((int(priority) >> 3, int(priority) & 7, rest))
    daemon_facility, notice, err = 3, 5, 3
    assert all(facility == daemon_facility and " encfsd[" in rest for facility, _, rest in entries), entries
    added = [rest for _, severity, rest in entries if "added by uid 0" in rest]
    assert added and all(severity == notice for _, severity, rest in entries if "added by uid 0" in rest), entries
    [integrity] = [(severity, rest) for _, severity, rest in entries if "integrity failure" in rest]
    assert integrity[0] == err, entries
    assert "(/notes/plan)" in integrity[1] and "extent 0 failed authentication" in integrity[1], integrity
