"""Everything written through a mount survives unmount + remount + key add unchanged, and
the backing store leaks neither plaintext names nor plaintext contents."""

from __future__ import annotations

import hashlib
import os
import random
import stat
import uuid
from pathlib import Path

from conftest import STORE_FILES

MiB = 1 << 20
GiB = 1 << 30
SPARSE_SIZE = 10 * GiB


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path, size: int) -> str:
    """sha256 of the contents; for huge (sparse) files only the first and last MiB."""
    with open(path, "rb") as f:
        if size <= 64 * MiB:
            data = f.read()
            assert len(data) == size, f"{path}: read {len(data)} bytes, st_size {size}"
            return sha(data)
        head = f.read(MiB)
        f.seek(size - MiB)
        tail = f.read(MiB)
        assert len(head) == MiB and len(tail) == MiB
        return "head:" + sha(head) + ",tail:" + sha(tail)


def snapshot(root: Path) -> dict:
    """Every observable property of the tree under root, keyed by relative path."""
    entries = {}
    inode_groups: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        names = dirnames + filenames
        if dirpath == str(root):
            names = names + ["."]
        for name in names:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            info = {
                "type": stat.S_IFMT(st.st_mode),
                "mode": stat.S_IMODE(st.st_mode),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "nlink": st.st_nlink,
            }
            if stat.S_ISLNK(st.st_mode):
                info["target"] = os.readlink(path)
            else:
                info["xattrs"] = {n: os.getxattr(path, n, follow_symlinks=False)
                                  for n in sorted(os.listxattr(path, follow_symlinks=False))}
            if stat.S_ISREG(st.st_mode):
                info["sha256"] = file_digest(path, st.st_size)
                inode_groups.setdefault(st.st_ino, []).append(rel)
            entries[rel] = info
    links = sorted(sorted(g) for g in inode_groups.values() if len(g) > 1)
    return {"entries": entries, "hardlink_groups": links}


def compare_snapshots(before: dict, after: dict):
    problems = []
    b, a = before["entries"], after["entries"]
    for rel in sorted(set(b) | set(a)):
        if rel not in a:
            problems.append(f"{rel}: missing after remount")
        elif rel not in b:
            problems.append(f"{rel}: appeared after remount")
        else:
            for k in sorted(set(b[rel]) | set(a[rel])):
                if b[rel].get(k) != a[rel].get(k):
                    bv, av = repr(b[rel].get(k)), repr(a[rel].get(k))
                    problems.append(f"{rel}: {k} was {bv:.120} now {av:.120}")
    if before["hardlink_groups"] != after["hardlink_groups"]:
        problems.append(f"hard link groups were {before['hardlink_groups']} now {after['hardlink_groups']}")
    assert not problems, "after remount:\n  " + "\n  ".join(problems)


def backing_data(path: Path) -> bytes:
    """The data regions of a (possibly sparse) backing file, concatenated."""
    chunks = []
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break  # ENXIO: no more data
            end = os.lseek(fd, start, os.SEEK_HOLE)
            f.seek(start)
            remaining = end - start
            while remaining > 0:
                chunk = f.read(min(remaining, 64 * MiB))
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
            offset = end
    return b"".join(chunks)


