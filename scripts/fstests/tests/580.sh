#!/usr/bin/env bash
# Port of xfstests generic/580: basic test of the fscrypt key management ioctls
# (add, remove, status), including removal while a file is still open.
source "$(dirname "$0")/../common.sh"
_scratch_mkfs_encrypted
dir=$SCRATCH_MNT/dir
mkdir "$dir"
_set_encpolicy "$dir" $TEST_KEY_IDENTIFIER

echo -e "\n# Opening a file in the directory without the key"
_run sh -c "echo contents > $dir/file"
echo "# Key status, before adding"
_enckey_status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER

echo -e "\n# Adding the key"
_add_enckey "$SCRATCH_MNT"
echo "# Key status, after adding"
_enckey_status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
echo contents > "$dir/file"

echo -e "\n# Removing the key"
_rm_enckey "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
echo "# Key status, after removing"
_enckey_status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
echo "# Reading the file by its plaintext name"
_run cat "$dir/file"
echo "# Reading the file by its no-key name"
_run cat "$dir/$(ls "$dir")" | _filter_nokey_names

echo -e "\n# Re-adding the key, writing file2, and removing the key while dir/file is open"
_add_enckey "$SCRATCH_MNT"
_run cat "$dir/file"
echo contents > "$dir/file2"
exec 3<"$dir/file"
_rm_enckey "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
echo "# A file that was not open"
_run cat "$dir/file2"
echo "# The file that is open, by its plaintext name"
_run cat "$dir/file"
echo "# Key status, while a file is still open"
_enckey_status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
exec 3<&-
echo "# Removing the key again, once the file is closed"
_rm_enckey "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
_enckey_status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
_run cat "$dir/file"

echo -e "\n# Removing a key that is absent"
_rm_enckey "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
