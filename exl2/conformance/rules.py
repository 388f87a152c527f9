"""The per-layer rules of the spec (sections 3 to 6), each reported with its finding code.

Unlike :class:`exl2.QMatrix`, which refuses a layer at the first broken rule, ``check_layer``
reports every rule a layer breaks, and never raises whatever the tensors hold.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..format import COLUMN_PAD, MAX_IN_FEATURES, zero_point
from ..qmatrix import LAYER_TENSORS, QMatrix, check_groups
from ..reference.packing import unpack_codes, unpack_scales
from .findings import Finding, errors_of, finding

#: |stored - target| bits per weight above which EXL2-K005 is reported (spec 7.5): exllamav2's
#: optimizer lands within a few hundredths of its target; padding of narrow layers and the
#: bias can add a little more.
BPW_TOLERANCE = 0.3


def check_layer(tensors: Mapping[str, torch.Tensor], prefix: str, *, file: str | None = None,
                bits_target: float | None = None, out_features: int | None = None) -> list[Finding]:
    """Every finding for the layer ``prefix`` of ``tensors`` (a mapping from full tensor names,
    ``{prefix}.q_weight`` ...). Never raises, whatever the tensors hold.

    ``out_features`` is the layer's true width when known from elsewhere (config.json); the bias
    length is used otherwise. Padded columns are checked only when one of them is known.
    ``bits_target``: when given, a layer whose stored bits per weight (spec 7.5) differ from it by
    more than :data:`BPW_TOLERANCE` gets EXL2-K005. Pass it for a layer quantized alone at a known
    rate; a whole model's layers legitimately spread around its target (exllamav2's optimizer picks
    each layer's option), so :func:`exl2.conformance.validate_path` compares the average instead."""
    return _LayerCheck(tensors, prefix, file, out_features, bits_target).run()  # a bug raises: it is no finding


def check_qmatrix(qm: QMatrix, prefix: str = "layer", *, bits_target: float | None = None) -> list[Finding]:
    """Findings for an in-memory QMatrix (errors, warnings and infos)."""
    return check_layer(qm.to_tensors(prefix), prefix, out_features=qm.out_features, bits_target=bits_target)


