#!/usr/bin/env bash
# Port of xfstests generic/399: the same ciphertext is never repeated. For file contents, many
# identical files of zeros are written and the backing store (what an attacker sees) must not
# compress below the amount of data written; for names and symlink targets, the "same" symlink is
# created in two directories and its backing names and bytes must differ.
#
# The kernel test fills a 64 MB filesystem; here 100 files of 64 KiB and 4 of 1 MiB of zeros are
# written (several extents per file, many files: catches nonce reuse across files and across
# extents), and the backing store is read directly instead of a block device.
source "$(dirname "$0")/../common.sh"
_scratch_mkfs_encrypted

edir=$SCRATCH_MNT/encrypted_dir
_unlocked_encrypted_dir "$edir"

# Create the "same" symlink in two different directories.
mkdir "$edir/subdir1" "$edir/subdir2"
ln -s symlink_target "$edir/subdir1/symlink"
ln -s symlink_target "$edir/subdir2/symlink"
link_inodes=$(stat -c %i "$edir/subdir1/symlink" "$edir/subdir2/symlink")

echo "# Writing files of zeros"
total_file_size=0
for i in $(seq 100); do
    head -c 65536 /dev/zero > "$edir/file$i"
    total_file_size=$((total_file_size + $(stat -c %s "$edir/file$i")))
done
for i in $(seq 4); do
    head -c $((1024 * 1024)) /dev/zero > "$edir/big$i"
    total_file_size=$((total_file_size + $(stat -c %s "$edir/big$i")))
done
echo "Wrote $total_file_size bytes"

_rm_enckey "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER > /dev/null
_scratch_unmount

# The compressed size of the whole backing store must be no smaller than the amount of data that
# was written; otherwise there was a compromise in the confidentiality of the data. Headers and
# directories only add to the compressed size, so false positives are not possible.
echo -e "\n# Compressing the backing store"
store_compressed_size=$(cd "$SCRATCH_STORE" && find . -type f -print0 | sort -z | xargs -0 cat \
    | xz --lzma2=dict=64M,mf=hc4,mode=fast,nice=16 | wc -c)
if (( store_compressed_size < total_file_size )); then
    echo "FAIL: backing store was compressible ($total_file_size bytes => $store_compressed_size bytes)"
else
    echo "PASS: ciphertexts were not repeated for contents"
fi

# A stricter check: no 16-byte block of the extents' ciphertext and tags (after each backing
# file's 4096-byte header) occurs twice anywhere in the store. Nonces are checked apart: extents of
# one key group of one file written together share theirs (FORMAT.md 16.4), and nothing else may.
python3 - "$SCRATCH_STORE" <<'PY'
import json, os, struct, sys
store = sys.argv[1]
seen, blocks, repeated = set(), 0, 0
nonces, misplaced = {}, 0
for root, dirs, files in os.walk(store):
    for name in files:
        if name == ".d" or root == store and name == "encfsd.conf":
            continue
        with open(os.path.join(root, name), "rb") as f:
            whole = f.read()
        if len(whole) <= 4096:
            continue
        slot = max((whole[0:2048], whole[2048:4096]), key=lambda s: struct.unpack_from("<Q", s, 8)[0])
        stride = struct.unpack_from("<I", slot, 36)[0] + 32
        data = whole[4096:]
        for start in range(0, len(data), stride):
            owner = (os.path.join(root, name), start // stride // 16)
            if nonces.setdefault(data[start:start + 16], owner) != owner:
                misplaced += 1
            extent = data[start + 16:start + stride]
            for i in range(0, len(extent) - 15, 16):
                block = extent[i:i + 16]
                blocks += 1
                if block in seen:
                    repeated += 1
                seen.add(block)
print("repeated 16-byte blocks of ciphertext:", repeated, "(of more than 500000)" if blocks > 500000 else f"(only {blocks} blocks!)")
print("nonces shared outside one key group of one file:", misplaced)
PY

echo -e "\n# Checking that no plaintext name or symlink target is stored"
grep -rlaF -e symlink_target -e subdir1 -e file100 "$SCRATCH_STORE" | wc -l

# Verify that encrypted filenames and symlink targets were not reused. Since ciphertexts are
# unpredictable, the expected names cannot be in the expected output.
echo -e "\n# Comparing the two symlinks' backing names and bytes"
backing=()
for ino in $link_inodes; do backing+=("$(find "$SCRATCH_STORE" -inum "$ino")"); done
echo "${#backing[@]} backing files"
[ "$(basename "${backing[0]}")" = "$(basename "${backing[1]}")" ] && \
    echo "Encrypted filenames were reused!"
cmp -s "${backing[0]}" "${backing[1]}" && echo "Backing files are identical!"
cmp -s <(tail -c +4097 "${backing[0]}") <(tail -c +4097 "${backing[1]}") && \
    echo "Encrypted symlink targets were reused!"
[ "$(stat -c %s "${backing[0]}")" = "$(stat -c %s "${backing[1]}")" ] && echo "same backing sizes"

echo -e "\n# And through the mount without the key"
_scratch_mount
find "$edir" -type l | wc -l
link1=$(find "$edir" -type l | head -1)
link2=$(find "$edir" -type l | tail -1)
[ "$(basename "$link1")" = "$(basename "$link2")" ] && echo "No-key filenames were reused!"
echo "done"
