#!/usr/bin/env bash
# The fast path on a GPU, in one call, well under 8 minutes: compiled parity tests, then the
# matmul/quantize sweep. Assumes a CUDA (or ROCm) torch and triton are installed, as on a GPU
# machine's image; installs this package without dependencies.
#
#   bash benchmarks/gpu.sh [OUT_DIR]        (default: $OUT, else benchmarks/out)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/out}}
mkdir -p "$out"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch, triton; assert torch.cuda.is_available(), 'no GPU'; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" || exit 2
python3 -c "import safetensors, pydantic, typer, rich, hypothesis" 2>/dev/null \
  || python3 -m pip install -q safetensors pydantic typer rich hypothesis pytest pytest-benchmark
echo "== parity tests, compiled"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_fast.py tests/test_nn.py 2>&1 | tee "$out/parity.txt"
parity=${PIPESTATUS[0]}
echo "== benchmark"
timeout 330 python3 benchmarks/gpu_bench.py --out "$out/gpu_bench.md" 2>&1 | tee "$out/gpu_bench.log"
bench=${PIPESTATUS[0]}
echo "parity exit $parity, bench exit $bench"
exit $(( parity != 0 || bench != 0 ))
