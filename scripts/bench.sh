#!/usr/bin/env bash
# Side-by-side benchmark: encfsd against gocryptfs, securefs and CryFS, a plain directory and the
# FUSE floor (libfuse's own passthrough_hp: no crypto, same kernel and libfuse), on the same
# machine in one run, rounds interleaved across filesystems.
#
# Usage: sudo scripts/bench.sh [--quick] [--rounds N] [--size MiB] [--backing tmpfs|disk|both|gluster]
#                              [--only fs1,fs2,...] [--runtime S] [--files N] [--no-save]
#                              [--baseline BINARY]
#
#   --quick          128 MiB, 1 round, tmpfs backing only, fio 3 s per job (a few minutes)
#   --rounds N       rounds per backing; medians are reported (default 3)
#   --size MiB       size of the streaming file and of the fio random-I/O file (default 1024)
#   --backing B      tmpfs (an 8 GiB tmpfs it mounts), disk (a directory under /var/tmp), both
#                    (default), or gluster: a one-brick GlusterFS volume whose glusterd and brick
#                    (on /var/tmp) run in a network namespace of their own, mounted with the FUSE
#                    client (Tests/mount/backings.py; every filesystem's store on the same volume)
#   --only LIST      comma-separated subset of: plain,floor,encfsd,baseline,gocryptfs,securefs,cryfs
#   --runtime S      seconds per fio job (default 10)
#   --files N        files in the create+fsync test (default 1000)
#   --no-save        print the tables only; don't write docs/bench/YYYY-MM-DD-HHMM.md
#   --baseline BIN   also run another encfsd binary (an older commit's release build) as the
#                    column `baseline`, interleaved with the others, with an `encfsd / baseline` row
#   --scale [...]    instead: the scale benchmark (scripts/bench-scale.sh: per-file cost at 10k,
#                    100k and 1M files, daemon held to 1,024 descriptors); later arguments go to it
#   --requests       instead of the timed rounds: one pass per filesystem on tmpfs of untar,
#                    ls -lR, read-all, rm -rf and create+fsync, each counting the mount's FUSE
#                    requests by opcode and their time from send to answer from the kernel's
#                    fuse tracepoints (scripts/fuse_requests.py; Linux 6.16 or later), peers
#                    included; report docs/bench/YYYY-MM-DD-HHMM-requests.md
#
# Each filesystem in each round gets a fresh store and mount, and runs, in order:
# streaming write (dd 1 MiB blocks, fsync at end), streaming read after dropping caches,
# fio 4 KiB random read/write at queue depth 1 (psync) and 16 (libaio) on that file (direct I/O
# where the filesystem accepts O_DIRECT), untar of a fixed ~9k-file subset of linux-source-6.1,
# ls -lR and read-every-file after dropping caches, rm -rf, and create+fsync of small files.
# The peak resident memory (VmHWM) of each daemon is read just before it is unmounted.
# FUSE requests per operation (write per MiB, untar and read-all per file, ls -lR and rm -rf per
# entry) are counted for encfsd (`encfsd status --json`) and the floor, outside the timings.
#
# The floor is example/passthrough_hp.cc from the Debian source package of the installed libfuse
# (apt-get source; a deb-src entry is added if apt has none), with a request counter added
# (scripts/bench-floor-count.hpp), built with g++ -O2 as libfuse's meson build would configure it
# on Linux (utimensat, posix_fallocate, xattrs). If it cannot be fetched or built, the column is
# skipped with a message.
#
# Needs root (mounts, drop_caches, apt-get). Installs gocryptfs securefs cryfs fio
# linux-source-6.1 python3 fuse3 g++ pkg-config libfuse3-dev if missing, and builds encfsd (swift build -c release) if the
# binary is missing or older than Sources. Unmounts everything it mounted and removes its work
# directory on exit, failure or Ctrl-C.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPER="$REPO/scripts/bench_helper.py"
ALL_FS=(plain floor encfsd baseline gocryptfs securefs cryfs)
PASS=bench-password-not-secret
STEP_TIMEOUT=${BENCH_STEP_TIMEOUT:-1200}
# Extra `encfsd mount` arguments, for A/B runs of a mount option (e.g. "-o no_writeback_cache").
ENCFSD_OPTIONS=${BENCH_ENCFSD_OPTIONS:-}
# Extra `encfsd init` arguments for the encfsd and the baseline columns (e.g. "--extent-size 4096").
ENCFSD_INIT_OPTIONS=${BENCH_ENCFSD_INIT_OPTIONS:-}
BASELINE_INIT_OPTIONS=${BENCH_BASELINE_INIT_OPTIONS:-}

usage() { sed -n '2,29p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "bench.sh: $*" >&2; exit 1; }

# ---------------------------------------------------------------- arguments
QUICK=0 ROUNDS= SIZE= BACKING= ONLY= RUNTIME= NFILES=1000 SAVE=1 BASELINE= REQUESTS=0
while (($#)); do
    case $1 in
        --scale) shift; exec "$REPO/scripts/bench-scale.sh" "$@" ;;
        --quick) QUICK=1 ;;
        --requests) REQUESTS=1 ;;
        --rounds) ROUNDS=${2:?}; shift ;;
        --size) SIZE=${2:?}; shift ;;
        --backing) BACKING=${2:?}; shift ;;
        --only) ONLY=${2:?}; shift ;;
        --runtime) RUNTIME=${2:?}; shift ;;
        --files) NFILES=${2:?}; shift ;;
        --no-save) SAVE=0 ;;
        --baseline) BASELINE=${2:?}; shift ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage 2 ;;
    esac
    shift
