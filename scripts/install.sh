#!/usr/bin/env bash
# Installs a release build of encfsd to /usr/local/bin, the mount(8) helper link
# /sbin/mount.fuse.encfsd (mount(8) looks for helpers only in /sbin), the systemd unit template,
# the man page and the shell completions. (scripts/package-deb.sh builds a .deb of the same.)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
swift build -c release --static-swift-stdlib 2>&1 | tail -n 1
install -m 0755 .build/release/encfsd /usr/local/bin/encfsd
ln -sfn /usr/local/bin/encfsd /sbin/mount.fuse.encfsd
install -m 0644 systemd/encfsd@.service /etc/systemd/system/encfsd@.service
install -D -m 0644 docs/man/encfsd.8 /usr/local/share/man/man8/encfsd.8
scripts/install-completions.sh /usr/local/bin/encfsd /usr/local/share
mkdir -p /etc/credstore.encrypted /var/lib/encfsd
systemctl daemon-reload 2>/dev/null || true
echo "installed /usr/local/bin/encfsd, /sbin/mount.fuse.encfsd, encfsd@.service, encfsd(8) and completions"
