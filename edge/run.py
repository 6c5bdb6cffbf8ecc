"""The device loop: cameras -> pipeline -> track book -> stream, answers pooled per track into events.

One process serves one or several cameras (:func:`run_cameras`; :func:`run_edge` for one).
Each camera has its own feed (edge/live.py: the newest frame of a live source, read on a capture
thread that reconnects; every frame of a file), tracker and :class:`~facelink.edge.tracks.TrackBook`;
all share the models (one :class:`EdgePipeline`, used from this loop's thread only, so no model
needs to be thread-safe) and one :class:`StreamClient`: one connection and one credential per
device, one queue whose overflow policy sees every camera's tracks (see edge/client.py).

Before the first frame, :func:`check_capabilities` asks the cloud what it accepts: a payload it
would refuse (a codec version it cannot decode, a query model it has no templates for) stops the
edge at once with :class:`CloudRefused`, instead of every face being rejected in silence.

Stopping: `stop` (a :class:`StopSignal`, set by SIGTERM/SIGINT through :func:`handle_signals`)
ends the loop; what is in flight is drained within ``EdgeConfig.drain_timeout_s``, tracks end
with their events, sinks are flushed. Exit codes for a supervisor are in :data:`EXIT_CODES`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
from tqdm import tqdm

from facelink.config import EdgeConfig, EventsConfig, LiveSourceConfig, TrackPolicy
from facelink.transport import client_channel
from facelink.v1 import recognition_pb2, recognition_pb2_grpc

from .client import Pending, StreamClient, StreamStats
from .events import EventSink, MultiSink, SinkStats, TrackEvent, build_sinks
from .live import FeedStats, FrameFeed, open_feed
from .pipeline import EdgePipeline, FaceShot
from .sources import Frame, FrameSource
from .tracking import IouTracker
from .tracks import Shot, TrackBook, TrackStats

log = logging.getLogger(__name__)

#: What `facelink edge` exits with, for a supervisor (systemd, Docker, Kubernetes).
EXIT_OK = 0        # the source ended normally (or a stop was asked for), everything was answered
EXIT_FAILURE = 1   # a runtime failure: the cloud unreachable at start, a stream error, faces unanswered
EXIT_CONFIG = 2    # bad configuration: a flag, a config file, a source that cannot be opened
EXIT_REFUSED = 3   # the cloud refused this device's credentials, or the payload it would send
EXIT_CODES = {
    EXIT_OK: "done: the source ended (or SIGTERM/SIGINT), every face answered",
    EXIT_FAILURE: "runtime failure: the cloud unreachable at start, the stream failed, faces left unanswered",
    EXIT_CONFIG: "bad configuration: flags, the --config file, credentials files, a source that cannot be opened",
    EXIT_REFUSED: "the cloud refused this device: its credentials, or its payload (codec or query model)",
}


class CloudRefused(RuntimeError):
    """The cloud refuses this device: its credentials, or the payload it is configured to send."""


class CloudUnreachable(RuntimeError):
    """The cloud did not answer GetCapabilities within the connect timeout."""


# -- stopping --------------------------------------------------------------------------------------
class DrainNow(Exception):
    """Raised by the signal handler into a submit() that waits for room, so a stop is never stuck there."""


class StopSignal:
    """A stop request: an Event, plus what the signal handler needs to interrupt a blocking submit."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.blocking = False  # the loop sits in a submit() that may wait for room in the queue
        self.signals = 0

    def is_set(self) -> bool:
        return self.event.is_set()

    def set(self) -> None:
        self.event.set()


