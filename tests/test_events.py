"""Track events out of the edge: the event model, and its sinks against real receivers
(a file, an http.server on loopback, a mosquitto broker started here)."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import unquote

import pytest
from facelink.edge.events import (
    EventBox,
    EventsConfig,
    JsonLinesSink,
    MqttSink,
    MultiSink,
    TrackEvent,
    WebhookSink,
    build_sinks,
    topic_level,
)
from facelink.v1 import common_pb2, recognition_pb2
from pydantic import ValidationError

T0 = datetime(2026, 5, 1, 12, 0, 0, 250_000, tzinfo=timezone.utc)


def event(type: str = "decision", decision: str = "match", track: int = 1, camera: str = "door-1",
          **overrides: object) -> TrackEvent:
    """A valid event; `overrides` replace any field."""
    fields = {
        "type": type, "camera": camera, "track": track, "decision": decision, "shots": 1,
        "event_time": T0 + timedelta(seconds=1), "capture_time": T0,
        "box": EventBox(x=10, y=20, width=64, height=80),
        "identity": "Ann" if decision == "match" else None,
        "score": None if decision == "rejected" else 0.61,
        "error": "no face" if decision == "rejected" else None,
    }
    return TrackEvent(**{**fields, **overrides})


def wait_until(condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# The event model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decision", ["unknown", "rejected"])
def test_only_a_match_carries_an_identity(decision: str) -> None:
    with pytest.raises(ValidationError, match="identity must be None unless decision == 'match'"):
        event(decision=decision, identity="Ann")
    assert event(decision=decision).identity is None
    with pytest.raises(ValidationError, match="needs the matched identity"):
        event(decision="match", identity=None)


def test_fields_that_belong_to_one_decision_only() -> None:
    assert event(decision="unknown", unknown_id="u-7").unknown_id == "u-7"
    with pytest.raises(ValidationError, match="unknown_id is only for decision == 'unknown'"):
        event(decision="match", unknown_id="u-7")
    with pytest.raises(ValidationError, match="error is only for decision == 'rejected'"):
        event(decision="unknown", error="oops")
    with pytest.raises(ValidationError, match="finite"):
        event(score=float("nan"))


def test_times_are_aware_and_serialised_in_utc() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        event(capture_time=datetime(2026, 5, 1, 12, 0))  # naive: which zone?
    paris = timezone(timedelta(hours=2))
    e = event(capture_time=datetime(2026, 5, 1, 14, 0, 0, 250_000, tzinfo=paris))
    data = json.loads(e.to_json())
    assert data["capture_time"] == "2026-05-01T12:00:00.250000Z"
    assert data["event_time"] == "2026-05-01T12:00:01.250000Z"


def test_json_is_one_line_and_round_trips() -> None:
    for e in (event(), event("update", "unknown", unknown_id="u-1"), event("track_ended", "rejected")):
        line = e.to_json()
        assert "\n" not in line
        assert TrackEvent.from_json(line) == e
    data = json.loads(event().to_json())
    assert data["box"] == {"x": 10.0, "y": 20.0, "width": 64.0, "height": 80.0}
    assert set(data) == {
        "type", "camera", "track", "event_time", "capture_time", "box", "decision", "identity",
        "score", "shots", "unknown_id", "error",
    }


def test_from_result_drops_the_best_guess_of_an_unknown() -> None:
    observation = recognition_pb2.FaceObservation(
        camera_id="door-1", track_id=4, capture_time_us=1_777_636_800_123_456,
        box=common_pb2.Box(x=1, y=2, width=30, height=40),
    )
    # The cloud reports its best gallery identity even below the threshold.
    unknown = recognition_pb2.FaceResult(
        camera_id="door-1", track_id=4, decision=recognition_pb2.DECISION_UNKNOWN, identity="Ann", score=0.2
    )
    e = TrackEvent.from_result("decision", unknown, observation, shots=2, event_time=T0)
    assert (e.decision, e.identity, e.track, e.shots) == ("unknown", None, 4, 2)
    assert e.score == pytest.approx(0.2)
    assert e.capture_time == datetime(2026, 5, 1, 12, 0, 0, 123_456, tzinfo=timezone.utc)
    assert e.box == EventBox(x=1, y=2, width=30, height=40)

    match = recognition_pb2.FaceResult(
        camera_id="door-1", track_id=4, decision=recognition_pb2.DECISION_MATCH, identity="Ann", score=0.7
    )
    assert TrackEvent.from_result("update", match, observation, shots=3).identity == "Ann"
    rejected = recognition_pb2.FaceResult(
        camera_id="door-1", track_id=4, decision=recognition_pb2.DECISION_REJECTED, identity="Ann",
        error=recognition_pb2.Error(code=3, message="undecodable payload"),
    )
    e = TrackEvent.from_result("decision", rejected, observation, shots=1)
    assert (e.identity, e.score, e.error) == (None, None, "undecodable payload")


# --------------------------------------------------------------------------------------------
# JSON lines
# --------------------------------------------------------------------------------------------


def test_jsonl_appends_one_flushed_line_per_event(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonLinesSink(path)
    sink.publish(event(track=1))
    # Flushed per event: readable before close.
    assert [TrackEvent.from_json(line).track for line in path.read_text().splitlines()] == [1]
    sink.publish(event("update", track=1))
    assert sink.close().delivered == 2

    again = JsonLinesSink(str(path))  # a second run appends
    again.publish(event("track_ended", track=1))
    again.close()
    lines = path.read_text().splitlines()
    assert [TrackEvent.from_json(line).type for line in lines] == ["decision", "update", "track_ended"]


def test_jsonl_names_the_file_it_cannot_open(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="missing"):
        JsonLinesSink(tmp_path / "missing" / "events.jsonl")


# --------------------------------------------------------------------------------------------
# Webhook, against a real HTTP server on loopback
# --------------------------------------------------------------------------------------------

SECRET = "s3cret-for-tests"


class Receiver:
    """An http.server on 127.0.0.1 that answers with scripted statuses and records requests."""

    def __init__(self, statuses: list[int] | None = None, hold: threading.Event | None = None) -> None:
        self.statuses = list(statuses or [])
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.hold = hold
        self.got_one = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append(({k: v for k, v in self.headers.items()}, body))
                receiver.got_one.set()
                if receiver.hold is not None:
                    receiver.hold.wait(5)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                if status in (429, 503):
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:  # keep the test output clean
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/facelink?token=abc"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def events(self) -> list[TrackEvent]:
        return [TrackEvent.from_json(body) for _, body in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def start(*args, **kw) -> Receiver:
        started.append(Receiver(*args, **kw))
        return started[-1]

    yield start
    for r in started:
        if r.hold is not None:
            r.hold.set()
        r.close()


def verify(headers: dict[str, str], body: bytes, secret: str = SECRET) -> bool:
    """The receiver's check, exactly as WebhookSink's docstring gives it."""
    ts = headers["X-Facelink-Timestamp"]
    expected = "sha256=" + hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    fresh = abs(time.time() - int(ts)) <= 300
    return hmac.compare_digest(expected, headers["X-Facelink-Signature"]) and fresh


def test_webhook_posts_signed_json(receiver) -> None:
    r = receiver()
    sink = WebhookSink(r.url, SECRET, backoff=0.01)
    sent = event()
    sink.publish(sent)
    stats = sink.close(5)
    assert (stats.delivered, stats.failed, stats.retries) == (1, 0, 0)
    (headers, body), = r.requests
    assert headers["Content-Type"] == "application/json"
    assert body == sent.to_json().encode()
    assert verify(headers, body)
    assert not verify(headers, body, secret="wrong")
    assert not verify(headers, body.replace(b"Ann", b"Bob"))  # the body is covered
    tampered = dict(headers, **{"X-Facelink-Timestamp": str(int(headers["X-Facelink-Timestamp"]) + 1)})
    assert not verify(tampered, body)  # and so is the timestamp
    assert "token" not in sink.name  # the query string stays out of names and logs


def test_webhook_retries_5xx_and_delivers_once(receiver) -> None:
    r = receiver([503, 503, 200])
    sink = WebhookSink(r.url, SECRET, max_retries=5, backoff=0.01)
    sink.publish(event())
    stats = sink.close(5)
    assert (stats.delivered, stats.failed, stats.retries) == (1, 0, 2)
    assert len(r.requests) == 3
    assert r.events() == [event()] * 3
    # Every attempt is signed anew and carries the same delivery id, for de-duplication.
    assert all(verify(h, b) for h, b in r.requests)
    assert len({h["X-Facelink-Delivery"] for h, _ in r.requests}) == 1


def test_webhook_retries_429_but_not_other_4xx(receiver) -> None:
    r = receiver([429, 200, 400])
    sink = WebhookSink(r.url, SECRET, max_retries=3, backoff=0.01)
    sink.publish(event(track=1))
    sink.publish(event(track=2))
    stats = sink.close(5)
    assert (stats.delivered, stats.failed, stats.retries) == (1, 1, 1)
    assert [e.track for e in r.events()] == [1, 1, 2]  # the 400 is final


def test_webhook_gives_up_on_an_unreachable_host() -> None:
    sink = WebhookSink(f"http://127.0.0.1:{free_port()}/hook", SECRET, max_retries=2, backoff=0.01)
    sink.publish(event())
    stats = sink.close(5)
    assert (stats.delivered, stats.failed, stats.retries) == (0, 1, 2)


def test_webhook_refuses_plain_http_off_loopback() -> None:
    with pytest.raises(ValueError, match="refusing plain http:// to example.com"):
        WebhookSink("http://example.com/hook", SECRET)
    with pytest.raises(ValueError, match="secret is empty"):
        WebhookSink("https://example.com/hook", "")
    with pytest.raises(ValueError, match="http"):
        WebhookSink("ftp://example.com/hook", SECRET)
    # Allowed: https anywhere, http on loopback, or when the caller says the network is trusted.
    allowed = [
        ("https://example.com/hook", {}), ("http://localhost:9/hook", {}), ("http://[::1]:9/", {}),
        ("http://example.com/hook", {"allow_insecure": True}),
    ]
    for url, kw in allowed:
        WebhookSink(url, SECRET, **kw).close(0)


def test_a_full_queue_drops_the_oldest_updates_first(receiver) -> None:
    hold = threading.Event()
    r = receiver(hold=hold)
    sink = WebhookSink(r.url, SECRET, capacity=3)
    sink.publish(event("decision", track=1))
    assert r.got_one.wait(5)  # the worker is now stuck on the first request
    for track in (2, 3, 4):
        sink.publish(event("update", track=track))
    sink.publish(event("decision", track=5))      # full: update 2 goes
    sink.publish(event("update", track=6))        # full: update 3 goes
    sink.publish(event("track_ended", track=7))   # full: update 4 goes
    sink.publish(event("update", track=8))        # full: update 6 goes (the oldest update)
    sink.publish(event("decision", track=9))      # full: update 8 goes
    sink.publish(event("update", track=10))       # full of decisions: the new update is the one to go
    stats = sink.stats
    assert (stats.accepted, stats.dropped, stats.dropped_critical, stats.queued) == (10, 6, 0, 3)
    sink.publish(event("decision", track=11))     # no update left: the oldest decision goes, counted
    stats = sink.stats
    assert (stats.accepted, stats.dropped, stats.dropped_critical, stats.queued) == (11, 7, 1, 3)
    hold.set()
    stats = sink.close(5)
    assert [(e.type, e.track) for e in r.events()] == [
        ("decision", 1), ("track_ended", 7), ("decision", 9), ("decision", 11)
    ]
    assert stats.delivered == 4


def test_close_gives_up_at_its_deadline(receiver) -> None:
    hold = threading.Event()
    r = receiver(hold=hold)
    sink = WebhookSink(r.url, SECRET, timeout=5)
    for track in range(3):
        sink.publish(event(track=track))
    assert r.got_one.wait(5)
    started = time.monotonic()
    stats = sink.close(0.2)
    assert time.monotonic() - started < 1.0
    assert (stats.dropped, stats.dropped_critical) == (2, 2)  # the two still queued
    sink.publish(event())  # after close: counted, never raised into the result thread
    assert sink.stats.dropped == 3


# --------------------------------------------------------------------------------------------
# Fan-out and configuration
# --------------------------------------------------------------------------------------------


def test_build_sinks_fans_out_to_every_configured_sink(tmp_path: Path, receiver) -> None:
    r = receiver()
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")  # a trailing newline from `echo` is not part of the secret
    spec = EventsConfig(jsonl=str(tmp_path / "e.jsonl"), webhook_url=r.url, webhook_secret_file=secret_file)
    sinks = build_sinks(spec, camera="door-1")
    assert isinstance(sinks, MultiSink) and len(sinks) == 2
    sinks.publish(event())
    stats = sinks.close(5)
    assert (stats.accepted, stats.delivered) == (2, 2)
    assert TrackEvent.from_json((tmp_path / "e.jsonl").read_text()) == event()
    assert verify(*r.requests[0])
    assert len(build_sinks(EventsConfig(), camera="door-1")) == 0


def test_events_config_refuses_incomplete_settings(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="webhook_url needs webhook_secret_file"):
        EventsConfig(webhook_url="https://example.com/hook")
    with pytest.raises(ValidationError, match="mqtt_password_file needs mqtt_username"):
        EventsConfig(mqtt_host="broker", mqtt_password_file=tmp_path / "pw")
    with pytest.raises(ValidationError, match="mqtt_host is not"):
        EventsConfig(mqtt_username="me")
    with pytest.raises(ValidationError, match="prefix"):
        EventsConfig(mqtt_host="broker", mqtt_topic_prefix="a/#")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    spec = EventsConfig(webhook_url="https://example.com/hook", webhook_secret_file=empty)
    with pytest.raises(ValueError, match="empty"):
        build_sinks(spec, camera="door-1")


# --------------------------------------------------------------------------------------------
# MQTT, against a real mosquitto
# --------------------------------------------------------------------------------------------

MOSQUITTO = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
needs_mosquitto = pytest.mark.skipif(
    MOSQUITTO is None, reason="needs the mosquitto broker on PATH or in /usr/sbin (apt-get install mosquitto)"
)


class Broker:
    """mosquitto on 127.0.0.1:port, persistent so that a restart keeps sessions and queued messages."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {workdir}/\nlog_dest stderr\n"
        )
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto did not start: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence file and exits
            self.proc.wait(5)
        self.proc = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


