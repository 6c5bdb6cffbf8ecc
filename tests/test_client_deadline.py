"""The stream client's per-face deadline: a live stream that stops answering is reopened, the face
resent once, then reported failed (DEADLINE_EXCEEDED); close() never outlives its timeout."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import pytest

from facelink.config import StreamConfig
from facelink.edge.client import Pending, StreamClient, deadline_exceeded
from facelink.v1 import recognition_pb2, recognition_pb2_grpc

DEADLINE = 0.6


class Forgetful(recognition_pb2_grpc.RecognitionServicer):
    """Answers every face at once, except those `ignore(request_id, times_seen)` says to ignore."""

    def __init__(self, ignore: Callable[[int, int], bool]) -> None:
        self.ignore = ignore
        self.seen: collections.Counter[int] = collections.Counter()
        self.streams = 0
        self._lock = threading.Lock()

    def Recognize(self, request_iterator, context) -> Iterator[recognition_pb2.FaceResult]:  # noqa: ANN001, N802
        with self._lock:
            self.streams += 1
        for observation in request_iterator:
            with self._lock:
                self.seen[observation.request_id] += 1
                times = self.seen[observation.request_id]
            if not self.ignore(observation.request_id, times):
                yield recognition_pb2.FaceResult(request_id=observation.request_id, decision=recognition_pb2.DECISION_UNKNOWN)


@pytest.fixture
def serve() -> Iterator[Callable[[Forgetful], str]]:
    servers: list[grpc.Server] = []

    def start(servicer: Forgetful) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        recognition_pb2_grpc.add_RecognitionServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


class Results:
    """Collects results with the time each arrived."""

    def __init__(self) -> None:
        self.by_id: dict[int, tuple[recognition_pb2.FaceResult, float]] = {}
        self._cond = threading.Condition()

    def __call__(self, result: recognition_pb2.FaceResult, pending: Pending) -> None:
        with self._cond:
            self.by_id[result.request_id] = (result, time.monotonic())
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: len(self.by_id) >= count, timeout)


def config(address: str, **extra: object) -> StreamConfig:
    settings = {"face_timeout_s": DEADLINE, "reconnect_initial_s": 0.05, "reconnect_max_s": 0.1} | extra
    return StreamConfig(server=address, **settings)


def test_a_face_never_answered_is_resent_once_then_reported(serve) -> None:  # noqa: ANN001
    server = Forgetful(ignore=lambda request_id, times: request_id == 3)
    results = Results()
    client = StreamClient(config(serve(server)), results).start()
    submitted = time.monotonic()
    for request_id in range(1, 6):
        client.submit(recognition_pb2.FaceObservation(request_id=request_id, camera_id="door-1", face_index=2))
    results.wait_for(5, timeout=10 * DEADLINE)
    stats = client.close(timeout=5)

    assert sorted(results.by_id) == [1, 2, 3, 4, 5]
    failed, at = results.by_id[3]
    assert deadline_exceeded(failed) and failed.decision == recognition_pb2.DECISION_REJECTED
    assert failed.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and "twice" in failed.error.message
    assert (failed.camera_id, failed.face_index) == ("door-1", 2)  # echoed like a server's answer
    assert 2 * DEADLINE <= at - submitted < 2 * DEADLINE + 1.5  # two deadlines, not a moment longer
    assert not any(deadline_exceeded(r) for i, (r, _) in results.by_id.items() if i != 3)
    assert server.seen[3] == 2 and server.streams >= 2  # resent once, on a fresh stream
    assert stats.timed_out == 1 and stats.answered == 4 and stats.unanswered == 0 and not stats.errors


def test_a_face_answered_on_its_resend_is_not_a_failure(serve) -> None:  # noqa: ANN001
    server = Forgetful(ignore=lambda request_id, times: request_id == 2 and times == 1)  # a one-off hiccup
    results = Results()
    client = StreamClient(config(serve(server)), results).start()
    for request_id in range(1, 4):
        client.submit(recognition_pb2.FaceObservation(request_id=request_id))
    results.wait_for(3, timeout=10 * DEADLINE)
    stats = client.close(timeout=5)
    assert sorted(results.by_id) == [1, 2, 3]
    assert not any(deadline_exceeded(result) for result, _ in results.by_id.values())
    assert stats.timed_out == 0 and stats.answered == 3 and stats.resent >= 1 and stats.reconnects >= 1


def test_close_returns_within_its_timeout_on_a_silent_stream(serve) -> None:  # noqa: ANN001
    server = Forgetful(ignore=lambda request_id, times: True)  # a hung server that keeps the stream open
    client = StreamClient(config(serve(server), face_timeout_s=60), Results()).start()
    for request_id in range(1, 4):
        client.submit(recognition_pb2.FaceObservation(request_id=request_id))
    time.sleep(0.2)
    started = time.monotonic()
    stats = client.close(timeout=0.5)
    assert time.monotonic() - started < 0.5 + 1.0
    assert stats.unanswered == 3 and stats.timed_out == 0


def test_no_deadline_runs_while_the_server_is_unreachable() -> None:
    """Down is not stuck: the reconnect logic waits for the server, faces are kept, not failed."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    results = Results()
    client = StreamClient(config(f"127.0.0.1:{port}", face_timeout_s=0.2), results).start()
    client.submit(recognition_pb2.FaceObservation(request_id=1))
    time.sleep(1.0)  # five deadlines
    stats = client.close(timeout=0.2)
    assert not results.by_id and stats.timed_out == 0 and stats.unanswered == 1