@contextlib.contextmanager
def handle_signals(stop: StopSignal) -> Iterator[StopSignal]:
    """SIGTERM/SIGINT ask `stop` for a drain; a second one stops at once (KeyboardInterrupt).
    Main thread only (Python delivers signals there)."""

    def handler(signum: int, _frame: object) -> None:
        stop.signals += 1
        stop.set()
        if stop.signals > 1:
            raise KeyboardInterrupt
        log.warning("%s: draining (finishing in-flight faces, flushing events); again to stop at once",
                    signal.Signals(signum).name)
        if stop.blocking:
            raise DrainNow

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# -- capabilities ----------------------------------------------------------------------------------
def check_capabilities(config: EdgeConfig, pipeline: EdgePipeline) -> recognition_pb2.Capabilities:
    """Ask the cloud what it accepts; raise CloudRefused when it would refuse what `pipeline` sends."""
    stream = config.stream
    with client_channel(stream.server, stream.security) as channel:
        stub = recognition_pb2_grpc.RecognitionStub(channel)
        try:
            caps = stub.GetCapabilities(
                recognition_pb2.GetCapabilitiesRequest(), timeout=stream.connect_timeout_s, wait_for_ready=True
            )
        except grpc.RpcError as error:
            code = error.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise CloudUnreachable(
                    f"no answer from the cloud at {stream.server} within {stream.connect_timeout_s:g} s ({code.name})"
                ) from None
            raise CloudRefused(f"the cloud at {stream.server} refused GetCapabilities: {code.name}: {error.details()}"
                               ) from None
    if pipeline.codec is not None:
        codec_id, version = pipeline.codec.codec_id, pipeline.codec.version
        accepted = {c.codec_id: list(c.versions) for c in caps.codecs}
        if version not in accepted.get(codec_id, []):
            listing = ", ".join(f"{c} v{'/'.join(map(str, v))}" for c, v in sorted(accepted.items())) or "none"
            raise CloudRefused(
                f"the cloud at {stream.server} does not decode face payloads {codec_id} v{version} "
                f"(it accepts: {listing}); choose another --codec, or update the cloud"
            )
    if pipeline.query is not None:
        model_id = pipeline.query.embedding_space
        queries = sorted(m.model_id for m in caps.models if m.role == "query")
        if model_id not in queries:
            raise CloudRefused(
                f"the cloud at {stream.server} does not accept embeddings of query model {model_id} "
                f"(accepted query models: {', '.join(queries) or 'none'}); serve its ensemble's gallery models "
                "on the cloud (`facelink cloud serve --gallery-models ...`), or use --payload face"
            )
    return caps


# -- what the loop keeps -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SentFace:
    """What the device remembers about a face until its result comes back."""

    frame_name: str
    label: str | None        # ground truth when the source knows it (LFW-style folders)
    payload_bytes: int
    read_at: float           # time.perf_counter() when the frame was read: end-to-end latency starts here
    edge_ms: float           # detect + align + encode on the device
    camera: str = ""
    track_id: int = 0
    quality: float = 0.0


@dataclass(frozen=True)
class CameraInput:
    """One camera of a run: its source and what it overrides of the run's EdgeConfig."""

    camera_id: str
    source: FrameSource
    tracks: TrackPolicy | None = None
    live: LiveSourceConfig | None = None
    faces: str | None = None


@dataclass
class CameraStats:
    """One camera's figures; `camera` labels them in every summary."""

    camera: str
    frames: int = 0
    faces_seen: int = 0
    faces_sent: int = 0
    frames_without_face: int = 0
    unreadable: int = 0
    lag_s_max: float = 0.0    # live: how far behind the camera a frame was when the edge was done with it
    lag_s_last: float = 0.0
    lag_s_sum: float = 0.0
    feed: FeedStats = field(default_factory=FeedStats)
    tracks: TrackStats = field(default_factory=TrackStats)
    events: SinkStats | None = None

    @property
    def lag_s_mean(self) -> float:
        return self.lag_s_sum / self.frames if self.frames else 0.0


@dataclass
class EdgeRunStats:
    frames: int = 0
    faces: int = 0                 # observations sent
    frames_without_face: int = 0
    unreadable: int = 0
    stream: StreamStats | None = None
    cameras: list[CameraStats] = field(default_factory=list)
    stopped: bool = False          # ended by a stop request rather than by the sources


