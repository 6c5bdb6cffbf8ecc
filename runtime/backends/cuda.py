"""The few CUDA runtime calls facelink needs (device query, memory, copies, a stream).

Through cuda-python (NVIDIA's official bindings, `pip install cuda-python`): unlike pycuda it
needs no compiler on the board, and unlike torch it is small. Every call returns an error code
first; `_ok` turns a failure into an exception naming the call.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from .base import BackendUnavailableError


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: str  # "8.7"


def import_cudart() -> ModuleType:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
        except ImportError as error:
            raise BackendUnavailableError(
                f"cuda-python is not installed: {error}. TensorRT engines need it for device memory: "
                "pip install 'facelink[tensorrt]'"
            ) from None
    return cudart


class CudaRuntime:
    def __init__(self, cudart: ModuleType | None = None) -> None:
        self._rt = cudart or import_cudart()

    def _ok(self, result: Any, call: str) -> Any:
        error, *values = result if isinstance(result, tuple) else (result,)
        if error != self._rt.cudaError_t.cudaSuccess:
            _, text = self._rt.cudaGetErrorString(error)
            raise RuntimeError(f"CUDA {call} failed: {text.decode() if isinstance(text, bytes) else text}")
        return values[0] if len(values) == 1 else values

    def device(self) -> DeviceInfo:
        index = self._ok(self._rt.cudaGetDevice(), "cudaGetDevice")
        props = self._ok(self._rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return DeviceInfo(name.rstrip("\x00").strip(), f"{props.major}.{props.minor}")

    def malloc(self, nbytes: int) -> int:
        return int(self._ok(self._rt.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))

    def free(self, pointer: int) -> None:
        self._ok(self._rt.cudaFree(pointer), "cudaFree")

    def stream(self) -> Any:
        return self._ok(self._rt.cudaStreamCreate(), "cudaStreamCreate")

    def to_device(self, pointer: int, array: np.ndarray, stream: Any) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._ok(
            self._rt.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, kind, stream),
            "cudaMemcpyAsync",
        )

    def to_host(self, array: np.ndarray, pointer: int, stream: Any) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._ok(
            self._rt.cudaMemcpyAsync(array.ctypes.data, pointer, array.nbytes, kind, stream),
            "cudaMemcpyAsync",
        )

    def synchronize(self, stream: Any) -> None:
        self._ok(self._rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


class DeviceBuffer:
    """Device memory that grows to the largest tensor seen, so steady-state runs never allocate."""

    def __init__(self, cuda: CudaRuntime) -> None:
        self._cuda = cuda
        self.pointer = 0
        self.capacity = 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.capacity:
            self.release()
            self.pointer = self._cuda.malloc(nbytes)
            self.capacity = nbytes
        return self.pointer

    def release(self) -> None:
        if self.pointer:
            self._cuda.free(self.pointer)
        self.pointer, self.capacity = 0, 0
