"""The gallery side of asymmetric matching at run time: transforms by manifest, ensemble, uncertainty, rejection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facelink.runtime.asymmetric import (
    GalleryEnsemble,
    RejectionPolicy,
    bundled_ensembles,
    disagreement,
    ensemble_mean,
    load_ensemble_manifest,
    unit,
)
from facelink.runtime.manifest import ManifestError, file_sha256

onnx = pytest.importorskip("onnx", reason="the tests write tiny ONNX transforms with the onnx package")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

DIM = 8


def linear_onnx(path: Path, matrix: np.ndarray) -> Path:
    """An ONNX transform y = x @ matrix, with a dynamic batch: what the exporter writes, minus the MLP."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["embedding", "w"], ["transformed"])],
        "linear",
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", matrix.shape[0]])],
        [helper.make_tensor_value_info("transformed", TensorProto.FLOAT, ["batch", matrix.shape[1]])],
        [numpy_helper.from_array(matrix.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def rotation(angle: float) -> np.ndarray:
    """A rotation by `angle` in the plane of the first two axes."""
    r = np.eye(DIM)
    r[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return r


def ensemble_in(folder: Path, matrices: dict[str, np.ndarray], **extra: object) -> Path:
    specs = []
    for i, (model, matrix) in enumerate(matrices.items()):
        path = linear_onnx(folder / f"t{i}.onnx", matrix)
        specs.append({"gallery_model": model, "file": path.name, "sha256": file_sha256(path),
                      "input_dim": matrix.shape[0], "output_dim": matrix.shape[1]})
    manifest = {"name": "q", "query_model": "q@1", "transforms": specs, **extra}
    (folder / "q.json").write_text(json.dumps(manifest))
    return folder / "q.json"


def test_the_gallery_vector_is_the_normalised_mean_of_the_unit_transformed_embeddings(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(DIM, DIM)), rng.normal(size=(12, DIM))
    ensemble = GalleryEnsemble.load(ensemble_in(tmp_path, {"a@1": a, "b@1": b}))
    ga, gb = unit(rng.normal(size=(5, DIM))), unit(rng.normal(size=(5, 12)))
    result = ensemble.transform({"a@1": ga, "b@1": gb})
    expected = unit(unit(ga @ a) + unit(gb @ b))
    assert result.models == ("a@1", "b@1") and result.members.shape == (5, 2, DIM)
    assert np.allclose(result.vectors, expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(result.vectors, axis=1), 1, atol=1e-5)
    single = ensemble.transform({"b@1": gb})  # a subset of the gallery models works, without uncertainty
    assert np.allclose(single.vectors, unit(gb @ b), atol=1e-5) and not single.uncertainty.any()


def test_member_weights_weigh_the_gallery_vector_of_every_subset_but_not_the_uncertainty(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(DIM, DIM)), rng.normal(size=(DIM, DIM))
    ga, gb = unit(rng.normal(size=(5, DIM))), unit(rng.normal(size=(5, DIM)))
    (tmp_path / "w").mkdir()
    (tmp_path / "e").mkdir()
    weighted = GalleryEnsemble.load(ensemble_in(tmp_path / "w", {"a@1": a, "b@1": b}, member_weights={"a@1": 0.8, "b@1": 0.2}))
    equal = GalleryEnsemble.load(ensemble_in(tmp_path / "e", {"a@1": a, "b@1": b}))
    result = weighted.transform({"a@1": ga, "b@1": gb})
    assert np.allclose(result.vectors, unit(0.8 * unit(ga @ a) + 0.2 * unit(gb @ b)), atol=1e-5)
    assert np.allclose(result.uncertainty, equal.transform({"a@1": ga, "b@1": gb}).uncertainty, atol=1e-6)
    assert np.allclose(weighted.transform({"b@1": gb}).vectors, unit(gb @ b), atol=1e-5)  # a subset renormalises
    members = unit(rng.normal(size=(4, 3, DIM)))
    assert np.allclose(ensemble_mean(members, np.array([2.0, 2.0, 2.0])), ensemble_mean(members), atol=1e-6)


@pytest.mark.parametrize("weights, problem", [({"a@1": 1.0}, "every member"), ({"a@1": 1.0, "b@1": 0.0}, "positive"),
                                              ({"a@1": 1.0, "b@1": 1.0, "q@1+own": 1.0}, "every member")])
def test_member_weights_must_weigh_each_member_once_and_positively(tmp_path: Path, weights: dict, problem: str) -> None:
    path = ensemble_in(tmp_path, {"a@1": np.eye(DIM), "b@1": np.eye(DIM)}, member_weights=weights)
    with pytest.raises(ManifestError, match=problem):
        load_ensemble_manifest(path)


def test_uncertainty_is_zero_when_the_transforms_agree_and_grows_with_their_disagreement(tmp_path: Path) -> None:
    g = unit(np.random.default_rng(1).normal(size=(20, DIM)))
    g[:, :2] *= 4  # most of each vector in the rotated plane, so the rotation matters
    g = unit(g)
    previous = -1.0
    for i, angle in enumerate((0.0, 0.2, 0.6, 1.2)):
        folder = tmp_path / str(i)
        folder.mkdir()
        ensemble = GalleryEnsemble.load(ensemble_in(folder, {"a@1": np.eye(DIM), "b@1": rotation(angle), "c@1": np.eye(DIM)}))
        u = ensemble.transform({"a@1": g, "b@1": g, "c@1": g}).uncertainty
        if angle == 0:
            assert np.allclose(u, 0, atol=1e-6)
        assert u.mean() > previous
        previous = float(u.mean())


def test_disagreement_is_one_minus_the_mean_pairwise_cosine() -> None:
    members = unit(np.random.default_rng(2).normal(size=(6, 4, DIM)))
    cosines = np.einsum("nid,njd->nij", members, members)
    pairwise = (cosines.sum(axis=(1, 2)) - 4) / 12
    assert np.allclose(disagreement(members), 1 - pairwise, atol=1e-5)
    assert np.allclose(ensemble_mean(members), unit(members.mean(axis=1)), atol=1e-6)
    with pytest.raises(ValueError, match="two"):
        disagreement(members[:, :1])


def test_rejection_flags_or_drops_exactly_the_most_uncertain_fraction_and_says_why() -> None:
    u = np.random.default_rng(3).permutation(np.linspace(0, 1, 50))
    flagged = RejectionPolicy(fraction=0.1, action="flag").apply(u)
    assert flagged.flagged.sum() == 5 and set(np.flatnonzero(flagged.flagged)) == set(np.argsort(-u)[:5])
    assert flagged.accepted.all()
    assert all((r is not None) == f for r, f in zip(flagged.reasons, flagged.flagged))
    assert "10% most uncertain of 50" in next(r for r in flagged.reasons if r)
    dropped = RejectionPolicy(fraction=0.2, action="drop").apply(u)
    assert dropped.flagged.sum() == 10 and np.array_equal(dropped.accepted, ~dropped.flagged)
    assert not RejectionPolicy(fraction=0.0).apply(u).flagged.any()
    one_by_one = RejectionPolicy(fraction=0.1, action="drop", threshold=0.9).apply(np.array([0.95, 0.5]))
    assert one_by_one.accepted.tolist() == [False, True] and "calibrated threshold" in one_by_one.reasons[0]


def test_manifest_thresholds_checksums_and_shapes_are_enforced(tmp_path: Path) -> None:
    path = ensemble_in(tmp_path, {"a@1": np.eye(DIM), "b@1": np.eye(DIM)}, uncertainty_quantiles={"0.1": 0.25})
    manifest, _ = load_ensemble_manifest(path)
    assert RejectionPolicy.from_manifest(manifest, 0.1).threshold == 0.25
    with pytest.raises(ValueError, match="no uncertainty threshold"):
        RejectionPolicy.from_manifest(manifest, 0.3)
    ensemble = GalleryEnsemble.load(path)
    with pytest.raises(KeyError, match="no transform for c@1"):
        ensemble.transform({"c@1": np.ones((1, DIM))})
    with pytest.raises(ValueError, match="different numbers"):
        ensemble.transform({"a@1": np.ones((2, DIM)), "b@1": np.ones((3, DIM))})
    linear_onnx(tmp_path / "t0.onnx", 2 * np.eye(DIM))  # retrained weights behind the manifest's back
    with pytest.raises(ManifestError, match="sha256"):
        GalleryEnsemble.load(path)


def test_bundled_ensembles_load() -> None:
    bundled = bundled_ensembles()
    if not bundled:
        pytest.skip("no ensemble bundled yet (train one with python -m facelink.export.query.transforms)")
    for name in bundled:
        ensemble = GalleryEnsemble.load(name)
        gallery = {spec.gallery_model: unit(np.ones((2, spec.input_dim))) for spec in ensemble.manifest.transforms}
        result = ensemble.transform(gallery)
        assert result.vectors.shape == (2, ensemble.manifest.dim)


def test_one_bundled_ensemble_per_query_model_and_the_previous_one_by_path() -> None:
    """`ensembles: auto` serves every bundled ensemble whose gallery models run, one per query model:
    two for one query model would refuse to start. Replaced ones stay loadable by path (previous/)."""
    bundled = bundled_ensembles()
    queries = [load_ensemble_manifest(path)[0].query_model for path in bundled.values()]
    assert len(queries) == len(set(queries))
    previous = next(iter(bundled.values())).parent / "previous" if bundled else None
    if previous is None or not previous.is_dir():
        pytest.skip("no previous ensemble kept")
    for path in previous.glob("*.json"):
        ensemble = GalleryEnsemble.load(path)  # its transform files and hashes, relative to it
        assert ensemble.manifest.name == path.stem and ensemble.manifest.query_member
