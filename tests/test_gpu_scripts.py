"""The GPU scripts, exercised without a GPU: ``benchmarks/gpu_bench.py`` end to end on tiny
shapes under Triton's interpreter (report and sweep), and ``benchmarks/gpu.sh`` refusing a
machine without a GPU cleanly. They run on a GPU only when a session is lent one, so CI keeps
them from rotting in between."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_bench_cpu_smoke(tmp_path):
    """gpu_bench.py runs end to end (tiny shapes, Triton's interpreter) and writes its report."""
    out = tmp_path / "smoke.md"
    r = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_bench.py"), "--out", str(out),
                        "--cpu-smoke"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = out.read_text()
    for section in ("## exl2.fast.matmul against torch float16 matmul", "## The three paths over M",
                    "## Quantize one"):
        assert section in report
    assert report.count("| 128x96 |") == 3 * 4  # three mixes, four M values


def test_gpu_bench_sweep_cpu_smoke(tmp_path):
    """gpu_bench.py --sweep runs every launch configuration (tiny layer, Triton's interpreter),
    checks each against the default one's result and names the fastest per M."""
    out = tmp_path / "sweep.md"
    r = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_bench.py"), "--out", str(out),
                        "--cpu-smoke", "--sweep"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = out.read_text()
    assert "WRONG RESULT" not in report
    assert report.count("- M_MAX=") == 3 and report.count("- fused, M =") == 2
    assert report.count("| 1 | ") == 10  # five shapes, x gathered or not


def test_gpu_script_refuses_a_machine_without_a_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU, even on a machine that has one
    r = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), str(tmp_path / "out")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no GPU" in r.stdout + r.stderr
    assert not list((tmp_path / "out").glob("*.md"))
