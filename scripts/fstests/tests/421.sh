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
# each read, so that each read goes to the daemon and is decrypted there. Each attempt is counted
# in attempts.<n>, each full read of the slice in reads.<n>.
_reader() {
    local range="$(($1 * slice))M ${slice}M"
    while _a_running; do
        xfs_io "$file" -c "fadvise -d $range" -c "pread $range" 2>&1 \
            | grep -q "^read $((slice * 1048576))/$((slice * 1048576)) bytes" && echo -n r >> "$SCRATCH_BASE/reads.$1"
        echo -n a >> "$SCRATCH_BASE/attempts.$1"
    done
}
# How many reads (or attempts) reader $2 has made so far.
_reader_count() { local n; n=$(stat -c %s "$SCRATCH_BASE/$1.$2" 2>/dev/null) || n=0; echo "$n"; }
# _wait_readers WHAT [MIN...]: waits until reader n has made more than MIN[n] (default 0) of WHAT
# (reads, attempts); up to 120 s, the machine may be loaded. Names the readers that did not.
_wait_readers() {
    local what=$1 i proc late=()
    shift
    local min=("$@")
    for ((i = 0; i < 1200; i++)); do
        late=()
        for ((proc = 0; proc < nproc; proc++)); do
            (( $(_reader_count "$what" $proc) > ${min[$proc]:-0} )) || late+=("$proc")
        done
        [ ${#late[@]} -eq 0 ] && return 0
        sleep 0.1
    done
    for proc in "${late[@]}"; do echo "reader $proc: no $what within 120 s"; done
}
for ((proc = 0; proc < nproc; proc++)); do
    _a_bg _reader $proc
done

# Wait until every reader has read its slice once.
_wait_readers reads

# Remove the key. Whether files are still busy at that moment depends on timing.
echo "# Removing the key while the file is being read"
_rm_enckey "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER | sed 's/, but files still busy$//'

# Now try to open the file again (by whichever name is listed: plaintext while a reader still
# holds it open, no-key otherwise; either may fail, so only the daemon's survival counts).
cat "$(find "$dir" -type f)" > /dev/null 2>&1

# Let every reader try a few more times with the key gone (reads then fail, or succeed through a
# still-open file), then wait for them to exit.
_wait_readers attempts $(for ((proc = 0; proc < nproc; proc++)); do echo $(( $(_reader_count attempts $proc) + 2 )); done)
_a_stop_bg 60 || echo "readers hung"

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
