#!/usr/bin/env bash
# Everything that needs a GPU, in one call of at most ~530 s (the device tool's calls are capped
# at 560): each step runs under its own cap and the whole under $GPU_SH_BUDGET seconds, so a slow
# step cuts the later ones short instead of the call.
#
#   bash benchmarks/gpu.sh [OUT_DIR [STEP ...]]      (default: $OUT, else benchmarks/out; all steps)
#
# Steps, in order (name, cap in seconds, what):
#   fixtures  60  benchmarks/golden_fixtures.py: exllamav2's own kernels (its extension, built
#                 ahead of time by build_exllamav2.sh into .exllamav2/) on raw layers and the
#                 conformance vectors -> OUT_DIR/golden/ (to commit as tests/golden/exllamav2/)
#   parity   200  the parity tests compiled (TRITON_INTERPRET unset, cuda tensors): test_fast,
#                 test_nn, and test_exllamav2_golden against the fixtures just written
#   bench    170  benchmarks/gpu_bench.py -> OUT_DIR/gpu_bench.md: ours vs float16 vs exllamav2's
#                 gemm_half_q_half (M = 1, 4, 16, 128) on the same layers, targets judged
#   sweep     90  benchmarks/gpu_bench.py --sweep -> OUT_DIR/gpu_tuning.md: launch configurations,
#                 the values for exl2/fast/tuning.py
#   generate  60  benchmarks/gpu_generate.py -> OUT_DIR/gpu_generate.md: batch-1 decode tokens/s of
#                 exl2.load against the float16 model (needs transformers; skipped without)
#   conformance 60  exllamav2 itself through the conformance suite (vectors and random layers;
#                 benchmarks/exllamav2_kernels.py as the backend), with the time left
# To add a step: one line in STEPS below and a function step_NAME.
#
# Assumes: python3 with a CUDA (or ROCm) build of torch and a matching triton, as on a GPU
# machine's image; it never installs or replaces torch or triton. The package runs from this
# checkout (PYTHONPATH), not installed. Its few pure-Python dependencies (safetensors, pydantic,
# numpy for the package; pytest, hypothesis for the tests) are installed only if missing, into a
# private folder (the image's packages stay untouched): from the wheels in $EXL2_WHEELS, else in
# ./.whl (prepare them with `bash benchmarks/gpu_wheels.sh`, for machines without network, e.g.
# the device tool's: carry .whl), else from PyPI.
#
# Outputs in OUT_DIR (within the device tool's limits on what comes back: at most 8 files, two
# folders deep): gpu.log (every step's output and the summary), golden/manifest.json,
# golden/exllamav2_golden.safetensors, gpu_bench.md, gpu_tuning.md, gpu_generate.md. Each step writes as it goes,
# so a step cut short by its cap keeps what it measured.
#
# GPU_SH_CPU_SMOKE=1 runs the same steps without a GPU on tiny cases (the fixture script's and
# gpu_bench.py's --cpu-smoke modes, the golden test on the smoke fixtures): a check of this
# script's plumbing for CI, whose figures mean nothing.
# Exit status: 0 when every step passes, 1 when one fails or runs out of time, 2 when the machine
# is not usable or the command is misused.
set -uo pipefail
cd "$(dirname "$0")/.."

STEPS="fixtures:60 parity:200 bench:170 sweep:90 generate:60 conformance:60"
budget=${GPU_SH_BUDGET:-530}
smoke=${GPU_SH_CPU_SMOKE:-}
start=$SECONDS

out=${1:-${OUT:-benchmarks/out}}
[ $# -gt 0 ] && shift
selected=("$@")
for s in "${selected[@]}"; do
  [[ " $STEPS " == *" $s:"* ]] || { echo "gpu.sh: unknown step '$s' (steps: $STEPS)"; exit 2; }
done
mkdir -p "$out"
log=$out/gpu.log
: >"$log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_DEFAULT_FP_FUSION=1

if [ -n "$smoke" ]; then
  smoke_flag=--cpu-smoke
  echo "gpu.sh: CPU smoke run (no GPU; figures mean nothing)" | tee -a "$log"
else
  smoke_flag=
  unset TRITON_INTERPRET
  python3 -c "import torch, triton, sys; torch.cuda.is_available() or sys.exit('torch sees no GPU'); \
print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu.sh: no GPU usable here (see above); nothing measured" | tee -a "$log"; exit 2; }
fi

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
  echo "== installing missing: $missing (into $site, from ${wheels:-PyPI})" | tee -a "$log"
  if [ -n "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
  else
    timeout 120 python3 -m pip install -q --retries 0 --timeout 15 --target "$site" $missing
  fi || { echo "gpu.sh: could not install $missing (prepare wheels: bash benchmarks/gpu_wheels.sh)" | tee -a "$log"; exit 2; }
  export PYTHONPATH="$PYTHONPATH:$site"
fi

# -- the steps: each gets its cap as $1 and runs its command under `timeout` --------------------

step_fixtures() {
  timeout "$1" python3 benchmarks/golden_fixtures.py --out "$out/golden" $smoke_flag
}

step_parity() {
  # The ahead-of-time compile check is left out (here the kernels really compile), and so are the
  # golden test's CPU checks of its own plumbing, which CI runs.
  local tests=(tests/test_fast.py tests/test_nn.py tests/test_exllamav2_golden.py)
  [ -n "$smoke" ] && tests=(tests/test_exllamav2_golden.py)
  EXL2_GOLDEN_DIR="$out/golden" timeout "$1" python3 -m pytest -q -p no:cacheprovider -o addopts="" -rs \
    -k "not kernels_compile_for_a_gpu and not emulation and not changed_value" "${tests[@]}"
}

step_bench() {
  timeout "$1" python3 benchmarks/gpu_bench.py --out "$out/gpu_bench.md" $smoke_flag
}

step_sweep() {
  timeout "$1" python3 benchmarks/gpu_bench.py --sweep --out "$out/gpu_tuning.md" $smoke_flag
}

step_generate() {
  # batch-1 decode of exl2.load against the float16 model (issue 9); needs transformers
  if ! python3 -c "import transformers" 2>/dev/null; then
    echo "skipped: transformers is not installed here"
    return 0
  fi
  timeout "$1" python3 benchmarks/gpu_generate.py --out "$out/gpu_generate.md" $smoke_flag
}

step_conformance() {
  # (a smoke run has no exllamav2: the reference stands in, on few random layers)
  local backend=benchmarks.exllamav2_kernels examples=25
  [ -n "$smoke" ] && { backend=reference; examples=2; }
  timeout "$1" python3 -m exl2.cli conformance run --backend "$backend" --examples "$examples"
}

summary=()
failed=0
for entry in $STEPS; do
  name=${entry%%:*}
  cap=${entry#*:}
  if [ ${#selected[@]} -gt 0 ] && [[ " ${selected[*]} " != *" $name "* ]]; then
    continue
  fi
  left=$(( budget - (SECONDS - start) ))
  # (a smoke run's interpreted kernels are slow and its figures mean nothing: the budget alone caps it)
  if [ -n "$smoke" ] || (( cap > left )); then cap=$left; fi
  if (( cap < 10 )); then
    summary+=("$name: not run (the budget of ${budget} s is spent)")
    failed=1
    continue
  fi
  echo "== $name (cap $cap s)" | tee -a "$log"
  t0=$SECONDS
  "step_$name" "$cap" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  note=""
  [ "$rc" -eq 124 ] && note=" (timed out)"
  summary+=("$name: exit $rc$note, $(( SECONDS - t0 )) s")
  [ "$rc" -ne 0 ] && failed=1
done

{ echo "== summary (${SECONDS} s in all)"; printf '%s\n' "${summary[@]}"; } | tee -a "$log"
exit $failed
