"""Asymmetric matching in the cloud: per-model enrollment, derived query-model templates,
rejection with reasons, backfill-free registration of a new query model.

The ensembles here are synthetic: their transforms are fixed matrices written with onnx.helper,
so the "query model" is known exactly (for the server tests: q = unit(m + d @ W), from the
MobileFaceNet embedding m and the dlib embedding d of a face), and every expected number can
be computed independently of the server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import grpc
import numpy as np
import pytest

from facelink.cloud.gallery import Gallery, QueryModel
from facelink.runtime.asymmetric import GalleryEnsemble, RejectionPolicy, load_ensemble_manifest
from facelink.runtime.manifest import ManifestError, file_sha256, load_manifest

from .support import lfw_image, needs_shared
from .test_service import ENROLLED, Stream, enroll_request

onnx = pytest.importorskip("onnx", reason="the tests write tiny ONNX transforms with the onnx package")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

ARCFACE_TEMPLATE = [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_ensemble(
    folder: Path, name: str, transforms: dict[str, np.ndarray], *, threshold: float,
    gallery_sha256: dict[str, str | None] | None = None, match_threshold: float = 0.5,
) -> Path:
    """An ensemble manifest for query model `name`@1: one MatMul transform per gallery model,
    the rejection threshold `threshold` calibrated for fraction 0.1, and the query model's own
    manifest (whose weights are never needed on the gallery side)."""
    folder.mkdir(parents=True, exist_ok=True)
    dim = next(iter(transforms.values())).shape[1]
    specs = []
    for i, (model_id, matrix) in enumerate(transforms.items()):
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["embedding", "w"], ["transformed"])], "linear",
            [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", matrix.shape[0]])],
            [helper.make_tensor_value_info("transformed", TensorProto.FLOAT, ["batch", dim])],
            [numpy_helper.from_array(matrix.astype(np.float32), "w")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        path = folder / f"{name}--{i}.onnx"
        onnx.save(model, str(path))
        specs.append({"gallery_model": model_id, "gallery_sha256": (gallery_sha256 or {}).get(model_id),
                      "file": path.name, "sha256": file_sha256(path), "input_dim": matrix.shape[0], "output_dim": dim})
    sha = "ab" * 32
    (folder / f"{name}-query.json").write_text(json.dumps({
        "name": name, "version": "1", "task": "recognition", "file": f"{name}.onnx", "sha256": sha,
        "input": {"width": 112, "height": 112}, "alignment": {"template": ARCFACE_TEMPLATE},
        "embedding": {"dim": dim, "match_threshold": match_threshold},
    }))
    manifest = {"name": name, "query_model": f"{name}@1", "query_sha256": sha, "query_manifest": f"{name}-query.json",
                "transforms": specs, "uncertainty_quantiles": {"0.1": threshold}}
    (folder / f"{name}.json").write_text(json.dumps(manifest))
    return folder / f"{name}.json"


def load_query_model(path: Path, action: Literal["flag", "drop"] = "flag") -> QueryModel:
    manifest, _ = load_ensemble_manifest(path)
    return QueryModel(GalleryEnsemble.load(path), RejectionPolicy.from_manifest(manifest, 0.1, action))


# -- the gallery alone: synthetic embeddings, exact uncertainties ------------------------------------
DIM = 8


def bent(v: np.ndarray, cosine: float, seed: int) -> np.ndarray:
    """A unit vector at exactly `cosine` to unit `v`."""
    other = np.random.default_rng(seed).normal(size=v.shape)
    other = unit(other - other.dot(v) * v)
    return cosine * v + np.sqrt(1 - cosine**2) * other


def pictures(cosines: list[float], first: int) -> dict[str, np.ndarray]:
    """Pictures whose two gallery models agree to `cosines`: with identity transforms, the
    uncertainty of picture i is exactly 1 - cosines[i]."""
    a = np.eye(DIM)[first : first + len(cosines)]
    return {"a@1": a, "b@1": np.stack([bent(v, c, first + i) for i, (v, c) in enumerate(zip(a, cosines))])}


@pytest.mark.parametrize("action", ["flag", "drop"])
def test_enrollment_stores_each_model_and_judges_the_derived_template(tmp_path: Path, action: Literal["flag", "drop"]) -> None:
    query = load_query_model(write_ensemble(tmp_path / "e", "q", {"a@1": np.eye(DIM), "b@1": np.eye(DIM)}, threshold=0.3), action)
    with Gallery(tmp_path / "g") as gallery:
        assert gallery.enroll_pictures("alice", pictures([0.95, 0.9], 0), [query]) == (2, 2)
        assert gallery.enroll_pictures("bob", pictures([0.5], 2), [query]) == (1, 1)

        records = gallery.templates_of("alice")
        assert [r.model_id for r in records] == ["a@1", "a@1", "b@1", "b@1", "q@1", "q@1"]
        keys = [r.picture for r in records]
        assert keys[:2] == keys[2:4] == keys[4:] and len(set(keys)) == 2  # one key per picture, shared by its models
        assert [r.status for r in records] == ["ok"] * 6 and [r.reason for r in records] == [None] * 6
        assert [r.uncertainty for r in records[4:]] == pytest.approx([0.05, 0.1], abs=1e-5)
        assert all(r.uncertainty is None for r in records[:4])  # computed templates are not judged

        *_, bob = gallery.templates_of("bob")
        past = {"flag": "flagged", "drop": "dropped"}[action]
        assert bob.status == past and bob.uncertainty == pytest.approx(0.5, abs=1e-5)
        assert "uncertainty 0.5000 >= 0.3000" in bob.reason and past in bob.reason
        records, _ = gallery.list()
        assert records[1].templates == 1  # a dropped template is still on record for its picture
        searches_bob_finds(gallery, action == "flag")
    with Gallery(tmp_path / "g") as gallery:  # the indexes rebuilt from the store agree
        searches_bob_finds(gallery, action == "flag")
        assert gallery.templates_of("bob")[-1].status == past


def searches_bob_finds(gallery: Gallery, by_query_model: bool) -> None:
    bob = np.eye(DIM)[2]
    (found,) = gallery.search("q@1", unit(bob + pictures([0.5], 2)["b@1"][0])[None], k=1)
    assert (found[0].identity == "bob") == by_query_model
    assert gallery.search("a@1", bob[None], k=1)[0][0].identity == "bob"  # its picture still serves model a


def test_rebuild_derived_reads_stored_embeddings_and_replaces_the_query_models_templates(tmp_path: Path) -> None:
    eye = np.eye(DIM)
    with Gallery(tmp_path / "g") as gallery:
        gallery.enroll_pictures("alice", pictures([0.95, 0.9], 0))  # served by no query model yet
        gallery.enroll_pictures("bob", pictures([0.5], 2))
        gallery.enroll("carol", "a@1", eye[3:4])  # written without a picture key: a picture of its own

        flag = load_query_model(write_ensemble(tmp_path / "1", "q", {"a@1": eye, "b@1": eye}, threshold=0.3))
        assert gallery.rebuild_derived(flag) == {"ok": 2, "flagged": 2, "dropped": 0}
        carol = gallery.templates_of("carol")[-1]
        assert carol.status == "flagged" and carol.uncertainty is None and "only a@1" in carol.reason
        for name, row in (("alice", 0), ("bob", 2), ("carol", 3)):
            assert gallery.search("q@1", eye[row : row + 1], k=1)[0][0].identity == name

        # The same query model, retrained transforms and stricter settings: its templates are
        # replaced, not added to, and the query index follows.
        flipped = np.diag([-1.0] * DIM)
        drop = load_query_model(write_ensemble(tmp_path / "2", "q", {"a@1": flipped, "b@1": flipped}, threshold=0.0), "drop")
        assert gallery.rebuild_derived(drop) == {"ok": 0, "flagged": 1, "dropped": 3}
        assert [r.status for r in gallery.templates_of("alice") if r.model_id == "q@1"] == ["dropped", "dropped"]
        assert [m.identity for m in gallery.search("q@1", -eye[3:4], k=5)[0]] == ["carol"]  # the only one indexed
        assert gallery.search("a@1", eye[0:1], k=1)[0][0].identity == "alice"  # gallery models untouched


# -- a real server: MobileFaceNet + dlib's ResNet as gallery models ------------------------------------


def _dlib_onnx_missing() -> str | None:
    try:
        load_manifest("dlib-resnet-onnx").weights()
    except ManifestError as error:
        return f"{error}; create it with python -m facelink.export.dlib_convert"
    return None


needs_gallery_models = pytest.mark.skipif(_dlib_onnx_missing() is not None, reason=str(_dlib_onnx_missing()))
MFN, DLIB = "mobilefacenet@ms1m-1", "dlib-resnet-onnx@v1"
QUERY_DIM = 128


@pytest.fixture(scope="module")
def faces(engine_parts) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """(person, picture) -> (MobileFaceNet, dlib) embeddings, computed as the server computes them."""
    from facelink.runtime.codecs import decode_image
    from facelink.runtime.detection import largest
    from facelink.runtime.recognition import create_recognizer

    mfn, detector = engine_parts
    dlib = create_recognizer("dlib-resnet-onnx")
    out = {}
    for name in ENROLLED:
        for index in (1, 2):
            image = decode_image(lfw_image(name, index).read_bytes())
            landmarks = largest(detector.detect(image)).landmarks
            out[name, index] = (mfn.embed(image, landmarks), dlib.embed(image, landmarks))
    return out


def rotation(seed: int) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(QUERY_DIM, QUERY_DIM)))[0]


def query_ensemble(folder: Path, name: str, mfn_map: np.ndarray, dlib_map: np.ndarray, threshold: float) -> Path:
    """A query model whose embedding of a face is unit(m @ mfn_map + d @ dlib_map), exactly what its
    ensemble's mean of transformed gallery embeddings is: a perfect asymmetric pair."""
    shas = {MFN: load_manifest("mobilefacenet").sha256, DLIB: load_manifest("dlib-resnet-onnx").sha256}
    return write_ensemble(folder, name, {MFN: mfn_map, DLIB: dlib_map}, threshold=threshold, gallery_sha256=shas,
                          match_threshold=0.65)


