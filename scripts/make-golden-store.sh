#!/usr/bin/env bash
# Writes Tests/Golden/v<N>/store: a store made by this build through a real mount, with the
# fstests test key (bytes 0x01..0x40), and manifest.json describing what it must contain. Run once
# per format version; commit the result; never regenerate an old version's store.
# With "half-rekeyed" as second argument (version 2 on): the same tree, then a rekey of the root to
# a second key (bytes 0x41..0x80) stopped part way by killing the daemon at its second batch, in
# Tests/Golden/v<N>-half-rekeyed, whose manifest names the second key. With "attributes" (version 3
# on): the same tree with inode flags and xattrs, part of them in a side object, in
# Tests/Golden/v<N>-attributes. With "key-groups" (version 3 on, stores with the extent-key-groups
# feature): the same tree and a file of several key groups written in one call, then overwritten in
# part, in Tests/Golden/v<N>-key-groups.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:?usage: make-golden-store.sh FORMAT_VERSION [half-rekeyed]}"
variant="${2:-}"
out="Tests/Golden/v$version${variant:+-$variant}"
[ -e "$out" ] && { echo "$out exists: golden stores are never regenerated" >&2; exit 1; }
swift build 2>&1 | tail -n 1
encfsd="$PWD/.build/debug/encfsd"
work=$(mktemp -d)
trap 'fusermount3 -u "$work/mnt" 2>/dev/null || true; fusermount3 -u "$work/backing" 2>/dev/null || true; rm -rf "$work"' EXIT
python3 -c 'import sys; sys.stdout.buffer.write(bytes(range(1, 65)))' > "$work/key"
mkdir "$work/mnt"
store="$work/store"
if [ "$variant" = attributes ]; then
    # git keeps no xattrs, so the store is made on a backing that has none (bindfs --xattr-none):
    # every xattr then lives in side objects, which a checkout carries.
    mkdir "$work/backing-source" "$work/backing"
    bindfs --xattr-none -o attr_timeout=0 "$work/backing-source" "$work/backing"
    store="$work/backing/store"
fi
"$encfsd" init "$store" --key-file "$work/key" --extent-size 4096
"$encfsd" mount "$store" "$work/mnt"
"$encfsd" key add "$work/mnt" --key-file "$work/key"
python3 - "$work/mnt" "$work/manifest.json" <<'PY'
import hashlib, json, os, sys
mnt, manifest_path = sys.argv[1], sys.argv[2]
def pattern(n, seed):
    return bytes((i * 131 + seed * 7 + (i >> 8)) & 0xff for i in range(n))
files = {
    "empty": b"",
    "one-byte": b"x",
    "three-extents-and-a-bit": pattern(3 * 4096 + 17, 1),
    "dir/nested/deep.txt": b"deep contents\n",
    "L" * 200: pattern(5000, 2),
}
os.makedirs(os.path.join(mnt, "dir/nested"))
for name, data in files.items():
    with open(os.path.join(mnt, name), "wb") as f:
        f.write(data)
with open(os.path.join(mnt, "sparse"), "wb") as f:
    f.seek(40000)
    f.write(b"end of sparse file")
files["sparse"] = b"\0" * 40000 + b"end of sparse file"
os.symlink("dir/nested/deep.txt", os.path.join(mnt, "link"))
os.mkfifo(os.path.join(mnt, "fifo"), 0o640)
os.chmod(os.path.join(mnt, "dir"), 0o751)
manifest = {
    "key": "0102...40 (bytes 1 to 64)",
    "files": {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in files.items()},
    "symlinks": {"link": "dir/nested/deep.txt"},
    "fifos": ["fifo"],
    "modes": {"dir": 0o751, "fifo": 0o640},
}
json.dump(manifest, open(manifest_path, "w"), indent=2, sort_keys=True)
PY
if [ "$variant" = attributes ]; then
    # Version 3 on: inode flags, and xattrs, all in side objects (see the backing above).
    python3 - "$work/mnt" "$work/manifest.json" <<'PY'
