"""Results out: one typed event per track decision, pushed to stdout/a file, a webhook or MQTT.

The edge sends several shots of a person while they stay in view; the cloud answers each one.
What leaves the device is per *track*, not per shot:

* ``decision``: the first answer for a track;
* ``update``: a better answer for the same track (a later shot scored higher, or turned an
  UNKNOWN into a MATCH);
* ``track_ended``: the track is gone; it carries the track's final decision.

Every sink has the same small interface: :meth:`EventSink.publish` never blocks the caller
(it is called from the stream's result thread, which must keep reading results),
:meth:`EventSink.close` drains what is queued within a deadline, and :attr:`EventSink.stats`
counts what happened. Network sinks keep a bounded queue served by one worker thread; when the
queue is full they drop the oldest ``update`` first, because a later update or the
``track_ended`` event supersedes it, while a ``decision`` or ``track_ended`` is the only record
of a person and goes last.

An UNKNOWN never carries a gallery name: the cloud reports its best guess even below the
threshold, and publishing that guess would label a stranger with someone's identity. The model
refuses such an event outright.
"""

from __future__ import annotations

import abc
import collections
import email.utils
import hashlib
import hmac
import http.client
import ipaddress
import itertools
import logging
import math
import random
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from facelink import __version__
from facelink.config import EventsConfig  # the edge's typed configuration owns it; re-exported here

if TYPE_CHECKING:  # the stubs are only needed for TrackEvent.from_result's signature
    from facelink.v1 import recognition_pb2

log = logging.getLogger(__name__)

__all__ = [
    "EventBox",
    "EventSink",
    "EventsConfig",
    "JsonLinesSink",
    "MqttSink",
    "MultiSink",
    "SinkStats",
    "TrackEvent",
    "WebhookSink",
    "build_sinks",
    "sign_webhook",
    "topic_level",
]

EventType = Literal["decision", "update", "track_ended"]
DecisionName = Literal["match", "unknown", "rejected"]
_S = TypeVar("_S", bound="EventSink")


# --------------------------------------------------------------------------------------------
# The event model
# --------------------------------------------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EventBox(_Frozen):
    """A face box in source-frame pixels (top-left corner, size)."""

    x: float
    y: float
    width: float = Field(ge=0)
    height: float = Field(ge=0)


