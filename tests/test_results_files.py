"""Committed benchmark results read the same on every machine: no absolute path of the one that made them."""

from __future__ import annotations

import json
import re
from pathlib import Path

from facelink.benchmarks import reporting
from facelink.config import REPO_ROOT, shared_dir

RESULTS = REPO_ROOT / "benchmarks" / "results"


def test_paths_are_written_relative_to_the_repository_shared_cache_or_tmp(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FACELINK_CACHE", str(tmp_path / "cache"))
    payload = {
        "manifest": str(REPO_ROOT / "runtime" / "manifests" / "x.json"),
        "data": [str(shared_dir() / "data" / "lfw"), 3],
        "command": f"facelink bench load -- --json {REPO_ROOT}/benchmarks/results/load.json",
        "export": str(tmp_path / "cache" / "exports" / "m.onnx"),
        "neighbour": f"{REPO_ROOT}-old/x",  # another folder whose name starts like the repository's
    }
    out = tmp_path / "r.json"
    reporting.write_results(out, payload)
    written = json.loads(out.read_text())
    assert written["manifest"] == "runtime/manifests/x.json"
    assert written["data"] == ["../shared/data/lfw", 3]
    assert written["command"] == "facelink bench load -- --json ./benchmarks/results/load.json"
    assert written["export"] == "$FACELINK_CACHE/exports/m.onnx"
    assert written["neighbour"] == f"{REPO_ROOT}-old/x"


def test_no_committed_result_records_a_machine_path() -> None:
    pattern = re.compile(r'"/(?:work|tmp|root|home|Users|var)/')
    offenders = [p.name for p in sorted(RESULTS.glob("*.json")) if pattern.search(p.read_text())]
    assert not offenders, f"absolute paths in {offenders}: write results through benchmarks/reporting.write_results"
