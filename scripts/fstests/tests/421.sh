#!/usr/bin/env bash
# Port of xfstests generic/421: removing the key while other processes read an encrypted file
# (kernel fix 1b53cf9815bb). The daemon must neither crash nor hang. (generic/421 revokes a v1
# keyring key; with v2 semantics the key is removed instead, and open files keep it until closed.)
source "$(dirname "$0")/../common.sh"
trap _a_cleanup EXIT
trap 'exit 1' INT TERM HUP

_scratch_mkfs_encrypted
dir=$SCRATCH_MNT/encrypted_dir
file=$dir/file
daemon_pid=$(_daemon_pids)

# 4 processes, 2 MiB per process
nproc=4
slice=2

# Create an encrypted file and sync its data to disk.
mkdir "$dir"
_set_encpolicy "$dir" $TEST_KEY_IDENTIFIER
_add_enckey "$SCRATCH_MNT"
xfs_io -f "$file" -c "pwrite 0 $((nproc * slice))M" -c "fsync" > /dev/null
echo "# Contents written"
md5sum < "$file"

# Processes that read the file over and over. fadvise wipes the page cache of their range before
# each read, so that each read goes to the daemon and is decrypted there.
_reader() {
    local range="$(($1 * slice))M ${slice}M"
    while _a_running; do
        xfs_io "$file" -c "fadvise -d $range" -c "pread $range" 2>&1 \
            | grep -q "^read $((slice * 1048576))/$((slice * 1048576)) bytes" && echo -n r >> "$SCRATCH_BASE/reads.$1"
    done
}
for ((proc = 0; proc < nproc; proc++)); do
    _a_bg _reader $proc
done

# Wait a second for the readers to start up.
sleep 1
for ((proc = 0; proc < nproc; proc++)); do
    [ -s "$SCRATCH_BASE/reads.$proc" ] || echo "reader $proc has not read its slice"
done

# Remove the key. Whether files are still busy at that moment depends on timing.
echo "# Removing the key while the file is being read"
_rm_enckey "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER | sed 's/, but files still busy$//'

# Now try to open the file again (by whichever name is listed: plaintext while a reader still
# holds it open, no-key otherwise; either may fail, so only the daemon's survival counts).
cat "$(find "$dir" -type f)" > /dev/null 2>&1

# Let the readers run on for a while, then wait for them to exit.
sleep 3
_a_stop_bg 10 || echo "readers hung"

echo "# Is the daemon alive and answering?"
kill -0 "$daemon_pid" 2>/dev/null && echo "daemon running" || echo "daemon died"
timeout 10 stat -c %F "$dir" || echo "stat of the directory failed or hung"

# Finish the removal if files were still busy when the key was removed.
if [ "$(_enckey_status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER)" = "Incompletely removed" ]; then
    _rm_enckey "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER > /dev/null
fi
echo "# Key status once the readers are gone"
_enckey_status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
_run cat "$file"

echo "# Re-adding the key: the contents are intact"
_add_enckey "$SCRATCH_MNT"
md5sum < "$file"

echo "Didn't crash!"
