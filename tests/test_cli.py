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