def utc_from_us(us: int) -> datetime:
    """A UTC datetime from microseconds since the Unix epoch (FaceObservation.capture_time_us)."""
    # Integer arithmetic: a float of ~1.7e15 us keeps only ~0.25 us of precision.
    seconds, micros = divmod(int(us), 1_000_000)
    return datetime.fromtimestamp(seconds, timezone.utc).replace(microsecond=micros)


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class TrackEvent(_Frozen):
    """One thing that happened to one track of one camera. Serialises to one JSON line.

    Times are timezone-aware and normalised to UTC (serialised as ISO-8601 with ``Z``); a naive
    datetime is refused, since its meaning would depend on the device's time zone.
    """

    type: EventType
    camera: str = Field(min_length=1)
    track: int = Field(ge=0)
    event_time: AwareDatetime
    capture_time: AwareDatetime
    box: EventBox
    decision: DecisionName
    identity: str | None = None
    score: float | None = None
    shots: int = Field(ge=0, description="shots sent for this track so far")
    unknown_id: str | None = None
    error: str | None = None

    @field_validator("event_time", "capture_time")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return value.astimezone(timezone.utc)

    @field_validator("camera", "identity", "unknown_id", "error")
    @classmethod
    def _encodable(cls, value: str | None) -> str | None:
        # A lone surrogate cannot be written as UTF-8: the event could never be serialised.
        if value is not None:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(f"{value!r} is not valid text (a lone surrogate at {err.start})") from None
        return value

    @field_validator("score")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        # NaN/inf would serialise to null or invalid JSON, and mean nothing as a similarity.
        if value is not None and not math.isfinite(value):
            raise ValueError(f"score must be a finite number, got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrackEvent:
        if self.decision == "match":
            if not self.identity:
                raise ValueError("a 'match' event needs the matched identity")
        elif self.identity is not None:
            # The cloud's best guess below the threshold is not an identity: never publish it.
            raise ValueError(
                f"identity must be None unless decision == 'match' (got decision={self.decision!r}, "
                f"identity={self.identity!r}): an unknown or rejected face never carries a gallery name"
            )
        if self.unknown_id is not None and self.decision != "unknown":
            raise ValueError(f"unknown_id is only for decision == 'unknown', not {self.decision!r}")
        if self.error is not None and self.decision != "rejected":
            raise ValueError(f"error is only for decision == 'rejected', not {self.decision!r}")
        return self

    @property
    def critical(self) -> bool:
        """Decisions and track ends are the only record of a person; updates are superseded."""
        return self.type != "update"

    def to_json(self) -> str:
        """One line of compact JSON (no newline inside or at the end)."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, line: str | bytes) -> TrackEvent:
        return cls.model_validate_json(line)

    @classmethod
    def from_result(
        cls,
        type: EventType,
        result: recognition_pb2.FaceResult,
        observation: recognition_pb2.FaceObservation,
        *,
        shots: int,
        event_time: datetime | None = None,
        unknown_id: str | None = None,
    ) -> TrackEvent:
        """The event for a FaceResult and the FaceObservation it answers.

        The result's `identity` is the best gallery identity whatever the decision; it is kept
        only for a MATCH. The score is left out of REJECTED results (no decision was made).
        """
        from facelink.v1 import recognition_pb2 as pb

        names: dict[int, DecisionName] = {
            pb.DECISION_MATCH: "match", pb.DECISION_UNKNOWN: "unknown", pb.DECISION_REJECTED: "rejected"
        }
        if result.decision not in names:
            raise ValueError(f"result for track {result.track_id} has no decision ({result.decision})")
        decision = names[result.decision]
        b = observation.box
        return cls(
            type=type,
            camera=result.camera_id or observation.camera_id,
            track=result.track_id,
            event_time=event_time or _utc_now(),
            capture_time=utc_from_us(observation.capture_time_us),
            box=EventBox(x=b.x, y=b.y, width=b.width, height=b.height),
            decision=decision,
            identity=result.identity if decision == "match" else None,
            score=None if decision == "rejected" else float(result.score),
            shots=shots,
            unknown_id=unknown_id if decision == "unknown" else None,
            error=(result.error.message or "rejected") if decision == "rejected" else None,
        )


# --------------------------------------------------------------------------------------------
# Sinks: the common part
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SinkStats:
    """What a sink did with the events it was given.

    accepted = delivered + failed + dropped + queued (+ in hand, for a moment).
    """

    name: str
    accepted: int = 0          # handed to publish()
    delivered: int = 0         # written, answered 2xx, or acknowledged by the broker
    failed: int = 0            # given up on: refused, retries exhausted, or a write error
    retries: int = 0           # extra attempts (webhook)
    dropped: int = 0           # never attempted: queue overflow, or still queued at close
    dropped_critical: int = 0  # of which decision/track_ended events (only when no update was left)
    queued: int = 0            # waiting right now

    def __add__(self, other: SinkStats) -> SinkStats:
        counts = [f.name for f in fields(self) if f.name != "name"]
        sums = {k: getattr(self, k) + getattr(other, k) for k in counts}
        return SinkStats(name=self.name, **sums)


class _Counters:
    """Mutable counters behind a lock; :meth:`snapshot` gives the frozen view."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._values = dict.fromkeys(
            ("accepted", "delivered", "failed", "retries", "dropped", "dropped_critical"), 0
        )

    def add(self, **increments: int) -> None:
        with self._lock:
            for key, n in increments.items():
                self._values[key] += n

    def snapshot(self, queued: int = 0) -> SinkStats:
        with self._lock:
            return SinkStats(name=self.name, queued=queued, **self._values)


