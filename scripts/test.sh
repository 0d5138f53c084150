#!/usr/bin/env bash
# Runs every test: unit and known-answer tests (swift test), the real-mount tests (pytest on real
# FUSE mounts of the built daemon), a real daemon SIGKILLed 50 times under load, and the ports of the
# xfstests encrypt group, and the Debian package's smoke test (skip it with ENCFSD_SKIP_DEB=1). Needs root and
# /dev/fuse for the mounts.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
swift build 2>&1 | tail -n 3
swift test 2>&1 | grep -v '^encfsd: ' | grep -vE '^◇ |^✔ (Suite |Test [^r])' | tail -n 40
export ENCFSD="$PWD/.build/debug/encfsd"
python3 -m pytest -q -p no:cacheprovider Tests/mount "$@"
scripts/crash-test.sh
scripts/fstests/run.sh
# The Debian package, installed and removed again (a release build: a few minutes more).
if [ "$(id -u)" -eq 0 ] && [ -z "${ENCFSD_SKIP_DEB:-}" ]; then scripts/deb-smoke.sh; fi