import fcntl, json, os, struct, sys
mnt, manifest_path = sys.argv[1], sys.argv[2]
FS_IOC_GETFLAGS, FS_IOC_SETFLAGS = 0x80086601, 0x40086602
xattrs = {"three-extents-and-a-bit": {f"user.a{i:02d}": bytes((i * 7 + j) & 0xff for j in range(200)) for i in range(40)},
          "dir": {"user.dir-note": b"kept with the directory"}}
for path, attrs in xattrs.items():
    for name, value in attrs.items():
        os.setxattr(os.path.join(mnt, path), name, value)
flags = {"one-byte": 0x20, "empty": 0x40 | 0x80, "dir": 0x8}  # append-only; nodump + noatime; sync
for path, value in flags.items():
    fd = os.open(os.path.join(mnt, path), os.O_RDONLY)
    try:
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("q", value))
    finally:
        os.close(fd)
m = json.load(open(manifest_path))
m["xattrs"] = {p: {n: v.hex() for n, v in a.items()} for p, a in xattrs.items()}
m["inodeFlags"] = flags
json.dump(m, open(manifest_path, "w"), indent=2, sort_keys=True)
PY
    [ -n "$(ls "$store/.xattrs" 2>/dev/null)" ] || { echo "no xattr side object was made" >&2; exit 1; }
fi
if [ "$variant" = key-groups ]; then
    grep -q '"extent-key-groups"' "$store/encfsd.conf" || { echo "this build does not make key-group stores" >&2; exit 1; }
    python3 - "$work/mnt" "$work/manifest.json" <<'PY'
import hashlib, json, os, sys
mnt, manifest_path = sys.argv[1], sys.argv[2]
# 40 extents and a bit, one write: groups of 16 share a nonce, each extent its own IV. Then one
# whole extent and a few bytes across an extent boundary are rewritten, each under a fresh nonce,
# and the file is made durable so the overwrite goes through the journal.
data = bytearray((i * 37 + (i >> 12)) & 0xff for i in range(40 * 4096 + 123))
path = os.path.join(mnt, "groups")
with open(path, "wb") as f:
    f.write(data)
fd = os.open(path, os.O_WRONLY)
try:
    whole = bytes([0xA5]) * 4096
    os.pwrite(fd, whole, 17 * 4096)
    data[17 * 4096:18 * 4096] = whole
    across = b"across a boundary"
    os.pwrite(fd, across, 31 * 4096 - 5)
    data[31 * 4096 - 5:31 * 4096 - 5 + len(across)] = across
    os.fsync(fd)
finally:
    os.close(fd)
m = json.load(open(manifest_path))
m["files"]["groups"] = {"sha256": hashlib.sha256(bytes(data)).hexdigest(), "size": len(data)}
m["features"] = ["extent-key-groups"]
json.dump(m, open(manifest_path, "w"), indent=2, sort_keys=True)
PY
fi
if [ "$variant" = half-rekeyed ]; then
    fusermount3 -u "$work/mnt"
    sleep 1
    python3 -c 'import sys; sys.stdout.buffer.write(bytes(range(65, 129)))' > "$work/key2"
    second=$(python3 -c 'import hashlib,hmac,sys; k=open(sys.argv[1],"rb").read(); p=hmac.new(b"\0"*64,k,hashlib.sha512).digest(); print(hmac.new(p,b"fscrypt\0\x01\x01",hashlib.sha512).digest()[:16].hex())' "$work/key2")
    ENCFSD_FAULT_POINT=rekey-batch-committed@2 "$encfsd" mount "$store" "$work/mnt" --no-keyring \
        --key-file "$work/key" --key-file "$work/key2"
    "$encfsd" rekey start "$work/mnt" --to "$second" || true
    for _ in $(seq 100); do pgrep -f "mount $store" >/dev/null || break; sleep 0.1; done
    python3 - "$work/manifest.json" "$second" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
m["secondKey"] = "4142...80 (bytes 65 to 128)"
m["rekeyedTo"] = sys.argv[2]
json.dump(m, open(sys.argv[1], "w"), indent=2, sort_keys=True)
PY
fi
fusermount3 -u "$work/mnt" 2>/dev/null || true
mkdir -p "$out"
cp -a "$store" "$out/store"
cp "$work/manifest.json" "$out/manifest.json"
echo "wrote $out"
