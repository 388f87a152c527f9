"""``exl2.load``: a whole EXL2 model, built by transformers, with ``Exl2Linear`` layers.

Steps, each refusing bad input with one line (file, tensor, finding code) before anything is built:

1. the folder goes through the validator's container, config and layer rules
   (:func:`exl2.conformance.validate_path`); its first error is raised;
2. config.json's ``architectures`` picks the transformers class (a causal LM by its own class;
   anything else, e.g. the BERT family, as ``AutoModel``, the class ``exl2 quantize`` reads and
   writes the tensors of), built with its parameters on the meta device (buffers such as rotary
   frequencies are computed as usual);
3. every ``nn.Linear`` with a ``KEY.q_weight`` in the folder becomes an :class:`exl2.nn.Exl2Linear`
   (its true out_features are the linear's, from config.json; a bias padded to q_weight's width
   is kept as stored and sliced at use); every other parameter is read from the folder. A tied
   output embedding shares the input embedding when the folder has no head of its own.

Tensors are read with plain file reads into their final tensors (no memory map, whose pages would
count twice), one at a time, and no float copy of a quantized weight is ever made: loading peaks at
about the folder's tensors plus one tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ContainerError, Exl2Error, FormatError
from ..format import padded_columns
from ..io import Model, config_path
from ..meta import params_on_meta
from ..nn import Exl2Linear
from ..qmatrix import QMatrix


def check_folder(path: str | os.PathLike) -> None:
    """Refuse a folder the validator finds an error in (container, config and layer rules):
    :class:`FormatError` with the first error's code, file and tensor; :class:`ContainerError`
    when there is no model at all."""
    from ..conformance.validate import validate_path

    report = validate_path(path)
    errors = [f for f in report.findings if f.severity == "error"]
    if errors:
        first = errors[0]
        more = f" (and {len(errors) - 1} more: exl2 validate {path})" if len(errors) > 1 else ""
        raise FormatError(f"{first.message} [{first.code}]{more}", file=first.file, tensor=first.tensor)


def read_config(path: str | os.PathLike) -> dict:
    if not Path(path).exists():
        raise ContainerError("does not exist", file=str(path))
    cfg = config_path(Path(path))
    if not cfg.is_file():
        raise ContainerError("not found: a model is built from its config.json", file=str(cfg))
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise ContainerError("is not valid JSON", file=str(cfg)) from None
    if not isinstance(data, dict):
        raise ContainerError("is not a JSON object", file=str(cfg))
    return data


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """The float dtype as transformers' from_pretrained / from_config take it: ``dtype`` since
    version 5, ``torch_dtype`` before."""
    import transformers

    return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}


def model_class(config: dict, where: str):
    """The transformers class to build: config.json's causal LM class, else ``AutoModel``."""
    import transformers

    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
        raise ContainerError("names no architectures (a list of transformers class names)", file=where)
    cls = getattr(transformers, archs[0], None) if archs[0].isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ContainerError(f"names the architecture {archs[0]!r}, which transformers "
                             f"{transformers.__version__} does not know", file=where)
    return cls if archs[0].endswith("ForCausalLM") else transformers.AutoModel


