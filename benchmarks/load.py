"""The service under load: many devices streaming real learned-codec faces at once.

    facelink bench load                       # 1, 16, 64 and 256 streams, 20 s each
    facelink bench load -- --streams 64 --seconds 30

The server runs as `facelink cloud serve` in its own process with a real gallery (LFW people
enrolled through the Gallery service) and one token per device. The devices are grpc.aio
streams in this process, each keeping `--window` faces in flight, each face a canonical crop
coded by the edge pipeline's default learned codec from a real LFW picture. Measured per
stream count: faces answered a second, per-face latency (client send -> result), health-check
latency while every stream is busy, the server's peak resident memory. Then a flood of
worst-case valid payloads (the largest face the server decodes, coded at the codec's highest
quality) at the largest stream count, for memory. Last, in this process and on the same
payloads, the in-process engine's best batched throughput (decode + align + recognise + search
on both cores, no gRPC): the ceiling the service is compared with.

Load generator and server share this machine's cores, as devices and a server never would:
the service figures include the load generator's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from tqdm import tqdm

from . import reporting

DEFAULT_STREAMS = (1, 16, 64, 256)


@dataclass
class Workload:
    gallery: dict[str, bytes]                    # identity -> enrollment JPEG
    probes: list[bytes]                          # serialised FaceObservations (learned codec, default edge)
    worst: bytes                                 # one worst-case valid FaceObservation
    payload_bytes: float                         # mean face payload size
    codec_id: str


def build_workload(people: int, data: str | None) -> Workload:
    """Enrollment pictures and coded probe faces of LFW people with two or more pictures."""
    from facelink.config import EdgeConfig
    from facelink.datasets import LFW
    from facelink.edge.pipeline import EdgePipeline
    from facelink.edge.sources import Frame
    from facelink.runtime.codecs.standard import decode_image

    lfw = LFW.locate(data, download=False)
    chosen = [(name, paths) for name, paths in lfw.people().items() if len(paths) >= 2][:people]
    pipeline = EdgePipeline(EdgeConfig(faces="central"))
    gallery, probes, sizes = {}, [], []
    for index, (name, paths) in enumerate(tqdm(chosen, desc="coding probe faces", unit="person")):
        gallery[name] = paths[0].read_bytes()
        faces = pipeline.process(Frame(decode_image(paths[1].read_bytes()), index, 0, name))
        if faces:
            probes.append(faces[0].observation.SerializeToString())
            sizes.append(len(faces[0].observation.face.data))
    return Workload(gallery, probes, worst_case_observation(pipeline), float(np.mean(sizes)),
                    faces[0].observation.face.codec_id if faces else "")


def worst_case_observation(pipeline) -> bytes:  # noqa: ANN001 - an EdgePipeline
    """The costliest payload the server accepts: a face as large as its pixel budget allows,
    noise coded at the codec's highest quality, with landmarks of a face that fills it."""
    from facelink.config import ServiceLimits
    from facelink.runtime.alignment import ARCFACE_112
    from facelink.runtime.codecs import available_codecs
    from facelink.v1 import common_pb2, recognition_pb2

    learned = getattr(pipeline.codec, "codec", pipeline.codec)  # the edge's ring codec wraps the learned codec
    codec_id = learned.codec_id
    strongest = available_codecs()[codec_id].create(learned.manifest.qualities)  # its highest quality
    side = int(np.sqrt(ServiceLimits().max_face_pixels)) // 64 * 64
    noise = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    data = strongest.encode(noise)
    points = ARCFACE_112 * (side / 112)
    return recognition_pb2.FaceObservation(
        camera_id="flood", face=common_pb2.EncodedFace(codec_id=codec_id, codec_version=max(strongest.versions), data=data),
        payload_landmarks=common_pb2.Landmarks(points=[common_pb2.Point(x=float(x), y=float(y)) for x, y in points]),
    ).SerializeToString()


# -- the server process ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, gallery_dir: Path, max_streams: int, extra: list[str] = ()) -> None:
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "facelink.cli", "cloud", "serve", "--gallery", str(gallery_dir),
                   "--port", str(self.port), "--max-streams", str(max_streams), *extra]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 120) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the server exited: {self.process.stderr.read()[-2000:]}")
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    time.sleep(0.2)
        raise TimeoutError("the server did not start")

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def memory(self) -> tuple[int, int]:
        """(current, peak) resident bytes of the server process."""
        fields = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
        return fields.get("VmRSS", 0), fields.get("VmHWM", 0)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


