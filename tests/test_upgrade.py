"""Recogniser upgrades without re-enrollment: manifests, the gallery operation, the CLI, the bundled transform."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from facelink.cloud.gallery import Gallery
from facelink.cloud.upgrade import upgrade_gallery
from facelink.runtime.asymmetric import unit
from facelink.runtime.manifest import ManifestError, file_sha256, load_manifest
from facelink.runtime.upgrade import TRANSFORMED, bundled_upgrades, find_upgrade, load_upgrade

from facelink.config import shared_dir

from .support import SHARED_LFW, SHARED_MOBILEFACENET, lfw_image, read_rgb
from .test_asymmetric_runtime import ensemble_in

OLD, NEW = "oldrec@1", "newrec@1"
DIM = 8


def rotation_matrix(seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(DIM, DIM)))
    return q


@pytest.fixture
def upgrade_path(tmp_path: Path) -> Path:
    folder = tmp_path / "upgrade"
    folder.mkdir()
    return ensemble_in(folder, {OLD: rotation_matrix()}, name="old-to-new", query_model=NEW)


def vectors(n: int, seed: int) -> np.ndarray:
    return unit(np.random.default_rng(seed).normal(size=(n, DIM)))


def b_templates(gallery: Gallery, name: str) -> list:
    return [t for t in gallery.templates_of(name) if t.model_id == NEW]


def test_load_upgrade_reads_a_one_model_map(upgrade_path: Path) -> None:
    upgrade = load_upgrade(upgrade_path)
    assert (upgrade.source_model, upgrade.target_model) == (OLD, NEW)
    assert upgrade.reason().startswith(TRANSFORMED) and upgrade.measured == {}
    old = vectors(3, 1)
    expected = unit(old @ rotation_matrix())
    np.testing.assert_allclose(upgrade.ensemble.transform({OLD: old}).vectors, expected, atol=1e-5)


def test_load_upgrade_refuses_a_query_member_a_self_map_and_unknown_names(tmp_path: Path) -> None:
    (tmp_path / "member").mkdir()
    (tmp_path / "self").mkdir()
    with pytest.raises(ManifestError, match="only those"):
        load_upgrade(ensemble_in(tmp_path / "member", {"a@1": np.eye(DIM)}, query_member=True))
    with pytest.raises(ManifestError, match="onto itself"):
        load_upgrade(ensemble_in(tmp_path / "self", {"a@1": np.eye(DIM), "q@1": np.eye(DIM)}))
    with pytest.raises(ManifestError, match="no upgrade named"):
        load_upgrade("no-such-upgrade")


OTHER = "otherrec@1"


def test_a_multi_source_upgrade_averages_every_stored_source_and_derives_a_picture_from_what_it_holds(
        tmp_path: Path) -> None:
    """Two old models (say MobileFaceNet and dlib) mapped into B's space, weighted 0.75/0.25: a picture
    holding both gets the weighted mean, one holding only one source gets that source's map."""
    folder = tmp_path / "multi"
    folder.mkdir()
    ra, rb = rotation_matrix(0), rotation_matrix(1)
    path = ensemble_in(folder, {OLD: ra, OTHER: rb}, name="multi", query_model=NEW,
                       member_weights={OLD: 0.75, OTHER: 0.25})
    upgrade = load_upgrade(path)
    assert upgrade.source_model == OLD and upgrade.source_models == (OLD, OTHER)
    assert OLD in upgrade.reason() and OTHER in upgrade.reason()
    old, other = vectors(3, 8), vectors(3, 9)
    with Gallery(tmp_path / "g") as gallery:
        gallery.enroll_pictures("Ada", {OLD: old[:1], OTHER: other[:1]})
        gallery.enroll_pictures("Bob", {OLD: old[1:2]})          # enrolled before the second source existed
        gallery.enroll_pictures("Cy", {OTHER: other[2:3]})
        gallery.enroll_pictures("Dee", {OLD: old[2:3], NEW: vectors(1, 10)})  # native B: kept
        report = upgrade_gallery(gallery, upgrade)
        assert (report.transformed, report.native) == (3, 1) and report.source_models == (OLD, OTHER)
        both = unit(0.75 * unit(old[:1] @ ra) + 0.25 * unit(other[:1] @ rb))
        found = gallery.search(NEW, np.vstack([both, unit(old[1:2] @ ra), unit(other[2:3] @ rb)]), k=1)
        assert [m[0].identity for m in found] == ["Ada", "Bob", "Cy"]
        assert all(m[0].score == pytest.approx(1.0, abs=1e-5) for m in found)
        assert [t.reason for t in b_templates(gallery, "Dee")] == [None]
        # Again: every transformed template is re-derived (from both sources where both are stored).
        again = upgrade_gallery(gallery, upgrade)
        assert (again.transformed, again.native) == (3, 1)