OnResult = Callable[[recognition_pb2.FaceResult, SentFace, float], None]  # result, face, end-to-end ms
OnEvent = Callable[[TrackEvent], None]


class _Camera:
    """A camera's state in the loop."""

    def __init__(self, spec: CameraInput, config: EdgeConfig, pipeline: EdgePipeline, publish: OnEvent) -> None:
        self.id = spec.camera_id
        self.source = spec.source
        self.faces = spec.faces
        policy = spec.tracks or config.tracks
        self.tracker = IouTracker(policy.iou_threshold, policy.lost_frames, policy.lost_s)
        self.book = TrackBook(self.id, policy, publish)
        self.feed: FrameFeed = open_feed(spec.source, spec.live or config.live)
        self.stats = CameraStats(self.id)
        self.last_label: str | None = None
        self.last_frame_at = time.monotonic()
        self.done = False


# -- the loop ------------------------------------------------------------------------------------------
def run_edge(
    source: FrameSource,
    config: EdgeConfig,
    on_result: OnResult | None = None,
    *,
    pipeline: EdgePipeline | None = None,
    progress: bool = True,
    stop: StopSignal | None = None,
    on_event: OnEvent | None = None,
    capabilities: bool = True,
) -> EdgeRunStats:
    """Run one camera, `source`, named ``config.stream.camera_id``; see :func:`run_cameras`."""
    camera = CameraInput(config.stream.camera_id, source)
    return run_cameras([camera], config, on_result, pipeline=pipeline, progress=progress, stop=stop,
                       on_event=on_event, capabilities=capabilities)


def run_cameras(
    cameras: Sequence[CameraInput],
    config: EdgeConfig,
    on_result: OnResult | None = None,
    *,
    pipeline: EdgePipeline | None = None,
    progress: bool = False,
    stop: StopSignal | None = None,
    on_event: OnEvent | None = None,
    capabilities: bool = True,
) -> EdgeRunStats:
    """Stream the chosen shots of every track of every camera; publish track events to the sinks of
    ``config.events`` (and `on_event`); `on_result` gets each raw answer (or the client's
    DEADLINE_EXCEEDED report, see edge/client.py). Returns when every source has ended or `stop`
    is set, after draining. Raises CloudRefused / CloudUnreachable before any frame is read."""
    if not cameras:
        raise ValueError("no cameras to run")
    stop = stop or StopSignal()
    stats = EdgeRunStats()
    by_id: dict[str, _Camera] = {}

    def deliver(result: recognition_pb2.FaceResult, pending: Pending) -> None:
        face: SentFace = pending.meta
        camera = by_id.get(face.camera)
        if camera is not None:
            camera.book.answer(result, pending.observation)
        if on_result is not None:
            on_result(result, face, (time.perf_counter() - face.read_at) * 1e3)

    def dropped(pending: Pending) -> None:
        camera = by_id.get(getattr(pending.meta, "camera", ""))
        if camera is not None:
            camera.book.dropped(pending.observation)

    # The client first: a security mistake (unreadable certificate, token bound for plaintext)
    # raises TransportSecurityError here, before the models load or the camera is read.
    client = StreamClient(config.stream, deliver, on_drop=dropped)
    sinks = _Sinks()

    def publish(event: TrackEvent) -> None:
        sink = sinks.by_camera.get(event.camera)
        if sink is not None:
            sink.publish(event)
        if on_event is not None:
            on_event(event)

    try:
        pipeline = pipeline or EdgePipeline(config)
        if capabilities:
            check_capabilities(config, pipeline)
        sinks = _open_sinks(config.events, [c.camera_id for c in cameras])
        for spec in cameras:
            by_id[spec.camera_id] = _Camera(spec, config, pipeline, publish)
        client.start()
        _loop(list(by_id.values()), pipeline, client, stop, progress)
        stats.stopped = stop.is_set()
    finally:
        for camera in by_id.values():
            camera.feed.close()
        # Tracks still open end now: their best unsent shots go out, then the drain.
        for camera in by_id.values():
            with contextlib.suppress(RuntimeError, DrainNow):  # the client stopped (refused), or a signal
                _send(camera, camera.book.end(camera.tracker.reset()), pipeline, client, stop)
        stats.stream = client.close(timeout=config.drain_timeout_s)
        for camera in by_id.values():
            camera.book.close()
        sinks.close(min(5.0, config.drain_timeout_s))
        for camera in by_id.values():
            _finish_stats(camera, stats)
            sink = sinks.by_camera.get(camera.id)
            camera.stats.events = sink.stats if sink is not None else None
    return stats


