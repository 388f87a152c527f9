"""``exl2 quantize``: to be filled in by its owner. Registers its verbs on ``exl2.cli.app``."""

from __future__ import annotations
