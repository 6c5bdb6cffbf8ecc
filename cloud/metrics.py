"""Service metrics in the Prometheus format: what an operator graphs and alerts on.

One registry per server (not the process-global default), so several servers in one process,
as in the tests and the demo, keep separate counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Buckets in seconds around the latencies that matter here: a few ms per face on a CPU.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.faces = Counter(
            "facelink_faces", "Observations answered, by payload kind and decision", ["payload", "decision"], registry=self.registry
        )
        self.errors = Counter("facelink_face_errors", "Rejected observations by gRPC status", ["code"], registry=self.registry)
        self.latency = Histogram(
            "facelink_face_seconds", "Server time per observation", ["payload"], buckets=_LATENCY_BUCKETS, registry=self.registry
        )
        self.streams = Gauge("facelink_open_streams", "Recognize streams currently open", registry=self.registry)
        self.payload_bytes = Counter("facelink_payload_bytes", "Payload bytes received", ["payload"], registry=self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose /metrics over HTTP on `port` (a daemon thread)."""
        start_http_server(port, addr=host, registry=self.registry)
