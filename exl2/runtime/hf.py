"""The ``"exl2"`` quantization method for transformers: ``import exl2.hf``, then
``AutoModelForCausalLM.from_pretrained(folder)`` (or ``AutoModel``) reads EXL2 folders.

Through transformers' public registry (``register_quantization_config``, ``register_quantizer``
in ``transformers.quantizers.auto``, transformers >= 4.50): :class:`Exl2Config` parses
``quantization_config`` and :class:`Exl2Quantizer`, before the weights are read, validates the
folder as :func:`exl2.load` does and puts an empty :class:`exl2.nn.Exl2Linear` (buffers shaped
from the files' headers) in place of every quantized linear; transformers then reads every tensor
into place, as for its own quantized formats.

One step needs more than the registry: transformers finds weights only under
``model.safetensors`` (or its index), while exllamav2 writes ``output.safetensors`` or
``output-0000N-of-0000M.safetensors`` (and downloads often carry a stale index of the float
model). :func:`_resolve_exl2_files` therefore wraps transformers' checkpoint-file lookup
(``modeling_utils._get_resolved_checkpoint_files``, present since 4.50): for a local folder whose
config.json says ``"quant_method": "exl2"`` (or when an :class:`Exl2Config` was passed) it returns
every ``*.safetensors`` file of the folder, as exllamav2's loader reads them; any other folder
goes to transformers untouched.
"""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path

import torch
import transformers
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import ContainerError, FormatError
from ..io import Model, read_header, shard_files
from ..nn import Exl2Linear
from .load import check_folder, quantized_linears

METHOD = "exl2"
#: Set while an EXL2 load is between its quantizer's creation and the checkpoint lookup.
_pending = threading.local()


class Exl2Config(QuantizationConfigMixin):
    """``config.json["quantization_config"]`` of an EXL2 model (the fields exllamav2's converter
    writes; others are kept as attributes). Pass ``quantization_config=Exl2Config()`` to
    ``from_pretrained`` for an exllamav2 folder whose config.json has none."""

    def __init__(self, bits: float | None = None, head_bits: int | None = None, version: str | None = None,
                 calibration: dict | None = None, **kwargs) -> None:
        self.quant_method = METHOD
        self.bits, self.head_bits, self.version, self.calibration = bits, head_bits, version, calibration
        for k, v in kwargs.items():
            setattr(self, k, v)


class Exl2Quantizer(HfQuantizer):
    """Loads pre-quantized EXL2 weights; EXL2 tensors keep the file's dtypes (spec 3.1)."""

    requires_calibration = False  # EXL2 files are always pre-quantized (exl2 quantize makes them)

    def __init__(self, quantization_config, **kwargs) -> None:
        kwargs["pre_quantized"] = True
        super().__init__(quantization_config, **kwargs)
        _pending.active = True

    def validate_environment(self, *args, **kwargs) -> None:
        return None

    def update_dtype(self, dtype):  # transformers >= 5
        return torch.float16 if dtype is None else dtype

    update_torch_dtype = update_dtype  # transformers 4

    def _process_model_before_weight_loading(self, model, **kwargs):
        files = kwargs.get("checkpoint_files") or getattr(_pending, "files", None)
        if not files:
            raise ContainerError("transformers gave no weight files for this EXL2 model")
        folder = Path(files[0]).parent
        with torch.device("cpu"):  # transformers builds the model under torch.device("meta")
            check_folder(folder)
        tensors = Model(folder)
        linears = quantized_linears(model, tensors)
        if not linears:
            raise FormatError("holds no EXL2 layers (q_weight tensors); a float checkpoint is quantized with "
                              "exl2 quantize", file=str(folder))
        for key, linear in linears.items():
            shapes = {n: tensors.tensors[f"{key}.{n}"].shape for n in ("q_weight", "q_scale", "q_scale_max", "q_groups",
                                                               "q_invperm", "bias") if f"{key}.{n}" in tensors}
            parent_name, _, child = key.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, Exl2Linear.empty(linear.in_features, linear.out_features, shapes))
        # stored q_perm (older files) is recomputed from q_invperm, as exllamav2 does (spec 3.3)
        ignore = model._keys_to_ignore_on_load_unexpected or ()
        as_set = isinstance(ignore, set) or int(transformers.__version__.split(".")[0]) >= 5  # 4: a list, 5: a set
        model._keys_to_ignore_on_load_unexpected = (set if as_set else list)([*ignore, r"\.q_perm$"])
        if "lm_head" in linears and getattr(model.config, "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False  # the head is stored on its own
        tied = getattr(model, "all_tied_weights_keys", None)  # transformers 5 maps ties before this step
        if isinstance(tied, dict):
            for name, target in list(tied.items()):
                if name.rpartition(".")[0] in linears or str(target).rpartition(".")[0] in linears:
                    del tied[name]
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for m in model.modules():
            if isinstance(m, Exl2Linear):
                m._parameters.pop("weight", None)  # a head transformers tried to tie
                for name in ("q_scale_max", "bias"):  # float16 in the file; lossless back if a loader cast them
                    t = getattr(m, name)
                    if t is not None and t.dtype != torch.float16:
                        setattr(m, name, t.to(torch.float16))
        return model.eval()

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _folder_is_exl2(path: Path) -> bool:
    try:
        qc = json.loads((path / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError, RecursionError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == METHOD


def _holds_exl2_layers(files: list[Path]) -> bool:
    for f in files:
        try:
            if any(e.name.endswith(".q_weight") for e in read_header(f).entries):
                return True
        except Exception:  # unreadable files are the validator's to report
            continue
    return False


def _resolve_exl2_files(original):
    @functools.wraps(original)
    def resolve(*args, **kwargs):
        path = kwargs.get("pretrained_model_name_or_path", args[0] if args else None)
        subfolder = kwargs.get("subfolder") or (kwargs.get("download_kwargs") or {}).get("subfolder") or ""
        active, _pending.active = getattr(_pending, "active", False), False
        folder = Path(str(path), subfolder) if path is not None else None
        if folder is None or not folder.is_dir() or kwargs.get("gguf_file"):
            return original(*args, **kwargs)
        if active or _folder_is_exl2(folder):
            files = [str(f) for f in shard_files(folder)]
            _pending.files = files
            if len(files) == 1:
                return files, None
            # several files: described as transformers describes an indexed checkpoint
            weight_map = {e.name: Path(f).name for f in files for e in read_header(Path(f)).entries}
            return files, {"metadata": {}, "weight_map": weight_map, "all_checkpoint_keys": list(weight_map)}
        candidates = sorted(folder.glob("*.safetensors"))
        if not (folder / "model.safetensors").is_file() and _holds_exl2_layers(candidates):
            raise FormatError("holds EXL2 layers but config.json has no quantization_config: pass "
                              "quantization_config=exl2.hf.Exl2Config() to from_pretrained, or use exl2.load",
                              file=str(folder))
        return original(*args, **kwargs)

    resolve._exl2 = True
    return resolve


def register() -> None:
    """Register the method with transformers (idempotent)."""
    from transformers import modeling_utils

    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantization_config(METHOD)(Exl2Config)
        register_quantizer(METHOD)(Exl2Quantizer)
    if not getattr(modeling_utils._get_resolved_checkpoint_files, "_exl2", False):
        modeling_utils._get_resolved_checkpoint_files = _resolve_exl2_files(modeling_utils._get_resolved_checkpoint_files)


__all__ = ["Exl2Config", "Exl2Quantizer", "register"]