done
if ((REQUESTS)); then
    [[ -z $BACKING || $BACKING == tmpfs ]] || die "--requests runs on tmpfs only"
    BACKING=tmpfs ROUNDS=1
    python3 "$REPO/scripts/fuse_requests.py" available || die "--requests: this kernel has no fuse:fuse_request_send tracepoint (Linux 6.16 or later)"
fi
if ((QUICK)); then
    : "${ROUNDS:=1}" "${SIZE:=128}" "${BACKING:=tmpfs}" "${RUNTIME:=3}"
else
    : "${ROUNDS:=3}" "${SIZE:=1024}" "${BACKING:=both}" "${RUNTIME:=10}"
fi
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive integer"
[[ $SIZE =~ ^[1-9][0-9]*$ ]] || die "--size must be a positive integer (MiB)"
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "--runtime must be a positive integer (seconds)"
[[ $NFILES =~ ^[1-9][0-9]*$ ]] || die "--files must be a positive integer"
case $BACKING in
    tmpfs|disk|gluster) BACKINGS=("$BACKING") ;;
    both) BACKINGS=(tmpfs disk) ;;
    *) die "--backing must be tmpfs, disk, both or gluster" ;;
esac
FSS=()
if [[ -n $ONLY ]]; then
    IFS=, read -ra want <<<"$ONLY"
    for fs in "${ALL_FS[@]}"; do
        for w in "${want[@]}"; do [[ $w == "$fs" ]] && FSS+=("$fs"); done
    done
    for w in "${want[@]}"; do
        [[ " ${ALL_FS[*]} " == *" $w "* ]] || die "--only: unknown filesystem '$w'"
    done
else
    FSS=("${ALL_FS[@]}")
fi
if [[ -z $BASELINE ]]; then
    FSS=("${FSS[@]/baseline}"); read -ra FSS <<<"${FSS[*]}"
else
    [[ -x $BASELINE ]] || die "--baseline: $BASELINE is not an executable"
    [[ " ${FSS[*]} " == *" baseline "* ]] || FSS+=(baseline)
