"""The ablation table: what each technique of the encoder is worth, every row measured in one run.

    flock /tmp/exl2-heavy.lock python docs/make_ablation.py     (everything, in one process)
    python docs/make_ablation.py --quick OUT_DIR   (a check of the script: the llama only,
                                                   annealing cut short; writes to OUT_DIR)
    python docs/make_ablation.py --assemble      (no computing: the tables from the parts' rows)
    python docs/make_ablation.py --only MODEL:SECTION,...   (those rows only, kept in
        docs/results/ablation.partial.*.json, git-ignored; a later run without --only takes them over, so
        parts can run side by side: sections uniform, main_pipeline, steps, pipeline, slots,
        variants)

Writes ``docs/results/ablation.json`` (every row, and the figures README and docs quote) and
``docs/results/ablation.md`` (the tables docs/quantizing.md includes). Models:

- **all-MiniLM-L6-v2** (``example:minilm``): cosine similarity of sentence embeddings to the
  float32 model's, on the 30 shipped sentences (``exl2/data/sentences.txt``, set A) and on the
  40 of a second, independent set (``exl2/data/sentences-2.txt``, set B);
- **the tiny llama of the tests** (2 layers, hidden size 64, random weights:
  ``tests/tiny_llama.py``): relative squared error of the final
  hidden states on the same two sets (a decoder-side check; no pretrained llama fits the
  project's machines).

Rows: uniform round-to-nearest and uniform GPTQ at 3, 4 and 5 bits with groups of 128 and 32;
exllamav2's allocation (its slots and tables, measured here, then its 240-call annealing and p
sweep, :mod:`exl2.model.baseline_exllamav2`) and the exact allocator on that same slot
measurement; the encoder's steps from main's recipe to the shipped one, one change per row; and
``exl2 quantize`` itself as it ships, next to ``exl2 quantize`` with main's settings (the
conversion-time ratio). Rows sharing a measurement reuse it; each row's time counts its
measurement, allocation and quantization as if it ran alone (exllamav2's annealing runs every
target of both models side by side, and each of its rows counts that whole run).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exl2.model import arch, calibration  # noqa: E402
from exl2.model.evaluate import load_quantized, sentence_embeddings  # noqa: E402
from exl2.model.pipeline import Settings, quantize_model  # noqa: E402
from exl2.model.slots import anneal_plans  # noqa: E402
from exl2.model.source import Source  # noqa: E402
from exl2.model.options import EXLLAMAV2_OPTIONS, OPTIONS  # noqa: E402
from exl2.model.variants import Converter, Recipe  # noqa: E402
from exl2.qparams import QParams  # noqa: E402
from tests.tiny_llama import build as build_tiny_llama  # noqa: E402

RESULTS = ROOT / "docs" / "results"
COMPUTED: list[dict] = []  #: rows computed by this run (its cache file)
SECTIONS = ("uniform", "main_pipeline", "steps", "pipeline", "slots", "variants")
MINILM_TARGETS = [2.5, 3.0, 4.0, 5.0]
LLAMA_TARGETS = [4.0, 5.0, 6.0]  # the tiny llama's 64-wide layers cannot reach less than 3.4 bpw
#: main's calibration corpus: the first paragraphs of the shipped one.
MAIN_PARAGRAPHS = 18

#: The encoder's steps between main's recipe (the ``exl2 quantize`` rows with main's settings)
#: and the shipped one (the ``exl2 quantize`` rows), each adding one change to the previous.
MAIN = Recipe(layout="stream", rows=16, length=128, options=EXLLAMAV2_OPTIONS)
_DOCS = replace(MAIN, layout="documents", rows=32)
_COVARIANCE = replace(_DOCS, quant_rows=128, centered=True)
STEPS: list[tuple[str, str, Recipe]] = [
    ("corpus", "+ the 128-paragraph corpus (main: 18 paragraphs)", MAIN),
    ("documents", "+ one row per paragraph, special tokens as in use, 32 rows", _DOCS),
    ("quant_rows", "+ all 128 paragraphs for the quantization pass", replace(_DOCS, quant_rows=128)),
    ("centered", "+ GPTQ on the input covariance, bias corrected", _COVARIANCE),
    ("refine", "+ coordinate descent after GPTQ, 3 sweeps (quantization pass)",
     replace(_COVARIANCE, refine=3)),
    ("options", "+ 6 options between 2.4 and 3.3 bits (18 measured)", replace(_COVARIANCE, refine=3, options=OPTIONS)),
    ("input_error", "+ the quantization pass aimed at the float model's outputs",
     replace(_COVARIANCE, refine=3, options=OPTIONS, input_error=True)),
    ("sensitivity", "+ each block's errors weighted by how much of them reaches the output (probe)",
     replace(_COVARIANCE, refine=3, options=OPTIONS, input_error=True, sensitivity=True)),
    ("measure_rows", "+ all 128 paragraphs for the measurement's Hessians (its errors on the first 32)",
     replace(_COVARIANCE, refine=3, options=OPTIONS, input_error=True, sensitivity=True, rows=128, error_rows=32)),
]
#: What ``exl2 quantize`` ships: the last step.
SHIPPED = STEPS[-1][2]
#: Alternatives that did not ship, at two targets per model (on the step each names).
VARIANTS: list[tuple[str, str, Recipe]] = [
    ("damping", "GPTQ damping 0.01 of the mean diagonal (on the covariance step; ships 0.12, exllamav2's)",
     replace(_COVARIANCE, percdamp=0.01)),
    ("err_norm", "scale search on the squared error (on the covariance step; ships |error|^3.5, exllamav2's)",
     replace(_COVARIANCE, err_norm=2.0)),
    ("error_rows_all", "measurement errors on all 128 rows (on the shipped recipe, which takes them on the first 32)",
     replace(STEPS[-1][2], error_rows=None)),
]


def sentence_sets() -> dict[str, list[str]]:
    from importlib import resources

    def read(name):
        text = resources.files("exl2.data").joinpath(name).read_text(encoding="utf-8")
        return [line.strip() for line in text.splitlines() if line.strip()]

    return {"a": read("sentences.txt"), "b": read("sentences-2.txt")}


class MiniLMMetric:
    """Cosine similarity of sentence embeddings to the float model's, per sentence set."""

    higher_is_better = True

    def __init__(self, src: Source, sets: dict[str, list[str]]) -> None:
        self.sets = sets
        self.base = {k: sentence_embeddings(src.model, src.tokenizer, s) for k, s in sets.items()}

    def __call__(self, src: Source) -> dict[str, float]:
        out = {}
        for k, s in self.sets.items():
            cos = (self.base[k] * sentence_embeddings(src.model, src.tokenizer, s)).sum(-1)
            out[f"cos_{k}"], out[f"cos_min_{k}"] = float(cos.mean()), float(cos.min())
        return out


