"""Backing filesystems for stores that are not on a local disk, each set up from Debian packages
and torn down again, for the mount tests (ENCFSD_TEST_BACKING, conftest.py), the failover test and
`scripts/bench.sh --backing`:

  bindfs   a FUSE passthrough (no O_TMPFILE, no rename flags) over a directory of the host
  sshfs    sftp to an sshd of the test's own on 127.0.0.1 (a free port, its own host key and
           config, key-based login as root), stopped again at the end
  gluster  a GlusterFS volume: glusterd and its one brick in a network namespace made for it
           (glusterd refuses loopback brick hosts), joined to this host by a veth pair with a /30
           of 10.213.0.0/16 used only between the two; the volume is mounted with the FUSE client
           from the main namespace, and more client mounts can be added (failover)

Everything lives under one work directory. Every process started here is stopped by its pid;
nothing else is touched. As a script (for shell callers):

  python3 backings.py up KIND WORKDIR     prints the directory to put stores in
  python3 backings.py down WORKDIR
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

KINDS = ("bindfs", "sshfs", "gluster")


def _run(*args, check=True, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    argv = [str(a) for a in args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    return result


def _mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f if len(line.split()) > 1)


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _unmount(path: Path):
    if not _mounted(path):
        return
    if _run("umount", path, check=False).returncode != 0:
        _run("umount", "-l", path, check=False)


def _stop(pid: int, timeout: float = 10):
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # A child of ours that exited is a zombie until reaped.
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Backing:
    """One backing filesystem under `work`; `root` is where stores go once the subclass's `up()`
    returned, and `down()` undoes whatever of `up()` was done (it is safe after a failed `up`)."""

    kind = ""

    def __init__(self, work: Path):
        self.work = Path(work)
        self.root = self.work / "mnt"
        self.state: dict = {"kind": self.kind}

    def save(self):
        (self.work / "backing.json").write_text(json.dumps(self.state))


class Bindfs(Backing):
    kind = "bindfs"

    def up(self) -> Path:
        source = self.work / "source"
        source.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        # libfuse's path-based nodes cache attributes per name: a hard link made through one
        # name would show the old link count through the other until the cache timed out.
        _run("bindfs", "-o", "attr_timeout=0", source, self.root)
        self.state["mounts"] = [str(self.root)]
        self.save()
        return self.root

    def down(self):
        for m in self.state.get("mounts", [str(self.root)]):
            _unmount(Path(m))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sshfs(Backing):
    """sftp to a private sshd on 127.0.0.1, served by internal-sftp (which has the fsync and
    hardlink extensions sshfs uses for fsync and link). Mounted with noforget, so the inode
    number libfuse gives a path stays while the mount lasts, and without sshfs's
    directory and attribute caches (dir_cache=no, attr_timeout=0), which would show a hard
    link's old link count and stale sizes through other names."""

    kind = "sshfs"

    def up(self) -> Path:
        ssh = self.work / "ssh"
        export = self.work / "export"
        for d in (ssh, export, self.root):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(ssh, 0o700)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", ssh / "host_key")
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", ssh / "client_key")
        (ssh / "authorized_keys").write_text((ssh / "client_key.pub").read_text())
        port = _free_port()
        (ssh / "sshd_config").write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {ssh / 'host_key'}\n"
            f"PidFile {ssh / 'sshd.pid'}\nAuthorizedKeysFile {ssh / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nSubsystem sftp internal-sftp\n")
        log = open(ssh / "sshd.log", "w")
        sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(ssh / "sshd_config")], stdout=log, stderr=log)
        self.state.update(sshd=sshd.pid, port=port, mounts=[])
        self.save()

        def listening():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        _wait(listening, 20, "sshd to listen")
        _run("sshfs", "-p", port, "-o", f"IdentityFile={ssh / 'client_key'},StrictHostKeyChecking=no,"
             "UserKnownHostsFile=/dev/null,BatchMode=yes,noforget,dir_cache=no,attr_timeout=0",
             f"root@127.0.0.1:{export}", self.root)
        self.state["mounts"] = [str(self.root)]
        self.save()
        return self.root

    def down(self):
        for m in self.state.get("mounts", []):
            _unmount(Path(m))
        if self.state.get("sshd"):
            _stop(self.state["sshd"])


