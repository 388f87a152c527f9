"""Launch parameters of the fast path, in one place: the crossovers between the three matmul
paths, the GEMV's configuration for each size of x, and the tiles of the other kernels.

Pure constants (no torch, no triton), so that ``exl2/fast/aot_check.py`` compiles exactly the
configurations that :mod:`exl2.fast.ops` launches, and ``benchmarks/gpu_bench.py --sweep`` can
try others. How each value was chosen, and what is still a guess until measured on a GPU, is in
docs/performance.md.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Up to this many rows of x, ``matmul`` uses the split-K GEMV (CUDA cores, every q_weight word
#: read once); above it, the fused tensor-core kernel.
GEMV_MAX_M = 4

#: Above this many rows of x, ``matmul`` dequantizes once and calls ``torch.matmul``; decoding
#: is memory bound, the fused kernel wins while x is small. A guess until measured.
MATMUL_CROSSOVER_M = 32


@dataclass(frozen=True)
class GemvConfig:
    """How the GEMV kernel is launched for one power-of-two bound ``M_MAX`` on the rows of x.

    ``block_n`` columns per program over ``warps`` warps: each thread holds
    ``block_n / (32 * warps)`` columns, over which the per-row work (loading x, the act-order
    index, the running sum of x) is shared. ``programs_per_sm``: K is split until about this
    many programs per multiprocessor are in flight. ``permute_x``: gather x into stored-row
    order with one extra launch first, so the kernel reads x at consecutive addresses instead
    of through ``q_perm``."""

    block_n: int
    warps: int
    programs_per_sm: int = 4
    permute_x: bool = False

    @property
    def columns_per_thread(self) -> int:
        return self.block_n // (32 * self.warps)


#: The GEMV's configuration by ``M_MAX`` (the next power of two >= M). Chosen from the compiled
#: sm_90 code (``python exl2/fast/aot_check.py --sass``, table in docs/performance.md): the
#: fewest instructions per weight without spilling registers. Sixteen columns per thread at
#: M = 1 and 2, eight at M = 4 (registers in docs/results/compiled.json). A GPU run of
#: ``benchmarks/gpu_bench.py --sweep`` times these against the alternatives.
GEMV_CONFIGS: dict[int, GemvConfig] = {
    1: GemvConfig(block_n=1024, warps=2),
    2: GemvConfig(block_n=1024, warps=2),
    4: GemvConfig(block_n=512, warps=2),
}

#: Columns per program of the dequantize kernel (a program decodes one tile of 32 stored rows)
#: and its warps: 8 columns per thread, so each decoded row leaves as one 128-bit store per thread.
DEQUANT_BLOCK_N, DEQUANT_WARPS = 1024, 4

#: Tile of the fused matmul kernel: rows of x and output columns per program. Its K step is one
#: tile of the tile table (32 stored rows; 2-bit tiles of 16 fill half of it).
FUSED_BLOCK_M, FUSED_BLOCK_N = 16, 64
FUSED_BLOCK_K = 32

#: Columns per program of the encode and pack kernels (quantize).
ENCODE_BLOCK_N = 64

#: GPTQ groups up to this many rows run as one kernel per group (rows held in registers);
#: larger groups run row by row (an encode kernel per row, the feedback in torch).
GPTQ_GROUP_MAX_ROWS = 256
GPTQ_BLOCK_N = 32

#: Instructions per decoded weight (the whole tile loop, counted in the compiled sm_90 code) the
#: GEMV may spend at M = 1 and 4 bits: an H200 issues at most ~3.3e13 thread-instructions/s
#: (132 SMs x 4 schedulers x 32 lanes x 1.98 GHz) and delivers ~9.6e12 4-bit weights/s
#: (4.8 TB/s): 3.5 per weight keeps up with memory at full issue, 5.0 with the 70 % of peak
#: bandwidth that issue 4 asks for. Checked by tests/test_fast.py (a static bound, not a timing).
GEMV_INSTRUCTIONS_PER_WEIGHT_BUDGET = 5.0

#: The same for dequantize at 4 bits: it moves ~2.5 bytes per weight (2 written, ~0.5 read), so
#: 4.8 TB/s is ~1.9e12 weights/s and full issue allows ~17 instructions per weight; 12 keeps it
#: memory bound at 70 % of full issue. The tile-table design spends about 5.4
#: (docs/results/compiled.json; the per-element decode it replaced spent ~26).
DEQUANT_INSTRUCTIONS_PER_WEIGHT_BUDGET = 12.0
