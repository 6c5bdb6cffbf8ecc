"""Frames for the camera loop: the newest frame of a live source, every frame of a file.

A live camera does not wait for the edge. Reading it in the loop that also detects and encodes
means every slow frame pushes the next ones back, and the edge ends up tens of seconds behind
live while its own latencies look fine. :class:`LatestFrameFeed` reads the source on a capture
thread and keeps only the newest frame: the loop always gets the most recent picture, frames it
had no time for are dropped and counted (``dropped``), and ``--fps`` caps how many it takes.

The capture thread also reconnects: when the source ends or cannot be opened (a camera unplugged,
an RTSP server restarting), it reopens it with exponential backoff (``reconnect_initial_s`` doubling
up to ``reconnect_max_s``), logging each attempt, until :meth:`LatestFrameFeed.stop` -- a device
must never give up on its camera by itself. Only ``max_frames`` ends a live feed.

:class:`FileFeed` gives the same interface over a file source, every frame in order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from facelink.config import LiveSourceConfig

from .sources import Frame, FrameSource, SourceError

log = logging.getLogger(__name__)

__all__ = ["FeedStats", "FileFeed", "FrameFeed", "LatestFrameFeed", "open_feed"]


@dataclass
class FeedStats:
    frames_read: int = 0     # taken from the source
    handed: int = 0          # given to the camera loop
    dropped: int = 0         # replaced by a newer frame before the loop took them (stale)
    reconnects: int = 0      # times the source was opened again after it was lost
    failed_opens: int = 0    # attempts to reopen it that failed


class FrameFeed:
    """What the camera loop reads: :meth:`get` a frame, or None when none is ready yet."""

    stats: FeedStats
    live: bool = False

    def get(self, timeout: float) -> Frame | None:
        """The next frame, or None after `timeout` s without one (or once :attr:`ended`)."""
        raise NotImplementedError

    @property
    def ended(self) -> bool:
        """No frame will come any more (the file's end, max_frames, or stop())."""
        raise NotImplementedError

    def stop(self) -> None:
        """End the feed early (a signal): get() returns None from now on."""

    def close(self) -> None:
        self.stop()


class FileFeed(FrameFeed):
    """Every frame of a file source, in order: a file is never dropped from, it waits for us."""

    def __init__(self, source: FrameSource) -> None:
        self.source = source
        self.stats = FeedStats()
        self._frames: Iterator[Frame] = iter(source)
        self._ended = False

    def get(self, timeout: float) -> Frame | None:
        if self._ended:
            return None
        frame = next(self._frames, None)
        if frame is None:
            self._ended = True
            return None
        self.stats.frames_read += 1
        self.stats.handed += 1
        return frame

    @property
    def ended(self) -> bool:
        return self._ended

    def stop(self) -> None:
        self._ended = True


class LatestFrameFeed(FrameFeed):
    """The newest frame of a live source, read on a capture thread that reconnects (module docstring)."""

    live = True

    def __init__(self, source: FrameSource, config: LiveSourceConfig = LiveSourceConfig()) -> None:
        self.source = source
        self.config = config
        self.stats = FeedStats()
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._stop = threading.Event()
        self._source_done = False  # max_frames reached: the feed ends once the last frame is taken
        self._next_handover = 0.0  # time.monotonic() before which --fps holds the next frame back
        self._thread = threading.Thread(target=self._capture, name=f"facelink-capture-{source.description}", daemon=True)
        self._thread.start()

    # -- the capture thread ----------------------------------------------------------------------
    def _capture(self) -> None:
        delay = self.config.reconnect_initial_s
        limit = self.source.max_frames
        while not self._stop.is_set():
            try:
                for frame in self.source:
                    self._offer(frame)
                    delay = self.config.reconnect_initial_s  # frames flow: the next outage starts afresh
                    if self._stop.is_set():
                        return
                    if limit is not None and self.stats.frames_read >= limit:
                        self._finish()
                        return
            except SourceError as error:
                self.stats.failed_opens += 1
                log.warning("%s: reconnect failed (%s); next attempt in %.1f s", self.source.description, error, delay)
            except Exception:  # a backend bug: log it and keep trying, as for a lost camera
                self.stats.failed_opens += 1
                log.exception("%s: reading failed; next attempt in %.1f s", self.source.description, delay)
            else:
                if self._stop.is_set():
                    return
                if limit is not None and self.stats.frames_read >= limit:
                    self._finish()
                    return
                log.warning("%s: the stream was lost; reconnecting in %.1f s", self.source.description, delay)
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, self.config.reconnect_max_s)
            self.stats.reconnects += 1
            log.warning("%s: reconnecting (attempt %d)", self.source.description, self.stats.reconnects)

    def _offer(self, frame: Frame) -> None:
        with self._cond:
            self.stats.frames_read += 1
            if self._latest is not None:
                self.stats.dropped += 1  # the loop had no time for it: a newer picture replaces it
            self._latest = frame
            self._cond.notify_all()

    def _finish(self) -> None:
        with self._cond:
            self._source_done = True
            self._cond.notify_all()

    # -- the camera loop -------------------------------------------------------------------------
    def get(self, timeout: float) -> Frame | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._stop.is_set():
                    return None
                now = time.monotonic()
                if self._latest is not None and now >= self._next_handover:
                    frame, self._latest = self._latest, None
                    self.stats.handed += 1
                    if self.config.fps:
                        # A period from this handover: the loop's own time counts towards it, so a loop
                        # slower than the period is not slowed further, and one faster is held to the rate.
                        self._next_handover = now + 1.0 / self.config.fps
                    return frame
                if self._source_done and self._latest is None:
                    return None
                wait = deadline - now
                if wait <= 0:
                    return None
                if self._latest is not None:
                    wait = min(wait, self._next_handover - now)
                self._cond.wait(wait)

    @property
    def ended(self) -> bool:
        with self._cond:
            return self._stop.is_set() or (self._source_done and self._latest is None)

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def close(self, timeout: float = 2.0) -> None:
        """Stop and wait a little for the capture thread (a blocked read may outlast it: it is a daemon)."""
        self.stop()
        if self._thread.is_alive():
            self._thread.join(timeout)


def open_feed(source: FrameSource, config: LiveSourceConfig = LiveSourceConfig()) -> FrameFeed:
    """The feed for `source`: the newest frame of a live source, every frame of a file."""
    return LatestFrameFeed(source, config) if source.live else FileFeed(source)
