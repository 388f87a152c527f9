"""What ``exl2 quantize`` writes loads in exllamav2: a bias as wide as q_weight, groups of whole
32-row steps, and a config.json whose RoPE keys exllamav2 reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from exl2.conformance import validate_path
from exl2.io import open_model
from exl2.model.arch import exllamav2_config
from exl2.model.options import HEAD_OPTIONS, OPTIONS
from exl2.model.pipeline import Settings, fits, quantize_model
from exl2.reference import quantize

from . import exllamav2_emulation as ex
from .tiny_models import small_options, write_model


@pytest.mark.parametrize("centered", [False, True])
def test_biased_layer_of_80_columns_is_written_as_exllamav2_loads_it(tmp_path, centered):
    """Qwen2 with head_dim 40: k_proj and v_proj have 80 output features, q_weight 96 columns.
    Centered, the bias is corrected (exl2.model.centering) and its padding must stay zero."""
    src = write_model(tmp_path / "src", "qwen2", num_attention_heads=4, num_key_value_heads=2, head_dim=40)
    out = tmp_path / "out"
    quantize_model(Settings(src=str(src), out=out, bpw=4.0, rows=2, length=32, options=small_options(),
                            centered=centered, quant_rows=None))
    model, source = open_model(out), open_model(src)
    checked = 0
    for key in model.layer_keys():
        if key + ".bias" not in model:
            continue
        tensors = {n: model[n].numpy() for n in model.layer_tensor_names(key)}
        w = ex.load_weight({f"{key}.{n.rsplit('.', 1)[1]}": t for n, t in tensors.items()}, key)
        # exllamav2_ext/ext_qmatrix.cpp make_q_matrix: TORCH_CHECK_SHAPES(q_weight, 1, bias, 0, 1)
        assert w["bias"].shape[0] == w["q_weight"].shape[1], key
        n = source[key + ".bias"].numel()
        if not centered:
            assert np.array_equal(w["bias"][:n], source[key + ".bias"].to(torch.float16).numpy())
        else:
            assert np.isfinite(w["bias"]).all() and not np.array_equal(w["bias"][:n], source[key + ".bias"].to(
                torch.float16).numpy())
        assert not w["bias"][n:].any()
        # and the group map exllamav2 builds covers exactly the layer's rows
        assert ex.make_q_matrix(w).height == source[key + ".weight"].shape[1]
        checked += n % 32 != 0
    assert checked == 4  # k_proj and v_proj of both blocks
    report = validate_path(out, deep=True)
    assert report.ok, [f for f in report.findings if f.severity == "error"]


@pytest.mark.parametrize("rows", [80, 96, 100, 128, 336, 344, 352, 4096 + 16])
def test_fits_is_exactly_what_the_format_accepts(rows):
    """An option ``fits`` a layer iff the layer it encodes passes the format's group checks."""
    from exl2.errors import FormatError

    w = torch.randn(32, rows, generator=torch.Generator().manual_seed(rows))
    for option in OPTIONS + tuple(HEAD_OPTIONS.values()):
        try:
            quantize(w, option)
            ok = True
        except (FormatError, ValueError):
            ok = False
        assert fits(option, rows) == ok, (option.desc(), rows)


def test_only_fitting_options_are_offered(tmp_path):
    """hidden 80 (q/k/v/gate/up read 80 rows): only options ending in a 16-row 2-bit group fit
    those layers; the others get every option; the output validates."""
    src = write_model(tmp_path / "src", hidden_size=80, num_attention_heads=2, num_key_value_heads=2, head_dim=32)
    options = small_options()
    assert [fits(o, 80) for o in options] == [True, False, False, False]
    out = tmp_path / "out"
    summary = quantize_model(Settings(src=str(src), out=out, bpw=3.5, rows=2, length=32, options=options,
                                      head_bits=2))  # the head reads 80 rows too
    m = json.loads((out / "measurement.json").read_text())
    for key, entry in m["layers"].items():
        k = entry["shape"][0]
        assert [e is not None for e in entry["errors"]] == [fits(o, k) for o in options], key
        assert summary["allocation"]["choice"][key] in [o.desc() for o in options if fits(o, k)]
    assert validate_path(out).ok


def test_transformers_5_rope_parameters_become_the_keys_exllamav2_reads(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
    src = write_model(tmp_path / "src", rope_parameters=rope)
    written = json.loads((src / "config.json").read_text())
    assert "rope_theta" not in written and "rope_scaling" not in written  # transformers 5's form only
    out = tmp_path / "out"
    quantize_model(Settings(src=str(src), out=out, bpw=4.0, rows=2, length=32, options=small_options()))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0
    # exllamav2/config.py: rope_scaling with rope_type llama3 and its four keys
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
    assert cfg["rope_parameters"] == written["rope_parameters"]


@pytest.mark.parametrize("params, theta, scaling, noted", [
    ({"rope_type": "default", "rope_theta": 1e6}, 1e6, None, False),
    ({"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}, 1e4, {"type": "linear", "factor": 2.0}, False),
    ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 4096},
     1e4, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, False),
    ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, 1e4, None, True),  # exllamav2 needs the original length
    ({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, 1e4, None, True),  # no exllamav2 equivalent
    ({"rope_theta": "1e6"}, None, None, False),  # a string is not a theta
    ({"rope_theta": True}, None, None, False),
    ({"rope_theta": float("inf")}, None, None, False),
    ([1, 2], None, None, False),
    ("rope", None, None, False),
])
def test_exllamav2_config(params, theta, scaling, noted):
    cfg, notes = exllamav2_config({"model_type": "llama", "rope_parameters": params})
    assert cfg.get("rope_theta") == theta
    assert cfg.get("rope_scaling") == scaling
    assert bool(notes) == noted  # what cannot be expressed is said, not dropped silently


def test_exllamav2_config_keeps_what_is_there_and_does_not_touch_its_input():
    src = {"rope_theta": 7.0, "rope_scaling": {"type": "linear", "factor": 3.0},
           "rope_parameters": {"rope_type": "linear", "rope_theta": 9.0, "factor": 5.0},
           "text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 2e6}}}
    before = json.dumps(src)
    cfg, _ = exllamav2_config(src)
    assert cfg["rope_theta"] == 7.0 and cfg["rope_scaling"] == {"type": "linear", "factor": 3.0}
    assert cfg["text_config"]["rope_theta"] == 2e6  # exllamav2 reads text_config->rope_theta too
    assert json.dumps(src) == before


def test_longrope_writes_the_original_length_at_the_top_level():
    params = {"rope_type": "longrope", "rope_theta": 1e4, "long_factor": [1.0, 2.0], "short_factor": [1.0, 1.0],
              "original_max_position_embeddings": 4096}
    cfg, notes = exllamav2_config({"rope_parameters": params})
    assert cfg["rope_scaling"]["type"] == "longrope" and cfg["original_max_position_embeddings"] == 4096 and not notes


def test_default_options_fit_every_multiple_of_32():
    for rows in range(32, 8193, 32):
        assert any(fits(o, rows) for o in OPTIONS), rows
