"""What every `facelink` subcommand's parser shares (kept apart so the subcommand modules and
facelink/cli.py can all import it)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

#: Descriptions and epilogs keep their own line breaks: they hold examples.
FORMATTER = argparse.RawDescriptionHelpFormatter


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")


def read_structured_file(path: Path, what: str) -> Any:
    """The data of a YAML (.yaml/.yml) or JSON file; ValueError naming the file and the problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"cannot read the {what} {path}: {error.strerror}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {error}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
