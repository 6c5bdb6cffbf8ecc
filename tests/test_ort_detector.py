"""YuNet through ONNX Runtime (runtime/detection/yunet_ort.py), the input size policy, and the
edge's --providers / --detect-size.

The ONNX Runtime detector must be cv2.FaceDetectorYN, decoded in numpy: same faces, boxes and
landmarks within float rounding, on LFW pictures, mosaics of several faces and small faces. Run
on ONNX Runtime's CPU provider here; the CUDA and TensorRT providers only where a GPU build and a
GPU are present (skipped otherwise, with the reason).
"""

from __future__ import annotations

import numpy as np
import pytest

from facelink.config import BackendConfig, DetectorConfig, shared_dir
from facelink.runtime.backends import BackendUnavailableError
from facelink.runtime.backends.onnxruntime_backend import (
    CPU, CUDA, TENSORRT, check_providers, providers_from_names, session_providers,
)
from facelink.runtime.detection.base import detection_input

from .support import SHARED_LFW, SHARED_YUNET, read_rgb

needs_yunet = pytest.mark.skipif(
    not (SHARED_LFW.is_dir() and SHARED_YUNET.is_file()),
    reason=f"needs LFW and YuNet from the shared folder ({shared_dir()}); set FACELINK_SHARED",
)


def _available() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


# -- provider names -----------------------------------------------------------------------------
def test_short_provider_names_map_to_onnxruntime_names_with_tensorrt_options() -> None:
    assert providers_from_names("tensorrt,cuda,cpu") == (f"{TENSORRT}:trt_fp16_enable=1", CUDA, CPU)
    assert providers_from_names(" CPU ") == (CPU,)
    assert providers_from_names("trt, Cuda") == (f"{TENSORRT}:trt_fp16_enable=1", CUDA)
    # The user's option wins over the alias's; options after a provider continue it.
    assert providers_from_names("tensorrt:trt_fp16_enable=0,trt_max_workspace_size=1073741824,cpu") == (
        f"{TENSORRT}:trt_fp16_enable=0,trt_max_workspace_size=1073741824", CPU,
    )
    # Full names go through unchanged (no alias options), with theirs.
    assert providers_from_names(f"{CUDA}:device_id=1,{CPU}") == (f"{CUDA}:device_id=1", CPU)
    # Every TensorRT entry gets the engine and timing caches under the cache folder.
    ((name, options), _) = session_providers(providers_from_names("tensorrt,cpu"), [TENSORRT, CPU])
    assert name == TENSORRT and options["trt_fp16_enable"] == "1"
    assert options["trt_engine_cache_enable"] == "1" and "ort-tensorrt" in options["trt_engine_cache_path"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gpu", "unknown provider 'gpu'"),
        ("", "at least one provider"),
        ("cpu,CPU", "named twice"),
        ("trt_fp16_enable=1,tensorrt", "comes before any provider"),
    ],
)
def test_bad_provider_lists_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        providers_from_names(text)


@pytest.mark.skipif(CUDA in _available(), reason="this onnxruntime has the CUDA provider: nothing is missing")
def test_a_provider_missing_from_onnxruntime_is_named_with_what_to_install() -> None:
    with pytest.raises(BackendUnavailableError) as error:
        check_providers(providers_from_names("tensorrt,cuda,cpu"))
    text = str(error.value)
    assert "TensorrtExecutionProvider, CUDAExecutionProvider are not in the installed onnxruntime build" in text
    assert "onnxruntime-gpu" in text and "deploy/jetson/README.md" in text and "available: " in text
    assert check_providers((CPU,)) == _available()


# -- the edge's flags -----------------------------------------------------------------------------
def test_edge_flags_apply_the_providers_to_every_model_and_the_detect_size() -> None:
    from facelink.cli import build_parser
    from facelink.cli_edge import _edge_config
    from facelink.transport import ClientSecurity

    args = build_parser().parse_args(["edge", "--source", "0", "--providers", "tensorrt,cuda,cpu", "--detect-size", "960"])
    config = _edge_config(args, ClientSecurity(), live=True)
    expected = (f"{TENSORRT}:trt_fp16_enable=1", CUDA, CPU)
    assert config.backend.providers == expected  # learned encoder, query model
    assert config.detector.backend.providers == expected and config.detector.detect_size == 960
    default = _edge_config(build_parser().parse_args(["edge", "--source", "0"]), ClientSecurity(), live=True)
    assert default.backend.providers == (CPU,) and default.detector.backend.providers == (CPU,)
    assert default.detector.detect_size == 640 and default.detector.kind == "auto"


