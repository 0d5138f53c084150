#!/usr/bin/env bash
# Port of xfstests generic/397: accessing encrypted files and directories with and without the key.
# With the key, a tree of files (incl. 255-byte names), symlinks (incl. a 4095-byte target) and
# subdirectories equals an unencrypted reference tree, also after a remount. Without the key the
# entries are still there (as no-key names), plaintext names are not found, regular files cannot
# be read or truncated, nothing can be created or linked in, and `rm -r` removes the whole tree.
source "$(dirname "$0")/../common.sh"
_scratch_mkfs_encrypted

edir=$SCRATCH_MNT/edir
ref_dir=$SCRATCH_BASE/ref_dir   # unencrypted reference tree, outside the mount
mkdir "$edir" "$ref_dir"
_set_encpolicy "$edir" $TEST_KEY_IDENTIFIER
_add_enckey "$SCRATCH_MNT"

pattern() { head -c "$1" /dev/zero | tr '\0' '\315'; }   # like xfs_io's pwrite (0xcd bytes)
maxname=$(head -c 255 /dev/zero | tr '\0' y)              # 255-byte name
maxtarget=$(head -c 4095 /dev/zero | tr '\0' t)           # 4095-byte symlink target
for dir in "$edir" "$ref_dir"; do
    touch "$dir/empty"
    pattern 4096 > "$dir/a"
    pattern $((33 * 1024)) > "$dir/abcdefghijklmnopqrstuvwxyz"
    pattern 1024 > "$dir/$maxname"
    ln -s a "$dir/symlink"
    ln -s abcdefghijklmnopqrstuvwxyz "$dir/symlink2"
    ln -s "$maxname" "$dir/symlink3"
    ln -s "$maxtarget" "$dir/symlink4"
    mkdir "$dir/subdir"
    mkdir "$dir/subdir/subsubdir"
    echo nested > "$dir/subdir/subsubdir/$maxname"
done

# Names, types, sizes of non-directories, symlink targets, and a checksum of each regular file.
listing() {
    (cd "$1" && find . -mindepth 1 | sort | while IFS= read -r p; do
        if [ -d "$p" ] && [ ! -L "$p" ]; then
            echo "$p d"
        elif [ -L "$p" ]; then
            echo "$p l $(stat -c %s "$p") -> $(readlink "$p")"
        else
            echo "$p $(stat -c '%F %s' "$p") $(md5sum < "$p" | cut -d' ' -f1)"
        fi
    done)
}
compare_with_reference() {
    diff -r --no-dereference "$edir" "$ref_dir" 2>&1 | _filter_scratch
    if diff <(listing "$edir") <(listing "$ref_dir") > "$SCRATCH_BASE/listing.diff"; then
        echo "edir equals the reference tree ($(listing "$edir" | wc -l) entries)"
    else
        echo "edir differs from the reference tree:"
        sed "s/$maxname/MAXNAME/g; s/$maxtarget/MAXTARGET/g" "$SCRATCH_BASE/listing.diff"
    fi
}

echo -e "\n# Comparing with the reference tree, with the key"
compare_with_reference
echo -e "\n# Comparing again after a remount (and adding the key again)"
_scratch_cycle_mount
_add_enckey "$SCRATCH_MNT"
compare_with_reference

#
# Now without the key. No-key names are unpredictable (they encode the ciphertext of the names),
# so the checks below do not assume any particular name.
#
echo -e "\n# Removing the key and remounting"
_rm_enckey "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
_scratch_cycle_mount

echo "# Plaintext names are not there"
_run stat "$edir/empty"
_run stat "$edir/symlink"
_run stat "$edir/subdir"

echo "# Numbers of entries, files, symlinks and subdirectories"
ls "$edir" | wc -l
find "$edir" -maxdepth 1 -type f | wc -l
find "$edir" -maxdepth 1 -type l | wc -l
find "$edir" -mindepth 2 -maxdepth 2 -type d | wc -l
find "$edir" -mindepth 3 -type f | wc -l
echo "# No-key names are printable and distinct"
ls "$edir" | LC_ALL=C grep -c '[^[:print:]]'
ls "$edir" | sort | uniq -d | wc -l
echo "# Sizes of the regular files are visible"
find "$edir" -maxdepth 1 -type f -printf '%s\n' | sort -n | tr '\n' ' '; echo

echo "# Reading and truncating a regular file (ENOKEY)"
file=$(find "$edir" -maxdepth 1 -type f -size +32k)
md5sum "$file" 2>&1 | _filter_scratch | _filter_nokey_names
_run truncate -s 0 "$file" | _filter_nokey_names
python3 -c 'import os, sys
try: os.truncate(sys.argv[1], 0)
except OSError as e: print("truncate(2):", e.strerror)' "$file"
_run dd if=/dev/zero of="$file" bs=1 count=1 conv=notrunc status=none | _filter_nokey_names
stat -c %s "$file"

echo "# Creating files, directories, symlinks and links (ENOKEY)"
_run touch "$edir/newfile"
_run touch "$edir/0123456789abcdef"
_run mkdir "$edir/newdir"
_run mkdir "$edir/0123456789abcdef"
_run ln -s foo "$edir/newlink"
_run ln -s foo "$edir/0123456789abcdef"
_run ln "$file" "$edir/newhardlink" | _filter_nokey_names
_run mkdir "$(find "$edir" -mindepth 1 -maxdepth 1 -type d)/newdir" | _filter_nokey_names
ls "$edir" | wc -l

echo "# Deleting the encrypted directory"
_run rm -r "$edir"
_run stat "$edir"