def _loop(cameras: list[_Camera], pipeline: EdgePipeline, client: StreamClient, stop: StopSignal, progress: bool) -> None:
    single = cameras[0] if len(cameras) == 1 else None
    total = single.source.total if single is not None and not single.source.live else None
    bar = tqdm(total=total, desc="edge", unit="frame", disable=not progress)
    try:
        active = list(cameras)
        while active and not stop.is_set():
            for camera in list(active):
                # One camera: wait for its next frame; several: poll each in turn.
                frame = camera.feed.get(timeout=0.25 if single else 0.02)
                if frame is None:
                    if camera.feed.ended:
                        active.remove(camera)
                    elif camera.source.live:
                        _silent(camera, pipeline, client, stop)
                    continue
                _step(camera, frame, pipeline, client, stop)
                bar.update(1)
                if stop.is_set():
                    break
    except DrainNow:
        pass  # the signal came while a submit waited for room: go and drain
    finally:
        bar.close()


def _silent(camera: _Camera, pipeline: EdgePipeline, client: StreamClient, stop: StopSignal) -> None:
    """A live camera silent for longer than lost_s (it dropped): its tracks are over, and end with
    their events now rather than when (if) the camera comes back."""
    if camera.tracker.tracks and time.monotonic() - camera.last_frame_at > camera.book.policy.lost_s:
        _send(camera, camera.book.end(camera.tracker.reset()), pipeline, client, stop)


def _step(camera: _Camera, frame: Frame, pipeline: EdgePipeline, client: StreamClient, stop: StopSignal) -> None:
    started = time.perf_counter()
    camera.last_frame_at = time.monotonic()
    camera.stats.frames += 1
    ended: list[int] = []
    if not camera.source.live and frame.label is not None and camera.last_label not in (None, frame.label):
        # Labelled pictures (LFW's <person>/<file>): a new person is a cut, whatever the boxes say.
        ended += camera.tracker.reset()
    camera.last_label = frame.label
    face_shots = pipeline.shots(frame, camera.tracker, camera.faces)
    ended += camera.tracker.ended
    camera.stats.faces_seen += len(face_shots)
    if not face_shots:
        camera.stats.frames_without_face += 1
        log.debug("no face in %s/%s", camera.id, frame.name)
    candidates = [Shot(s.track_id, s.quality.score, frame.timestamp_us, s.box, s) for s in face_shots]
    chosen = camera.book.select(candidates, frame.timestamp_us / 1e6)
    chosen += camera.book.end(ended)
    _send(camera, chosen, pipeline, client, stop, started)
    if camera.source.live:
        lag = max(0.0, time.time() - frame.timestamp_us / 1e6)
        camera.stats.lag_s_last = lag
        camera.stats.lag_s_max = max(camera.stats.lag_s_max, lag)
        camera.stats.lag_s_sum += lag


