"""Inference backends: one small interface, so a model class never cares what runs it.

ONNX Runtime runs everywhere (CPU, and CUDA / TensorRT execution providers where the
onnxruntime-gpu build is installed). A native TensorRT backend implements the same
interface where TensorRT is present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from facelink.config import BackendConfig


class Backend(Protocol):
    """Runs one model: named float inputs in, outputs in the model's order out."""

    input_names: list[str]
    output_names: list[str]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class OnnxRuntimeBackend:
    def __init__(self, path: str | Path, config: BackendConfig = BackendConfig()) -> None:
        import onnxruntime as ort  # imported here so that manifests and alignment load without it

        options = ort.SessionOptions()
        options.intra_op_num_threads = config.intra_op_threads
        # One inference at a time per session: parallelism across faces comes from the caller,
        # and inter-op threads only add contention on a 2-core board.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = set(ort.get_available_providers())
        missing = [p for p in config.providers if p not in available]
        if missing:
            raise RuntimeError(
                f"ONNX Runtime execution provider(s) {', '.join(missing)} are not available in this build "
                f"(available: {', '.join(sorted(available))})"
            )
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=list(config.providers))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, inputs)


def create_backend(path: str | Path, config: BackendConfig = BackendConfig()) -> Backend:
    """The backend for a model file, chosen by its extension."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return OnnxRuntimeBackend(path, config)
    raise ValueError(f"no backend for {path}: expected an .onnx file")
