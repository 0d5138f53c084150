# Shared set-up for the encfsd ports of the xfstests encrypt group. Sourced by each test.
#
# As in xfstests, each test gets a scratch filesystem whose root is usable (here: an encfsd store
# whose root policy's key, a random "root key", is added at set-up), creates directories, and gives
# them a policy under the fstests test key with `encfsd policy set` (FS_IOC_SET_ENCRYPTION_POLICY in
# xfstests). Output goes to stdout and is compared with tests/<name>.out; paths are filtered to
# SCRATCH_MNT so transcripts are stable.
set -u
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ENCFSD=${ENCFSD:-$REPO/.build/debug/encfsd}
export LC_ALL=C

# The test key of xfstests: bytes 0x01..0x40, identifier 69b2f6edeee720cce0577937eb8a6751.
TEST_KEY_IDENTIFIER=69b2f6edeee720cce0577937eb8a6751

SCRATCH_BASE=$(mktemp -d /tmp/encfsd-fstests.XXXXXX)
chmod 755 "$SCRATCH_BASE"
SCRATCH_STORE=$SCRATCH_BASE/store
SCRATCH_MNT=$SCRATCH_BASE/mnt
TEST_KEY_FILE=$SCRATCH_BASE/test.key
ROOT_KEY_FILE=$SCRATCH_BASE/root.key
mkdir -p "$SCRATCH_MNT"
chmod 755 "$SCRATCH_MNT"
python3 -c 'import sys; sys.stdout.buffer.write(bytes(range(1, 65)))' > "$TEST_KEY_FILE"
"$ENCFSD" key generate -o "$ROOT_KEY_FILE"

# Root's keyring is shared with every other user of encfsd on the machine, and other runs of these
# tests use the same test key (its identifier is fixed by xfstests), so a test may remove only the
# entries it made itself. Every `$ENCFSD key add` goes through a wrapper that records the serials of
# the encfsd: entries it created in root's keyring (run as another user, it records nothing: those
# users' keyrings are the tests' own). A concurrent add by someone else within the few milliseconds
# of one add could be recorded too; nothing else can.
ADDED_SERIALS=$SCRATCH_BASE/added-serials
ENCFSD_REAL=$ENCFSD
ENCFSD=$SCRATCH_BASE/encfsd
cat > "$ENCFSD" <<WRAPPER
#!/usr/bin/env bash
if [ "\${1:-} \${2:-}" = "key add" ] && [ "\$(id -u)" = 0 ]; then
    before=" \$(keyctl rlist @u 2>/dev/null) "
    "$ENCFSD_REAL" "\$@"
    rc=\$?
    for s in \$(keyctl rlist @u 2>/dev/null); do
        case \$before in *" \$s "*) continue ;; esac
        keyctl rdescribe "\$s" 2>/dev/null | grep -q '^user;.*;encfsd:' && echo "\$s" >> "$ADDED_SERIALS"
    done
    exit \$rc
fi
exec "$ENCFSD_REAL" "\$@"
WRAPPER
chmod 755 "$ENCFSD"

# Runs a command as user $1 (uid and gid, no groups), as a login of theirs would: in a session
# keyring of its own that links their user keyring, so the keys they add are theirs to possess
# (setperm, read). Without it the command would inherit the caller's session keyring (scripts/test.sh
# runs in one of its own), through which the user possesses nothing of their own.
_as_user() {
    local uid=$1
    shift
    setpriv --reuid="$uid" --regid="$uid" --clear-groups \
        keyctl session - bash -c 'exec 2>&3 3>&-; keyctl link @u @s >/dev/null 2>&1; exec "$@"' _ "$@" 3>&2 2>/dev/null
}

# Unlinks the entries this test's key adds made from root's keyring, and no one else's.
_purge_keyring() {
    local s
    [ -e "$ADDED_SERIALS" ] || return 0
    for s in $(sort -u "$ADDED_SERIALS"); do keyctl unlink "$s" @u >/dev/null 2>&1; done
    return 0
}

_daemon_pids() { pgrep -f -- "mount $SCRATCH_STORE $SCRATCH_MNT" || true; }

_cleanup() {
    local pids
    pids=$(_daemon_pids)
    if grep -qs " $SCRATCH_MNT " /proc/mounts; then
        fusermount3 -u "$SCRATCH_MNT" 2>/dev/null || umount -l "$SCRATCH_MNT" 2>/dev/null
    fi
    for _ in $(seq 50); do [ -z "$(_daemon_pids)" ] && break; sleep 0.1; done
    [ -n "$(_daemon_pids)" ] && kill -9 $(_daemon_pids) 2>/dev/null
    _purge_keyring
    # run.sh shows a failed test's daemon log: the reason behind an EIO is only there.
    [ -n "${FSTESTS_DAEMON_LOG:-}" ] && cp "$SCRATCH_BASE/daemon.log" "$FSTESTS_DAEMON_LOG" 2>/dev/null
    rm -rf "$SCRATCH_BASE"
}
trap _cleanup EXIT
# A signal (Ctrl-C, a closed pipe) ends the test through its EXIT trap, so cleanup always runs.
trap 'exit 130' INT TERM HUP PIPE

