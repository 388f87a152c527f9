#!/usr/bin/env bash
# The fast path on a GPU, in one call (about 5 minutes; capped at 8.5 by timeouts): the parity
# tests compiled (TRITON_INTERPRET unset), the matmul/quantize report of gpu_bench.py, then its
# sweep of launch configurations.
#
#   bash benchmarks/gpu.sh [OUT_DIR]        (default: $OUT, else benchmarks/out)
#
# Assumes: python3 with a CUDA (or ROCm) build of torch and a matching triton, as on a GPU
# machine's image; it never installs or replaces torch or triton. The package runs from this
# checkout (PYTHONPATH), not installed. Its few pure-Python dependencies (safetensors, pydantic,
# numpy for the package; pytest, hypothesis for the tests) are installed only if missing, into a
# private folder (the image's packages stay untouched): from the wheels in $EXL2_WHEELS, else in
# ./.whl (prepare them with `bash benchmarks/gpu_wheels.sh`, for machines without network, e.g.
# the device tool's: carry .whl), else from PyPI.
#
# Outputs in OUT_DIR: parity.txt (pytest), gpu_bench.md (the report), gpu_tuning.md (the sweep),
# gpu_generate.md (batch-1 decode of exl2.load against float16; needs transformers), and their .log files. Each step writes as it goes, so a step cut short by its timeout keeps
# what it measured.
# Exit status: 0 when every step passes, 1 when one fails, 2 when the machine is not usable.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/out}}
mkdir -p "$out"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_DEFAULT_FP_FUSION=1

python3 -c "import torch, triton, sys; torch.cuda.is_available() or sys.exit('torch sees no GPU'); \
print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  || { echo "gpu.sh: no GPU usable here (see above); nothing measured"; exit 2; }

missing=$(python3 - <<'PY'
import importlib.util
mods = {"safetensors": "safetensors", "pydantic": "pydantic", "numpy": "numpy", "pytest": "pytest",
        "hypothesis": "hypothesis"}
print(" ".join(pkg for mod, pkg in mods.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
  wheels=${EXL2_WHEELS:-}
  [ -z "$wheels" ] && [ -d .whl ] && wheels=.whl
  site=$(mktemp -d)
  echo "== installing missing: $missing (into $site, from ${wheels:-PyPI})"
  if [ -n "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
  else
    timeout 120 python3 -m pip install -q --retries 0 --timeout 15 --target "$site" $missing
  fi || { echo "gpu.sh: could not install $missing (prepare wheels: bash benchmarks/gpu_wheels.sh)"; exit 2; }
  export PYTHONPATH="$PYTHONPATH:$site"
fi

echo "== parity tests, compiled"
# (the ahead-of-time compile check is left out: here the kernels really compile)
timeout 210 python3 -m pytest -q -p no:cacheprovider -o addopts="" -k "not kernels_compile_for_a_gpu" \
  tests/test_fast.py tests/test_nn.py 2>&1 | tee "$out/parity.txt"
parity=${PIPESTATUS[0]}

echo "== benchmark"
timeout 180 python3 benchmarks/gpu_bench.py --out "$out/gpu_bench.md" 2>&1 | tee "$out/gpu_bench.log"
bench=${PIPESTATUS[0]}

echo "== launch configurations"
timeout 120 python3 benchmarks/gpu_bench.py --sweep --out "$out/gpu_tuning.md" 2>&1 | tee "$out/gpu_tuning.log"
tuning=${PIPESTATUS[0]}

echo "== batch-1 decode, exl2.load against float16"
generate=0
if python3 -c "import transformers" 2>/dev/null; then
  timeout 120 python3 benchmarks/gpu_generate.py --out "$out/gpu_generate.md" 2>&1 | tee "$out/gpu_generate.log"
  generate=${PIPESTATUS[0]}
else
  echo "skipped: transformers is not installed here" | tee "$out/gpu_generate.log"
fi

echo "parity exit $parity, bench exit $bench, tuning exit $tuning, generate exit $generate (124: timed out)"
exit $(( parity != 0 || bench != 0 || tuning != 0 || generate != 0 ))
