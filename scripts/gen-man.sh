#!/usr/bin/env bash
# Regenerates docs/man/encfsd.8 from the built binary's own argument definitions (the ones
# --help prints), and the shell completions (swift-argument-parser writes those). Run after
# changing any command, option or help text; Tests/mount/test_docs.py fails until you do.
#   scripts/gen-man.sh [ENCFSD_BINARY]   (default: .build/debug/encfsd)
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-.build/debug/encfsd}"
python3 scripts/gen-man.py "$bin" > docs/man/encfsd.8
echo "wrote docs/man/encfsd.8"
