"""The GPU scripts, exercised without a GPU: ``benchmarks/gpu.sh`` with ``GPU_SH_CPU_SMOKE=1``
runs every step's CPU smoke mode (golden fixtures from the emulation, the golden test on them,
``gpu_bench.py`` report and sweep on tiny shapes under Triton's interpreter), and refuses a
machine without a GPU cleanly otherwise. They run on a GPU only when a session is lent one, so CI
keeps them from rotting in between."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
STEPS = ["fixtures", "parity", "bench", "sweep", "generate", "conformance"]


def gpu_sh(out: Path, *steps: str, **env: str) -> subprocess.CompletedProcess:
    environ = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"} | env
    return subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), str(out), *steps], capture_output=True, text=True,
                          env=environ, timeout=1800)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu-sh")
    return gpu_sh(out, GPU_SH_CPU_SMOKE="1", GPU_SH_BUDGET="1500"), out


def test_every_step_runs_in_order(smoke_run):
    r, out = smoke_run
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    summary = r.stdout[r.stdout.index("== summary"):].splitlines()[1:]
    assert [line.split(":")[0] for line in summary] == STEPS
    assert all(": exit 0," in line for line in summary), summary
    assert (out / "gpu.log").read_text().endswith(r.stdout[r.stdout.index("== summary"):])


def test_outputs_fit_what_the_device_tool_returns(smoke_run):
    """At most 8 files, no deeper than two folders, names of letters, digits, '.', '_', '-'."""
    _, out = smoke_run
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert sorted(map(str, files)) == ["golden/exllamav2_golden.safetensors", "golden/manifest.json", "gpu.log",
                                       "gpu_bench.md", "gpu_generate.md", "gpu_tuning.md"]
    assert len(files) <= 8
    assert all(len(f.parts) <= 3 and all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in f.parts) for f in files)


def test_fixture_step_feeds_the_golden_test(smoke_run):
    r, out = smoke_run
    manifest = json.loads((out / "golden" / "manifest.json").read_text())
    assert manifest["source"] == "emulation"
    parity = r.stdout[r.stdout.index("== parity"):r.stdout.index("== bench")]
    assert re.search(rf"{len(manifest['cases'])} passed", parity), parity[-2000:]
    assert "failed" not in parity


def test_bench_report(smoke_run):
    """gpu_bench.py's report: every section, three mixes at four M values on the tiny shape."""
    _, out = smoke_run
    report = (out / "gpu_bench.md").read_text()
    for section in ("## exl2.fast.matmul against torch float16 matmul and exllamav2's gemm_half_q_half",
                    "## The three paths over M", "## Quantize one", "## exllamav2's reconstruct"):
        assert section in report
    assert report.count("| 128x96 |") == 3 * 4
    assert "exllamav2's kernels: not run (no GPU)" in report


def test_sweep_report(smoke_run):
    """The sweep runs every launch configuration, checks each against the default one's result and
    names the fastest per M."""
    _, out = smoke_run
    report = (out / "gpu_tuning.md").read_text()
    assert "WRONG RESULT" not in report
    assert report.count("- M_MAX=") == 3 and report.count("- fused, M =") == 2
    assert report.count("| 1 | ") == 10  # five shapes, x gathered or not


def test_budget_cuts_later_steps(tmp_path):
    r = gpu_sh(tmp_path / "out", "fixtures", "sweep", GPU_SH_CPU_SMOKE="1", GPU_SH_BUDGET="5")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "fixtures: not run (the budget of 5 s is spent)" in r.stdout
    assert "sweep: not run" in r.stdout and "== parity" not in r.stdout


def test_unknown_step_is_refused(tmp_path):
    r = gpu_sh(tmp_path / "out", "benchmark", GPU_SH_CPU_SMOKE="1")
    assert r.returncode == 2 and "unknown step 'benchmark'" in r.stdout


def test_gpu_script_refuses_a_machine_without_a_gpu(tmp_path):
    r = gpu_sh(tmp_path / "out", CUDA_VISIBLE_DEVICES="")  # no GPU, even on a machine that has one
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no GPU" in r.stdout + r.stderr
    assert not list((tmp_path / "out").glob("*.md"))


def test_build_results_are_those_of_the_pinned_build():
    """docs/results/exllamav2_build.json (quoted by docs/performance.md) was written by a build of
    the versions build_exllamav2.sh pins now, and that build passed its checks."""
    script = (BENCHMARKS / "build_exllamav2.sh").read_text()
    pins = dict(re.findall(r"^([A-Z0-9_]+)=(\S+)$", script, re.M))
    results = json.loads((BENCHMARKS.parent / "docs" / "results" / "exllamav2_build.json").read_text())
    assert results["exllamav2_version"] == pins["EXLLAMAV2_VERSION"]
    assert results["exllamav2_wheel_sha256"] == pins["EXLLAMAV2_WHEEL_SHA256"]
    assert results["torch_version"].split("+")[0] == pins["TORCH_VERSION"]
    assert results["cubin_archs"] == ["sm_90"] and not results["incremental"]
    assert results["unresolved_count"] == 0 and not results["needed_not_found"] and not results["functions_missing"]
    assert results["make_group_map_on_cpu"]["equal"] and results["imported_stripped_copy"]
