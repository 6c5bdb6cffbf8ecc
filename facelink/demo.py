"""The end-to-end demo: a real server on loopback, a real edge client, LFW faces.

1. start the gRPC service on 127.0.0.1 with a fresh gallery in a temporary directory;
2. enroll one picture of each of N LFW people who have two or more pictures (Gallery.Enroll,
   the server detects and aligns);
3. stream their other pictures plus pictures of M people never enrolled through the edge
   pipeline (detect, align to the canonical crop, encode, bidirectional stream);
4. summarise: rank-1 on enrolled people, correct rejections of strangers, bytes per face,
   end-to-end latency.
Which people and pictures take part is fixed by --seed, so two runs see the same faces.
"""

from __future__ import annotations

import logging
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from tqdm import tqdm

from facelink.benchmarks import reporting
from facelink.config import CloudConfig, EdgeConfig, StreamConfig, TrackPolicy
from facelink.datasets import LFW
from facelink.runtime.codecs import default_quality
from facelink.transport import call_within_rate_limit
from facelink.v1 import common_pb2, gallery_pb2, gallery_pb2_grpc, recognition_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoOptions:
    data: str | None = None
    identities: int = 300
    probes_per_identity: int = 3
    distractors: int = 300
    seed: int = 0
    codec: str = EdgeConfig().codec
    quality: int | None = None  # the codec's default
    recognizer: str = "auto"
    threshold: float | None = None
    json_path: Path | None = None


@dataclass
class DemoSummary:
    recognizer: str
    codec: str
    threshold: float
    enrolled_identities: int
    enrollment_failures: int
    enrolled_probes: int
    stranger_probes: int
    pictures_without_face: int
    rank1_accuracy: float            # top-1 identity is right, whatever the threshold
    identification_rate: float       # MATCH with the right identity at the threshold
    correct_rejection_rate: float    # strangers answered UNKNOWN
    mean_bytes_per_face: float
    latency_ms_p50: float            # frame read on the device -> result back on the device
    latency_ms_p95: float
    server_ms_p50: float
    edge_ms_p50: float               # detect + align + encode on the device
    wall_s: float
    rejected: int = 0
    errors: list[str] = field(default_factory=list)


def choose_people(lfw: LFW, options: DemoOptions) -> tuple[dict[str, Path], list[tuple[Path, str]], list[Path]]:
    """(enrolled name -> gallery picture, [(probe picture, name)], [stranger pictures])."""
    people = lfw.people()
    rng = random.Random(options.seed)
    repeat = sorted(n for n, paths in people.items() if len(paths) >= 2)
    single = sorted(n for n, paths in people.items() if len(paths) == 1)
    enrolled = rng.sample(repeat, min(options.identities, len(repeat)))
    strangers = rng.sample(single, min(options.distractors, len(single)))
    gallery = {name: people[name][0] for name in enrolled}
    probes = [(path, name) for name in enrolled for path in people[name][1 : 1 + options.probes_per_identity]]
    return gallery, probes, [people[name][0] for name in strangers]


def enroll_all(channel: grpc.Channel, gallery: dict[str, Path]) -> list[str]:
    stub = gallery_pb2_grpc.GalleryStub(channel)
    failures = []
    for name, path in tqdm(sorted(gallery.items()), desc="enroll", unit="person"):
        request = gallery_pb2.EnrollRequest(
            identity=name,
            images=[gallery_pb2.EnrollImage(image=common_pb2.Image(format=common_pb2.IMAGE_FORMAT_JPEG, data=path.read_bytes()))],
            metadata={"source": path.name},
        )
        try:
            call_within_rate_limit(stub.Enroll, request, timeout=30)  # the server limits calls per principal
        except grpc.RpcError as error:
            failures.append(f"{name}: {error.code().name} {error.details()}")
    return failures


def payload_label(config: EdgeConfig) -> str:
    """What the edge sends per face, as the summary names it (e.g. `learned q5, border ring q1`)."""
    from facelink.edge.pipeline import crop_codec
    from facelink.runtime.codecs.face_aware import AlignedCropCodec

    codec = crop_codec(config)
    quality = getattr(codec, "quality", None) or default_quality(config.codec)
    label = f"{config.codec} q{quality}"
    if isinstance(codec, AlignedCropCodec):
        label += f", border ring q{codec.background.quality}"
    return label