class EventSink(abc.ABC):
    """Where events go. `publish` never blocks for long; `close` drains within `timeout`."""

    name: str = "sink"

    @abc.abstractmethod
    def publish(self, event: TrackEvent) -> None: ...

    @abc.abstractmethod
    def close(self, timeout: float = 5.0) -> SinkStats: ...

    @property
    @abc.abstractmethod
    def stats(self) -> SinkStats: ...

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Backlog:
    """A bounded FIFO that makes room by dropping the oldest *update* first.

    Updates and critical events (decision, track_ended) sit in two deques stamped with a
    sequence number, so the oldest update is found in O(1) and the merged order is still the
    arrival order. Not thread-safe: the owning sink holds its lock.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"queue capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._seq = itertools.count()
        self._updates: collections.deque[tuple[int, TrackEvent]] = collections.deque()
        self._critical: collections.deque[tuple[int, TrackEvent]] = collections.deque()

    def __len__(self) -> int:
        return len(self._updates) + len(self._critical)

    def put(self, event: TrackEvent) -> TrackEvent | None:
        """Queue `event`; returns the event dropped to make room, if any (possibly `event`)."""
        dropped = None
        if len(self) >= self.capacity:
            if self._updates:
                dropped = self._updates.popleft()[1]
            elif not event.critical:
                return event  # the queue is all decisions: the new update is the least valuable
            else:
                dropped = self._critical.popleft()[1]  # nothing else left to sacrifice
        (self._critical if event.critical else self._updates).append((next(self._seq), event))
        return dropped

    def pop(self) -> TrackEvent:
        if not self._updates or (self._critical and self._critical[0][0] < self._updates[0][0]):
            return self._critical.popleft()[1]
        return self._updates.popleft()[1]

    def clear(self) -> list[TrackEvent]:
        left = [e for _, e in sorted(itertools.chain(self._updates, self._critical), key=lambda p: p[0])]
        self._updates.clear()
        self._critical.clear()
        return left


_DROP_WARNING_INTERVAL_S = 10.0


class _Outcome(Enum):
    DELIVERED = "delivered"
    FAILED = "failed"
    HANDED_OFF = "handed_off"  # another component reports the outcome later (MQTT's PUBACK)


class _QueuedSink(EventSink):
    """A sink whose deliveries happen on one worker thread fed by a bounded :class:`_Backlog`."""

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self._counters = _Counters(name)
        self._backlog = _Backlog(capacity)
        self._cond = threading.Condition()
        self._closing = False
        # Set when close() runs out of time: backoff sleeps and waits end at once.
        self._abort = threading.Event()
        self._warned_closed = False
        self._last_drop_warning = -math.inf
        self._unlogged_critical = 0
        self._worker = threading.Thread(target=self._run, name=f"facelink-events-{name}", daemon=True)

    def _start(self) -> None:
        self._worker.start()

    def publish(self, event: TrackEvent) -> None:
        with self._cond:
            self._counters.add(accepted=1)
            if self._closing:
                # The caller is a result thread racing with shutdown; raising there would end the stream.
                self._counters.add(dropped=1, dropped_critical=int(event.critical))
                if not self._warned_closed:
                    self._warned_closed = True
                    log.warning("%s sink is closed: events published after close() are dropped", self.name)
                return
            dropped = self._backlog.put(event)
            if dropped is not None:
                self._count_dropped(
                    [dropped], "the queue is full of them; the destination is too slow or unreachable"
                )
            self._cond.notify()

    def _count_dropped(self, events: Sequence[TrackEvent], why: str) -> None:
        critical = sum(e.critical for e in events)
        self._counters.add(dropped=len(events), dropped_critical=critical)
        if not critical:
            return  # dropping updates is the queue doing its job: counted, not logged
        # At most one warning per interval: a destination that is down for an hour must not
        # turn into one log line per face.
        with self._cond:  # an RLock: publish() calls this with it held
            self._unlogged_critical += critical
            now = time.monotonic()
            if now - self._last_drop_warning < _DROP_WARNING_INTERVAL_S:
                return
            count, self._unlogged_critical, self._last_drop_warning = self._unlogged_critical, 0, now
        log.warning("%s sink dropped %d decision/track_ended event(s): %s", self.name, count, why)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._backlog and not self._closing:
                    self._cond.wait()
                if not self._backlog or self._abort.is_set():
                    return
                event = self._backlog.pop()
            try:
                outcome = self._deliver(event)
            except Exception:  # a bug in a sink must not kill the worker and silently stop all output
                log.exception("%s sink failed on an event of track %d", self.name, event.track)
                outcome = _Outcome.FAILED
            if outcome is _Outcome.DELIVERED:
                self._counters.add(delivered=1)
            elif outcome is _Outcome.FAILED:
                self._counters.add(failed=1)

    @abc.abstractmethod
    def _deliver(self, event: TrackEvent) -> _Outcome: ...

    def _wait(self, seconds: float) -> bool:
        """Sleep unless close() gives up meanwhile; True when it did (stop retrying)."""
        return self._abort.wait(max(0.0, seconds))

    def close(self, timeout: float = 5.0) -> SinkStats:
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            if self._closing:
                return self._counters.snapshot(len(self._backlog))  # closed already
            self._closing = True
            self._cond.notify_all()
        if self._worker.is_alive():
            self._worker.join(max(0.0, deadline - time.monotonic()))
        if self._worker.is_alive():
            self._abort.set()
            with self._cond:
                left = self._backlog.clear()
            if left:
                self._count_dropped(left, f"still queued when close() gave up after {timeout:.1f} s")
        self._after_drain(deadline)
        return self.stats

    def _after_drain(self, deadline: float) -> None:
        """Subclass hook: finish what the worker handed off, release connections."""

    @property
    def stats(self) -> SinkStats:
        with self._cond:
            queued = len(self._backlog)
        return self._counters.snapshot(queued)


# --------------------------------------------------------------------------------------------
# JSON lines
# --------------------------------------------------------------------------------------------


class JsonLinesSink(EventSink):
    """One JSON object per line, to stdout (``"-"``), an open text stream, or a file (appended).

    Writes happen on the caller's thread: a local file or stdout is fast, and writing at once
    keeps the output in step with the log. Each line is flushed so `tail -f` and pipes see it.
    """

    def __init__(self, stream_or_path: IO[str] | str | Path = "-") -> None:
        self._lock = threading.Lock()
        self._owned = False
        if isinstance(stream_or_path, (str, Path)):
            if str(stream_or_path) == "-":
                self._stream: IO[str] = sys.stdout
                self.name = "jsonl:stdout"
            else:
                path = Path(stream_or_path).expanduser()
                try:
                    # Line-buffered append: several runs add to one log, and nothing sits in a buffer.
                    self._stream = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (closed in close())
                except OSError as err:
                    raise OSError(f"cannot open the event log {path} for appending: {err.strerror}") from err
                self._owned = True
                self.name = f"jsonl:{path}"
        else:
            self._stream = stream_or_path
            self.name = "jsonl:stream"
        self._counters = _Counters(self.name)
        self._closed = False

    def publish(self, event: TrackEvent) -> None:
        line = event.to_json() + "\n"
        with self._lock:
            self._counters.add(accepted=1)
            if self._closed:
                self._counters.add(dropped=1, dropped_critical=int(event.critical))
                return
            try:
                self._stream.write(line)
                self._stream.flush()
            except (OSError, ValueError) as err:  # disk full, closed pipe, closed stream
                self._counters.add(failed=1)
                log.warning("%s: cannot write an event: %s", self.name, err)
                return
            self._counters.add(delivered=1)

    def close(self, timeout: float = 5.0) -> SinkStats:
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._owned:
                    self._stream.close()
        return self.stats

    @property
    def stats(self) -> SinkStats:
        return self._counters.snapshot()


# --------------------------------------------------------------------------------------------
# Webhook
# --------------------------------------------------------------------------------------------


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def sign_webhook(secret: str | bytes, timestamp: str, body: bytes) -> str:
    """The X-Facelink-Signature value: ``sha256=`` + hex HMAC-SHA256 of ``timestamp.body``."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    mac = hmac.new(key, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect could send a signed event to another host, or downgrade it to http: refuse it."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None  # urllib then raises HTTPError with the 3xx code


