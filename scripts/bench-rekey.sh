#!/usr/bin/env bash
# Rekey benchmark (issue 11): re-encryption throughput next to the streaming-write figure of the
# same mount, and foreground streaming read/write during a rekey next to their speed without one.
# docs/PERFORMANCE.md records the results.
#   scripts/bench-rekey.sh [--size MiB] [--rounds N] [--backing DIR] [ENCFSD_BINARY]
#     --size     size of each of the two data files rekeyed (default 512; probes are a quarter)
#     --rounds   fresh mounts measured one after another; the table shows each and the medians (default 3)
#     --backing  where the store lives (default /dev/shm: tmpfs, so the figures are encfsd's own)
#     binary     default .build/release/encfsd (build with: swift build -c release)
# Needs root (mounts, drop_caches).
set -euo pipefail
cd "$(dirname "$0")/.."
size=512
rounds=3
backing=/dev/shm
bin=.build/release/encfsd
while [ $# -gt 0 ]; do
    case "$1" in
        --size) size=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --backing) backing=$2; shift 2 ;;
        *) bin=$1; shift ;;
    esac
done
[ -x "$bin" ] || { echo "no $bin: build it first (swift build -c release)" >&2; exit 1; }
work=$(mktemp -d "$backing/encfsd-bench-rekey.XXXXXX")
cleanup() { fusermount3 -u "$work/mnt" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
echo "encfsd rekey benchmark: $(date -u +%FT%TZ), $(nproc) cores, backing $backing, ${size} MiB x 2, $rounds rounds"
python3 scripts/bench-rekey.py "$bin" "$work" "$size" "$rounds"
