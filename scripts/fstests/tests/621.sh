#!/usr/bin/env bash
# Port of xfstests generic/621: no duplicate name can be created in an encrypted directory while
# its key is being added (and removed) concurrently. A name looked up without the key (negative,
# no-key) must not let mkdir/mknod/mkfifo/symlink/link/RENAME_NOREPLACE/O_CREAT|O_EXCL create a
# second entry of a name that exists once the key is there.
#
# As in the kernel test, dir/100 exists and one process tries to create it again in all these
# ways (each must fail: EEXIST with the key, ENOKEY without), while another loops adding and
# removing the key; for at least 10 s, and on until the race has been run enough (the key added and
# removed 20 times, 1000 attempts, the fresh name created 10 times, both EEXIST and ENOKEY seen),
# which is waited for as an event (up to 10 minutes: a loaded machine is only slower). The same process also creates a fresh name, tries to create it a second
# time (must fail) and removes it again (retrying while the key is absent). Afterwards, with the
# key and without it, no name may appear twice.
source "$(dirname "$0")/../common.sh"
_scratch_mkfs_encrypted
runtime=10     # at least this many seconds of racing
deadline=600   # at most, waiting for the race to have been run enough
dir=$SCRATCH_MNT/dir
tmp=$SCRATCH_BASE/tmp

echo -e "\n# Creating encrypted directory containing files"
mkdir "$dir"
_add_enckey "$SCRATCH_MNT"
_set_encpolicy "$dir" $TEST_KEY_IDENTIFIER
for i in {1..100}; do
    touch "$dir/$i"
done
# This is the name which we'll try to duplicate.
inode=$(stat -c %i "$dir/100")
rm "$dir/1"
touch "$dir/src"    # the source of RENAME_NOREPLACE onto a fresh name

echo -e "\n# Starting duplicate filename creator process"
python3 - "$dir" "$tmp" <<'PY' &
import ctypes, os, stat, sys
d, tmp = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
def renameat2_noreplace(old, new):
    if libc.renameat2(-100, old.encode(), -100, new.encode(), 1) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
def ops(name, source):
    return {
        "mkdir": lambda: os.mkdir(name),
        "mknod": lambda: os.mknod(name, stat.S_IFCHR | 0o600, os.makedev(5, 5)),
        "mkfifo": lambda: os.mkfifo(name),
        "symlink": lambda: os.symlink("target", name),
        "link": lambda: os.link(f"{d}/50", name),
        "rename_noreplace": lambda: renameat2_noreplace(source, name),
        "open_excl": lambda: os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)),
    }
def remove(name, op):
    try:
        if op == "rename_noreplace":
            os.rename(name, f"{d}/src")          # put the source back
        elif op == "mkdir":
            os.rmdir(name)
        else:
            os.unlink(name)
        return True
    except OSError:
        return False                              # e.g. ENOENT: the key is absent; retry later
attempts, created, errors, pending = 0, 0, {}, None
def progress():
    # attempts, creations of the fresh name, and whether EEXIST and ENOKEY have been seen
    seen = {err for (_, err) in errors}
    with open(tmp + ".progress.tmp", "w") as f:
        f.write(f"{attempts} {created} {int('File exists' in seen)} {int('Required key not available' in seen)}\n")
    os.replace(tmp + ".progress.tmp", tmp + ".progress")
def attempt(op, fn):
    global attempts
    attempts += 1
    if attempts % 100 == 0:
        progress()
    try:
        fn()
        return True
    except OSError as e:
        errors[(op, e.strerror)] = errors.get((op, e.strerror), 0) + 1
        return False
existing = ops(f"{d}/100", f"{d}/50")
fresh = ops(f"{d}/new", f"{d}/src")
fresh_again = ops(f"{d}/new", f"{d}/50")
while not os.path.exists(tmp + ".done"):
    # The existing name: every attempt must fail.
    for op, fn in existing.items():
        if attempt(op, fn):
            open(f"{tmp}.{op}_succeeded", "a").close()
    # A fresh name: create it (fails without the key), create it again (must fail), remove it
    # (retried until it works, i.e. until the key is back).
    for op, fn in fresh.items():
        if pending and not remove(f"{d}/new", pending):
            break
        pending = None
        if attempt(op, fn):
            created += 1
            if attempt(op, fresh_again[op]):
                open(f"{tmp}.{op}_twice_succeeded", "a").close()
            pending = op
