#!/usr/bin/env bash
# Port of xfstests generic/429: no-key names cached by the kernel must give way to plaintext
# names as soon as the key is added, without remounting or dropping caches (kernel fix
# 28b4c263961c); and a race of lookups of a negative entry against rmdir of its parent (kernel fix
# 03a8bb0e53d9, test program t_encrypted_d_revalidate).
# (The last part of generic/429, revoking a v1 keyring key, has no counterpart: encfsd has only
# v2 policies, whose keys are removed, not revoked.)
source "$(dirname "$0")/../common.sh"
trap _a_cleanup EXIT
trap 'exit 1' INT TERM HUP

_scratch_mkfs_encrypted
dir=$SCRATCH_MNT/edir
mkdir "$dir"
_set_encpolicy "$dir" $TEST_KEY_IDENTIFIER
_add_enckey "$SCRATCH_MNT"

# Create two files in the directory: one whose name is valid in the base64 format used in no-key
# names, and one whose name is not, so that lookups of plaintext names without the key take both
# paths (in the kernel, at least one of them leaves a negative dentry behind).
echo contents_@@@ > "$dir/@@@"	# not valid base64
echo contents_abcd > "$dir/abcd"	# valid base64

show_file_contents() {
    echo "--- Contents of files using plaintext names:"
    _run cat "$dir/@@@"
    _run cat "$dir/abcd"
    echo "--- Contents of files using no-key names:"
    _run cat "${nokey_names[@]}" | _filter_nokey_names
}

show_directory_with_key() {
    echo "--- Directory listing:"
    find "$dir" -mindepth 1 | sort | _filter_scratch
    show_file_contents
}

# View the directory without the key. The plaintext names don't exist, but 'cat' each to verify
# this (which also creates negative entries in the kernel's cache). The no-key names are
# unpredictable by design; check that the right number of them is listed, and keep them.
echo
echo "***** Without encryption key *****"
_rm_enckey "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
echo "--- Directory listing:"
nokey_names=( $(find "$dir" -mindepth 1 | sort) )
printf '%s\n' "${nokey_names[@]}" | _filter_scratch | _filter_nokey_names
show_file_contents

# Without remounting or dropping caches, add the key and view the directory again. Now the
# plaintext names are all there and the no-key names are gone. 'cat' all the names to test for
# stale entries.
echo
echo "***** With encryption key *****"
_add_enckey "$SCRATCH_MNT"
show_directory_with_key

# Race: threads stat "dir/file" (always ENOENT) while the main thread creates, stats and removes
# "dir", for 10 seconds (t_encrypted_d_revalidate).
echo
echo "***** Race conditions *****"
python3 - "$dir" <<'PY'
import errno, os, sys, threading, time

TIMEOUT = 10
os.chdir(sys.argv[1])
failure = []

def check_enoent(path):
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    except OSError as e:
        failure.append("stat %s: %s" % (path, os.strerror(e.errno)))
        return False
    failure.append("stat %s should have failed" % path)
    return False

def stat_thread():
    while not failure and not done.is_set():
        check_enoent("dir/file")

done = threading.Event()
threads = [threading.Thread(target=stat_thread) for _ in range(max((os.cpu_count() or 1) - 1, 1))]
for t in threads:
    t.start()
deadline = time.monotonic() + TIMEOUT
try:
    while not failure and time.monotonic() < deadline:
        os.mkdir("dir", 0o777)
        check_enoent("dir/file")
        os.rmdir("dir")
except OSError as e:
    failure.append("%s: %s" % (e.filename, os.strerror(e.errno)))
done.set()
for t in threads:
    t.join()
if failure:
    print("ERROR: " + failure[0])
    sys.exit(1)
print("t_encrypted_d_revalidate finished")
PY
rm -rf "$dir/dir"
