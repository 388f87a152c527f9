"""exl2: the EXL2 weight format of exllamav2, written down and made executable.

Public surface: :class:`QMatrix` (one quantized layer), :class:`GroupTable`, :class:`QParams`,
the reference codec in :mod:`exl2.reference`, the Triton fast path in :mod:`exl2.fast`, the
validator and test vectors in :mod:`exl2.conformance`, file access in :mod:`exl2.io`, and
:func:`exl2.load` (a whole model, :mod:`exl2.runtime`; imported on first use, so that ``import exl2``
stays light: no transformers).
"""

from .errors import ContainerError, Exl2Error, FormatError
from .qmatrix import Group, GroupTable, QMatrix
from .qparams import QParams

__version__ = "0.1.0"

__all__ = ["ContainerError", "Exl2Error", "FormatError", "Group", "GroupTable", "QMatrix", "QParams", "__version__", "load"]


def __getattr__(name: str):
    if name == "load":
        from .runtime.load import load

        return load
    raise AttributeError(f"module 'exl2' has no attribute {name!r}")
