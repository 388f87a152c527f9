"""How much memory ``exl2 quantize`` needs, printed before the long work starts.

The converter holds one block at a time, so its peak is the largest of three phases, on top of
the process itself (Python, torch and transformers, :data:`BASE_BYTES`):

- **a block**: its weights (4 bytes per parameter in float32; 2 for the linears' weights of a
  float16 or bfloat16 checkpoint read by the streaming source, :mod:`exl2.model.held`, which
  upcasts one linear at a time while it runs, less than the encoder's work), the calibration activations
  (the block's inputs, its outputs and, while measuring, the reference outputs: 3 x rows x
  length x hidden x 4 bytes), one Hessian (``K^2`` x 4 bytes for the widest input ``K``; linears
  reading the same input share one) and the encoder's work on the linear that needs most
  (:func:`encode_bytes`, or the coordinate descent after it, :func:`refine_bytes`); in the
  quantization pass aimed at the float model (:mod:`exl2.model.input_error`, the default) also
  the decoded weights of the linears before the one being encoded, beside their float ones (the
  float model runs through the block until its last group of linears is reached), a second ``[K, K]`` moment and the corrected weight (:func:`input_error_bytes`);
  while measuring with the output probe (:mod:`exl2.model.sensitivity`, the default), on the
  measurement's rows, GPTQ's work, one linear decoded for the probe's forward and the probe's
  carried differences (its rows per block seen, :func:`exl2.model.sensitivity.carried_bytes`);
- **outside the blocks**: the embeddings and final norm in float32 while the model runs up to the
  first block, or from the last block to the head;
- **the head**: its weight as stored in the checkpoint (the encoder makes its own float32 copy),
  its Hessian and the encoder's work on it.

On ``--device cuda`` the same three phases are in VRAM instead; the CPU then holds the process
and one tensor being read at a time. With the activations held off the device
(:mod:`exl2.model.offload`) each phase counts one calibration batch of them instead of all; in
CPU memory beside a GPU run they are ``host`` bytes there.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Resident size of the ``exl2 quantize`` process itself, with torch and transformers imported
#: (measured: a conversion of a two-block model of 0.15 M weights per block peaks at 0.56 GB on
#: Linux x86-64 with the CPU build of torch, ``benchmarks/streaming.py``).
BASE_BYTES = 560 << 20


#: The most rows of one group among the options (``exl2.model.options``: groups of 32, 64, 128).
GROUP_ROWS = 128


def encode_bytes(k: int, n: int, centered: bool = False) -> int:
    """Working memory of GPTQ on a ``[k, n]`` linear (``exl2.reference.quantize``), beyond the
    weight and the Hessian it is given: the float32 working copy of the weight, transposed and
    permuted (4 bytes per weight), the codes (1), the error fed forward to the rows after a
    group (up to 4: ``[rows after it, n]`` float32), and one ``[k, k]`` float32 buffer in which the
    inverse-Hessian factor is computed in place (4 bytes per entry); and one group's temporaries
    (its rows copied, their int64 codes and errors, the scale search's chunk: 32 bytes per weight
    of a group of up to :data:`GROUP_ROWS` rows), which count for a wide layer such as a head.
    ``centered`` (a layer with a bias, :mod:`exl2.model.centering`): the covariance, one more
    ``[k, k]`` float32."""
    return 9 * k * n + 32 * GROUP_ROWS * n + (8 if centered else 4) * k * k


#: Rows of a block of the coordinate descent (:data:`exl2.model.refine.BLOCK`).
REFINE_BLOCK = 128


def refine_bytes(k: int, n: int) -> int:
    """Working memory of :func:`exl2.model.refine.refine` on a ``[k, n]`` linear: the weight and
    the error ``D`` permuted and ``H D`` (3 x 4 bytes per weight), the codes (1), the groups'
    unpacked codes (about 1 more), the permuted, damped Hessian (4 bytes per entry), and a block's
    temporaries, ``[128, n]`` float32 each: its ``D`` as it was, its change and a row's rank-1
    update (12 x 128 x n bytes, which count for a layer as wide as a head). The weight, ``D`` and
    the Hessian are released before the codes are packed."""
    return 14 * k * n + 4 * k * k + 12 * REFINE_BLOCK * n


def input_error_bytes(k: int, n: int, centered: bool = False, shared: bool = True) -> int:
    """Held beside the encoder's work, beyond the Hessian: the cross moment ``E[x x_q^T]`` (4
    bytes per entry of ``k^2``) while another linear reading the same input (``shared``) still
    needs it (the last one releases it before its encoder runs), the centred ``C`` for a layer
    with a bias (4 more) and the corrected weight ``W*`` (4 bytes per weight,
    :func:`exl2.model.input_error.target`; the ridge system it solves is factored in place before
    the encoder starts, so it is not counted on top of the encoder's work, which is larger: while
    it is factored, the cross moment of a shared input is still held, 4 k^2 + 8 k n bytes with the
    system's right-hand side and solution, less than ``encode_bytes``' 4 k^2 + 9 k n)."""
    return ((4 if shared else 0) + (4 if centered else 0)) * k * k + 4 * k * n


@dataclass(frozen=True)
class Estimate:
    block: int
    outside: int
    head: int
    device: str
    #: Held for the whole run: the model in float32 when it is loaded whole (not streaming).
    resident: int = 0
    #: Held in CPU memory beside a GPU run: its activations, with ``--activations cpu``.
    host: int = 0

    @property
    def peak(self) -> int:
        return max(self.block, self.outside, self.head)

    @property
    def cpu(self) -> int:
        return BASE_BYTES + (self.resident + self.peak if self.device == "cpu" else self.host)

    @property
    def gpu(self) -> int:
        return 0 if self.device == "cpu" else self.resident + self.peak

    def line(self) -> str:
        gb = 1e9
        where = "RAM" if self.device == "cpu" else f"{self.device} memory (RAM: about {self.cpu / gb:.1f} GB)"
        phase = max(("a block", self.block), ("outside the blocks", self.outside), ("the head", self.head),
                    key=lambda x: x[1])[0]
        whole = f", the whole model {self.resident / gb:.2f} GB" if self.resident else ""
        return (f"memory: about {(self.cpu if self.device == 'cpu' else self.gpu) / gb:.1f} GB of {where} at the "
                f"peak ({phase}{whole}); per block {self.block / gb:.2f} GB, outside the blocks {self.outside / gb:.2f} GB, "
                f"head {self.head / gb:.2f} GB")


def estimate(block_bytes: int, layer_shapes: list[tuple[int, int]], hidden: int, tokens: int,
             outside_params: int, head_shape: tuple[int, int] | None, device: str = "cpu",
             resident: int = 0, biased: list[bool] | None = None, head_bytes: int = 4, refine: bool = True,
             input_error: bool = True, probe_bytes: int = 0, shared: list[bool] | None = None,
             measure_tokens: int | None = None, offloaded: int | None = None, host: int = 0,
             before: list[int] | None = None) -> Estimate:
    """The phases' bytes for a model whose largest block holds ``block_bytes`` of weights and
    linears ``layer_shapes`` (``(in_features, out_features)``; ``biased``, aligned with them:
    which have a bias), ``tokens`` = rows x length; ``head_bytes``: bytes per weight of the head
    as stored; ``refine`` and ``input_error``: whether the coordinate descent and the aim at the
    float model are on (``exl2 quantize``'s defaults); ``shared``, aligned with
    ``layer_shapes``: whether a linear may share its input with another linear of its block
    (default: all may); ``probe_bytes``: the hidden states the
    measurement carries for :mod:`exl2.model.sensitivity` (0: no probe), beside the measuring of
    a block on ``measure_tokens`` tokens (default ``tokens``) and one linear decoded for the
    probe's forward (float16 and float32: 6 bytes a weight); ``offloaded``: the tokens of one
    calibration batch when the activations are held off the device (:mod:`exl2.model.offload`),
    which then holds one batch of each at a time; ``host``: bytes a GPU run holds in CPU memory
    beside the process (its activations, when offloaded there); ``before``, aligned with
    ``layer_shapes``: with ``input_error``, the bytes (as held) of the linears before each in its
    block, whose decoded weights are held beside their float ones while it is encoded; 0 for the
    last linear of a block, which the float model no longer needs once it is reached (default:
    the whole block's again for every linear)."""
    biased = biased or [False] * len(layer_shapes)
    shared = shared or [True] * len(layer_shapes)
    tokens = offloaded or tokens
    measure_tokens = offloaded or measure_tokens or tokens
    activations = 3 * tokens * hidden * 4
    widest = max(k for k, _ in layer_shapes)
    before = before if before is not None else [block_bytes] * len(layer_shapes)
    work = max(max(encode_bytes(k, n, b), refine_bytes(k, n) if refine else 0)
               + (input_error_bytes(k, n, b, s) + f if input_error else 0)
               for (k, n), b, s, f in zip(layer_shapes, biased, shared, before))
    block = block_bytes + activations + 4 * widest * widest + work
    if probe_bytes:
        measuring = block_bytes + 3 * measure_tokens * hidden * 4 + 4 * widest * widest + probe_bytes + \
            max(encode_bytes(k, n, b) for (k, n), b in zip(layer_shapes, biased)) + 6 * max(k * n for k, n in layer_shapes)
        block = max(block, measuring)
    outside = 4 * outside_params + 2 * tokens * hidden * 4
    head = 0
    if head_shape is not None:
        k, n = head_shape
        head = head_bytes * k * n + 4 * k * k + max(encode_bytes(k, n), refine_bytes(k, n) if refine else 0) \
            + activations
    return Estimate(block, outside, head, "cpu" if device == "cpu" else device, resident, host)
