"""The send queue drops near-duplicate shots of a track before it drops a track."""

from __future__ import annotations

from facelink.config import StreamConfig
from facelink.edge.client import StreamClient
from facelink.v1 import recognition_pb2

from .test_client import free_port


def _shot(request: int, track: int, camera: str = "cam") -> recognition_pb2.FaceObservation:
    return recognition_pb2.FaceObservation(request_id=request, track_id=track, camera_id=camera)


def test_overflow_drops_the_worst_duplicate_shot_first() -> None:
    config = StreamConfig(server=f"127.0.0.1:{free_port()}", queue_size=4, overflow="drop_oldest")
    dropped: list[int] = []
    client = StreamClient(config, lambda r, p: None, on_drop=lambda p: dropped.append(p.observation.request_id))
    client.submit(_shot(1, track=1), quality=0.9)   # track 1's only shot: must survive
    client.submit(_shot(2, track=2), quality=0.5)
    client.submit(_shot(3, track=2), quality=0.8)
    client.submit(_shot(4, track=2, camera="other"), quality=0.1)  # same id, another camera: another track
    client.submit(_shot(5, track=3), quality=0.7)  # full: track 2's worse shot goes
    assert dropped == [2]
    client.submit(_shot(6, track=3), quality=0.6)  # track 3 has two now: its worse one goes
    assert dropped == [2, 6]
    assert [p.observation.request_id for p in client._queue] == [1, 3, 4, 5]
    client.submit(_shot(7, track=4), quality=0.9)  # only single-shot tracks left: the oldest goes
    assert dropped == [2, 6, 1]
    stats = client.close(timeout=0.1)
    assert stats.dropped == 3 and stats.dropped_duplicates == 2
