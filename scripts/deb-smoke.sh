#!/usr/bin/env bash
# Builds the Debian package, installs it with apt-get, runs a smoke test from the installed files
# only (/usr/bin/encfsd and mount(8) through /sbin/mount.fuse.encfsd: init, mount, key add, write,
# read, status, umount), then removes the package and checks it left nothing of its own behind.
# Needs root and /dev/fuse. Refuses to run where encfsd is already installed as a package.
#   scripts/deb-smoke.sh [PACKAGE.deb]   (default: build one with scripts/package-deb.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "deb-smoke: needs root" >&2; exit 1; }
if dpkg-query -W -f='${Status}' encfsd 2>/dev/null | grep -q "install ok installed"; then
    echo "deb-smoke: encfsd is already installed as a package; not touching it" >&2
    exit 1
fi
deb="${1:-$(scripts/package-deb.sh | tail -n 1)}"
deb="$(realpath "$deb")"
T="$(mktemp -d)"
cleanup() {
    if grep -qs " $T/plain " /proc/mounts; then umount "$T/plain" || umount -l "$T/plain" || true; fi
    if dpkg-query -W -f='${Status}' encfsd 2>/dev/null | grep -q "install ok installed"; then
        DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq encfsd >/dev/null || true
    fi
    rm -rf "$T"
}
trap cleanup EXIT

echo "deb-smoke: installing $(basename "$deb")"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$deb" >/dev/null
enc=/usr/bin/encfsd
for f in $enc /sbin/mount.fuse.encfsd /lib/systemd/system/encfsd@.service /usr/share/man/man8/encfsd.8.gz \
         /usr/share/bash-completion/completions/encfsd /usr/share/doc/encfsd/README.md; do
    [ -e "$f" ] || { echo "deb-smoke: $f missing after install" >&2; exit 1; }
done
if ldd $enc | grep -q 'not found'; then echo "deb-smoke: unresolved libraries:" >&2; ldd $enc >&2; exit 1; fi
echo "deb-smoke: encfsd $($enc --version) installed"

mkdir -p "$T/plain"
$enc key generate -o "$T/master.key"
$enc init "$T/cipher" --key-file "$T/master.key" >/dev/null
# Through mount(8) and the packaged helper, as an fstab line would mount it.
mount -t fuse.encfsd "$T/cipher" "$T/plain" -o nofail,no_keyring
id="$($enc key add "$T/plain" --key-file "$T/master.key" | awk '{print $NF}')"
echo "smoke test through the installed package" > "$T/plain/hello"
[ "$(cat "$T/plain/hello")" = "smoke test through the installed package" ]
$enc status "$T/plain" | grep -q "Present (user_count=1, added_by_self)"
umount "$T/plain"
for _ in $(seq 200); do grep -qs " $T/plain " /proc/mounts || break; sleep 0.1; done
# Again, with encfsd mount, reading back what was written.
$enc mount "$T/cipher" "$T/plain" --no-keyring --key-file "$T/master.key"
[ "$(cat "$T/plain/hello")" = "smoke test through the installed package" ]
$enc umount "$T/plain"
# Only this test's own keyring entry (other tests may hold theirs).
keyctl purge -p user "encfsd:$id:" >/dev/null 2>&1 || true
echo "deb-smoke: init, mount(8), key add, write, read, status, umount: ok"

DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq encfsd >/dev/null
if dpkg -L encfsd >/dev/null 2>&1 && dpkg-query -W -f='${Status}' encfsd | grep -q "ok installed"; then
    echo "deb-smoke: still installed after apt-get remove" >&2
    exit 1
fi
for f in $enc /sbin/mount.fuse.encfsd /lib/systemd/system/encfsd@.service /usr/share/man/man8/encfsd.8.gz; do
    [ ! -e "$f" ] || { echo "deb-smoke: $f left behind by apt-get remove" >&2; exit 1; }
done
echo "deb-smoke: removed cleanly"
