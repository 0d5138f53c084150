#!/usr/bin/env bash
# Runs every test: unit and known-answer tests (swift test), the real-mount tests (pytest on real
# FUSE mounts of the built daemon), a real daemon SIGKILLed 50 times under load, fsx with every
# fallocate mode (scripts/fsx.sh), a part of the mount suite and the kill test with the store on
# bindfs, sshfs and GlusterFS, the ports of the xfstests encrypt group, and the Debian package's
# smoke test (skip it with ENCFSD_SKIP_DEB=1).
# Needs root and /dev/fuse for the mounts. Arguments go to pytest.
#
# Isolation: the stages run in a session keyring of their own (keyctl session encfsd-tests), and the
# tests remove only the keys they made from root's user keyring, which the daemon and `key add` use
# and which is shared with every other user of encfsd on the machine. To prove it, a canary
# `encfsd:` key with an identifier no test uses is planted in that keyring before the stages and
# must still be there, unchanged, after them.
#
# Every stage runs even when an earlier one failed; the run then exits non-zero. The last line is
# the sum over all stages, e.g. `total: 412 passed, 0 failed, 2 skipped`, printed even when the run
# is cut short (a stage whose counts cannot be read counts as one failure).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ${ENCFSD_TEST_SESSION:-} != 1 ]]; then
    command -v keyctl >/dev/null || scripts/install-deps.sh
    # A session keyring of its own, with the user keyring linked so keys there stay possessed.
    exec env ENCFSD_TEST_SESSION=1 keyctl session encfsd-tests \
        bash -c 'keyctl link @u @s >/dev/null && exec "$0" "$@"' "$0" "$@"
fi

LOGS=$(mktemp -d /tmp/encfsd-test-logs.XXXXXX)
declare -A PASSED=() FAILED=() SKIPPED=()
STAGES=()
CANARY_SERIAL=

# Records a stage's counts from its output: the last "N passed[, N failed][, N skipped]"-style
# line (pytest's and the scripts' summaries), or swift-testing's "Test run with N tests".
record() { # record NAME STATUS LOG
    local name=$1 status=$2 log=$3 p=0 f=0 s=0 line
    if [[ $name == "swift test" ]]; then
        line=$(grep -aE 'Test run with [0-9]+ tests?' "$log" | tail -n 1 || true)
        if [[ $line =~ Test\ run\ with\ ([0-9]+)\ test ]]; then
            f=$(grep -aE '^✘ Test .* failed after' "$log" | grep -acv '^✘ Test run with' || true)
            s=$(grep -acE '^. Test .* skipped' "$log" || true)
            p=$((BASH_REMATCH[1] - f - s))
        fi
    else
        line=$(grep -aE '^(=+ )?[0-9]+ (passed|failed|skipped|error)' "$log" | tail -n 1 || true)
        [[ $line =~ ([0-9]+)\ passed ]] && p=${BASH_REMATCH[1]}
        [[ $line =~ ([0-9]+)\ failed ]] && f=${BASH_REMATCH[1]}
        [[ $line =~ ([0-9]+)\ skipped ]] && s=${BASH_REMATCH[1]}
        [[ $line =~ ([0-9]+)\ errors? ]] && f=$((f + BASH_REMATCH[1]))
    fi
    # A failing stage whose output names no failure (it did not get to count) is one failure; a
    # passing stage that prints no counts (the package smoke test) is one pass.
    if ((status != 0 && f == 0)); then f=1; fi
    if ((status == 0 && p + f + s == 0)); then p=1; fi
    STAGES+=("$name")
    PASSED[$name]=$p FAILED[$name]=$f SKIPPED[$name]=$s
}

plant_canary() {
    CANARY_ID=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    CANARY_DESC="encfsd:$CANARY_ID:test-canary"
    head -c 64 /dev/urandom > "$LOGS/canary.key"
    CANARY_SERIAL=$(keyctl padd user "$CANARY_DESC" @u < "$LOGS/canary.key")
}