class LlamaMetric:
    """Relative squared error of the final hidden states (after the last norm), per set."""

    higher_is_better = False

    def __init__(self, src: Source, sets: dict[str, list[str]]) -> None:
        self.sets = sets
        self.base = {k: self._hidden(src, s) for k, s in sets.items()}

    @staticmethod
    def _hidden(src: Source, sentences: list[str]) -> list[torch.Tensor]:
        out = []
        with torch.inference_mode():
            for s in sentences:
                ids = src.tokenizer(s, return_tensors="pt")
                out.append(src.model(**ids, output_hidden_states=True, use_cache=False).hidden_states[-1])
        return out

    def __call__(self, src: Source) -> dict[str, float]:
        out = {}
        for k, s in self.sets.items():
            hidden = self._hidden(src, s)
            num = sum(float((a - b).square().sum()) for a, b in zip(hidden, self.base[k]))
            den = sum(float(b.square().sum()) for b in self.base[k])
            out[f"err_{k}"] = num / den
        return out


class Model:
    """One model of the ablation: its converter, metric, targets and rows."""

    def __init__(self, name: str, src: str, metric_cls, targets: list[float], sets, cache: Path,
                 saved: list[dict]) -> None:
        self.name, self.src, self.targets, self.cache = name, src, targets, cache
        text = calibration.default_text()
        main_text = "\n".join([p for p in text.split("\n") if p.strip()][:MAIN_PARAGRAPHS]) + "\n"
        self.main_text = main_text
        self.converter = Converter(src, text, log=lambda m: None)
        loaded = arch.load(src)
        self.metric = metric_cls(loaded, sets)
        self.shapes = [(f"{p}.{n}", (m.in_features, m.out_features)) for p, b in loaded.blocks
                       for n, m in b.named_modules() if isinstance(m, torch.nn.Linear)]
        self.rows: list[dict] = []
        self.saved = [r for r in saved if r["model"] == name]

    def _saved(self, section: str, key: str, targets: list[float | None]) -> list[dict] | None:
        found = [next((r for r in self.saved if (r["section"], r["key"], r["target"]) == (section, key, t)), None)
                 for t in targets]
        return None if any(r is None for r in found) else found

    def cached(self, section: str, key: str, targets: list[float | None]) -> bool:
        """Whether an interrupted run already measured these rows; if so they are taken over."""
        found = self._saved(section, key, targets)
        if found is not None:
            self.rows += found
        return found is not None

    def add(self, section: str, key: str, label: str, target: float | None, conv, seconds: float, **extra) -> dict:
        row = {"model": self.name, "section": section, "key": key, "label": label, "target": target,
               "bpw": conv.bpw if hasattr(conv, "bpw") else extra.pop("bpw"), "seconds": seconds,
               **self.metric(conv.src if hasattr(conv, "src") else extra.pop("src")), **extra}
        self.rows.append(row)
        COMPUTED.append(row)
        self.cache.write_text(json.dumps(COMPUTED), encoding="utf-8")
        print(f"{self.name:7} {key:18} {target or '':>4} {row['bpw']:.3f} "
              + " ".join(f"{k}={v:.4f}" for k, v in row.items() if k.startswith(("cos_", "err_")))
              + f" {seconds:.0f}s", flush=True)
        return row


