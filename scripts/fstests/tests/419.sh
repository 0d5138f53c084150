#!/usr/bin/env bash
# Port of xfstests generic/419: renaming files in an encrypted directory without its key fails with
# ENOKEY: a plain rename, a cross rename (RENAME_EXCHANGE), RENAME_NOREPLACE, and renames out of
# the directory or within it; and the entries are unchanged afterwards.
source "$(dirname "$0")/../common.sh"
_scratch_mkfs_encrypted

edir=$SCRATCH_MNT/edir
_unlocked_encrypted_dir "$edir"
echo a > "$edir/a"
echo b > "$edir/b"
mkdir "$edir/subdir"
_rm_enckey "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER

echo -e "\n# Right after the removal, without a remount: the names the kernel had cached are gone"
renameat2 "$edir/a" "$edir/c"
renameat2 -x "$edir/a" "$edir/b"
nokey1=$(find "$edir" -maxdepth 1 -type f | sort | head -1)
nokey2=$(find "$edir" -maxdepth 1 -type f | sort | tail -1)
renameat2 -x "$nokey1" "$nokey2" | _filter_nokey_names
renameat2 "$nokey1" "$edir/c" | _filter_nokey_names

_scratch_cycle_mount
inodes_before=$(stat -c '%i %F' "$edir"/* | sort)

# No-key names are unpredictable: do not assume any particular name.
efile1=$(find "$edir" -maxdepth 1 -type f | sort | head -1)
efile2=$(find "$edir" -maxdepth 1 -type f | sort | tail -1)
esubdir=$(find "$edir" -mindepth 1 -maxdepth 1 -type d)

echo -e "\n# Rename over another file, and cross rename"
_run mv "$efile1" "$efile2" | _filter_nokey_names
renameat2 -x "$efile1" "$efile2" | _filter_nokey_names

echo -e "\n# Rename to a new name, with and without RENAME_NOREPLACE"
renameat2 "$efile1" "$edir/newname" | _filter_nokey_names
renameat2 -n "$efile1" "$edir/newname" | _filter_nokey_names
# (onto an existing name the VFS itself fails RENAME_NOREPLACE with EEXIST before the filesystem
# sees the rename, as with the kernel's fscrypt)
renameat2 -n "$efile1" "$efile2" | _filter_nokey_names

echo -e "\n# Rename into a subdirectory, and of a subdirectory"
renameat2 "$efile1" "$esubdir/newname" | _filter_nokey_names
renameat2 "$esubdir" "$edir/newdir" | _filter_nokey_names

echo -e "\n# Rename out of the directory, into one whose key is present (the root's)"
mkdir "$SCRATCH_MNT/rdir"
echo r > "$SCRATCH_MNT/rdir/r"
renameat2 "$efile1" "$SCRATCH_MNT/rdir/moved" | _filter_nokey_names
renameat2 -x "$efile1" "$SCRATCH_MNT/rdir/r" | _filter_nokey_names
renameat2 "$SCRATCH_MNT/rdir/r" "$edir/r" | _filter_nokey_names

echo -e "\n# The entries are unchanged"
ls "$edir" | wc -l
ls "$SCRATCH_MNT/rdir"
if [ "$(stat -c '%i %F' "$edir"/* | sort)" = "$inodes_before" ]; then
    echo "same inodes and types as before"
else
    echo "entries changed!"
fi

echo -e "\n# With the key, the files are intact"
_add_enckey "$SCRATCH_MNT"
ls "$edir"
cat "$edir/a" "$edir/b"
