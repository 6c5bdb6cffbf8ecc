"""The device's link: one bidirectional stream, bounded buffering, reconnect with backoff, deadlines.

Faces wait in a bounded queue; at most `max_in_flight` are on the wire unanswered, which
bounds both the device's memory and the latency a burst can add. When the stream breaks
(server restart, network loss), the faces that were in flight go back to the front of the
queue and are sent again on the next stream: delivery is at-least-once and nothing is lost
unless the queue overflows under the `drop_oldest` policy, which is counted.

What overflow drops: faces carry a track id (edge/tracks.py sends a few shots per person), and
a track needs only one of its shots answered to be decided. So a full queue first drops a shot
of a track that has another shot queued or on the wire (the one of lowest `quality`, the oldest
of equals), and only when every queued face is its track's only one does it drop the oldest
face, a whole track. `on_drop` hears of every drop (the track then stops waiting for its answer).

A stream can also stay open and stop answering (a hung server, a half-dead proxy). Each face
on the wire therefore has a deadline, `face_timeout_s`, that runs while the channel is
connected (an unreachable server is the reconnect logic's business, not a deadline's). When a
face misses it, the stream is taken as stuck: it is cancelled, and everything in flight is
resent on a fresh stream. A face that misses its deadline a second time is given up on: the
result callback receives a FaceResult made on the device, decision REJECTED with error code
DEADLINE_EXCEEDED (4), and StreamStats.timed_out counts it. So every submitted face ends as
a result (real or synthesized), a drop, or, at close(), `unanswered`; none waits forever.

The channel comes from facelink.transport.client_channel, secured by `StreamConfig.security`
(TLS, mutual TLS, bearer token).
"""

from __future__ import annotations

import collections
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from facelink.config import StreamConfig
from facelink.transport import client_channel
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
#: Deadlines a face may miss before it is reported failed: the first one sends it again on a
#: fresh stream (the old one may just have been stuck), the second one gives up.
_MAX_TIMEOUTS = 2
#: The longest the watchdog sleeps without looking at the in-flight faces again.
_WATCH_S = 0.5


@dataclass
class Pending:
    observation: recognition_pb2.FaceObservation
    meta: Any                 # whatever the caller wants back with the result
    submitted: float          # time.perf_counter() at submit
    attempts: int = 0         # times sent
    deadline: float = math.inf  # perf_counter() by which the current send must be answered
    timeouts: int = 0         # sends that missed their deadline
    quality: float = 0.0      # how good a shot of its track this is (edge/quality.py): overflow drops the worst


@dataclass
class StreamStats:
    submitted: int = 0
    answered: int = 0
    dropped: int = 0           # overflowed the queue under drop_oldest
    dropped_duplicates: int = 0  # of which shots of a track that had another shot queued or in flight
    resent: int = 0            # in flight when a stream broke or was found stuck, sent again
    reconnects: int = 0
    timed_out: int = 0         # missed the deadline twice: reported REJECTED / DEADLINE_EXCEEDED
    unanswered: int = 0        # still queued or in flight when the client was closed
    errors: list[str] = field(default_factory=list)


ResultCallback = Callable[[recognition_pb2.FaceResult, Pending], None]
DropCallback = Callable[[Pending], None]


def deadline_exceeded(result: recognition_pb2.FaceResult) -> bool:
    """Whether `result` is the device's own report of a face the server never answered."""
    return result.decision == recognition_pb2.DECISION_REJECTED and result.error.code == _DEADLINE_CODE


_DEADLINE_CODE = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


