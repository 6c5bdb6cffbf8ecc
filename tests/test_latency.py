"""`facelink bench latency`: what it measures and reports (never how fast: that is the benchmark's job)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from facelink.benchmarks import latency
from facelink.export.deploy.source import resolve_source

from .support import needs_shared


def test_codec_halves_are_timed_on_a_canonical_face_and_its_latent() -> None:
    frame = (640, 480)
    assert latency._spatial_size(resolve_source("codec-default:encoder"), frame) == (128, 128)
    assert latency._spatial_size(resolve_source("codec-default:decoder"), frame) == (8, 8)
    assert latency._spatial_size(resolve_source("yunet"), frame) == frame


@needs_shared
def test_edge_path_with_the_learned_codec_and_the_query_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FACELINK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "latency.json"
    argv = ["--model", "none", "--codec", "learned@2", "--edge-precision", "fp32", "--threads", "1",
            "--edge-frames", "3", "--json", str(out)]
    assert latency.main(argv) == 0
    (edge,) = json.loads(out.read_text())["edge"]
    assert edge["label"] == "learned" and edge["quality"] == 2 and edge["query_model"] == "facelink-query@v9"
    assert edge["faces"] >= 3 and edge["mean_observation_bytes"] < 2000 and edge["crop_border"]
    assert edge["p50_ms"]["align + encode + query"] > 0
    assert "| learned q2, border ring q1 | fp32" in capsys.readouterr().out
    # Without @QUALITY the ring codes the face at the bundle's border_ring_quality, as the edge does;
    # --no-crop-border measures the whole crop at the bundle's default quality.
    assert latency.main([*argv[:2], "--codec", "learned", *argv[4:]]) == 0
    assert json.loads(out.read_text())["edge"][0]["quality"] == 5
    assert latency.main([*argv[:2], "--codec", "learned", *argv[4:], "--no-crop-border"]) == 0
    (whole,) = json.loads(out.read_text())["edge"]
    assert whole["quality"] == 4 and not whole["crop_border"]


def test_the_default_run_covers_every_bundled_learned_codec() -> None:
    from facelink.benchmarks.latency import default_codecs, default_models
    from facelink.runtime.codecs.learned import codec_manifests

    for name in codec_manifests():
        assert {f"codec-{name}:encoder", f"codec-{name}:decoder"} <= set(default_models())
        assert ("learned" if name == "default" else f"learned:{name}") in default_codecs()
