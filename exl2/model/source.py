"""The source model as the pipeline reads it: one block's weights at a time.

:class:`Source` is what the stages of ``exl2 quantize`` see: the model's modules, its blocks and
head, and three ways in:

- :meth:`Source.block` — a block with its weights on the device, for as long as the ``with``
  lasts: in float32, except that the streaming source keeps its linears' weights in float16 or
  bfloat16 when the checkpoint stores them so, upcast while each runs (:mod:`exl2.model.held`);
- :meth:`Source.outside` — every weight outside the blocks (embeddings, final norm …), for the
  forward passes that start or end the model;
- :meth:`Source.head_weights` and :meth:`Source.plain_tensor` — the head to quantize, and each
  tensor that is copied to the output unquantized (float16, as exllamav2 stores them).

:class:`StreamingSource` builds the model's skeleton with its parameters on the meta device
(buffers such as rotary frequencies are computed for real, as transformers computes them) and
reads each weight from the checkpoint's safetensors files (indexed by :class:`exl2.io.Model`,
read with plain file reads) only
when asked, in its dtype on disk, upcast to float32 one tensor at a time (a block's linear
weights only while each linear runs), released when the ``with`` ends. :class:`EagerSource` loads the whole model with transformers, as ``exl2 quantize``
did before streaming; both give the same values, so the same output bytes (tested).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import ContainerError
from ..io import DTYPES, open_model
from ..meta import params_on_meta
from . import arch, held

#: A weight as the model expects it: float32 (the math of calibration and GPTQ is float32).
WORK_DTYPE = torch.float32
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


class Source:
    """A Hugging Face checkpoint: config, tokenizer, the model's modules, its blocks and head."""

    path: Path
    config: dict
    tokenizer: object
    model: nn.Module
    block_list: nn.ModuleList
    blocks: list[tuple[str, nn.Module]]
    head: tuple[str, nn.Linear] | None
    device: str
    #: Whether weights are read one block at a time (False: the whole model is in memory).
    streaming: bool = True

    @property
    def causal(self) -> bool:
        return self.head is not None

    def block(self, i: int) -> contextlib.AbstractContextManager[nn.Module]:
        raise NotImplementedError

    def outside(self) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head's weight (on the device; float32, or the checkpoint's float dtype, which the
        encoder converts exactly) and bias (float32)."""
        raise NotImplementedError

    def head_weight_bytes(self) -> int:
        """Bytes per weight of the head as :meth:`head_weights` gives it."""
        return 4

    def block_bytes(self, i: int) -> int:
        """Bytes of block ``i``'s parameters while it is loaded."""
        return 4 * sum(p.numel() for p in self.blocks[i][1].parameters())

    def plain_entries(self, skip: set[str]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """Name, output dtype and shape of each state-dict tensor not in ``skip``, in state-dict order."""
        entries = []
        for name, t in self.model.state_dict(keep_vars=True).items():
            if name not in skip:
                entries.append((name, torch.float16 if t.is_floating_point() else t.dtype, tuple(t.shape)))
        return entries

    def plain_tensor(self, name: str) -> torch.Tensor:
        """A tensor copied to the output: floats as float16 (what exllamav2 stores), others as they are."""
        raise NotImplementedError

    def numel(self) -> int:
        """Parameters of the whole model (tied ones once)."""
        return sum(p.numel() for p in self.model.parameters())

    def close(self) -> None:
        pass

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _output(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.to(WORK_DTYPE).to(torch.float16) if t.is_floating_point() else t.contiguous()


class EagerSource(Source):
    """The whole model in float32 on the device, loaded by transformers."""

    streaming = False

    def __init__(self, path: Path, config: dict, device: str) -> None:
        self.path, self.config, self.device = path, config, device
        loader = arch.loader(config)
        with arch.transformers_errors(path):
            self.model = loader.from_pretrained(str(path), dtype=WORK_DTYPE, local_files_only=True)
            self.tokenizer = arch.tokenizer(path)
        self.model.eval().to(device)
        self.block_list, self.blocks = arch.find_blocks(self.model, config, str(path))
        self.head = arch.head(self.model, config)
        self._state: dict[str, torch.Tensor] | None = None

    @contextlib.contextmanager
    def block(self, i: int) -> Iterator[nn.Module]:
        yield self.blocks[i][1]

    @contextlib.contextmanager
    def outside(self) -> Iterator[None]:
        yield

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        module = self.head[1]
        return module.weight.detach().to(WORK_DTYPE), module.bias

    def plain_tensor(self, name: str) -> torch.Tensor:
        if self._state is None:
            self._state = self.model.state_dict()
        return _output(self._state[name])


class StreamingSource(Source):
    """The model's skeleton on the meta device; weights read from the checkpoint when needed."""

    def __init__(self, path: Path, config: dict, device: str) -> None:
        self.path, self.config, self.device = path, config, device
        loader = arch.loader(config)
        with arch.transformers_errors(path):
            import transformers

            hf_config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
            with params_on_meta():
                self.model = loader.from_config(hf_config, dtype=WORK_DTYPE)
            self.tokenizer = arch.tokenizer(path)
        self.model.eval()
        self.checkpoint = open_model(path)
        self.block_list, self.blocks = arch.find_blocks(self.model, config, str(path))
        self.head = arch.head(self.model, config)
        self._slots = {n: _slot(self.model, n) for n, _ in self.model.named_parameters(remove_duplicate=False)}
        self._names = self._checkpoint_names()
        self._load_buffers()
        for prefix in [p for p, _ in self.blocks]:
            if not any(n.startswith(prefix + ".") for n in self._slots):
                raise ContainerError(f"block {prefix} has no parameters", file=str(path))
        self._in_blocks = {n for n in self._slots if any(n.startswith(p + ".") for p, _ in self.blocks)}
        head = {f"{self.head[0]}.weight", f"{self.head[0]}.bias"} if self.head else set()
        self._outside = [n for n in self._slots if n not in self._in_blocks and n not in head]
        for n in self._in_blocks:
            if self._held(n):
                held.upcast_forward(self._slots[n][0])

    # -- names -----------------------------------------------------------------------------

    def _checkpoint_names(self) -> dict[str, str]:
        """The checkpoint tensor behind each parameter; every one must exist with its shape."""
        tied = _tied(self.model)
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        names = {}
        for name, (module, attr) in self._slots.items():
            want = tied.get(name, name)
            found = next((c for c in _candidates(want, prefix) if c in self.checkpoint), None)
            if found is None:
                raise ContainerError(f"has no tensor for the model's parameter {want} (the streaming loader maps "
                                     f"parameters to checkpoint names directly; --loader eager loads through "
                                     f"transformers instead)", file=str(self.path))
            info = self.checkpoint.tensors[found]
            shape = tuple(module._parameters[attr].shape)
            if tuple(info.shape) != shape or info.dtype not in FLOAT_DTYPES:
                raise ContainerError(f"is {info.dtype} {list(info.shape)}; the model expects a float tensor "
                                     f"{list(shape)}", file=str(info.file), tensor=found)
            names[name] = found
        return names

    def _load_buffers(self) -> None:
        """Persistent buffers saved in the checkpoint take the checkpoint's values (as transformers
        loads them); the others keep the values computed at construction. All go to the device."""
        persistent = set(self.model.state_dict(keep_vars=True))
        for name, buf in list(self.model.named_buffers()):
            module, attr = _slot(self.model, name, "_buffers")
            value = buf
            if name in persistent and name in self.checkpoint:
                loaded = self._read(name)
                if tuple(loaded.shape) == tuple(buf.shape):
                    value = loaded.to(buf.dtype)
            module._buffers[attr] = value.to(self.device)

    def _read(self, name: str) -> torch.Tensor:
        """A checkpoint tensor, read with plain file reads (:class:`exl2.io.Model`): a memory map
        would keep every page read resident in this process (its RSS) while the file stays mapped."""
        info = self.checkpoint.tensors[name]
        if info.dtype not in DTYPES:
            raise ContainerError(f"has dtype {info.dtype[:20]}, which this reader does not know", file=str(info.file),
                                 tensor=name)
        # the header passed the strict parser (exl2.header): offsets and sizes are known good
        return self.checkpoint[name]

    # -- materializing ---------------------------------------------------------------------

    def _held(self, name: str) -> bool:
        """Whether parameter ``name`` is kept in its 16-bit dtype on disk when loaded: the weight of
        a linear inside a block (:mod:`exl2.model.held`)."""
        module, attr = self._slots[name]
        return (attr == "weight" and isinstance(module, nn.Linear) and name in self._in_blocks
                and DTYPES.get(self.checkpoint.tensors[self._names[name]].dtype) in held.HELD_DTYPES)

    def _load(self, names: list[str]) -> None:
        for n in names:
            module, attr = self._slots[n]
            t = self._read(self._names[n])
            t = t.to(device=self.device) if self._held(n) else t.to(device=self.device, dtype=WORK_DTYPE)
            module._parameters[attr] = nn.Parameter(t, requires_grad=False)

    def block_bytes(self, i: int) -> int:
        prefix = self.blocks[i][0] + "."
        return sum(torch.Size(self.checkpoint.tensors[self._names[n]].shape).numel() * (2 if self._held(n) else 4)
                   for n in self._slots if n.startswith(prefix))

    def _release(self, names: list[str]) -> None:
        for n in names:
            module, attr = self._slots[n]
            p = module._parameters[attr]
            module._parameters[attr] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                    requires_grad=False)

    @contextlib.contextmanager
    def _loaded(self, names: list[str]) -> Iterator[None]:
        try:
            self._load(names)
            yield
        finally:
            self._release(names)
            _return_free_memory()

    @contextlib.contextmanager
    def block(self, i: int) -> Iterator[nn.Module]:
        prefix = self.blocks[i][0] + "."
        with self._loaded([n for n in self._slots if n.startswith(prefix)]):
            yield self.blocks[i][1]

    def outside(self) -> contextlib.AbstractContextManager[None]:
        return self._loaded(self._outside)

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = self.head[0]
        # in its dtype on disk: the encoder makes its float32 working copy from it
        weight = self._read(self._names[f"{key}.weight"]).to(device=self.device)
        bias = self._read(self._names[f"{key}.bias"]) if f"{key}.bias" in self._names else None
        return weight, None if bias is None else bias.to(device=self.device, dtype=WORK_DTYPE)

    def head_weight_bytes(self) -> int:
        if self.head is None:
            return 4
        info = self.checkpoint.tensors[self._names[f"{self.head[0]}.weight"]]
        return torch.empty((), dtype=DTYPES[info.dtype]).element_size()

    def plain_tensor(self, name: str) -> torch.Tensor:
        if name in self._names:
            return _output(self._read(self._names[name]))
        return _output(self.model.state_dict(keep_vars=True)[name])

    def numel(self) -> int:
        return sum(torch.Size(self.checkpoint.tensors[n].shape).numel() for n in set(self._names.values()))

    def close(self) -> None:
        self.checkpoint.close()


def _return_free_memory() -> None:
    """Hand memory freed by the last block back to the system (glibc keeps freed blocks of a few
    MB in its heap, where the next block's slightly different allocations may not fit, so the
    process would grow block by block)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _slot(model: nn.Module, name: str, kind: str = "_parameters") -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if attr not in getattr(module, kind):
        raise KeyError(name)
    return module, attr


def _tied(model: nn.Module) -> dict[str, str]:
    """Parameters that transformers ties to another (``lm_head.weight`` → the embedding), when the
    config ties them."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    try:
        return dict(expand(all_submodels=True)) if expand else {}
    except Exception:  # transformers' own bookkeeping; without it nothing is tied
        return {}


def _candidates(name: str, prefix: str) -> list[str]:
    """Checkpoint names a parameter may be saved under: as named, with the base model's prefix
    added or removed (a ``BertModel`` read from a ``BertFor…`` checkpoint), and with the legacy
    LayerNorm names ``gamma`` / ``beta``."""
    names = [name]
    if prefix:
        names.append(name[len(prefix) + 1:] if name.startswith(prefix + ".") else f"{prefix}.{name}")
    legacy = {".weight": ".gamma", ".bias": ".beta"}
    for n in list(names):
        for new, old in legacy.items():
            if n.endswith(new):
                names.append(n[: -len(new)] + old)
    return names


def open_source(src: str, device: str = "cpu", streaming: bool = True) -> Source:
    """The checkpoint ``src`` (a folder or ``example:minilm``), streaming or loaded whole."""
    path = arch.resolve(src)
    config = arch.read_config(path)
    return (StreamingSource if streaming else EagerSource)(path, config, device)
