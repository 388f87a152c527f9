"""Running EXL2 models: a whole model built from its folder, on the CPU or a GPU.

- :func:`exl2.runtime.load.load` (also ``exl2.load``): the transformers model that config.json
  names, with an :class:`exl2.nn.Exl2Linear` in place of every quantized linear;
- :mod:`exl2.runtime.hf`: the ``"exl2"`` quantization method registered with transformers, so that
  ``from_pretrained`` reads EXL2 folders (``import exl2.hf``);
- :mod:`exl2.runtime.evaluate`: perplexity, and KL divergence against the float source;
- :mod:`exl2.runtime.generate`: streamed generation;
- :mod:`exl2.runtime.check`: the forward pass of ``exl2 validate --run``.

transformers is needed here (the ``models`` extra), and imported only when one of these runs.
"""