fi
((${#FSS[@]})) || die "--only selected nothing"
[[ $(id -u) -eq 0 ]] || die "must run as root (mounts, drop_caches, apt-get)"
want_fs() { [[ " ${FSS[*]} " == *" $1 "* ]]; }

# ---------------------------------------------------------------- work directory and cleanup
WORK=$(mktemp -d /var/tmp/encfsd-bench.XXXXXX) || die "mktemp failed"
LOG="$WORK/bench.log"
RESULTS="$WORK/results.tsv"
META="$WORK/meta.tsv"
: >"$RESULTS"; : >"$META"
REPORTED=0
declare -A DAEMON_PIDS=()   # pid -> name, every daemon this run started and may still be running

alive() {  # alive PID: running and not a zombie
    local st
    st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [[ -n $st && $st != Z ]]
}
our_mounts() {  # FUSE and tmpfs mounts under $WORK, deepest first
    awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r
}
cleanup() {
    local rc=$? m pid i
    trap - EXIT INT TERM HUP
    [[ -n ${SAVED_REPORTING_ORDER:-} ]] && echo "$SAVED_REPORTING_ORDER" >"$REPORTING_ORDER" 2>/dev/null
    for m in $(our_mounts); do
        if grep -q " $m fuse" /proc/mounts; then
            fusermount3 -u "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null
        fi
    done
    for pid in "${!DAEMON_PIDS[@]}"; do
        for i in $(seq 50); do alive "$pid" || break; sleep 0.2; done
        if alive "$pid"; then
            echo "cleanup: ${DAEMON_PIDS[$pid]} daemon $pid still running after unmount; killing" >&2
            kill -TERM "$pid" 2>/dev/null; sleep 2; kill -KILL "$pid" 2>/dev/null
        fi
    done
    # A request trace killed before its own cleanup leaves its tracefs instance (kernel buffers).
    rmdir /sys/kernel/tracing/instances/encfsd-requests-* 2>/dev/null
    [[ -e $WORK/gluster/backing.json ]] && python3 "$REPO/Tests/mount/backings.py" down "$WORK/gluster"
    for m in $(our_mounts); do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
    done
    if ((!REPORTED)) && [[ -s $RESULTS ]]; then
        echo "partial results (run did not finish):" >&2
        python3 "$HELPER" report "$RESULTS" "$META" /dev/null >&2 2>/dev/null
    fi
    if [[ -z $(our_mounts) ]]; then
        rm -rf --one-file-system "$WORK"
    else
        echo "cleanup: mounts remain under $WORK:" >&2; our_mounts >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT
trap 'echo "terminated" >&2; exit 143' TERM HUP

log() { echo "[$(date +%T)] $*" | tee -a "$LOG" >&2; }
meta() { local IFS=$'\t'; echo "$*" >>"$META"; }

# ---------------------------------------------------------------- dependencies and build
PKGS=(gocryptfs securefs cryfs fio linux-source-6.1 python3 fuse3 g++ pkg-config libfuse3-dev)
[[ $BACKING == gluster ]] && PKGS+=(glusterfs-server glusterfs-client iproute2)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing: ${missing[*]}"
    apt-get update -qq >>"$LOG" 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >>"$LOG" 2>&1 \
        || die "apt-get install ${missing[*]} failed (see output above)"
fi
LINUX_TAR=$(ls /usr/src/linux-source-6.1.tar.xz 2>/dev/null) || die "no /usr/src/linux-source-6.1.tar.xz"

BIN="$REPO/.build/release/encfsd"
BUILD_NOTE=
if want_fs encfsd; then
    if [[ ! -x $BIN ]] || [[ -n $(find "$REPO/Sources" "$REPO/Package.swift" -newer "$BIN" -print -quit) ]]; then
        log "building encfsd (swift build -c release)"
        [[ -x $REPO/scripts/install-deps.sh ]] && "$REPO/scripts/install-deps.sh" >>"$LOG" 2>&1
        if ! (cd "$REPO" && swift build -c release) >"$WORK/build.log" 2>&1; then
            grep -E 'error:' "$WORK/build.log" | head -n 10 >&2
            [[ -x $BIN ]] || die "swift build -c release failed and there is no binary"
            BUILD_NOTE=" (WARNING: release build of the current Sources failed; benchmarked the older binary)"
            log "release build failed; using the existing, older binary"
        fi
    fi
    # A private copy, so a rebuild in the work tree during the run can't swap the binary.
    cp "$BIN" "$WORK/encfsd" || die "cannot copy $BIN"
    ENCFSD="$WORK/encfsd"
    ENCFSD_KEY="$WORK/encfsd.key"
    "$ENCFSD" key generate -o "$ENCFSD_KEY" >>"$LOG" 2>&1 || die "encfsd key generate failed"
fi
if want_fs baseline; then
    cp "$BASELINE" "$WORK/encfsd-baseline" || die "cannot copy $BASELINE"
    ENCFSD_BASELINE="$WORK/encfsd-baseline"
    BASELINE_KEY="$WORK/baseline.key"
    "$ENCFSD_BASELINE" key generate -o "$BASELINE_KEY" >>"$LOG" 2>&1 || die "baseline: encfsd key generate failed"
fi

# ---------------------------------------------------------------- the floor: passthrough_hp
FLOOR_VERSION=
if want_fs floor; then
    log "building the floor (passthrough_hp from the fuse3 source package)"
    # Its progress and errors to the log, and to the terminal as well: the log goes with $WORK.
    if ! FLOOR_VERSION=$("$REPO/scripts/build-floor.sh" "$WORK" 2> >(tee -a "$LOG" >&2)); then
        log "floor: skipping the floor column"
        meta note "the floor column (passthrough_hp) was skipped: it could not be fetched or built (see the log)"
        FSS=("${FSS[@]/floor}"); read -ra FSS <<<"${FSS[*]}"
    fi
fi

# ---------------------------------------------------------------- guest memory held for the run
# On a virtual machine whose balloon reports free pages back to the host (page_reporting), every
# page freed is handed back within seconds and the next first touch of it faults into the host:
# measured here, 360-400 MB/s for writes into fresh tmpfs pages against 2.1-2.4 GB/s into pages
# the guest kept. The streaming columns would then measure which filesystem met returned pages
# (PERFORMANCE.md, twelfth session). For the run, free pages stay with the guest (reporting
# only blocks above the largest buddy order, that is none) and the memory the run will use is
# touched once up front; the setting is put back on exit.
# BENCH_KEEP_PAGE_REPORTING=1 leaves it alone.
REPORTING_ORDER=/sys/module/page_reporting/parameters/page_reporting_order
SAVED_REPORTING_ORDER=
hold_guest_memory() {
    [[ ${BENCH_KEEP_PAGE_REPORTING:-0} == 1 || ! -w $REPORTING_ORDER ]] && return 0
    local orders warm_mib avail_mib
    orders=$(awk 'NR == 1 { print NF - 4 }' /proc/buddyinfo)   # columns after "Node N, zone NAME"
    [[ $orders =~ ^[0-9]+$ ]] || return 0
    SAVED_REPORTING_ORDER=$(cat "$REPORTING_ORDER")
    echo "$orders" >"$REPORTING_ORDER" 2>/dev/null || { SAVED_REPORTING_ORDER=; return 0; }
    avail_mib=$(awk '/^MemAvailable:/ { print int($2 / 1024) }' /proc/meminfo)
    warm_mib=$((QUICK ? 4096 : 12288))
    ((warm_mib > avail_mib - 4096)) && warm_mib=$((avail_mib - 4096))
    ((warm_mib > 0)) || warm_mib=0
    log "holding freed guest memory for the run (page_reporting_order $SAVED_REPORTING_ORDER -> $orders); touching $warm_mib MiB once"
    if ((warm_mib > 0)); then
        mkdir -p "$WORK/warm" && mount -t tmpfs -o "size=$((warm_mib + 64))m" bench-warm "$WORK/warm" \
            && dd if=/dev/zero of="$WORK/warm/f" bs=1M count="$warm_mib" status=none
        umount "$WORK/warm" 2>/dev/null; rmdir "$WORK/warm" 2>/dev/null
    fi
    meta note "free guest pages were kept from the host's balloon for the run (page_reporting_order $SAVED_REPORTING_ORDER -> $orders, restored after) and $warm_mib MiB touched first, so no column met pages faulting back in from the host"
}
hold_guest_memory

# ---------------------------------------------------------------- the untar source, in tmpfs
mkdir -p "$WORK/src" "$WORK/mnt" "$WORK/cryfs-home" "$WORK/out"
mount -t tmpfs -o size=1G,mode=755 bench-src "$WORK/src" || die "cannot mount tmpfs"
log "extracting fs include kernel crypto lib from $LINUX_TAR"
mkdir "$WORK/src/x"
tar -xJf "$LINUX_TAR" -C "$WORK/src/x" linux-source-6.1/{fs,include,kernel,crypto,lib} \
    || die "cannot extract $LINUX_TAR"
TREE=linux-source-6.1
TREE_FILES=$(find "$WORK/src/x/$TREE" -type f | wc -l)
TREE_DIRS=$(find "$WORK/src/x/$TREE" -type d | wc -l)
TREE_MB=$(du -sm --apparent-size "$WORK/src/x/$TREE" | cut -f1)
TAR="$WORK/src/tree.tar"
tar -cf "$TAR" -C "$WORK/src/x" "$TREE" && rm -rf "$WORK/src/x" || die "cannot make $TAR"
log "untar source: $TREE_FILES files, $TREE_DIRS directories, $TREE_MB MB"

# ---------------------------------------------------------------- per-filesystem mount / unmount
# fs_mount FS STORE MNT TAG: creates the store, mounts it, sets DPID (empty for plain).
fs_mount() {
    local fs=$1 c=$2 m=$3 tag=$4 i
    DPID=
    mkdir -p "$c" "$m"
    case $fs in
        plain) return 0 ;;
        floor)
            # In the foreground, as this script's child, so its pid is known and it can be signalled.
            BENCH_REQUEST_COUNT_FILE="$WORK/out/floor-requests" "$WORK/passthrough_hp" --foreground "$c" "$m" \
                >>"$WORK/out/floor-$tag.log" 2>&1 &
            DPID=$! ;;
        encfsd)
            # shellcheck disable=SC2086
            "$ENCFSD" init "$c" --key-file "$ENCFSD_KEY" $ENCFSD_INIT_OPTIONS >>"$LOG" 2>&1 || return 1
            # shellcheck disable=SC2086
            timeout 60 "$ENCFSD" mount "$c" "$m" --log-file "$WORK/out/encfsd-$tag.log" $ENCFSD_OPTIONS >>"$LOG" 2>&1 || return 1
            "$ENCFSD" key add "$m" --key-file "$ENCFSD_KEY" >>"$LOG" 2>&1 || return 1
            DPID=$(pgrep -n -f -- "mount $c $m") ;;
        baseline)
            # shellcheck disable=SC2086
            "$ENCFSD_BASELINE" init "$c" --key-file "$BASELINE_KEY" $BASELINE_INIT_OPTIONS >>"$LOG" 2>&1 || return 1
            # shellcheck disable=SC2086
            timeout 60 "$ENCFSD_BASELINE" mount "$c" "$m" --log-file "$WORK/out/baseline-$tag.log" $ENCFSD_OPTIONS >>"$LOG" 2>&1 || return 1
            "$ENCFSD_BASELINE" key add "$m" --key-file "$BASELINE_KEY" >>"$LOG" 2>&1 || return 1
            DPID=$(pgrep -n -f -- "mount $c $m") ;;
        gocryptfs)
            gocryptfs -init -q -scryptn 10 -extpass "echo $PASS" "$c" >>"$LOG" 2>&1 || return 1
            timeout 60 gocryptfs -q -extpass "echo $PASS" "$c" "$m" >>"$LOG" 2>&1 || return 1
            DPID=$(pgrep -n -f -- "$c $m") ;;
        securefs)
            securefs create --pass "$PASS" "$c" >>"$LOG" 2>&1 || return 1
            timeout 60 securefs mount --pass "$PASS" -b --log "$WORK/out/securefs-$tag.log" "$c" "$m" >>"$LOG" 2>&1 || return 1
            DPID=$(pgrep -n -f -- "$c $m") ;;
        cryfs)
            # CryFS remembers each base directory's filesystem id under $HOME and refuses a
            # new filesystem at a path it has seen; every round makes a new one, so forget them.
            rm -rf "$WORK/cryfs-home" && mkdir -p "$WORK/cryfs-home"
            echo "$PASS" | HOME="$WORK/cryfs-home" CRYFS_FRONTEND=noninteractive CRYFS_NO_UPDATE_CHECK=true \
                timeout 120 cryfs --cipher aes-256-gcm --blocksize 16384 --logfile "$WORK/out/cryfs-$tag.log" \
                "$c" "$m" >>"$LOG" 2>&1 || return 1
            DPID=$(pgrep -n -f -- "$c $m") ;;
    esac
    [[ -n $DPID ]] && DAEMON_PIDS[$DPID]=$fs
    for i in $(seq 100); do grep -q " $m fuse" /proc/mounts && return 0; sleep 0.1; done
    log "$fs: not mounted on $m after the mount command returned"
    return 1
}