class WebhookSink(_QueuedSink):
    """POSTs each event as JSON to `url`, signed with a shared secret.

    Headers of every request:

    * ``Content-Type: application/json``
    * ``X-Facelink-Timestamp``: Unix time in whole seconds when the request was signed;
    * ``X-Facelink-Signature``: ``sha256=`` + hex HMAC-SHA256, keyed with the secret (UTF-8),
      of the timestamp, a dot and the exact body bytes: ``f"{timestamp}.{body}"``;
    * ``X-Facelink-Delivery``: one random id per event, the same on every retry, so a receiver
      can discard a duplicate (a retry after a response that was lost on the way back).

    A receiver verifies a request like this (before parsing the JSON, on the raw bytes)::

        import hashlib, hmac, time
        ts = request.headers["X-Facelink-Timestamp"]
        expected = "sha256=" + hmac.new(secret.encode(), ts.encode() + b"." + raw_body,
                                        hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, request.headers["X-Facelink-Signature"]):
            reject(401)                       # not from a device that holds the secret
        if abs(time.time() - int(ts)) > 300:
            reject(401)                       # a replay of an old request (allow for clock skew)

    The timestamp is inside the signed material so that a captured request cannot be replayed
    later with a fresh timestamp; each retry is signed anew.

    Delivery: connection errors, timeouts, 5xx and 429 are retried up to `max_retries` times
    with exponential backoff (`backoff` * 2^attempt, with jitter so many devices do not retry in
    step, at most `max_backoff`); a ``Retry-After`` header sets the wait instead (also at most
    `max_backoff`, so one busy receiver cannot stall the queue for hours). Other 4xx mean the
    receiver refuses this request (bad signature, bad URL): resending the same bytes would only
    be refused again, so they are not retried. Redirects are not followed.

    http:// is refused unless the host is loopback or `allow_insecure` is set: the events name
    people, and the body and signature would travel in clear text.
    """

    def __init__(
        self,
        url: str,
        secret: str | bytes,
        *,
        timeout: float = 5.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        capacity: int = 1000,
        allow_insecure: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"webhook URL must be http(s)://host/...; got {url!r}")
        if parts.scheme == "http" and not _is_loopback(parts.hostname) and not allow_insecure:
            raise ValueError(
                f"refusing plain http:// to {parts.hostname}: events and their signature would travel "
                "unencrypted; use https://, or allow_insecure=True on a network you trust"
            )
        if not secret:
            raise ValueError(
                "the webhook secret is empty: the receiver could not tell our requests from forged ones"
            )
        if timeout <= 0 or max_retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError(
                f"need timeout > 0, max_retries >= 0, backoff >= 0, max_backoff >= 0; got "
                f"{timeout}, {max_retries}, {backoff}, {max_backoff}"
            )
        port = f":{parts.port}" if parts.port else ""
        # The query string may hold a token: keep it out of names and logs.
        self._where = f"{parts.scheme}://{parts.hostname}{port}{parts.path}"
        super().__init__(f"webhook:{self._where}", capacity)
        self.url = url
        self._secret = secret
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self._opener = urllib.request.build_opener(
            _RefuseRedirects(), urllib.request.HTTPSHandler(context=ssl_context)
        )
        self._start()

    def _request(self, body: bytes, delivery: str) -> urllib.request.Request:
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"facelink/{__version__}",
            "X-Facelink-Timestamp": timestamp,
            "X-Facelink-Signature": sign_webhook(self._secret, timestamp, body),
            "X-Facelink-Delivery": delivery,
        }
        return urllib.request.Request(self.url, data=body, headers=headers, method="POST")

    def _deliver(self, event: TrackEvent) -> _Outcome:
        body = event.to_json().encode("utf-8")
        delivery = uuid.uuid4().hex
        for attempt in range(self.max_retries + 1):
            retry_after: float | None = None
            try:
                with self._opener.open(self._request(body, delivery), timeout=self.timeout) as response:
                    response.read(65536)  # drain a little so the connection closes cleanly
                return _Outcome.DELIVERED
            except urllib.error.HTTPError as err:
                status = err.code
                retry_after = _retry_after(err.headers.get("Retry-After"))
                err.close()
                if status != 429 and status < 500:
                    log.warning("%s refused an event of track %d: HTTP %d %s (not retried)",
                                self._where, event.track, status, err.reason)
                    return _Outcome.FAILED
                problem = f"HTTP {status}"
            except urllib.error.URLError as err:
                if isinstance(err.reason, ssl.SSLCertVerificationError):
                    log.warning("%s: TLS certificate not trusted (%s); not retried", self._where, err.reason)
                    return _Outcome.FAILED
                problem = f"cannot connect: {err.reason}"
            except (OSError, http.client.HTTPException) as err:  # timeouts, resets, garbled responses
                problem = f"{type(err).__name__}: {err}"
            if attempt == self.max_retries:
                log.warning("%s: giving up on an event of track %d after %d attempt(s): %s",
                            self._where, event.track, attempt + 1, problem)
                return _Outcome.FAILED
            if retry_after is None:
                delay = self._backoff_delay(attempt)
            else:
                delay = min(retry_after, self.max_backoff)
            log.info("%s: %s; retry %d/%d in %.2f s",
                     self._where, problem, attempt + 1, self.max_retries, delay)
            self._counters.add(retries=1)
            if self._wait(delay):
                return _Outcome.FAILED  # close() ran out of time
        return _Outcome.FAILED  # unreachable: the loop returns on its last attempt

    def _backoff_delay(self, attempt: int) -> float:
        # "Equal jitter": at least half the exponential step, so retries still space out.
        step = min(self.max_backoff, self.backoff * 2**attempt)
        return random.uniform(step / 2, step)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - _utc_now()).total_seconds())