def uniform_rows(model: Model) -> None:
    for gptq in (False, True):
        for bits in (3, 4, 5):
            for gs in (128, 32):
                kind = "gptq" if gptq else "rtn"
                if model.cached("uniform", f"{kind}{bits}_g{gs}", [None]):
                    continue
                # GPTQ as the covariance step runs it (no descent, no aim): what GPTQ alone gives
                recipe = replace(_COVARIANCE, uniform=QParams(gs, [bits], [1.0]), gptq=gptq)
                conv = model.converter.convert(recipe)[0]
                model.add("uniform", f"{kind}{bits}_g{gs}", f"uniform {kind.upper()} {bits}-bit, groups of {gs}",
                          None, conv, conv.seconds)


def step_rows(model: Model, section: str, steps, targets: list[float]) -> None:
    for key, label, recipe in steps:
        if model.cached(section, key, targets):
            continue
        converter = model.converter
        plans, alloc_seconds = converter.plans(recipe, targets)
        measure_seconds = converter.measurement(recipe)[1]
        for target, choice in zip(targets, plans):
            conv = converter.quantize(recipe, choice)
            model.add(section, key, label, target, conv, conv.seconds + measure_seconds + alloc_seconds)


def slot_rows(models: list[Model], anneal_kw: dict) -> None:
    """exllamav2's allocation and the exact one on the same slot measurement (the covariance step's recipe)."""
    if not models:
        return
    recipe = replace(_COVARIANCE, measure="slot")  # compared with the covariance step's per-linear rows
    measurements = []
    todo = [m for m in models if any(m._saved("slots", k, m.targets) is None for k in ("exllamav2", "exact_slots"))]
    for model in models:
        if model not in todo:
            model.cached("slots", "exllamav2", model.targets)
            model.cached("slots", "exact_slots", model.targets)
    if not todo:
        return
    models = todo
    for model in models:
        m, seconds, _ = model.converter.measurement(recipe)
        budgets = [int(model.converter.numel() * t) for t in model.targets]
        measurements.append((m, budgets))
    t0 = time.perf_counter()
    annealed = anneal_plans(measurements, **anneal_kw)
    anneal_seconds = time.perf_counter() - t0
    print(f"annealing: {anneal_seconds:.0f} s", flush=True)
    for model, (m, budgets), plans in zip(models, measurements, annealed):
        measure_seconds = model.converter.measurement(recipe)[1]
        exact, exact_seconds = model.converter.plans(recipe, model.targets)
        for target, (choice, info), exact_choice in zip(model.targets, plans, exact):
            conv = model.converter.quantize(recipe, choice)
            model.add("slots", "exllamav2", "exllamav2's allocation (slots, annealing, p sweep)", target, conv,
                          conv.seconds + measure_seconds + anneal_seconds, norm=info["norm"], anneal_seconds=anneal_seconds,
                          slot_rse=_slot_sum(m, choice), slot_max=_slot_max(m, choice))
            conv = model.converter.quantize(recipe, exact_choice)
            model.add("slots", "exact_slots", "exact allocation on the same slot measurement", target, conv,
                          conv.seconds + measure_seconds + exact_seconds,
                          slot_rse=_slot_sum(m, exact_choice), slot_max=_slot_max(m, exact_choice))