class Subscriber:
    """A paho client that records (topic, payload, retain) of what it receives."""

    def __init__(self, port: int, topic: str, client_id: str | None = None, clean: bool = True) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, str, bool]] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or "", clean_session=clean
        )

        def on_connect(client, userdata, flags, reason_code, properties) -> None:
            client.subscribe(topic, qos=1)

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = lambda client, userdata, m: self.messages.append(
            (m.topic, m.payload.decode(), bool(m.retain))
        )
        self.client.reconnect_delay_set(0.05, 0.2)
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(5), "the test subscriber could not subscribe"

    def on(self, topic: str) -> list[str]:
        return [payload for t, payload, _ in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def mqtt_sink() -> Iterator[Callable[..., MqttSink]]:
    """MqttSinks with a fast reconnect; whatever a failed test left open is closed at the end."""
    opened: list[MqttSink] = []

    def make(port: int, **kw) -> MqttSink:
        kw.setdefault("camera", "door/1")
        opened.append(MqttSink("127.0.0.1", port, reconnect_delay=0.1, max_reconnect_delay=0.3, **kw))
        return opened[-1]

    yield make
    for sink in opened:
        sink.close(0)


@pytest.fixture
def subscribe() -> Iterator[Callable[..., Subscriber]]:
    opened: list[Subscriber] = []

    def make(*args, **kw) -> Subscriber:
        opened.append(Subscriber(*args, **kw))
        return opened[-1]

    yield make
    for sub in opened:
        sub.close()


def test_topic_levels_are_escaped_reversibly() -> None:
    for name in ["door/1", "a+b", "#", "50%", "tab\there", "c1\x85", "nonchar\ufffe", "Zoë 山田"]:
        level = topic_level(name)
        assert not set(level) & set("+#/\t\x85\ufffe")
        assert unquote(level) == name
    assert topic_level("Zoë 山田") == "Zoë 山田"  # only what must be escaped is
    assert topic_level("") == "_"
    with pytest.raises(ValidationError, match="lone surrogate"):
        event(identity="A\ud800")


@needs_mosquitto
def test_mqtt_topics_payloads_and_availability(broker: Broker, mqtt_sink, subscribe) -> None:
    watch = subscribe(broker.port, "facelink/#")
    sink = mqtt_sink(broker.port)
    wait_until(lambda: sink.connected, what="the sink to connect")
    match = event(camera="door/1", identity="Ann/Lee+")
    stranger = event("update", "unknown", camera="door/1", track=2)
    sink.publish(match)
    sink.publish(stranger)
    wait_until(lambda: sink.stats.delivered == 2, what="two acknowledged events")
    wait_until(lambda: len(watch.on("facelink/door%2F1/events")) == 2, what="two events on the events topic")

    assert [TrackEvent.from_json(p) for p in watch.on("facelink/door%2F1/events")] == [match, stranger]
    # Only the match goes to an identity topic, with the name escaped into one level.
    identity_topics = [t for t, _, _ in watch.messages if "/identity/" in t]
    assert identity_topics == ["facelink/door%2F1/identity/Ann%2FLee%2B"]
    assert TrackEvent.from_json(watch.on(identity_topics[0])[0]) == match

    # A late subscriber learns the device is online from the retained message.
    late = subscribe(broker.port, "facelink/+/availability")
    wait_until(lambda: late.messages, what="the retained availability")
    assert late.messages == [("facelink/door%2F1/availability", "online", True)]

    stats = sink.close(5)
    assert (stats.accepted, stats.delivered, stats.failed, stats.dropped) == (2, 2, 0, 0)
    after = subscribe(broker.port, "facelink/+/availability")
    wait_until(lambda: after.messages, what="the retained availability after close")
    assert after.messages == [("facelink/door%2F1/availability", "offline", True)]


@needs_mosquitto
def test_mqtt_last_will_and_reconnect(broker: Broker, mqtt_sink, subscribe) -> None:
    watch = subscribe(broker.port, "facelink/+/availability")
    sink = mqtt_sink(broker.port, keepalive=5)
    availability = "facelink/door%2F1/availability"
    wait_until(lambda: watch.on(availability) == ["online"], what="online")
    # The connection dies without a DISCONNECT (a crash, a cable pulled): the broker sends the will.
    sink._client.socket().shutdown(socket.SHUT_RDWR)
    wait_until(lambda: watch.on(availability)[:2] == ["online", "offline"], what="the last will")
    # paho reconnects on its own and the sink says online again.
    wait_until(lambda: watch.on(availability)[-1:] == ["online"] and len(watch.on(availability)) == 3,
               what="online after reconnecting")
    sink.close(5)


@needs_mosquitto
def test_mqtt_events_published_while_the_broker_is_down_arrive_later(
    broker: Broker, mqtt_sink, subscribe
) -> None:
    # A persistent session (fixed id, clean_session=False, qos 1): the broker keeps what arrives
    # for the watcher across its own restart, whichever of the two clients reconnects first.
    watch = subscribe(broker.port, "facelink/+/events", client_id="watcher", clean=False)
    sink = mqtt_sink(broker.port)
    wait_until(lambda: sink.connected, what="the sink to connect")
    sink.publish(event(track=1))
    wait_until(lambda: sink.stats.delivered == 1, what="the first event")

    broker.stop()
    wait_until(lambda: not sink.connected, what="the sink to notice the broker is gone")
    for track in (2, 3, 4):
        sink.publish(event("update", track=track))
    late_sink = mqtt_sink(broker.port, camera="door-2")  # started while the broker is down
    late_sink.publish(event(camera="door-2", track=9))
    time.sleep(0.3)
    assert sink.stats.delivered == 1 and late_sink.stats.delivered == 0

    broker.start()  # same port, same persistence file
    wait_until(lambda: sink.stats.delivered == 4, timeout=10, what="the queued events to be acknowledged")
    wait_until(lambda: late_sink.stats.delivered == 1, timeout=10, what="the late sink's event")
    wait_until(lambda: len(watch.messages) == 5, timeout=10, what="all five events at the subscriber")
    received = [TrackEvent.from_json(payload) for _, payload, _ in watch.messages]
    got = sorted((e.camera, e.track) for e in received)
    assert got == [("door-1", 1), ("door-1", 2), ("door-1", 3), ("door-1", 4), ("door-2", 9)]
    assert sink.close(5).dropped == 0
    late_sink.close(5)


def test_mqtt_close_keeps_its_deadline_when_the_broker_is_away(mqtt_sink) -> None:
    sink = mqtt_sink(free_port())  # nothing listens there
    sink.publish(event())
    started = time.monotonic()
    stats = sink.close(0.3)
    assert time.monotonic() - started < 1.0
    assert (stats.accepted, stats.delivered, stats.dropped, stats.dropped_critical) == (1, 0, 1, 1)


def test_mqtt_refuses_credentials_in_clear_text() -> None:
    with pytest.raises(ValueError, match="without TLS"):
        MqttSink("broker.example", camera="door-1", username="me", password="pw")
    with pytest.raises(ValueError, match="prefix"):
        MqttSink("127.0.0.1", camera="door-1", topic_prefix="$SYS")
