"""Building and running the gRPC server: services, health, reflection, limits, shutdown."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from facelink.config import CloudConfig
from facelink.v1 import gallery_pb2, gallery_pb2_grpc, recognition_pb2, recognition_pb2_grpc

from .engine import RecognitionEngine
from .gallery import Gallery
from .metrics import ServiceMetrics
from .service import GalleryService, RecognitionService

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    recognition_pb2.DESCRIPTOR.services_by_name["Recognition"].full_name,
    gallery_pb2.DESCRIPTOR.services_by_name["Gallery"].full_name,
)


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    engine: RecognitionEngine
    health: health.HealthServicer
    metrics: ServiceMetrics

    @property
    def address(self) -> str:
        return f"{self.engine.config.host}:{self.port}"

    def stop(self, grace: float | None = 2.0) -> None:
        """Report NOT_SERVING, let calls in flight finish for `grace` seconds, close the gallery."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.engine.gallery.close()


def start_server(config: CloudConfig, engine: RecognitionEngine | None = None) -> RunningServer:
    """Start serving on config.host:config.port (port 0 picks a free one) and return at once."""
    engine = engine or RecognitionEngine(config, Gallery.open(config.gallery_dir))
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # Devices sit behind NATs on thin uplinks: keepalives keep idle streams open and let
        # the server notice a vanished device.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers), options=options)
    metrics = ServiceMetrics()
    if config.metrics_port is not None:
        metrics.serve(config.metrics_port, config.host)
    recognition = RecognitionService(engine, metrics)
    recognition_pb2_grpc.add_RecognitionServicer_to_server(recognition, server)
    gallery_pb2_grpc.add_GalleryServicer_to_server(GalleryService(engine), server)

    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port} (address in use or not local)")
    server.start()
    for name in ("", *SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving facelink.v1 on %s:%d (recogniser %s, threshold %.3f; gallery models %s; query models %s; "
        "%d identities in %s)",
        config.host, port, engine.recognizer.model_id, engine.threshold, ", ".join(engine.recognizers),
        ", ".join(engine.query_models) or "none", len(engine.gallery), config.gallery_dir,
    )
    return RunningServer(server, port, engine, health_servicer, metrics)


def serve(config: CloudConfig) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully."""
    running = start_server(config)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    print(f"facelink cloud listening on {running.address}; Ctrl-C to stop", flush=True)
    stopping.wait()
    log.info("shutting down")
    running.stop()
