"""The `facelink` command: every subcommand teaches with --help, and user errors are one line."""

from __future__ import annotations

import pytest

from facelink.cli import build_parser, main


@pytest.mark.parametrize(
    "argv", [[], ["demo"], ["edge"], ["cloud"], ["cloud", "serve"], ["cloud", "enroll"], ["export"], ["bench"], ["train"]]
)
def test_every_subcommand_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*argv, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: facelink" in text and len(text) > 200


def test_a_missing_source_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["edge", "--source", "/no/such/folder", "--server", "127.0.0.1:1"]) == 2
    assert "no such file or folder: /no/such/folder" in capsys.readouterr().err


def test_a_bad_manifest_is_reported_not_raised(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x"}')
    assert main(["export", "manifest", str(bad)]) == 1
    assert "is invalid" in capsys.readouterr().err


def test_train_runs_an_export_job_or_names_the_missing_extra(capsys: pytest.CaptureFixture[str]) -> None:
    """`facelink train JOB -- ARGS` hands ARGS to the job; without torch it says which extra to install."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        assert main(["train", "query", "--", "--help"]) == 2
        assert "needs torch (the export extra)" in capsys.readouterr().err
    else:
        with pytest.raises(SystemExit) as exit_:
            main(["train", "query", "--", "--help"])
        assert exit_.value.code == 0
        assert "--mixup" in capsys.readouterr().out


def test_train_hands_its_arguments_to_the_job(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """codec-frontier needs numpy only, so this runs with or without the export extra."""
    import json

    reference = tmp_path / "reference.jsonl"
    reference.write_text(json.dumps({"epoch": 0, "q1": {"bytes": 600.0, "cos": 0.90, "psnr": 30.0},
                                     "q2": {"bytes": 800.0, "cos": 0.94, "psnr": 31.0}}) + "\n")
    run = tmp_path / "run.jsonl"
    run.write_text(json.dumps({"epoch": 3, "q1": {"bytes": 630.0, "cos": 0.92, "psnr": 30.5},
                               "q2": {"bytes": 800.0, "cos": 0.94, "psnr": 31.0}}) + "\n")
    assert main(["train", "codec-frontier", "--", str(run), "--reference", str(reference)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("epoch   3") and "-10.0%" in out


def test_the_separator_before_a_module_s_options_is_dropped_whatever_argparse_did() -> None:
    from facelink.cli import _passthrough

    assert _passthrough(["--", "--protocols", "edge"]) == ["--protocols", "edge"]
    assert _passthrough(["--protocols", "edge"]) == ["--protocols", "edge"]


def test_cloud_serve_config_file_under_the_flags(tmp_path):
    """`facelink cloud serve --config FILE`: the file sets any CloudConfig field (nested), and a
    flag that differs from its default wins; a bad file is a ValueError naming it."""
    from facelink.cli_cloud import with_config_file
    from facelink.config import CloudConfig

    path = tmp_path / "cloud.yaml"
    path.write_text(
        "port: 6000\n"
        "limits: {max_streams: 7}\n"
        "gallery_backend:\n  vector_storage: float32\n  index: {large_kind: hnsw, hnsw_ef_search: 512}\n"
    )
    config = with_config_file(CloudConfig(port=7000), path)
    assert config.port == 7000  # the flag
    assert config.limits.max_streams == 7 and config.gallery_backend.vector_storage == "float32"
    assert config.gallery_backend.index.large_kind == "hnsw" and config.gallery_backend.index.hnsw_ef_search == 512
    assert with_config_file(CloudConfig(), path).port == 6000  # a flag left at its default: the file
    path.write_text("gallery_backend: {index: {large_kind: annoy}}\n")
    with pytest.raises(ValueError, match="cloud.yaml"):
        with_config_file(CloudConfig(), path)
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        with_config_file(CloudConfig(), path)