# fs_unmount FS MNT: unmounts and waits for the daemon to exit.
fs_unmount() {
    local fs=$1 m=$2 i
    [[ $fs == plain ]] && return 0
    for i in $(seq 10); do
        grep -q " $m fuse" /proc/mounts || break
        fusermount3 -u "$m" >>"$LOG" 2>&1 && break
        sleep 1
    done
    if grep -q " $m fuse" /proc/mounts; then
        log "$fs: fusermount3 -u $m kept failing; lazy unmount"
        fusermount3 -uz "$m" >>"$LOG" 2>&1
    fi
    [[ -z $DPID ]] && return 0
    for i in $(seq 300); do alive "$DPID" || break; sleep 0.2; done
    if alive "$DPID"; then
        log "$fs: daemon $DPID still running 60 s after unmount; killing it"
        meta note "$fs: daemon still running 60 s after unmount (killed)"
        kill -TERM "$DPID" 2>/dev/null; sleep 2; kill -KILL "$DPID" 2>/dev/null
    fi
    unset "DAEMON_PIDS[$DPID]"
}

# ---------------------------------------------------------------- measurement helpers
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# requests FS MNT: prints the FUSE requests FS's daemon has had so far (nothing where uncounted).
requests() {
    local i f="$WORK/out/floor-requests"
    case $1 in
        encfsd) "$ENCFSD" status "$2" --json 2>>"$LOG" | python3 "$HELPER" status-requests 2>>"$LOG" ;;
        baseline) "$ENCFSD_BASELINE" status "$2" --json 2>>"$LOG" | python3 "$HELPER" status-requests 2>>"$LOG" ;;
        floor)
            rm -f "$f"; kill -USR1 "$DPID" 2>/dev/null || return 0
            for i in $(seq 100); do [[ -s $f ]] && { cat "$f"; return 0; }; sleep 0.05; done ;;
    esac
}
# Per-operation request counts: count_start before a workload, count_end METRIC OPS after it.
# The dirty pages of a writeback-cached mount are pushed first (syncfs), so their WRITEs count
# with the workload that made them; the requests the counter read itself makes (encfsd status
# opens the mountpoint for its ioctl) are measured once per mount and taken off.
COUNT_BEFORE= COUNT_OVERHEAD=0
count_calibrate() {
    local a b
    COUNT_OVERHEAD=0
    a=$(requests "$CUR_FS" "$1") && b=$(requests "$CUR_FS" "$1") && [[ -n $a && -n $b ]] && COUNT_OVERHEAD=$((b - a))
}
count_start() { COUNT_BEFORE=$(requests "$CUR_FS" "$1"); }
count_end() {  # count_end MNT METRIC OPS SECONDS: requests per operation, and microseconds per request
    local after n
    [[ -n $COUNT_BEFORE ]] || return 0
    sync -f "$1" 2>/dev/null
    after=$(requests "$CUR_FS" "$1")
    [[ -n $after ]] || return 0
    n=$((after - COUNT_BEFORE - COUNT_OVERHEAD))
    record "$2" "$(awk -v n="$n" -v ops="$3" 'BEGIN { printf "%.2f", n / ops }')"
    ((n > 0)) && record "${2%_req}_usreq" "$(awk -v n="$n" -v s="$4" 'BEGIN { printf "%.1f", s * 1e6 / n }')"
}

