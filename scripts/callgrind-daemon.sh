#!/usr/bin/env bash
# Counts the daemon's instructions for one workload under callgrind, so two builds can be compared
# on a machine too busy for wall times (instruction counts do not move with load).
#   scripts/callgrind-daemon.sh ENCFSD_BINARY lslr|catall|rmrf|untar|randwrite|stream|smallfsync|lookup [OUT_PREFIX]
# lslr, catall and rmrf (rm -rf of the tree) run cold (after drop_caches) on a store holding linux-source-6.1's fs/ and
# crypto/ (2,361 entries); untar extracts that tree (an uncompressed tar in tmpfs) into an empty store; randwrite is 4,000 random 4 KiB writes at depth 1 into a 32 MiB file;
# stream reads a 256 MiB file cold, 1 MiB at a time; smallfsync creates 1,000 files of 4 KiB, each written, fsynced
# and closed (the benchmark's create+fsync column); lookup stats 2,000 empty files by name, cold (one LOOKUP each).
# Instrumentation is on only around the workload. Prints the total and leaves OUT_PREFIX.<pid>.1
# for callgrind_annotate (default /tmp/encfsd-cg). SAME_MOUNT=1: see populate below. Needs root and the packages valgrind, fio and
# linux-source-6.1 (scripts/bench.sh installs the last two).
set -euo pipefail
bin=$(realpath "${1:?usage: callgrind-daemon.sh ENCFSD_BINARY lslr|catall|rmrf|untar|randwrite|stream|smallfsync|lookup [OUT_PREFIX]}")
workload=${2:?workload: lslr, catall, rmrf, untar, randwrite, stream, smallfsync or lookup}
out=${3:-/tmp/encfsd-cg}
case $workload in lslr|catall|rmrf|untar|randwrite|stream|smallfsync|lookup) ;; *) echo "unknown workload $workload" >&2; exit 2 ;; esac
W=$(mktemp -d /tmp/encfsd-cg.XXXX)
mount -t tmpfs -o size=2G encfsd-cg "$W"
cleanup() { fusermount3 -u "$W/mnt" 2>/dev/null || true; sleep 1; umount "$W" 2>/dev/null || umount -l "$W"; rmdir "$W"; }
trap cleanup EXIT
python3 -c 'import sys; sys.stdout.buffer.write(bytes(range(1, 65)))' > "$W/key"
mkdir "$W/mnt"
"$bin" init "$W/store" --key-file "$W/key" >/dev/null
"$bin" mount "$W/store" "$W/mnt" --no-keyring --key-file "$W/key"
populate() {
    if [ "$workload" = randwrite ]; then
        dd if=/dev/urandom of="$W/mnt/f" bs=1M count=32 conv=fsync status=none
    elif [ "$workload" = smallfsync ]; then
        mkdir "$W/mnt/small"
    elif [ "$workload" = lookup ]; then
        mkdir "$W/mnt/small"
        python3 -c 'import os, sys
for k in range(2000): os.close(os.open(f"{sys.argv[1]}/f{k}", os.O_WRONLY | os.O_CREAT, 0o644))' "$W/mnt/small"
    elif [ "$workload" = stream ]; then
        dd if=/dev/urandom of="$W/mnt/f" bs=1M count=256 conv=fsync status=none
    elif [ "$workload" = untar ]; then
        mkdir "$W/x"
        tar -xJf /usr/src/linux-source-6.1.tar.xz -C "$W/x" linux-source-6.1/fs linux-source-6.1/crypto
        tar -cf "$W/tree.tar" -C "$W/x" linux-source-6.1
        rm -rf "$W/x"
    else
        tar -xJf /usr/src/linux-source-6.1.tar.xz -C "$W/mnt" linux-source-6.1/fs linux-source-6.1/crypto
    fi
}
# SAME_MOUNT=1 fills the store through the daemon under valgrind, so the workload meets what that
# daemon remembers of the objects it made (forgotten headers), as bench.sh's workloads do; by
# default the store is filled first and the workload meets every object cold.
if [ "${SAME_MOUNT:-0}" != 1 ]; then populate; fi
fusermount3 -u "$W/mnt"
sleep 1
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out.%p" \
    "$bin" mount "$W/store" "$W/mnt" --no-keyring --key-file "$W/key" --foreground 2>"$W/valgrind.log" &
for _ in $(seq 240); do mountpoint -q "$W/mnt" && break; sleep 0.5; done
mountpoint -q "$W/mnt" || { cat "$W/valgrind.log" >&2; exit 1; }
vpid=$(pgrep -f "valgrind.*mount $W/store" | head -1)
if [ "${SAME_MOUNT:-0}" = 1 ]; then populate; fi
sync; echo 3 > /proc/sys/vm/drop_caches
callgrind_control -i on "$vpid" >/dev/null
case $workload in
    lslr) ls -lR "$W/mnt" >/dev/null ;;
    catall) find "$W/mnt" -type f -exec cat {} + >/dev/null ;;
    rmrf) rm -rf "$W/mnt/linux-source-6.1" ;;
    untar) tar -xf "$W/tree.tar" -C "$W/mnt" ;;
    smallfsync) python3 -c '
import os, sys
data = b"x" * 4096
for k in range(1000):
    fd = os.open(f"{sys.argv[1]}/f{k}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, data); os.fsync(fd); os.close(fd)' "$W/mnt/small" ;;
    lookup) python3 -c 'import os, sys
for k in range(2000): os.stat(f"{sys.argv[1]}/f{k}")' "$W/mnt/small" ;;
    stream) dd if="$W/mnt/f" of=/dev/null bs=1M status=none ;;
    randwrite) fio --name=rw --filename="$W/mnt/f" --rw=randwrite --bs=4k --size=32m --number_ios=4000 \
        --ioengine=psync --iodepth=1 --randrepeat=1 --end_fsync=1 --output=/dev/null ;;
esac
callgrind_control -i off "$vpid" >/dev/null
callgrind_control -d "$workload" "$vpid" >/dev/null
fusermount3 -u "$W/mnt"
wait || true
echo "$workload: $(callgrind_annotate "$out.$vpid.1" 2>/dev/null | awk '/PROGRAM TOTALS/{print $1}') instructions ($out.$vpid.1)"