def _table_rank(row: dict) -> int:
    """Where a row goes in the table: uniform, main's pipeline, steps, the shipped pipeline, slots, variants."""
    if row["section"] == "pipeline":
        return 1 if row["key"] == "main_pipeline" else 3
    return {"uniform": 0, "steps": 2, "slots": 4, "variants": 5}[row["section"]]


def allocation_summary(model: Model) -> dict:
    """Per target, the measured objective (sum of relative squared block-output errors) of
    exllamav2's slot choice and of the exact one, and how much lower the exact one is."""
    out = {}
    for t in model.targets:
        if not any(r["key"] == "exllamav2" and r["target"] == t for r in model.rows):
            continue
        a, b = (next(r for r in model.rows if (r["key"], r["target"]) == (k, t)) for k in ("exllamav2", "exact_slots"))
        out[_tkey(t)] = {"annealed_rse": a["slot_rse"], "exact_rse": b["slot_rse"],
                         "reduction_pct": 100 * (1 - b["slot_rse"] / a["slot_rse"])}
    return out


def _slot_rows(m: dict, choice: dict) -> list[dict]:
    rows = []
    for s in m["slots"]:
        descs = {k: choice[k].desc() for k in s["keys"]}
        rows.append(next(r for r in s["rows"] if r["qparams"] == descs))
    return rows


def _slot_sum(m: dict, choice: dict) -> float:
    """The measured objective of a slot choice: the sum of relative squared block-output errors."""
    return sum(r["rse"] for r in _slot_rows(m, choice))


def _slot_max(m: dict, choice: dict) -> float:
    """The largest of exllamav2's errors (``1 - accuracy``) of a slot choice."""
    return max(r["error"] for r in _slot_rows(m, choice))


def _tkey(target: float) -> str:
    return f"b{target:g}".replace(".", "_")


