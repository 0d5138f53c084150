#!/usr/bin/env bash
# Port of xfstests generic/435: without the key, long names (over 32 bytes, up to NAME_MAX) are
# presented as no-key names that do not collide, even though they are abbreviated: every entry
# has a distinct no-key name that looks up its own inode, and all of them can be removed.
#
# The kernel test uses 100,000 names; a FUSE round trip per file makes that too slow here, so this
# uses 4,000 names of 33..37 bytes and 1,000 of 255 bytes, all differing only in their last bytes.
source "$(dirname "$0")/../common.sh"
_scratch_mkfs_encrypted
edir=$SCRATCH_MNT/edir
_unlocked_encrypted_dir "$edir"

echo "# Creating files with long names"
long=$(head -c 251 /dev/zero | tr '\0' x)
(cd "$edir" && seq -f "abcdefghijklmnopqrstuvwxyz012345%.0f" 4000 | xargs touch \
    && seq -f "$long%04.0f" 1000 | xargs touch)
echo "# With the key: names, and distinct inodes"
ls "$edir" | wc -l
find "$edir" -type f -printf '%i\n' | sort -u | wc -l
ls "$edir" | awk '{ print length($0) }' | sort -n | uniq -c

_rm_enckey "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER > /dev/null
_scratch_cycle_mount

echo "# Without the key: no-key names, distinct names, distinct inodes (by lookup of each name)"
ls "$edir" | wc -l
ls "$edir" | sort -u | wc -l
ls "$edir" | LC_ALL=C grep -c '[^[:print:]]'
(cd "$edir" && ls | sed "s,^,./," | xargs stat -c %i) | sort -u | wc -l
echo "# Removing them all"
rm -rf "$edir" 2>&1 | head -n 10 | _filter_scratch | _filter_nokey_names
_run stat "$edir"
