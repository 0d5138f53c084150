#!/usr/bin/env bash
# The real process, killed (docs: crash-safety.md, promise P1, item 3): runs a mixed workload on a
# real mount, kills the daemon with SIGKILL at a random moment, remounts, reads every file in full
# and checks that no read fails and that every file is in an allowed state (its last completed
# flush, or the flush in flight), so that no fsynced state is lost. Repeats; prints kills survived,
# files checked and bytes verified, and ends with "N passed, N failed" (kills survived, violations).
# Fails when any kill went unchecked or none landed inside a logged operation.
#
# Usage: scripts/crash-test.sh [--kills N] [--long] [--seed S] [--keep-going] [--keep-on-failure DIR]
#                              [--store-in DIR]
#
#   --kills N   kill the daemon N times (default 50, a CI-sized run of a minute or two)
#   --long      500 kills
#   --seed S    seed of the workload and of the kill delays (printed at start; default random).
#               The workload's operations of each round are reproducible from the seed; where the
#               kill lands depends on timing.
#   --keep-going  report a violation found by the check and go on (from what is on disk)
#               instead of stopping at the first one; exits non-zero at the end if there was any
#   --keep-on-failure DIR
#               on a violation, copy the store, key, logs and model there (default
#               /tmp/encfsd-crash-failure.XXXXXX)
#   --store-in DIR
#               put the store in a new directory under DIR (a network or FUSE backing; see
#               scripts/backing-tests.sh) instead of the work directory
#
# The daemon binary is $ENCFSD (default .build/debug/encfsd, built if missing), copied into the
# work directory first so that a rebuild during the run does not disturb it. Needs root and
# /dev/fuse. The workload and checker are scripts/crash_workload.py (its docstring describes the
# model of allowed states). Everything lives in its own mktemp -d directory, which is removed on
# exit along with the mount, the daemon and the keys this run added to the user keyring.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ENCFSD=${ENCFSD:-$REPO/.build/debug/encfsd}
WORKLOAD="$REPO/scripts/crash_workload.py"

usage() { sed -n '2,29p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "crash-test: $*" >&2; exit 1; }

KILLS=50 SEED= KEEP= KEEP_GOING=() STORE_IN=
while (($#)); do
    case $1 in
        --kills) KILLS=${2:?--kills needs a number}; shift ;;
        --long) KILLS=500 ;;
        --seed) SEED=${2:?--seed needs a value}; shift ;;
        --keep-going) KEEP_GOING=(--keep-going) ;;
        --keep-on-failure) KEEP=${2:?}; shift ;;
        --store-in) STORE_IN=${2:?--store-in needs a directory}; shift ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage 2 ;;
    esac
    shift
done
[[ $KILLS =~ ^[0-9]+$ ]] && ((KILLS > 0)) || die "--kills wants a positive number, not '$KILLS'"
: "${SEED:=$(( (RANDOM << 15 | RANDOM) % 1000000000 ))}"
[[ $SEED =~ ^[0-9]+$ ]] || die "--seed wants a number, not '$SEED'"

if [[ ! -x $ENCFSD ]]; then
    echo "building encfsd (no $ENCFSD)"
    (cd "$REPO" && swift build 2>&1 | tail -n 2)
    [[ -x $ENCFSD ]] || die "no encfsd binary at $ENCFSD after building"
fi
command -v fusermount3 >/dev/null || die "fusermount3 is missing (apt-get install fuse3)"
command -v keyctl >/dev/null || die "keyctl is missing (apt-get install keyutils)"
PY=$(python3 -c 'import sys; print(sys.executable)') || die "python3 is missing"

T=$(mktemp -d /tmp/encfsd-crash.XXXXXX) || die "mktemp failed"
STORE=$T/store MNT=$T/mnt KEY=$T/master.key DLOG=$T/daemon.log WORK=$T/work
STORE_DIR=
if [[ -n $STORE_IN ]]; then
    STORE_DIR=$(mktemp -d "$STORE_IN/encfsd-crash.XXXXXX") || die "cannot make a directory in $STORE_IN"
    STORE=$STORE_DIR/store
fi
mkdir -p "$MNT" "$WORK"
# A private copy of the binary: a rebuild during the run must not change or block it.
for _ in 1 2 3 4 5; do
    cp "$ENCFSD" "$T/encfsd" 2>/dev/null && "$T/encfsd" --help >/dev/null 2>&1 && break
    sleep 2