class StreamClient:
    """Streams faces to the Recognition service; `on_result` gets one FaceResult per face.

    `on_result` runs on the client's stream thread: it should be quick, and what it raises is
    logged, never propagated. `channel`, when given, is used as is (and not closed); otherwise
    the client opens one to `config.server` secured by `config.security`.
    """

    def __init__(
        self,
        config: StreamConfig,
        on_result: ResultCallback,
        channel: grpc.Channel | None = None,
        on_drop: DropCallback | None = None,
    ) -> None:
        self.config = config
        self.on_result = on_result
        self.on_drop = on_drop
        self.stats = StreamStats()
        self._channel = channel or client_channel(config.server, config.security)
        self._owns_channel = channel is None
        self._stub = recognition_pb2_grpc.RecognitionStub(self._channel)
        self._queue: collections.deque[Pending] = collections.deque()
        self._in_flight: dict[int, Pending] = {}
        self._cond = threading.Condition()
        self._closing = False
        self._stopped = False      # close() gave up, or the server refused the stream
        self._finished = False     # the stream thread has returned
        self._ready = False        # the channel is connected (deadlines only run then)
        self._stuck = False        # the current stream was cancelled for a missed deadline
        self._stream_id = 0
        self._call: grpc.Future | None = None  # the current stream, None between streams
        self._thread = threading.Thread(target=self._run, name="facelink-stream", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="facelink-deadlines", daemon=True)

    # -- producer side ---------------------------------------------------------------------
    def start(self) -> StreamClient:
        self._channel.subscribe(self._on_connectivity)
        self._thread.start()
        self._watchdog.start()
        return self

    def __enter__(self) -> StreamClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, observation: recognition_pb2.FaceObservation, meta: Any = None, *, quality: float = 0.0) -> None:
        """Queue one face. Blocks while the queue is full (policy `block`), or drops a face: a
        near-duplicate shot of a track first, else the oldest (module docstring)."""
        dropped: list[Pending] = []
        item = Pending(observation, meta, time.perf_counter(), quality=quality)
        try:
            with self._cond:
                if self._closing:
                    raise RuntimeError("submit() after close()")
                self.stats.submitted += 1
                while len(self._queue) + len(self._in_flight) >= self.config.queue_size:
                    if self.config.overflow == "drop_oldest" and self._queue:
                        victim = self._duplicate_shot(item)
                        if victim is None:
                            victim = self._queue.popleft()
                        else:
                            self.stats.dropped_duplicates += 1
                            if victim is item:  # the new shot is its track's worst: it never queues
                                self.stats.dropped += 1
                                dropped.append(item)
                                return
                            self._queue.remove(victim)
                        self.stats.dropped += 1
                        dropped.append(victim)
                        continue
                    self._cond.wait(0.5)
                    if self._stopped:
                        self.stats.submitted -= 1
                        raise RuntimeError("the stream client has stopped: " + "; ".join(self.stats.errors[-1:]))
                self._queue.append(item)
                self._cond.notify_all()
        finally:
            for item in dropped:  # outside the lock: the callback takes its own
                self._dropped(item)

    def _duplicate_shot(self, incoming: Pending) -> Pending | None:
        """The face to drop first: the worst shot (queued, or `incoming`) of a track with another shot
        queued, on the wire or incoming. Track id 0 means "no track": never a duplicate."""
        def key(p: Pending) -> tuple[str, int]:
            return p.observation.camera_id, p.observation.track_id

        everyone = (*self._queue, *self._in_flight.values(), incoming)
        counts = collections.Counter(key(p) for p in everyone if p.observation.track_id)
        candidates = (*self._queue, incoming)  # what is on the wire cannot be taken back
        duplicates = [p for p in candidates if p.observation.track_id and counts[key(p)] > 1]
        return min(duplicates, key=lambda p: p.quality, default=None)  # min keeps the first (oldest) of equals

    def _dropped(self, item: Pending) -> None:
        if self.on_drop is None:
            return
        try:
            self.on_drop(item)
        except Exception:
            log.exception("drop callback failed")

    def close(self, timeout: float | None = 60.0) -> StreamStats:
        """Send what is queued and wait for the answers, then disconnect; returns within about `timeout` s.

        On a live stream that stops answering, faces fail by their deadlines meanwhile; whatever is
        still queued or in flight when `timeout` runs out is given up and counted `unanswered`.
        None means the default 60 s, not forever: a device must never hang on its way out.
        """
        timeout = 60.0 if timeout is None else timeout
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            self._stopped = True
            self.stats.unanswered = len(self._queue) + len(self._in_flight)
            call = self._call
            self._cond.notify_all()
        if call is not None:
            call.cancel()  # ends the stream thread's wait for results
        for thread in (self._thread, self._watchdog):
            if thread.is_alive():
                thread.join(1.0)
        if self._thread.ident is not None:  # started: subscribed
            self._channel.unsubscribe(self._on_connectivity)
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
                item.deadline = time.perf_counter() + self.config.face_timeout_s
                self._in_flight[item.observation.request_id] = item
            yield item.observation

    def _run(self) -> None:
        try:
            self._serve_streams()
        finally:
            with self._cond:
                self._finished = True
                self._call = None
                self._cond.notify_all()

    def _serve_streams(self) -> None:
        """Open a stream, read its results until it ends, requeue or fail what it left, back off, repeat."""
        delay = self.config.reconnect_initial_s
        while True:
            with self._cond:
                if self._done():
                    return
                self._stream_id += 1
                stream_id = self._stream_id
                self._stuck = False
            try:
                call = self._stub.Recognize(self._requests(stream_id), wait_for_ready=True)
                with self._cond:
                    self._call = call
                for result in call:
                    delay = self.config.reconnect_initial_s  # the link works: reset the backoff
                    self._deliver(result)
            except grpc.RpcError as error:
                if not self._may_retry(error, delay):
                    return
            if not self._end_stream():
                return
            self._backoff(delay)
            delay = min(delay * 2, self.config.reconnect_max_s)

    def _deliver(self, result: recognition_pb2.FaceResult) -> None:
        with self._cond:
            item = self._in_flight.pop(result.request_id, None)
            self._cond.notify_all()
        if item is None:
            log.warning("result for unknown request %d (a duplicate after a resend?)", result.request_id)
            return
        self.stats.answered += 1
        self._callback(result, item)

    def _callback(self, result: recognition_pb2.FaceResult, item: Pending) -> None:
        try:
            self.on_result(result, item)
        except Exception:  # the caller's bug must not kill the link
            log.exception("result callback failed")

    def _may_retry(self, error: grpc.RpcError, delay: float) -> bool:
        """Whether a failed stream is worth opening again; a refusal stops the client with its reason."""
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        with self._cond:
            if self._stopped:
                return False
            stuck = self._stuck
        if code in _RETRYABLE:
            if not stuck:  # a stuck stream was cancelled on purpose, and the watchdog said so
                log.warning("stream to %s broke (%s); reconnecting in %.1fs", self.config.server, code.name, delay)
            return True
        message = f"stream refused with {code.name}: {error.details() if hasattr(error, 'details') else error}"
        log.error(message)
        with self._cond:
            self.stats.errors.append(message)
            self._stopped = True
            self._cond.notify_all()
        return False

    def _end_stream(self) -> bool:
        """The stream ended, normally or not: what it left unanswered is resent, or failed after
        its second missed deadline. False when there is nothing left to stream."""
        with self._cond:
            self._call = None
            left = sorted(self._in_flight.values(), key=lambda p: p.observation.request_id)
            self._in_flight.clear()
            failed = [p for p in left if p.timeouts >= _MAX_TIMEOUTS]
            resend = [p for p in left if p.timeouts < _MAX_TIMEOUTS]
            self._queue.extendleft(reversed(resend))
            self.stats.resent += len(resend)
            self.stats.timed_out += len(failed)
            self._stream_id += 1  # retire the old request generator
            self._cond.notify_all()
        for item in failed:
            self._callback(self._deadline_result(item), item)
        with self._cond:
            if self._done():
                return False
            self.stats.reconnects += 1
            return True

    def _backoff(self, delay: float) -> None:
        """Sleep before reconnecting, with jitter (fleets must not reconnect in lockstep); close() cuts it short."""
        until = time.monotonic() + delay * (0.8 + 0.4 * random.random())
        with self._cond:
            while not self._stopped and (remaining := until - time.monotonic()) > 0:
                self._cond.wait(remaining)

    def _deadline_result(self, item: Pending) -> recognition_pb2.FaceResult:
        """The device's own answer for a face the server did not answer in time, twice."""
        observation = item.observation
        return recognition_pb2.FaceResult(
            camera_id=observation.camera_id,
            frame_sequence=observation.frame_sequence,
            track_id=observation.track_id,
            face_index=observation.face_index,
            request_id=observation.request_id,
            decision=recognition_pb2.DECISION_REJECTED,
            error=recognition_pb2.Error(
                code=_DEADLINE_CODE,
                message=f"no answer from {self.config.server} within {self.config.face_timeout_s:g} s, "
                f"twice (sent {item.attempts} times, the last on a new stream): the server is stuck or overloaded",
            ),
        )

    # -- the deadline watchdog ------------------------------------------------------------------
    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        with self._cond:
            self._ready = state is grpc.ChannelConnectivity.READY
            self._cond.notify_all()

    def _watch(self) -> None:
        """Cancel the stream when a face on it misses its deadline (the stream thread resends or fails it)."""
        while True:
            with self._cond:
                if self._finished or self._stopped:
                    return
                stuck_call, wait_s = self._check_deadlines(time.perf_counter())
                if stuck_call is None:
                    self._cond.wait(wait_s)
            if stuck_call is not None:
                stuck_call.cancel()  # outside the lock: gRPC takes its own locks to cancel

    def _check_deadlines(self, now: float) -> tuple[grpc.Future | None, float]:
        """Under the lock: the call to cancel if a face on it is overdue, and how long to sleep if none."""
        timeout = self.config.face_timeout_s
        if not self._ready:
            # Not connected: nothing can be answered, so no deadline runs; each restarts in full
            # once the channel is back (the connectivity callback wakes this thread).
            for item in self._in_flight.values():
                if item.deadline != math.inf:
                    item.deadline = max(item.deadline, now + timeout)
            return None, _WATCH_S
        overdue = [item for item in self._in_flight.values() if item.deadline <= now]
        if overdue and self._call is not None:
            for item in overdue:
                item.timeouts += 1
                item.deadline = math.inf  # counted once per send
            self._stuck = True
            log.warning("no answer from %s to %d face(s) within %gs: the stream is stuck, opening a new one",
                        self.config.server, len(overdue), timeout)
            return self._call, 0.0
        next_deadline = min((item.deadline for item in self._in_flight.values()), default=math.inf)
        return None, min(_WATCH_S, max(0.01, next_deadline - now))