_filter_scratch() { sed -e "s#$SCRATCH_MNT#SCRATCH_MNT#g" -e "s#$SCRATCH_BASE#SCRATCH_BASE#g"; }

# No-key names are ciphertext and differ on every run: transcripts show them as NOKEY_NAME.
_filter_nokey_names() { sed -E 's#(^|/)(~[A-Za-z0-9_-]{43}|[A-Za-z0-9_-]{64,})#\1NOKEY_NAME#g'; }

# Mounts the scratch store without using keys in the keyring, then unlocks its root.
_scratch_mount() {
    "$ENCFSD" mount "$SCRATCH_STORE" "$SCRATCH_MNT" --no-keyring --log-file "$SCRATCH_BASE/daemon.log" "$@" >/dev/null \
        && "$ENCFSD" key add "$SCRATCH_MNT" --key-file "$ROOT_KEY_FILE" >/dev/null
}

_scratch_unmount() {
    local pids
    pids=$(_daemon_pids)
    fusermount3 -u "$SCRATCH_MNT"
    for _ in $(seq 100); do [ -z "$(_daemon_pids)" ] && return 0; sleep 0.1; done
    echo "daemon did not exit after unmount" >&2
}

_scratch_cycle_mount() { _scratch_unmount && _scratch_mount "$@"; }

_scratch_mkfs_encrypted() {
    local out
    out=$("$ENCFSD" init "$SCRATCH_STORE" --key-file "$ROOT_KEY_FILE") || return 1
    ROOT_KEY_IDENTIFIER=${out##* }
    _scratch_mount "$@"
}

# The fscrypt helpers of xfstests (common/encrypt), on encfsd's CLI. Messages are xfs_io's.
_add_enckey() { "$ENCFSD" key add "$1" --key-file "${2:-$TEST_KEY_FILE}" "${@:3}" 2>&1 | _filter_scratch; }
_rm_enckey() { "$ENCFSD" key remove "$1" "$2" "${@:3}" 2>&1 | _filter_scratch; }
_enckey_status() { "$ENCFSD" key status "$1" "$2" 2>&1 | _filter_scratch; }
_set_encpolicy() { "$ENCFSD" policy set "$1" "$2" 2>&1 | _filter_scratch; }
_get_encryption_nonce() { "$ENCFSD" nonce "$1"; }

# An empty directory under the test key's policy, with the key added: the usual start of a test.
_unlocked_encrypted_dir() {
    mkdir "$1" && _set_encpolicy "$1" $TEST_KEY_IDENTIFIER && _add_enckey "$SCRATCH_MNT" > /dev/null
}

# Runs a command, showing its output and errors with paths filtered (xfstests style).
_run() { "$@" 2>&1 | _filter_scratch; }

# renameat2 [-n|-x] OLD NEW, errors shown with paths filtered; returns the syscall's status.
renameat2() {
    local out rc
    out=$(python3 "$REPO/scripts/fstests/renameat2.py" "$@" 2>&1); rc=$?
    [ -z "$out" ] || echo "$out" | _filter_scratch
    return $rc
}

# Drops the kernel's caches of the scratch mount, as xfstests' `echo 2 > drop_caches`.
_drop_caches() { sync; echo 2 > /proc/sys/vm/drop_caches; }

# ---- Helpers of the 581/593/595/429/421 ports ----
# encfsd revokes a claim's keyring entry when its key is wiped; revoked keys stay linked in the
# keyring until the kernel's key garbage collector runs (gc_delay, 300 s). Unlink this test's now.
_a_unlink_revoked_keys() { _purge_keyring; }

# Background loops: start them with `_a_bg CMD...`; CMD should loop while `_a_running`.
# `_a_stop_bg [SECONDS]` asks them to stop and waits (default 10 s); those still running then are
# killed (with their children) and it returns 1. `_a_cleanup` (use it as the EXIT trap) stops them
# and then does the usual _cleanup.
_A_STOP_FILE=$SCRATCH_BASE/.stop-background
_a_bg_pids=()
_a_running() { [ ! -e "$_A_STOP_FILE" ]; }
_a_bg() { "$@" & _a_bg_pids+=($!); }
_a_stop_bg() {
    local pid i hung=0 alive
    [ ${#_a_bg_pids[@]} -eq 0 ] && return 0
    touch "$_A_STOP_FILE"
    for i in $(seq $(( ${1:-10} * 10 ))); do
        alive=0
        for pid in "${_a_bg_pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ $alive -eq 0 ] && break
        sleep 0.1
    done
    for pid in "${_a_bg_pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            hung=1
            pkill -9 -P "$pid" 2>/dev/null
            kill -9 "$pid" 2>/dev/null
        fi
    done
    wait "${_a_bg_pids[@]}" 2>/dev/null
    _a_bg_pids=()
    return $hung
}
_a_cleanup() {
    _a_stop_bg 10
    _cleanup
    _a_unlink_revoked_keys
}