done
"$T/encfsd" --help >/dev/null 2>&1 || { rm -rf "$T"; die "cannot copy and run $ENCFSD"; }
ENCFSD_SRC=$ENCFSD ENCFSD=$T/encfsd
KEY_ID= WPID= DPID= FAILED=0

mounted() { grep -qs " $MNT " /proc/mounts; }
daemon_pid() { pgrep -f -- "mount $STORE $MNT" | head -n 1; }
# True once the process is gone or a zombie (its files, /dev/fuse among them, are closed).
dead() { [[ ! -e /proc/$1/stat ]] || [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) == Z ]]; }

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $WPID ]] && kill -0 "$WPID" 2>/dev/null; then kill -9 "$WPID" 2>/dev/null; wait "$WPID" 2>/dev/null; fi
    local pid
    pid=$(daemon_pid)
    if mounted; then fusermount3 -u "$MNT" 2>/dev/null || fusermount3 -uz "$MNT" 2>/dev/null; fi
    if [[ -n $pid ]]; then
        for _ in $(seq 50); do dead "$pid" && break; sleep 0.1; done
        dead "$pid" || kill -9 "$pid" 2>/dev/null
    fi
    if [[ -n $KEY_ID ]]; then
        local s d
        for s in $(keyctl rlist @u 2>/dev/null); do
            d=$(keyctl rdescribe "$s" 2>/dev/null) || continue
            # "encfsd:<id>", or "encfsd:<id>:<nonce>" where every add makes its own entry
            [[ $d == *";encfsd:$KEY_ID" || $d == *";encfsd:$KEY_ID:"* ]] && keyctl unlink "$s" @u >/dev/null 2>&1
        done
    fi
    if ((FAILED)); then
        local keep=${KEEP:-$(mktemp -d /tmp/encfsd-crash-failure.XXXXXX)}
        mkdir -p "$keep" && cp -a "$STORE" "$KEY" "$DLOG" "$WORK" "$keep/" 2>/dev/null
        echo "crash-test: store, key, daemon log, workload logs and model kept in $keep" >&2
    fi
    rm -rf "$T"
    [[ -n $STORE_DIR ]] && rm -rf "$STORE_DIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() {
    FAILED=1
    echo "crash-test: FAILED (seed $SEED, round $ROUND, after $((ROUND - 1)) of $KILLS kills): $*" >&2
    [[ -e $WORK/state.json ]] && summary
    exit 1
}

summary() { # prints the counts so far; sets S and SURVIVED
    declare -gA S=()
    local k v
    while IFS='=' read -r k v; do S[$k]=$v; done < <("$PY" "$WORKLOAD" stats --work "$WORK")
    [[ -n ${S[rounds_checked]:-} ]] || return 0
    RECOVERED=$(grep -c "recovered an interrupted write" "$DLOG" 2>/dev/null)
    SURVIVED=$((S[rounds_checked] - S[violations]))
    if ((S[violations] > 0)); then
        echo "crash-test: violations after ${S[violations]} of $KILLS kills:" >&2
        cat "$WORK/violations.txt" >&2
    fi
    if ((FAILED || S[violations] > 0)); then RESULT=FAILED; else RESULT=passed; fi
    echo "crash-test: $RESULT in $((SECONDS - START)) s (seed $SEED)"
    echo "  workload: ${S[ops_acked]} logged operations acknowledged (flush points, creates, renames, unlinks; ${S[fsyncs_acked]} of them fsync/fdatasync), ${S[writes]} writes of ${S[bytes_written]} bytes"
    echo "  kills inside a logged operation: ${S[kills_in_flight]} (old state found ${S[in_flight_old]}, new ${S[in_flight_new]}, no difference ${S[in_flight_same]}); workload stopped by ${S[stop_errnos]}"
    echo "  kills with a file left dirty for 1 s or more: ${S[kills_timer_eligible]} (a timer-flushed state found in ${S[timer_state_found]})"
    echo "  daemon log: $RECOVERED \"recovered an interrupted write\""
    echo "kills survived: $SURVIVED"
    echo "files checked: ${S[files_checked]}"
    echo "bytes verified: ${S[bytes_verified]}"
}

