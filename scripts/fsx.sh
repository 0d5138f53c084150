#!/usr/bin/env bash
# fsx on a real mount: scripts/fsx.py (this project's fsx, every fallocate mode it knows enabled
# unless the mount refuses it, as its start-up lines show) for 100,000 operations on a fresh store
# of 4096-byte extents (an extent is a page, so punches and zeroes drop whole extents often), then
# a shorter run (3/10 of that) on a store of the default extent size, where most punches reseal
# partial extents. About a minute and a half together. Ends with "N passed, N failed" (runs).
#
# Usage: scripts/fsx.sh [--ops N] [--seed S]     (defaults: 100000, random; printed at start)
# The daemon is $ENCFSD (default .build/debug/encfsd). Everything lives in one mktemp -d
# directory, removed on exit with the mount; the key is given by file, so no keyring is touched.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ENCFSD=${ENCFSD:-$REPO/.build/debug/encfsd}
OPS=100000 SEED=$(( (RANDOM << 15 | RANDOM) % 1000000000 ))
while (($#)); do
    case $1 in
        --ops) OPS=${2:?}; shift ;;
        --seed) SEED=${2:?}; shift ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
WORK=$(mktemp -d /tmp/encfsd-fsx.XXXXXX)
MNT=$WORK/mnt
cleanup() {
    mountpoint -q "$MNT" && { fusermount3 -u "$MNT" 2>/dev/null || fusermount3 -uz "$MNT"; }
    rm -rf "$WORK"
}
trap cleanup EXIT
"$ENCFSD" key generate -o "$WORK/key" >/dev/null || exit 1
passed=0 failed=0
for extent in 4096 default; do
    ops=$OPS; [[ $extent == default ]] && ops=$((OPS * 3 / 10))
    store=$WORK/store-$extent
    args=(); [[ $extent == default ]] || args=(--extent-size "$extent")
    mkdir -p "$MNT"
    "$ENCFSD" init "$store" --key-file "$WORK/key" "${args[@]}" >/dev/null || exit 1
    "$ENCFSD" mount "$store" "$MNT" --no-keyring --key-file "$WORK/key" --log-file "$WORK/daemon-$extent.log" >/dev/null || exit 1
    echo "fsx: extent size $extent"
    start=$SECONDS
    if python3 "$REPO/scripts/fsx.py" "$MNT/fsx-file" --ops "$ops" --seed "$SEED" | grep -v '^[0-9]* passed'; then
        status=${PIPESTATUS[0]}
    else
        status=${PIPESTATUS[0]}
    fi
    fusermount3 -u "$MNT" || status=1
    if ((status == 0)); then
        echo "fsx: extent size $extent: ok ($((SECONDS - start)) s)"; passed=$((passed + 1))
    else
        echo "fsx: extent size $extent: FAILED (daemon log follows)"; tail -n 20 "$WORK/daemon-$extent.log"; failed=$((failed + 1))
    fi
done
echo "$passed passed, $failed failed"
((failed == 0))
