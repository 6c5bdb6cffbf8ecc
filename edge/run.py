"""The device loop: source -> pipeline -> stream, with results handed back as they arrive."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from tqdm import tqdm

from facelink.config import EdgeConfig
from facelink.v1 import recognition_pb2

from .client import Pending, StreamClient, StreamStats
from .pipeline import EdgePipeline
from .sources import FrameSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SentFace:
    """What the device remembers about a face until its result comes back."""

    frame_name: str
    label: str | None        # ground truth when the source knows it (LFW-style folders)
    payload_bytes: int
    read_at: float           # time.perf_counter() when the frame was read: end-to-end latency starts here
    edge_ms: float           # detect + align + encode on the device


@dataclass
class EdgeRunStats:
    frames: int = 0
    faces: int = 0
    frames_without_face: int = 0
    unreadable: int = 0
    stream: StreamStats | None = None


OnResult = Callable[[recognition_pb2.FaceResult, SentFace, float], None]  # result, face, end-to-end ms


def run_edge(
    source: FrameSource,
    config: EdgeConfig,
    on_result: OnResult,
    *,
    pipeline: EdgePipeline | None = None,
    progress: bool = True,
) -> EdgeRunStats:
    """Stream every face of `source`; `on_result` gets each answer (or the client's DEADLINE_EXCEEDED
    report for a face the server never answered, see edge/client.py) as it arrives."""
    stats = EdgeRunStats()

    def deliver(result: recognition_pb2.FaceResult, pending: Pending) -> None:
        face: SentFace = pending.meta
        on_result(result, face, (time.perf_counter() - face.read_at) * 1e3)

    # The client first: a security mistake (unreadable certificate, token bound for plaintext)
    # raises TransportSecurityError here, before the models load or the camera is read.
    client = StreamClient(config.stream, deliver)
    try:
        pipeline = pipeline or EdgePipeline(config)
        client.start()
        for frame in tqdm(source, total=source.total, desc="edge", unit="frame", disable=not progress):
            stats.frames += 1
            read_at = time.perf_counter()
            if not source.live:
                pipeline.tracker.reset()  # independent pictures: a track never spans two of them
            faces = pipeline.process(frame)
            edge_ms = (time.perf_counter() - read_at) * 1e3
            if not faces:
                stats.frames_without_face += 1
                log.info("no face in %s", frame.name)
            for face in faces:
                stats.faces += 1
                sent = SentFace(frame.name, frame.label, len(face.observation.face.data), read_at, edge_ms)
                client.submit(face.observation, sent)
    finally:
        stats.stream = client.close()
        stats.unreadable = source.skipped
    return stats


def describe(result: recognition_pb2.FaceResult, face: SentFace, e2e_ms: float) -> str:
    """One human-readable line per result, for `facelink edge`."""
    decision = recognition_pb2.Decision.Name(result.decision).removeprefix("DECISION_")
    head = f"{result.camera_id} frame {result.frame_sequence} face {result.face_index} track {result.track_id} [{face.frame_name}]"
    if result.decision == recognition_pb2.DECISION_REJECTED:
        return f"{head}: REJECTED {result.error.message}"
    who = result.identity or "-"
    return (
        f"{head}: {decision} {who} score {result.score:.3f} | {face.payload_bytes} B, "
        f"edge {face.edge_ms:.1f} ms, server {result.server_latency_us / 1e3:.1f} ms, end-to-end {e2e_ms:.1f} ms"
    )
