"""Run the CPU benchmarks side by side in one pytest-benchmark run and write the figures the
docs quote: ``docs/results/benchmarks.json`` and the table ``docs/results/benchmarks.md``
(README.md and docs/benchmarks.md quote them with docs/figures.py's markers).

    flock /tmp/exl2-heavy.lock python benchmarks/report.py          # run, then write
    python benchmarks/report.py --from-json RUN.json                 # write from an earlier
                                                                     # --benchmark-json file
    python docs/figures.py --write                                   # refresh the quotes

By default it runs ``benchmarks/test_bench_reference.py`` (exl2's reference dequantize on one
torch thread and on torch's default thread count, and gguf-py's numpy Q4_K decoder, the same
number of weights). Each case's median time over its rounds is kept, with the machine it ran on;
the ratios are medians of gguf-py over medians of exl2 from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
DEFAULT_TESTS = ["benchmarks/test_bench_reference.py"]


def key(name: str) -> str:
    """A benchmark's test name as a key that docs/figures.py can address (no dots or brackets):
    ``test_exl2_reference_dequantize[1-thread]`` -> ``exl2_reference_dequantize_1_thread``."""
    return re.sub(r"\W+", "_", name.removeprefix("test_")).strip("_")


def run_benchmarks(tests: list[str], out: Path) -> None:
    cmd = [sys.executable, "-m", "pytest", *tests, "--benchmark-enable", f"--benchmark-json={out}", "-q",
           "-p", "no:cacheprovider"]
    subprocess.run(cmd, cwd=ROOT, check=True)


def summarize(run: dict) -> dict:
    """The figures of one pytest-benchmark JSON run: per case its median, minimum and maximum in
    ms, rounds, weights per second and extra information; the side-by-side ratios; the machine."""
    cases = {}
    for b in run["benchmarks"]:
        s, extra = b["stats"], dict(b.get("extra_info", {}))
        case = dict(median_ms=s["median"] * 1e3, min_ms=s["min"] * 1e3, max_ms=s["max"] * 1e3, rounds=s["rounds"])
        if "weights_per_second" in extra:
            case["weights_per_second_m"] = extra.pop("weights_per_second") / 1e6
        case.update({k: v for k, v in extra.items() if isinstance(v, (int, float, str)) and "_over_" not in k})
        cases[key(b["name"])] = case
    ratios = {}
    gguf = cases.get("gguf_q4_k_dequantize")
    for name, case in cases.items():
        if gguf and name.startswith("exl2_"):
            ratios[f"{name}_speed_over_gguf_q4_k"] = gguf["median_ms"] / case["median_ms"]
    m = run.get("machine_info", {})
    machine = dict(cpu=m.get("cpu", {}).get("brand_raw", platform.processor()), cpu_count=os.cpu_count(),
                   python=m.get("python_version", platform.python_version()), system=m.get("system", platform.system()))
    return dict(datetime=run.get("datetime"), machine=machine, cases=cases, ratios=ratios,
                note="medians of each case's rounds, measured side by side in one pytest-benchmark run "
                     "(benchmarks/report.py); on a shared machine, under /tmp/exl2-heavy.lock")


def table(summary: dict) -> str:
    """Markdown table of the cases, with each exl2 case's speed relative to gguf-py."""
    lines = ["| case | torch threads | bits per weight | median | min | max | rounds | M weights/s | speed vs gguf-py Q4_K |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in summary["cases"].items():
        ratio = summary["ratios"].get(f"{name}_speed_over_gguf_q4_k")
        lines.append(f"| {name} | {c.get('torch_threads', '')} | {c['bpw']:.2f} | {c['median_ms']:.0f} ms | "
                     f"{c['min_ms']:.0f} ms | {c['max_ms']:.0f} ms | {c['rounds']} | "
                     f"{c.get('weights_per_second_m', float('nan')):.0f} | {'' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from-json", type=Path, help="a pytest-benchmark --benchmark-json file instead of a new run")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for benchmarks.json and benchmarks.md")
    p.add_argument("tests", nargs="*", default=DEFAULT_TESTS, help="benchmark files to run")
    args = p.parse_args(argv)
    if args.from_json:
        run = json.loads(args.from_json.read_text(encoding="utf-8"))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run_benchmarks(args.tests, Path(tmp) / "run.json")
            run = json.loads((Path(tmp) / "run.json").read_text(encoding="utf-8"))
    summary = summarize(run)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmarks.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (args.out / "benchmarks.md").write_text(table(summary), encoding="utf-8")
    print(table(summary), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