def test_edge_refuses_bad_flags_before_opening_anything(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from facelink.cli import main
    from facelink.edge.run import EXIT_CONFIG

    with pytest.raises(SystemExit) as exit_:  # argparse: an unknown provider name
        main(["edge", "--source", str(tmp_path), "--providers", "gpu"])
    assert exit_.value.code == 2 and "unknown provider 'gpu'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["edge", "--source", str(tmp_path), "--detect-size", "10"])
    assert exit_.value.code == EXIT_CONFIG and "must be 0 (full resolution) or at least 64 px" in capsys.readouterr().err


@pytest.mark.skipif(CUDA in _available(), reason="this onnxruntime has the CUDA provider: nothing is missing")
def test_edge_with_a_missing_provider_exits_with_a_config_error(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from facelink.cli import main
    from facelink.edge.run import EXIT_CONFIG

    assert main(["edge", "--source", str(tmp_path), "--server", "127.0.0.1:1", "--providers", "cuda,cpu"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith("error: ONNX Runtime execution provider(s) CUDAExecutionProvider are not in the installed")
    assert "onnxruntime-gpu" in err


# -- the input size policy ------------------------------------------------------------------------
def test_detection_input_scales_the_longest_side_down_only() -> None:
    frame = np.zeros((2160, 3840, 3), np.uint8)
    small, sx, sy = detection_input(frame, 640)
    assert small.shape == (360, 640, 3) and sx == sy == 6.0
    portrait = np.zeros((1000, 500, 3), np.uint8)
    small, sx, sy = detection_input(portrait, 640)
    assert small.shape == (640, 320, 3) and sx == sy == 500 / 320
    for size in (0, 1000, 4000):  # off, equal, larger: the frame itself
        same, sx, sy = detection_input(portrait, size)
        assert same is portrait and sx == sy == 1.0
    with pytest.raises(ValueError, match="at least 64 px"):
        DetectorConfig(detect_size=32)


# -- equivalence with cv2.FaceDetectorYN ------------------------------------------------------------
def _lfw_pictures(count: int) -> list[np.ndarray]:
    people = sorted(p for p in SHARED_LFW.iterdir() if p.is_dir())
    step = max(1, len(people) // count)
    return [read_rgb(sorted(person.glob("*.jpg"))[0]) for person in people[::step][:count]]


def _scenes() -> list[tuple[str, np.ndarray]]:
    """LFW pictures as they are, mosaics of several faces at several sizes (NMS between many
    candidates), small faces on a large grey frame, and a frame without a face."""
    import cv2

    pictures = _lfw_pictures(48)
    scenes = [(f"lfw-{i}", p) for i, p in enumerate(pictures[:32])]
    for m in range(4):  # 2x3 mosaics, 750x500, an odd size on purpose (padding to 32)
        tiles = pictures[32 + m * 4: 32 + m * 4 + 4] + pictures[m: m + 2]
        rows = [np.concatenate(tiles[r * 3: r * 3 + 3], axis=1) for r in range(2)]
        scenes.append((f"mosaic-{m}", np.ascontiguousarray(np.concatenate(rows, axis=0)[:, :750 - 1])))
    canvas = np.full((720, 1281, 3), 110, np.uint8)
    for i, (x, side) in enumerate([(20, 60), (120, 90), (260, 130), (450, 180), (700, 250), (1000, 40)]):
        canvas[200: 200 + side, x: x + side] = cv2.resize(pictures[i], (side, side), interpolation=cv2.INTER_AREA)
    scenes.append(("small-faces", canvas))
    scenes.append(("empty", np.full((480, 640, 3), 90, np.uint8)))
    return scenes


def _match(reference: np.ndarray, other: np.ndarray) -> list[tuple[int, int]]:
    """Pairs (i, j) of rows with the nearest boxes (greedy, best first)."""
    pairs, used = [], set()
    for i, row in enumerate(reference):
        distances = [np.abs(row[:4] - o[:4]).max() if j not in used else np.inf for j, o in enumerate(other)]
        j = int(np.argmin(distances))
        used.add(j)
        pairs.append((i, j))
    return pairs


@pytest.fixture(scope="module")
def detectors():
    from facelink.runtime.detection import create_detector
    from facelink.runtime.detection.yunet import YuNetDetector
    from facelink.runtime.detection.yunet_ort import YuNetOrtDetector

    opencv = create_detector(DetectorConfig(kind="yunet"))
    ort = create_detector(DetectorConfig(kind="yunet-ort"))
    assert isinstance(opencv, YuNetDetector) and isinstance(ort, YuNetOrtDetector)
    assert ort.providers == [CPU]
    return opencv, ort


@needs_yunet
def test_onnxruntime_yunet_equals_cv2_face_detector_yn(detectors) -> None:
    opencv, ort = detectors
    faces = worst_box = worst_points = worst_score = 0.0
    for name, image in _scenes():
        expected = opencv.raw(image)
        got = ort.raw(image)
        expected = np.zeros((0, 15), np.float32) if expected is None else expected
        assert len(got) == len(expected), f"{name}: {len(got)} faces through ONNX Runtime, {len(expected)} through OpenCV"
        for i, j in _match(expected, got):
            worst_box = max(worst_box, float(np.abs(expected[i, :4] - got[j, :4]).max()))
            worst_points = max(worst_points, float(np.abs(expected[i, 4:14] - got[j, 4:14]).max()))
            worst_score = max(worst_score, float(abs(expected[i, 14] - got[j, 14])))
        faces += len(expected)
    print(f"\n{faces:.0f} faces; largest difference: box {worst_box:.4f} px, landmarks {worst_points:.4f} px, "
          f"score {worst_score:.5f}")
    assert faces >= 50
    assert worst_box < 1.0 and worst_points < 1.0 and worst_score < 1e-3


@needs_yunet
def test_detections_of_both_paths_agree_after_the_size_policy(detectors) -> None:
    opencv, ort = detectors
    for name, image in _scenes()[30:]:
        a, b = opencv.detect(image), ort.detect(image)
        assert len(a) == len(b), name
        for x, y in zip(a, b):
            assert np.abs(x.box - y.box).max() < 1.0 and np.abs(x.landmarks - y.landmarks).max() < 1.0, name


@needs_yunet
def test_downscaled_detection_maps_back_to_full_resolution(detectors) -> None:
    """A frame made by replicating each pixel 3x3 is scaled back down exactly (INTER_AREA): what
    is found on it at detect_size = the original's side is the original's detections x 3."""
    from facelink.runtime.detection.yunet_ort import YuNetOrtDetector

    _, ort = detectors
    name, original = _scenes()[33]  # a mosaic: several faces
    big = np.repeat(np.repeat(original, 3, axis=0), 3, axis=1)
    # min_face_size 0: it applies at full resolution, where a 10 px face of the original is 30 px.
    policy = YuNetOrtDetector(ort.manifest, DetectorConfig(kind="yunet-ort", detect_size=max(original.shape[:2]),
                                                           min_face_size=0))
    full = YuNetOrtDetector(ort.manifest, DetectorConfig(kind="yunet-ort", detect_size=0, min_face_size=0)).detect(original)
    mapped = policy.detect(big)
    assert len(full) == len(mapped) >= 3, name
    for a, b in zip(full, mapped):
        np.testing.assert_allclose(b.box, a.box * 3, atol=1e-3)
        np.testing.assert_allclose(b.landmarks, a.landmarks * 3, atol=1e-3)
        assert a.score == b.score


@needs_yunet
def test_a_4k_frame_is_detected_at_640_with_the_same_faces() -> None:
    """Faces composited into a 3840x2160 frame: found at the default 640 px as at full resolution.
    The boxes differ as YuNet's own answers differ between two scales of one face (a few % of its
    size), not by a mapping error (that is the test above)."""
    import cv2

    from facelink.runtime.detection import create_detector

    pictures = _lfw_pictures(6)
    frame = np.full((2160, 3840, 3), 100, np.uint8)
    for i, (x, y, side) in enumerate([(100, 200, 900), (1200, 900, 600), (2100, 300, 450), (2900, 1200, 350)]):
        frame[y: y + side, x: x + side] = cv2.resize(pictures[i], (side, side), interpolation=cv2.INTER_CUBIC)
    at_640 = create_detector(DetectorConfig(kind="yunet-ort")).detect(frame)
    full = create_detector(DetectorConfig(kind="yunet-ort", detect_size=0)).detect(frame)
    faces = [d for d in full if d.box[2] >= 100]  # at full resolution YuNet also finds a 28 px background face
    assert len(at_640) == len(faces) == 4
    for a in faces:
        b = max(at_640, key=lambda d: _iou(d.box, a.box))
        assert _iou(a.box, b.box) > 0.8
        assert np.abs(b.landmarks - a.landmarks).max() < 0.08 * float(a.box[2])  # ~2.5 px at 640


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return float(w * h / (a[2] * a[3] + b[2] * b[3] - w * h))


# -- which path a configuration takes ----------------------------------------------------------------
@needs_yunet
def test_yunet_stays_on_opencv_on_the_cpu_and_asks_onnxruntime_for_a_gpu() -> None:
    from facelink.runtime.detection import create_detector, uses_onnxruntime
    from facelink.runtime.detection.yunet import YuNetDetector

    gpu = BackendConfig(providers=(CUDA, CPU))
    assert not uses_onnxruntime(DetectorConfig()) and not uses_onnxruntime(DetectorConfig(kind="yunet"))
    assert uses_onnxruntime(DetectorConfig(kind="yunet-ort"))
    assert uses_onnxruntime(DetectorConfig(backend=gpu)) and uses_onnxruntime(DetectorConfig(kind="yunet"), gpu)
    assert not uses_onnxruntime(DetectorConfig(kind="dlib", backend=gpu))
    assert isinstance(create_detector(DetectorConfig()), YuNetDetector)
    if CUDA not in _available():
        with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider.*onnxruntime-gpu"):
            create_detector(DetectorConfig(kind="yunet", backend=gpu))


@needs_yunet
def test_the_edge_pipeline_runs_with_the_onnxruntime_detector() -> None:
    from facelink.config import EdgeConfig
    from facelink.edge.pipeline import EdgePipeline
    from facelink.edge.sources import Frame

    pipeline = EdgePipeline(EdgeConfig(detector=DetectorConfig(kind="yunet-ort"), codec="jpeg"))
    image = _lfw_pictures(1)[0]
    faces = pipeline.process(Frame(image=image, index=0, timestamp_us=0, name="lfw"))
    assert len(faces) == 1 and faces[0].observation.face.data


def _learned(codec):  # the LearnedFaceCodec inside an AlignedCropCodec (or itself)
    return getattr(codec, "codec", codec)


def test_the_query_model_gets_the_edge_providers() -> None:
    from facelink.config import EdgeConfig
    from facelink.edge.pipeline import EdgePipeline

    backend = BackendConfig(providers=(CPU,), intra_op_threads=2)
    pipeline = EdgePipeline(EdgeConfig(payload="embedding", backend=backend, detector=DetectorConfig(kind="dlib")),
                            detector=object())  # no detector needed here
    assert pipeline.query.backend.session.get_session_options().intra_op_num_threads == 2


def test_the_learned_encoder_gets_the_edge_providers() -> None:
    from facelink.config import EdgeConfig
    from facelink.edge.pipeline import EdgePipeline

    backend = BackendConfig(providers=(CPU,), intra_op_threads=2)
    pipeline = EdgePipeline(EdgeConfig(codec="learned", backend=backend), detector=object())
    assert _learned(pipeline.codec)._backend == backend


# -- GPU providers (on paper here) -------------------------------------------------------------------
@needs_yunet
@pytest.mark.parametrize("provider", [CUDA, TENSORRT])
def test_gpu_provider_matches_the_cpu(detectors, provider: str, tmp_path, monkeypatch) -> None:
    if provider not in _available():
        pytest.skip(f"{provider} is not in this onnxruntime build (needs onnxruntime-gpu and an NVIDIA GPU, e.g. a "
                    "Jetson with NVIDIA's wheel): the GPU path is verified only on paper here")
    from facelink.runtime.detection.yunet_ort import YuNetOrtDetector

    monkeypatch.setenv("FACELINK_CACHE", str(tmp_path))
    _, cpu = detectors
    specs = providers_from_names("tensorrt,cuda,cpu" if provider == TENSORRT else "cuda,cpu")
    gpu = YuNetOrtDetector(cpu.manifest, DetectorConfig(kind="yunet-ort"), BackendConfig(providers=specs))
    assert gpu.providers[0] == provider
    for name, image in _scenes()[30:36]:
        a, b = cpu.detect(image), gpu.detect(image)
        assert len(a) == len(b), name
        for x, y in zip(a, b):  # fp16 on TensorRT: a pixel or two
            assert np.abs(x.box - y.box).max() < 2.0 and np.abs(x.landmarks - y.landmarks).max() < 2.0, name