# run_timed CMD...: runs CMD (stdout+stderr to the log) under a timeout; prints elapsed seconds.
run_timed() {
    local t0 t1 rc
    t0=$(date +%s%N)
    timeout -k 10 "$STEP_TIMEOUT" "$@" >>"$LOG" 2>&1
    rc=$?
    t1=$(date +%s%N)
    if ((rc)); then
        log "FAILED (exit $rc$( ((rc == 124)) && echo ", timed out after ${STEP_TIMEOUT}s")): $*"
        return 1
    fi
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f", (b - a) / 1e9 }'
}

CUR_BACKING= CUR_ROUND= CUR_FS=
LINE=
record() {  # record METRIC VALUE
    printf '%s\t%s\t%s\t%s\t%s\n' "$CUR_BACKING" "$CUR_ROUND" "$CUR_FS" "$1" "$2" >>"$RESULTS"
    LINE+=" $1=$2"
}
rate() { awk -v n="$1" -v s="$2" 'BEGIN { printf "%.1f", n / s }'; }
secs() { awk -v s="$1" 'BEGIN { printf "%.3f", s }'; }

run_fio() {  # run_fio METRIC RW ENGINE DEPTH FILE DIRECT
    local metric=$1 rw=$2 eng=$3 qd=$4 f=$5 direct=$6 json="$WORK/out/fio.json" iops
    rm -f "$json"
    if timeout -k 10 $((RUNTIME + 300)) fio --name="$metric" --filename="$f" --size="${SIZE}M" \
        --bs=4k --rw="$rw" --ioengine="$eng" --iodepth="$qd" --direct="$direct" \
        --runtime="$RUNTIME" --time_based --randrepeat=0 --norandommap \
        --output-format=json --output="$json" >>"$LOG" 2>&1 \
        && iops=$(python3 "$HELPER" fio-iops "$json" 2>>"$LOG"); then
        record "$metric" "$iops"
    else
        log "$CUR_FS: fio $metric failed"; cat "$json" >>"$LOG" 2>/dev/null
        record "$metric" ERR
    fi
}

