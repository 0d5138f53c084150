#!/usr/bin/env bash
# Port of xfstests generic/593: adding a key by the serial of a kernel keyring key holding the
# raw key, instead of giving the raw key directly; and the validation of such keys.
# fscrypt takes a "fscrypt-provisioning" key there; no user-space daemon can read one, so encfsd
# takes a `user` key (payload: the raw key, 16 to 64 bytes), read with the caller's permissions
# and only if the caller owns it. The v1-policy half of generic/593 has no counterpart (encfsd
# has only v2 policies), nor has the provisioning payload's type field.
source "$(dirname "$0")/../common.sh"

OTHER_USER=15930	# no passwd entry; used only by this test
_other_as() { _as_user $OTHER_USER "$@"; }
# Keys this test puts into the keyring itself. Their descriptions do not start with "encfsd:",
# so that no other test's keyring purge touches them while this test runs.
_593_padd() { keyctl padd user "fstests-593:$1" @u; }
_593_unlink_own_keys() {
    local s
    for s in $(keyctl rlist @u 2>/dev/null); do
        keyctl rdescribe "$s" 2>/dev/null | grep -q ';fstests-593:' && keyctl unlink "$s" @u >/dev/null 2>&1
    done
}
_593_cleanup() {
    _a_cleanup
    _593_unlink_own_keys
    _other_as keyctl clear @u >/dev/null 2>&1
    return 0
}
trap _593_cleanup EXIT
trap 'exit 1' INT TERM HUP
_other_as keyctl clear @u >/dev/null 2>&1
_593_unlink_own_keys

_scratch_mkfs_encrypted -o allow_other
dir=$SCRATCH_MNT/dir
_add_by_serial() { "$ENCFSD" key add "$SCRATCH_MNT" --keyring-id "$1" 2>&1 | _filter_scratch; }

# First add the key in the regular way (raw key given directly), create an encrypted file with
# some contents, and remove the key. After this, the encrypted file is no longer readable.
echo -e "\n# Adding key to filesystem"
_add_enckey "$SCRATCH_MNT"

echo -e "\n# Creating encrypted file"
mkdir "$dir"
_set_encpolicy "$dir" $TEST_KEY_IDENTIFIER
echo "contents" > "$dir/file"

echo -e "\n# Removing key from filesystem"
_rm_enckey "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
_run cat "$dir/file"

# Now add the key back via a keyring key which contains the raw key. After this, the encrypted
# file is readable again.
echo -e "\n# Adding the raw key to the keyring as a user key"
serial=$(_593_padd test < "$TEST_KEY_FILE")
keyctl rdescribe "$serial" | cut -d';' -f1,5

echo -e "\n# Adding key to filesystem via the keyring key"
_add_by_serial "$serial"
_enckey_status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER

echo -e "\n# Reading encrypted file"
_run cat "$dir/file"

echo -e "\n# Cleaning up"
_rm_enckey "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
_enckey_status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER

# A regular user does the same with a key of their own keyring, with the permissions keyctl gives
# a new key (possessor: all; owner: view only): the caller can read it, as its possessor, so it
# must be accepted, as fscrypt accepts any key the caller can search.
echo -e "\n# Adding the key via a keyring key, as a regular user"
serial=$(_other_as keyctl padd user fstests-593:user @u < "$TEST_KEY_FILE")
_other_as "$ENCFSD" key add "$SCRATCH_MNT" --keyring-id "$serial" 2>&1 | _filter_scratch
_other_as "$ENCFSD" key status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER 2>&1
_other_as cat "$dir/file" 2>&1 | _filter_scratch
_other_as "$ENCFSD" key remove "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER 2>&1
_enckey_status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER

echo
echo "# ================"
echo "# Validation tests"
echo "# ================"

echo -e "\n# Invalid payloads are refused with EINVAL"
# The kernel itself refuses to create an empty `user` key, so an empty payload never reaches
# encfsd: show the kernel's refusal.
echo "# ... raw key empty (the kernel refuses to create the keyring key)"
keyctl padd user fstests-593:empty @u < /dev/null 2>&1
echo "# ... raw key too small (15 bytes)"
_add_by_serial "$(head -c 15 "$TEST_KEY_FILE" | _593_padd small)"
echo "# ... raw key too large (65 bytes)"
_add_by_serial "$( (cat "$TEST_KEY_FILE"; printf 'A') | _593_padd large65)"
echo "# ... raw key too large (128 bytes)"
_add_by_serial "$(cat "$TEST_KEY_FILE" "$TEST_KEY_FILE" | _593_padd large128)"
echo "# The smallest valid raw key (16 bytes) is accepted"
_add_by_serial "$(head -c 16 "$TEST_KEY_FILE" | _593_padd small16)"
_rm_enckey "$SCRATCH_MNT" 101164106c6bebc304b9826bfb9d063b
echo "# The test key is still absent"
_enckey_status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER

echo -e "\n# Only keys of type user can be added (EKEYREJECTED otherwise)"
echo "# ... a logon key"
# (A logon key's description needs a "prefix:"; "encfsd:" is kept out of the way of the purges.)
serial=$(keyctl add logon fstests-593:logon1 "somepayloadsomepayload" @u)
_add_by_serial "$serial"
echo "# ... a logon key holding a valid raw key"
serial=$(keyctl padd logon fstests-593:logon2 @u < "$TEST_KEY_FILE")
_add_by_serial "$serial"
echo "# ... a keyring"
serial=$(keyctl newring fstests-593:ring @u)
_add_by_serial "$serial"
echo "# ... a serial that names no key (ENOKEY)"
serial=$(_593_padd gone < "$TEST_KEY_FILE")
keyctl invalidate "$serial"
_add_by_serial "$serial"
_enckey_status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER

echo -e "\n# A key owned by another user is refused, even when readable by everyone"
echo "# ... root adding another user's key"
serial=$(_other_as keyctl padd user fstests-593:other @u < "$TEST_KEY_FILE")
_other_as keyctl setperm "$serial" 0x3f3f3f3f
_add_by_serial "$serial"
_enckey_status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
echo "# ... another user adding root's key"
serial=$(_593_padd root < "$TEST_KEY_FILE")
keyctl setperm "$serial" 0x3f3f3f3f
_other_as "$ENCFSD" key add "$SCRATCH_MNT" --keyring-id "$serial" 2>&1 | _filter_scratch
_enckey_status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
echo "# ... the owner adding it"
_add_by_serial "$serial"
_enckey_status "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
_rm_enckey "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER
