#!/usr/bin/env bash
# The main job on a fresh machine: install dependencies, build, create a store, mount it, add
# the key, write and read a file, and show that the backing directory holds only ciphertext.
# Leaves the store mounted; unmount with: fusermount3 -u "$DEMO/plain"
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
swift build -c release 2>&1 | tail -n 2
encfsd="$PWD/.build/release/encfsd"
DEMO="${DEMO:-/tmp/encfsd-demo}"
if grep -qs " $DEMO/plain " /proc/mounts; then fusermount3 -u "$DEMO/plain"; fi
rm -rf "$DEMO" && mkdir -p "$DEMO/plain"
"$encfsd" key generate --output "$DEMO/master.key"
"$encfsd" init "$DEMO/cipher" --key-file "$DEMO/master.key"
"$encfsd" mount "$DEMO/cipher" "$DEMO/plain"
"$encfsd" key add "$DEMO/plain" --key-file "$DEMO/master.key"
mkdir "$DEMO/plain/notes"
echo "meet at the usual place at noon" > "$DEMO/plain/notes/secret.txt"
echo "--- plaintext view ($DEMO/plain):"
ls -lR "$DEMO/plain"
cat "$DEMO/plain/notes/secret.txt"
echo "--- backing directory ($DEMO/cipher): names and contents are ciphertext"
find "$DEMO/cipher" | sed "s|^$DEMO/cipher||"
if grep -rqs "usual place" "$DEMO/cipher" || find "$DEMO/cipher" | grep -q "secret"; then
    echo "plaintext found in the backing directory!" >&2
    exit 1
fi
echo "--- no plaintext name or content in the backing directory"
echo "mounted at $DEMO/plain; unmount with: fusermount3 -u $DEMO/plain"
