#!/usr/bin/env bash
# Runs the encfsd ports of the xfstests encrypt group: each tests/<name>.sh on a fresh scratch
# store and mount, its output compared with tests/<name>.out. Usage: run.sh [name ...]
set -u
cd "$(dirname "$0")"
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
    for t in tests/*.sh; do names+=("$(basename "$t" .sh)"); done
fi
passed=0 failed=0 failures=()
for name in "${names[@]}"; do
    start=$(date +%s)
    actual=$(mktemp)
    FSTESTS_DAEMON_LOG=$actual.daemon bash "tests/$name.sh" > "$actual" 2>&1
    status=$?
    if [ $status -eq 0 ] && diff -u "tests/$name.out" "$actual" > "$actual.diff"; then
        echo "fstests/$name: ok ($(( $(date +%s) - start )) s)"
        passed=$((passed + 1))
    else
        echo "fstests/$name: FAILED (exit $status)"
        sed 's/^/    /' "$actual.diff" | head -40
        if [ -s "$actual.daemon" ]; then
            echo "    daemon log, last lines:"
            tail -n 15 "$actual.daemon" | sed 's/^/    | /'
        fi
        failed=$((failed + 1))
        failures+=("$name")
    fi
    rm -f "$actual" "$actual.diff" "$actual.daemon"
done
echo "fstests: ${failures[*]:-no failures}"
echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
