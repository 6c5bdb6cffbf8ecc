"""The device's stream client: ordering, bounded buffering, reconnect and resend."""

from __future__ import annotations

import socket
import threading
import time

from facelink.config import EdgeConfig, StreamConfig
from facelink.edge.client import StreamClient
from facelink.edge.pipeline import EdgePipeline
from facelink.edge.sources import Frame
from facelink.transport import ClientSecurity
from facelink.v1 import recognition_pb2

from .support import lfw_image, needs_shared, read_rgb


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_drop_oldest_keeps_the_queue_bounded() -> None:
    """No server at all: faces pile up, and the oldest go first, counted."""
    config = StreamConfig(server=f"127.0.0.1:{free_port()}", queue_size=4, overflow="drop_oldest")
    client = StreamClient(config, lambda result, pending: None)  # not started: nothing leaves the queue
    for i in range(10):
        client.submit(recognition_pb2.FaceObservation(request_id=i + 1))
    assert client.stats.dropped == 6
    assert [p.observation.request_id for p in client._queue] == [7, 8, 9, 10]
    stats = client.close(timeout=0.1)
    assert stats.unanswered == 4


def test_block_policy_waits_instead_of_dropping() -> None:
    config = StreamConfig(server=f"127.0.0.1:{free_port()}", queue_size=2, overflow="block")
    client = StreamClient(config, lambda result, pending: None)
    client.submit(recognition_pb2.FaceObservation(request_id=1))
    client.submit(recognition_pb2.FaceObservation(request_id=2))
    blocked = threading.Thread(target=client.submit, args=(recognition_pb2.FaceObservation(request_id=3),), daemon=True)
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive() and client.stats.dropped == 0
    with client._cond:  # make room, as an answered face would
        client._queue.popleft()
        client._cond.notify_all()
    blocked.join(2)
    assert not blocked.is_alive()
    client.close(timeout=0.1)


@needs_shared
def test_reconnects_after_a_server_restart_and_loses_nothing(server_factory, engine_parts, tmp_path) -> None:
    port = free_port()
    gallery = tmp_path / "gallery"
    server = server_factory(gallery_dir=gallery, port=port)
    pipeline = EdgePipeline(EdgeConfig(faces="central"), detector=engine_parts[1])
    observations = []
    for index in range(1, 9):
        frame = Frame(read_rgb(lfw_image("Colin_Powell", index)), index, 0, str(index))
        observations += [f.observation for f in pipeline.process(frame)]

    results: dict[int, recognition_pb2.FaceResult] = {}
    config = StreamConfig(server=f"127.0.0.1:{port}", reconnect_initial_s=0.05, reconnect_max_s=0.2, max_in_flight=2,
                          security=ClientSecurity(token=server.admin_token))  # the restart keeps the gallery's tokens
    client = StreamClient(config, lambda result, pending: results.__setitem__(result.request_id, result)).start()
    for observation in observations[:4]:
        client.submit(observation)
    deadline = time.monotonic() + 30
    while len(results) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(results) == 4

    server.stop(grace=None)  # the cloud goes away while the device keeps capturing
    for observation in observations[4:]:
        client.submit(observation)
    time.sleep(0.3)
    server_factory(gallery_dir=gallery, port=port)  # ... and comes back on the same address

    stats = client.close(timeout=30)
    assert stats.unanswered == 0 and stats.dropped == 0 and not stats.errors
    assert stats.reconnects >= 1
    assert sorted(results) == [o.request_id for o in observations]
    assert all(r.decision == recognition_pb2.DECISION_UNKNOWN for r in results.values())  # empty gallery


def test_a_refused_stream_stops_the_client_with_the_reason() -> None:
    """A non-retryable status (here UNIMPLEMENTED from a server without facelink) is reported, not retried."""
    import grpc
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = StreamClient(StreamConfig(server=f"127.0.0.1:{port}"), lambda r, p: None).start()
        client.submit(recognition_pb2.FaceObservation(request_id=1))
        stats = client.close(timeout=10)
        assert stats.errors and "UNIMPLEMENTED" in stats.errors[0]
        assert stats.unanswered == 1
    finally:
        server.stop(None)