# bench_fs FS BACKDIR: one filesystem, one round.
bench_fs() {
    local fs=$1 back=$2 c m tag el direct rss
    tag="$CUR_BACKING-r$CUR_ROUND"
    if [[ $fs == plain ]]; then c="$back/plain"; m="$c"; else c="$back/$fs-store"; m="$WORK/mnt/$fs"; fi
    CUR_FS=$fs LINE=
    echo "== $fs $tag" >>"$LOG"
    if ! fs_mount "$fs" "$c" "$m" "$tag"; then
        log "$fs: create/mount failed (see $LOG)"
        meta note "$fs on $CUR_BACKING, round $CUR_ROUND: create/mount failed"
        for k in write_mbs read_mbs rr1 rw1 rr16 rw16 untar_s lslr_s cat_s rm_s small_fps; do record $k ERR; done
        fs_unmount "$fs" "$m"; rm -rf --one-file-system "$c"
        return
    fi

    direct=1
    if ! python3 "$HELPER" odirect-probe "$m" 2>>"$LOG"; then
        direct=0
        meta note "$fs refuses O_DIRECT on the $CUR_BACKING backing ($(python3 "$HELPER" odirect-probe "$m" 2>&1 | tail -n 1)), so its fio jobs there ran buffered (--direct=0, marked †): its random-read IOPS partly measure the kernel page cache and are not comparable"
        for k in rr1 rw1 rr16 rw16; do meta cellnote "$CUR_BACKING/$fs/$k" " †"; done
    fi

    local f="$m/big"
    count_calibrate "$m"
    drop_caches
    count_start "$m"
    if el=$(run_timed dd if=/dev/zero of="$f" bs=1M count="$SIZE" conv=fsync); then
        record write_mbs "$(rate $((SIZE * 1048576 / 1000000)) "$el")"
        count_end "$m" write_req "$SIZE" "$el"
    else record write_mbs ERR; fi
    drop_caches
    if el=$(run_timed dd if="$f" of=/dev/null bs=1M); then
        record read_mbs "$(rate $((SIZE * 1048576 / 1000000)) "$el")"
    else record read_mbs ERR; fi
    drop_caches
    run_fio rr1 randread psync 1 "$f" "$direct"
    run_fio rw1 randwrite psync 1 "$f" "$direct"
    run_fio rr16 randread libaio 16 "$f" "$direct"
    run_fio rw16 randwrite libaio 16 "$f" "$direct"
    rm -f "$f"

    local entries=$((TREE_FILES + TREE_DIRS))
    drop_caches
    count_start "$m"
    if el=$(run_timed tar -xf "$TAR" -C "$m"); then
        record untar_s "$(secs "$el")"; count_end "$m" untar_req "$TREE_FILES" "$el"; else record untar_s ERR; fi
    drop_caches
    count_start "$m"
    if el=$(run_timed bash -c 'ls -lR "$1" >/dev/null' _ "$m/$TREE"); then
        record lslr_s "$(secs "$el")"; count_end "$m" lslr_req "$entries" "$el"; else record lslr_s ERR; fi
    drop_caches
    count_start "$m"
    if el=$(run_timed bash -c 'find "$1" -type f -exec cat {} + >/dev/null' _ "$m/$TREE"); then
        record cat_s "$(secs "$el")"; count_end "$m" cat_req "$TREE_FILES" "$el"; else record cat_s ERR; fi
    count_start "$m"
    if el=$(run_timed rm -rf "$m/$TREE"); then
        record rm_s "$(secs "$el")"; count_end "$m" rm_req "$entries" "$el"; else record rm_s ERR; fi

    mkdir -p "$m/small"
    if el=$(timeout -k 10 "$STEP_TIMEOUT" python3 "$HELPER" smallfiles "$m/small" "$NFILES" 4096 2>>"$LOG"); then
        record small_fps "$(rate "$NFILES" "$el")"
    else log "$fs: small-file test failed"; record small_fps ERR; fi
    rm -rf "$m/small"

    if [[ -n $DPID ]]; then
        rss=$(awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$DPID/status" 2>/dev/null)
        if [[ -n $rss ]]; then record rss_mib "$rss"; else log "$fs: daemon $DPID gone before unmount"; fi
    fi
    if [[ -n $(find "$m" -mindepth 1 -maxdepth 1 -print -quit 2>/dev/null) ]]; then
        log "$fs: mount not empty after the tests:"; ls -la "$m" >>"$LOG" 2>&1
    fi
    fs_unmount "$fs" "$m"
    rm -rf --one-file-system "$c"
    log "$fs $tag:$LINE"
}

# trace_fs FS BACKDIR: one filesystem, the tree workloads, each under fuse_requests.py (--requests).
trace_fs() {
    local fs=$1 back=$2 c="$2/$1-store" m="$WORK/mnt/$1" out="$WORK/out/requests" n
    [[ $fs == plain ]] && return  # no FUSE connection to count
    CUR_FS=$fs
    mkdir -p "$out"; n=$(printf '%02d' "$(ls "$out" | cut -d- -f1 | sort -u | wc -l)")
    if ! fs_mount "$fs" "$c" "$m" requests; then
        log "$fs: create/mount failed (see $LOG)"; fs_unmount "$fs" "$m"; rm -rf --one-file-system "$c"; return
    fi
    traced() {  # traced WORKLOAD CMD...
        local w=$1; shift
        drop_caches
        timeout -k 10 "$STEP_TIMEOUT" python3 "$REPO/scripts/fuse_requests.py" record "$m" "$out/$n-$fs.$w.json" -- "$@" 2>>"$LOG" \
            || log "$fs: $w failed or timed out"
    }
    traced untar tar -xf "$TAR" -C "$m"
    traced ls-lR ls -lR "$m/$TREE"
    traced read-all find "$m/$TREE" -type f -exec cat {} +
    traced rm-rf rm -rf "$m/$TREE"
    mkdir -p "$m/small"
    traced create-fsync python3 "$HELPER" smallfiles "$m/small" "$NFILES" 4096
    rm -rf "$m/small"
    fs_unmount "$fs" "$m"
    rm -rf --one-file-system "$c"
    log "$fs: requests traced"
}

# ---------------------------------------------------------------- metadata
START=$(date +%s)
STAMP=$(date +%Y-%m-%d-%H%M)
ver() { "$@" 2>&1 | head -n 1; }
pkgver() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null; }
meta date "$(date '+%Y-%m-%d %H:%M %Z')"
meta rounds "$ROUNDS"
meta backings "${BACKINGS[*]}"
meta filesystems "${FSS[*]}"
meta header kernel "$(uname -r)"
meta header CPU "$(lscpu | sed -n 's/^Model name: *//p' | head -n 1), $(nproc) cores; $(awk '/MemTotal/ { printf "%.0f GiB RAM", $2 / 1048576 }' /proc/meminfo)"
meta header OS "$(. /etc/os-release; echo "$PRETTY_NAME")"
if want_fs baseline; then
    meta header baseline "$BASELINE ($("$ENCFSD_BASELINE" --version 2>/dev/null | head -n 1)), built $(date -r "$BASELINE" '+%Y-%m-%d %H:%M'); init options: ${BASELINE_INIT_OPTIONS:-none}"