# -- devices -----------------------------------------------------------------------------------
@dataclass
class StreamRun:
    streams: int
    faces: int
    seconds: float
    latencies_ms: list[float]
    rejected: int
    errors: list[str]
    health_ms: list[float]
    rss_peak: int
    server_cpu_s: float      # CPU time the server spent during the row
    client_cpu_s: float      # CPU time of this process (the load generator) during the row


async def _device(address: str, token: str, probes: list[bytes], window: int, until: float,
                  latencies: list[float], counts: dict[str, int], errors: list[str], offset: int) -> None:
    from facelink.v1 import recognition_pb2, recognition_pb2_grpc

    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        call = recognition_pb2_grpc.RecognitionStub(channel).Recognize(metadata=metadata)
        sent: dict[int, float] = {}
        next_id = 0

        async def send() -> None:
            nonlocal next_id
            observation = recognition_pb2.FaceObservation.FromString(probes[(offset + next_id) % len(probes)])
            observation.request_id = next_id
            sent[next_id] = time.perf_counter()
            next_id += 1
            await call.write(observation)

        try:
            for _ in range(window):
                await send()
            while sent:
                result = await call.read()
                if result is grpc.aio.EOF:
                    errors.append("stream ended early")
                    return
                latencies.append((time.perf_counter() - sent.pop(result.request_id)) * 1000)
                counts["faces"] += 1
                counts["rejected"] += result.decision == recognition_pb2.DECISION_REJECTED
                if time.monotonic() < until:
                    await send()
            await call.done_writing()
        except grpc.aio.AioRpcError as error:
            errors.append(f"{error.code().name}: {error.details()}")


async def _probe_health(address: str, until: float, latencies: list[float]) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < until:
            started = time.perf_counter()
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            latencies.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.05)


async def _run_streams(server: ServerProcess, tokens: list[str], probes: list[bytes], streams: int, window: int,
                       seconds: float) -> StreamRun:
    latencies: list[float] = []
    health: list[float] = []
    errors: list[str] = []
    counts = {"faces": 0, "rejected": 0}
    peak = 0
    until = time.monotonic() + seconds
    started = time.perf_counter()
    server_cpu, client_cpu = server.cpu_seconds(), _own_cpu_seconds()
    devices = [
        asyncio.create_task(_device(server.address, tokens[i], probes, window, until, latencies, counts, errors, i * 7))
        for i in range(streams)
    ]
    prober = asyncio.create_task(_probe_health(server.address, until, health))
    while not all(d.done() for d in devices):
        peak = max(peak, server.memory()[0])
        await asyncio.sleep(0.2)
    await prober
    return StreamRun(streams, counts["faces"], time.perf_counter() - started, latencies, counts["rejected"], errors,
                     health, max(peak, server.memory()[0]), server.cpu_seconds() - server_cpu,
                     _own_cpu_seconds() - client_cpu)


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


# -- the in-process ceiling --------------------------------------------------------------------
def engine_ceiling(
    gallery_dir: Path, probes: list[bytes], batches: tuple[int, ...], faces: int
) -> tuple[dict[int, float], dict[int, float]]:
    """Faces a second of the engine alone, and its CPU ms a face: decode, align, recognise in
    batches, search, on a pool of as many threads as cores, for each batch size."""
    from facelink.cloud.engine import RecognitionEngine
    from facelink.cloud.gallery import Gallery
    from facelink.config import CloudConfig
    from facelink.runtime.codecs import available_codecs
    from facelink.v1 import recognition_pb2

    config = CloudConfig(gallery_dir=gallery_dir)
    engine = RecognitionEngine(config, Gallery.open(gallery_dir))
    observations = [recognition_pb2.FaceObservation.FromString(p) for p in probes]
    codecs = available_codecs()
    decoders = {o.face.codec_id: codecs[o.face.codec_id].create(codecs[o.face.codec_id].default_quality) for o in observations}

    def chunk(items: list) -> int:  # noqa: ANN001
        crops = []
        for o in items:
            image = decoders[o.face.codec_id].decode(o.face.data)
            landmarks = np.array([(p.x, p.y) for p in o.payload_landmarks.points], np.float32)
            crops.append(engine.align(image, engine.locate_face(image, landmarks, "probe")[0]))
        return len(engine.identify_aligned(np.stack(crops)))

    rates: dict[int, float] = {}
    cpu_ms: dict[int, float] = {}
    workers = reporting.cpu_count()
    for batch in batches:
        work = [[observations[(i + j) % len(observations)] for j in range(batch)] for i in range(0, faces, batch)]
        chunk(work[0])  # warm up
        started, cpu = time.perf_counter(), _own_cpu_seconds()
        with ThreadPoolExecutor(workers) as pool:
            done = sum(pool.map(chunk, work))
        rates[batch] = done / (time.perf_counter() - started)
        cpu_ms[batch] = (_own_cpu_seconds() - cpu) / done * 1000
    engine.gallery.close()
    return rates, cpu_ms


