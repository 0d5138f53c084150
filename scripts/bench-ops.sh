#!/usr/bin/env bash
# The cost of one operation of each kind, encfsd beside the FUSE floor: wall time per operation
# and the daemon's user and system CPU time per operation (/proc/<pid>/stat, clock ticks: hence
# many operations per kind), each kind timed on its own mount, tmpfs backing. A diagnostic for PERFORMANCE.md: it
# says which request costs what, where scripts/bench.sh says what a workload costs.
#   sudo scripts/bench-ops.sh [--floor PASSTHROUGH_HP] [--count N] [ENCFSD_BINARY]
# --floor takes a passthrough_hp binary (scripts/bench.sh builds one from the fuse3 source
# package); without it only encfsd is measured. Needs root and python3.
set -euo pipefail
floor= count=5000 bin=
while (($#)); do
    case $1 in
        --floor) floor=${2:?}; shift ;;
        --count) count=${2:?}; shift ;;
        -h|--help) sed -n 2,8p "$0"; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) bin=$1 ;;
    esac
    shift
done
[[ $count =~ ^[1-9][0-9]*$ ]] || { echo "--count must be a positive integer" >&2; exit 2; }
bin=$(realpath "${bin:-$(dirname "$0")/../.build/release/encfsd}")
[[ -x $bin ]] || { echo "no encfsd binary at $bin (swift build -c release)" >&2; exit 2; }
[[ -z $floor || -x $floor ]] || { echo "--floor: $floor is not an executable" >&2; exit 2; }

W=$(mktemp -d /tmp/encfsd-bench-ops.XXXX)
mount -t tmpfs -o size=2G encfsd-bench-ops "$W"
cleanup() {
    for m in "$W"/mnt-*; do fusermount3 -u "$m" 2>/dev/null || true; done
    sleep 0.5
    umount "$W" 2>/dev/null || umount -l "$W"
    rmdir "$W"
}
trap cleanup EXIT
python3 -c 'import sys; sys.stdout.buffer.write(bytes(range(1, 65)))' >"$W/key"

names=(encfsd) pids=()
mkdir "$W/mnt-encfsd"
"$bin" init "$W/store" --key-file "$W/key" >/dev/null
"$bin" mount "$W/store" "$W/mnt-encfsd" --no-keyring --key-file "$W/key"
pids+=("$(pgrep -n -f "mount $W/store $W/mnt-encfsd")")
if [[ -n $floor ]]; then
    names+=(floor)
    mkdir "$W/mnt-floor" "$W/plain"
    "$floor" --foreground "$W/plain" "$W/mnt-floor" &
    pids+=($!)
    for _ in $(seq 50); do mountpoint -q "$W/mnt-floor" && break; sleep 0.1; done
fi

# cpu PID: the process's user and system CPU time so far, in clock ticks (exited threads
# included, which per-thread counters would lose: idle request threads leave).
cpu() { awk '{print $14, $15}' "/proc/$1/stat"; }
ticks=$(getconf CLK_TCK)

# run NAME BODY: BODY is Python with p (a file), d (a directory) and n in scope; it runs once on
# each mount, after SETUP (Python too) and, for the cold kinds, after drop_caches.
run() {
    local kind=$1 setup=$2 body=$3 cold=${4:-} ops=${REPEAT:-$count}
    for i in "${!names[@]}"; do
        local mnt=$W/mnt-${names[$i]} pid=${pids[$i]}
        rm -rf "$mnt/d" "$mnt/f"
        python3 -c "import os
p, d, n = '$mnt/f', '$mnt/d', $count
os.mkdir(d); open(p, 'w').write('hello')
$setup"
        [[ -n $cold ]] && { sync; echo 3 >/proc/sys/vm/drop_caches; }
        read -r u1 s1 < <(cpu "$pid")
        local wall
        wall=$(python3 -c "import os, time
p, d, n = '$mnt/f', '$mnt/d', $ops
t = time.perf_counter()
$body
print('%.1f' % ((time.perf_counter() - t) / n * 1e6))")
        read -r u2 s2 < <(cpu "$pid")
        awk -v k="$kind" -v f="${names[$i]}" -v w="$wall" -v u=$((u2 - u1)) -v s=$((s2 - s1)) -v n="$ops" -v t="$ticks" \
            'BEGIN { printf "| %s | %s | %s | %.1f | %.1f |\n", k, f, w, u / t / n * 1e6, s / t / n * 1e6 }'
    done
}

echo "| operation | filesystem | µs per operation | daemon user µs per operation | daemon system µs per operation |"
echo "|---|---|---:|---:|---:|"
run "create, close" "" \
    "for i in range(n): os.close(os.open(f'{d}/f{i}', os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))"
REPEAT=$((count * 4)) run "stat of a missing name" "" \
    "for i in range(n):
    try: os.stat(f'{d}/x{i}')
    except OSError: pass"
run "stat, cold" "for i in range(n): os.close(os.open(f'{d}/f{i}', os.O_WRONLY | os.O_CREAT, 0o644))" \
    "for i in range(n): os.stat(f'{d}/f{i}')" cold
run "open, read, close, cold" "for i in range(n): open(f'{d}/f{i}', 'w').write('x' * 4096)" \
    "for i in range(n):
    fd = os.open(f'{d}/f{i}', os.O_RDONLY); os.read(fd, 4096); os.close(fd)" cold
run "unlink" "for i in range(n): os.close(os.open(f'{d}/f{i}', os.O_WRONLY | os.O_CREAT, 0o644))" \
    "for i in range(n): os.unlink(f'{d}/f{i}')"
REPEAT=$((count * 4)) run "getxattr of an absent name" "" \
    "for i in range(n):
    try: os.getxattr(p, 'security.selinux')
    except OSError: pass"
REPEAT=$((count * 4)) run "chmod" "" "for i in range(n): os.chmod(p, 0o600 if i % 2 else 0o644)"
REPEAT=$((count * 4)) run "fchmod" "" "fd = os.open(p, os.O_RDWR)
for i in range(n): os.fchmod(fd, 0o600 if i % 2 else 0o644)"
REPEAT=$((count * 4)) run "utime" "" "for i in range(n): os.utime(p, (i, i))"
run "create, write 4 KiB, fsync, close" "" \
    "for i in range(n):
    fd = os.open(f'{d}/w{i}', os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644); os.write(fd, b'x' * 4096); os.fsync(fd); os.close(fd)"