# Expected failures: EEXIST with the key, ENOKEY without it; link and rename also look up their
# source by its plaintext name, which without the key is ENOENT.
expected = {"File exists", "Required key not available"}
with open(tmp + ".creator", "w") as f:
    f.write(f"{attempts}\n{created}\n")
    for (op, err), n in sorted(errors.items()):
        ok = err in expected or (op in ("link", "rename_noreplace") and err == "No such file or directory")
        f.write(f"{err}: {n}\n" if ok else f"{op} failed unexpectedly: {err}\n")
PY

echo -e "\n# Starting add/remove enckey process"
(
    n=0
    while [ ! -e "$tmp.done" ]; do
        "$ENCFSD" key add "$SCRATCH_MNT" --key-file "$TEST_KEY_FILE" > /dev/null 2>&1
        "$ENCFSD" key remove "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER > /dev/null 2>&1
        n=$((n + 1))
        echo -n c >> "$tmp.cycle-marks"
    done
    echo $n > "$tmp.cycles"
) &

echo -e "\n# Running for a few seconds..."
_621_run_enough() {
    local attempts created eexist enokey
    read -r attempts created eexist enokey < "$tmp.progress" 2>/dev/null || return 1
    (( $(stat -c %s "$tmp.cycle-marks" 2>/dev/null || echo 0) >= 20 && attempts >= 1000 && created >= 10
       && eexist && enokey ))
}
start=$SECONDS
while (( SECONDS - start < runtime )) || ! _621_run_enough; do
    (( SECONDS - start < deadline )) || break
    sleep 0.5
done
echo -e "\n# Stopping subprocesses"
touch "$tmp.done"
wait
(( $(cat "$tmp.cycles") >= 20 )) && echo "key was added and removed many times"
(( $(sed -n 1p "$tmp.creator") >= 1000 )) && echo "many creation attempts were made"
if (( $(sed -n 2p "$tmp.creator") >= 10 )); then
    echo "the fresh name was created many times"
else
    cat "$tmp.creator"   # what the creates failed with, into the diff
fi
# Both outcomes must have occurred: EEXIST while the key was present, ENOKEY while it was absent.
grep -q '^File exists: ' "$tmp.creator" && grep -q '^Required key not available: ' "$tmp.creator" \
    && echo "attempts failed with both EEXIST and ENOKEY"
grep 'failed unexpectedly' "$tmp.creator"

[ "$(_enckey_status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER)" = Absent ] \
    || _rm_enckey "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER > /dev/null
_add_enckey "$SCRATCH_MNT" > /dev/null

echo -e "\n# Checking for duplicate filenames via readdir"
ls "$dir" | grep -x 100
ls "$dir" | sort | uniq -d
# What is left of the fresh name (removing it fails while the key is absent): put back / remove.
[ -e "$dir/src" ] || mv "$dir/new" "$dir/src"
rm -rf "$dir/new"
echo "$(ls "$dir" | wc -l) entries"

echo -e "\n# Checking for unexpected change in inode number"
new_inode=$(stat -c %i "$dir/100")
if [ "$new_inode" != "$inode" ]; then
    echo "Dentry changed inode number $inode => $new_inode!"
fi
stat -c '%F' "$dir/100" "$dir/50"

echo -e "\n# Checking for operations that unexpectedly succeeded on an existing filename"
for op in mkdir mknod mkfifo symlink link rename_noreplace open_excl; do
    if [ -e "$tmp.${op}_succeeded" ]; then
        echo "$op operation(s) on existing filename unexpectedly succeeded!"
    fi
    if [ -e "$tmp.${op}_twice_succeeded" ]; then
        echo "$op operation(s) created the same fresh name twice!"
    fi
done

echo -e "\n# Checking for duplicate no-key names, after a remount without the key"
_rm_enckey "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER > /dev/null
_scratch_cycle_mount
ls "$dir" | sort | uniq -d
echo "$(ls "$dir" | wc -l) entries"
if [ -z "$(ls "$dir" | sort | uniq -d)" ]; then
    echo "no name appears twice"
fi
