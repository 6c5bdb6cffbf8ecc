"""`facelink bench video` on a short scene: the ground truth, the report's structure and the basic
targets (no stranger matched; send=best sends far fewer observations than send=every)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from facelink.benchmarks import video

from .support import needs_shared

pytestmark = needs_shared


@pytest.fixture(scope="module")
def scene() -> video.Scene:
    return video.build_scene(12.0, seed=0, data=None, distractors=3)


def test_the_scene_is_deterministic_and_has_people_and_strangers(scene: video.Scene) -> None:
    again = video.build_scene(12.0, seed=0, data=None, distractors=3)
    def outline(s: video.Scene) -> list[tuple[str, int, int]]:
        return [(a.person, a.start, a.end) for a in s.appearances]

    assert outline(again) == outline(scene)
    assert any(a.stranger for a in scene.appearances) and any(not a.stranger for a in scene.appearances)
    assert any(a.lane == 1 for a in scene.appearances), "two people at once"
    for a in scene.appearances:
        if not a.stranger:
            # Enrolled from other pictures than the one in the video.
            assert a.picture.split("/")[-1] not in {Path(p).name for p in scene.enrolled[a.person]}
        else:
            assert a.person not in scene.enrolled and a.person not in scene.distractors
        assert a.boxes and all(a.start <= f < a.end for f in a.boxes)
    assert not scene.active(0), "the video starts empty"
    image = video.render(scene, scene.appearances[0].start + 20)
    assert image.shape == (video.HEIGHT, video.WIDTH, 3)


def test_file_and_live_runs_against_a_real_cloud(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "video.json", tmp_path / "timeline.png"
    argv = ["--seconds", "12", "--distractors", "3", "--no-outages", "--json", str(out), "--png", str(png)]
    runs = ["--runs", "file-every", "file-best", "live-best"]
    assert video.main(argv + runs) == 0
    report = capsys.readouterr().out
    assert "| run" in report and "machine:" in report and "targets (file)" in report
    payload = json.loads(out.read_text())
    assert png.stat().st_size > 10_000
    assert {"command", "date", "machine", "setup", "ground_truth", "runs", "targets"} <= set(payload)
    by = {r["run"]: r for r in payload["runs"]}
    assert set(by) == {"file-every", "file-best", "live-best"}
    every, best, live = by["file-every"], by["file-best"], by["live-best"]
    for r in (every, best, live):
        assert r["appearances"] == len(payload["ground_truth"]) >= 2
        assert r["strangers_matched"] == 0 and r["spurious_matched"] == 0
        assert r["stream"]["unanswered"] == 0 and r["stream"]["dropped"] == 0
        assert len(r["per_appearance"]) == r["appearances"]
        assert r["edge_cpu_ms_per_frame"] > 0
    assert best["correct"] >= 1
    assert every["observations_per_appearance"] >= 20 * best["observations_per_appearance"]
    assert best["observations_per_appearance"] <= 3
    assert payload["targets"]["file"]["no_stranger_matched"]
    # Live: a paced 25 fps camera, the newest frame handed over; the lag is measured.
    assert live["frames_from_camera"] > 0 and live["lag_s_max"] is not None and live["lag_s_max"] >= 0
    assert live["observations_per_appearance"] <= 3