# --------------------------------------------------------------------------------------------
# MQTT
# --------------------------------------------------------------------------------------------

def _unsafe_in_topic(char: str) -> bool:
    """Characters that must not appear raw inside one topic level.

    The wildcards and the separator would change what the topic means. Brokers refuse topics
    with control characters (C0 and C1), surrogates and Unicode non-characters (mosquitto
    drops the connection): paho would then resend the same message after every reconnect and
    block the sink for good, so none of them may reach the wire. '%' is escaped too, which
    keeps the mapping injective: two different names never share a topic.
    """
    c = ord(char)
    return (
        char in "+#/%"
        or c < 0x20
        or 0x7F <= c <= 0x9F
        or 0xD800 <= c <= 0xDFFF
        or 0xFDD0 <= c <= 0xFDEF
        or (c & 0xFFFE) == 0xFFFE
    )


def topic_level(name: str) -> str:
    """`name` as one MQTT topic level: unsafe characters percent-encoded as UTF-8 (``a/b`` ->
    ``a%2Fb``), everything else (accents, any script) kept as it is.

    A subscriber gets the original back with ``urllib.parse.unquote``. An empty name becomes
    ``_`` (an empty level would silently merge with its neighbours in most tools).
    """
    if not name:
        return "_"
    return "".join(
        "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass")) if _unsafe_in_topic(c) else c
        for c in name
    )


