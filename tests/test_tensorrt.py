"""TensorRT and the GPU execution providers: everything that runs without a GPU.

The builder is exercised against a fake `tensorrt` module that records what the code asks of
TensorRT's API; the engine cache key, the calibrator's batch feeding and the backend's errors
are tested directly. Building and running a real engine needs TensorRT and a GPU: that test
skips here with the reason.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from facelink.config import shared_dir
from facelink.export import tensorrt as builder
from facelink.export.deploy.samples import Samples
from facelink.runtime.backends import BackendUnavailableError, create_backend
from facelink.runtime.backends.cuda import DeviceInfo
from facelink.runtime.backends.onnxruntime_backend import CPU, TENSORRT, parse_provider, session_providers
from facelink.runtime.backends.tensorrt_backend import EngineKey, read_meta, write_meta

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None
KEY = EngineKey("Orin", "8.7", "10.3.0", "a" * 64, {"precision": "fp16"})


# -- engine cache key -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change",
    [
        {"gpu_name": "Xavier"},
        {"compute_capability": "7.2"},
        {"tensorrt_version": "10.4.0"},
        {"model_sha256": "b" * 64},
        {"settings": {"precision": "int8"}},
    ],
)
def test_engine_key_changes_with_each_field(change: dict) -> None:
    assert replace(KEY, **change).digest != KEY.digest
    assert replace(KEY).digest == KEY.digest


def test_an_engine_for_another_gpu_or_tensorrt_is_refused_with_the_reason() -> None:
    assert KEY.platform_mismatch(DeviceInfo("Orin", "8.7"), "10.3.0") is None
    problem = KEY.platform_mismatch(DeviceInfo("Orin", "8.7"), "10.4.0")
    assert "TensorRT 10.3.0" in problem and "TensorRT 10.4.0" in problem
    assert "Xavier" in KEY.platform_mismatch(DeviceInfo("Xavier", "7.2"), "10.3.0")


def test_engine_meta_round_trip(tmp_path: Path) -> None:
    engine = tmp_path / "m.engine"
    assert read_meta(engine) is None
    write_meta(engine, KEY)
    assert read_meta(engine) == KEY


# -- calibration feeding ------------------------------------------------------------------------------
def _samples(n: int = 10) -> Samples:
    x = np.arange(n * 3 * 4 * 4, dtype=np.float64).reshape(n, 3, 4, 4)
    return Samples({"input": x}, "test", real=True)


def test_calibration_batches_are_full_contiguous_float32_in_order() -> None:
    batches = builder.CalibrationBatches(_samples(10), batch=4)
    got = list(batches)
    assert batches.count == 2 and len(got) == 2  # the last 2 inputs do not fill a batch
    for index, chunk in enumerate(got):
        array = chunk["input"]
        assert array.shape == (4, 3, 4, 4) and array.dtype == np.float32 and array.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(array, _samples(10).tensors["input"][index * 4 : index * 4 + 4])
    assert batches.shapes() == {"input": (4, 3, 4, 4)}
    with pytest.raises(ValueError, match="at least 4"):
        builder.CalibrationBatches(_samples(3), batch=4)


class FakeCuda:
    """Records host-to-device copies instead of making them."""

    def __init__(self) -> None:
        self.copies: list[tuple[int, np.ndarray]] = []
        self._next = 0x1000

    def malloc(self, nbytes: int) -> int:
        self._next += 0x10000
        return self._next

    def free(self, pointer: int) -> None:
        pass

    def stream(self) -> str:
        return "stream"

    def to_device(self, pointer: int, array: np.ndarray, stream: object) -> None:
        self.copies.append((pointer, array.copy()))

    def synchronize(self, stream: object) -> None:
        pass


class FakeCalibratorBase:
    def __init__(self) -> None:
        self.base_initialised = True


def test_entropy_calibrator_feeds_device_pointers_then_none(tmp_path: Path) -> None:
    trt = SimpleNamespace(IInt8EntropyCalibrator2=FakeCalibratorBase)
    cuda = FakeCuda()
    cache = tmp_path / "calibration.cache"
    calibrator = builder.make_entropy_calibrator(trt, builder.CalibrationBatches(_samples(8), 4), cuda, cache)
    assert calibrator.base_initialised and calibrator.get_batch_size() == 4
    first, second = calibrator.get_batch(["input"]), calibrator.get_batch(["input"])
    assert first == second and len(first) == 1  # one device buffer, reused
    assert calibrator.get_batch(["input"]) is None
    assert [c[1].shape for c in cuda.copies] == [(4, 3, 4, 4)] * 2
    np.testing.assert_array_equal(cuda.copies[1][1], _samples(8).tensors["input"][4:8])
    assert calibrator.read_calibration_cache() is None
    calibrator.write_calibration_cache(b"table")
    assert calibrator.read_calibration_cache() == b"table"


# -- builder configuration against a fake tensorrt ---------------------------------------------------
class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:
        self.shapes[name] = (low, opt, high)


class FakeConfig:
    def __init__(self) -> None:
        self.flags: list[str] = []
        self.int8_calibrator = None
        self.profiles: list[FakeProfile] = []
        self.calibration_profile = None
        self.pool = None
        self.timing_cache = None

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.pool = (pool, size)

    def set_flag(self, flag: str) -> None:
        self.flags.append(flag)

    def add_optimization_profile(self, profile: FakeProfile) -> None:
        self.profiles.append(profile)

    def set_calibration_profile(self, profile: FakeProfile) -> None:
        self.calibration_profile = profile

    def create_timing_cache(self, data: bytes) -> tuple:
        return ("cache", data)

    def set_timing_cache(self, cache: tuple, ignore_mismatch: bool) -> None:
        self.timing_cache = (cache, ignore_mismatch)


class FakeBuilder:
    def create_builder_config(self) -> FakeConfig:
        return FakeConfig()

    def create_optimization_profile(self) -> FakeProfile:
        return FakeProfile()


def fake_trt(version: str) -> SimpleNamespace:
    return SimpleNamespace(
        __version__=version,
        BuilderFlag=SimpleNamespace(FP16="FP16", INT8="INT8"),
        MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
        NetworkDefinitionCreationFlag=SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1),
    )


SHAPES = {"input": ((1, 3, 112, 112), (8, 3, 112, 112), (16, 3, 112, 112))}


@pytest.mark.parametrize("precision, flags", [("fp32", []), ("fp16", ["FP16"]), ("int8", ["FP16", "INT8"])])
def test_weakly_typed_builder_flags(precision: str, flags: list[str]) -> None:
    calibrator = object() if precision == "int8" else None
    config = builder.configure(
        fake_trt("10.3.0"),
        FakeBuilder(),
        precision,
        SHAPES,
        calibrator=calibrator,
        calibration_shapes={"input": (8, 3, 112, 112)} if calibrator else None,
        timing_cache=b"old",
    )
    assert config.flags == flags
    assert config.int8_calibrator is calibrator
    assert config.profiles[0].shapes == SHAPES
    assert config.timing_cache == (("cache", b"old"), False)
    assert config.pool == ("WORKSPACE", builder.WORKSPACE_BYTES)
    if calibrator:
        assert config.calibration_profile.shapes == {"input": ((8, 3, 112, 112),) * 3}


def test_int8_without_a_calibrator_is_an_error_before_tensorrt_11() -> None:
    with pytest.raises(ValueError, match="calibrator"):
        builder.configure(fake_trt("10.3.0"), FakeBuilder(), "int8", SHAPES)


def test_tensorrt_11_is_strongly_typed_no_precision_flags() -> None:
    trt = fake_trt("11.4.0")
    config = builder.configure(trt, FakeBuilder(), "int8", SHAPES)  # precision comes from the QDQ ONNX
    assert config.flags == [] and config.int8_calibrator is None
    assert builder.strongly_typed(trt) and builder.network_flags(trt) == 1 << 1
    assert builder.network_flags(fake_trt("10.3.0")) == 0
    assert builder.network_flags(fake_trt("8.6.2")) == 1 << 0  # EXPLICIT_BATCH before TensorRT 10


def test_timing_cache_is_per_gpu_and_tensorrt_version() -> None:
    a = builder.timing_cache_path(DeviceInfo("NVIDIA Orin", "8.7"), "10.3.0")
    assert a != builder.timing_cache_path(DeviceInfo("NVIDIA Orin", "8.7"), "10.4.0")
    assert a != builder.timing_cache_path(DeviceInfo("NVIDIA A10", "8.6"), "10.3.0")
    assert " " not in a.name


# -- backend selection --------------------------------------------------------------------------------
@pytest.mark.skipif(
    HAVE_TENSORRT, reason="TensorRT is installed here: the missing-TensorRT error cannot be shown"
)
def test_an_engine_without_tensorrt_is_a_clear_error(tmp_path: Path) -> None:
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"plan")
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed: "):
        create_backend(engine)
    with pytest.raises(ValueError, match="expected an .onnx file or a TensorRT engine"):
        create_backend(tmp_path / "model.tflite")


def test_provider_options_parse_and_tensorrt_defaults_fill_in() -> None:
    assert parse_provider(CPU) == (CPU, {})
    assert parse_provider(f"{TENSORRT}:trt_fp16_enable=1, trt_engine_cache_path=/x") == (
        TENSORRT,
        {"trt_fp16_enable": "1", "trt_engine_cache_path": "/x"},
    )
    with pytest.raises(ValueError, match="key=value"):
        parse_provider(f"{TENSORRT}:trt_fp16_enable")
    ((name, options), _) = session_providers((f"{TENSORRT}:trt_engine_cache_path=/x", CPU), [TENSORRT, CPU])
    assert name == TENSORRT and options["trt_engine_cache_path"] == "/x"  # the user's value wins
    assert options["trt_engine_cache_enable"] == "1" and options["trt_timing_cache_enable"] == "1"


def test_a_provider_missing_from_the_build_is_a_clear_error() -> None:
    with pytest.raises(
        BackendUnavailableError, match="not in the installed onnxruntime build.*onnxruntime-gpu"
    ):
        session_providers(("CUDAExecutionProvider", CPU), [CPU])


# -- on a GPU only --------------------------------------------------------------------------------------
@pytest.mark.skipif(
    not HAVE_TENSORRT,
    reason="needs TensorRT and an NVIDIA GPU (not installable on this machine): "
    "the engine build and TensorRTBackend run only on GPU hosts and Jetsons",
)
def test_engine_build_runs_and_matches_onnx(tmp_path: Path) -> None:
    from facelink.export.deploy.pipeline import ExportOptions, export_engine
    from facelink.export.deploy.source import resolve_source

    exported = export_engine(
        resolve_source("mobilefacenet"), ExportOptions(precision="fp16", parity_count=8), tmp_path
    )
    (row,) = exported.parity
    assert row.min_cosine > 0.999


# -- EdgeFace (512-d) plan, on CPU: the ONNX TensorRT would parse and the profile it would build --------
@pytest.mark.skipif(
    not (shared_dir() / "models" / "edgeface" / "edgeface_xs_fp32.onnx").is_file(),
    reason=f"EdgeFace not present under {shared_dir()}/models/edgeface",
)
@pytest.mark.parametrize("trt_version, precision", [("10.3.0", "fp16"), ("11.4.0", "fp16")])
def test_edgeface_engine_plan_has_a_batch_profile_and_a_512d_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trt_version: str, precision: str
) -> None:
    """What export_engine does before TensorRT itself: the ONNX it parses (fp32 with builder flags
    before TensorRT 11, the fp16 export on 11), its optimisation profile, and the builder config."""
    import onnx

    from facelink.export.deploy import graph
    from facelink.export.deploy.pipeline import ExportOptions, engine_shapes, export_onnx
    from facelink.export.deploy.source import resolve_source

    monkeypatch.setenv("FACELINK_CACHE", str(tmp_path / "cache"))
    trt = fake_trt(trt_version)
    options = ExportOptions(precision=precision, batch="dynamic", parity_count=2, max_batch=64)
    onnx_options = options if builder.strongly_typed(trt) else replace(options, precision="fp32")
    model = onnx.load(export_onnx(resolve_source("edgeface-xs"), onnx_options, tmp_path).path)
    shapes = engine_shapes(model, options.max_batch)
    assert shapes == {"input": ((1, 3, 112, 112), (8, 3, 112, 112), (64, 3, 112, 112))}
    assert [(o.name, o.shape[1:]) for o in graph.outputs(model)] == [("embedding", (512,))]
    config = builder.configure(trt, FakeBuilder(), precision, shapes)
    assert config.flags == ([] if builder.strongly_typed(trt) else ["FP16"])
    assert config.profiles[0].shapes == shapes
