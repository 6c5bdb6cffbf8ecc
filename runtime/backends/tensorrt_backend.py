"""TensorRT: serialized engines run through TensorRT's own runtime (TensorRT 8.6, 10.x, 11.x).

An engine is compiled for one GPU model and one TensorRT version. Engines built by
`facelink export MODEL --format engine` carry a key (`EngineKey`: GPU name, compute capability,
TensorRT version, model sha256 and build settings) in a `<engine>.meta.json` beside them; this
backend refuses an engine whose key names another GPU or TensorRT version, so a stale engine is
never loaded. Inference uses the name-based tensor API (`set_input_shape`, `set_tensor_address`,
`execute_async_v3`) that TensorRT 8.5 introduced and 10/11 kept.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from .base import BackendUnavailableError
from .cuda import CudaRuntime, DeviceBuffer, DeviceInfo

log = logging.getLogger(__name__)

ENGINE_SUFFIXES = (".engine", ".plan")
META_SUFFIX = ".meta.json"
#: libnvinfer sonames to ask for the version when the Python package is absent (newest first).
_LIBNVINFER = ("libnvinfer.so.11", "libnvinfer.so.10", "libnvinfer.so.8")


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt as trt
    except ImportError as error:
        raise BackendUnavailableError(
            f"TensorRT is not installed: the Python package 'tensorrt' cannot be imported ({error}). "
            "On a Jetson it comes with JetPack (apt install python3-libnvinfer; see deploy/jetson/README.md), "
            "on an x86_64 GPU machine `pip install tensorrt`. Without TensorRT, run the .onnx export with "
            "ONNX Runtime instead."
        ) from None
    return trt


def tensorrt_version() -> str | None:
    """TensorRT's version: from its Python package, else from libnvinfer itself, else None."""
    try:
        import tensorrt as trt

        return str(trt.__version__)
    except ImportError:
        pass
    for soname in _LIBNVINFER:
        try:
            return f"lib{ctypes.CDLL(soname).getInferLibVersion()}"
        except (OSError, AttributeError):
            continue
    return None


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; its digest names the cached engine file."""

    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    model_sha256: str
    settings: dict[str, Any] = field(default_factory=dict)  # precision, shapes, calibration digest

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def platform_mismatch(self, device: DeviceInfo, trt_version: str) -> str | None:
        """Why an engine with this key cannot run here, or None if it can."""
        wanted = (self.gpu_name, self.compute_capability, self.tensorrt_version)
        here = (device.name, device.compute_capability, trt_version)
        if wanted == here:
            return None
        return (
            f"it was built for {wanted[0]} (compute capability {wanted[1]}) with TensorRT {wanted[2]}; "
            f"this is {here[0]} (compute capability {here[1]}) with TensorRT {here[2]}"
        )


def meta_path(engine: Path) -> Path:
    return engine.with_name(engine.name + META_SUFFIX)


def write_meta(engine: Path, key: EngineKey) -> None:
    meta_path(engine).write_text(
        json.dumps({**asdict(key), "digest": key.digest}, indent=2, sort_keys=True) + "\n"
    )


def read_meta(engine: Path) -> EngineKey | None:
    path = meta_path(engine)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    data.pop("digest", None)
    return EngineKey(**data)


class TensorRTBackend:
    """Runs one engine. Thread-safe: one execution context, one call at a time."""

    def __init__(self, path: str | Path) -> None:
        trt = import_tensorrt()
        self.path = Path(path)
        self._cuda = CudaRuntime()
        key = read_meta(self.path)
        if key is None:
            log.warning(
                "%s has no %s: cannot check it was built for this GPU and TensorRT version", path, META_SUFFIX
            )
        else:
            problem = key.platform_mismatch(self._cuda.device(), trt.__version__)
            if problem:
                raise BackendUnavailableError(
                    f"refusing the stale engine {path}: {problem}. Build it on this machine: "
                    "facelink export MODEL --format engine"
                )
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._engine = trt.Runtime(self._logger).deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise BackendUnavailableError(
                f"TensorRT could not deserialize {path} (see the TensorRT log above)"
            )
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        self._buffers = {n: DeviceBuffer(self._cuda) for n in names}
        self._stream = self._cuda.stream()
        self._lock = threading.Lock()
        first = self.input_names[0]
        static = tuple(self._engine.get_tensor_shape(first))
        # A static batch (no -1 in dim 0) must be filled exactly; a dynamic one is bounded by the
        # optimisation profile's max shape.
        self._static_batch = static[0] if static[0] > 0 else 0
        self.max_batch = self._static_batch or int(self._engine.get_tensor_profile_shape(first, 0)[2][0])

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        n = len(next(iter(inputs.values())))
        chunks = [
            self._run_chunk({k: v[i : i + self.max_batch] for k, v in inputs.items()})
            for i in range(0, n, self.max_batch)
        ]
        return [np.concatenate([c[j] for c in chunks]) for j in range(len(self.output_names))]

    def _run_chunk(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        n = len(next(iter(inputs.values())))
        if self._static_batch and n < self._static_batch:  # pad a short last chunk, drop it after
            inputs = {
                k: np.concatenate([v, np.zeros((self._static_batch - n, *v.shape[1:]), v.dtype)])
                for k, v in inputs.items()
            }
        with self._lock:
            for name in self.input_names:
                array = np.ascontiguousarray(inputs[name], dtype=self._dtypes[name])
                self._context.set_input_shape(name, array.shape)
                pointer = self._buffers[name].ensure(array.nbytes)
                self._cuda.to_device(pointer, array, self._stream)
                self._context.set_tensor_address(name, pointer)
            outputs = []
            for name in self.output_names:
                array = np.empty(tuple(self._context.get_tensor_shape(name)), dtype=self._dtypes[name])
                self._context.set_tensor_address(name, self._buffers[name].ensure(array.nbytes))
                outputs.append(array)
            if not self._context.execute_async_v3(stream_handle=self._stream):  # as in TensorRT's samples
                raise RuntimeError(f"TensorRT execution of {self.path} failed (see the TensorRT log)")
            for name, array in zip(self.output_names, outputs):
                self._cuda.to_host(array, self._buffers[name].pointer, self._stream)
            self._cuda.synchronize(self._stream)
        return [o[:n] for o in outputs]

    def close(self) -> None:
        for buffer in self._buffers.values():
            buffer.release()

    def __del__(self) -> None:
        if hasattr(self, "_buffers"):
            self.close()