mount_store() {
    "$ENCFSD" mount "$STORE" "$MNT" --no-keyring --log-file "$DLOG" >/dev/null || fail "mount failed"
    local out
    out=$("$ENCFSD" key add "$MNT" --key-file "$KEY") || fail "key add failed"
    [[ $out == *"Added encryption key"* ]] || fail "key add said: $out"
    KEY_ID=${out##* }
    DPID=$(daemon_pid)
    [[ -n $DPID ]] || fail "no daemon process for $MNT"
}

# Runs the checker on what the previous round left, then (with --run) the workload, in the
# background; its stderr goes to $WORK/out.<round>.
start_round() {
    "$PY" "$WORKLOAD" round --mnt "$MNT" --work "$WORK" --round "$ROUND" --seed "$SEED" "${KEEP_GOING[@]}" "$@" \
        >"$WORK/out.$ROUND" 2>&1 &
    WPID=$!
}

finish_workload() { # waits for the workload (at most 60 s); returns its exit status
    local i
    for ((i = 0; i < 600; i++)); do kill -0 "$WPID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$WPID" 2>/dev/null; then
        kill -9 "$WPID" 2>/dev/null; wait "$WPID" 2>/dev/null; WPID=
        fail "the workload hung (no exit 60 s after the kill)"
    fi
    wait "$WPID"; local rc=$?; WPID=
    return $rc
}

echo "crash-test: seed $SEED, $KILLS kills, encfsd $ENCFSD_SRC (sha256 $(sha256sum "$ENCFSD" | cut -c1-12)), work dir $T"
RANDOM=$SEED
START=$SECONDS
"$ENCFSD" key generate -o "$KEY" >/dev/null || die "key generate failed"
"$ENCFSD" init "$STORE" --key-file "$KEY" >/dev/null || die "init failed"

for ((ROUND = 1; ROUND <= KILLS; ROUND++)); do
    mount_store
    start_round --run
    for ((i = 0; i < 600; i++)); do
        [[ -e $WORK/ready.$ROUND ]] && break
        kill -0 "$WPID" 2>/dev/null || break
        sleep 0.05
    done
    if [[ ! -e $WORK/ready.$ROUND ]]; then
        finish_workload
        cat "$WORK/out.$ROUND" >&2
        fail "the check after the kill (or the start of the next workload) failed (see above)"
    fi
    grep -s -A50 '^VIOLATION' "$WORK/out.$ROUND" >&2
    delay=$((50 + RANDOM % 451))
    sleep "$(printf '0.%03d' "$delay")"
    if ! kill -0 "$WPID" 2>/dev/null; then
        finish_workload
        cat "$WORK/out.$ROUND" >&2
        fail "the workload stopped before the daemon was killed, in round $ROUND (see above)"
    fi
    : >"$WORK/killed.$ROUND"
    kill -9 "$DPID" 2>/dev/null || fail "the daemon (pid $DPID) was already gone at the kill"
    if ! finish_workload; then
        cat "$WORK/out.$ROUND" >&2
        fail "the workload failed (see above)"
    fi
    for ((i = 0; i < 100; i++)); do dead "$DPID" && break; sleep 0.05; done
    dead "$DPID" || fail "the daemon (pid $DPID) survived SIGKILL for 5 s"
    fusermount3 -uz "$MNT" || fail "lazy unmount failed"
    if (( ROUND % 10 == 0 )); then echo "crash-test: $ROUND kills ($((SECONDS - START)) s)"; fi
done

# The last kill's state: remount, check, then a clean unmount.
mount_store
start_round
if ! finish_workload; then
    cat "$WORK/out.$ROUND" >&2
    fail "the check after the last kill failed (see above)"
fi
fusermount3 -u "$MNT" || fail "unmount failed"
for ((i = 0; i < 100; i++)); do dead "$DPID" && break; sleep 0.05; done

summary
# A run that checked nothing proves nothing: every kill must have been checked, and some of them
# must have landed inside a logged operation (else only quiet moments were tested).
[[ -n ${S[rounds_checked]:-} ]] || fail "the checker's statistics are empty: nothing was checked"
((S[rounds_checked] == KILLS)) || fail "only ${S[rounds_checked]} of $KILLS kills were checked"
((S[kills_in_flight] > 0)) || fail "no kill landed inside a logged operation"
echo "$SURVIVED passed, ${S[violations]} failed"
if ((S[violations] > 0)); then FAILED=1; exit 1; fi