def _check_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    # '/' is allowed here: a prefix may span several levels ("site-3/facelink").
    bad = [c for c in prefix if c != "/" and _unsafe_in_topic(c)]
    if not prefix or prefix.startswith("$") or bad:
        raise ValueError(
            f"MQTT topic prefix {prefix!r} must be non-empty, without '+', '#', '%' or control "
            "characters, and must not start with '$' (reserved for the broker)"
        )
    return prefix


class MqttSink(_QueuedSink):
    """Publishes events to an MQTT broker (paho-mqtt 2, qos 1 by default).

    Topics, with `camera` and `identity` escaped by :func:`topic_level`:

    * ``<prefix>/<camera>/events``: every event, as its JSON line;
    * ``<prefix>/<camera>/identity/<identity>``: matches (decision/update/track_ended events
      with decision ``match``), so a subscriber can follow one person;
    * ``<prefix>/<camera>/availability``: ``online`` (retained) once connected, ``offline``
      (retained) on close, and as the broker's last will when the device vanishes. A connection
      has a single will, so availability is for the one `camera` given here (the device's own).

    paho reconnects by itself (its network thread, with `reconnect_delay` .. `max_reconnect_delay`
    backoff) and keeps qos>0 messages it could not send, resending them after a reconnect. To
    keep that buffer bounded, at most `max_unacked` messages are with paho unacknowledged; past
    that the events wait in this sink's own queue, where the oldest updates are dropped first.

    Credentials without TLS are refused for a non-loopback broker unless `allow_insecure`.
    TLS is on when `tls` is True, or when `tls_ca` is given (None: off unless `tls_ca`).
    """

    def __init__(
        self,
        host: str,
        port: int | None = None,
        *,
        camera: str,
        topic_prefix: str = "facelink",
        username: str | None = None,
        password: str | None = None,
        tls: bool | None = None,
        tls_ca: str | Path | None = None,
        tls_certfile: str | Path | None = None,
        tls_keyfile: str | Path | None = None,
        qos: int = 1,
        client_id: str | None = None,
        keepalive: int = 30,
        reconnect_delay: float = 1.0,
        max_reconnect_delay: float = 30.0,
        max_unacked: int = 100,
        capacity: int = 1000,
        allow_insecure: bool = False,
    ) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError as err:  # a base dependency, but an old environment may predate it
            raise ImportError("MqttSink needs paho-mqtt >= 2.0: pip install 'paho-mqtt>=2.0'") from err
        if not hasattr(mqtt, "CallbackAPIVersion"):
            raise ImportError("MqttSink needs paho-mqtt >= 2.0's v2 callback API: pip install -U paho-mqtt")
        if qos not in (0, 1, 2):
            raise ValueError(f"MQTT qos must be 0, 1 or 2, got {qos}")
        if max_unacked < 1:
            raise ValueError(f"max_unacked must be >= 1, got {max_unacked}")
        use_tls = bool(tls_ca) if tls is None else tls
        if (tls_certfile or tls_keyfile) and not use_tls:
            raise ValueError("tls_certfile/tls_keyfile need TLS: set tls_ca or tls=True")
        if password is not None and username is None:
            raise ValueError("an MQTT password needs a username")
        if username is not None and not use_tls and not _is_loopback(host) and not allow_insecure:
            raise ValueError(
                f"refusing to send MQTT credentials to {host} without TLS: set tls_ca (or tls=True), "
                "or allow_insecure=True on a network you trust"
            )
        self.host = host
        self.port = int(port) if port is not None else (8883 if use_tls else 1883)
        self.prefix = _check_prefix(topic_prefix)
        self.camera = camera
        self.qos = qos
        self.availability_topic = f"{self.prefix}/{topic_level(camera)}/availability"
        super().__init__(f"mqtt:{host}:{self.port}", capacity)

        self._mqtt = mqtt
        self._max_unacked = max_unacked
        # mid -> the event it carries on the events topic (what `delivered` counts), or None for
        # the identity and availability topics.
        self._unacked: dict[int, TrackEvent | None] = {}
        # PUBACKs that arrived before publish() returned and its mid was recorded.
        self._early_acks: set[int] = set()
        self._room = threading.Condition()

        # Random, not derived from the camera: two devices configured with the same camera name
        # must not keep kicking each other off the broker (one connection per client id). 20
        # alphanumerics: MQTT 3.1.1 only obliges brokers to accept up to 23 of [0-9a-zA-Z].
        cid = client_id or f"facelink{uuid.uuid4().hex[:12]}"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv311)
        if username is not None:
            client.username_pw_set(username, password)
        if use_tls:
            client.tls_set(
                ca_certs=str(tls_ca) if tls_ca else None,
                certfile=str(tls_certfile) if tls_certfile else None,
                keyfile=str(tls_keyfile) if tls_keyfile else None,
            )
        client.will_set(self.availability_topic, "offline", qos=1, retain=True)
        client.reconnect_delay_set(reconnect_delay, max_reconnect_delay)  # type: ignore[arg-type]
        client.max_queued_messages_set(0)  # unbounded in paho: `max_unacked` bounds it from here
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._client = client
        # connect_async + loop_start: the first connection is made (and retried while the broker
        # is down) on paho's thread, so a device starts even when the broker is not up yet.
        client.connect_async(host, self.port, keepalive=keepalive)
        client.loop_start()
        self._start()

    # --- paho callbacks (paho's network thread) ---

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            # e.g. "Not authorized": paho keeps retrying; say why, since nothing will get through.
            log.error("%s refused the connection: %s", self.name, reason_code)
            return
        log.info("%s connected", self.name)
        info = client.publish(self.availability_topic, "online", qos=1, retain=True)
        self._track(info.mid, None)

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        if not self._closing:
            log.warning("%s disconnected (%s); reconnecting", self.name, reason_code)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._room:
            if mid in self._unacked:
                self._acked(mid)
            else:
                self._early_acks.add(mid)

    # --- bookkeeping of what paho holds ---

    def _acked(self, mid: int) -> None:
        """Called with self._room held."""
        if self._unacked.pop(mid) is not None:
            self._counters.add(delivered=1)
        self._room.notify_all()

    def _track(self, mid: int, event: TrackEvent | None) -> None:
        with self._room:
            self._unacked[mid] = event
            if mid in self._early_acks:
                self._early_acks.discard(mid)
                self._acked(mid)

    def _wait_for_room(self) -> bool:
        with self._room:
            while len(self._unacked) >= self._max_unacked:
                if self._abort.is_set():
                    return False
                self._room.wait(0.1)  # also woken by _acked; the timeout re-checks _abort
        return True

    # --- delivery (worker thread) ---

    def _topics(self, event: TrackEvent) -> list[tuple[str, bool]]:
        base = f"{self.prefix}/{topic_level(event.camera)}"
        topics = [(f"{base}/events", True)]
        if event.decision == "match" and event.identity:
            topics.append((f"{base}/identity/{topic_level(event.identity)}", False))
        return topics

    def _deliver(self, event: TrackEvent) -> _Outcome:
        payload = event.to_json()
        for topic, is_events in self._topics(event):
            if not self._wait_for_room():
                # close() gave up while the broker was away.
                if is_events:
                    self._count_dropped([event], "the broker was unreachable until close() gave up")
                return _Outcome.HANDED_OFF
            info = self._client.publish(topic, payload, qos=self.qos)
            # NO_CONN is fine at qos > 0: paho keeps the message and sends it after reconnecting.
            queued = info.rc == self._mqtt.MQTT_ERR_SUCCESS or (
                info.rc == self._mqtt.MQTT_ERR_NO_CONN and self.qos > 0
            )
            if not queued:
                problem = self._mqtt.error_string(info.rc)
                log.warning("%s: cannot publish to %s: %s", self.name, topic, problem)
                if is_events:
                    return _Outcome.FAILED
                continue
            self._track(info.mid, event if is_events else None)
        return _Outcome.HANDED_OFF

    def _after_drain(self, deadline: float) -> None:
        # Wait for the broker to acknowledge what paho still holds, then say goodbye.
        with self._room:
            while self._unacked and time.monotonic() < deadline:
                self._room.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            never_acked = [e for e in self._unacked.values() if e is not None]
        if never_acked:
            self._count_dropped(never_acked, "not acknowledged by the broker when close() gave up")
        goodbye = self._client.is_connected()
        if goodbye:
            # No need to wait for its PUBACK: the broker handles packets of one connection in
            # order, so it has the goodbye before it sees the DISCONNECT that follows.
            self._client.publish(self.availability_topic, "offline", qos=1, retain=True)
        self._client.disconnect()
        # loop_stop() joins paho's thread, which may sit in a reconnect wait or a TCP connect for
        # seconds when the broker is away: join it from a helper so close() keeps its deadline
        # (paho's thread ends by itself once that wait is over).
        stopper = threading.Thread(target=self._client.loop_stop, name=f"{self.name}-stop", daemon=True)
        stopper.start()
        # With a goodbye to send, give it a moment even when the deadline has passed.
        stopper.join(max(0.5 if goodbye else 0.0, deadline - time.monotonic()))

    @property
    def connected(self) -> bool:
        return bool(self._client.is_connected())


