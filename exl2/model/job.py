"""The job folder that makes ``exl2 quantize`` resumable.

``OUT.partial/`` holds ``job.json`` (the parameters), ``measurement.json`` (grown layer by layer)
and ``layers/KEY.safetensors`` (each quantized layer, written as soon as it is done). Every file
is written atomically, so an interruption at any moment loses at most the layer in progress.
A rerun with the same source and options continues; a different target keeps the measurement
and starts the quantization pass again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..io import atomic_path, open_model, save_tensors
from ..qmatrix import QMatrix


class Job:
    def __init__(self, out: Path, params: dict) -> None:
        self.dir = out.with_name(out.name + ".partial")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.layers = self.dir / "layers"
        old = self._read("job.json")
        if old is not None and {k: old.get(k) for k in ("source", "options", "calibration")} != \
                {k: params.get(k) for k in ("source", "options", "calibration")}:
            shutil.rmtree(self.dir)  # another job: start afresh
            self.dir.mkdir(parents=True)
            old = None
        if old is not None and (old.get("bpw"), old.get("head_bits")) != (params.get("bpw"), params.get("head_bits")):
            shutil.rmtree(self.layers, ignore_errors=True)  # same measurement, other target
        self.layers.mkdir(exist_ok=True)
        self._write("job.json", params)

    def _read(self, name: str):
        p = self.dir / name
        try:
            return json.loads(p.read_text()) if p.is_file() else None
        except ValueError:
            return None

    def _write(self, name: str, data) -> None:
        with atomic_path(self.dir / name) as tmp:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))

    # measurement
    def measurement(self) -> dict:
        return self._read("measurement.json") or {"layers": {}}

    def save_measurement(self, m: dict) -> None:
        self._write("measurement.json", m)

    # quantized layers
    def _layer_path(self, key: str) -> Path:
        return self.layers / f"{key}.safetensors"

    def has_layer(self, key: str) -> bool:
        return self._layer_path(key).is_file()

    def load_layer(self, key: str, out_features: int) -> QMatrix:
        return QMatrix.from_tensors(open_model(self._layer_path(key)), key, out_features=out_features)

    def save_layer(self, key: str, qm: QMatrix) -> None:
        save_tensors(self._layer_path(key), {k: v.cpu() for k, v in qm.to_tensors(key).items()})

    def layer_files(self) -> list[Path]:
        return sorted(self.layers.glob("*.safetensors"))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
