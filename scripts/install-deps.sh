#!/usr/bin/env bash
# Installs what encfsd needs to build and test on Debian 12: libfuse3, OpenSSL 3, keyutils
# (headers and tools), xfsprogs (xfs_io, for the fscrypt ioctl tests), attr, acl (setfacl and getfacl,
# for the ACL tests), groff and systemd (the man page and fstab-generator tests), util-linux (prlimit,
# losetup), bindfs, sshfs, openssh-server, glusterfs-server, glusterfs-client and iproute2 (stores on
# network and FUSE backings: scripts/backing-tests.sh, the failover test), gocryptfs (beside encfsd in
# scripts/bench.sh), g++ (scripts/bench.sh builds its FUSE floor, libfuse's passthrough_hp), e2fsprogs (an ext4
# reference for the fallocate and seek differential test), and pytest.
set -euo pipefail
packages=(libfuse3-dev fuse3 libssl-dev libkeyutils-dev keyutils pkg-config xfsprogs attr acl python3 groff-base systemd util-linux bindfs sshfs openssh-server glusterfs-server glusterfs-client iproute2 gocryptfs g++ e2fsprogs)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    sudo_cmd=(); [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -c 'import pytest' 2>/dev/null || python3 -m pip install -q pytest
python3 -c 'import cryptography' 2>/dev/null || python3 -m pip install -q cryptography
