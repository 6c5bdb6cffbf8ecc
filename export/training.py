"""What every training loop in export/ shares: a clean stop on a signal, and the JSONL logs."""

from __future__ import annotations

import json
import signal
from pathlib import Path


def append_jsonl(path: Path, row: dict) -> None:
    """One log row per line: appending survives a crash and a resume keeps the whole history."""
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


class StopRequest:
    """While active, SIGTERM / SIGINT ask the loop to checkpoint and stop at the next step
    boundary instead of killing it mid-write; the previous handlers come back on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True
