"""`facelink edge`: the device side, one camera from flags or several from a --config file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .cli_common import FORMATTER as _FORMATTER
from .cli_common import add_common, read_structured_file


def _seconds(text: str) -> float:  # argparse names the type in its message: "invalid _seconds value"
    if (value := float(text)) <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


def load_cameras_file(path: Path) -> Any:
    """The cameras of a --config file (YAML or JSON) as a CamerasFile; ValueError says what is wrong."""
    from facelink.config import CamerasFile

    data = read_structured_file(path, "camera config")
    if isinstance(data, list):  # a bare list of cameras is fine too
        data = {"cameras": data}
    try:
        return CamerasFile.model_validate(data)
    except ValidationError as error:
        raise ValueError(f"{path}: {error}") from None


def _detect_size(text: str) -> int:
    if (value := int(text)) != 0 and value < 64:
        raise argparse.ArgumentTypeError(f"must be 0 (full resolution) or at least 64 px, not {text}")
    return value


def _providers(text: str) -> tuple[str, ...]:  # argparse names the type in its message
    from facelink.runtime.backends.onnxruntime_backend import providers_from_names

    try:
        return providers_from_names(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--providers: ")) from None


def _edge_config(args: argparse.Namespace, security: Any, live: bool) -> Any:
    from facelink.config import (
        BackendConfig, CanonicalCrop, CropRegionCoding, DetectorConfig, EdgeConfig, EventsConfig, LiveSourceConfig,
        StreamConfig, TrackPolicy,
    )

    # One set of execution providers for every model the edge runs: the detector (YuNet through
    # ONNX Runtime when a GPU provider is first), the learned codec's encoder and the query model.
    backend = BackendConfig(providers=args.providers) if args.providers else BackendConfig()
    return EdgeConfig(
        detector=DetectorConfig(kind=args.detector, detect_size=args.detect_size, backend=backend),
        backend=backend,
        crop=CanonicalCrop(size=args.crop_size),
        faces=args.faces,
        payload=args.payload,
        codec=args.codec,
        quality=args.quality,
        crop_border=(EdgeConfig().crop_border or CropRegionCoding()) if args.crop_border else None,
        query_model=args.query_model,
        stream=StreamConfig(
            server=args.server,
            camera_id=args.camera_id,
            queue_size=args.queue_size,
            overflow=args.overflow or ("drop_oldest" if live else "block"),
            face_timeout_s=args.face_timeout,
            security=security,
        ),
        tracks=TrackPolicy(
            send=args.send, max_shots=args.max_shots_per_track, resend_after_s=args.resend_after,
            min_quality=args.min_quality,
        ),
        live=LiveSourceConfig(fps=args.fps),
        events=EventsConfig(
            jsonl=args.events_jsonl,
            webhook_url=args.webhook_url,
            webhook_secret_file=args.webhook_secret_file,
            mqtt_host=args.mqtt_host,
            mqtt_port=args.mqtt_port,
            mqtt_topic_prefix=args.mqtt_topic_prefix,
            mqtt_username=args.mqtt_username,
            mqtt_password_file=args.mqtt_password_file,
            mqtt_tls_ca=args.mqtt_tls_ca,
        ),
        drain_timeout_s=args.drain_timeout,
    )


def _edge(args: argparse.Namespace) -> int:
    from facelink.edge.run import (
        EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_REFUSED, CameraInput, CloudRefused, CloudUnreachable, StopSignal,
        describe, describe_event, handle_signals, run_cameras,
    )
    from facelink.edge.sources import SourceError, open_source
    from facelink.runtime.backends import BackendUnavailableError
    from facelink.transport import TransportSecurityError, client_security_from_args

    def fail(message: str, code: int) -> int:
        print(f"error: {message}", file=sys.stderr)
        return code

    if (args.source is None) == (args.config is None):
        return fail("give either --source (one camera) or --config FILE (several cameras)", EXIT_CONFIG)
    opened: list[Any] = []
    try:
        security = client_security_from_args(args)  # before the camera opens: a flag mistake costs nothing
        if args.config is not None:
            specs = load_cameras_file(args.config).cameras
        else:
            from facelink.config import CameraSpec

            specs = (CameraSpec(source=args.source, camera_id=args.camera_id, stride=args.stride,
                                max_frames=args.max_frames),)
        if args.providers:  # a provider this onnxruntime build lacks: say so before a camera opens
            from facelink.runtime.backends.onnxruntime_backend import check_providers

            check_providers(args.providers)
        for spec in specs:
            max_frames = spec.max_frames if spec.max_frames is not None else args.max_frames
            source = open_source(spec.source, max_frames=max_frames, stride=spec.stride)
            opened.append((spec, source))
        config = _edge_config(args, security, live=any(source.live for _, source in opened))
    except (SourceError, TransportSecurityError, BackendUnavailableError, ValueError, ValidationError) as error:
        for _, source in opened:
            source.close()
        return fail(str(error), EXIT_CONFIG)

    cameras = [CameraInput(spec.camera_id, source, spec.tracks, spec.live, spec.faces) for spec, source in opened]
    human = sys.stderr if config.events.jsonl == "-" else sys.stdout  # stdout carries the JSON lines then

    def on_event(event: Any) -> None:
        if not args.quiet:
            print(describe_event(event), file=human, flush=True)

    def on_result(result: Any, face: Any, ms: float) -> None:
        print(describe(result, face, ms), file=human, flush=True)

    try:
        with handle_signals(StopSignal()) as stop:
            stats = run_cameras(cameras, config, on_result if args.print_results else None, stop=stop,
                                on_event=on_event, progress=False)
    except CloudRefused as error:
        return fail(str(error), EXIT_REFUSED)
    except CloudUnreachable as error:
        return fail(f"{error}; is the server running, and is --server right?", EXIT_FAILURE)
    except (TransportSecurityError, BackendUnavailableError, OSError, ValueError) as error:  # certificates, secret
        return fail(str(error), EXIT_CONFIG)  # files, sinks, a GPU provider whose libraries do not load
    finally:
        for _, source in opened:
            source.close()
    _print_summary(stats)
    stream = stats.stream
    assert stream is not None
    for error in stream.errors:
        print(f"error: {error}", file=sys.stderr)
    if any("UNAUTHENTICATED" in e or "PERMISSION_DENIED" in e for e in stream.errors):
        return EXIT_REFUSED
    return EXIT_FAILURE if stream.errors or stream.unanswered or stream.timed_out else EXIT_OK


def _print_summary(stats: Any) -> None:
    for cam in stats.cameras:
        t, f = cam.tracks, cam.feed
        live = f", lag behind live max {cam.lag_s_max:.2f} s mean {cam.lag_s_mean:.2f} s, {f.dropped} stale frames " \
               f"dropped, {f.reconnects} reconnects" if f.frames_read != f.handed or f.reconnects or cam.lag_s_max else ""
        events = f", events {cam.events.delivered} delivered / {cam.events.dropped} dropped / {cam.events.failed} failed" \
            if cam.events is not None else ""
        print(
            f"camera {cam.camera}: {cam.frames} frames, {cam.frames_without_face} without a face, {cam.unreadable} "
            f"unreadable{live}; {cam.faces_seen} faces seen, {cam.faces_sent} sent; {t.tracks} tracks, "
            f"{t.decisions} decided, {t.updates} updates, {t.unsent_tracks} never good enough to send{events}",
            file=sys.stderr,
        )
    s = stats.stream
    print(
        f"{'stopped on request; ' if stats.stopped else ''}{stats.frames} frames, {stats.faces} faces sent; answered "
        f"{s.answered}, dropped {s.dropped} ({s.dropped_duplicates} near-duplicate shots), resent {s.resent}, "
        f"reconnects {s.reconnects}, timed out {s.timed_out}, unanswered {s.unanswered}",
        file=sys.stderr,
    )


def add_edge_parser(sub: argparse._SubParsersAction) -> None:
    from facelink.config import EdgeConfig
    from facelink.edge.run import EXIT_CODES
    from facelink.transport import add_client_security_arguments

    defaults = EdgeConfig()
    tracks = defaults.tracks
    exit_codes = "\n".join(f"  {code}  {what}" for code, what in EXIT_CODES.items())
    p = sub.add_parser(
        "edge",
        help="stream faces from cameras, videos, RTSP URLs or picture folders to a server",
        formatter_class=_FORMATTER,
        description="""\
