"""The per-layer rules of the spec (sections 3 to 6), each reported with its finding code.

The rules themselves are :mod:`exl2.layer_rules`, the table :class:`exl2.QMatrix` refuses a
layer from at the first error; ``check_layer`` reports every violation of that table as a
finding, and never raises whatever the tensors hold.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..layer_rules import LAYER_TENSORS, OPTIONAL_TENSORS, Violation, layer_rules, run
from ..qmatrix import QMatrix
from .findings import Finding, errors_of, finding

#: |stored - target| bits per weight above which EXL2-K005 is reported (spec 7.5): exllamav2's
#: optimizer lands within a few hundredths of its target; padding of narrow layers and the
#: bias can add a little more.
BPW_TOLERANCE = 0.3


def check_layer(tensors: Mapping[str, torch.Tensor], prefix: str, *, file: str | None = None,
                bits_target: float | None = None, out_features: int | None = None) -> list[Finding]:
    """Every finding for the layer ``prefix`` of ``tensors`` (a mapping from full tensor names,
    ``{prefix}.q_weight`` ...). Never raises, whatever the tensors hold.

    ``out_features`` is the layer's true width when known from elsewhere (config.json); padded
    columns are checked only then (the bias holds all N' columns, spec 3.3).
    ``bits_target``: when given, a layer whose stored bits per weight (spec 7.5) differ from it by
    more than :data:`BPW_TOLERANCE` gets EXL2-K005. Pass it for a layer quantized alone at a known
    rate; a whole model's layers legitimately spread around its target (exllamav2's optimizer picks
    each layer's option), so :func:`exl2.conformance.validate_path` compares the average instead."""
    return _LayerCheck(tensors, prefix, file, out_features, bits_target).run()  # a bug raises: it is no finding


def check_qmatrix(qm: QMatrix, prefix: str = "layer", *, bits_target: float | None = None) -> list[Finding]:
    """Findings for an in-memory QMatrix (errors, warnings and infos)."""
    return check_layer(qm.to_tensors(prefix), prefix, out_features=qm.out_features, bits_target=bits_target)


class _LayerCheck:
    """The rules of :mod:`exl2.layer_rules` over one layer of a tensor mapping, as findings, and
    the bits-per-weight target."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], prefix: str, file: str | None, out_features: int | None,
                 bits_target: float | None):
        self.tensors, self.prefix, self.file, self.out_features = tensors, prefix, file, out_features
        self.bits_target = bits_target
        self.findings: list[Finding] = []

    def add(self, v: Violation) -> None:
        self.findings.append(finding(v.code, file=self.file, tensor=f"{self.prefix}.{v.tensor}", message=v.message))

    def run(self) -> list[Finding]:
        names = (*LAYER_TENSORS, *OPTIONAL_TENSORS)
        layer = {n: self.tensors[f"{self.prefix}.{n}"] for n in names if f"{self.prefix}.{n}" in self.tensors}
        groups = run(layer_rules(layer, self.out_features), self.add)
        if groups is not None and self.bits_target is not None:
            self.bits_per_weight(layer)
        return self.findings

    def bits_per_weight(self, layer: dict[str, torch.Tensor]) -> None:
        """Stored bits per weight of the layer against ``bits_target`` (spec 7.5)."""
        bits = 8 * sum(t.numel() * t.element_size() for n, t in layer.items() if n != "q_perm")
        n = self.out_features or layer["q_weight"].shape[1]
        bpw = bits / (layer["q_invperm"].numel() * n)
        if abs(bpw - self.bits_target) > BPW_TOLERANCE:
            self.findings.append(finding("EXL2-K005", file=self.file, tensor=f"{self.prefix}.q_weight",
                                         message=f"stores {bpw:.3f} bits per weight, target {self.bits_target} "
                                                 f"(tolerance {BPW_TOLERANCE})"))


__all__ = ["BPW_TOLERANCE", "check_layer", "check_qmatrix", "errors_of"]
