"""The `facelink` command: every subcommand teaches with --help, and user errors are one line."""

from __future__ import annotations

import pytest

from facelink.cli import build_parser, main


@pytest.mark.parametrize(
    "argv", [[], ["demo"], ["edge"], ["cloud"], ["cloud", "serve"], ["cloud", "enroll"], ["export"], ["bench"]]
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
