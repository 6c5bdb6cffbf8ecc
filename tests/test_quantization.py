"""`facelink bench quantization`: rows for recognisers and for the learned codec's encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from facelink.benchmarks import quantization

from .support import needs_shared


@needs_shared
def test_codec_encoder_precisions_are_compared_at_one_quality(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FACELINK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "q.json"
    argv = ["--recognizer", "none", "--precision", "fp16", "--qualities", "1", "--limit-pairs", "2",
            "--json", str(out)]
    assert quantization.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["rows"] == []
    fp32, fp16 = result["codec_rows"]
    assert (fp32["precision"], fp16["precision"]) == ("fp32", "fp16") and fp32["codec_id"] == fp16["codec_id"]
    assert fp16["symbol_mismatch"] < 0.01 and abs(fp16["delta_bytes"]) < 20
    assert "| default | 1       | fp16" in capsys.readouterr().out


def test_a_detector_is_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert quantization.main(["--recognizer", "yunet", "--codec", "none"]) == 2
    assert "yunet is not a recogniser" in capsys.readouterr().err
