"""Conformance: the validator, test vectors, the harness for other implementations, and the
hypothesis strategies (public API for kernel authors).

- :func:`validate_path` — check a model folder or file; :class:`Report`, :class:`Finding`, :data:`CATALOGUE`.
- :func:`check_layer`, :func:`check_qmatrix` — every per-layer rule, as findings.
- :mod:`exl2.conformance.vectors` — ``export(DIR)``, the language-neutral vectors.
- :mod:`exl2.conformance.harness` — ``run(backend)``, the harness behind ``exl2 conformance run``.
- :mod:`exl2.conformance.strategies` — ``qmatrices()``, ``broken_layers()``, ``matmul_inputs()``.
- :mod:`exl2.conformance.layers` — ``Stream``, ``LayerSpec``, the one-rule mutations: the
  deterministic generator behind the strategies and the vectors (no hypothesis).
- :mod:`exl2.conformance.pytest_plugin` — ``conformance_test(...)`` for your own CI.
"""

from .findings import CATALOGUE, CodeInfo, Finding, errors_of, finding
from .rules import check_layer, check_qmatrix
from .validate import LayerStats, Report, Summary, validate_path

__all__ = ["CATALOGUE", "CodeInfo", "Finding", "LayerStats", "Report", "Summary", "check_layer", "check_qmatrix",
           "errors_of", "finding", "validate_path"]
