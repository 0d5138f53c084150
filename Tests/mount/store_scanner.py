"""An independent reader of the store format (docs/FORMAT.md), written from the document alone:
it verifies every header MAC, extent, entry name, xattr and xattr side object of a store under
the keys it is given, and reports what is sealed under which key. The rekey tests use it to show that no
byte of the backing store is still sealed under a removed key."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV


def expand(key: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(b"\0" * 64, key, hashlib.sha512).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha512).digest()[:length]


def info(context: int, data: bytes = b"") -> bytes:
    return b"fscrypt\0" + bytes([context]) + data


def identifier(key: bytes) -> str:
    return expand(key, info(0x01), 16).hex()


def b64decode(name: str) -> bytes:
    return base64.urlsafe_b64decode(name + "=" * (-len(name) % 4))


@dataclass
class Header:
    version: int
    type: int
    size: int
    extent_size: int
    object_id: bytes
    policy: str
    mac_policy: str
    previous_policy: str | None
    holes: list[tuple[int, int]]
    legacy: list[tuple[int, int]]
    bindings: list[tuple[bytes, bytes]]
    body: bytes
    mac: bytes
    xattr_generation: int = 0
    # flags bit 1 (FORMAT.md 16.4): each extent's IV has its last byte XORed with i mod 16.
    key_groups: bool = False


def parse_slot(slot: bytes) -> Header | None:
    if slot == b"\0" * 2048:
        return None
    length = struct.unpack_from("<H", slot, 6)[0]
    if length < 112 or length + 40 > 2048:
        return None
    body, mac, check = slot[:length], slot[length:length + 32], slot[length + 32:length + 40]
    if hashlib.sha256(body + mac).digest()[:8] != check:
        return None
    version, = struct.unpack_from("<H", body, 4)
    sequence, = struct.unpack_from("<Q", body, 8)
    kind = body[20]
    extent_size, = struct.unpack_from("<I", body, 36)
    size, = struct.unpack_from("<Q", body, 48)
    oid, policy, mac_policy = body[56:72], body[72:88], body[88:104]
    holes_n, bindings_n = struct.unpack_from("<HH", body, 104)
    at, legacy_n, previous = 112, 0, None
    if version >= 2:
        legacy_n, = struct.unpack_from("<H", body, 108)
        prev = body[120:136]
        previous = prev.hex() if any(prev) else None
        at = 144 if version == 2 else 176
    holes, legacy, bindings = [], [], []
    for _ in range(holes_n):
        holes.append(struct.unpack_from("<QQ", body, at))
        at += 16
    for _ in range(legacy_n):
        legacy.append(struct.unpack_from("<QQ", body, at))
        at += 16
    for _ in range(bindings_n):
        digest = body[at:at + 16]
        n, = struct.unpack_from("<H", body, at + 16)
        bindings.append((digest, body[at + 18:at + 18 + n]))
        at += 18 + n
    h = Header(version, kind, size, extent_size, oid, policy.hex(), mac_policy.hex(), previous, holes, legacy,
               bindings, body, mac)
    h.sequence = sequence
    h.key_groups = bool(struct.unpack_from("<I", body, 16)[0] & 2)
    if version >= 3:
        h.xattr_generation, = struct.unpack_from("<Q", body, 160)
    return h


def open_side_object(image: bytes, key: bytes, object_id: bytes, generation: int) -> dict[bytes, bytes]:
    """FORMAT.md 16: "EFX3" || nonce || AES-256-GCM(HKDF 0x84 || nonce) with AD
    "encfsd xattr side object" || object ID || u64 generation, over the sorted records."""
    if image[:4] != b"EFX3":
        raise ValueError("bad magic")
    nonce = image[4:20]
    okm = expand(key, info(0x84, nonce), 44)
    plain = AESGCM(okm[:32]).decrypt(okm[32:44], image[20:], b"encfsd xattr side object" + object_id + struct.pack("<Q", generation))
    count, = struct.unpack_from("<I", plain, 0)
    at, out = 4, {}
    for _ in range(count):
        n = plain[at]
        name = plain[at + 1:at + 1 + n]
        length, = struct.unpack_from("<I", plain, at + 1 + n)
        out[name] = plain[at + 5 + n:at + 5 + n + length]
        at += 5 + n + length
    if at != len(plain):
        raise ValueError("trailing bytes")
    return out


def in_ranges(ranges, index: int) -> bool:
    return any(start <= index < start + count for start, count in ranges)


@dataclass
class Report:
    """What the scan found: items verified per key identifier, and problems."""
    sealed: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    objects: int = 0

    def count(self, policy: str):
        self.sealed[policy] = self.sealed.get(policy, 0) + 1


class Scanner:
    def __init__(self, keys: list[bytes]):
        self.keys = {identifier(k): k for k in keys}
        self.report = Report()

    def key(self, policy: str, what: str) -> bytes | None:
        k = self.keys.get(policy)
        if k is None:
            self.report.problems.append(f"{what}: sealed under {policy}, a key not given")
        else:
            self.report.count(policy)
        return k

    def header(self, region: bytes, what: str) -> Header | None:
        slots = [parse_slot(region[0:2048]), parse_slot(region[2048:4096])]
        slots = [s for s in slots if s is not None]
        if not slots:
            self.report.problems.append(f"{what}: no intact header slot")
            return None
        h = max(slots, key=lambda s: s.sequence)
        k = self.key(h.mac_policy, f"{what} header")
        if k is not None:
            mac = hmac.new(expand(k, info(0x81, h.object_id), 32), h.body, hashlib.sha256).digest()
            if not hmac.compare_digest(mac, h.mac):
                self.report.problems.append(f"{what}: header MAC fails under {h.mac_policy}")
        if h.previous_policy is not None:
            self.report.problems.append(f"{what}: header still names previous policy {h.previous_policy}")
        return h

    def xattrs(self, path: Path, h: Header, what: str):
        if h.xattr_generation:
            side = f"{h.object_id.hex()}.{h.xattr_generation:016x}"
            self.side_named.add(side)
            k = self.key(h.policy, f"{what} xattr side object")
            if k is not None:
                try:
                    open_side_object((self.store / ".xattrs" / side).read_bytes(), k, h.object_id, h.xattr_generation)
                except Exception as e:
                    self.report.problems.append(f"{what}: xattr side object {side} does not open under {h.policy}: {e!r}")
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError:  # a backing without xattrs (sshfs): all of them are in side objects
            names = []
        for name in names:
            if not name.startswith("user.encfsd."):
                continue
            k = self.key(h.policy, f"{what} xattr")
            if k is None:
                continue
            siv = AESSIV(expand(k, info(0x83), 96)[:64])
            try:
                siv.decrypt(os.getxattr(path, name, follow_symlinks=False), [h.object_id + name.encode()])
            except Exception:
                self.report.problems.append(f"{what}: xattr {name} does not open under {h.policy}")

    def extents(self, path: Path, h: Header, what: str):
        if h.type not in (1, 3) or h.size == 0:
            return
        e = h.extent_size
        with open(path, "rb") as f:
            for i in range((h.size + e - 1) // e):
                if in_ranges(h.holes, i):
                    continue
                if in_ranges(h.legacy, i):
                    self.report.problems.append(f"{what}: extent {i} in a legacy range")
                k = self.key(h.policy, f"{what} extent {i}")
                if k is None:
                    continue
                length = min(e, h.size - i * e)
                f.seek(4096 + i * (e + 32))
                stored = f.read(length + 32)
                okm = expand(k, info(0x80, stored[:16]), 44)
                iv = bytearray(okm[32:44])
                if h.key_groups:
                    iv[11] ^= i % 16
                ad = h.object_id + struct.pack("<QI", i, length)
                try:
                    AESGCM(okm[:32]).decrypt(bytes(iv), stored[16:], ad)
                except Exception:
                    self.report.problems.append(f"{what}: extent {i} does not open under {h.policy}")

    def directory(self, path: Path, h: Header, what: str):
        for name in sorted(os.listdir(path)):
            child = path / name
            if "." in name:  # not an entry (FORMAT.md 2.5): encfsd.conf, .d, .journal, ...
                continue
            region = (child / ".d").read_bytes() if child.is_dir() else child.read_bytes()[:4096]
            ch = self.header(region, f"{what}/{name}")
            self.report.objects += 1
            if ch is None:
                continue
            k = self.key(h.policy, f"{what}/{name} name")
            if k is not None:
                if name.startswith("~"):
                    digest = hashlib.sha256(b"encfsd-binding" + h.object_id + name.encode()).digest()[:16]
                    sealed = next((long for d, long in ch.bindings if d == digest), b"")
                else:
                    sealed = b64decode(name)
                try:
                    AESSIV(expand(k, info(0x82), 64)).decrypt(sealed, [h.object_id])
                except Exception:
                    self.report.problems.append(f"{what}/{name}: name does not open under {h.policy}")
            self.xattrs(child, ch, f"{what}/{name}")
            if child.is_dir():
                self.directory(child, ch, f"{what}/{name}")
            else:
                self.extents(child, ch, f"{what}/{name}")

    def scan(self, store: Path) -> Report:
        self.store, self.side_named = store, set()
        h = self.header((store / ".d").read_bytes(), "/")
        if h is not None:
            self.xattrs(store, h, "/")
            self.directory(store, h, "")
        # A side object no header names is garbage nobody reads, but its bytes are still in the
        # store: it must not be sealed under a key that was not given (a removed one).
        side_dir = store / ".xattrs"
        for name in sorted(os.listdir(side_dir)) if side_dir.is_dir() else []:
            if name in self.side_named:
                continue
            oid, _, gen = name.partition(".")
            image = (side_dir / name).read_bytes()
            for policy, k in self.keys.items():
                try:
                    open_side_object(image, k, bytes.fromhex(oid), int(gen, 16))
                    self.report.count(policy)
                    break
                except Exception:
                    continue
            else:
                self.report.problems.append(f".xattrs/{name}: named by no header and sealed under no key given")
        return self.report
