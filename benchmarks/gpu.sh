#!/usr/bin/env bash
# The fast path on a GPU, in one call (about 4 minutes; capped at 7.5 by timeouts): the parity
# tests compiled (TRITON_INTERPRET unset), then the matmul/quantize sweep of gpu_bench.py.
#
#   bash benchmarks/gpu.sh [OUT_DIR]        (default: $OUT, else benchmarks/out)
#
# Assumes: python3 with a CUDA (or ROCm) build of torch and a matching triton, as on a GPU
# machine's image; it never installs or replaces torch or triton. The package runs from this
# checkout (PYTHONPATH), not installed. Its few pure-Python dependencies (safetensors, pydantic,
# numpy for the package; pytest, hypothesis for the tests) are installed only if missing: from
# wheels in $EXL2_WHEELS (pip --no-index, for machines without network; prepare them with
# `pip download -d DIR safetensors pydantic numpy pytest hypothesis`), else from PyPI.
#
# Outputs in OUT_DIR: parity.txt (pytest), gpu_bench.md (the report), gpu_bench.log.
# Exit status: 0 when both steps pass, 1 when one fails, 2 when the machine is not usable.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/out}}
mkdir -p "$out"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_DEFAULT_FP_FUSION=1

python3 -c "import torch, triton; assert torch.cuda.is_available(), 'torch sees no GPU'; \
print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" || exit 2

missing=$(python3 - <<'EOF'
import importlib.util
mods = {"safetensors": "safetensors", "pydantic": "pydantic", "numpy": "numpy", "pytest": "pytest",
        "hypothesis": "hypothesis"}
print(" ".join(pkg for mod, pkg in mods.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "== installing missing: $missing"
  if [ -n "${EXL2_WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --find-links "$EXL2_WHEELS" $missing
  else
    timeout 180 python3 -m pip install -q $missing
  fi || { echo "could not install: $missing (set EXL2_WHEELS to a folder of wheels)"; exit 2; }
fi

echo "== parity tests, compiled"
timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_fast.py tests/test_nn.py 2>&1 \
  | tee "$out/parity.txt"
parity=${PIPESTATUS[0]}

echo "== benchmark"
timeout 200 python3 benchmarks/gpu_bench.py --out "$out/gpu_bench.md" 2>&1 | tee "$out/gpu_bench.log"
bench=${PIPESTATUS[0]}

echo "parity exit $parity, bench exit $bench (124: timed out)"
exit $(( parity != 0 || bench != 0 ))
