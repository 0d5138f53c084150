#!/usr/bin/env bash
# Builds the FUSE floor: example/passthrough_hp.cc of the installed libfuse, from its Debian
# source package (a deb-src entry is added if apt has none), with the request counter of
# scripts/bench-floor-count.hpp, g++ -O2 as libfuse's meson build configures it on Linux.
#   scripts/build-floor.sh OUT_DIR
# Leaves OUT_DIR/passthrough_hp and prints the libfuse version on stdout; progress and errors
# go to stderr, and it exits non-zero (saying why) if the source cannot be fetched or built.
# Needs root for apt-get. Used by scripts/bench.sh (timed runs and --requests).
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:?usage: build-floor.sh OUT_DIR}
fail() { echo "floor: $*" >&2; exit 1; }
version=$(dpkg-query -W -f='${Version}' libfuse3-3 2>/dev/null) || fail "libfuse3-3 is not installed"
dir="$out/floor-src"; mkdir -p "$dir" || fail "cannot make $dir"
if ! (cd "$dir" && apt-get source --download-only "fuse3=$version") >&2; then
    # No deb-src entry: one for each deb entry of the Debian sources, then try again.
    if [[ -f /etc/apt/sources.list.d/debian.sources ]] && ! grep -rqs '^Types:.*deb-src\|^deb-src' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "floor: adding deb-src entries (/etc/apt/sources.list.d/encfsd-bench-src.sources)" >&2
        sed -e 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
            >/etc/apt/sources.list.d/encfsd-bench-src.sources
        apt-get update -qq >&2
    fi
    (cd "$dir" && apt-get source --download-only "fuse3=$version") >&2 || fail "apt-get source fuse3=$version failed"
fi
orig=$(ls "$dir"/fuse3_*.orig.tar.* 2>/dev/null | grep -v '\.asc$' | head -n 1)
[[ -n $orig ]] && tar -xf "$orig" -C "$dir" >&2 || fail "cannot unpack the fuse3 source"
src=$(ls -d "$dir"/fuse-*/example 2>/dev/null | head -n 1)
[[ -f $src/passthrough_hp.cc ]] || fail "no example/passthrough_hp.cc in the fuse3 $version source"
cp "$REPO/scripts/bench-floor-count.hpp" "$src/" || exit 1
# Every operation but init goes through the counter; the reporter starts before the workers.
sed -i -e 's|^#include "cxxopts.hpp"|&\n#include "bench-floor-count.hpp"|' \
    -e '/^static void assign_operations/,/^}/{/sfs_oper\.init = /!s/^\( *sfs_oper\.[a-z_]* = \)\(sfs_[a-z_]*\);/\1BenchCounted<\2>::call;/}' \
    -e 's|^\( *\)// Mount and run main loop|\1bench_start_reporter();\n&|' "$src/passthrough_hp.cc"
grep -q 'BenchCounted<sfs_lookup>' "$src/passthrough_hp.cc" && grep -q 'bench_start_reporter();' "$src/passthrough_hp.cc" \
    || fail "the counting patch did not apply to passthrough_hp.cc of fuse3 $version"
# shellcheck disable=SC2046
g++ -O2 -std=c++17 -DHAVE_UTIMENSAT -DHAVE_POSIX_FALLOCATE -DHAVE_SETXATTR $(pkg-config --cflags fuse3) \
    "$src/passthrough_hp.cc" -o "$out/passthrough_hp" $(pkg-config --libs fuse3) -lpthread >&2 \
    || fail "g++ could not build passthrough_hp.cc"
echo "$version"
