"""export/training.py's checkpoint schedule, which both training loops (codec, query model) use."""

from __future__ import annotations

import pytest

from facelink.export import training


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_saves_every_interval_and_stops_on_request_or_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(training.time, "perf_counter", clock)
    saves: list[float] = []
    progress, stop = training.Progress(seconds=3600.0), training.StopRequest()  # an hour from earlier sessions
    checkpoints = training.Checkpoints(lambda: saves.append(progress.seconds), progress, every_minutes=5,
                                       stop=stop, deadline=100.0 + 1200)
    clock.now += 200
    assert not checkpoints.after_step() and saves == []
    clock.now += 200  # 400 s since the start > 5 minutes
    assert not checkpoints.after_step() and saves == [4000.0]
    assert checkpoints.hours == pytest.approx(4000 / 3600)
    clock.now += 10
    stop.requested = True
    assert checkpoints.after_step() and saves[-1] == 4010.0  # saved, then the loop stops
    stop.requested = False
    clock.now = 100.0 + 1201  # past the deadline
    assert checkpoints.after_step() and saves[-1] == 3600.0 + 1201
