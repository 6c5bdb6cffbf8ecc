"""Building and running the gRPC server: TLS, credentials, services, health, limits, shutdown.

The server is grpc.aio: a stream that waits for its camera costs a coroutine, not a thread,
so hundreds of devices share one process and health checks are answered while all of them
are busy. `start_server` runs it on an event loop in a background thread (tests, the demo,
benchmarks); `serve` runs it in the foreground until SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from facelink.v1 import gallery_pb2, gallery_pb2_grpc, recognition_pb2, recognition_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from facelink.config import CloudConfig

from .audit import AuditLog
from .auth import AuthInterceptor, Authenticator, AuthStore, RateLimiter
from .engine import RecognitionEngine
from .gallery import GalleryBackend, GalleryLimits, GallerySettings
from .gallery import open_gallery as open_backend
from .metrics import ServiceMetrics
from .service import GalleryService, RecognitionService

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    recognition_pb2.DESCRIPTOR.services_by_name["Recognition"].full_name,
    gallery_pb2.DESCRIPTOR.services_by_name["Gallery"].full_name,
)


class InsecureConfigError(ValueError):
    """The configuration would expose the service without TLS."""


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_credentials(config: CloudConfig) -> grpc.ServerCredentials | None:
    """TLS (and mutual TLS with a client CA) from the configured PEM files; None for plaintext,
    which is refused on anything but loopback unless `insecure` is set."""
    security = config.security
    if (security.tls_cert is None) != (security.tls_key is None):
        raise InsecureConfigError("--tls-cert and --tls-key go together")
    if security.tls_cert is None:
        if security.client_ca is not None:
            raise InsecureConfigError("--client-ca needs --tls-cert and --tls-key: mutual TLS is TLS first")
        if not is_loopback(config.host) and not security.insecure:
            raise InsecureConfigError(
                f"refusing to serve biometric data in plaintext on {config.host}: give --tls-cert and --tls-key "
                "(facelink certs makes a development set), or --insecure if a TLS proxy in front terminates it"
            )
        return None
    key, chain = Path(security.tls_key).read_bytes(), Path(security.tls_cert).read_bytes()
    client_ca = Path(security.client_ca).read_bytes() if security.client_ca else None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None)


def open_gallery(config: CloudConfig) -> GalleryBackend:
    """The configured gallery: embedded in `gallery_dir`, or Qdrant at `gallery_backend.url`
    (with `gallery_dir` holding the server's own files); the service never asks which."""
    limits, backend = config.limits, config.gallery_backend
    settings = GallerySettings(**backend.model_dump(exclude={"url", "index"}), index=backend.index)
    return open_backend(backend.url or config.gallery_dir, GalleryLimits(
        max_identities=limits.max_identities, max_pictures_per_identity=limits.max_pictures_per_identity
    ), settings, state_dir=config.gallery_dir)


@dataclass
class _Built:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    recognition: RecognitionService
    gallery: GalleryService


async def _build(config: CloudConfig, engine: RecognitionEngine, metrics: ServiceMetrics, audit: AuditLog) -> _Built:
    credentials = server_credentials(config)
    store = AuthStore(config.auth_path)
    if not store.tokens() and not store.grants() and config.security.client_ca is None:
        log.warning("no tokens in %s: every call but health checks will be refused; "
                    "create one with `facelink cloud token create --gallery %s NAME --scope ...`",
                    config.auth_path, config.gallery_dir)
    limits = config.limits

    def denied(principal: str, method: str, peer: str, reason: str) -> None:
        audit.record(principal=principal, peer=peer, call=method, identity=None, outcome="denied", detail=reason)

    interceptor = AuthInterceptor(Authenticator(store), RateLimiter(limits.call_rate, limits.call_burst), denied)
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # Devices sit behind NATs on thin uplinks: keepalives keep idle streams open and let
        # the server notice a vanished device.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_concurrent_streams", limits.max_streams + 64),  # room for unary calls beside the streams
    ]
    server = grpc.aio.server(interceptors=[interceptor], options=options)
    recognition = RecognitionService(engine, metrics)
    await recognition.start()
    gallery = GalleryService(engine, audit)
    await gallery.start()
    recognition_pb2_grpc.add_RecognitionServicer_to_server(recognition, server)
    gallery_pb2_grpc.add_GalleryServicer_to_server(gallery, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.security.reflection:  # admin scope only (auth.METHOD_SCOPES)
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    address = f"{config.host}:{config.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address} (address in use or not local)")
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    transport = "mutual TLS" if config.security.client_ca else "TLS" if credentials else "PLAINTEXT"
    if credentials is None and not is_loopback(config.host):
        log.warning("INSECURE: serving plaintext on %s (--insecure); credentials and faces cross the network unencrypted", address)
    log.info(
        "serving facelink.v1 on %s:%d over %s (recogniser %s, threshold %.3f; gallery models %s; query models %s; "
        "%d identities in %s)",
        config.host, port, transport, engine.recognizer.model_id, engine.threshold, ", ".join(engine.recognizers),
        ", ".join(engine.query_models) or "none", len(engine.gallery), engine.gallery,
    )
    return _Built(server, port, health_servicer, recognition, gallery)