class _LayerCheck:
    def __init__(self, tensors: Mapping[str, torch.Tensor], prefix: str, file: str | None, out_features: int | None,
                 bits_target: float | None):
        self.tensors, self.prefix, self.file, self.out_features = tensors, prefix, file, out_features
        self.bits_target = bits_target
        self.findings: list[Finding] = []

    def add(self, code: str, name: str, message: str) -> None:
        self.findings.append(finding(code, file=self.file, tensor=f"{self.prefix}.{name}", message=message))

    def run(self) -> list[Finding]:
        t = self.required_tensors()
        if "q_invperm" in t:
            self.permutations(t["q_invperm"])
        if "q_scale_max" in t:
            self.scale_maxima(t["q_scale_max"])
        cols = t["q_weight"].shape[1] if "q_weight" in t else None
        n_real = self.bias(cols)
        if len(t) < len(LAYER_TENSORS):
            return self.findings
        qw, qs, smax, qg, inv = (t[n] for n in LAYER_TENSORS)
        q_rows = qw.shape[0]
        k = inv.numel()
        if cols == 0 or cols % COLUMN_PAD:
            self.add("EXL2-T004", "q_weight", f"has {cols} columns, not a positive multiple of {COLUMN_PAD}")
        if not 0 < k <= MAX_IN_FEATURES:
            self.add("EXL2-G007", "q_invperm", f"in_features {k} is outside 1..{MAX_IN_FEATURES} (q_perm is 16-bit)")
        if qg.numel() == 0 or qg.numel() % 2:
            self.add("EXL2-T003", "q_groups", f"has {qg.numel()} entries, not a positive even number")
            return self.findings
        g = qg.numel() // 2
        shapes_ok = True
        if tuple(qs.shape) != (g, cols // 8):
            self.add("EXL2-T003", "q_scale", f"has shape {list(qs.shape)}, expected [{g}, {cols // 8}] for {g} groups")
            shapes_ok = False
        if tuple(smax.shape) != (g,):
            self.add("EXL2-T003", "q_scale_max", f"has shape {list(smax.shape)}, expected [{g}]")
            shapes_ok = False
        groups = self.group_table(qg, q_rows, k)
        if groups is not None and shapes_ok and cols and cols % COLUMN_PAD == 0:
            if n_real is not None:
                self.padding(qw, qs, groups, n_real)
            if self.bits_target is not None and k:
                self.bits_per_weight(t, n_real or cols)
        return self.findings

    def required_tensors(self) -> dict[str, torch.Tensor]:
        """The required tensors that are present with the right dtype and rank (spec 3.1); a
        finding for each of the others."""
        got = {}
        for name, dtype in LAYER_TENSORS.items():
            key = f"{self.prefix}.{name}"
            if key not in self.tensors:
                self.add("EXL2-T001", name, "is missing")
                continue
            t = self.tensors[key]
            rank = 2 if name in ("q_weight", "q_scale") else 1
            if not isinstance(t, torch.Tensor):
                self.add("EXL2-T002", name, f"is a {type(t).__name__}, not a tensor")
            elif t.dtype != dtype:
                self.add("EXL2-T002", name, f"has dtype {_dtype(t.dtype)}, expected {_dtype(dtype)}")
            elif t.dim() != rank:
                self.add("EXL2-T003", name, f"has shape {list(t.shape)}, expected {rank} dimension(s)")
            else:
                got[name] = t
        return got

    def group_table(self, qg: torch.Tensor, q_rows: int, k: int):
        """Spec 4.1-4.6 (:func:`exl2.qmatrix.check_groups`, which reports each rule's code)."""
        groups = check_groups(qg.to(torch.int64).view(-1, 2).tolist(), q_rows, k, self.add)
        return None if groups is None else [(g.bits, g.qrow, g.qrows, g.rows) for g in groups]

    def permutations(self, inv: torch.Tensor) -> None:
        k = inv.numel()
        p = inv.to(torch.int64)
        if k and (p.min() < 0 or p.max() >= k or torch.bincount(p.clamp(0, k - 1), minlength=k).ne(1).any()):
            self.add("EXL2-P001", "q_invperm", f"is not a permutation of 0..{k - 1}")
            return
        key = f"{self.prefix}.q_perm"
        if key in self.tensors:
            perm = self.tensors[key]
            if not isinstance(perm, torch.Tensor):
                self.add("EXL2-P002", "q_perm", f"is a {type(perm).__name__}, not a tensor")
            elif perm.dtype != torch.int32 or perm.dim() != 1 or perm.numel() != k:
                self.add("EXL2-P002", "q_perm", f"is {_dtype(perm.dtype)} {list(perm.shape)}, "
                                                f"expected int32 [{k}]")
            elif k and not torch.equal(perm.to(torch.int64)[p], torch.arange(k)):
                self.add("EXL2-P002", "q_perm", "is not the inverse of q_invperm")

    def scale_maxima(self, smax: torch.Tensor) -> None:
        s = smax.to(torch.float32)
        bad = ~torch.isfinite(s) | (s < 0)  # 0 is legal: exllamav2 writes it for an all-zero group
        if bad.any():
            i = int(bad.nonzero()[0])
            self.add("EXL2-S001", "q_scale_max", f"{int(bad.sum())} group(s) not finite and non-negative (group {i}: {float(s[i])})")
        sub = torch.isfinite(s) & (s > 0) & (s / 256 < 2.0**-14)
        if sub.any():
            self.add("EXL2-S002", "q_scale_max", f"{int(sub.sum())} group(s) decode through a float16 subnormal "
                                                 f"maximum (q_scale_max < 2^-6)")

    def bias(self, cols: int | None) -> int | None:
        """Checks the bias (spec 3.3; its length against q_weight's columns when those are known);
        returns the true out_features when known."""
        key = f"{self.prefix}.bias"
        n = self.out_features
        if key in self.tensors:
            b = self.tensors[key]
            if not isinstance(b, torch.Tensor):
                self.add("EXL2-T005", "bias", f"is a {type(b).__name__}, not a tensor")
                return None
            if cols is None:
                if b.dtype != torch.float16 or b.dim() != 1:
                    self.add("EXL2-T005", "bias", f"is {_dtype(b.dtype)} {list(b.shape)}, expected float16 [out_features]")
                return None
            if b.dtype != torch.float16 or b.dim() != 1 or not (cols - COLUMN_PAD < b.numel() <= cols):
                self.add("EXL2-T005", "bias", f"is {_dtype(b.dtype)} {list(b.shape)}, expected "
                                              f"float16 [out_features] with out_features padding to {cols}")
            elif n is None:
                n = b.numel()
        if n is None or cols is None or not (cols - COLUMN_PAD < n <= cols):
            return None
        return n

    def padding(self, qw: torch.Tensor, qs: torch.Tensor, groups, n: int) -> None:
        if n == qw.shape[1]:
            return
        nibbles = unpack_scales(qs)[:, n:]
        if (nibbles != 0xF).any():
            self.add("EXL2-S004", "q_scale", f"padded columns {n}..{qw.shape[1] - 1} have scale nibbles other than 0xF")
        for i, (bits, qrow, qrows, _) in enumerate(groups):
            codes = unpack_codes(qw[qrow:qrow + qrows, n:], bits)
            if (codes != zero_point(bits)).any():
                self.add("EXL2-S003", "q_weight", f"padded columns {n}..{qw.shape[1] - 1} of group {i} hold codes "
                                                  f"other than the zero point {zero_point(bits)}")
                return

    def bits_per_weight(self, t: dict[str, torch.Tensor], n: int) -> None:
        """Stored bits per weight of the layer against ``bits_target`` (spec 7.5)."""
        bits = 8 * sum(x.numel() * x.element_size() for x in t.values())
        bias = self.tensors.get(f"{self.prefix}.bias")
        if isinstance(bias, torch.Tensor):
            bits += 8 * bias.numel() * bias.element_size()
        bpw = bits / (t["q_invperm"].numel() * n)
        if abs(bpw - self.bits_target) > BPW_TOLERANCE:
            self.add("EXL2-K005", "q_weight", f"stores {bpw:.3f} bits per weight, target {self.bits_target} "
                                              f"(tolerance {BPW_TOLERANCE})")


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


__all__ = ["BPW_TOLERANCE", "check_layer", "check_qmatrix", "errors_of"]
