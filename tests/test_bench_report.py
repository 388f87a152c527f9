"""benchmarks/report.py turns one pytest-benchmark run into the figures the docs quote."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def bench(name: str, median: float, **extra) -> dict:
    return dict(name=name, stats=dict(median=median, min=median * 0.9, max=median * 1.5, rounds=5), extra_info=extra)


RUN = dict(datetime="2025-01-01T00:00:00", machine_info=dict(cpu=dict(brand_raw="Some CPU"), python_version="3.11.0"),
           benchmarks=[bench("test_exl2_reference_dequantize[1-thread]", 0.120, bpw=4.08, torch_threads=1,
                             weights_per_second=4096 * 11008 / 0.120),
                       bench("test_exl2_reference_dequantize[default-threads]", 0.150, bpw=4.08, torch_threads=2,
                             weights_per_second=4096 * 11008 / 0.150),
                       bench("test_gguf_q4_k_dequantize", 0.600, bpw=4.5, weights_per_second=4096 * 11008 / 0.600,
                             exl2_reference_1_thread_speed_over_gguf_q4_k=5.0)])


def test_summary_keeps_medians_and_computes_ratios_side_by_side():
    s = report.summarize(RUN)
    one = s["cases"]["exl2_reference_dequantize_1_thread"]
    assert one["median_ms"] == 120.0 and one["torch_threads"] == 1 and one["bpw"] == 4.08
    assert abs(one["weights_per_second_m"] - 4096 * 11008 / 0.120 / 1e6) < 1e-9
    assert s["ratios"] == {"exl2_reference_dequantize_1_thread_speed_over_gguf_q4_k": 0.600 / 0.120,
                           "exl2_reference_dequantize_default_threads_speed_over_gguf_q4_k": 0.600 / 0.150}
    assert "exl2_reference_1_thread_speed_over_gguf_q4_k" not in s["cases"]["gguf_q4_k_dequantize"]
    assert s["machine"]["cpu"] == "Some CPU"


def test_written_files_are_what_docs_figures_can_address(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps(RUN))
    assert report.main(["--from-json", str(tmp_path / "run.json"), "--out", str(tmp_path / "results")]) == 0
    data = json.loads((tmp_path / "results" / "benchmarks.json").read_text())
    assert all(k.replace("_", "").isalnum() for k in (*data["cases"], *data["ratios"]))  # no dots, spaces, brackets
    table = (tmp_path / "results" / "benchmarks.md").read_text().splitlines()
    assert len(table) == 2 + 3 and "| 5.00x |" in table[2] and table[4].endswith("|  |")  # gguf: no ratio to itself
