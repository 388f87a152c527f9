"""``import exl2.hf`` registers the ``"exl2"`` quantization method with transformers, so that
``AutoModelForCausalLM.from_pretrained(folder)`` and ``AutoModel.from_pretrained(folder)`` read EXL2
folders (:mod:`exl2.runtime.hf`)."""

from .runtime.hf import Exl2Config, Exl2Quantizer, register

register()

__all__ = ["Exl2Config", "Exl2Quantizer", "register"]
