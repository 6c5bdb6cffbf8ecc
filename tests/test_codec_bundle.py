"""Checkpoint -> run-time bundle: the runtime codes exactly CompressAI's symbols."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (the export extra) is not installed")
pytest.importorskip("compressai", reason="compressai (the export extra) is not installed")

from facelink.export.codec.bundle import parity, write_bundle  # noqa: E402
from facelink.export.codec.model import create_codec_model  # noqa: E402
from facelink.export.codec.train import TrainConfig  # noqa: E402
from facelink.runtime.codecs.learned import LearnedFaceCodec  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = create_codec_model("default")
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    progress = {"step": 0, "epoch": 0, "samples": 0, "seconds": 0.0}
    torch.save({"model": model.state_dict(), "progress": progress, "config": asdict(TrainConfig())}, path)
    return path


def test_bundle_round_trips_and_matches_compressai(checkpoint: Path, tmp_path: Path) -> None:
    manifest = write_bundle(checkpoint, "unit", tmp_path, "test")
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 255, (2, 128, 128, 3), dtype=np.uint8)
    for quality, mismatch, *_ in parity(manifest, checkpoint, faces):
        assert float(mismatch) == 0.0, f"quality {quality}: runtime symbols differ from CompressAI's"
    codec = LearnedFaceCodec.load(manifest, quality=2)
    assert codec.decode(codec.encode(faces[0][:100, :90])).shape == (100, 90, 3)  # any size


def test_a_bundle_recovers_into_a_trainable_model(checkpoint: Path, tmp_path: Path) -> None:
    """What shipped can be trained on where its checkpoint is gone: the transforms come back
    exactly, the gains and symbol supports exactly, the densities to a small fraction of a bit."""
    from facelink.export.codec.bundle import entropy_tables, load_trained
    from facelink.export.codec.train import init_state
    from facelink.export.codec.unbundle import codec_from_bundle, is_bundle_reference

    manifest = write_bundle(checkpoint, "unit", tmp_path / "bundle", "test")
    recovered, name, report = codec_from_bundle(manifest, density_steps=600)
    trained, _ = load_trained(checkpoint)
    assert name == "default" and report["version"].endswith("-step0")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(recovered.g_a(x), trained.g_a(x), rtol=0, atol=1e-5)
        y = trained.g_a(x)
        torch.testing.assert_close(recovered.g_s(y), trained.g_s(y), rtol=0, atol=1e-5)
    shipped, again = entropy_tables(trained), entropy_tables(recovered)
    for key in ("gain", "inverse_gain", "medians", "length", "offset"):
        np.testing.assert_allclose(again[key], shipped[key], rtol=1e-6, err_msg=key)
    assert max(report["density_excess_bits_per_symbol"]) < 0.01
    assert np.abs(again["pmf"] - shipped["pmf"]).max() < 0.02

    assert is_bundle_reference("wide") and is_bundle_reference(str(manifest))
    assert not is_bundle_reference("~/.cache/facelink/runs/codec-v5/checkpoint.pt")
    state = init_state(str(checkpoint))
    assert set(state["model"]) == set(trained.state_dict())