def test_upgrade_transforms_stored_templates_and_keeps_native_ones(upgrade_path: Path, tmp_path: Path) -> None:
    upgrade = load_upgrade(upgrade_path)
    old, native = vectors(4, 2), vectors(1, 3)
    with Gallery(tmp_path / "g") as gallery:
        gallery.enroll_pictures("Ada", {OLD: old[:2]})
        gallery.enroll_pictures("Bob", {OLD: old[2:3]})
        gallery.enroll_pictures("Cy", {OLD: old[3:4], NEW: native})  # enrolled after B was served: native
        report = upgrade_gallery(gallery, upgrade)
        assert (report.transformed, report.native, report.identities) == (3, 1, 3)
        assert all(t.reason.startswith(TRANSFORMED) and t.status == "ok" for t in b_templates(gallery, "Ada"))
        assert [t.reason for t in b_templates(gallery, "Cy")] == [None]
        # B probes find the transformed templates, and the native one exactly as it was stored.
        found = gallery.search(NEW, np.vstack([unit(old[2:3] @ rotation_matrix()), native]), k=1)
        assert [m[0].identity for m in found] == ["Bob", "Cy"]
        assert found[0][0].score == pytest.approx(1.0, abs=1e-5) and found[1][0].score == pytest.approx(1.0, abs=1e-5)

        # Again (a retrained transform, say): transformed ones are re-derived, never taken for native.
        again = upgrade_gallery(gallery, upgrade)
        assert (again.transformed, again.native) == (3, 1)
        assert len(b_templates(gallery, "Ada")) == 2 and all(t.reason for t in b_templates(gallery, "Ada"))

        # Re-enrolling with replace: native templates only, and the next upgrade keeps them.
        gallery.enroll_pictures("Ada", {NEW: vectors(1, 4)}, replace=True)
        assert [t.reason for t in b_templates(gallery, "Ada")] == [None]
        third = upgrade_gallery(gallery, upgrade)
        assert (third.transformed, third.native) == (1, 2)
        # An erasure still takes every template, transformed ones included.
        gallery.remove("Bob")
        assert "Bob" not in gallery


