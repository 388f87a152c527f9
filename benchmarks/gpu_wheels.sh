#!/usr/bin/env bash
# Download, into ./.whl (git-ignored), the wheels that benchmarks/gpu.sh installs on a GPU
# machine without network whose python lacks them: pydantic and what it needs. The device
# tool's H200 image (Python 3.12, x86-64) has torch, triton, numpy, safetensors, pytest and
# hypothesis, and no pydantic. Then: carry .whl with the working tree and run gpu.sh there.
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]      (default 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-3.12}
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0
ls -l .whl
