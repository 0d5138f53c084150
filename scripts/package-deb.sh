#!/usr/bin/env bash
# Builds encfsd_<version>_amd64.deb with dpkg-deb: the release binary (Swift standard library
# linked statically, so the package needs no Swift install: only the C libraries in Depends),
# the mount(8) helper link, the systemd unit, the man page, shell completions, and the README and
# docs under /usr/share/doc/encfsd. The version is the one `encfsd --version` prints.
#   scripts/package-deb.sh [OUTPUT_DIR]    (default .build/deb); prints the package's path last
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:-.build/deb}")"
version="$(sed -n 's/.*static let string = "\(.*\)".*/\1/p' Sources/encfsd/Version.swift)"
[[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "package-deb: no version in Sources/encfsd/Version.swift" >&2; exit 1; }
arch="$(dpkg --print-architecture)"

swift build -c release --static-swift-stdlib 2>&1 | tail -n 1
bin=.build/release/encfsd
[ "$("$bin" --version)" = "$version" ] || { echo "package-deb: the binary says $("$bin" --version), not $version" >&2; exit 1; }
# The package must not need a Swift toolchain: no Swift runtime library may be linked dynamically.
if ldd "$bin" | grep -E 'libswift|libFoundation|lib_Foundation|libdispatch|libBlocksRuntime'; then
    echo "package-deb: $bin links the Swift runtime dynamically" >&2
    exit 1
fi

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
pkg="$root/encfsd"
install -D -m 0755 "$bin" "$pkg/usr/bin/encfsd"
strip --strip-unneeded "$pkg/usr/bin/encfsd"
# mount(8) looks for /sbin/mount.<type>; on Debian 12 /sbin is /usr/sbin.
install -d "$pkg/usr/sbin"
ln -s ../bin/encfsd "$pkg/usr/sbin/mount.fuse.encfsd"
install -d "$pkg/lib/systemd/system"
sed 's|/usr/local/bin/encfsd|/usr/bin/encfsd|g' systemd/encfsd@.service > "$pkg/lib/systemd/system/encfsd@.service"
chmod 0644 "$pkg/lib/systemd/system/encfsd@.service"
install -d "$pkg/usr/share/man/man8"
gzip -9n < docs/man/encfsd.8 > "$pkg/usr/share/man/man8/encfsd.8.gz"
scripts/install-completions.sh "$bin" "$pkg/usr/share"
doc="$pkg/usr/share/doc/encfsd"
install -D -m 0644 README.md "$doc/README.md"
for f in docs/*.md; do install -m 0644 "$f" "$doc/$(basename "$f")"; done
cat > "$doc/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: encfsd

Files: *
Copyright: the encfsd authors
License: see README.md
COPYRIGHT

install -d "$pkg/DEBIAN"
installed_size="$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)"
cat > "$pkg/DEBIAN/control" <<CONTROL
Package: encfsd
Version: $version
Architecture: $arch
Maintainer: encfsd developers <encfsd@localhost>
Installed-Size: $installed_size
Depends: fuse3, libfuse3-3, libssl3, libkeyutils1, libc6, libstdc++6, libgcc-s1
Section: admin
Priority: optional
Homepage: https://github.com/encfsd/encfsd
Description: FUSE filesystem of encrypted, authenticated, crash-safe files
 encfsd mounts a directory of ciphertext as a plaintext directory. File contents,
 names and symlink targets are encrypted with AES-256-GCM under per-extent keys
 and authenticated; master keys live in the kernel keyring with fscrypt v2
 semantics. Includes the mount(8) helper for fstab entries of type fuse.encfsd
 and a systemd unit that unlocks a store at boot from an encrypted credential.
CONTROL
cat > "$pkg/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
# Where encfsd@NAME.service finds its stores and credentials.
mkdir -p /var/lib/encfsd /etc/credstore.encrypted
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
POSTINST
cat > "$pkg/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
# Stores in /var/lib/encfsd are the user's data: never removed, not even on purge.
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
POSTRM
chmod 0755 "$pkg/DEBIAN/postinst" "$pkg/DEBIAN/postrm"

mkdir -p "$out"
deb="$out/encfsd_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >/dev/null
echo "$deb"