def test_find_upgrade_prefers_the_upgrade_reading_the_most_stored_sources(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    folders = {name: tmp_path / name for name in ("single", "multi")}
    for folder in folders.values():
        folder.mkdir()
    single = ensemble_in(folders["single"], {OLD: rotation_matrix()}, name="single", query_model=NEW)
    multi = ensemble_in(folders["multi"], {OLD: rotation_matrix(), OTHER: rotation_matrix(1)}, name="multi", query_model=NEW)
    monkeypatch.setattr("facelink.runtime.upgrade.bundled_upgrades", lambda: {"multi": multi, "single": single})
    to = new_model_manifest(tmp_path)
    assert find_upgrade(to, {OLD, OTHER}).source_models == (OLD, OTHER)
    assert find_upgrade(to, {OLD}).source_models == (OLD,)  # not the multi-source one on one member
    with pytest.raises(ManifestError, match="no bundled upgrade into"):
        find_upgrade(to, {OTHER})  # the primary source must be stored


def test_find_upgrade_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no bundled upgrade into"):
        find_upgrade("mobilefacenet", {"nothing@1"})


def new_model_manifest(tmp_path: Path) -> Path:
    data = json.loads(load_manifest("mobilefacenet").origin.read_text())
    data.update(name="newrec", version="1")
    data["embedding"]["dim"] = DIM
    path = tmp_path / "newrec.json"
    path.write_text(json.dumps(data))
    return path


def test_cli_upgrade_dry_run_then_upgrade_and_audit(upgrade_path: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    from facelink.cli import main

    gallery_dir = tmp_path / "g"
    with Gallery(gallery_dir) as gallery:
        gallery.enroll_pictures("Ada", {OLD: vectors(2, 5)})
    to = str(new_model_manifest(tmp_path))
    common = ["cloud", "upgrade", "--gallery", str(gallery_dir), "--to", to, "--transform", str(upgrade_path)]
    assert main([*common, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "oldrec@1 -> newrec@1" in out and "dry run" in out and "none recorded" in out
    with Gallery(gallery_dir) as gallery:
        assert b_templates(gallery, "Ada") == []
    assert main(common) == 0
    out = capsys.readouterr().out
    assert "2 newrec@1 templates transformed from oldrec@1, 0 native" in out and "--recognizer" in out
    with Gallery(gallery_dir) as gallery:
        assert len(b_templates(gallery, "Ada")) == 2
    intent, record = (json.loads(line) for line in (gallery_dir / "audit.jsonl").read_text().splitlines()[-2:])
    assert (intent["call"], intent["outcome"]) == ("admin:upgrade", "started")  # written before the change
    assert record["call"] == "admin:upgrade" and record["outcome"] == "ok"
    assert record["counts"] == {"transformed": 2, "native": 0}
    assert record["identity"] is None  # an upgrade concerns everyone; no name is written


def test_cli_upgrade_refuses_a_missing_gallery_and_a_wrong_target(upgrade_path: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    from facelink.cli import main

    assert main(["cloud", "upgrade", "--gallery", str(tmp_path / "none"), "--to", "mobilefacenet"]) == 2
    assert "no gallery" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()  # nothing created
    with Gallery(tmp_path / "g") as gallery:
        gallery.enroll_pictures("Ada", {OLD: vectors(1, 6)})
    assert main(["cloud", "upgrade", "--gallery", str(tmp_path / "g"), "--to", "mobilefacenet",
                 "--transform", str(upgrade_path)]) == 2
    assert "maps into newrec@1" in capsys.readouterr().err


@pytest.mark.skipif("mobilefacenet-to-edgeface-xs" not in bundled_upgrades(), reason="no bundled upgrade transform")
def test_the_bundled_upgrade_maps_mobilefacenet_into_edgeface_and_says_what_it_costs() -> None:
    upgrade = load_upgrade("mobilefacenet-to-edgeface-xs")
    assert (upgrade.source_model, upgrade.target_model) == (load_manifest("mobilefacenet").model_id,
                                                            load_manifest("edgeface-xs").model_id)
    spec = upgrade.manifest.transforms[0]
    assert spec.sha256 == file_sha256(upgrade.path.parent / spec.file)
    assert (spec.input_dim, spec.output_dim) == (128, 512)
    measured = upgrade.measured
    assert {"rank1_native", "rank1_transformed", "rank1_ratio", "dir_native", "dir_transformed"} <= set(measured)
    out = upgrade.ensemble.transform({spec.gallery_model: vectors(2, 7)[:, :1].repeat(128, axis=1)}).vectors
    assert out.shape == (2, 512) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)


@pytest.mark.skipif("mobilefacenet-dlib-to-edgeface-xs" not in bundled_upgrades(), reason="no bundled multi-source upgrade")
def test_the_bundled_multi_source_upgrade_reads_mobilefacenet_and_dlib_and_is_chosen_where_both_are_stored() -> None:
    mobilefacenet, dlib = load_manifest("mobilefacenet").model_id, load_manifest("dlib-resnet-onnx").model_id
    upgrade = load_upgrade("mobilefacenet-dlib-to-edgeface-xs")
    assert upgrade.source_models == (mobilefacenet, dlib) and upgrade.manifest.member_weights
    assert find_upgrade("edgeface-xs", {mobilefacenet, dlib}).path == upgrade.path
    assert find_upgrade("edgeface-xs", {mobilefacenet}).source_models == (mobilefacenet,)
    assert {"rank1_native", "rank1_transformed", "rank1_ratio"} <= set(upgrade.measured)
    both = {mobilefacenet: vectors(2, 11)[:, :1].repeat(128, axis=1), dlib: vectors(2, 12)[:, :1].repeat(128, axis=1)}
    for given in (both, {dlib: both[dlib]}):  # a picture lacking MobileFaceNet is derived from dlib alone
        out = upgrade.ensemble.transform(given).vectors
        assert out.shape == (2, 512) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)


@pytest.mark.shared
@pytest.mark.skipif("mobilefacenet-to-edgeface-xs" not in bundled_upgrades(), reason="no bundled upgrade transform")
@pytest.mark.skipif(not (SHARED_LFW.is_dir() and SHARED_MOBILEFACENET.is_file()
                         and (shared_dir() / "models" / "edgeface" / "edgeface_xs_fp32.onnx").is_file()),
                    reason="needs LFW, MobileFaceNet and EdgeFace from the shared folder")
def test_a_mobilefacenet_gallery_upgraded_is_recognised_by_an_edgeface_server(tmp_path: Path) -> None:
    """Enrolled under MobileFaceNet, upgraded with the bundled transform, served with EdgeFace as the
    primary: second pictures match, and a new enrollment is native."""
    from facelink.cloud.engine import Decision, EnrollFace, RecognitionEngine

    from facelink.config import CloudConfig

    people = ("Colin_Powell", "Serena_Williams", "Tony_Blair")
    before = RecognitionEngine(CloudConfig(recognizer="mobilefacenet", gallery_models=(), ensembles=()), Gallery(tmp_path / "g"))
    for name in people:
        before.enroll(name, [EnrollFace(read_rgb(lfw_image(name, 1)), None)])
    before.gallery.close()
    with Gallery(tmp_path / "g") as gallery:
        report = upgrade_gallery(gallery, find_upgrade("edgeface-xs", {load_manifest("mobilefacenet").model_id}))
    assert (report.transformed, report.native) == (3, 0)
    after = RecognitionEngine(CloudConfig(recognizer="edgeface-xs", gallery_models=(), ensembles=()), Gallery(tmp_path / "g"))
    for name in people:
        probe = read_rgb(lfw_image(name, 2))
        found = after.identify(probe, after.locate_face(probe, None, "probe")[0])
        assert (found.identity, found.decision) == (name, Decision.MATCH), found
    after.enroll("Gray_Davis", [EnrollFace(read_rgb(lfw_image("Gray_Davis", 1)), None)])
    assert [t.reason for t in after.gallery.templates_of("Gray_Davis")] == [None]  # native, edgeface only
    after.gallery.close()
