#!/usr/bin/env bash
# Build KenLM's lmplz and build_binary (needed by `speechxfer lm build`) from the kenlm source package on PyPI and
# install them to ${PREFIX:-/usr/local}/bin. KenLM ships no binaries on PyPI or Debian, hence the build.
# Needs root for apt (cmake, g++, Boost, zlib) and https access to pypi.org; takes a few minutes on 2 cores.
set -euo pipefail
prefix=${PREFIX:-/usr/local}
if [ -x "$prefix/bin/lmplz" ] && [ -x "$prefix/bin/build_binary" ]; then
    echo "lmplz and build_binary are already in $prefix/bin"; exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# KenLM's CMakeLists requires Boost program_options, system, thread and unit_test_framework (libboost-test-dev),
# even when its tests are not built; zlib, bzip2 and xz let lmplz read and write compressed files. Eigen3 is only
# for the interpolation tool, which is not built here.
apt-get install -y -qq cmake g++ make libboost-program-options-dev libboost-system-dev libboost-thread-dev \
    libboost-test-dev zlib1g-dev libbz2-dev liblzma-dev >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The sdist is fetched as a file, not through `pip download`: pip would run the package's metadata step, which
# needs wheel and a cmake build environment (or builds cmake itself from source under --no-binary :all:).
# A pinned release with its digest, so every machine builds the same source.
version=0.3.0
sha256=c4628bb9fb63c8a6f9240035b8b037385cfc404cb72e933cf48878291edac1e8
python3 - "$version" "$sha256" "$work/kenlm.tar.gz" <<'PY'
import hashlib, json, sys, urllib.request

version, sha256, target = sys.argv[1:]
# PyPI's simple index in its JSON form (PEP 691), the protocol pip itself speaks
index = urllib.request.Request("https://pypi.org/simple/kenlm/",
                               headers={"Accept": "application/vnd.pypi.simple.v1+json"})
with urllib.request.urlopen(index, timeout=60) as response:
    files = json.load(response)["files"]
url = next(f["url"] for f in files if f["filename"] == f"kenlm-{version}.tar.gz")
with urllib.request.urlopen(url, timeout=300) as response:
    data = response.read()
if hashlib.sha256(data).hexdigest() != sha256:
    sys.exit(f"install_kenlm.sh: {url} does not have the expected sha256 {sha256}")
with open(target, "wb") as f:
    f.write(data)
PY
tar -xzf "$work/kenlm.tar.gz" -C "$work"
src="$work/kenlm-$version"
build() { "$@" >>"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; exit 1; }; }  # quiet unless it fails
build cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release
build cmake --build "$src/build" --target lmplz build_binary -j "$(nproc)"
install -d "$prefix/bin"
install -m 0755 "$src/build/bin/lmplz" "$src/build/bin/build_binary" "$prefix/bin/"
echo "installed lmplz and build_binary to $prefix/bin"