fi
if want_fs encfsd; then
    meta header encfsd "binary built $(date -r "$BIN" '+%Y-%m-%d %H:%M'), work tree at commit $(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" diff --quiet HEAD -- Sources Package.swift || echo " + uncommitted changes in $(git -C "$REPO" diff --name-only HEAD -- Sources Package.swift | sed 's|^Sources/||' | paste -sd, - | sed 's/,/, /g')"), release build$BUILD_NOTE; init options: ${ENCFSD_INIT_OPTIONS:-none (4 KiB extents)}, mount options: ${ENCFSD_OPTIONS:-none}, AES-256-GCM"
fi
want_fs floor && meta header floor "passthrough_hp from libfuse $FLOOR_VERSION (Debian source package), g++ -O2 -DHAVE_UTIMENSAT -DHAVE_POSIX_FALLOCATE -DHAVE_SETXATTR, its defaults (writeback cache, 86400 s timeouts, splice), with a request counter (scripts/bench-floor-count.hpp)"
want_fs gocryptfs && meta header gocryptfs "$(ver gocryptfs -version) (Debian $(pkgver gocryptfs)); default options, -scryptn 10 at init"
want_fs securefs && meta header securefs "$(pkgver securefs) (Debian); default format (4, lite), 4 KiB blocks"
want_fs cryfs && meta header cryfs "$(ver cryfs --version | sed 's/CryFS Version //') (Debian $(pkgver cryfs)); --cipher aes-256-gcm --blocksize 16384"
meta header fio "$(fio --version) (Debian $(pkgver fio)); 4 KiB blocks, ${RUNTIME} s per job, --direct=1 unless noted"
meta header rounds "$ROUNDS per backing, interleaved (each round: ${FSS[*]}); medians reported"
meta header sizes "streaming / random-I/O file ${SIZE} MiB (dd bs=1M, conv=fsync on write); untar tree: linux-source-6.1 (Debian $(pkgver linux-source-6.1)) fs include kernel crypto lib = $TREE_FILES files, $TREE_DIRS directories, $TREE_MB MB, tar read from tmpfs; small files: $NFILES × 4 KiB, fsync each"
meta header backings "${BACKINGS[*]} (tmpfs: 8 GiB tmpfs; disk: $(findmnt -n -o FSTYPE,SOURCE -T /var/tmp | tr -s ' ' ' ') under /var/tmp; gluster: GlusterFS $(pkgver glusterfs-server) one-brick volume on /var/tmp, server in a network namespace over a veth pair, FUSE client)"
meta header "load average at start" "$(cut -d' ' -f1-3 /proc/loadavg)"