# -- the run -----------------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run(args: argparse.Namespace) -> dict:
    from facelink.cloud.auth import AuthStore
    from facelink.transport import ClientSecurity, call_within_rate_limit, client_channel
    from facelink.v1 import common_pb2, gallery_pb2, gallery_pb2_grpc
    from pydantic import SecretStr

    workload = build_workload(args.people, args.data)
    max_streams = max(args.streams)
    rows, flood = [], None
    with tempfile.TemporaryDirectory(prefix="facelink-load-") as tmp:
        gallery_dir = Path(tmp) / "gallery"
        store = AuthStore(gallery_dir / "auth.json")
        admin = store.create_token("bench-admin", ["enroll"])[1]
        tokens = [store.create_token(f"bench-device-{i}", ["recognize"])[1] for i in range(max_streams)]
        server = ServerProcess(gallery_dir, max_streams, shlex.split(args.serve_args))
        try:
            server.wait_ready()
            with client_channel(server.address, ClientSecurity(token=SecretStr(admin))) as channel:
                stub = gallery_pb2_grpc.GalleryStub(channel)
                for name, data in tqdm(workload.gallery.items(), desc="enrolling", unit="person"):
                    image = common_pb2.Image(format=common_pb2.IMAGE_FORMAT_JPEG, data=data)
                    request = gallery_pb2.EnrollRequest(identity=name, images=[gallery_pb2.EnrollImage(image=image)])
                    call_within_rate_limit(stub.Enroll, request)
            for streams in args.streams:
                result = asyncio.run(_run_streams(server, tokens, workload.probes, streams, args.window, args.seconds))
                rows.append(result)
                print(f"  {streams} streams: {result.faces / result.seconds:.1f} faces/s, "
                      f"p99 {_pct(result.latencies_ms, 99):.0f} ms, health p99 {_pct(result.health_ms, 99):.1f} ms", flush=True)
            flood = asyncio.run(_run_streams(server, tokens, [workload.worst], max_streams, 1, args.seconds))
            rss_peak_all = server.memory()[1]
        finally:
            server.stop()
        ceiling, ceiling_cpu_ms = engine_ceiling(gallery_dir, workload.probes, tuple(args.batches), args.engine_faces)
    best_batch, best_rate = max(ceiling.items(), key=lambda kv: kv[1])

    def summary(r: StreamRun) -> dict:
        return {
            "streams": r.streams, "faces": r.faces, "seconds": round(r.seconds, 2),
            "faces_per_s": round(r.faces / r.seconds, 1),
            "latency_ms_p50": round(_pct(r.latencies_ms, 50), 1), "latency_ms_p99": round(_pct(r.latencies_ms, 99), 1),
            "health_ms_p50": round(_pct(r.health_ms, 50), 2), "health_ms_p99": round(_pct(r.health_ms, 99), 2),
            "health_checks": len(r.health_ms), "rejected": r.rejected, "stream_errors": r.errors[:5],
            "streams_failed": len(r.errors), "server_rss_peak_mb": round(r.rss_peak / 2**20, 1),
            "vs_engine": round(r.faces / r.seconds / best_rate, 3),
            # Where the CPU went: the server's per face (to compare with the engine's), and the
            # load generator's, which shares this machine's cores with the server.
            "server_cpu_ms_per_face": round(r.server_cpu_s / max(r.faces, 1) * 1000, 2),
            "client_cpu_ms_per_face": round(r.client_cpu_s / max(r.faces, 1) * 1000, 2),
            "cpu_busy_cores": round((r.server_cpu_s + r.client_cpu_s) / r.seconds, 2),
        }

    return {
        "benchmark": "load",
        "command": "facelink bench load -- " + shlex.join(reporting.bench_argv(args.argv)),
        "date": reporting.utc_now(),
        "machine": reporting.machine_info(),
        "setup": {"people_enrolled": len(workload.gallery), "probe_faces": len(workload.probes),
                  "payload_codec": workload.codec_id, "payload_bytes_mean": round(workload.payload_bytes, 1),
                  "worst_case_payload_bytes": len(workload.worst), "window": args.window, "seconds": args.seconds},
        "streams": [summary(r) for r in rows],
        "flood_worst_case": summary(flood) if flood else None,
        "server_rss_peak_mb_whole_run": round(rss_peak_all / 2**20, 1),
        "engine_in_process": {"faces_per_s_by_batch": {str(k): round(v, 1) for k, v in ceiling.items()},
                              "cpu_ms_per_face_by_batch": {str(k): round(v, 2) for k, v in ceiling_cpu_ms.items()},
                              "best_batch": best_batch, "best_faces_per_s": round(best_rate, 1)},
    }


