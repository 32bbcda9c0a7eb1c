#!/usr/bin/env bash
# Build KenLM's lmplz and build_binary (needed by `speechxfer lm build`) from the kenlm source package on PyPI and
# install them to ${PREFIX:-/usr/local}/bin. KenLM ships no binaries on PyPI or Debian, hence the build.
# Needs root for apt (cmake, g++, Boost, zlib); takes a few minutes on 2 cores.
set -euo pipefail
prefix=${PREFIX:-/usr/local}
if command -v lmplz >/dev/null && command -v build_binary >/dev/null; then
    echo "lmplz and build_binary are already on PATH"; exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq cmake g++ make libboost-program-options-dev libboost-system-dev libboost-thread-dev \
    zlib1g-dev libbz2-dev liblzma-dev >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q -q --no-binary :all: --no-deps --no-build-isolation -d "$work" kenlm
tar -xzf "$work"/kenlm-*.tar.gz -C "$work"
src=$(find "$work" -maxdepth 1 -type d -name 'kenlm-*' | head -n 1)
build() { "$@" >>"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; exit 1; }; }  # quiet unless it fails
build cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release
build cmake --build "$src/build" --target lmplz build_binary -j "$(nproc)"
install -d "$prefix/bin"
install -m 0755 "$src/build/bin/lmplz" "$src/build/bin/build_binary" "$prefix/bin/"
echo "installed lmplz and build_binary to $prefix/bin"
