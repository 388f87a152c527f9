"""``Exl2Linear``: a ``torch.nn.Module`` computing a linear layer from its EXL2 tensors."""

from __future__ import annotations

import torch
from torch import nn

from .qmatrix import LAYER_TENSORS, QMatrix
from .qparams import QParams


class Exl2Linear(nn.Module):
    """A linear layer stored as EXL2. Its buffers carry the EXL2 tensor names (``q_weight``,
    ``q_scale``, ``q_scale_max``, ``q_groups``, ``q_invperm``, ``bias``), so ``state_dict()``
    round-trips with EXL2 files. Forward runs ``exl2.fast.matmul`` on a GPU and the reference on
    the CPU.

    ``decoded_cache`` (opt-in, off by default): on the CPU, decode the layer once to float16 and
    keep it beside the EXL2 tensors (about 16 / bpw times their memory), instead of decoding it at
    every call; the result is the reference's, value for value."""

    def __init__(self, qm: QMatrix) -> None:
        super().__init__()
        self.in_features = qm.in_features
        self.out_features = qm.out_features
        self.decoded_cache = False
        for name in LAYER_TENSORS:
            self.register_buffer(name, getattr(qm, name))
        self.register_buffer("bias", qm.bias)

    @classmethod
    def empty(cls, in_features: int, out_features: int, shapes: dict[str, tuple[int, ...]],
              device: torch.device | str = "meta") -> "Exl2Linear":
        """A layer whose buffers have the given shapes (``shapes``: EXL2 tensor name to shape, from a
        file's header; ``bias`` optional) and the format's dtypes, not yet filled: for loaders that
        copy the file's tensors in afterwards (transformers' ``from_pretrained``)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.decoded_cache = in_features, out_features, False
        dtypes = dict(LAYER_TENSORS, bias=torch.float16)
        for name, dtype in dtypes.items():
            shape = shapes.get(name)
            self.register_buffer(name, None if shape is None else torch.empty(shape, dtype=dtype, device=device))
        return self

    @property
    def qmatrix(self) -> QMatrix:
        """The layer's tensors as a QMatrix (rebuilt when the buffers were replaced, e.g. by
        ``load_state_dict`` or ``.to``)."""
        # in-place changes (load_state_dict copies into the buffers) bump a tensor's version
        tensors = [getattr(self, n) for n in LAYER_TENSORS] + ([self.bias] if self.bias is not None else [])
        key = tuple((t.data_ptr(), t._version) for t in tensors) + (self.q_weight.device,)
        cached = getattr(self, "_qm_cache", None)
        if cached is None or cached[0] != key:
            # the bias is stored padded to q_weight's width (spec 3.3); QMatrix.output_bias is its first N
            qm = QMatrix(*(getattr(self, n) for n in LAYER_TENSORS), bias=self.bias, out_features=self.out_features)
            cached = (key, qm)
            self._qm_cache = cached
        return cached[1]

    @classmethod
    def from_linear(cls, linear: nn.Linear, qparams: QParams, hessian: torch.Tensor | None = None) -> "Exl2Linear":
        """Quantize an ``nn.Linear`` (GPTQ when a Hessian is given): the fast path on a GPU,
        the reference on the CPU."""
        w = linear.weight.detach()
        if w.is_cuda:
            from .fast import quantize
        else:
            from .reference import quantize
        return cls(quantize(w, qparams, hessian, bias=linear.bias))

    def _apply(self, fn, recurse: bool = True):
        """Moves between devices apply; dtype casts (``.half()``, ``.float()``, ``.to(dtype)``) do
        not: the EXL2 tensors keep the file's dtypes (spec 3.1), and the output follows x's dtype."""

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(out.device)

        return super()._apply(keep_dtype, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qm = self.qmatrix
        if x.is_cuda:
            from .fast import matmul
        elif self.decoded_cache:
            return self._cached_matmul(x, qm)
        else:
            from .reference import matmul
        return matmul(x, qm)

    def _cached_matmul(self, x: torch.Tensor, qm: QMatrix) -> torch.Tensor:
        """The reference's product (float32 accumulation, spec 6.5) over the decoded weights kept
        from the first call; decoded again only when the buffers changed."""
        cached = getattr(self, "_decoded", None)
        if cached is None or cached[0] is not qm:
            from .reference import dequantize

            cached = (qm, dequantize(qm)[:, : qm.out_features].contiguous())
            self._decoded = cached
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features, the layer takes {self.in_features}")
        y = x.to(torch.float32) @ cached[1].to(torch.float32)
        if qm.output_bias is not None:
            y = y + qm.output_bias.to(torch.float32)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