def query_observation(model_id: str, vector: np.ndarray):  # noqa: ANN201
    from facelink.runtime.embeddings import pack_embedding
    from facelink.v1 import common_pb2, recognition_pb2

    data, scale = pack_embedding(unit(vector), "int8")
    assert len(data) == QUERY_DIM  # 128 bytes on the wire
    embedding = common_pb2.Embedding(model_id=model_id, dtype=common_pb2.DTYPE_INT8, dim=QUERY_DIM, scale=scale, data=data)
    return recognition_pb2.FaceObservation(camera_id="weak-board", embedding=embedding)


@needs_shared
@needs_gallery_models
def test_query_embeddings_match_the_derived_gallery_and_uncertain_pictures_are_dropped(
    server_factory, channel_to, faces, tmp_path: Path
) -> None:
    from facelink.v1 import gallery_pb2_grpc, recognition_pb2, recognition_pb2_grpc

    w = rotation(0)
    uncertainty = {name: 1 - float(faces[name, 1][0] @ unit(faces[name, 1][1] @ w)) for name in ENROLLED}
    ranked = sorted(ENROLLED, key=uncertainty.get)
    threshold = (uncertainty[ranked[-1]] + uncertainty[ranked[-2]]) / 2  # drops exactly the most uncertain
    ensemble = query_ensemble(tmp_path / "e", "synthetic", np.eye(QUERY_DIM), w, threshold)
    # The synthetic ensemble maps MobileFaceNet and dlib: pinned, whatever `auto` would add besides.
    server = server_factory(ensembles=(str(ensemble),), rejection_action="drop", gallery_models=("dlib-resnet-onnx",))
    channel = channel_to(server.address)

    caps = recognition_pb2_grpc.RecognitionStub(channel).GetCapabilities(recognition_pb2.GetCapabilitiesRequest())
    assert [(m.model_id, m.role, m.embedding_dim) for m in caps.models] == [
        (MFN, "recognizer", 128), (DLIB, "recognizer", 128), ("synthetic@1", "query", QUERY_DIM)]
    assert caps.models[2].sha256 == "ab" * 32 and caps.models[1].sha256 == load_manifest("dlib-resnet-onnx").sha256

    gallery = gallery_pb2_grpc.GalleryStub(channel)
    for name in ENROLLED:
        reply = gallery.Enroll(enroll_request(name), timeout=60)
        assert (reply.templates_added, reply.templates_total) == (1, 1)
        records = server.engine.gallery.templates_of(name)
        assert [r.model_id for r in records] == [MFN, DLIB, "synthetic@1"] and len({r.picture for r in records}) == 1
        assert records[2].uncertainty == pytest.approx(uncertainty[name], abs=2e-3)
        assert records[2].status == ("dropped" if name == ranked[-1] else "ok")
    assert "dropped" in server.engine.gallery.templates_of(ranked[-1])[2].reason

    stream = Stream(channel)
    for name in ENROLLED:
        m, d = faces[name, 2]  # another picture of the person, embedded "on the device"
        result = stream.send(query_observation("synthetic@1", m + d @ w))
        assert result.model_id == "synthetic@1" and result.threshold == pytest.approx(0.65)
        if name == ranked[-1]:
            assert result.identity != name  # its only query-model template was dropped
        else:
            assert result.decision == recognition_pb2.DECISION_MATCH and result.identity == name, result
    # The dropped picture still serves the gallery models themselves (symmetric matching).
    symmetric = query_observation(MFN, faces[ranked[-1], 2][0])
    assert stream.send(symmetric).identity == ranked[-1]
    refused = stream.send(query_observation("someone-elses-model@3", faces[ranked[0], 2][0]))
    assert refused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert all(model in refused.error.message for model in (MFN, DLIB, "synthetic@1"))
    stream.close()


