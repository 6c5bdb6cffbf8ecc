"""Fixtures shared by the tests: real faces from ../shared, and a real server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from facelink.config import CloudConfig


@pytest.fixture(scope="module")
def engine_parts():
    """Models loaded once per test module: they are the slow part of starting a server."""
    from facelink.runtime.detection import create_detector
    from facelink.runtime.recognition import create_recognizer

    return create_recognizer("mobilefacenet"), create_detector()


@pytest.fixture
def server_factory(tmp_path: Path, engine_parts) -> Iterator:
    """Starts real servers on 127.0.0.1 (ephemeral ports); stops whatever is left at the end."""
    from facelink.cloud.engine import RecognitionEngine
    from facelink.cloud.gallery import Gallery
    from facelink.cloud.server import start_server

    recognizer, detector = engine_parts
    started = []

    def start(gallery_dir: Path | None = None, port: int = 0, **overrides):
        config = CloudConfig(port=port, gallery_dir=gallery_dir or tmp_path / "gallery", **overrides)
        engine = RecognitionEngine(config, Gallery.open(config.gallery_dir), recognizer, detector)
        running = start_server(config, engine)
        started.append(running)
        return running

    yield start
    for running in started:
        try:
            running.stop(grace=None)
        except Exception:  # already stopped by the test
            pass


@pytest.fixture
def channel_to():
    channels = []

    def open_channel(address: str) -> grpc.Channel:
        channel = grpc.insecure_channel(address)
        channels.append(channel)
        return channel

    yield open_channel
    for channel in channels:
        channel.close()