def run_demo(options: DemoOptions) -> DemoSummary:
    from pydantic import SecretStr

    from facelink.cloud.auth import AuthStore
    from facelink.cloud.server import start_server
    from facelink.transport import ClientSecurity, client_channel
    from facelink.edge.run import run_edge
    from facelink.edge.sources import open_source

    started = time.perf_counter()
    lfw = LFW.locate(options.data)
    gallery, probes, strangers = choose_people(lfw, options)
    # Frame names from an image list are paths; <person>/<file> is unique in LFW.
    truth = {_tail(path): name for path, name in probes}
    with tempfile.TemporaryDirectory(prefix="facelink-demo-") as tmp:
        cloud = CloudConfig(
            port=0, gallery_dir=Path(tmp) / "gallery", recognizer=options.recognizer, match_threshold=options.threshold
        )
        # Credentials as a deployment has them: an operator who enrolls, a camera that streams
        # (with `scores`, so the demo can report the nearest identity of every probe).
        store = AuthStore(cloud.auth_path)
        operator = ClientSecurity(token=SecretStr(store.create_token("demo-operator", ["enroll"])[1]))
        camera = ClientSecurity(token=SecretStr(store.create_token("demo-camera", ["recognize", "scores"])[1]))
        server = start_server(cloud)
        try:
            with client_channel(server.address, operator) as channel:
                failures = enroll_all(channel, gallery)
            edge = EdgeConfig(
                codec=options.codec,
                quality=options.quality,
                faces="central",  # LFW pictures are centred on the person they are labelled with
                # One picture is one probe: every face is sent and answered on its own (no shot
                # selection, no quality gate), so the figures stay per picture.
                tracks=TrackPolicy(send="every", min_quality=0.0),
                # Closed loop: at most two faces waiting and two on the wire, so the latency we
                # report is that of a device the server keeps up with, not of a queued backlog.
                stream=StreamConfig(
                    server=server.address, camera_id="lfw-demo", queue_size=2, max_in_flight=2, security=camera
                ),
            )
            pictures = [path for path, _ in probes] + strangers
            source = open_source(None, image_list=pictures)
            outcomes: dict[str, tuple[recognition_pb2.FaceResult, int, float, float]] = {}

            def collect(result: recognition_pb2.FaceResult, face, e2e_ms: float) -> None:  # noqa: ANN001
                outcomes[face.frame_name] = (result, face.payload_bytes, e2e_ms, face.edge_ms)

            stats = run_edge(source, edge, collect)
        finally:
            server.stop()

    enrolled_hits = identified = strangers_rejected = rejected = 0
    for frame_name, (result, _, _, _) in outcomes.items():
        rejected += result.decision == recognition_pb2.DECISION_REJECTED
        person = truth.get(_tail(frame_name))
        if person is None:
            strangers_rejected += result.decision == recognition_pb2.DECISION_UNKNOWN
        else:
            enrolled_hits += result.identity == person
            identified += result.identity == person and result.decision == recognition_pb2.DECISION_MATCH
    sizes = np.array([o[1] for o in outcomes.values()], dtype=np.float64)
    e2e = np.array([o[2] for o in outcomes.values()], dtype=np.float64)
    server_ms = np.array([o[0].server_latency_us / 1e3 for o in outcomes.values()], dtype=np.float64)
    edge_ms = np.array([o[3] for o in outcomes.values()], dtype=np.float64)
    threshold = next((o[0].threshold for o in outcomes.values() if o[0].model_id), float("nan"))
    model_id = next((o[0].model_id for o in outcomes.values() if o[0].model_id), options.recognizer)
    return DemoSummary(
        recognizer=model_id,
        codec=payload_label(edge),
        threshold=float(threshold),
        enrolled_identities=len(gallery) - len(failures),
        enrollment_failures=len(failures),
        enrolled_probes=len(probes),
        stranger_probes=len(strangers),
        pictures_without_face=stats.frames_without_face + stats.unreadable,
        # Denominators are all probes sent, so a face the edge missed counts as an error.
        rank1_accuracy=enrolled_hits / max(len(probes), 1),
        identification_rate=identified / max(len(probes), 1),
        correct_rejection_rate=strangers_rejected / max(len(strangers), 1),
        mean_bytes_per_face=float(sizes.mean()) if sizes.size else 0.0,
        latency_ms_p50=_pct(e2e, 50),
        latency_ms_p95=_pct(e2e, 95),
        server_ms_p50=_pct(server_ms, 50),
        edge_ms_p50=_pct(edge_ms, 50),
        wall_s=time.perf_counter() - started,
        rejected=rejected,
        errors=failures + (stats.stream.errors if stats.stream else []),
    )


def _tail(path: str | Path) -> str:
    return "/".join(Path(path).parts[-2:])


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else float("nan")


def format_summary(summary: DemoSummary, command: str) -> str:
    rows = [
        ("recogniser", summary.recognizer),
        ("payload codec", summary.codec),
        ("match threshold (cosine)", f"{summary.threshold:.3f}"),
        ("enrolled identities (1 picture each)", f"{summary.enrolled_identities} ({summary.enrollment_failures} failed)"),
        ("probes of enrolled people", str(summary.enrolled_probes)),
        ("probes of never-enrolled people", str(summary.stranger_probes)),
        ("pictures with no face found", str(summary.pictures_without_face)),
        ("rank-1 accuracy, enrolled people", f"{100 * summary.rank1_accuracy:.2f}%"),
        ("identified at threshold, enrolled people", f"{100 * summary.identification_rate:.2f}%"),
        ("correct rejection, never-enrolled people", f"{100 * summary.correct_rejection_rate:.2f}%"),
        ("mean bytes per face", f"{summary.mean_bytes_per_face:.0f}"),
        ("end-to-end latency p50 / p95", f"{summary.latency_ms_p50:.1f} / {summary.latency_ms_p95:.1f} ms"),
        ("  of which edge (detect+align+encode) p50", f"{summary.edge_ms_p50:.1f} ms"),
        ("  of which server p50", f"{summary.server_ms_p50:.1f} ms"),
        ("wall time", f"{summary.wall_s:.1f} s"),
    ]
    lines = [
        f"command: {command}",
        f"{reporting.machine_line(reporting.machine_info())}; date: {reporting.utc_now()}",
        "",
        *reporting.markdown_table(["metric", "value"], rows),
    ]
    if summary.errors:
        lines += ["", "errors:", *[f"  {e}" for e in summary.errors[:20]]]
    return "\n".join(lines)


def write_json(summary: DemoSummary, path: Path, command: str) -> None:
    payload = {"command": command, "date": reporting.utc_now(), "machine": reporting.machine_info(), "summary": asdict(summary)}
    reporting.write_results(path, payload)


def main(options: DemoOptions) -> int:
    command = "facelink demo " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else "facelink demo"
    summary = run_demo(options)
    print(format_summary(summary, command.strip()))
    if options.json_path is not None:
        write_json(summary, options.json_path, command.strip())
        print(f"\nwrote {options.json_path}")
    return 0
