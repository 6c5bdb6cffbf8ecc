"""Inference backends: one small interface, so a model class never cares what runs it.

* `OnnxRuntimeBackend` runs `.onnx` files everywhere: on the CPU, and through the CUDA and
  TensorRT execution providers where an onnxruntime-gpu build is installed
  (`BackendConfig.providers`; TensorRT EP options: see `onnxruntime_backend`).
* `TensorRTBackend` runs serialized TensorRT engines (`.engine` / `.plan`) built on the same
  GPU model with the same TensorRT version by `facelink export MODEL --format engine`.

`create_backend` picks one by the file's extension, so a manifest whose `file` is an engine
runs through TensorRT with no other change.
"""

from __future__ import annotations

from pathlib import Path

from facelink.config import BackendConfig

from .base import Backend, BackendUnavailableError
from .onnxruntime_backend import OnnxRuntimeBackend
from .tensorrt_backend import ENGINE_SUFFIXES, TensorRTBackend

__all__ = ["Backend", "BackendUnavailableError", "OnnxRuntimeBackend", "TensorRTBackend", "create_backend"]


def create_backend(path: str | Path, config: BackendConfig = BackendConfig()) -> Backend:
    """The backend for a model file, chosen by its extension."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return OnnxRuntimeBackend(path, config)
    if suffix in ENGINE_SUFFIXES:
        return TensorRTBackend(path)
    raise ValueError(
        f"no backend for {path}: expected an .onnx file or a TensorRT engine ({', '.join(ENGINE_SUFFIXES)})"
    )
