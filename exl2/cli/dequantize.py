"""``exl2 dequantize PATH -o OUT.safetensors``: an EXL2 model back to float16 ``nn.Linear`` weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import typer

from ..errors import ContainerError, Exl2Error, FormatError, UsageError
from ..io import DTYPES, Model, SafetensorsWriter, check_writable, open_model
from . import app
from .common import progress


def backend_dequantize(name: str):
    """The ``dequantize`` function of a backend: ``reference`` or ``fast``."""
    if name == "reference":
        from ..reference import dequantize

        return dequantize
    if name == "fast":
        try:
            prepare_fast_backend()
            from .. import fast
        except ModuleNotFoundError as e:  # triton is an optional extra
            raise UsageError(f"--backend fast needs Triton, which is not installed ({e.name or e}): "
                             f"pip install 'exl2[fast]', or use --backend reference") from None

        if fast.interpreted():
            return fast.dequantize
        return lambda qm: fast.dequantize(qm.to("cuda")).cpu()
    raise UsageError(f"unknown backend {name!r} (choose reference or fast)")


def prepare_fast_backend() -> None:
    """Without a GPU, opt this process in to Triton's interpreter (exl2.fast never does so by
    itself), and tell the user, once, that the fast path will run interpreted."""
    from .. import fast

    if not torch.cuda.is_available():
        fast.use_interpreter()
    note = fast.backend_note()
    if note:
        print(f"exl2: note: {note}", file=sys.stderr)


def plan_entries(model: Model) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The output's tensors, in order: ``KEY.weight`` float16 ``[out_padded, in]`` for each
    quantized layer, then every other tensor unchanged. Shapes come from the headers alone; a
    layer whose shapes break spec 3.1 is refused here, before anything is written."""
    layer_names = set()
    entries = []
    for key in model.layer_keys():
        names = model.layer_tensor_names(key)
        layer_names.update(n for n in names if n != key + ".bias")
        qw, inv = model.tensors.get(key + ".q_weight"), model.tensors.get(key + ".q_invperm")
        if qw is None or inv is None:  # a layer is known by any of its tensors (exl2.layer_rules.layer_keys)
            present = model.tensors[names[0]]
            raise FormatError("is missing [EXL2-T001]", file=str(present.file),
                              tensor=key + (".q_weight" if qw is None else ".q_invperm"))
        if len(qw.shape) != 2:
            raise FormatError(f"has shape {list(qw.shape)}, expected 2 dimensions [EXL2-T003]", file=str(qw.file),
                              tensor=key + ".q_weight")
        if len(inv.shape) != 1:
            raise FormatError(f"has shape {list(inv.shape)}, expected 1 dimension [EXL2-T003]", file=str(inv.file),
                              tensor=key + ".q_invperm")
        if key + ".weight" in model.tensors:
            raise Exl2Error("is stored beside the quantized layer; its dequantized weight would have the same name",
                            file=str(model.tensors[key + ".weight"].file), tensor=key + ".weight")
        entries.append((key + ".weight", torch.float16, (qw.shape[1], inv.shape[0])))
    for name, info in model.tensors.items():
        if name not in layer_names:
            entries.append((name, DTYPES[info.dtype], info.shape))
    return entries


@app.command("dequantize")
def dequantize_cmd(
    path: Path = typer.Argument(..., help="EXL2 model folder or .safetensors file"),
    output: Path = typer.Option(..., "-o", "--output", help="output .safetensors file"),
    backend: str = typer.Option("reference", help="reference (pure PyTorch) or fast (Triton)"),
) -> None:
    """Write KEY.weight (float16, [out_features_padded, in_features], input features in original
    order) for every quantized layer, and copy every other tensor unchanged. Streams one layer at
    a time; nothing is left at OUT on error."""
    from . import fail

    try:
        if output.suffix != ".safetensors":
            raise UsageError("output must end in .safetensors", file=str(output))
        check_writable(output, folder=False)
        decode = backend_dequantize(backend)
        with open_model(path) as model:
            if not model.layer_keys():
                raise ContainerError("holds no EXL2 layer (no *.q_weight tensor)", file=str(path))
            entries = plan_entries(model)
            layer_of = {f"{k}.weight": k for k in model.layer_keys()}
            with SafetensorsWriter(output, entries, metadata={"format": "pt", "source": "exl2 dequantize"}) as w:
                for name, _, _ in progress(entries, len(entries), "dequantize"):
                    if name in layer_of:
                        tensor = decode(model.qmatrix(layer_of[name])).T.contiguous()
                    else:
                        tensor = model[name]
                    w.write(name, tensor)
    except Exl2Error as e:
        raise fail(e) from None