The device side: read frames, detect faces (YuNet, or dlib's HOG where ../shared is absent),
follow each person across frames as a track, and send the best few shots of each track: each
shot aligned to the canonical crop and encoded (or, with --payload embedding, embedded by the
small query model on the board: 128 int8 bytes), over one bidirectional gRPC call. The cloud
answers each shot; the edge pools a track's answers into one decision and publishes track
events: `decision`, `update` (a better answer from a better shot), `track_ended`.

Shots (--send): best (default) sends the best shot of a track's first 0.4 s, then one clearly
better (quality + 0.1), or while the track is not yet a MATCH its best since, no sooner than
--resend-after seconds later, up to --max-shots-per-track;
first sends the first shot; every sends every shot (one observation per face and frame). The
quality (0..1) combines face size, sharpness, pose from the landmarks and the detector's
score; shots under --min-quality are never sent.

Live sources (cameras, RTSP, GStreamer) are read on a capture thread that hands over the newest
frame (stale frames are dropped and counted, --fps caps the rate) and reopens a lost camera
with exponential backoff until stopped. SIGTERM/SIGINT drain: in-flight faces are answered,
tracks end, sinks flush, the summary is printed, within --drain-timeout seconds.

At start the cloud's capabilities are checked: a codec version or query model it would refuse
stops the edge with exit code 3. The link is plaintext unless --tls-ca (or --tls) is given;
add --tls-cert/--tls-key for mutual TLS, or a bearer token with --token-file or $FACELINK_TOKEN.""",
        epilog=f"""\
sources:
  0, 1, ...                 a camera by index
  rtsp://user:pw@host/path  an RTSP (or http) stream
  "nvarguscamerasrc ! ... ! appsink"   a GStreamer pipeline (needs OpenCV with GStreamer)
  clip.mp4                  a video file (capture times from the stream's timestamps)
  photos/                   a folder of pictures (recursive; LFW's <person>/<file> layout
                            gives each picture its person as a label)

several cameras (--config cameras.json, or .yaml with PyYAML installed): flags give the
defaults, each camera its source, id and what it overrides (stride, max_frames, faces,
tracks: {{send, max_shots, ...}}, live: {{fps, ...}}); one connection serves them all:
  {{"cameras": [{{"source": "rtsp://cam1/stream", "camera_id": "door-1"}},
               {{"source": "0", "camera_id": "lobby", "live": {{"fps": 5}}}}]}}

exit codes:
{exit_codes}

examples:
  facelink edge --source 0 --server cloud.example:50051 --camera-id door-1 --events-jsonl -
  facelink edge --source clip.mp4 --send best --max-shots-per-track 3 --events-jsonl events.jsonl
  facelink edge --source rtsp://cam.local/stream --fps 10 --mqtt-host broker.local
  facelink edge --config cameras.json --server cloud.example:50051 --tls-ca pki/ca.crt --token-file door.token
  facelink edge --source 0 --webhook-url https://hooks.example/faces --webhook-secret-file hook.secret
  facelink edge --source 0 --payload embedding     # 128 bytes per face: facelink-query-v9, int8
  facelink edge --source 0 --providers tensorrt,cuda,cpu --detect-size 640   # a Jetson's GPU (onnxruntime-gpu)""",
    )
    src = p.add_argument_group("sources")
    src.add_argument("--source", help="camera index, RTSP URL, GStreamer pipeline, video file or picture folder")
    src.add_argument("--config", type=Path, metavar="FILE", help="several cameras from a JSON/YAML file (instead of --source)")
    src.add_argument("--camera-id", default="camera-0", help="name of this camera in results and events (default camera-0)")
    src.add_argument("--max-frames", type=int, help="stop after this many frames")
    src.add_argument("--stride", type=int, default=1, help="use every n-th frame (default 1)")
    src.add_argument("--fps", type=float, default=None,
                     help="live sources: process at most this many frames a second, the newest each time (default: as fast as possible)")

    p.add_argument("--server", default="localhost:50051", help="host:port of the service (default localhost:50051)")
    p.add_argument("--payload", choices=["face", "embedding"], default=defaults.payload,
                   help=f"what travels per face: the coded crop, or the query model's int8 embedding (default {defaults.payload})")
    p.add_argument("--codec", default=defaults.codec,
                   help=f"face payload codec: jpeg, webp, png, learned (the bundled 'default' learned codec), "
                        f"learned:wide (fewer bytes, twice the encoder's compute), learned:<manifest.json> "
                        f"(default {defaults.codec})")
    p.add_argument("--quality", type=int, default=defaults.quality,
                   help="codec quality: 1-100 for jpeg/webp, 1-5 for learned (default: the codec's own, "
                        "90 for jpeg/webp, the bundle's for learned)")
    p.add_argument("--crop-border", action=argparse.BooleanOptionalAction, default=defaults.crop_border is not None,
                   help="learned codecs: code the crop's border ring of 16 px latent cells (margin, hair, background) "
                        "at quality 1 and the face at --quality (default: the bundle's border_ring_quality): fewer "
                        f"bytes for the same identity (default {'on' if defaults.crop_border is not None else 'off'})")
    p.add_argument("--query-model", default=defaults.query_model,
                   help=f"embedding payload model, manifest name or path (default {defaults.query_model})")
    p.add_argument("--detector", choices=["auto", "yunet", "yunet-ort", "dlib"], default="auto",
                   help="face detector (default auto: YuNet if its model is present, else dlib); YuNet runs through "
                        "OpenCV on the CPU, or through ONNX Runtime (yunet-ort, and auto/yunet when --providers "
                        "starts with a GPU provider)")
    p.add_argument("--detect-size", type=_detect_size, default=defaults.detector.detect_size, metavar="PX",
                   help="detect on the frame scaled down to this longest side, boxes and landmarks mapped back to "
                        f"full resolution (0: detect at full resolution; default {defaults.detector.detect_size})")
    p.add_argument("--providers", type=_providers, default=None, metavar="LIST",
                   help="ONNX Runtime execution providers for every edge model (detector, learned encoder, query "
                        "model), in order of preference: tensorrt, cuda, cpu (e.g. tensorrt,cuda,cpu; TensorRT gets "
                        "fp16 and an engine cache under $FACELINK_CACHE/ort-tensorrt), or full ONNX Runtime names "
                        "with options (TensorrtExecutionProvider:trt_fp16_enable=0). GPU providers need "
                        "onnxruntime-gpu (deploy/jetson/README.md). Default: cpu")
    p.add_argument("--faces", choices=["all", "largest", "central"], default="all", help="faces per frame to consider")
    p.add_argument("--crop-size", type=int, default=128, help="side of the canonical aligned crop in px (default 128)")

    shots = p.add_argument_group("shots per track")
    shots.add_argument("--send", choices=["best", "first", "every"], default=tracks.send,
                       help=f"which shots of a track to send (default {tracks.send})")
    shots.add_argument("--max-shots-per-track", type=int, default=tracks.max_shots, metavar="N",
                       help=f"--send best: shots per track at most (default {tracks.max_shots})")
    shots.add_argument("--resend-after", type=float, default=tracks.resend_after_s, metavar="SECONDS",
                       help=f"--send best: a clearly better shot goes out this long after the last one (default {tracks.resend_after_s:g})")
    shots.add_argument("--min-quality", type=_fraction, default=tracks.min_quality, metavar="Q",
                       help=f"never send shots of lower quality, 0..1 (default {tracks.min_quality:g})")

    link = p.add_argument_group("link")
    link.add_argument("--queue-size", type=int, default=256, help="faces buffered while the link is busy (default 256)")
    link.add_argument("--overflow", choices=["block", "drop_oldest"],
                      help="when the buffer is full (default: drop_oldest for live sources, block for files); "
                           "near-duplicate shots of a track go before a track's only shot")
    link.add_argument("--face-timeout", type=_seconds, default=defaults.stream.face_timeout_s, metavar="SECONDS",
                      help="how long a sent face may wait for its answer while connected before the stream is "
                           f"reopened and the face resent; a second miss reports it failed (default {defaults.stream.face_timeout_s:g})")
    link.add_argument("--drain-timeout", type=_seconds, default=defaults.drain_timeout_s, metavar="SECONDS",
                      help=f"at the end or on SIGTERM/SIGINT: how long answers and sinks may take (default {defaults.drain_timeout_s:g})")

    out = p.add_argument_group("events out")
    out.add_argument("--events-jsonl", metavar="PATH|-", help="track events as JSON lines to this file (appended) or - (stdout)")
    out.add_argument("--webhook-url", help="POST each event here, HMAC-signed (https://, or http:// on loopback)")
    out.add_argument("--webhook-secret-file", type=Path, help="file holding the webhook's HMAC secret")
    out.add_argument("--mqtt-host", help="publish events to this MQTT broker: <prefix>/<camera>/events, .../identity/<name>")
    out.add_argument("--mqtt-port", type=int, help="default 1883, or 8883 with --mqtt-tls-ca")
    out.add_argument("--mqtt-topic-prefix", default="facelink", help="topic prefix (default facelink)")
    out.add_argument("--mqtt-username")
    out.add_argument("--mqtt-password-file", type=Path)
    out.add_argument("--mqtt-tls-ca", type=Path, help="CA of the broker's certificate; turns TLS on")
    out.add_argument("--print-results", action="store_true", help="also print one line per answered shot")
    out.add_argument("-q", "--quiet", action="store_true", help="no human line per event (the summary stays)")
    add_client_security_arguments(p)
    add_common(p)
    p.set_defaults(func=_edge)