log "work dir $WORK; rounds=$ROUNDS size=${SIZE}MiB backing=${BACKINGS[*]} fs=${FSS[*]} fio runtime=${RUNTIME}s"

# ---------------------------------------------------------------- the run
for b in "${BACKINGS[@]}"; do
    CUR_BACKING=$b
    if [[ $b == tmpfs ]]; then
        BACK="$WORK/tmpfs"; mkdir -p "$BACK"
        mount -t tmpfs -o size=8G,mode=755 bench-backing "$BACK" || die "cannot mount the tmpfs backing"
    elif [[ $b == gluster ]]; then
        BACK=$(python3 "$REPO/Tests/mount/backings.py" up gluster "$WORK/gluster" 2>>"$LOG") || die "cannot set up the GlusterFS backing (see $LOG)"
    else
        BACK="$WORK/disk"; mkdir -p "$BACK"
    fi
    for r in $(seq "$ROUNDS"); do
        CUR_ROUND=$r
        log "--- backing $b, round $r/$ROUNDS (load average $(cut -d' ' -f1-3 /proc/loadavg))"
        meta note "load average at the start of $b round $r: $(cut -d' ' -f1-3 /proc/loadavg)"
        for fs in "${FSS[@]}"; do if ((REQUESTS)); then trace_fs "$fs" "$BACK"; else bench_fs "$fs" "$BACK"; fi; done
    done
    if [[ $b == tmpfs ]]; then umount "$BACK" || log "cannot unmount $BACK"; fi
    if [[ $b == gluster ]]; then python3 "$REPO/Tests/mount/backings.py" down "$WORK/gluster"; BACK=$WORK/gluster; fi
    rm -rf --one-file-system "$BACK"
done

ELAPSED=$(( $(date +%s) - START ))
meta header "load average at end" "$(cut -d' ' -f1-3 /proc/loadavg)"
meta header "run time" "$((ELAPSED / 60)) min $((ELAPSED % 60)) s (excluding install/build and tree extraction)"
if want_fs encfsd; then
    peak=$(awk -F'\t' '$3 == "encfsd" && $4 == "rss_mib" && $5 + 0 > m { m = $5 + 0 } END { printf "%.0f", m }' "$RESULTS")
    meta header "encfsd daemon peak RSS" "$peak MiB (max VmHWM over all its mounts in this run)"
    if grep -qiE 'error|fatal' "$WORK"/out/encfsd-*.log 2>/dev/null; then
        meta note "encfsd daemon logs contained errors: $(grep -hiE 'error|fatal' "$WORK"/out/encfsd-*.log | sort | uniq -c | sort -rn | head -n 3 | tr -s ' \n' ' ')"
    fi
fi

echo
REPORTED=1
if ((REQUESTS)); then
    {
        echo "# FUSE requests by opcode, $(date '+%Y-%m-%d %H:%M %Z')"
        echo
        echo "\`scripts/bench.sh --requests\` on tmpfs: one pass per filesystem, each workload after \`drop_caches\`; counted by the kernel's fuse tracepoints (scripts/fuse_requests.py). Each cell is requests × mean µs from send to answer (queueing for a daemon thread included)."
        echo
        # The timed run's settings (fio, file sizes, rounds, memory) do not apply here.
        awk -F'\t' '$1 == "header" && $2 !~ /^(fio|rounds|sizes|backings|encfsd daemon peak RSS)$/ { printf "- %s: %s\n", $2, $3 }' "$META"
        echo "- tree: linux-source-6.1 fs include kernel crypto lib, $TREE_FILES files, $TREE_DIRS directories, tar read from tmpfs; backing: an 8 GiB tmpfs"
        echo
        python3 "$REPO/scripts/fuse_requests.py" report "$WORK/out/requests"
    } >"$WORK/requests.md" || die "report failed"
    cat "$WORK/requests.md"
    if ((SAVE)); then
        mkdir -p "$REPO/docs/bench"; cp "$WORK/requests.md" "$REPO/docs/bench/$STAMP-requests.md"
        echo; echo "written: docs/bench/$STAMP-requests.md"
    fi
    echo "run time: $((ELAPSED / 60)) min $((ELAPSED % 60)) s"
    exit 0
fi
if ((SAVE)); then
    mkdir -p "$REPO/docs/bench"
    OUT="$REPO/docs/bench/$STAMP.md"
    python3 "$HELPER" report "$RESULTS" "$META" "$OUT" || die "report failed"
    cp "$RESULTS" "$REPO/docs/bench/$STAMP-raw.tsv"
    echo; echo "written: $OUT (raw: docs/bench/$STAMP-raw.tsv)"
else
    python3 "$HELPER" report "$RESULTS" "$META" /dev/null || die "report failed"
fi
echo "run time: $((ELAPSED / 60)) min $((ELAPSED % 60)) s"
