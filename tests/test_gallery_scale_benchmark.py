"""`facelink bench gallery` (benchmarks/gallery_scale.py): its generator, its use of the open-set
metrics, and a tiny end-to-end run (2,000 identities, 40 LFW people) when ../shared is present."""

from __future__ import annotations

import json

import numpy as np
import pytest
from facelink.benchmarks import gallery_scale as bench
from facelink.benchmarks.open_set import dir_at_far, rank1

from .support import needs_shared


def test_generator_fitted_to_target_moments_reproduces_them():
    rng = np.random.default_rng(3)
    truth = bench.Generator(dim=128, a=0.2, k=60, beta=0.7, s=0.3)
    genuine, impostor = bench.synthetic_scores(truth, rng, 20_000)
    fitted = bench.fit_generator(128, genuine, impostor)
    g, i = bench.synthetic_scores(fitted, rng, 20_000)
    assert abs(g.mean() - genuine.mean()) < 0.02 and abs(g.std() - genuine.std()) < 0.02
    assert abs(i.mean() - impostor.mean()) < 0.01 and abs(i.std() - impostor.std()) < 0.01


def test_open_set_point_equals_the_full_score_matrix_metrics():
    """Top-2 per probe is all rank-1 and DIR need: same numbers as open_set's on the whole matrix."""
    rng = np.random.default_rng(4)
    genuine = rng.uniform(-0.3, 1, (300, 50))
    target = rng.integers(0, 50, 300)
    genuine[np.arange(300), target] += 0.3
    distractors = rng.uniform(-0.3, 1, (120, 50))
    own = genuine[np.arange(300), target]
    masked = genuine.copy()
    masked[np.arange(300), target] = -np.inf
    point = bench.open_set_point(own, masked.max(axis=1), distractors.max(axis=1))
    rate, threshold = dir_at_far(genuine, target, distractors, bench.FAR)
    assert point["rank1"] == rank1(genuine, target)
    assert point["dir_at_far"] == rate and point["threshold"] == threshold


@pytest.mark.shared
@needs_shared
def test_quick_run_writes_results(tmp_path):
    out = tmp_path / "gallery_scale.json"
    assert bench.main(["--quick", "--no-lock", "--models", "mobilefacenet", "--ef-sweep", "64", "--kinds", "flat", "hnsw",
                       "ivf", "--nprobe-sweep", "2", "--galleries", str(tmp_path / "g"), "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    (model,) = payload["models"]
    assert {r["kind"] for r in model["rows"]} == {"flat", "hnsw", "ivf"}
    for row in model["rows"]:
        assert row["recall_at_1"] > 0.9 and row["startup_s"] > 0 and row["rss_mb"] > 0
    ivf = next(r for r in model["rows"] if r["kind"] == "ivf")
    assert ivf["index_kind"] == "ivf" and ivf["nlist"] >= 1 and set(ivf["nprobe_sweep"]) == {"2"}
    assert "hnsw" in model["open_set"][0] and "ivf" in model["open_set"][0] and 0 <= model["open_set"][0]["exact"]["dir_at_far"] <= 1
    assert abs(model["fit"]["synthetic_impostor"]["std"] - model["fit"]["real_impostor"]["std"]) < 0.02
    assert out.with_suffix(".png").is_file()
