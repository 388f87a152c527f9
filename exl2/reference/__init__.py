"""The reference codec: the spec made executable, in pure PyTorch.

Slow and readable by design; every function names the spec section it implements. Runs on any
torch device.
"""

from .decode import column_scales, dequantize, dequantize_stored, group_max_scales, matmul
from .encode import decoded_scales, encode_rows, find_scales, gptq_group, pack, quantize
from .packing import pack_codes, pack_scales, unpack_codes, unpack_scales

__all__ = [
    "column_scales", "decoded_scales", "dequantize", "dequantize_stored", "encode_rows", "find_scales",
    "gptq_group", "group_max_scales", "matmul", "pack", "pack_codes", "pack_scales", "quantize", "unpack_codes",
    "unpack_scales",
]
