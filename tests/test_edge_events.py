"""The edge end to end against a real server: track events to JSON Lines, capabilities refused at
start (exit 3), SIGTERM drains and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from facelink.config import EdgeConfig, EventsConfig, StreamConfig, TrackPolicy
from facelink.edge.events import TrackEvent
from facelink.edge.run import EXIT_CONFIG, EXIT_REFUSED, run_edge
from facelink.edge.sources import open_source
from facelink.transport import ClientSecurity
from facelink.v1 import gallery_pb2_grpc

from .edge_scenes import scene, write_video
from .support import needs_shared
from .test_service import enroll_request

pytestmark = needs_shared
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def server(server_factory, channel_to):
    # No ensemble: a cloud that serves no query model, which the refused-payload test relies on
    # (`auto` would otherwise serve the bundled one: its gallery models are all reachable here).
    running = server_factory(ensembles=())
    gallery = gallery_pb2_grpc.GalleryStub(channel_to(running.address))
    for name in ("Colin_Powell", "Serena_Williams"):
        assert gallery.Enroll(enroll_request(name, 1), timeout=30).templates_added == 1
    return running


def _video(tmp_path: Path, appearances, gap: int = 10) -> Path:
    path = tmp_path / "clip.avi"
    if not write_video(path, scene(appearances, gap=gap)):
        pytest.skip("this OpenCV build cannot write MJPG/AVI")
    return path


def test_events_to_a_jsonl_file(server, tmp_path: Path) -> None:
    # An enrolled person (another picture than the enrolled one), then a stranger.
    video = _video(tmp_path, [("Colin_Powell", 2, 60, {}), ("Tony_Blair", 3, 60, {})], gap=15)
    events_path = tmp_path / "events.jsonl"
    config = EdgeConfig(
        codec="jpeg", faces="largest",
        stream=StreamConfig(server=server.address, camera_id="door-1",
                            security=ClientSecurity(token=SecretStr(server.admin_token))),
        tracks=TrackPolicy(send="best", max_shots=3),
        events=EventsConfig(jsonl=str(events_path)),
    )
    seen: list[TrackEvent] = []
    with open_source(video) as source:
        stats = run_edge(source, config, progress=False, on_event=seen.append)
    events = [TrackEvent.from_json(line) for line in events_path.read_text().splitlines()]
    assert events == seen and events
    assert stats.stream.answered == stats.faces and stats.faces <= 6, "a few shots per track, not one per frame"
    by_track: dict[int, list[TrackEvent]] = {}
    for event in events:
        by_track.setdefault(event.track, []).append(event)
    assert len(by_track) == 2
    first, second = (by_track[t] for t in sorted(by_track))
    for track in (first, second):
        assert track[0].type == "decision" and track[-1].type == "track_ended"
        assert all(e.camera == "door-1" and e.shots >= 1 for e in track)
    assert (first[-1].decision, first[-1].identity) == ("match", "Colin_Powell")
    assert second[-1].decision == "unknown" and second[-1].identity is None
    assert stats.cameras[0].camera == "door-1" and stats.cameras[0].events.delivered == len(events)
    # The capture time is the video's: the stranger's track ends about 75 frames (3 s) after the first began.
    assert 2.0 < (second[-1].capture_time - first[0].capture_time).total_seconds() < 6.0


def _edge_command(server, video: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "facelink.cli", "edge", "--source", str(video), "--server", server.address,
            "--codec", "jpeg", "--faces", "largest", *extra]


def _env(token: str) -> dict[str, str]:
    return {**os.environ, "FACELINK_TOKEN": token, "PYTHONPATH": str(REPO)}


def test_a_refused_payload_fails_at_start_with_exit_3(server, tmp_path: Path) -> None:
    video = _video(tmp_path, [("Colin_Powell", 2, 3, {})])
    # This cloud serves no query model: every embedding would be rejected.
    done = subprocess.run(_edge_command(server, video, "--payload", "embedding"), env=_env(server.admin_token),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_REFUSED, done.stderr
    assert "does not accept embeddings of query model" in done.stderr and "--payload face" in done.stderr
    # Credentials the cloud does not know: exit 3 too.
    done = subprocess.run(_edge_command(server, video), env=_env("not-a-token"), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == EXIT_REFUSED, done.stderr
    assert "UNAUTHENTICATED" in done.stderr


def test_bad_configuration_exits_2(tmp_path: Path) -> None:
    from facelink.cli import main

    assert main(["edge", "--source", "/no/such/clip.mp4"]) == EXIT_CONFIG
    bad = tmp_path / "cameras.json"
    bad.write_text(json.dumps({"cameras": [{"source": "0"}]}))  # no camera_id
    assert main(["edge", "--config", str(bad)]) == EXIT_CONFIG
    assert main(["edge", "--source", "0", "--config", str(bad)]) == EXIT_CONFIG
    assert main(["edge", "--source", str(tmp_path), "--webhook-url", "https://x.example/h"]) == EXIT_CONFIG


def test_sigterm_drains_flushes_and_exits_0(server, tmp_path: Path) -> None:
    video = _video(tmp_path, [("Colin_Powell", 2, 250, {}), ("Serena_Williams", 2, 250, {})])
    events_path = tmp_path / "events.jsonl"
    process = subprocess.Popen(
        _edge_command(server, video, "--send", "every", "--events-jsonl", str(events_path), "--drain-timeout", "10"),
        env=_env(server.admin_token), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:
            if events_path.exists() and events_path.read_text().count("\n") >= 1:
                break
            time.sleep(0.1)
        assert process.poll() is None, "still running when the signal comes"
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert time.monotonic() - signalled < 15, "the drain is bounded"
    assert "stopped on request" in err and "camera camera-0:" in err and "unanswered 0" in err
    events = [TrackEvent.from_json(line) for line in events_path.read_text().splitlines()]
    assert events[-1].type == "track_ended" and events[-1].identity == "Colin_Powell"
    assert "track" in out  # a human line per event on stdout


def test_several_cameras_from_a_config_file(server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from facelink.cli import main

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    door = _video(tmp_path / "a", [("Colin_Powell", 2, 30, {})])
    lobby = _video(tmp_path / "b", [("Serena_Williams", 2, 30, {})])
    cameras = tmp_path / "cameras.json"
    cameras.write_text(json.dumps({"cameras": [
        {"source": str(door), "camera_id": "door"},
        {"source": str(lobby), "camera_id": "lobby", "tracks": {"send": "first"}},
    ]}))
    events_path = tmp_path / "events.jsonl"
    monkeypatch.setenv("FACELINK_TOKEN", server.admin_token)
    code = main(["edge", "--config", str(cameras), "--server", server.address, "--codec", "jpeg", "--faces", "largest",
                 "--events-jsonl", str(events_path), "-q"])
    assert code == 0
    events = [TrackEvent.from_json(line) for line in events_path.read_text().splitlines()]
    ended = {e.camera: e for e in events if e.type == "track_ended"}
    assert set(ended) == {"door", "lobby"}
    assert ended["door"].identity == "Colin_Powell" and ended["lobby"].identity == "Serena_Williams"
    assert ended["lobby"].shots == 1  # that camera's own policy