class Gluster(Backing):
    """A one-brick GlusterFS volume served from a network namespace of its own."""

    kind = "gluster"
    volume = "encfsd"

    def _ns(self, *args, **kwargs):
        return _run("ip", "netns", "exec", self.state["netns"], *args, **kwargs)

    def cli(self, *args, **kwargs):
        return self._ns("gluster", f"--glusterd-sock={self.work / 'glusterd.socket'}", "--mode=script", *args, **kwargs)

    def _pick_subnet(self) -> int:
        taken = _run("ip", "-o", "addr").stdout
        for _ in range(100):
            n = random.randrange(0, 16384)  # a /30 of 10.213.0.0/16
            if f"10.213.{n // 64}.{(n % 64) * 4 + 1}/" not in taken:
                return n
        raise RuntimeError("no free /30 in 10.213.0.0/16")

    def up(self) -> Path:
        tag = f"{os.getpid() % 100000}{random.randrange(100):02d}"
        n = self._pick_subnet()
        self.host_address = f"10.213.{n // 64}.{(n % 64) * 4 + 1}"
        self.server = f"10.213.{n // 64}.{(n % 64) * 4 + 2}"
        self.state.update(netns=f"encfsd-gl{tag}", veth=f"encgl{tag}", server=self.server, mounts=[])
        self.save()
        ns, veth = self.state["netns"], self.state["veth"]
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "p")
        _run("ip", "link", "set", veth + "p", "netns", ns)
        _run("ip", "addr", "add", f"{self.host_address}/30", "dev", veth)
        _run("ip", "link", "set", veth, "up")
        self._ns("ip", "addr", "add", f"{self.server}/30", "dev", veth + "p")
        self._ns("ip", "link", "set", veth + "p", "up")
        self._ns("ip", "link", "set", "lo", "up")
        for d in ("glusterd", "brick", "log"):
            (self.work / d).mkdir(parents=True, exist_ok=True)
        volfile = self.work / "glusterd.vol"
        volfile.write_text(
            "volume management\n    type mgmt/glusterd\n"
            f"    option working-directory {self.work / 'glusterd'}\n"
            "    option transport-type socket\n    option transport.socket.listen-port 24007\n"
            f"    option transport.socket.bind-address {self.server}\n"
            f"    option glusterd-sockfile {self.work / 'glusterd.socket'}\n"
            "    option ping-timeout 0\n    option event-threads 1\n    option max-port 60999\nend-volume\n")
        self._ns("glusterd", "-f", volfile, "-p", self.work / "glusterd.pid", "-l", self.work / "log" / "glusterd.log")
        _wait(lambda: self.cli("volume", "list", check=False).returncode == 0, 60, "glusterd")
        self.cli("volume", "create", self.volume, f"{self.server}:{self.work / 'brick'}", "force")
        self.cli("volume", "start", self.volume)
        return self.add_client(self.root)

    def add_client(self, path: Path) -> Path:
        """Another FUSE client mount of the volume (another "host" for the store lock)."""
        path.mkdir(parents=True, exist_ok=True)
        log = self.work / "log" / f"client-{path.name}.log"
        _run("glusterfs", f"--volfile-server={self.state['server']}", f"--volfile-id={self.volume}", f"--log-file={log}", path)
        _wait(lambda: _mounted(path), 30, f"the gluster client mount {path}")
        self.state["mounts"].append(str(path))
        self.save()
        return path

    def drop_client(self, path: Path):
        """Drops a client mount at once (lazily: a dead daemon's descriptors may still be closing),
        as a host that goes away does; the server then releases the client's locks."""
        if _mounted(path):
            _run("umount", "-l", path, check=False)
        self.state["mounts"] = [m for m in self.state["mounts"] if m != str(path)]
        self.save()

    def down(self):
        for m in self.state.get("mounts", []):
            _unmount(Path(m))
        ns = self.state.get("netns")
        if ns and Path(f"/run/netns/{ns}").exists():
            self.cli("volume", "stop", self.volume, "force", check=False, timeout=60)
            # Only the processes in the namespace made here: glusterd and its brick.
            for pid in _run("ip", "netns", "pids", ns, check=False).stdout.split():
                _stop(int(pid))
            _run("ip", "netns", "del", ns, check=False)
        if self.state.get("veth"):
            _run("ip", "link", "del", self.state["veth"], check=False)


def make(kind: str, work: Path) -> Backing:
    return {"bindfs": Bindfs, "sshfs": Sshfs, "gluster": Gluster}[kind](work)


def load(work: Path) -> Backing:
    state = json.loads((Path(work) / "backing.json").read_text())
    backing = make(state["kind"], Path(work))
    backing.state = state
    return backing


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[1] == "up" and argv[2] in KINDS:
        work = Path(argv[3])
        work.mkdir(parents=True, exist_ok=True)
        backing = make(argv[2], work)
        try:
            print(backing.up())
        except BaseException:
            backing.down()
            raise
        return 0
    if len(argv) == 3 and argv[1] == "down":
        if (Path(argv[2]) / "backing.json").exists():
            load(Path(argv[2])).down()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
