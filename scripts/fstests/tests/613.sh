#!/usr/bin/env bash
# Port of xfstests generic/613: encryption nonces are unique and random, where randomness is
# approximated as "incompressible by xz". The nonce is the 16-byte value each encrypted file gets
# (FS_IOC_GET_ENCRYPTION_NONCE); different nonces make identical files encrypt differently.
#
# Covered: directories given a policy with `policy set`, directories and files that inherit a
# policy, and files under the root's policy. The kernel test reads the nonces offline from the
# device; here they come from the ioctl on the mount (cross-checked with `encfsd nonce` for a
# sample) and each must also be stored in its backing file's header, which is read after unmount.
source "$(dirname "$0")/../common.sh"
_scratch_mkfs_encrypted

echo -e "\n# Adding encryption key"
_add_enckey "$SCRATCH_MNT"

echo -e "\n# Creating encrypted files and directories"
paths=()
for i in {1..50}; do
    dir=$SCRATCH_MNT/policy_dir_$i
    mkdir "$dir"
    _set_encpolicy "$dir" $TEST_KEY_IDENTIFIER
    paths+=("$dir")
done
mkdir "$SCRATCH_MNT/rdir"
paths+=("$SCRATCH_MNT/rdir")
for i in {1..50}; do
    mkdir "$SCRATCH_MNT/policy_dir_1/subdir_$i"
    paths+=("$SCRATCH_MNT/policy_dir_1/subdir_$i")
    touch "$SCRATCH_MNT/rdir/$i"
    paths+=("$SCRATCH_MNT/rdir/$i")
done
(cd "$SCRATCH_MNT/policy_dir_2" && seq 900 | xargs touch)
for i in $(seq 900); do paths+=("$SCRATCH_MNT/policy_dir_2/$i"); done
echo "${#paths[@]} files and directories"

# nonces_hex: one per line, "inode nonce"; nonces_bin: all nonces concatenated in binary.
echo -e "\n# Getting encryption nonces"
tmp=$SCRATCH_BASE/tmp
python3 - "$tmp" "${paths[@]}" <<'PY'
import fcntl, os, sys
FS_IOC_GET_ENCRYPTION_NONCE = 0x8010661b
out = sys.argv[1]
with open(out + ".nonces_hex", "w") as hexf, open(out + ".nonces_bin", "wb") as binf:
    for p in sys.argv[2:]:
        fd = os.open(p, os.O_RDONLY)
        try:
            nonce = fcntl.ioctl(fd, FS_IOC_GET_ENCRYPTION_NONCE, bytes(16))
            ino = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        hexf.write(f"{ino} {nonce.hex()}\n")
        binf.write(nonce)
PY
awk 'length($2) != 32 || $2 !~ /^[0-9a-f]+$/ { print "malformed nonce: " $0 }' "$tmp.nonces_hex"
mismatches=0
for i in 1 51 77 101 1001 ${#paths[@]}; do
    p=${paths[$((i - 1))]}
    [ "$(_get_encryption_nonce "$p")" = "$(sed -n "${i}p" "$tmp.nonces_hex" | cut -d' ' -f2)" ] \
        || mismatches=$((mismatches + 1))
done
echo "encfsd nonce disagreed with the ioctl for $mismatches of 6 sampled files"

echo -e "\n# Checking the nonces are in the backing files' headers"
_scratch_unmount
python3 - "$SCRATCH_STORE" "$tmp.nonces_hex" <<'PY'
import os, sys
store, hexfile = sys.argv[1], sys.argv[2]
headers = {}
for root, dirs, files in os.walk(store):
    for name in files:
        path = os.path.join(root, name)
        st = os.lstat(path)
        # A directory's header is its backing directory's ".d"; the plaintext st_ino is that of
        # the backing directory itself.
        ino = os.lstat(root).st_ino if name == ".d" else st.st_ino
        with open(path, "rb") as f:
            headers[ino] = f.read(4096)
missing = 0
for line in open(hexfile):
    ino, nonce = line.split()
    if bytes.fromhex(nonce) not in headers.get(int(ino), b""):
        missing += 1
print(f"{missing} nonces not found in their backing headers")
PY

# Verify the uniqueness and randomness of the nonces. In theory randomness implies uniqueness
# here, but it's easy enough to explicitly test for both.
echo -e "\n# Verifying uniqueness of nonces"
echo "Listing non-unique nonces:"
cut -d' ' -f2 "$tmp.nonces_hex" | sort | uniq -d

echo -e "\n# Verifying randomness of nonces"
uncompressed_size=$(stat -c %s "$tmp.nonces_bin")
echo "Uncompressed size is $uncompressed_size bytes"
compressed_size=$(xz -9 -c < "$tmp.nonces_bin" | wc -c)
gzip_size=$(gzip -9 -c < "$tmp.nonces_bin" | wc -c)
# The xz format has 60 bytes of overhead. Go a bit lower to avoid flakiness.
if (( compressed_size >= uncompressed_size + 55 && gzip_size >= uncompressed_size )); then
    echo "Nonces are incompressible, as expected"
else
    echo "Nonces are compressible (non-random); compressed $uncompressed_size => $compressed_size bytes (xz), $gzip_size bytes (gzip)!"
fi