def populate(mnt: Path, rng: random.Random, marker: bytes) -> dict:
    """Creates the test tree; returns plaintext secrets that must not appear in the store."""
    names = []
    contents = {}

    files = mnt / "regular-files-directory"
    files.mkdir()
    names.append("regular-files-directory")
    for size in (0, 1, 4095, 4096, 4097, MiB + 1):
        name = f"plaintext-file-of-size-{size}"
        data = rng.randbytes(size)
        with open(files / name, "wb") as f:
            f.write(data)
        names.append(name)
        contents[files / name] = data

    # A sparse 10 GiB file with 1 MiB of data at its very end.
    sparse_tail = rng.randbytes(MiB)
    with open(mnt / "sparse-ten-gibibytes", "wb") as f:
        f.seek(SPARSE_SIZE - MiB)
        f.write(sparse_tail)
    names.append("sparse-ten-gibibytes")
    st = os.stat(mnt / "sparse-ten-gibibytes")
    assert st.st_size == SPARSE_SIZE
    with open(mnt / "sparse-ten-gibibytes", "rb") as f:
        assert f.read(MiB) == bytes(MiB), "start of a sparse file must read as zeros"
        f.seek(SPARSE_SIZE - MiB)
        assert f.read(MiB) == sparse_tail
        assert f.read(1) == b""

    # Distinctive content that must never reach the store in the clear.
    with open(mnt / "marker-content-file", "wb") as f:
        f.write((marker * (64 * 1024 // len(marker) + 1))[: 64 * 1024])
    names.append("marker-content-file")

    long_name = "L" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(253)) + "Z"
    assert len(long_name.encode()) == 255
    with open(mnt / long_name, "wb") as f:
        f.write(b"contents of the file with a 255-byte name\n")
    names.append(long_name)

    target = "a/" * 2000
    assert len(target) == 4000
    os.symlink(target, mnt / "symlink-with-long-target")
    names.append("symlink-with-long-target")
    os.symlink("regular-files-directory/plaintext-file-of-size-1", mnt / "symlink-short-target")
    names.append("symlink-short-target")
    assert os.readlink(mnt / "symlink-with-long-target") == target

    odd = mnt / "directory-with-odd-mode"
    odd.mkdir()
    (odd / "nested-directory-inside").mkdir()
    with open(odd / "file-inside-odd-directory", "wb") as f:
        f.write(b"inside the odd directory\n")
    names += ["directory-with-odd-mode", "nested-directory-inside", "file-inside-odd-directory"]
    os.chmod(odd / "nested-directory-inside", 0o700)
    os.chmod(odd, 0o151)
    assert stat.S_IMODE(os.stat(odd).st_mode) == 0o151

    with open(mnt / "hardlink-first-name", "wb") as f:
        f.write(b"hard linked content\n")
    os.link(mnt / "hardlink-first-name", files / "hardlink-second-name")
    names += ["hardlink-first-name", "hardlink-second-name"]
    s1, s2 = os.stat(mnt / "hardlink-first-name"), os.stat(files / "hardlink-second-name")
    assert s1.st_nlink == 2 and s2.st_nlink == 2, (s1.st_nlink, s2.st_nlink)
    assert s1.st_ino == s2.st_ino

    os.mkfifo(mnt / "named-pipe-fifo", 0o640)
    names.append("named-pipe-fifo")
    assert stat.S_ISFIFO(os.lstat(mnt / "named-pipe-fifo").st_mode)

    os.setxattr(mnt / "hardlink-first-name", "user.test", b"xattr value on a file")
    # (xattrs on directories are covered by test_directory_xattrs, so a failure there does
    # not hide everything else this test checks)
    os.setxattr(files / "plaintext-file-of-size-0", "user.empty", b"")
    os.setxattr(files / "plaintext-file-of-size-1", "user.binary", bytes(range(256)))
    assert os.getxattr(mnt / "hardlink-first-name", "user.test") == b"xattr value on a file"

    os.chmod(files / "plaintext-file-of-size-4095", 0o4751)
    os.chmod(files / "plaintext-file-of-size-4097", 0o000)
    os.chown(files / "plaintext-file-of-size-4096", 1234, 5678)

    # Specific timestamps, set last so nothing else disturbs them.
    os.utime(files / "plaintext-file-of-size-4096", ns=(1_000_000_123, 1_234_567_890_123_456_789))
    os.utime(mnt / "named-pipe-fifo", ns=(5, 946_684_800_000_000_000))
    os.utime(files, ns=(7, 1_500_000_000_999_999_999))

    for path, data in contents.items():
        with open(path, "rb") as f:
            assert f.read() == data, f"{path} reads back differently before remount"

    return {"names": names, "marker": marker}


def test_roundtrip_survives_remount(make_volume):
    v = make_volume()
    rng = random.Random(20240601)
    marker = f"ENCFSD-PLAINTEXT-MARKER-{uuid.uuid4().hex}|".encode()
    secrets = populate(v.mnt, rng, marker)

    before = snapshot(v.mnt)
    v.remount()
    after = snapshot(v.mnt)
    compare_snapshots(before, after)

    # Twice: a second remount also catches state that was only right in memory the first time.
    v.remount()
    compare_snapshots(before, snapshot(v.mnt))

    v.unmount()
    leaks = []
    for dirpath, dirnames, filenames in os.walk(v.store):
        for name in dirnames + filenames:
            for secret in secrets["names"]:
                if secret in name:
                    leaks.append(f"backing name {name!r} contains plaintext name {secret!r}")
        for name in filenames:
            data = backing_data(Path(dirpath) / name)
            for secret in secrets["names"]:
                if secret.encode() in data:
                    leaks.append(f"backing file {Path(dirpath, name).relative_to(v.store)} contains name {secret!r}")
            if marker in data or marker[:24] in data:
                leaks.append(f"backing file {Path(dirpath, name).relative_to(v.store)} contains the content marker")
            if b"a/a/a/a/a/a/a/a/a/a/a/a/" in data:
                leaks.append(f"backing file {Path(dirpath, name).relative_to(v.store)} contains the symlink target")
    assert not leaks, "\n".join(leaks)


def test_backing_names_look_encrypted(make_volume):
    """Backing entry names are base64url (or ~ + 43 base64url chars for long names)."""
    import re
    v = make_volume()
    (v.mnt / "short").write_bytes(b"x")
    (v.mnt / ("n" * 255)).write_bytes(b"y")
    (v.mnt / "subdirectory").mkdir()
    (v.mnt / "subdirectory" / "inner").write_bytes(b"z")
    v.unmount()
    pattern = re.compile(r"^(~[A-Za-z0-9_-]{43}|[A-Za-z0-9_-]+)$")
    seen = []
    for dirpath, dirnames, filenames in os.walk(v.store):
        for name in dirnames + filenames:
            if name in STORE_FILES and (dirpath == str(v.store) or name == ".d"):
                continue
            seen.append(name)
            assert pattern.match(name), f"backing name {name!r} is not base64url"
    assert len(seen) == 4, seen
    assert any(n.startswith("~") for n in seen), f"the 255-byte name should use the long form: {seen}"


def test_directory_xattrs(make_volume):
    v = make_volume()
    d = v.mnt / "directory-with-xattr"
    d.mkdir()
    os.setxattr(d, "user.test", b"xattr value on a directory")
    os.setxattr(v.mnt, "user.onroot", b"root value")
    assert os.getxattr(d, "user.test") == b"xattr value on a directory"
    assert sorted(os.listxattr(d)) == ["user.test"]
    v.remount()
    assert os.getxattr(d, "user.test") == b"xattr value on a directory"
    assert os.getxattr(v.mnt, "user.onroot") == b"root value"
    os.removexattr(d, "user.test")
    assert os.listxattr(d) == []


def test_mounted_fixture_smoke(mounted):
    store, mnt = mounted
    (mnt / "hello").write_bytes(b"hello world")
    assert (mnt / "hello").read_bytes() == b"hello world"
    assert (store / "encfsd.conf").exists()
