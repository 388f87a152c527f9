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
from .findings import Finding, finding


def check_layer(tensors: Mapping[str, torch.Tensor], prefix: str, *, file: str | None = None,
                out_features: int | None = None) -> list[Finding]:
    """Every finding for the layer ``prefix`` of ``tensors`` (a mapping from full tensor names).

    ``out_features`` is the layer's true width when known from elsewhere (config.json); the bias
    length is used otherwise. Padded columns are checked only when one of them is known."""
    try:
        return _LayerCheck(tensors, prefix, file, out_features).run()
    except Exception as e:  # pragma: no cover - a bug here must not crash the validator
        return [finding("EXL2-C009", file=file, tensor=prefix, message=f"internal error while checking: {e!r}")]


def check_qmatrix(qm: QMatrix, prefix: str = "layer") -> list[Finding]:
    """Findings for an in-memory QMatrix (errors, warnings and infos)."""
    return check_layer(qm.to_tensors(prefix), prefix, out_features=qm.out_features)


def errors_of(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


class _LayerCheck:
    def __init__(self, tensors: Mapping[str, torch.Tensor], prefix: str, file: str | None, out_features: int | None):
        self.tensors, self.prefix, self.file, self.out_features = tensors, prefix, file, out_features
        self.findings: list[Finding] = []

    def add(self, code: str, name: str, message: str) -> None:
        self.findings.append(finding(code, file=self.file, tensor=f"{self.prefix}.{name}", message=message))

    def run(self) -> list[Finding]:
        t = self.required_tensors()
        if t is None:
            return self.findings
        qw, qs, smax, qg, inv = (t[n] for n in LAYER_TENSORS)
        q_rows, cols = qw.shape
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
        self.permutations(inv)
        self.scale_maxima(smax)
        n_real = self.bias(cols)
        if groups is not None and shapes_ok and cols and cols % COLUMN_PAD == 0 and n_real is not None:
            self.padding(qw, qs, groups, n_real)
        return self.findings

    def required_tensors(self) -> dict[str, torch.Tensor] | None:
        got = {}
        for name, dtype in LAYER_TENSORS.items():
            key = f"{self.prefix}.{name}"
            if key not in self.tensors:
                self.add("EXL2-T001", name, "is missing")
                continue
            t = self.tensors[key]
            rank = 2 if name in ("q_weight", "q_scale") else 1
            if t.dtype != dtype:
                self.add("EXL2-T002", name, f"has dtype {str(t.dtype).removeprefix('torch.')}, "
                                            f"expected {str(dtype).removeprefix('torch.')}")
            elif t.dim() != rank:
                self.add("EXL2-T003", name, f"has shape {list(t.shape)}, expected {rank} dimension(s)")
            else:
                got[name] = t
        return got if len(got) == len(LAYER_TENSORS) else None

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
            if perm.dtype != torch.int32 or perm.dim() != 1 or perm.numel() != k:
                self.add("EXL2-P002", "q_perm", f"is {str(perm.dtype).removeprefix('torch.')} {list(perm.shape)}, "
                                                f"expected int32 [{k}]")
            elif k and not torch.equal(perm.to(torch.int64)[p], torch.arange(k)):
                self.add("EXL2-P002", "q_perm", "is not the inverse of q_invperm")

    def scale_maxima(self, smax: torch.Tensor) -> None:
        s = smax.to(torch.float32)
        bad = ~torch.isfinite(s) | (s <= 0)
        if bad.any():
            i = int(bad.nonzero()[0])
            self.add("EXL2-S001", "q_scale_max", f"{int(bad.sum())} group(s) not finite and positive (group {i}: {float(s[i])})")
        sub = torch.isfinite(s) & (s > 0) & (s / 256 < 2.0**-14)
        if sub.any():
            self.add("EXL2-S002", "q_scale_max", f"{int(sub.sum())} group(s) decode through a float16 subnormal "
                                                 f"maximum (q_scale_max < 2^-6)")

    def bias(self, cols: int) -> int | None:
        """Checks the bias; returns the true out_features when known."""
        key = f"{self.prefix}.bias"
        n = self.out_features
        if key in self.tensors:
            b = self.tensors[key]
            if b.dtype != torch.float16 or b.dim() != 1 or not (cols - COLUMN_PAD < b.numel() <= cols):
                self.add("EXL2-T005", "bias", f"is {str(b.dtype).removeprefix('torch.')} {list(b.shape)}, expected "
                                              f"float16 [out_features] with out_features padding to {cols}")
            elif n is None:
                n = b.numel()
        if n is not None and not (cols - COLUMN_PAD < n <= cols):
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
