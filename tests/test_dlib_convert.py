"""export/dlib_convert.py: dlib's ResNet read without dlib, exported to ONNX, checked against dlib.

The network is converted once per session (a few seconds); the LFW checks need dlib, torch and
../shared, and skip with the reason when one is missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from facelink.export import dlib_convert as dc
from facelink.runtime.manifest import file_sha256, load_manifest

from .support import SHARED_LFW, lfw_image, read_rgb

HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_DLIB = importlib.util.find_spec("dlib") is not None and importlib.util.find_spec("face_recognition_models") is not None

needs_dat = pytest.mark.skipif(not HAVE_DLIB, reason="needs dlib and its models: pip install 'facelink[dlib]'")
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="needs torch to convert: pip install 'facelink[export]'")
needs_lfw = pytest.mark.skipif(
    not SHARED_LFW.is_dir(), reason=f"needs LFW from the shared folder ({SHARED_LFW}); set FACELINK_SHARED"
)


def dat_path() -> Path:
    from facelink.runtime.dlib_models import dlib_model_path

    return dlib_model_path(dc.DAT_NAME)


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dc.DlibNet, Path]:
    """The converted network, written where the manifest's `${cache}/` finds it under FACELINK_CACHE."""
    import torch

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("cache") / "models" / "dlib-resnet.onnx"
    net, _ = dc.convert(dat_path(), out)
    return net, out


# --- dlib's serialization --------------------------------------------------------------------------
def test_reader_decodes_dlib_integers_bools_strings_and_floats() -> None:
    # As dlib writes them: 2 = 01 02, 0 = 01 00, -28 = 81 1c, 256 = 02 00 01; true = '1'; "con_4"
    # = its length (01 05) and the characters; 0.04f = mantissa 0xa3d70a, exponent -28.
    r = dc._Reader(
        bytes.fromhex("0102 0100 811c 020001") + b"1" + bytes.fromhex("0105") + b"con_4" + bytes.fromhex("030ad7a3 811c")
    )
    assert [r.read_int(), r.read_int(), r.read_int(), r.read_int()] == [2, 0, -28, 256]
    assert r.read_bool() is True
    assert r.read_string() == "con_4"
    assert r.read_float() == float(np.float32(0.04))
    assert r.at_end()


@needs_dat
def test_reader_finds_anet_type_in_the_dat_file() -> None:
    net = dc.read_dlib_net(dat_path())  # reads every byte, or raises
    convs = [layer for layer in net.layers if isinstance(layer, dc.Conv)]
    assert len(convs) == 29 and len([layer for layer in net.layers if isinstance(layer, dc.AddPrev)]) == 14
    assert convs[0].weight.shape == (32, 3, 7, 7) and convs[0].stride == (2, 2) and convs[0].padding == (0, 0)
    (fc,) = [layer for layer in net.layers if isinstance(layer, dc.Fc)]
    assert fc.weight.shape == (128, 256) and fc.bias is None
    assert net.input_size == (150, 150)
    # The manifest's normalisation is dlib's input layer to the last bit: (pixel - avg) / 256.
    spec = load_manifest(dc.MANIFEST_NAME).input
    assert spec is not None and spec.scale == 1.0 and spec.layout == "NCHW" and spec.color == "RGB"
    assert np.array_equal(np.float32(spec.mean), np.float32(net.mean_rgb))
    assert spec.std == (256.0, 256.0, 256.0)


@needs_dat
def test_reader_refuses_a_truncated_file(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(dat_path().read_bytes()[:-100])
    with pytest.raises(dc.DlibFormatError, match="end of file"):
        dc.read_dlib_net(truncated)


# --- against dlib ----------------------------------------------------------------------------------
@needs_dat
@needs_torch
@needs_lfw
def test_onnx_matches_dlib_on_100_lfw_faces(converted: tuple[dc.DlibNet, Path]) -> None:
    import onnx

    net, onnx_path = converted
    model = onnx.load(str(onnx_path))
    assert model.opset_import[0].version == dc.OPSET
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    chips, paths = dc.lfw_chips(SHARED_LFW, 100)
    assert len(chips) == 100
    reference = dc.dlib_descriptors(dat_path(), chips)
    session = dc.ort_session(onnx_path, threads=1)
    x = dc.normalise(np.stack(chips), net.mean_rgb)
    ours = session.run(None, {"input": x})[0]  # the whole batch at once: the batch axis is dynamic
    cos = np.sum(reference * ours, 1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(ours, axis=1))
    print(f"\ncosine ONNX vs dlib over {len(cos)} LFW faces: min {cos.min():.8f}, mean {cos.mean():.8f}")
    worst = int(np.argmin(cos))
    assert cos.min() >= 0.9999, f"{paths[worst]}: cosine {cos[worst]:.6f}"
    one = session.run(None, {"input": x[:1]})[0]
    assert np.allclose(one, ours[:1], atol=1e-5)


@needs_dat
@needs_torch
def test_export_is_byte_reproducible_and_is_the_file_the_manifest_pins(
    converted: tuple[dc.DlibNet, Path], tmp_path: Path
) -> None:
    import torch

    _, first = converted
    again = dc.export_onnx(dc.build_torch(dc.read_dlib_net(dat_path())), tmp_path / "again.onnx")
    assert again.read_bytes() == first.read_bytes()
    pinned = load_manifest(dc.MANIFEST_NAME).sha256
    if pinned is not None:
        assert file_sha256(first) == pinned, (
            f"torch {torch.__version__} exports other bytes than the ones dlib-resnet-onnx.json pins "
            "(the exporter's output depends on the torch version): re-pin the sha256 or set it to null"
        )


@needs_dat
@needs_torch
@needs_lfw
def test_onnx_recognizer_agrees_with_the_dlib_recognizer(
    converted: tuple[dc.DlibNet, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from facelink.runtime.detection.dlib_hog import DlibHogDetector
    from facelink.runtime.detection import largest
    from facelink.runtime.recognition import create_recognizer

    _, onnx_path = converted
    monkeypatch.setenv("FACELINK_CACHE", str(onnx_path.parent.parent))  # `${cache}/models/dlib-resnet.onnx`
    onnx_recognizer = create_recognizer("dlib-resnet-onnx")
    dlib_recognizer = create_recognizer("dlib-resnet")
    assert onnx_recognizer.dim == dlib_recognizer.dim == 128
    assert onnx_recognizer.match_threshold == dlib_recognizer.match_threshold

    detector = DlibHogDetector()
    names = ("Aaron_Eckhart", "Serena_Williams", "Colin_Powell", "Gloria_Macapagal_Arroyo")
    images = [read_rgb(lfw_image(name)) for name in names]
    faces = [(image, face.landmarks) for image in images if (face := largest(detector.detect(image))) is not None]
    assert len(faces) >= 3
    for image, landmarks in faces:
        a, b = onnx_recognizer.embed(image, landmarks), dlib_recognizer.embed(image, landmarks)
        assert abs(np.linalg.norm(a) - 1) < 1e-5
        assert float(a @ b) >= 0.999