# --------------------------------------------------------------------------------------------
# Fan-out and configuration
# --------------------------------------------------------------------------------------------


class MultiSink(EventSink):
    """Every event to every sink. One sink's failure never keeps an event from the others."""

    def __init__(self, sinks: Iterable[EventSink]) -> None:
        self.sinks = list(sinks)
        self.name = "multi[" + ", ".join(s.name for s in self.sinks) + "]"

    def __len__(self) -> int:
        return len(self.sinks)

    def publish(self, event: TrackEvent) -> None:
        for sink in self.sinks:
            try:
                sink.publish(event)
            except Exception:
                log.exception("%s failed to take an event", sink.name)

    def close(self, timeout: float = 5.0) -> SinkStats:
        # One deadline for all: the network sinks have been draining on their own threads all
        # along, so closing them one after the other still waits about `timeout` at most.
        deadline = time.monotonic() + max(0.0, timeout)
        for sink in self.sinks:
            try:
                sink.close(max(0.0, deadline - time.monotonic()))
            except Exception:
                log.exception("%s failed to close", sink.name)
        return self.stats

    @property
    def stats(self) -> SinkStats:
        """The sum over all sinks (each sink's own: ``[s.stats for s in self.sinks]``)."""
        total = SinkStats(name=self.name)
        for sink in self.sinks:
            total = total + sink.stats
        return total