check_canary() {
    local status=0
    if [[ $(keyctl search @u user "$CANARY_DESC" 2>/dev/null) != "$CANARY_SERIAL" ]]; then
        echo "isolation: FAILED: the canary key $CANARY_DESC (serial $CANARY_SERIAL) is gone from root's keyring" \
             "($(keyctl describe "$CANARY_SERIAL" 2>&1))" >&2
        status=1
    elif ! keyctl pipe "$CANARY_SERIAL" | cmp -s - "$LOGS/canary.key"; then
        echo "isolation: FAILED: the canary key $CANARY_DESC changed" >&2
        status=1
    else
        echo "isolation: the canary key in root's keyring is untouched"
    fi
    keyctl unlink "$CANARY_SERIAL" @u >/dev/null 2>&1 || true
    CANARY_SERIAL=
    echo "$( ((status)) && echo 0 || echo 1) passed, $status failed" > "$LOGS/isolation.log"
    record isolation $status "$LOGS/isolation.log"
}

summary() {
    local rc=$? name p=0 f=0 s=0
    trap - EXIT
    [[ -n $CANARY_SERIAL ]] && check_canary
    ((rc != 0 && ${#STAGES[@]} == 0)) && { STAGES+=("setup"); PASSED[setup]=0 FAILED[setup]=1 SKIPPED[setup]=0; }
    echo
    for name in "${STAGES[@]}"; do
        printf '%-12s %s passed, %s failed, %s skipped\n' "$name:" "${PASSED[$name]}" "${FAILED[$name]}" "${SKIPPED[$name]}"
        p=$((p + PASSED[$name])) f=$((f + FAILED[$name])) s=$((s + SKIPPED[$name]))
    done
    echo "wall time: $SECONDS s (logs in $LOGS)"
    echo "total: $p passed, $f failed, $s skipped"
    ((f == 0 && rc == 0)) || exit 1
    rm -rf "$LOGS"
    exit 0
}
trap summary EXIT

scripts/install-deps.sh
swift build 2>&1 | tail -n 3
plant_canary

status=0
swift test > "$LOGS/swift.log" 2>&1 || status=$?
grep -av '^encfsd: ' "$LOGS/swift.log" | grep -avE '^◇ |^✔ (Suite |Test [^r])' | tail -n 40 || true
record "swift test" $status "$LOGS/swift.log"

export ENCFSD="$PWD/.build/debug/encfsd"
# The request-count tests read the kernel's fuse tracepoints; a fresh machine may not have
# tracefs mounted yet.
if [ "$(id -u)" -eq 0 ] && [ ! -d /sys/kernel/tracing/events ]; then
    mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || echo "test.sh: could not mount tracefs" >&2
fi
status=0
python3 -m pytest -q -p no:cacheprovider Tests/mount "$@" 2>&1 | tee "$LOGS/pytest.log" || status=$?
record pytest $status "$LOGS/pytest.log"

status=0
scripts/crash-test.sh 2>&1 | tee "$LOGS/crash.log" || status=$?
record crash-test $status "$LOGS/crash.log"

# Stores on bindfs, sshfs and GlusterFS (each set up and torn down by the stage itself).
status=0
scripts/backing-tests.sh 2>&1 | tee "$LOGS/backings.log" || status=$?
record backings $status "$LOGS/backings.log"

status=0
scripts/fsx.sh 2>&1 | tee "$LOGS/fsx.log" || status=$?
record fsx $status "$LOGS/fsx.log"

status=0
scripts/fstests/run.sh 2>&1 | tee "$LOGS/fstests.log" || status=$?
record fstests $status "$LOGS/fstests.log"

# The Debian package, installed and removed again (a release build: a few minutes more).
if [ "$(id -u)" -eq 0 ] && [ -z "${ENCFSD_SKIP_DEB:-}" ]; then
    status=0
    scripts/deb-smoke.sh 2>&1 | tee "$LOGS/deb.log" || status=$?
    record "deb smoke" $status "$LOGS/deb.log"
fi
