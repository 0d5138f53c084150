#!/usr/bin/env bash
# Port of xfstests generic/581: non-root use of the key API, and several users sharing one key.
# Each user's add is a claim (status shows user_count and added_by_self from each user's view); a
# user without a claim cannot remove the key (ENOKEY); dropping one claim while others remain
# prints "Removed user's claim ..."; removing for all users needs root (EACCES otherwise); a
# non-root user may hold only a limited number of keys (EDQUOT past it; here --key-quota 5, as
# xfstests sets the user's keyring quota to 5 more keys).
# (The v1-policy parts of generic/581 have no counterpart: encfsd has only v2 policies. Setting a
# policy needs no key present with encfsd, so the "set policy without the key -> ENOKEY" step is
# left out.)
source "$(dirname "$0")/../common.sh"

# Two unprivileged users with no passwd entries, dedicated to this test so that their user
# keyrings can be cleared wholesale at the end.
USER1=15810
USER2=15811
_user_as() { _as_user "$@"; }
_user_do() { _user_as $USER1 "$@" 2>&1 | _filter_scratch; }
_user2_do() { _user_as $USER2 "$@" 2>&1 | _filter_scratch; }

_581_cleanup() {
    _a_cleanup
    local uid
    for uid in $USER1 $USER2; do _user_as "$uid" keyctl clear @u >/dev/null 2>&1; done
    return 0
}
trap _581_cleanup EXIT
trap 'exit 1' INT TERM HUP
for uid in $USER1 $USER2; do _user_as "$uid" keyctl clear @u >/dev/null 2>&1; done

_scratch_mkfs_encrypted -o allow_other --key-quota 5
dir=$SCRATCH_MNT/dir
chmod 777 "$SCRATCH_MNT"
# The test key, readable by the other users.
key=$SCRATCH_BASE/test-key.shared
cp "$TEST_KEY_FILE" "$key"
chmod 644 "$key"

_user_do mkdir "$dir"
echo "# Setting v2 policy as regular user (should succeed)"
_user_do "$ENCFSD" policy set "$dir" $TEST_KEY_IDENTIFIER
echo "# Adding v2 policy key as regular user (should succeed)"
_user_do "$ENCFSD" key add "$SCRATCH_MNT" --key-file "$key"
echo "# Getting key status as regular user"
_user_do "$ENCFSD" key status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
echo "# Getting key status as root"
_enckey_status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
echo "# Creating encrypted file as regular user (should succeed)"
_user_do sh -c "echo contents > $dir/file"
_user_do cat "$dir/file"
echo "# Removing v2 policy key as regular user (should succeed)"
_user_do "$ENCFSD" key remove "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
_user_do "$ENCFSD" key status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
_user_do cat "$dir/file"

_scratch_cycle_mount -o allow_other --key-quota 5	# Clear all keys

echo
echo "# Testing user key quota"
for i in $(seq 6); do
    head -c 64 /dev/urandom > "$SCRATCH_BASE/random-key.$i"
    chmod 644 "$SCRATCH_BASE/random-key.$i"
    _user_do "$ENCFSD" key add "$SCRATCH_MNT" --key-file "$SCRATCH_BASE/random-key.$i" | sed 's/ with identifier .*$//'
done
echo "# Re-adding a key the user already holds, at the quota (should succeed)"
_user_do "$ENCFSD" key add "$SCRATCH_MNT" --key-file "$SCRATCH_BASE/random-key.1" | sed 's/ with identifier .*$//'
echo "# Once the user removes a key, there is room for one more"
id2=$(_user_as $USER1 "$ENCFSD" key add "$SCRATCH_MNT" --key-file "$SCRATCH_BASE/random-key.2" | sed 's/.* //')
_user_do "$ENCFSD" key remove "$SCRATCH_MNT" "$id2" | sed 's/ with identifier .*$//'
_user_do "$ENCFSD" key add "$SCRATCH_MNT" --key-file "$SCRATCH_BASE/random-key.6" | sed 's/ with identifier .*$//'
echo "# The quota is per user: another user may still add keys"
head -c 64 /dev/urandom | _user2_do "$ENCFSD" key add "$SCRATCH_MNT" | sed 's/ with identifier .*$//'
echo "# Root has no quota"
head -c 64 /dev/urandom | "$ENCFSD" key add "$SCRATCH_MNT" 2>&1 | sed 's/ with identifier .*$//'

_scratch_cycle_mount -o allow_other --key-quota 5	# Clear all keys

echo
# Test multiple users adding the same key.
echo "# Adding key as root"
_add_enckey "$SCRATCH_MNT"
echo "# Getting key status as regular user"
_user_do "$ENCFSD" key status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
echo "# Removing key only added by another user (should fail with ENOKEY)"
_user_do "$ENCFSD" key remove "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
echo "# Adding second user of key"
_user_do "$ENCFSD" key add "$SCRATCH_MNT" --key-file "$key"
echo "# Getting key status as regular user"
_user_do "$ENCFSD" key status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
echo "# Adding third user of key"
_user2_do "$ENCFSD" key add "$SCRATCH_MNT" --key-file "$key"
echo "# Getting key status as the third user, as root"
_user2_do "$ENCFSD" key status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
_enckey_status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
echo "# Removing this user's claim to the key"
_user_do "$ENCFSD" key remove "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
echo "# Getting key status as regular user"
_user_do "$ENCFSD" key status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
echo "# Removing the claim again (should fail with ENOKEY)"
_user_do "$ENCFSD" key remove "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
echo "# The key is still present for everyone"
_user_do cat "$dir/file"
echo "# Adding back second user of key"
_user_do "$ENCFSD" key add "$SCRATCH_MNT" --key-file "$key"
echo "# Remove key for \"all users\", as regular user (should fail with EACCES)"
_user_do "$ENCFSD" key remove "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER --all-users
_enckey_status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
echo "# Remove key for \"all users\", as root"
_rm_enckey "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER --all-users
_enckey_status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
_user_do "$ENCFSD" key status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
_user_do cat "$dir/file"

echo
echo "# The last claim removes the key, whoever added first"
_add_enckey "$SCRATCH_MNT"
_user2_do "$ENCFSD" key add "$SCRATCH_MNT" --key-file "$key"
_rm_enckey "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
_enckey_status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
_user2_do cat "$dir/file"
_user2_do "$ENCFSD" key remove "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
_user2_do "$ENCFSD" key status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
_user2_do cat "$dir/file"
