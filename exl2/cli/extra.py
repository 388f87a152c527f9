"""Registers the verbs whose modules live beside this one. Each module adds its commands to
``exl2.cli.app`` when imported."""

from __future__ import annotations

from . import conformance as _conformance  # noqa: F401  exl2 conformance export|run
from . import eval as _eval  # noqa: F401  exl2 eval
from . import fit as _fit  # noqa: F401  exl2 fit
from . import generate as _generate  # noqa: F401  exl2 generate
from . import quantize as _quantize  # noqa: F401  exl2 quantize
from . import validate as _validate  # noqa: F401  exl2 validate
