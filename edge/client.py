"""The device's link: one bidirectional stream, bounded buffering, reconnect with backoff.

Faces wait in a bounded queue; at most `max_in_flight` are on the wire unanswered, which
bounds both the device's memory and the latency a burst can add. When the stream breaks
(server restart, network loss), the faces that were in flight go back to the front of the
queue and are sent again on the next stream: delivery is at-least-once and nothing is lost
unless the queue overflows under the `drop_oldest` policy, which is counted.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from facelink.config import StreamConfig
from facelink.v1 import recognition_pb2, recognition_pb2_grpc

log = logging.getLogger(__name__)

# Codes after which retrying the same stream makes sense; anything else is a bug or a
# refusal that resending would only repeat.
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}


@dataclass
class Pending:
    observation: recognition_pb2.FaceObservation
    meta: Any                 # whatever the caller wants back with the result
    submitted: float          # time.perf_counter() at submit
    attempts: int = 0


@dataclass
class StreamStats:
    submitted: int = 0
    answered: int = 0
    dropped: int = 0           # overflowed the queue under drop_oldest
    resent: int = 0            # in flight when a stream broke, sent again
    reconnects: int = 0
    unanswered: int = 0        # still queued or in flight when the client was closed
    errors: list[str] = field(default_factory=list)


ResultCallback = Callable[[recognition_pb2.FaceResult, Pending], None]


class StreamClient:
    def __init__(self, config: StreamConfig, on_result: ResultCallback, channel: grpc.Channel | None = None) -> None:
        self.config = config
        self.on_result = on_result
        self.stats = StreamStats()
        self._channel = channel or grpc.insecure_channel(
            config.server,
            options=[
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ],
        )
        self._owns_channel = channel is None
        self._stub = recognition_pb2_grpc.RecognitionStub(self._channel)
        self._queue: collections.deque[Pending] = collections.deque()
        self._in_flight: dict[int, Pending] = {}
        self._cond = threading.Condition()
        self._closing = False
        self._stopped = False
        self._stream_id = 0
        self._call: grpc.Future | None = None
        self._thread = threading.Thread(target=self._run, name="facelink-stream", daemon=True)

    # -- producer side ---------------------------------------------------------------------
    def start(self) -> "StreamClient":
        self._thread.start()
        return self

    def __enter__(self) -> "StreamClient":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, observation: recognition_pb2.FaceObservation, meta: Any = None) -> None:
        """Queue one face. Blocks while the queue is full (policy `block`), or drops the oldest."""
        with self._cond:
            if self._closing:
                raise RuntimeError("submit() after close()")
            while len(self._queue) + len(self._in_flight) >= self.config.queue_size:
                if self.config.overflow == "drop_oldest" and self._queue:
                    self._queue.popleft()
                    self.stats.dropped += 1
                    continue
                self._cond.wait(0.5)
                if self._stopped:
                    raise RuntimeError("the stream client has stopped: " + "; ".join(self.stats.errors[-1:]))
            self._queue.append(Pending(observation, meta, time.perf_counter()))
            self.stats.submitted += 1
            self._cond.notify_all()

    def close(self, timeout: float | None = 60.0) -> StreamStats:
        """Send what is queued, wait for every answer (up to `timeout`), then disconnect."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            self._stopped = True
            self.stats.unanswered = len(self._queue) + len(self._in_flight)
            self._cond.notify_all()
        if self._call is not None:
            self._call.cancel()
        if self._thread.is_alive():
            self._thread.join(5)
        if self._owns_channel:
            self._channel.close()
        return self.stats

    # -- the stream thread -------------------------------------------------------------------
    def _done(self) -> bool:
        return self._stopped or (self._closing and not self._queue and not self._in_flight)

    def _requests(self, stream_id: int) -> Iterator[recognition_pb2.FaceObservation]:
        """Feeds one stream; ends (half-closing it) when the client is drained or the stream is replaced."""
        while True:
            with self._cond:
                while True:
                    if self._stream_id != stream_id or self._stopped:
                        return
                    if self._closing and not self._queue:
                        return  # half-close: the server answers what is in flight, then ends
                    if self._queue and len(self._in_flight) < self.config.max_in_flight:
                        break
                    self._cond.wait(0.5)
                item = self._queue.popleft()
                item.attempts += 1
                self._in_flight[item.observation.request_id] = item
            yield item.observation

    def _run(self) -> None:
        delay = self.config.reconnect_initial_s
        while True:
            with self._cond:
                if self._done():
                    return
                self._stream_id += 1
                stream_id = self._stream_id
            try:
                self._call = self._stub.Recognize(self._requests(stream_id), wait_for_ready=True)
                for result in self._call:
                    delay = self.config.reconnect_initial_s  # the link works: reset the backoff
                    with self._cond:
                        item = self._in_flight.pop(result.request_id, None)
                        self._cond.notify_all()
                    if item is None:
                        log.warning("result for unknown request %d (a duplicate after a resend?)", result.request_id)
                        continue
                    self.stats.answered += 1
                    try:
                        self.on_result(result, item)
                    except Exception:  # the caller's bug must not kill the link
                        log.exception("result callback failed")
            except grpc.RpcError as error:
                code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
                with self._cond:
                    if self._stopped:
                        return
                if code not in _RETRYABLE:
                    message = f"stream refused with {code.name}: {error.details() if hasattr(error, 'details') else error}"
                    log.error(message)
                    with self._cond:
                        self.stats.errors.append(message)
                        self._stopped = True
                        self._cond.notify_all()
                    return
                log.warning("stream to %s broke (%s); reconnecting in %.1fs", self.config.server, code.name, delay)
            # The stream ended (normally or not): whatever is still in flight was not answered.
            with self._cond:
                if self._in_flight:
                    resend = sorted(self._in_flight.values(), key=lambda p: p.observation.request_id)
                    self._in_flight.clear()
                    self._queue.extendleft(reversed(resend))
                    self.stats.resent += len(resend)
                if self._done():
                    return
                self.stats.reconnects += 1
                self._stream_id += 1  # retire the old request generator
                self._cond.notify_all()
            time.sleep(delay * (0.8 + 0.4 * random.random()))  # jitter: fleets must not reconnect in lockstep
            delay = min(delay * 2, self.config.reconnect_max_s)
