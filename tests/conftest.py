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
    from facelink.cloud.server import open_gallery, start_server

    from facelink.cloud.auth import AuthStore

    recognizer, detector = engine_parts
    started = []

    def start(gallery_dir: Path | None = None, port: int = 0, **overrides):
        config = CloudConfig(port=port, gallery_dir=gallery_dir or tmp_path / "gallery", **overrides)
        # Every server has credentials, as in production: an admin token that channel_to sends.
        if config.auth_path not in ADMIN_TOKENS:  # a restart on the same gallery keeps its token
            ADMIN_TOKENS[config.auth_path] = AuthStore(config.auth_path).create_token("test-admin", ["admin"])[1]
        engine = RecognitionEngine(config, open_gallery(config), recognizer, detector)
        running = start_server(config, engine)
        running.admin_token = ADMIN_TOKENS[config.auth_path]
        TOKENS_BY_ADDRESS[running.address] = running.admin_token
        started.append(running)
        return running

    yield start
    for running in started:
        try:
            running.stop(grace=None)
        except Exception:  # already stopped by the test
            pass


#: The admin token of each test server (by auth file, and by address for channel_to).
ADMIN_TOKENS: dict[Path, str] = {}
TOKENS_BY_ADDRESS: dict[str, str] = {}


def token_channel(address: str, token: str | None) -> grpc.Channel:
    """A plaintext loopback channel that sends `token` (None: no credentials)."""
    from pydantic import SecretStr

    from facelink.transport import ClientSecurity, client_channel

    return client_channel(address, ClientSecurity(token=SecretStr(token) if token else None), environ={})


@pytest.fixture
def channel_to():
    """channel_to(address) sends that test server's admin token; token=... another (or None)."""
    channels = []
    default = object()

    def open_channel(address: str, token: str | None | object = default) -> grpc.Channel:
        channel = token_channel(address, TOKENS_BY_ADDRESS.get(address) if token is default else token)
        channels.append(channel)
        return channel

    yield open_channel
    for channel in channels:
        channel.close()
