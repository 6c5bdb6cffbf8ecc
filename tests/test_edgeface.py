"""EdgeFace (XS, XS dynamic int8, XXS) as bundled recognisers and the cloud's `auto` primary.

What must hold: the manifests describe the ../shared files exactly (sha256, input normalisation,
template, 512-d); `auto` takes the strongest recogniser whose weights are present; 512-d
embeddings go through the engine, the gallery and the unknowns store; `auto` gallery models
still serve the bundled ensembles when EdgeFace is the primary; an fp16 export and a Triton
repository of EdgeFace are valid. Real-face tests skip without ../shared.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from facelink.config import CloudConfig, shared_dir
from facelink.runtime.manifest import load_manifest
from facelink.runtime.recognition import AUTO_PREFERENCE, auto_recognizer_name, create_recognizer

from .support import SHARED_LFW, lfw_image, read_rgb

EDGEFACE = ("edgeface-xs", "edgeface-xs-int8", "edgeface-xxs")
SHARED_EDGEFACE = shared_dir() / "models" / "edgeface"
needs_edgeface = pytest.mark.skipif(
    not (SHARED_LFW.is_dir() and (SHARED_EDGEFACE / "edgeface_xs_fp32.onnx").is_file()),
    reason=f"needs LFW and EdgeFace from the shared folder ({shared_dir()}); set FACELINK_SHARED",
)


@pytest.mark.parametrize("name", EDGEFACE)
def test_manifests_describe_edgefaces_input_and_512d_output(name: str) -> None:
    manifest = load_manifest(name)
    mobilefacenet = load_manifest("mobilefacenet")
    assert manifest.embedding is not None and manifest.input is not None and manifest.alignment is not None
    assert manifest.embedding.dim == 512 and manifest.embedding.flip_augmentation
    # (x / 255 - 0.5) / 0.5, RGB, NCHW 112x112 on the ArcFace template (../shared/README.md)
    assert (manifest.input.scale, manifest.input.mean, manifest.input.std) == (255.0, (0.5,) * 3, (0.5,) * 3)
    assert (manifest.input.width, manifest.input.height, manifest.input.color) == (112, 112, "RGB")
    assert manifest.alignment.template == mobilefacenet.alignment.template
    assert manifest.sha256 and manifest.file.startswith("${shared}/models/edgeface/")
    assert "research use" in (manifest.license or "")  # the WebFace training-data caveat travels with it


def test_the_int8_manifest_shares_the_fp32_space_under_its_own_id() -> None:
    fp32, int8 = load_manifest("edgeface-xs"), load_manifest("edgeface-xs-int8")
    assert int8.model_id != fp32.model_id  # galleries never mix precisions under one id
    assert int8.embedding.space == fp32.model_id


@pytest.mark.skipif(not SHARED_EDGEFACE.is_dir(), reason=f"EdgeFace not present at {SHARED_EDGEFACE}")
@pytest.mark.parametrize("name", EDGEFACE)
def test_manifest_sha256_matches_the_shared_weights(name: str) -> None:
    assert load_manifest(name).weights().is_file()  # verify=True: a mismatch raises


# -- auto ---------------------------------------------------------------------------------------------
def _shared_with(tmp_path: Path, folders: list[str]) -> Path:
    """A shared folder holding only `folders` of the real one (symlinks: nothing is copied)."""
    root = tmp_path / "shared"
    (root / "models").mkdir(parents=True)
    for folder in folders:
        os.symlink(shared_dir() / "models" / folder, root / "models" / folder)
    return root


@pytest.mark.skipif(not SHARED_EDGEFACE.is_dir(), reason=f"EdgeFace not present at {SHARED_EDGEFACE}")
def test_auto_takes_the_strongest_recogniser_whose_weights_are_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert AUTO_PREFERENCE[0] == "edgeface-xs" and auto_recognizer_name() == "edgeface-xs"
    monkeypatch.setenv("FACELINK_SHARED", str(_shared_with(tmp_path / "a", ["mobilefacenet-ms1m"])))
    assert auto_recognizer_name() == "mobilefacenet"
    monkeypatch.setenv("FACELINK_SHARED", str(_shared_with(tmp_path / "b", [])))
    assert auto_recognizer_name() == "dlib-resnet"


# -- auto gallery models: what the bundled ensembles need ---------------------------------------------------
def _auto_gallery(primary: str, unreachable: set[str], monkeypatch: pytest.MonkeyPatch,
                  ensembles: dict[str, list[str]] | None = None) -> list[str]:
    """`auto` gallery models for `primary`, with `unreachable` manifests missing and, when given,
    `ensembles` (name -> the manifest names of its gallery models) standing in for the bundled ones."""
    from facelink.cloud import engine

    monkeypatch.setattr(engine, "_unreachable", lambda name: "absent" if name in unreachable else "")
    if ensembles is not None:
        fake = {name: SimpleNamespace(transforms=[SimpleNamespace(gallery_model=load_manifest(m).model_id)
                                                  for m in members]) for name, members in ensembles.items()}
        monkeypatch.setattr(engine, "bundled_ensembles", lambda: {n: Path(f"{n}.json") for n in fake})
        monkeypatch.setattr(engine, "load_ensemble_manifest", lambda path: (fake[Path(path).stem], Path(path)))
    stub = SimpleNamespace(recognizer=SimpleNamespace(model_id=load_manifest(primary).model_id))
    return engine.RecognitionEngine._auto_gallery_models(stub)  # type: ignore[arg-type]


def test_auto_gallery_models_are_the_members_of_every_servable_bundled_ensemble(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ensembles = {"a": ["mobilefacenet", "dlib-resnet-onnx"], "b": ["edgeface-xs", "mobilefacenet"]}
    assert _auto_gallery("edgeface-xs", set(), monkeypatch, ensembles) == ["mobilefacenet", "dlib-resnet-onnx"]
    assert _auto_gallery("mobilefacenet", set(), monkeypatch, ensembles) == ["dlib-resnet-onnx", "edgeface-xs"]
    with caplog.at_level(logging.WARNING, logger="facelink.cloud.engine"):
        # An ensemble short of one member adds none: the others would cost enrollment time for nothing.
        assert _auto_gallery("edgeface-xs", {"dlib-resnet-onnx"}, monkeypatch, ensembles) == ["mobilefacenet"]
    assert "a.json: gallery model(s) left out" in caplog.text and "dlib-resnet-onnx@v1: absent" in caplog.text


def test_with_edgeface_primary_the_bundled_ensembles_keep_their_gallery_models(monkeypatch: pytest.MonkeyPatch) -> None:
    from facelink.runtime.asymmetric import bundled_ensembles, load_ensemble_manifest

    needed = {load_manifest(m).model_id for m in _auto_gallery("edgeface-xs", set(), monkeypatch)}
    for path in bundled_ensembles().values():
        members = {t.gallery_model for t in load_ensemble_manifest(path)[0].transforms}
        assert members - {load_manifest("edgeface-xs").model_id} <= needed, path.name


# -- 512-d through the engine, the gallery and the unknowns store ----------------------------------------
@pytest.fixture(scope="module")
def edgeface():
    return create_recognizer("edgeface-xs")


@needs_edgeface
def test_edgeface_tells_real_people_apart_at_its_threshold(edgeface) -> None:  # noqa: ANN001
    from facelink.runtime.detection import create_detector, largest

    detector = create_detector()
    vectors = []
    for name, index in (("Colin_Powell", 1), ("Colin_Powell", 2), ("Serena_Williams", 1)):
        image = read_rgb(lfw_image(name, index))
        vectors.append(edgeface.embed(image, largest(detector.detect(image)).landmarks))
    assert vectors[0].shape == (512,) and np.isclose(np.linalg.norm(vectors[0]), 1.0, atol=1e-5)
    assert float(vectors[0] @ vectors[1]) >= edgeface.match_threshold > float(vectors[0] @ vectors[2])


@needs_edgeface
def test_a_512d_primary_enrolls_identifies_and_clusters_unknowns(
    edgeface, tmp_path: Path, caplog: pytest.LogCaptureFixture  # noqa: ANN001
) -> None:
    from facelink.cloud.engine import Decision, EnrollFace, RecognitionEngine
    from facelink.cloud.gallery import Gallery

    config = CloudConfig(gallery_models=(), ensembles=())
    engine = RecognitionEngine(config, Gallery(tmp_path / "g"), edgeface)
    assert engine.models[edgeface.model_id].dim == 512
    engine.enroll("Colin Powell", [EnrollFace(read_rgb(lfw_image("Colin_Powell", 1)), None)])
    assert engine.gallery.dim(edgeface.model_id) == 512
    probe = read_rgb(lfw_image("Colin_Powell", 2))
    found = engine.identify(probe, engine.locate_face(probe, None, "probe")[0])
    assert (found.identity, found.decision) == ("Colin Powell", Decision.MATCH)
    assert found.embedding is not None and found.embedding.shape == (512,)
    embedding = engine.identify_embedding(found.embedding, edgeface.model_id)  # a 512-d payload is accepted
    assert embedding.identity == "Colin Powell"
    assert engine.unknowns.model_id == edgeface.model_id
    engine.gallery.close()

    # The same gallery served by MobileFaceNet: no templates in its space, and the log says so.
    with caplog.at_level(logging.WARNING, logger="facelink.cloud.engine"):
        RecognitionEngine(config.model_copy(update={"recognizer": "mobilefacenet"}), Gallery(tmp_path / "g"))
    assert "no templates of the primary recogniser mobilefacenet@ms1m-1" in caplog.text and "cloud upgrade" in caplog.text
    assert "its templates are in" not in caplog.text  # EdgeFace is not among the models this server runs


# -- export: fp16 and Triton ------------------------------------------------------------------------------
@needs_edgeface
def test_edgeface_fp16_export_is_valid_and_keeps_cosine_above_0999(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from facelink.export.deploy.pipeline import ExportOptions, export_onnx
    from facelink.export.deploy.source import resolve_source

    monkeypatch.setenv("FACELINK_CACHE", str(tmp_path / "cache"))
    # The float16 converter retypes tensors but not Cast's `to`: EdgeFace's positional encoding
    # casts a mask to float, which left an invalid graph until quantize._retype_float_casts.
    exported = export_onnx(resolve_source("edgeface-xs"), ExportOptions(precision="fp16", parity_count=4), tmp_path)
    (row,) = exported.parity
    assert row.min_cosine > 0.999
    assert create_recognizer(exported.manifest_path).dim == 512


@needs_edgeface
def test_an_export_that_loses_the_embeddings_is_refused_and_leaves_no_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from facelink.export.deploy.pipeline import ExportOptions, ExportParityError, export_onnx
    from facelink.export.deploy.source import resolve_source

    monkeypatch.setenv("FACELINK_CACHE", str(tmp_path / "cache"))
    # onnxruntime's static QDQ int8 of EdgeFace computes something else (cosine ~0.15 to fp32,
    # LFW 78%: benchmarks/results/quantization_edgeface_int8.json); shipping it silently was the bug.
    with pytest.raises(ExportParityError, match="does not keep its embeddings"):
        export_onnx(resolve_source("edgeface-xs"), ExportOptions(precision="int8", calib_count=8, parity_count=4), tmp_path)
    assert not list(tmp_path.glob("*.json")) or all(p.name.endswith(".export.json") for p in tmp_path.glob("*.json"))
    record = json.loads(next(tmp_path.glob("*.export.json")).read_text())
    assert "refused" in record


@needs_edgeface
def test_edgeface_triton_repository_has_a_512d_output_and_dynamic_batching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from facelink.cli import main

    monkeypatch.setenv("FACELINK_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "repo"
    assert main(["export", "edgeface-xs", "--format", "triton", "--out", str(repo), "--parity-count", "2",
                 "--max-batch", "64"]) == 0
    config = (repo / "edgeface-xs" / "config.pbtxt").read_text()
    assert 'name: "input"' in config and "dims: [ 3, 112, 112 ]" in config
    assert 'name: "embedding"' in config and "dims: [ 512 ]" in config and "max_batch_size: 64" in config
    manifest = json.loads((repo / "edgeface-xs" / "facelink-manifest.json").read_text())
    assert manifest["embedding"]["dim"] == 512 and manifest["input"]["mean"] == [0.5, 0.5, 0.5]


# -- the recognisers benchmark ------------------------------------------------------------------------------
def test_calibrated_threshold_rounds_the_top_impostor_up_to_005() -> None:
    from facelink.benchmarks.recognisers import calibrated_threshold, stored

    assert calibrated_threshold(np.array([0.1, 0.37])) == 0.40  # MobileFaceNet's rule
    assert calibrated_threshold(np.array([0.40])) == 0.45  # strictly above the top impostor
    x = np.array([[0.1234567, -0.7654321]], dtype=np.float32)
    assert stored(x, "float16").dtype == np.float32 and not np.array_equal(stored(x, "float16"), x)
    assert np.array_equal(stored(x, "float32"), x)


@needs_edgeface
def test_recognisers_benchmark_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from facelink.benchmarks import recognisers

    monkeypatch.setenv("FACELINK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "r.json"
    assert recognisers.main(["--recognizer", "edgeface-xs", "--limit-pairs", "1", "--limit-people", "4",
                             "--timing-faces", "3", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["timings"]["edgeface-xs@webface-1"]["faces"] == 3
    assert payload["costs"]["edgeface-xs@webface-1"]["passes_per_face"] == 2  # the flip pass
    rows = payload["rows"]
    assert [(r["storage"], r["bytes_per_embedding"]) for r in rows] == [("float32", 2048), ("float16", 1024)]
    threshold = load_manifest("edgeface-xs").embedding.match_threshold
    assert all(0 <= r["rank1"] <= 100 and r["at_manifest_threshold"]["threshold"] == threshold for r in rows)


def test_fp16_conversion_retypes_a_graphs_own_cast_to_float() -> None:
    """The converter's bug EdgeFace hits, on a four-node graph (no ../shared needed)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxconverter_common")
    from onnx import TensorProto, helper

    from facelink.export import quantize

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    nodes = [helper.make_node("Identity", ["x"], ["v"]),  # the input used once, as in EdgeFace
             helper.make_node("Less", ["v", "zero"], ["mask"]), helper.make_node("Not", ["mask"], ["keep"]),
             helper.make_node("Cast", ["keep"], ["keep_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["v", "keep_f"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "relu", [x], [y], [zero]), opset_imports=[helper.make_opsetid("", 17)])
    half = quantize.to_fp16(model)
    onnx.checker.check_model(half, full_check=True)  # raised a type inference error before the fix
    ort = pytest.importorskip("onnxruntime")
    out = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.array([[-1.0, 0.5, 2.0, -3.0]], np.float32)})[0]
    np.testing.assert_allclose(out, [[0.0, 0.5, 2.0, 0.0]])
