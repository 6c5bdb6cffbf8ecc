"""benchmarks/verification.py: the LFW metrics on synthetic scores, and one tiny real run."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from facelink.benchmarks import verification as v
from facelink.config import shared_dir
from facelink.datasets import Pair

SHARED_LFW = shared_dir() / "data" / "lfw"
SHARED_MODELS = shared_dir() / "models"


# --- metrics ---------------------------------------------------------------------------------------
def test_perfectly_separable_scores_give_100_percent() -> None:
    rng = np.random.default_rng(0)
    folds = np.repeat(np.arange(10), 20)
    same = np.tile(np.r_[np.ones(10, bool), np.zeros(10, bool)], 10)
    scores = np.where(same, rng.uniform(0.6, 0.9, same.size), rng.uniform(0.1, 0.4, same.size))
    accs, thresholds = v.fold_accuracy(scores, same, folds)
    assert accs.shape == thresholds.shape == (10,)
    assert np.all(accs == 1.0)
    assert np.all((thresholds > 0.4) & (thresholds < 0.6))  # in the gap between the two classes
    assert v.tar_at_far(scores, same, 1e-3) == 1.0
    assert v.eer(scores, same) == 0.0


def test_fold_accuracy_hand_computed() -> None:
    # fold 0: different 0.1 0.2, same 0.6 0.9;  fold 1: different 0.3 0.55, same 0.5 0.8.
    scores = np.array([0.1, 0.2, 0.6, 0.9, 0.3, 0.5, 0.55, 0.8])
    same = np.array([0, 0, 1, 1, 0, 1, 0, 1], dtype=bool)
    folds = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    accs, thresholds = v.fold_accuracy(scores, same, folds)
    # Fold 0 is tested with fold 1's threshold: cuts at 0.4 and 0.675 both get 3/4 right there,
    # the lower wins; all of fold 0 is then right. Fold 1 is tested with fold 0's threshold
    # (0.4, the middle of the gap 0.2..0.6): 0.55 (different) is accepted, 3/4 right.
    np.testing.assert_allclose(thresholds, [0.4, 0.4])
    np.testing.assert_allclose(accs, [1.0, 0.75])


def test_best_threshold_extremes_and_ties() -> None:
    t, acc = v.best_threshold(np.array([0.5, 0.5, 0.5]), np.array([True, True, True]))
    assert acc == 1.0 and t <= 0.5                       # accept everything
    t, acc = v.best_threshold(np.array([0.2, 0.3]), np.array([False, False]))
    assert acc == 1.0 and t > 0.3                        # reject everything
    # Equal scores with different labels cannot be split: 2 of 3 at best.
    t, acc = v.best_threshold(np.array([0.1, 0.7, 0.7]), np.array([False, True, False]))
    assert acc == pytest.approx(2 / 3)
    assert v.accuracy_at(np.array([0.1, 0.7, 0.7]), np.array([False, True, False]), t) == pytest.approx(2 / 3)


def test_tar_at_far_hand_computed() -> None:
    impostor = np.arange(1000) / 1000                    # 0.000 .. 0.999
    genuine = np.array([0.5, 0.9985, 0.999, 1.5])
    scores = np.r_[impostor, genuine]
    same = np.r_[np.zeros(1000, bool), np.ones(4, bool)]
    # FAR 1e-3 of 1000 impostors: one may pass (0.999), so the threshold sits just above 0.998.
    t = v.threshold_at_far(scores, same, 1e-3)
    assert 0.998 < t < 0.9985
    assert v.tar_at_far(scores, same, 1e-3) == 0.75
    # FAR 0: nothing above the best impostor (0.999) may pass; a genuine tie with it is rejected.
    assert v.tar_at_far(scores, same, 0.0) == 0.25
    assert v.threshold_at_far(scores, same, 1.0) == float("-inf")
    assert v.tar_at_far(scores, same, 1.0) == 1.0


def test_eer() -> None:
    rng = np.random.default_rng(1)
    same = rng.random(20000) < 0.5
    assert v.eer(rng.random(20000), same) == pytest.approx(0.5, abs=0.03)
    # impostors 0 1 2 3, genuine 2.5 4 5 6: at threshold 3 one of each is wrong -> 1/4.
    scores = np.array([0, 1, 2, 3, 2.5, 4, 5, 6], dtype=float)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=bool)
    assert v.eer(scores, labels) == pytest.approx(0.25)
    # Interpolated: impostors 0 2, genuine 1 3 -> FAR and FRR cross at 0.5.
    assert v.eer(np.array([0.0, 2.0, 1.0, 3.0]), np.array([0, 0, 1, 1], dtype=bool)) == pytest.approx(0.5)


def test_metrics_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        v.fold_accuracy(np.array([0.1, 0.2]), np.array([True, False]), np.array([0, 0]))
    with pytest.raises(ValueError):
        v.eer(np.array([0.1, 0.2]), np.array([True, True]))
    with pytest.raises(ValueError):
        v.tar_at_far(np.array([0.1, np.nan]), np.array([True, False]), 1e-3)


# --- pairs, fallback ------------------------------------------------------------------------------
def test_limit_pairs_keeps_both_kinds_per_fold() -> None:
    pairs = [Pair(Path(f"{f}-{s}-{i}a"), Path(f"{f}-{s}-{i}b"), s, f)
             for f in range(3) for s in (True, False) for i in range(5)]
    kept = v.limit_pairs(pairs, 2)
    assert len(kept) == 3 * 2 * 2
    assert {(p.fold, p.same) for p in kept} == {(f, s) for f in range(3) for s in (True, False)}
    assert v.limit_pairs(pairs, None) == pairs
    assert len(v.distinct_images(kept + kept)) == 2 * len(kept)


def test_fallback_landmarks_are_used_when_nothing_is_detected(tmp_path: Path) -> None:
    np.testing.assert_allclose(v.fallback_landmarks((500, 250, 3)), v.LFW_FALLBACK_LANDMARKS_250 * [1, 2])
    picture = tmp_path / "p.jpg"
    cv2.imwrite(str(picture), np.full((250, 250, 3), 128, np.uint8))

    class NoFaces:
        name = "none"

        def detect(self, image: np.ndarray) -> list:
            return []

    class Recorder:
        dim = 2
        seen: list[np.ndarray] = []

        def embed(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
            self.seen.append(landmarks)
            return np.array([1.0, 0.0], np.float32)

    job = v.Job(Recorder(), v.NO_CODEC, 90, tmp_path / "c.npz")
    v.embed_all([picture], [job], NoFaces(), template=None)
    assert job.result is not None and not job.result.detected[0]
    np.testing.assert_allclose(Recorder.seen[0], v.LFW_FALLBACK_LANDMARKS_250)


# --- one real run -----------------------------------------------------------------------------------
@pytest.mark.shared
@pytest.mark.skipif(not SHARED_LFW.is_dir(), reason=f"shared LFW not present at {SHARED_LFW}")
@pytest.mark.skipif(
    not (SHARED_MODELS / "mobilefacenet-ms1m").is_dir() or not (SHARED_MODELS / "yunet").is_dir(),
    reason=f"MobileFaceNet / YuNet not present under {SHARED_MODELS} (the dlib fallback is too slow for this test)",
)
def test_end_to_end_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("FACELINK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "v.json"
    args = ["--data", str(SHARED_LFW), "--limit-pairs", "3", "--json", str(out)]
    assert v.main([*args, "--no-cache"]) == 0
    report = json.loads(out.read_text())
    assert report["command"].startswith("facelink bench verification")
    assert {"arch", "cores", "python"} <= set(report["machine"])
    (row,) = report["rows"]
    assert row["codec"] == "none" and row["mean_bytes_per_face"] is None
    assert row["pairs"] == 60 and row["folds"] == 10 and row["images"] > 0
    assert 50.0 <= row["accuracy_mean"] <= 100.0
    assert len(row["fold_accuracies"]) == 10 and row["cached"] is False
    assert "| recogniser" in capsys.readouterr().out
    assert list((tmp_path / "cache" / "embeddings").glob("*-none-q0-*.npz"))

    # Again through the CLI, with the `--` separator: served from the cache, same numbers.
    from facelink.cli import main as cli_main

    assert cli_main(["bench", "verification", "--", *args]) == 0
    (again,) = json.loads(out.read_text())["rows"]
    assert again["cached"] is True
    assert again["accuracy_mean"] == row["accuracy_mean"] and again["eer"] == row["eer"]


def test_the_edge_codec_is_what_a_default_board_sends() -> None:
    """`--codec edge`: the learned codec at its bundle's border-ring quality, the ring coarse."""
    from facelink.config import CropRegionCoding, EdgeConfig
    from facelink.edge.pipeline import crop_codec

    codec, board = v.edge_default_codec(), crop_codec(EdgeConfig())
    assert (codec.codec_id, codec.quality, codec.background) == (board.codec_id, board.quality, board.background)
    assert codec.quality == codec.codec.manifest.border_ring_quality
    assert codec.background.quality == CropRegionCoding().background_quality