def pipeline_rows(model: Model, work: Path, main_settings: bool) -> None:
    """``exl2 quantize`` itself: as it ships, or with main's settings (main's corpus, one token
    stream, 16 x 128). One measurement, reused by the other targets; each row's time counts it."""
    measurement, measure_seconds = None, 0.0
    if model.cached("pipeline", "main_pipeline" if main_settings else "pipeline", model.targets):
        return
    if main_settings:
        corpus = work / f"{model.name}-main-corpus.txt"
        corpus.write_text(model.main_text, encoding="utf-8")
        extra = dict(calibration=corpus, layout=MAIN.layout, rows=MAIN.rows, length=MAIN.length, quant_rows=None,
                     centered=False, refine=0, input_error=False, sensitivity=False, options=EXLLAMAV2_OPTIONS)
        key, label = "main_pipeline", "exl2 quantize with main's settings (16 x 128 tokens, one stream)"
    else:
        extra = {}
        key, label = "pipeline", "exl2 quantize as it ships (the last step's recipe)"
    for target in model.targets:
        out = work / f"{model.name}-{key}-{target}"
        t0 = time.perf_counter()
        summary = quantize_model(Settings(src=model.src, out=out, bpw=target, measurement=measurement, **extra))
        seconds = time.perf_counter() - t0
        if measurement is None:
            measurement, measure_seconds = out / "measurement.json", seconds
            seconds_alone = seconds
        else:
            seconds_alone = seconds + measure_seconds
        src = arch.load(model.src)
        load_quantized(src.model, out)
        model.add("pipeline", key, label, target, None, seconds_alone, bpw=summary["bpw"], src=src,
                  bytes=summary["bytes"], choice=summary["allocation"]["choice"])


