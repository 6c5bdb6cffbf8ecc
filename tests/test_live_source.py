"""Live sources: the newest frame from a capture thread, --fps, reconnect with backoff."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import numpy as np
import pytest

from facelink.config import LiveSourceConfig
from facelink.edge import sources
from facelink.edge.live import FileFeed, LatestFrameFeed, open_feed
from facelink.edge.sources import Frame, FrameSource, SourceError


class FakeCamera(FrameSource):
    """A live source at `fps` frames a second; pass k of `script` yields that many frames then
    ends (the camera drops), or raises SourceError for None (the camera cannot be reopened)."""

    live = True

    def __init__(self, fps: float = 500.0, script: list[int | None] | None = None, **kw: int) -> None:
        super().__init__(**kw)
        self.description = "fake camera"
        self.period = 1.0 / fps
        self.script = list(script) if script is not None else [10**9]
        self.position = 0
        self.passes = 0

    def _frames(self) -> Iterator[Frame]:
        self.passes += 1
        count = self.script.pop(0) if self.script else 10**9
        if count is None:
            raise SourceError("fake camera: cannot open")
        for _ in range(count):
            time.sleep(self.period)
            self.position += 1
            yield Frame(np.zeros((4, 4, 3), np.uint8), self.position, time.time_ns() // 1000, f"f{self.position}")


def test_slow_consumer_gets_the_newest_frame_and_stale_ones_are_counted() -> None:
    feed = LatestFrameFeed(FakeCamera(fps=500))
    try:
        got = []
        for _ in range(8):
            frame = feed.get(timeout=2)
            assert frame is not None
            got.append(frame)
            time.sleep(0.05)  # a slow edge: 20 frames a second against a 500 fps camera
        indices = [f.index for f in got]
        assert indices == sorted(indices) and len(set(indices)) == len(indices)
        assert min(np.diff(indices)) > 3, "frames in between were skipped, not queued"
        # What the loop gets is fresh: never more than a frame period or two old.
        age = time.time() - feed.get(timeout=2).timestamp_us / 1e6
        assert age < 0.05
        assert feed.stats.dropped > 8 * 3 and feed.stats.handed == 9
        assert feed.stats.frames_read >= feed.stats.handed + feed.stats.dropped - 1
    finally:
        feed.close()


def test_fps_caps_the_rate() -> None:
    feed = LatestFrameFeed(FakeCamera(fps=400), LiveSourceConfig(fps=10))
    try:
        start = time.monotonic()
        handed = 0
        while time.monotonic() - start < 1.0:
            if feed.get(timeout=0.05) is not None:
                handed += 1
        assert 8 <= handed <= 12
    finally:
        feed.close()


def test_reconnects_with_backoff_until_the_camera_is_back(caplog: pytest.LogCaptureFixture) -> None:
    # 5 frames, then the camera drops; two attempts to reopen it fail; then it is back.
    camera = FakeCamera(fps=200, script=[5, None, None, 1000])
    caplog.set_level(logging.WARNING, logger="facelink.edge.live")
    feed = LatestFrameFeed(camera, LiveSourceConfig(reconnect_initial_s=0.05, reconnect_max_s=0.2))
    try:
        seen = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (not seen or seen[-1] < 20):
            frame = feed.get(timeout=0.1)
            if frame is not None:
                seen.append(frame.index)
        assert seen and seen[-1] >= 20, "frames flow again after the outage"
        assert camera.passes >= 4 and feed.stats.failed_opens == 2 and feed.stats.reconnects >= 3
        assert not feed.ended
        messages = [r.getMessage() for r in caplog.records]
        assert any("lost" in m for m in messages) and sum("reconnecting (attempt" in m for m in messages) >= 3
    finally:
        feed.close()
    assert feed.ended and feed.get(timeout=0.1) is None


def test_max_frames_ends_a_live_feed() -> None:
    feed = LatestFrameFeed(FakeCamera(fps=1000, max_frames=5))
    frames = []
    while not feed.ended:
        frame = feed.get(timeout=0.5)
        if frame is not None:
            frames.append(frame)
        time.sleep(0.002)
    assert 1 <= len(frames) <= 5 and feed.stats.frames_read == 5


def test_a_lost_capture_is_released_and_reopened(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real NetworkStream: after too many failed reads its capture is let go; the next pass opens a new one."""
    from .test_sources import _FlakyCapture, _live

    monkeypatch.setattr(sources, "LIVE_RETRY_SLEEP_S", 0.0)
    first = _FlakyCapture(good=2, fail=sources.LIVE_READ_RETRIES + 1, then=0)
    src = _live(first)
    assert [f.index for f in src] == [0, 1]
    assert first.released and src._cap is None
    second = _FlakyCapture(good=3, fail=0, then=0)
    monkeypatch.setattr(src, "_open_capture", lambda: second)
    assert [f.index for f in src] == [2, 3, 4]  # indices keep counting across reconnects


def test_file_sources_are_never_dropped_from(tmp_path) -> None:
    import cv2

    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((8, 8, 3), i * 50, np.uint8))
    feed = open_feed(sources.open_source(tmp_path))
    assert isinstance(feed, FileFeed)
    got = [feed.get(0) for _ in range(4)]
    assert [f.name for f in got[:3]] == ["0.png", "1.png", "2.png"] and got[3] is None and feed.ended
