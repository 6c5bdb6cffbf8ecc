"""TensorRT engine builder on TensorRT's Python API (8.6, 10.x, 11.x).

    builder = trt.Builder(logger); network = builder.create_network(flags)
    trt.OnnxParser(network, logger).parse(onnx bytes)
    config = builder.create_builder_config()      # assembled by `configure`
    plan = builder.build_serialized_network(network, config)

Precision follows TensorRT's two eras:

* TensorRT 8.6 / 10.x (JetPack 6): weak typing. fp16 is `BuilderFlag.FP16` on the fp32 ONNX;
  int8 is `BuilderFlag.INT8` (+ FP16 for layers without int8 kernels) with an
  `IInt8EntropyCalibrator2` fed from the same calibration inputs as the ONNX Runtime
  quantisation (deprecated since 10.1, still working through 10.x).
* TensorRT 11: strong typing only (the flags and calibrators are gone). The precision is in the
  ONNX file: the fp16 export (`--half`) or the QDQ int8 export (`tensorrt` recipe, symmetric
  int8 activations) is parsed into a strongly typed network.

The timing cache (kernel measurements, valid for one GPU and TensorRT version) is kept on disk
so that rebuilding with another precision or batch is much faster; engines themselves are cached
by `EngineKey` in `pipeline.export_engine`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from facelink.config import cache_dir
from facelink.runtime.backends.cuda import CudaRuntime, DeviceBuffer, DeviceInfo

from .deploy.samples import Samples
from .quantize import Precision

WORKSPACE_BYTES = 1 << 30  # 1 GiB: enough for these models' tactics, small enough for an 8 GB Orin
Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max)


def major_version(trt: ModuleType) -> int:
    return int(str(trt.__version__).split(".")[0])


def strongly_typed(trt: ModuleType) -> bool:
    """TensorRT 11 builds only strongly typed networks: precision must come from the ONNX file."""
    return major_version(trt) >= 11


def network_flags(trt: ModuleType) -> int:
    flags = trt.NetworkDefinitionCreationFlag
    if major_version(trt) < 10:  # implicit batch was the default before TensorRT 10
        return 1 << int(flags.EXPLICIT_BATCH)
    if strongly_typed(trt):  # accepted and redundant on 11; says what the network is
        return 1 << int(flags.STRONGLY_TYPED)
    return 0


class CalibrationBatches:
    """Calibration inputs in the engine's layout: contiguous (batch, ...) arrays per input, in
    order, each batch full (a remainder smaller than a batch is left out)."""

    def __init__(self, samples: Samples, batch: int, dtypes: dict[str, np.dtype] | None = None) -> None:
        if len(samples) < batch:
            raise ValueError(f"TensorRT calibration needs at least {batch} inputs, got {len(samples)}")
        self.batch = batch
        self._samples = samples
        self._dtypes = dtypes or {}
        self.count = len(samples) // batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for index, chunk in enumerate(self._samples.batches(self.batch)):
            if index == self.count:
                return
            yield {
                k: np.ascontiguousarray(v, dtype=self._dtypes.get(k, np.float32)) for k, v in chunk.items()
            }

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: (self.batch, *v.shape[1:]) for k, v in self._samples.tensors.items()}


def make_entropy_calibrator(
    trt: ModuleType, batches: CalibrationBatches, cuda: CudaRuntime, cache_file: Path
) -> Any:
    """An `IInt8EntropyCalibrator2` that copies each batch to the GPU when TensorRT asks for it.

    The class is made here because its base class lives in the `tensorrt` module, which is only
    imported on a machine that has it (and is a fake in the tests).
    """

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)  # pybind11 requires the explicit base __init__
            self._batches = iter(batches)
            self._buffers: dict[str, DeviceBuffer] = {}
            self._stream = cuda.stream()

        def get_batch_size(self) -> int:
            return batches.batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            chunk = next(self._batches, None)
            if chunk is None:
                return None  # TensorRT's signal that calibration data is exhausted
            pointers = []
            for name in names:
                buffer = self._buffers.setdefault(name, DeviceBuffer(cuda))
                pointers.append(buffer.ensure(chunk[name].nbytes))
                cuda.to_device(buffer.pointer, chunk[name], self._stream)
            cuda.synchronize(self._stream)
            return pointers

        def read_calibration_cache(self) -> bytes | None:
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache: Any) -> None:
            write_atomic(cache_file, bytes(cache))

    return EntropyCalibrator()


def configure(
    trt: ModuleType,
    builder: Any,
    precision: Precision,
    shapes: Shapes,
    *,
    calibrator: Any = None,
    calibration_shapes: dict[str, tuple[int, ...]] | None = None,
    timing_cache: bytes | None = None,
    workspace: int = WORKSPACE_BYTES,
) -> Any:
    """The IBuilderConfig for one build: precision flags (weak typing only), optimisation
    profile, calibrator, workspace limit and the timing cache."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if not strongly_typed(trt):
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            if calibrator is None:
                raise ValueError("int8 with TensorRT < 11 needs a calibrator")
            config.set_flag(trt.BuilderFlag.INT8)
            config.int8_calibrator = calibrator
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    if calibrator is not None and calibration_shapes:
        # Calibration runs at one shape: a profile pinned to the calibration batch.
        calibration = builder.create_optimization_profile()
        for name, shape in calibration_shapes.items():
            calibration.set_shape(name, shape, shape, shape)
        config.set_calibration_profile(calibration)
    cache = config.create_timing_cache(timing_cache or b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return config


def timing_cache_path(device: DeviceInfo, trt_version: str) -> Path:
    safe = "".join(c if c.isalnum() else "-" for c in device.name)
    return cache_dir() / "tensorrt" / f"timing-{safe}-sm{device.compute_capability}-trt{trt_version}.cache"


def build_engine(
    trt: ModuleType,
    onnx_path: Path,
    precision: Precision,
    shapes: Shapes,
    device: DeviceInfo,
    *,
    calibrator: Any = None,
    calibration_shapes: dict[str, tuple[int, ...]] | None = None,
) -> bytes:
    """Parse `onnx_path`, build, and return the serialized engine; the timing cache is updated."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    cache_file = timing_cache_path(device, trt.__version__)
    config = configure(
        trt,
        builder,
        precision,
        shapes,
        calibrator=calibrator,
        calibration_shapes=calibration_shapes,
        timing_cache=cache_file.read_bytes() if cache_file.is_file() else None,
    )
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(
            f"TensorRT could not build an engine from {onnx_path} (see the TensorRT log above)"
        )
    write_atomic(cache_file, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def write_atomic(path: Path, data: bytes) -> None:
    """Another build may read the cache at the same moment: never let it see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
