"""The fast path: the reference's functions as Triton kernels.

- :func:`dequantize` — bit-exact with :func:`exl2.reference.dequantize` (spec 8.1);
- :func:`matmul` — three paths by the rows M of x: a split-K GEMV that reads every q_weight
  word once (M <= :data:`GEMV_MAX_M`), a fused decode + tensor-core GEMM (up to
  :data:`MATMUL_CROSSOVER_M`), dequantize then ``torch.matmul`` above; float32 accumulation,
  within the spec's bound (8.2.1);
- :func:`quantize` — the reference's algorithm (scale search, RTN or GPTQ) with codes, packing
  and GPTQ's row loop on Triton kernels (:mod:`exl2.fast.gptq`): packed words and codes given the
  scales bit-exact (8.1), GPTQ within its bound (8.2.3).

One kernel design serves every width and mixed groups: the per-column little-endian bit string
of spec 5.1, with the width a runtime value per row or per tile, driven by small tables derived
from the group table (:mod:`exl2.fast.plan`). The file's q_weight is used as it is; nothing is
repacked.

Needs the ``fast`` extra (``pip install 'exl2[fast]'``: triton). Importing this package imports
no triton and changes nothing in the process; the kernels load on first use.

On CUDA or ROCm tensors the kernels are compiled. Without a GPU they can run under Triton's
interpreter on CPU tensors (correct, and slow), but only when the program opts in, before
anything imports triton: :func:`use_interpreter`, or ``TRITON_INTERPRET=1`` in the environment.
The switch is Triton's own and applies to the whole process (Triton decorates its standard
library when it is imported), which is why exl2 never flips it by itself: the ``exl2`` command
does for ``--backend fast`` without a GPU, and the test suite's conftest does for its process.
Without either, a call on CPU tensors raises a RuntimeError that says how to opt in.
:func:`backend_note` returns the line to show users when the kernels run interpreted.
``python exl2/fast/aot_check.py`` compiles every kernel for a GPU target on a machine without one.
"""

from __future__ import annotations

import importlib
import os
import sys

from ..extras import install_hint

#: The public names and the module of this package each comes from, imported on first use.
_EXPORTS = {
    "quantize": "gptq",
    "GEMV_MAX_M": "ops", "MATMUL_CROSSOVER_M": "ops", "dequantize": "ops", "encode_rows": "ops",
    "interpreted": "ops", "matmul": "ops", "pack_codes": "ops",
}


def use_interpreter() -> None:
    """Opt in to Triton's interpreter for this process: the kernels then run on CPU tensors,
    without a GPU (bit-exact, and much slower than the reference). Sets ``TRITON_INTERPRET=1``,
    which Triton reads when it is imported, so call this before anything imports triton (it
    affects all Triton code in the process, and child processes inherit it). Raises
    RuntimeError when triton is already imported without the interpreter."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules:
        raise RuntimeError("exl2.fast.use_interpreter() came too late: triton is already imported, with its kernels "
                           "set to compile for a GPU; call it before anything imports triton, or start Python with "
                           "TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"


def backend_note() -> str | None:
    """A note for users when the kernels will run interpreted (no GPU); None otherwise."""
    from .ops import interpreted

    if interpreted():
        return ("no GPU found: the Triton fast path runs under Triton's interpreter on the CPU, "
                "bit-exact but much slower than the reference backend")
    return None


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    except ModuleNotFoundError as e:
        if e.name != "triton":
            raise
        raise ModuleNotFoundError(f"exl2.fast needs triton; {install_hint('triton')}", name="triton") from e
    globals()[name] = value
    return value


__all__ = ["GEMV_MAX_M", "MATMUL_CROSSOVER_M", "backend_note", "dequantize", "encode_rows", "interpreted", "matmul",
           "pack_codes", "quantize", "use_interpreter"]
