"""Triton Inference Server model repositories, for users who already serve models with Triton.

    repo/<name>/config.pbtxt
    repo/<name>/1/model.onnx        (platform onnxruntime_onnx)
    repo/<name>/1/model.plan        (platform tensorrt_plan: built on the serving GPU)
    repo/<name>/facelink-manifest.json   facelink's preprocessing for the model (Triton ignores it)

Inputs and outputs (names, dtypes, dims) are read from the ONNX graph. With a dynamic batch
dimension, Triton owns batching: `max_batch_size` > 0, dims without the batch, and dynamic
batching merges concurrent requests (preferred sizes, a bounded queue delay). A static-batch
model gets `max_batch_size: 0` and its full dims.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .deploy.graph import TensorSpec

Platform = Literal["onnxruntime_onnx", "tensorrt_plan"]
MODEL_FILES: dict[str, str] = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}
_TYPES = {
    np.dtype(np.float32): "TYPE_FP32",
    np.dtype(np.float16): "TYPE_FP16",
    np.dtype(np.float64): "TYPE_FP64",
    np.dtype(np.int8): "TYPE_INT8",
    np.dtype(np.uint8): "TYPE_UINT8",
    np.dtype(np.int16): "TYPE_INT16",
    np.dtype(np.int32): "TYPE_INT32",
    np.dtype(np.int64): "TYPE_INT64",
    np.dtype(np.bool_): "TYPE_BOOL",
}


@dataclass(frozen=True)
class TritonOptions:
    max_batch_size: int = 32
    queue_delay_us: int = 500  # how long Triton may hold a request to fill a batch
    instance_kind: Literal["KIND_GPU", "KIND_CPU"] = "KIND_GPU"
    instances: int = 1
    version: int = 1


def preferred_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two from 4 up to the maximum: the sizes kernels are tuned for."""
    sizes, size = [], 4
    while size <= max_batch_size:
        sizes.append(size)
        size *= 2
    return sizes or [max_batch_size]


def _tensor(spec: TensorSpec, batched: bool) -> str:
    if spec.dtype not in _TYPES:
        raise ValueError(
            f"tensor {spec.name!r} has dtype {spec.dtype}, which facelink does not map to a Triton type"
        )
    dims = [d if isinstance(d, int) else -1 for d in (spec.shape[1:] if batched else spec.shape)]
    return f'    name: "{spec.name}"\n    data_type: {_TYPES[spec.dtype]}\n    dims: [ {", ".join(map(str, dims))} ]'


def config_text(
    name: str,
    platform: Platform,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    options: TritonOptions = TritonOptions(),
) -> str:
    batched = all(s.dynamic_batch for s in [*inputs, *outputs])
    lines = [
        f'name: "{name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {options.max_batch_size if batched else 0}",
        f"version_policy: {{ specific: {{ versions: [ {options.version} ] }} }}",
    ]
    lines += [f"input [\n  {{\n{_tensor(s, batched)}\n  }}\n]" for s in inputs]
    lines += [f"output [\n  {{\n{_tensor(s, batched)}\n  }}\n]" for s in outputs]
    if batched:
        sizes = ", ".join(map(str, preferred_batch_sizes(options.max_batch_size)))
        lines.append(
            f"dynamic_batching {{\n  preferred_batch_size: [ {sizes} ]\n"
            f"  max_queue_delay_microseconds: {options.queue_delay_us}\n}}"
        )
    lines.append(
        f"instance_group [\n  {{\n    count: {options.instances}\n    kind: {options.instance_kind}\n  }}\n]"
    )
    return "\n".join(lines) + "\n"


def write_model(
    repository: Path,
    name: str,
    platform: Platform,
    model_file: Path,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    manifest: dict[str, Any],
    options: TritonOptions = TritonOptions(),
) -> Path:
    """Write one model into `repository`; returns the model's folder."""
    folder = repository / name
    version = folder / str(options.version)
    version.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, version / MODEL_FILES[platform])
    (folder / "config.pbtxt").write_text(config_text(name, platform, inputs, outputs, options))
    (folder / "facelink-manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder
