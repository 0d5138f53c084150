#!/usr/bin/env bash
# Scale benchmark: per-file cost of a tree of 10k, 100k and 1M files (create, stat every entry,
# read every file, rename, remove; 1,000 files per directory, 4 clients at once) on a tmpfs
# backing, for encfsd with its daemon held to 1,024 descriptors and for the plain directory. The
# per-file cost must stay flat as the tree grows: nothing in the daemon scales with the tree.
#
# Usage: sudo scripts/bench-scale.sh [--counts 10000,100000,1000000] [--no-save]
#        (also reached as scripts/bench.sh --scale [...])
#
# Writes docs/bench/scale-YYYY-MM-DD-HHMM.md unless --no-save. Needs root (mounts, drop_caches).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPER="$REPO/scripts/bench_helper.py"
COUNTS=10000,100000,1000000 SAVE=1
while (($#)); do
    case $1 in
        --counts) COUNTS=${2:?}; shift ;;
        --no-save) SAVE=0 ;;
        -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-scale.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
IFS=, read -ra counts <<<"$COUNTS"
for n in "${counts[@]}"; do [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "bench-scale.sh: --counts takes positive integers" >&2; exit 2; }; done
[[ $(id -u) == 0 ]] || { echo "bench-scale.sh: needs root" >&2; exit 1; }

ENCFSD="$REPO/.build/release/encfsd"
if [[ ! -x $ENCFSD ]] || [[ -n $(find "$REPO/Sources" -newer "$ENCFSD" -type f -print -quit) ]]; then
    (cd "$REPO" && swift build -c release >/dev/null) || { echo "bench-scale.sh: release build failed" >&2; exit 1; }
fi
WORK=$(mktemp -d /tmp/encfsd-scale.XXXXXX)
cleanup() {
    grep -o " $WORK/[^ ]*" /proc/mounts | sort -r | while read -r m; do fusermount3 -uz "$m" 2>/dev/null || umount -l "$m"; done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
mkdir -p "$WORK/t" && mount -t tmpfs -o size=16g tmpfs "$WORK/t" || exit 1
"$ENCFSD" key generate -o "$WORK/key" >/dev/null
RESULTS="$WORK/results"
: >"$RESULTS"

for n in "${counts[@]}"; do
    for fs in plain encfsd; do
        c="$WORK/t/c-$fs-$n" m="$WORK/t/m-$fs-$n"
        mkdir -p "$c" "$m"
        pid=
        if [[ $fs == encfsd ]]; then
            "$ENCFSD" init "$c" --key-file "$WORK/key" >/dev/null || exit 1
            prlimit --nofile=1024:1024 "$ENCFSD" mount "$c" "$m" --log-file "$WORK/daemon-$n.log" || exit 1
            "$ENCFSD" key add "$m" --key-file "$WORK/key" >/dev/null || exit 1
            pid=$(pgrep -n -f -- "mount $c $m")
            dir=$m
        else
            dir=$c
        fi
        echo "[$(date +%T)] $fs: $n files" >&2
        python3 "$HELPER" scale "$dir" "$n" $pid | sed "s/^/$fs $n /" >>"$RESULTS" || { echo "bench-scale.sh: $fs $n failed" >&2; exit 1; }
        if [[ -n $pid ]]; then
            grep VmHWM "/proc/$pid/status" | awk -v fs="$fs" -v n="$n" '{ print fs, n, "rss_mib", $2 / 1024 }' >>"$RESULTS"
            fusermount3 -u "$m"
            while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
        fi
        rm -rf "$c" "$m"
    done
done

report=$(python3 - "$RESULTS" "${counts[@]}" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1])]
counts = sys.argv[2:]
val = {(fs, n, k): float(v) for fs, n, k, v in rows}
phases = ["create", "stat", "read", "rename", "remove"]
out = ["| filesystem | files | " + " | ".join(f"{p} µs/file" for p in phases) + " | most daemon descriptors | daemon peak RSS MiB |",
       "|---|---:|" + "---:|" * (len(phases) + 2)]
for fs in ("plain", "encfsd"):
    for n in counts:
        cells = ["%.1f" % (1e6 * val[(fs, n, p)] / int(n)) for p in phases]
        extra = ["%d" % val[(fs, n, "descriptors")], "%.0f" % val[(fs, n, "rss_mib")]] if fs == "encfsd" else ["–", "–"]
        out.append(f"| {fs} | {int(n):,} | " + " | ".join(cells + extra) + " |")
print("\n".join(out))
PY
)
echo "$report"
if ((SAVE)); then
    out="$REPO/docs/bench/scale-$(date +%Y-%m-%d-%H%M).md"
    { echo "# Scale benchmark, $(date '+%Y-%m-%d %H:%M')"; echo
      echo "tmpfs backing; encfsd $(git -C "$REPO" rev-parse --short HEAD), release build, daemon at RLIMIT_NOFILE 1024; kernel $(uname -r), $(nproc) cores."
      echo; echo "$report"; } >"$out"
    echo "wrote $out" >&2
fi