def _send(
    camera: _Camera, shots: list[Shot], pipeline: EdgePipeline, client: StreamClient, stop: StopSignal,
    started: float | None = None,
) -> None:
    for shot in shots:
        face_shot: FaceShot = shot.data
        t0 = started if started is not None else time.perf_counter()
        face = pipeline.observe(face_shot, camera_id=camera.id)
        sent = SentFace(
            face_shot.frame.name, face_shot.frame.label, len(face.observation.face.data or face.observation.embedding.data),
            t0, (time.perf_counter() - t0) * 1e3, camera.id, shot.track_id, shot.quality,
        )
        stop.blocking = True
        try:
            client.submit(face.observation, sent, quality=shot.quality)
        finally:
            stop.blocking = False
        camera.stats.faces_sent += 1


def _finish_stats(camera: _Camera, stats: EdgeRunStats) -> None:
    camera.stats.unreadable = camera.source.skipped
    camera.stats.feed = camera.feed.stats
    camera.stats.tracks = camera.book.stats
    stats.cameras.append(camera.stats)
    stats.frames += camera.stats.frames
    stats.faces += camera.stats.faces_sent
    stats.frames_without_face += camera.stats.frames_without_face
    stats.unreadable += camera.stats.unreadable


# -- sinks ---------------------------------------------------------------------------------------------
_MQTT_FIELDS = ("mqtt_host", "mqtt_port", "mqtt_username", "mqtt_password_file", "mqtt_tls_ca")


@dataclass
class _Sinks:
    """Where each camera's events go, and every sink to close once at the end."""

    by_camera: dict[str, EventSink] = field(default_factory=dict)
    owned: list[EventSink] = field(default_factory=list)

    def close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for sink in self.owned:
            sink.close(max(0.0, deadline - time.monotonic()))


def _open_sinks(events: EventsConfig, camera_ids: list[str]) -> _Sinks:
    """A JSON Lines file or webhook is opened once and shared by every camera (one writer per file);
    MQTT gets one connection per camera, because its availability topic and last will are about one."""
    sinks = _Sinks()
    if not events.any:
        return sinks
    try:
        shared: EventSink | None = None
        if events.jsonl or events.webhook_url:
            shared = build_sinks(events.model_copy(update=dict.fromkeys(_MQTT_FIELDS)), camera=camera_ids[0])
            sinks.owned.append(shared)
        for camera_id in camera_ids:
            parts = [shared] if shared is not None else []
            if events.mqtt_host:
                mqtt_only = events.model_copy(update={"jsonl": None, "webhook_url": None, "webhook_secret_file": None})
                mqtt = build_sinks(mqtt_only, camera=camera_id)
                sinks.owned.insert(0, mqtt)  # closed before the shared ones: all drain in parallel anyway
                parts.append(mqtt)
            sinks.by_camera[camera_id] = parts[0] if len(parts) == 1 else MultiSink(parts)
    except Exception:
        sinks.close(0)
        raise
    return sinks


# -- for people -------------------------------------------------------------------------------------------
def describe(result: recognition_pb2.FaceResult, face: SentFace, e2e_ms: float) -> str:
    """One human-readable line per result, for `facelink edge` (the events are the structured output)."""
    decision = recognition_pb2.Decision.Name(result.decision).removeprefix("DECISION_")
    head = f"{result.camera_id} frame {result.frame_sequence} face {result.face_index} track {result.track_id} [{face.frame_name}]"
    if result.decision == recognition_pb2.DECISION_REJECTED:
        return f"{head}: REJECTED {result.error.message}"
    # An UNKNOWN carries the cloud's nearest gallery identity: never print it as if it were the person.
    who = result.identity if result.decision == recognition_pb2.DECISION_MATCH else "-"
    return (
        f"{head}: {decision} {who} score {result.score:.3f} quality {face.quality:.2f} | {face.payload_bytes} B, "
        f"edge {face.edge_ms:.1f} ms, server {result.server_latency_us / 1e3:.1f} ms, end-to-end {e2e_ms:.1f} ms"
    )


def describe_event(event: TrackEvent) -> str:
    who = event.identity or "-"
    score = f" score {event.score:.2f}" if event.score is not None else ""
    return f"{event.camera} track {event.track}: {event.type} {event.decision.upper()} {who}{score} ({event.shots} shots)"
