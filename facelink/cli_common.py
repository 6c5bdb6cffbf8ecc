"""What every `facelink` subcommand's parser shares (kept apart so the subcommand modules and
facelink/cli.py can all import it)."""

from __future__ import annotations

import argparse

#: Descriptions and epilogs keep their own line breaks: they hold examples.
FORMATTER = argparse.RawDescriptionHelpFormatter


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