async def _shutdown(built: _Built, grace: float | None) -> None:
    await built.health.enter_graceful_shutdown()
    await built.server.stop(grace)
    await built.recognition.close()
    await built.gallery.close()


def _prepare(config: CloudConfig, engine: RecognitionEngine | None) -> tuple[RecognitionEngine, ServiceMetrics, AuditLog]:
    server_credentials(config)  # refuse an insecure configuration before loading any model
    engine = engine or RecognitionEngine(config, open_gallery(config))
    metrics = ServiceMetrics()
    if config.metrics_port is not None:
        metrics.serve(config.metrics_port, config.metrics_host)
    return engine, metrics, AuditLog(config.audit_path)


@dataclass
class RunningServer:
    """A server on its own event loop thread, for callers that are not async."""

    port: int
    engine: RecognitionEngine
    metrics: ServiceMetrics
    audit: AuditLog
    _built: _Built
    _loop: asyncio.AbstractEventLoop
    _thread: threading.Thread
    _stopped: bool = field(default=False)

    @property
    def address(self) -> str:
        host = self.engine.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def recognition(self) -> RecognitionService:
        return self._built.recognition

    def stop(self, grace: float | None = 2.0) -> None:
        """Report NOT_SERVING, let calls in flight finish for `grace` seconds, close the gallery."""
        if self._stopped:
            return
        self._stopped = True
        asyncio.run_coroutine_threadsafe(_shutdown(self._built, grace), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self.engine.gallery.close()


def start_server(config: CloudConfig, engine: RecognitionEngine | None = None) -> RunningServer:
    """Start serving on config.host:config.port (port 0 picks a free one) and return at once."""
    engine, metrics, audit = _prepare(config, engine)
    loop = asyncio.new_event_loop()
    ready: Future[_Built] = Future()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            ready.set_result(loop.run_until_complete(_build(config, engine, metrics, audit)))
        except BaseException as error:  # noqa: BLE001 - handed to the caller below
            ready.set_exception(error)
            return
        loop.run_forever()
        loop.close()

    thread = threading.Thread(target=run, name="facelink-server", daemon=True)
    thread.start()
    built = ready.result()
    return RunningServer(built.port, engine, metrics, audit, built, loop, thread)


def serve(config: CloudConfig) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully."""
    engine, metrics, audit = _prepare(config, None)

    async def main() -> None:
        built = await _build(config, engine, metrics, audit)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        host = f"[{config.host}]" if ":" in config.host else config.host
        print(f"facelink cloud listening on {host}:{built.port}; Ctrl-C to stop", flush=True)
        await stopping.wait()
        log.info("shutting down")
        await _shutdown(built, 5.0)

    try:
        asyncio.run(main())
    finally:
        engine.gallery.close()
