"""What every training loop in export/ shares: its config on disk, a clean stop on a signal,
and the JSONL logs."""

from __future__ import annotations

import dataclasses
import json
import signal
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """A run's config dataclass from its config.json. An unknown key is an error (a typo must not
    silently train something else); JSON lists become tuples, nested dataclasses are rebuilt."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if isinstance(value, dict) and dataclasses.is_dataclass(hints.get(key)):
            value = config_from_dict(hints[key], value)
        values[key] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def open_run(run_dir: Path, config: Any) -> Path:
    """Start (or resume) a run: torch's thread count, the folder, the config as JSON; returns
    where its checkpoint lives."""
    import torch

    torch.set_num_threads(config.threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    return run_dir / "checkpoint.pt"


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


@dataclasses.dataclass
class Progress:
    """Where a resumable run stands; checkpointed with the weights."""

    epoch: int = 0
    batch: int = 0        # the next batch of the epoch's plan
    step: int = 0
    samples: int = 0
    seconds: float = 0.0  # training wall time over all sessions of the run


class Checkpoints:
    """When a training loop saves: every `every_minutes`, and when it must stop (a `StopRequest`
    or the session's deadline). Each save first adds the wall time since the last one to
    `progress.seconds`, so a run's hours add up over any number of resumed sessions."""

    def __init__(self, save: Callable[[], None], progress: Progress, every_minutes: float,
                 stop: StopRequest, deadline: float | None = None) -> None:
        self._save, self._progress, self._every_s = save, progress, every_minutes * 60
        self._stop, self._deadline = stop, deadline
        self._accounted = self._last_save = time.perf_counter()

    def save(self) -> None:
        now = time.perf_counter()
        self._progress.seconds += now - self._accounted
        self._accounted = self._last_save = now
        self._save()

    def after_step(self) -> bool:
        """Save if it is time; True when the loop must stop now (it has been saved)."""
        if self._stop.requested or (self._deadline is not None and time.perf_counter() > self._deadline):
            self.save()
            return True
        if time.perf_counter() - self._last_save > self._every_s:
            self.save()
        return False

    @property
    def hours(self) -> float:
        """The run's training time so far, this session's unsaved part included."""
        return (self._progress.seconds + time.perf_counter() - self._accounted) / 3600
