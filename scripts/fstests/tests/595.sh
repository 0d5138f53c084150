#!/usr/bin/env bash
# Port of xfstests generic/595: writes to an encrypted file must not be lost when they race with
# the removal of its key (kernel fix 2b4eae95c736, "fscrypt: don't evict dirty inodes after
# removing key"). Any write whose open+write+close succeeded must be durable, however the
# removal races with it.
source "$(dirname "$0")/../common.sh"

# The add/remove loop runs as a user of its own, so that its keyring entries (encfsd:<id> in the
# adding user's keyring, revoked by the daemon when the key is wiped) are not root's, which other
# tests running at the same time share.
LOOP_USER=15950
_loop_user_as() { _as_user $LOOP_USER "$@"; }
_595_cleanup() {
    _a_cleanup
    _loop_user_as keyctl clear @u >/dev/null 2>&1
    return 0
}
trap _595_cleanup EXIT
trap 'exit 1' INT TERM HUP
_loop_user_as keyctl clear @u >/dev/null 2>&1

_scratch_mkfs_encrypted -o allow_other
dir=$SCRATCH_MNT/dir
runtime=${RUNTIME:-20}	# seconds of the multi-threaded part (at least 20)
expected=$SCRATCH_BASE/expected
key=$SCRATCH_BASE/test-key.shared
cp "$TEST_KEY_FILE" "$key"
chmod 644 "$key"

# Create an encrypted directory.
mkdir "$dir"
_set_encpolicy "$dir" $TEST_KEY_IDENTIFIER
_add_enckey "$SCRATCH_MNT"

# Start with a single-threaded reproducer:
echo -e "\n# Single-threaded reproducer"
# Keep a fd open to a file past its master key being removed.
exec 3>"$dir/file"
_rm_enckey "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
# Write to and close the open fd.
echo contents >&3
exec 3>&-
# Drop any dentries which might be pinning the inode for "file".
_drop_caches
# Check whether the write made it through.
_add_enckey "$SCRATCH_MNT"
_run cat "$dir/file"
rm -f "$dir/file"

# Also run a multi-threaded reproducer.
echo -e "\n# Multi-threaded reproducer"
touch "$dir/file"
: > "$expected"
: > "$SCRATCH_BASE/cycles"

# One process adds and removes the key repeatedly (with its own claim; root's is dropped first,
# so that each of its removals removes the key).
_rm_enckey "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER > /dev/null
# Adding a valid key never fails with fscrypt, however it races with a removal finishing, nor does
# removing the key just added: failures are recorded.
_key_loop() {
    while _a_running; do
        _loop_user_as "$ENCFSD" key add "$SCRATCH_MNT" --key-file "$key" 2>&1 > /dev/null | sed 's/^/add: /' >> "$SCRATCH_BASE/key-errors"
        _loop_user_as "$ENCFSD" key remove "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER 2>&1 > /dev/null | sed 's/^/remove: /' >> "$SCRATCH_BASE/key-errors"
        echo -n c >> "$SCRATCH_BASE/cycles"
    done
}
# Another process repeatedly tries to append to the encrypted file. The file is re-opened each
# time, so that there are chances for its node to be forgotten. Failures to open the file because
# the key is removed are ignored; successful appends are recorded in the expected file.
_append_loop() {
    while _a_running; do
        if sh -c "echo -n X >> $dir/file" 2>/dev/null; then
            echo -n X >> "$expected"
        else
            echo -n f >> "$SCRATCH_BASE/failures"
        fi
    done
}
_a_bg _key_loop
_a_bg _append_loop

# Run for a while (in the background, so that a signal to the test is handled at once).
sleep "$runtime" & wait $!

# Stop all subprocesses.
_a_stop_bg 10 || echo "background loops did not stop"

# Make sure no writes were lost.
_add_enckey "$SCRATCH_MNT" > /dev/null
appended=$(stat -c %s "$expected")
# Counts vary from run to run: only verdicts go to the transcript (set FSTESTS_FULL=FILE to keep them).
echo "appended $appended, key cycles $(stat -c %s "$SCRATCH_BASE/cycles"), failed opens $(stat -c %s "$SCRATCH_BASE/failures" 2>/dev/null || echo 0)" >> "${FSTESTS_FULL:-/dev/null}"
[ "$appended" -gt 0 ] && echo "some appends succeeded"
[ -s "$SCRATCH_BASE/failures" ] && echo "some appends failed for lack of the key"
[ "$(stat -c %s "$SCRATCH_BASE/cycles")" -gt 0 ] && echo "the key was added and removed repeatedly"
if [ -s "$SCRATCH_BASE/key-errors" ]; then
    echo "some key adds or removals failed, e.g.:"
    sort "$SCRATCH_BASE/key-errors" | uniq -c | sed 's/^ *[0-9]* /    /'
else
    echo "every add and remove of the key succeeded"
fi
if _run cmp "$expected" "$dir/file"; then
    echo "no lost writes"
fi

echo "Multi-threaded reproducer done"