def format_report(payload: dict) -> str:
    header = ["streams", "faces/s", "x engine", "p50 ms", "p99 ms", "health p99 ms", "rejected", "failed",
              "server RSS MB", "server CPU ms/face", "load gen CPU ms/face"]
    rows = [[str(r["streams"]), f"{r['faces_per_s']:.1f}", f"{r['vs_engine']:.2f}", f"{r['latency_ms_p50']:.0f}",
             f"{r['latency_ms_p99']:.0f}", f"{r['health_ms_p99']:.1f}", str(r["rejected"]), str(r["streams_failed"]),
             f"{r['server_rss_peak_mb']:.0f}", f"{r['server_cpu_ms_per_face']:.1f}", f"{r['client_cpu_ms_per_face']:.1f}"]
            for r in payload["streams"]]
    if payload["flood_worst_case"]:
        f = payload["flood_worst_case"]
        rows.append([f"{f['streams']} (worst-case flood)", f"{f['faces_per_s']:.1f}", "-", f"{f['latency_ms_p50']:.0f}",
                     f"{f['latency_ms_p99']:.0f}", f"{f['health_ms_p99']:.1f}", str(f["rejected"]), str(f["streams_failed"]),
                     f"{f['server_rss_peak_mb']:.0f}", f"{f['server_cpu_ms_per_face']:.1f}",
                     f"{f['client_cpu_ms_per_face']:.1f}"])
    engine = payload["engine_in_process"]
    lines = [
        f"command: {payload['command']}",
        reporting.machine_line(payload["machine"]),
        f"date: {payload['date']}",
        f"setup: {payload['setup']['people_enrolled']} people enrolled, {payload['setup']['probe_faces']} probe faces "
        f"({payload['setup']['payload_codec']}, {payload['setup']['payload_bytes_mean']:.0f} B mean), "
        f"{payload['setup']['window']} in flight per stream, {payload['setup']['seconds']:.0f} s per row",
        "",
        *reporting.markdown_table(header, rows),
        "",
        f"in-process engine (no gRPC), best of batch sizes {', '.join(engine['faces_per_s_by_batch'])}: "
        f"{engine['best_faces_per_s']:.1f} faces/s at batch {engine['best_batch']} "
        f"({engine['cpu_ms_per_face_by_batch'][str(engine['best_batch'])]:.1f} CPU ms a face)",
        f"server peak RSS over the whole run: {payload['server_rss_peak_mb_whole_run']:.0f} MB",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facelink bench load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=list(DEFAULT_STREAMS), help="stream counts (default 1 16 64 256)")
    parser.add_argument("--seconds", type=float, default=20.0, help="load per stream count (default 20)")
    parser.add_argument("--window", type=int, default=2, help="faces in flight per stream (default 2)")
    parser.add_argument("--people", type=int, default=200, help="LFW people enrolled; their second pictures are the probes")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16], help="engine batch sizes to try")
    parser.add_argument("--engine-faces", type=int, default=1000, help="faces per engine measurement (default 1000)")
    parser.add_argument("--data", help="LFW folder (default: ../shared)")
    parser.add_argument("--serve-args", default="", help="more options for `facelink cloud serve`, e.g. '--workers 2 --batch 8'")
    parser.add_argument("--json", type=Path, default=reporting.RESULTS_DIR / "load.json", help="where to write the results")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(reporting.bench_argv(argv))
    args.argv = argv
    payload = run(args)
    print(format_report(payload))
    reporting.write_results(args.json, payload)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