def pictures(model: Model, folder: Path) -> None:
    """quality-vs-bpw.png (the pipeline, exllamav2's allocation and the uniform rows) and
    bits-per-layer.png (the shipped pipeline's choice per linear and target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from exl2.model.options import OPTIONS

    metric = "cos_a" if model.metric.higher_is_better else "err_a"
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key, style, label in (("pipeline", "o-", "exl2 quantize (as shipped)"),
                              ("main_pipeline", "o--", "exl2 quantize, main's settings"),
                              ("exllamav2", "s:", "exllamav2's allocation, same encoder")):
        rows = [r for r in model.rows if r["key"] == key]
        ax.plot([r["bpw"] for r in rows], [r[metric] for r in rows], style, label=label)
    for kind, marker in (("rtn", "x"), ("gptq", "+")):
        rows = [r for r in model.rows if r["section"] == "uniform" and r["key"].startswith(kind)]
        ax.plot([r["bpw"] for r in rows], [r[metric] for r in rows], marker, ms=9, label=f"uniform {kind.upper()} (3-5 bits)")
    ax.set_xlabel("bits per weight (stored)")
    ax.set_ylabel("mean cosine similarity to float32 (set A)" if metric == "cos_a" else "relative output error (set A)")
    ax.set_title(f"{model.name}: quality against size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "quality-vs-bpw.png", dpi=110)
    plt.close(fig)

    rows = [r for r in model.rows if r["key"] == "pipeline"]
    keys = list(rows[0]["choice"])
    shapes = dict(model.shapes)
    by_desc = {o.desc(): o for o in OPTIONS}
    grid = [[by_desc[r["choice"][k]].bpw(*shapes[k]) for r in rows] for k in keys]
    fig, ax = plt.subplots(figsize=(6, 9))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(rows)), [f"{r['target']:g}" for r in rows])
    ax.set_yticks(range(len(keys)), [k.replace("encoder.layer.", "L").replace("attention.", "attn.") for k in keys],
                  fontsize=6)
    ax.set_xlabel("target bpw")
    ax.set_title("bits per weight chosen per layer")
    fig.colorbar(im, ax=ax, label="bpw of the chosen option")
    fig.tight_layout()
    fig.savefig(folder / "bits-per-layer.png", dpi=110)
    plt.close(fig)


def markdown(models: list[Model]) -> str:
    lines = []
    for model in models:
        better = "higher" if model.metric.higher_is_better else "lower"
        metrics = [k for k in model.rows[0] if k.startswith(("cos_", "err_"))]
        lines += [f"**{model.name}** ({', '.join(metrics)}: {better} is better; time: seconds on 2 shared CPU cores)", "",
                  "| row | target | bpw | " + " | ".join(metrics) + " | time (s) |",
                  "|---|---:|---:|" + "---:|" * len(metrics) + "---:|"]
        for r in model.rows:
            target = f"{r['target']:g}" if r["target"] is not None else ""
            label = r["label"].replace("|", "\\|")
            lines.append(f"| {label} | {target} | {r['bpw']:.3f} | "
                         + " | ".join(f"{r[k]:.4f}" if k.startswith("cos") else f"{r[k]:.2e}" for k in metrics)
                         + f" | {r['seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def summary(model: Model) -> dict:
    """Named rows for the figures the docs quote: ``<section key>.<target>`` and uniform rows."""
    out: dict = {}
    for r in model.rows:
        name = r["key"] if r["target"] is None else f"{r['key']}_{_tkey(r['target'])}"
        out[name] = {k: v for k, v in r.items() if k not in ("model", "label")}
    return out


def check_shipped() -> None:
    """The shipped recipe here is what ``exl2 quantize`` runs by default."""
    d = Settings(src="", out=Path("."), bpw=4.0)
    got = (d.layout, d.rows, d.error_rows, d.length, d.quant_rows, d.centered, d.refine, d.input_error, d.sensitivity,
           [o.desc() for o in d.options])
    want = (SHIPPED.layout, SHIPPED.rows, SHIPPED.error_rows, SHIPPED.length, SHIPPED.quant_rows, SHIPPED.centered,
            SHIPPED.refine, SHIPPED.input_error, SHIPPED.sensitivity, [o.desc() for o in SHIPPED.options])
    if got != want:
        raise SystemExit(f"pipeline defaults {got} differ from the ablation's shipped recipe {want}")


def main(argv: list[str]) -> None:
    check_shipped()
    only = argv[argv.index("--only") + 1] if "--only" in argv else None
    quick = "--quick" in argv
    results = Path(argv[argv.index("--quick") + 1]) if quick else RESULTS
    results.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    sets = sentence_sets()
    with tempfile.TemporaryDirectory(prefix="exl2-ablation-") as tmp:
        work = Path(tmp)
        llama_dir = build_tiny_llama(work / "tiny-llama")
        tag = only.replace(":", "-").replace(",", "-") if only else "all"
        cache = results / f"ablation.partial.{tag}.json"
        saved = [r for f in sorted(results.glob("ablation.partial.*.json")) for r in json.loads(f.read_text())]
        models = [Model("MiniLM", "example:minilm", MiniLMMetric, MINILM_TARGETS, sets, cache, saved)] if not quick else []
        models.append(Model("llama", str(llama_dir), LlamaMetric, LLAMA_TARGETS, sets, cache, saved))
        want = {m.name: set(SECTIONS) for m in models}
        if only:
            name, sections = only.split(":")
            want = {m.name: (set(sections.split(",")) if m.name == name else set()) for m in models}
        if "--assemble" in argv:
            for model in models:
                model.rows = sorted(model.saved, key=_table_rank)
            want = {m.name: set() for m in models}
        for model in models:
            if "uniform" in want[model.name]:
                uniform_rows(model)
            if "main_pipeline" in want[model.name]:
                pipeline_rows(model, work, main_settings=True)
            if "steps" in want[model.name]:
                step_rows(model, "steps", STEPS, model.targets)
            if "pipeline" in want[model.name]:
                pipeline_rows(model, work, main_settings=False)
        slot_rows([m for m in models if "slots" in want[m.name]], {"samples": 2, "iterations": 10} if quick else {})
        for model in models:
            if "variants" in want[model.name]:
                step_rows(model, "variants", VARIANTS, model.targets[1:3] if len(model.targets) > 3 else model.targets[:2])
    if only:
        return
    result = {m.name.lower(): {"rows": summary(m), "allocation": allocation_summary(m)} for m in models}
    first = result[models[0].name.lower()]["rows"]
    if "pipeline_b4" in first and "main_pipeline_b4" in first:
        result["time_ratio_4"] = first["pipeline_b4"]["seconds"] / first["main_pipeline_b4"]["seconds"]
    (results / "ablation.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (results / "ablation.md").write_text(markdown(models), encoding="utf-8")
    if any(r["key"] == "pipeline" for r in models[0].rows):
        pictures(models[0], results)
    print(markdown(models))


if __name__ == "__main__":
    main(sys.argv[1:])