def build_skeleton(path: str | os.PathLike, dtype: torch.dtype) -> nn.Module:
    """The model config.json describes, parameters on the meta device, float buffers in ``dtype``."""
    import transformers

    config = read_config(path)
    where = str(config_path(Path(path)))
    cls = model_class(config, where)
    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(Path(path)), local_files_only=True)
        if hasattr(hf_config, "quantization_config"):  # the model is built plain; its linears are replaced below
            del hf_config.quantization_config
        kw = dtype_kwarg(dtype)  # transformers sets it as the default dtype while building
        with params_on_meta():
            model = cls.from_config(hf_config, **kw) if cls is transformers.AutoModel else cls._from_config(hf_config, **kw)
    except Exl2Error:
        raise
    except Exception as e:  # transformers raises many kinds for a config it cannot build
        raise ContainerError(f"cannot be built by transformers: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''}", file=where) from None
    return model


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def quantized_linears(model: nn.Module, files: Model) -> dict[str, nn.Linear]:
    """The model's linears that the folder stores as EXL2, by name; every EXL2 layer of the folder
    must be one of them, with the linear's in_features and out_features padded to q_weight's width."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    out = {}
    for key in files.layer_keys():
        linear = linears.get(key)
        qw = key + ".q_weight"
        if linear is None:
            raise FormatError(f"is not a linear layer of {type(model).__name__}", file=str(files.tensors[qw].file), tensor=qw)
        cols, k = files.tensors[qw].shape[1], files.tensors[key + ".q_invperm"].shape[0]
        if k != linear.in_features or cols != padded_columns(linear.out_features):
            raise FormatError(f"holds a {k} x {cols} layer; config.json gives {linear.in_features} x "
                              f"{linear.out_features} ({padded_columns(linear.out_features)} padded columns)",
                              file=str(files.tensors[qw].file), tensor=qw)
        if linear.bias is not None and key + ".bias" not in files:
            raise FormatError(f"is missing ({type(model).__name__}'s {key} has a bias)",
                              file=str(files.path), tensor=key + ".bias")
        out[key] = linear
    return out


def fill(model: nn.Module, files: Model) -> None:
    """Put an Exl2Linear in place of every quantized linear and read every other parameter and
    persistent buffer from the folder; then tie a head the folder lacks to the input embedding."""
    for key, linear in quantized_linears(model, files).items():
        try:
            qm = QMatrix.from_tensors(files, key, out_features=linear.out_features)
        except Exl2Error as e:
            raise e.at(file=str(files.tensors[key + ".q_weight"].file)) from None
        parent, child = _parent(model, key)
        setattr(parent, child, Exl2Linear(qm))
    for name, t in model.state_dict(keep_vars=True).items():
        module, attr = _parent(model, name)
        if isinstance(module, Exl2Linear) or name not in files:
            continue
        if tuple(files.tensors[name].shape) != tuple(t.shape):
            raise FormatError(f"has shape {list(files.tensors[name].shape)}, {type(model).__name__} expects {list(t.shape)}",
                              file=str(files.tensors[name].file), tensor=name)
        value = files[name]
        if value.is_floating_point() != t.is_floating_point():
            raise FormatError(f"has dtype {value.dtype}, {type(model).__name__} expects a "
                              f"{'float' if t.is_floating_point() else str(t.dtype)} tensor",
                              file=str(files.tensors[name].file), tensor=name)
        if value.is_floating_point():
            value = value.to(t.dtype)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[attr] = value
    _tie_head(model)
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if t is not None and t.is_meta]
    if missing:
        raise FormatError(f"is missing ({type(model).__name__} needs it)"
                          + (f"; {len(missing) - 1} more tensors are missing too" if len(missing) > 1 else ""),
                          file=str(files.path), tensor=missing[0])


def _tie_head(model: nn.Module) -> None:
    """A float output embedding the folder has no weight for shares the input embedding's, when
    config.json ties them (transformers' default for many small models)."""
    config = getattr(model, "config", None)
    get_out, get_in = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    if config is None or get_out is None or get_in is None or not getattr(config, "tie_word_embeddings", False):
        return
    head, embed = get_out(), get_in()
    if isinstance(head, nn.Linear) and head.weight.is_meta and embed is not None and not embed.weight.is_meta:
        head.weight = embed.weight


def load(path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype = torch.float16,
         decoded_cache: bool = False) -> nn.Module:
    """The model of an EXL2 folder (exllamav2's layout or ``exl2 quantize``'s), ready for inference.

    ``device``: where to run (None: the CPU); ``Exl2Linear`` uses the fast path on CUDA and the
    reference elsewhere. ``dtype``: of the float parameters and activations (embeddings, norms,
    an unquantized head); EXL2 tensors keep the file's dtypes. ``decoded_cache``: keep each
    layer's decoded float16 weights after first use (CPU speed for memory, see Exl2Linear).
    Raises :class:`FormatError` (the folder breaks a rule; the validator's code is in the message)
    or :class:`ContainerError` (no model, unreadable, or an architecture transformers cannot build)."""
    check_folder(path)
    model = build_skeleton(path, dtype)
    with Model(path) as files:
        fill(model, files)
    for m in model.modules():
        if isinstance(m, Exl2Linear):
            m.decoded_cache = decoded_cache
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model


__all__ = ["build_skeleton", "check_folder", "dtype_kwarg", "fill", "load", "params_on_meta",
           "quantized_linears"]
