"""Model manifests: validation with errors that name the problem, and binding to weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facelink.runtime.manifest import ManifestError, bundled_manifests, file_sha256, load_manifest

VALID = {
    "name": "tiny",
    "task": "recognition",
    "file": "tiny.onnx",
    "input": {"width": 112, "height": 112, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    "alignment": {"template": [[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]]},
    "embedding": {"dim": 64, "match_threshold": 0.3},
}


def write(tmp_path: Path, data: dict, name: str = "tiny.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_bundled_manifests_are_valid() -> None:
    names = bundled_manifests()
    assert {"mobilefacenet", "dlib-resnet", "yunet"} <= set(names)
    for name in names:
        manifest = load_manifest(name)
        if manifest.task == "recognition":
            assert manifest.template.points.shape == (5, 2)
            assert manifest.embedding is not None and manifest.embedding.dim > 0


def test_relative_file_resolves_beside_the_manifest_and_sha256_binds_it(tmp_path: Path) -> None:
    weights = tmp_path / "tiny.onnx"
    weights.write_bytes(b"weights v1")
    manifest = load_manifest(write(tmp_path, {**VALID, "sha256": file_sha256(weights)}))
    assert manifest.weights() == weights
    assert manifest.model_id == "tiny@1"

    weights.write_bytes(b"weights v2, retrained")
    with pytest.raises(ManifestError, match="sha256"):
        load_manifest(write(tmp_path, {**VALID, "sha256": "0" * 64})).weights()


def test_shared_prefix_resolves_against_the_shared_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACELINK_SHARED", str(tmp_path / "elsewhere"))
    manifest = load_manifest(write(tmp_path, {**VALID, "file": "${shared}/models/tiny.onnx"}))
    assert manifest.resolve_file() == (tmp_path / "elsewhere" / "models" / "tiny.onnx").resolve()
    with pytest.raises(ManifestError, match="does not exist"):
        manifest.weights()


@pytest.mark.parametrize(
    "change, field",
    [
        ({"embedding": {"dim": 0, "match_threshold": 0.3}}, "embedding.dim"),
        ({"input": {**VALID["input"], "color": "YUV"}}, "input.color"),
        ({"input": {**VALID["input"], "std": [1, 0, 1]}}, "input.std"),
        ({"alignment": {"template": [[1, 2]] * 4}}, "alignment.template"),
        ({"task": "segmentation"}, "task"),
        ({"unexpected": 1}, "unexpected"),
        ({"manifest_version": 99}, "manifest_version"),
        ({"name": "has spaces"}, "name"),
    ],
)
def test_invalid_manifest_names_the_field(tmp_path: Path, change: dict, field: str) -> None:
    with pytest.raises(ManifestError, match=field.replace(".", r"\.")):
        load_manifest(write(tmp_path, {**VALID, **change}))


def test_recognition_needs_embedding_and_alignment(tmp_path: Path) -> None:
    data = {k: v for k, v in VALID.items() if k != "embedding"}
    with pytest.raises(ManifestError, match="needs 'input', 'embedding' and 'alignment'"):
        load_manifest(write(tmp_path, data))


def test_unknown_name_and_bad_json_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="bundled: .*mobilefacenet"):
        load_manifest("no-such-model")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(bad)


def test_template_matches_input_size(tmp_path: Path) -> None:
    manifest = load_manifest(write(tmp_path, VALID))
    assert manifest.template.size == (112, 112)
    np.testing.assert_allclose(manifest.template.points[0], [38.3, 51.7], atol=1e-5)


def test_a_dynamic_batch_recogniser_embeds_a_large_stack_in_bounded_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundled query model has a dynamic batch: LFW's 7,701 faces in one ONNX Runtime call
    once took 24 GB. Calls are capped at MAX_BATCH faces, and the result is the same."""
    import numpy as np

    from facelink.runtime import recognition
    from facelink.runtime.recognition import create_recognizer

    from facelink.config import DEFAULT_QUERY_MODEL

    recognizer = create_recognizer(DEFAULT_QUERY_MODEL)
    side = recognizer.manifest.input.width
    faces = np.random.default_rng(0).integers(0, 256, size=(150, side, side, 3), dtype=np.uint8)
    reference = np.concatenate([recognizer.embed_aligned(faces[i : i + 10]) for i in range(0, 150, 10)])
    sizes: list[int] = []
    run = recognizer.backend.run
    monkeypatch.setattr(recognizer.backend, "run", lambda feeds: sizes.append(len(next(iter(feeds.values())))) or run(feeds))
    assert np.allclose(recognizer.embed_aligned(faces), reference, atol=1e-5)
    assert max(sizes) == recognition.MAX_BATCH and sum(sizes) == 150
