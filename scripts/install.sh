#!/usr/bin/env bash
# Installs a release build of encfsd to /usr/local/bin and its systemd unit template.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
swift build -c release 2>&1 | tail -n 1
install -m 0755 .build/release/encfsd /usr/local/bin/encfsd
install -m 0644 systemd/encfsd@.service /etc/systemd/system/encfsd@.service
mkdir -p /etc/credstore.encrypted /var/lib/encfsd
systemctl daemon-reload 2>/dev/null || true
echo "installed /usr/local/bin/encfsd and encfsd@.service"