@needs_shared
@needs_gallery_models
def test_a_new_query_model_is_served_from_stored_embeddings_without_reading_a_picture(
    server_factory, channel_to, faces, engine_parts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from facelink.runtime import recognition
    from facelink.v1 import gallery_pb2_grpc, recognition_pb2

    first = query_ensemble(tmp_path / "e", "first", np.eye(QUERY_DIM), rotation(0), threshold=2.0)
    server = server_factory(gallery_dir=tmp_path / "g", ensembles=(str(first),))
    gallery = gallery_pb2_grpc.GalleryStub(channel_to(server.address))
    for name in ENROLLED:
        gallery.Enroll(enroll_request(name), timeout=60)
    server.stop()

    def no_pictures(*args: object, **kwargs: object) -> None:
        raise AssertionError("a picture was decoded, detected or embedded while registering a query model")

    monkeypatch.setattr("facelink.cloud.service.decode_image", no_pictures)
    monkeypatch.setattr(type(engine_parts[1]), "detect", no_pictures)
    monkeypatch.setattr(recognition._RecognizerBase, "embed_aligned", no_pictures)
    w = rotation(1)
    second = query_ensemble(tmp_path / "e", "second", w, np.eye(QUERY_DIM), threshold=2.0)
    server = server_factory(gallery_dir=tmp_path / "g", ensembles=(str(first), str(second)))

    stream = Stream(channel_to(server.address))
    for name in ENROLLED:
        assert [r.status for r in server.engine.gallery.templates_of(name) if r.model_id == "second@1"] == ["ok"]
        m, d = faces[name, 2]
        result = stream.send(query_observation("second@1", m @ w + d))
        assert result.decision == recognition_pb2.DECISION_MATCH and result.identity == name, result
    stream.close()


@needs_shared
def test_a_query_member_is_stored_at_enrollment_and_joins_mean_and_uncertainty(
    server_factory, channel_to, engine_parts, tmp_path: Path
) -> None:
    """The bundled query model as a member of its own ensemble (identity transform) beside the
    bundled MobileFaceNet member: its embedding of each enrolled picture is stored under
    `own_key`, and the derived template's uncertainty is 1 - cos(T(m), q) of the picture."""
    from facelink.edge.pipeline import EdgePipeline
    from facelink.edge.sources import Frame
    from facelink.config import DEFAULT_QUERY_MODEL, EdgeConfig
    from facelink.runtime.asymmetric import bundled_ensembles, own_key
    from facelink.runtime.codecs import decode_image
    from facelink.runtime.detection import largest
    from facelink.runtime.recognition import create_recognizer
    from facelink.v1 import gallery_pb2_grpc, recognition_pb2

    query = create_recognizer(DEFAULT_QUERY_MODEL)
    query_id = query.manifest.model_id
    bundled = json.loads(bundled_ensembles()[DEFAULT_QUERY_MODEL].read_text())
    folder = bundled_ensembles()[DEFAULT_QUERY_MODEL].parent
    # MobileFaceNet's member as bundled: a transform file, or none (it joins through the identity).
    (spec,) = [dict(t, file=str(folder / t["file"]) if t.get("file") else None)
               for t in bundled["transforms"] if t["gallery_model"] == MFN]
    path = tmp_path / "member.json"
    path.write_text(json.dumps({**bundled, "name": "member", "transforms": [spec], "query_member": True, "member_weights": {},
                                "query_manifest": str(folder.parent / f"{DEFAULT_QUERY_MODEL}.json"),
                                "uncertainty_quantiles": {"0.1": 2.0}}))
    server = server_factory(ensembles=(str(path),))
    assert list(server.engine.members) == [own_key(query_id)]
    gallery = gallery_pb2_grpc.GalleryStub(channel_to(server.address))
    mfn = engine_parts[0]
    transform = GalleryEnsemble.load(path).transforms[MFN]
    for name in ENROLLED:
        gallery.Enroll(enroll_request(name), timeout=60)
        records = {r.model_id: r for r in server.engine.gallery.templates_of(name)}
        assert own_key(query_id) in records
        image = decode_image(lfw_image(name, 1).read_bytes())
        landmarks = largest(engine_parts[1].detect(image)).landmarks
        expected = 1 - float(transform(mfn.embed(image, landmarks))[0] @ query.embed(image, landmarks))
        assert records[query_id].uncertainty == pytest.approx(expected, abs=2e-3)

    edge = EdgePipeline(EdgeConfig(faces="central", payload="embedding"), detector=engine_parts[1], query=query)
    stream = Stream(channel_to(server.address))
    for name in ENROLLED:
        frame = Frame(decode_image(lfw_image(name, 2).read_bytes()), 0, 0, name)
        result = stream.send(edge.process(frame)[0].observation)
        assert result.decision == recognition_pb2.DECISION_MATCH and result.identity == name, result
    stream.close()


def test_the_query_members_own_embedding_is_a_member_where_it_is_stored(tmp_path: Path) -> None:
    from facelink.runtime.asymmetric import own_key

    path = write_ensemble(tmp_path / "e", "q", {"a@1": np.eye(DIM), "b@1": np.eye(DIM)}, threshold=0.3)
    path.write_text(json.dumps({**json.loads(path.read_text()), "query_member": True}))
    query = load_query_model(path)
    assert query.gallery_models == ("a@1", "b@1", own_key("q@1")) and query.ensemble.manifest.members == 3
    stored = pictures([1.0], 0)
    stored[own_key("q@1")] = bent(stored["a@1"][0], 0.7, 5)[None]
    with Gallery(tmp_path / "g") as gallery:
        gallery.enroll_pictures("alice", stored, [query])
        gallery.enroll_pictures("bob", pictures([1.0], 1), [query])  # enrolled without the query model's own
        (alice,) = [r for r in gallery.templates_of("alice") if r.model_id == "q@1"]
        (bob,) = [r for r in gallery.templates_of("bob") if r.model_id == "q@1"]
    assert alice.uncertainty == pytest.approx(1 - (1 + 0.7 + 0.7) / 3, abs=1e-5)  # pairwise cosines 1, 0.7, 0.7
    assert bob.uncertainty == pytest.approx(0.0, abs=1e-5) and bob.status == "ok"