def _read_secret(path: Path, what: str) -> str:
    try:
        secret = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError as err:
        raise OSError(f"cannot read the {what} from {path}: {err.strerror}") from err
    if not secret:
        raise ValueError(f"the {what} file {path} is empty")
    return secret


def build_sinks(spec: EventsConfig, *, camera: str) -> MultiSink:
    """The sinks `spec` asks for, as one MultiSink (empty when nothing is configured).

    `camera` is the device's camera id: MQTT's availability topic and last will are about it.
    Secrets are read from their files here, so they never sit in a config dump or a command line.
    """
    sinks: list[EventSink] = []
    try:
        if spec.jsonl:
            sinks.append(JsonLinesSink(spec.jsonl))
        if spec.webhook_url:
            assert spec.webhook_secret_file is not None  # EventsConfig guarantees it
            secret = _read_secret(spec.webhook_secret_file, "webhook secret")
            sinks.append(WebhookSink(spec.webhook_url, secret))
        if spec.mqtt_host:
            password = None
            if spec.mqtt_password_file:
                password = _read_secret(spec.mqtt_password_file, "MQTT password")
            sinks.append(
                MqttSink(
                    spec.mqtt_host,
                    spec.mqtt_port,
                    camera=camera,
                    topic_prefix=spec.mqtt_topic_prefix,
                    username=spec.mqtt_username,
                    password=password,
                    tls_ca=spec.mqtt_tls_ca,
                )
            )
    except Exception:
        for sink in sinks:  # do not leave worker threads and connections behind a config error
            sink.close(0)
        raise
    return MultiSink(sinks)
