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
