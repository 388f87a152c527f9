#!/usr/bin/env bash
# Build exllamav2's CUDA extension (exllamav2_ext) ahead of time, on a machine without a GPU, for
# the device tool's H200 image: CPython 3.12, torch 2.11.0+cu130, CUDA 13.0, sm_90. Compiling CUDA
# needs no GPU, so the device's minutes go to running exllamav2's kernels, not to building them.
#
#   bash benchmarks/build_exllamav2.sh          (about 30-60 min on 2 cores; MAX_JOBS=2 by default)
#
# Everything is pinned and comes from PyPI through pip: exllamav2 0.3.2 (its py3-none-any wheel:
# PyPI has no sdist of any 0.1-0.3 release; the wheel carries the extension's C++/CUDA sources,
# which exllamav2 compiles itself at first import when no prebuilt extension is installed),
# torch 2.11.0 for cp312 (the CUDA 13.0 build; its headers and libraries are what the extension
# compiles and links against), and NVIDIA's CUDA 13.0 compiler as wheels (cuda-toolkit 13.0.2:
# nvcc 13.0.88, the version on the device). Python 3.12 itself (interpreter and headers) comes from
# $PYTHON312, else a python3.12 on PATH, else pyenv's 3.12: Debian 12's archive has no Python 3.12
# and PyPI has no CPython headers. The cp312 ABI is the same across 3.12.x releases.
#
# Nothing of exllamav2 is committed: its sources and the build stay in $EXLLAMAV2_BUILD_DIR
# (default /tmp/exllamav2-build, about 5 GB with the venv); the result, stripped, lands in
# ./.exllamav2/ (git-ignored), which the device call carries. benchmarks/exllamav2_build.py does
# the build (torch.utils.cpp_extension, exllamav2's own source list and flags, sm_90 only), checks
# the result as far as a machine without a GPU can (import under Python 3.12 with torch 2.11, a CPU
# function of the extension called, every undefined dynamic symbol found in the libraries it
# needs) and writes docs/results/exllamav2_build.json.
set -euo pipefail
cd "$(dirname "$0")/.."

EXLLAMAV2_VERSION=0.3.2
EXLLAMAV2_WHEEL_SHA256=7cd61ae4bf1d8d12034595ab9731f0f43bac415d6394fbb273d4383293d6079e
TORCH_VERSION=2.11.0
CUDA_TOOLKIT_VERSION=13.0.2
NINJA_VERSION=1.13.0

work=${EXLLAMAV2_BUILD_DIR:-/tmp/exllamav2-build}
mkdir -p "$work"

find_python312() {
  local p
  for p in "${PYTHON312:-}" "$(command -v python3.12 || true)" \
           "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    [ -n "$p" ] && [ -x "$p" ] && "$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null \
      && { echo "$p"; return 0; }
  done
  return 1
}
py312=$(find_python312) || { echo "build_exllamav2.sh: no Python 3.12 found (set PYTHON312)"; exit 2; }
echo "== Python 3.12: $py312 ($("$py312" -c 'import sys; print(sys.version.split()[0])'))"

venv=$work/venv
if [ ! -x "$venv/bin/python" ]; then
  "$py312" -m venv "$venv"
fi
echo "== build environment: torch $TORCH_VERSION, cuda-toolkit $CUDA_TOOLKIT_VERSION (nvcc), ninja $NINJA_VERSION"
"$venv/bin/python" -m pip install -q --no-cache-dir --disable-pip-version-check "torch==$TORCH_VERSION" \
  "cuda-toolkit[nvcc,crt,nvvm,cccl,cudart,cublas]==$CUDA_TOOLKIT_VERSION" "ninja==$NINJA_VERSION" "setuptools<82"

echo "== exllamav2 $EXLLAMAV2_VERSION sources (PyPI wheel)"
wheel=$work/exllamav2-$EXLLAMAV2_VERSION-py3-none-any.whl
if [ ! -f "$wheel" ]; then
  "$venv/bin/python" -m pip download -q --no-cache-dir --no-deps --only-binary=:all: -d "$work" \
    "exllamav2==$EXLLAMAV2_VERSION"
fi
echo "$EXLLAMAV2_WHEEL_SHA256  $wheel" | sha256sum -c --quiet - \
  || { echo "build_exllamav2.sh: $wheel is not the pinned exllamav2 $EXLLAMAV2_VERSION wheel"; exit 2; }
rm -rf "$work/src" && mkdir -p "$work/src"
(cd "$work/src" && "$venv/bin/python" -m zipfile -e "$wheel" . )

export MAX_JOBS=${MAX_JOBS:-2} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "$venv/bin/python" benchmarks/exllamav2_build.py --sources "$work/src/exllamav2/exllamav2_ext" \
  --build-dir "$work/build" --out .exllamav2 --results docs/results/exllamav2_build.json \
  --exllamav2-version "$EXLLAMAV2_VERSION" --wheel-sha256 "$EXLLAMAV2_WHEEL_SHA256" "$@"
