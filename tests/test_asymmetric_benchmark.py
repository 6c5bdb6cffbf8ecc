"""benchmarks/asymmetric.py and open_set.py: the 1:N metrics and the rejection curve on synthetic embeddings, the
protocols' determinism, and tiny end-to-end runs on real faces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facelink.benchmarks import asymmetric as a
from facelink.benchmarks import open_set as openset
from facelink.config import shared_dir

SHARED_LFW = shared_dir() / "data" / "lfw"
SHARED_MODELS = shared_dir() / "models"
needs_shared = pytest.mark.skipif(
    not (SHARED_LFW.is_dir() and (SHARED_MODELS / "mobilefacenet-ms1m").is_dir() and (SHARED_MODELS / "yunet").is_dir()),
    reason=f"needs LFW, MobileFaceNet and YuNet from the shared folder ({shared_dir()}); set FACELINK_SHARED",
)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --- the 1:N protocol --------------------------------------------------------------------------------
def test_open_set_protocol_enrolls_the_first_image_by_name_and_is_order_independent() -> None:
    names = ["b/b_2.jpg", "a/a_1.jpg", "c/c_1.jpg", "b/b_1.jpg", "a/a_3.jpg", "a/a_2.jpg", "d/d_1.jpg", "d/d_2.jpg"]
    people = [n.split("/")[0] for n in names]
    o = openset.open_set_protocol(names, people, never_enrolled={"d"})
    pick = lambda idx: [names[i] for i in idx]  # noqa: E731
    assert o.enrolled == ("a", "b")
    assert pick(o.gallery) == ["a/a_1.jpg", "b/b_1.jpg"]
    assert pick(o.genuine) == ["a/a_2.jpg", "a/a_3.jpg", "b/b_2.jpg"] and o.target.tolist() == [0, 0, 1]
    assert sorted(pick(o.distractors)) == ["c/c_1.jpg", "d/d_1.jpg", "d/d_2.jpg"]  # one picture, or never enrolled
    assert o.summary() == {"gallery": 2, "genuine_probes": 3, "distractors": 3}
    # Any input order gives the same protocol, image for image.
    order = np.random.default_rng(0).permutation(len(names))
    shuffled = openset.open_set_protocol([names[i] for i in order], [people[i] for i in order], never_enrolled={"d"})
    assert [names[order[i]] for i in shuffled.gallery] == pick(o.gallery)
    assert [names[order[i]] for i in shuffled.genuine] == pick(o.genuine)
    assert sorted(names[order[i]] for i in shuffled.distractors) == sorted(pick(o.distractors))
    with pytest.raises(ValueError):
        openset.open_set_protocol(["x", "x"], ["p", "p"])


def test_celeba_never_enrolled_half_is_deterministic() -> None:
    ids = [f"celeba:{i}" for i in range(32)]
    half = a.never_enrolled_half(ids)
    assert len(half) == 16 and half == a.never_enrolled_half(list(reversed(ids)))
    assert half != a.never_enrolled_half(ids, seed=1)


def test_held_out_identities_intersect_the_split_files(tmp_path: Path) -> None:
    q, c = tmp_path / "q.json", tmp_path / "c.json"
    q.write_text(json.dumps({"val_identities": ["celeba:1", "celeba:2", "celeba:3"]}))
    c.write_text(json.dumps({"val_identities": ["celeba:2", "celeba:3", "celeba:4"]}))
    held, sources = a.held_out_identities([q, c])
    assert held == ["celeba:2", "celeba:3"] and [s["present"] for s in sources] == [True, True]
    held, sources = a.held_out_identities([q, tmp_path / "absent.json"])  # the codec's split is optional
    assert held == ["celeba:1", "celeba:2", "celeba:3"] and not sources[1]["present"]
    with pytest.raises(FileNotFoundError):  # the query run's is not
        a.held_out_identities([tmp_path / "absent.json", c])


def test_the_committed_celeba_split_is_what_the_training_runs_hold_out() -> None:
    """benchmarks/splits/celeba_held_out.json stands in for the runs' split.json files: where runs
    with the default split settings exist on this machine, each holds out exactly those identities."""
    from facelink.config import cache_dir

    held, sources = a.held_out_identities(list(a.DEFAULT_SPLITS))
    assert len(held) == 32 and all(i.startswith("celeba:") for i in held) and sources[0]["present"]
    for split in sorted((cache_dir() / "runs").glob("*/split.json")):
        config = json.loads((split.parent / "config.json").read_text()) if (split.parent / "config.json").is_file() else {}
        if config.get("seed") == 0 and config.get("val_identities") == 32:
            assert sorted(json.loads(split.read_text())["val_identities"]) == held, split


# --- 1:N metrics -------------------------------------------------------------------------------------
def test_rank1_is_100_percent_when_probes_equal_their_gallery_embedding() -> None:
    rng = np.random.default_rng(0)
    gallery = unit(rng.normal(size=(50, 16)))
    target = rng.integers(0, 50, 200)
    scores = openset.cosine_matrix(gallery[target], gallery)
    assert openset.rank1(scores, target) == 1.0
    assert openset.rank1(scores, (target + 1) % 50) == 0.0


def test_a_tie_with_another_gallery_entry_is_an_error() -> None:
    scores = np.array([[0.8, 0.8, 0.1], [0.9, 0.2, 0.3]])
    correct, true = openset.identification(scores, np.array([0, 0]))
    assert correct.tolist() == [False, True] and true.tolist() == [0.8, 0.9]


def test_dir_at_far_hand_computed() -> None:
    # 100 distractors whose best gallery scores are 0.000 .. 0.990: FAR 1% lets one pass (0.99),
    # so the threshold sits just above the second best, 0.98.
    distractors = np.zeros((100, 3))
    distractors[:, 1] = np.arange(100) / 100
    genuine = np.array([
        [0.985, 0.1, 0.2],   # right, above the threshold         -> detected and identified
        [0.1, 0.97, 0.2],    # right, below the threshold         -> missed
        [0.991, 0.995, 0.0],  # wrong entry on top, above          -> not identified
        [0.2, 0.3, 0.999],   # right, above                       -> detected and identified
    ])
    target = np.array([0, 1, 0, 2])
    rate, threshold = openset.dir_at_far(genuine, target, distractors, 0.01)
    assert 0.98 < threshold <= 0.985
    assert rate == 0.5
    assert openset.dir_at_far(genuine, target, distractors, 0.0)[0] == 0.25  # nothing above 0.99: only 0.999
    assert openset.dir_at_far(genuine, target, distractors, 1.0)[0] == 0.75  # everything passes: rank-1


# --- selective risk ----------------------------------------------------------------------------------
def test_selective_risk_hand_computed() -> None:
    # 3 gallery entries; probes 0, 1 of entry 0, probe 2 of entry 1, probe 3 of entry 2.
    scores = np.array([
        [0.9, 0.5, 0.1],   # right
        [0.4, 0.6, 0.1],   # wrong: confused with entry 1
        [0.2, 0.7, 0.8],   # wrong: confused with entry 2
        [0.1, 0.2, 0.3],   # right
    ])
    target = np.array([0, 0, 1, 2])
    assert openset.selective_risk(scores, target, np.ones(3, bool)) == (0.5, 4)
    # Drop entry 2: probe 3 no longer counts, probe 2 is now right; probe 1 still wrong.
    assert openset.selective_risk(scores, target, np.array([True, True, False])) == (pytest.approx(1 / 3), 3)
    # Drop entry 1: probes 0, 1 right now, probe 2 gone, probe 3 right.
    assert openset.selective_risk(scores, target, np.array([True, False, True])) == (0.0, 3)
    error, n = openset.selective_risk(scores, target, np.zeros(3, bool))
    assert n == 0 and np.isnan(error)
    curve = openset.RiskCoverage(scores, target, np.zeros((0, 3)), threshold=0.5)
    rng = np.random.default_rng(0)
    for _ in range(20):  # the fast path agrees with the plain definition under any rejection
        enrolled = rng.random(3) < 0.7
        expected, n = openset.selective_risk(scores, target, enrolled)
        point = curve.at(enrolled)
        assert point["probes"] == n and (np.isnan(expected) and np.isnan(point["risk"]) or point["risk"] == pytest.approx(expected))


def test_rejecting_the_most_uncertain_gallery_entries_removes_their_errors() -> None:
    rng = np.random.default_rng(3)
    g, per = 40, 5
    gallery = unit(rng.normal(size=(g, 32)))
    target = np.repeat(np.arange(g), per)
    probes = unit(gallery[target] + 0.05 * rng.normal(size=(g * per, 32)))
    bad = np.arange(4)  # the 4 most uncertain entries (10%): each probe of theirs matches entry 39 better
    probes[np.isin(target, bad)] = unit(gallery[39] + 0.01 * rng.normal(size=(4 * per, 32)))
    scores = openset.cosine_matrix(probes, gallery)
    distractors = openset.cosine_matrix(unit(rng.normal(size=(100, 32))), gallery)
    uncertainty = np.where(np.isin(np.arange(g), bad), 0.9, rng.uniform(0, 0.5, g))
    curve = openset.RiskCoverage(scores, target, distractors, openset.dir_threshold(distractors, 0.01))
    fractions = openset.rejection_fractions(0.3, 0.05)
    points = openset.risk_coverage(curve, uncertainty, fractions)
    assert [p["rejected"] for p in points] == [int(np.floor(f * g + 1e-9)) for f in fractions]
    assert points[0]["risk"] == pytest.approx(0.1) and points[0]["probes"] == g * per
    at10 = points[2]
    assert at10["fraction"] == 0.1 and at10["rejected"] == 4 and at10["risk"] == 0.0 and at10["probes"] == 36 * per
    assert openset.relative_reduction(points[0]["risk"], at10["risk"]) == 1.0
    control = openset.random_risk_coverage(curve, g, fractions, repeats=30)
    assert control["risk_mean"][0] == pytest.approx(0.1)
    assert 0.05 < control["risk_mean"][2] < 0.15  # random rejection: about the same error
    assert np.isnan(openset.relative_reduction(0.0, 0.0))


def test_fractions_cover_0_to_30_percent() -> None:
    f = openset.rejection_fractions()
    assert f[0] == 0 and f[-1] == pytest.approx(0.3) and len(f) == 31 and 0.1 in f.tolist()


# --- end to end ----------------------------------------------------------------------------------------
TINY = ["--sets", "lfw", "--limit-pairs", "1", "--limit-people", "6", "--timing-faces", "2", "--random-repeats", "2"]


def _check_report(out: Path, plot: Path, rows: int) -> dict:
    report = json.loads(out.read_text())
    assert report["command"].startswith("facelink bench asymmetric")
    assert {"arch", "cores", "python", "load_average_start"} <= set(report["machine"])
    lfw = report["sets"]["lfw"]
    assert lfw["pairs"] == 20 and lfw["open_set"]["gallery"] == 6 and lfw["open_set"]["distractors"] == 6
    assert lfw["protocol"]["one_to_n_training_pictures"] == 0
    assert len(lfw["rows"]) == rows
    kinds = {r["kind"] for r in lfw["rows"]}
    assert {"symmetric", "asymmetric", "ensemble", "distillation"} <= kinds <= {
        "symmetric", "asymmetric", "ensemble", "distillation", "sub-ensemble"}
    for r in lfw["rows"]:
        assert 0 <= r["rank1"] <= 100 and 0 <= r["dir_at_far"] <= 100 and "accuracy_mean" in r["verification"]
    assert len(lfw["rejection"]["uncertainty"]) == 31 and plot.is_file()
    for cost in report["costs"].values():
        assert cost["macs_per_face"] > 0 and cost["params"] > 0
    return report


def linear_onnx(path: Path, matrix: np.ndarray) -> Path:
    onnx = pytest.importorskip("onnx", reason="writing a synthetic transform needs the onnx package")
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["embedding", "w"], ["transformed"])], "linear",
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", matrix.shape[0]])],
        [helper.make_tensor_value_info("transformed", TensorProto.FLOAT, ["batch", matrix.shape[1]])],
        [numpy_helper.from_array(matrix.astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.shared
@needs_shared
def test_end_to_end_tiny_with_a_synthetic_ensemble(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    """The whole benchmark without a trained ensemble: MobileFaceNet as the 'query model', and as two
    gallery models (itself and a renamed copy) with identity transforms."""
    from facelink.runtime.manifest import file_sha256, load_manifest

    monkeypatch.setenv("FACELINK_CACHE", str(tmp_path / "cache"))
    source = load_manifest("mobilefacenet")
    copy = json.loads(source.origin.read_text())
    copy["name"], copy["file"] = "mfn-copy", str(source.weights())
    (tmp_path / "mfn-copy.json").write_text(json.dumps(copy))
    eye = np.eye(128)
    specs = [{"gallery_model": model, "file": linear_onnx(tmp_path / f"t{i}.onnx", eye).name,
              "sha256": file_sha256(tmp_path / f"t{i}.onnx"), "input_dim": 128, "output_dim": 128}
             for i, model in enumerate((source.model_id, f"mfn-copy@{source.version}"))]
    (tmp_path / "ens.json").write_text(json.dumps({"name": "ens", "query_model": source.model_id,
                                                   "query_manifest": "mobilefacenet", "transforms": specs}))
    out, plot = tmp_path / "a.json", tmp_path / "a.png"
    args = [*TINY, "--ensemble", str(tmp_path / "ens.json"), "--gallery", "mobilefacenet",
            "--gallery", str(tmp_path / "mfn-copy.json"), "--json", str(out), "--plot", str(plot)]
    assert a.main(args) == 0
    report = _check_report(out, plot, rows=7)
    rows = {r["row"]: r for r in report["sets"]["lfw"]["rows"]}
    # Identity transforms of the query model's own embeddings: every asymmetric row IS the symmetric one.
    reference = rows["query symmetric"]
    for label in ("query vs ensemble", f"query vs T({source.model_id})",
                  f"distillation baseline: query vs {source.model_id} (no transform)"):
        assert rows[label]["rank1"] == reference["rank1"]
        assert rows[label]["verification"]["accuracy_mean"] == pytest.approx(reference["verification"]["accuracy_mean"])
    assert report["costs"][source.model_id]["passes_per_face"] == 2  # MobileFaceNet's flip pass
    assert "| query vs ensemble" in capsys.readouterr().out
    assert report["embedding_settings_computed"] == 2

    # Again through the CLI: every embedding comes from the cache, same numbers.
    from facelink.cli import main as cli_main

    assert cli_main(["bench", "asymmetric", "--", *args]) == 0
    again = json.loads(out.read_text())
    assert again["embedding_settings_computed"] == 0
    assert [r["rank1"] for r in again["sets"]["lfw"]["rows"]] == [r["rank1"] for r in report["sets"]["lfw"]["rows"]]


@pytest.mark.shared
@needs_shared
def test_end_to_end_tiny_with_the_bundled_query_ensemble(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from facelink.config import BackendConfig, cache_dir
    from facelink.runtime.manifest import ManifestError

    try:
        a.load_models("auto", None, [], a.DEFAULT_TEACHER, BackendConfig())
    except (ManifestError, FileNotFoundError) as error:
        pytest.skip(f"no usable bundled query ensemble: {error}")
    # A fresh embedding cache, but the converted models (dlib's ONNX) where they are.
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(cache_dir() / "models", target_is_directory=True)
    monkeypatch.setenv("FACELINK_CACHE", str(tmp_path / "cache"))
    out, plot = tmp_path / "a.json", tmp_path / "a.png"
    assert a.main([*TINY, "--json", str(out), "--plot", str(plot)]) == 0
    from facelink.runtime.asymmetric import bundled_ensembles

    # An ensemble with fitted member weights is also measured with equal ones: one more row; a
    # teacher joining untransformed (`--identity`) has no "query vs T(teacher)" row: one fewer.
    manifest = json.loads(bundled_ensembles()[a.DEFAULT_ENSEMBLE].read_text())
    weighted = bool(manifest.get("member_weights"))
    teacher = json.loads(out.read_text())["teacher"]
    raw_teacher = any(t["gallery_model"] == teacher and not t.get("file") for t in manifest["transforms"])
    members = len(manifest["transforms"]) + bool(manifest.get("query_member"))
    sub_ensembles = 2 ** members - members - 2  # every subset of 2 .. members - 1 of them
    # query symmetric, ensemble, distillation baseline; per gallery model a symmetric and an asymmetric row.
    rows = 3 + 2 * len(manifest["transforms"]) + weighted - raw_teacher + sub_ensembles
    report = _check_report(out, plot, rows=rows)
    query, teacher = report["costs"][report["query"]["model"]], report["costs"][report["teacher"]]
    assert query["macs_per_face"] < teacher["macs_per_face"]
