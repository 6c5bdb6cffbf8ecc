"""gRPC servicers (grpc.aio): the only place that speaks facelink.v1 on the server side.

Protos are turned into engine calls here, and engine errors into gRPC statuses. On the stream,
a bad observation becomes a REJECTED result with an `Error` (the stream goes on); on a unary
call it becomes the call's status. Who may call what is decided before any of this runs
(auth.AuthInterceptor); what a caller may see of a result is decided here (`_present`).

Nothing CPU-bound runs on the event loop: payloads are decoded on a bounded pool, faces are
recognised in batches across streams (batching.Batcher), gallery changes run on their own
thread. An idle stream costs a coroutine, not a thread.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np

import facelink
from facelink.runtime.alignment import warp_face
from facelink.runtime.codecs import CodecError, available_codecs, decode_image
from facelink.runtime.embeddings import unpack_embedding
from facelink.v1 import common_pb2, gallery_pb2, gallery_pb2_grpc, recognition_pb2, recognition_pb2_grpc

from facelink.logsafe import printable

from .audit import AuditLog
from .auth import Principal, RateLimiter, UnreadableMessage, current_principal, rate_limited
from .batching import Batcher
from .engine import Decision, EnrollFace, Identification, RecognitionEngine
from .errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
)
from .gallery import GalleryError, UnknownIdentityError, normalize_identity
from .metrics import ServiceMetrics
from .unknowns import CROP_TEMPLATE, KeptCrop, Sighting, UnknownNotFound, UnknownRecord, valid_id

log = logging.getLogger(__name__)

API_VERSION = "facelink.v1"
_DTYPES = {common_pb2.DTYPE_FLOAT32: "float32", common_pb2.DTYPE_FLOAT16: "float16", common_pb2.DTYPE_INT8: "int8"}
_IMAGE_FORMATS = (common_pb2.IMAGE_FORMAT_JPEG, common_pb2.IMAGE_FORMAT_PNG, common_pb2.IMAGE_FORMAT_WEBP)
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_DECISIONS = {Decision.MATCH: recognition_pb2.DECISION_MATCH, Decision.UNKNOWN: recognition_pb2.DECISION_UNKNOWN}
_PAGE_TOKEN = re.compile(r"^[0-9]{1,10}$")
_CAMERA_ID = re.compile(r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$")  # printable ASCII, no edge spaces


def landmarks_from_proto(message: common_pb2.Landmarks, what: str) -> np.ndarray | None:
    if not message.points:
        return None
    if len(message.points) != 5:
        raise InvalidArgument(f"{what}: expected 5 landmarks, got {len(message.points)}")
    return np.array([(p.x, p.y) for p in message.points], dtype=np.float32)


def image_from_proto(image: common_pb2.Image, what: str, max_side: int, max_pixels: int) -> np.ndarray:
    """A picture payload -> RGB array, or INVALID_ARGUMENT naming the picture and the problem.
    Its size is read from the header and refused before anything is decoded."""
    if image.format not in _IMAGE_FORMATS:
        raise InvalidArgument(f"{what}: unsupported image format {image.format}")
    try:
        return decode_image(image.data, what=what, max_side=max_side, max_pixels=max_pixels)
    except CodecError as error:
        raise InvalidArgument(str(error)) from error


def box_to_proto(box: np.ndarray | None) -> common_pb2.Box:
    return common_pb2.Box() if box is None else common_pb2.Box(x=box[0], y=box[1], width=box[2], height=box[3])


def _principal() -> Principal:
    principal = current_principal.get()
    if principal is None:  # only reachable if a servicer is mounted without the interceptor
        raise PermissionDenied("no principal: the server was built without its authorisation interceptor")
    return principal


#: A recognised face: its decision, and the canonical crop kept in case it is UNKNOWN (or None).
Recognized = tuple[Identification, "np.ndarray | None"]


def _answered(result: recognition_pb2.FaceResult) -> asyncio.Future[recognition_pb2.FaceResult]:
    """A result that is already known, in the stream's queue of futures beside those still computed."""
    future: asyncio.Future[recognition_pb2.FaceResult] = asyncio.get_running_loop().create_future()
    future.set_result(result)
    return future


def _internal_face_error(observation: recognition_pb2.FaceObservation) -> ServiceError:
    log.exception("internal error on %s frame %d", printable(observation.camera_id), observation.frame_sequence)
    return ServiceError("internal error while recognising this face; see server log")


class RecognitionService(recognition_pb2_grpc.RecognitionServicer):
    def __init__(self, engine: RecognitionEngine, metrics: ServiceMetrics | None = None) -> None:
        self.engine = engine
        self.config = engine.config
        self.limits = engine.config.limits
        self.metrics = metrics or ServiceMetrics()
        # One decoder per codec id, shared by every stream (decoding keeps no state per call).
        self._codecs = available_codecs()
        self._decoders = {codec_id: info.create(info.default_quality) for codec_id, info in self._codecs.items()}
        self._faces = RateLimiter(self.limits.face_rate, self.limits.face_burst)
        self._batcher: Batcher[tuple[recognition_pb2.FaceObservation, Principal], Recognized] | None = None
        self._pending: asyncio.Semaphore | None = None
        # Unknown people are clustered on a thread of their own: one writer, and a face's
        # answer waits for its unknown id (about a millisecond), not for another stream's decode.
        self._unknowns_pool = ThreadPoolExecutor(1, thread_name_prefix="facelink-unknowns")
        self.open_streams = 0

    async def start(self) -> None:
        """Bind to the running event loop (called once, by the server, before serving)."""
        self._batcher = Batcher(self._recognize_batch, self.config.batching, "recognize")
        self._batcher.start()
        self._pending = asyncio.Semaphore(self.limits.max_pending_faces)

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()
        # Waited for: a sighting half-written when the store is closed would be lost.
        await asyncio.get_running_loop().run_in_executor(None, self._unknowns_pool.shutdown)

    # -- the stream -------------------------------------------------------------------------
    async def Recognize(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        principal = _principal()
        if self.open_streams >= self.limits.max_streams:
            raise ResourceExhausted(f"the server has {self.open_streams} streams open, its limit; retry later",
                                    retry_after_s=5.0)
        self.open_streams += 1
        self.metrics.streams.inc()
        peer = context.peer()
        log.info("stream opened by %s (%s)", printable(str(principal)), printable(peer))
        # Results leave in the order their observations arrived; a bounded queue of futures
        # keeps that order and stops reading when the client stops reading its answers.
        results: asyncio.Queue[asyncio.Future[recognition_pb2.FaceResult] | None] = asyncio.Queue(
            self.limits.max_in_flight_per_stream * 2
        )
        in_flight: set[asyncio.Future[recognition_pb2.FaceResult]] = set()
        writer = asyncio.get_running_loop().create_task(self._write(results, context))
        try:
            await self._read(context, principal, results, in_flight, writer)
            await results.put(None)
            await writer
        finally:
            writer.cancel()
            for future in in_flight:
                future.cancel()
            self.open_streams -= 1
            self.metrics.streams.dec()
            log.info("stream from %s closed", printable(peer))

    async def _read(
        self,
        context: grpc.aio.ServicerContext,
        principal: Principal,
        results: asyncio.Queue,
        in_flight: set[asyncio.Future[recognition_pb2.FaceResult]],
        writer: asyncio.Task[None],
    ) -> None:
        idle = self.limits.stream_idle_timeout_s
        while True:
            read = asyncio.ensure_future(context.read())
            while True:
                done, _ = await asyncio.wait({read, writer}, timeout=idle, return_when=asyncio.FIRST_COMPLETED)
                if read in done:
                    break
                if writer in done:  # the client went away (or a write failed): stop reading
                    read.cancel()
                    writer.result()
                    return
                if not in_flight:
                    read.cancel()
                    raise DeadlineExceeded(f"no observation for {idle:.0f} s; the stream is closed (reconnect when needed)")
            try:
                observation = read.result()
            except UnreadableMessage as error:
                # No request id to echo, but still one answer per message, and the stream goes on.
                empty = recognition_pb2.FaceObservation()
                await results.put(_answered(self._finish(empty, None, error, principal, time.perf_counter())))
                continue
            if observation is grpc.aio.EOF:
                return
            future = self._start(observation, principal, in_flight)
            await results.put(future)

    def _start(
        self, observation: recognition_pb2.FaceObservation, principal: Principal,
        in_flight: set[asyncio.Future[recognition_pb2.FaceResult]],
    ) -> asyncio.Future[recognition_pb2.FaceResult]:
        """The future FaceResult of one observation; refusals that cost nothing are answered at once."""
        started = time.perf_counter()
        refusal: ServiceError | None = None
        if len(in_flight) >= self.limits.max_in_flight_per_stream:
            refusal = ResourceExhausted(
                f"more than {self.limits.max_in_flight_per_stream} faces in flight on this stream; wait for answers"
            )
        elif wait := self._faces.take(str(principal)):
            refusal = rate_limited(wait, "faces")
        if refusal is not None:
            return _answered(self._finish(observation, None, refusal, principal, started))
        future = asyncio.ensure_future(self._answer(observation, principal, started))
        in_flight.add(future)
        future.add_done_callback(in_flight.discard)
        return future

    async def _write(self, results: asyncio.Queue, context: grpc.aio.ServicerContext) -> None:
        while (future := await results.get()) is not None:
            await context.write(await future)

    async def _answer(
        self, observation: recognition_pb2.FaceObservation, principal: Principal, started: float
    ) -> recognition_pb2.FaceResult:
        assert self._pending is not None and self._batcher is not None
        found: Identification | None = None
        error: ServiceError | None = None
        unknown_id = ""
        async with self._pending:
            try:
                found, kept_crop = await self._batcher.submit((observation, principal))
                if found.decision is Decision.UNKNOWN and kept_crop is not None:
                    unknown_id = await self._unknown_id(observation, principal, found, kept_crop)
            except ServiceError as refused:
                error = refused
            except asyncio.CancelledError:
                raise
            except Exception:  # the batch itself failed (the recogniser, the search): this face is one of it
                error = _internal_face_error(observation)
        return self._finish(observation, found, error, principal, started, unknown_id)

    def _recognize_batch(
        self, items: list[tuple[recognition_pb2.FaceObservation, Principal]]
    ) -> list[Recognized | ServiceError]:
        """Worker thread: a batch decoded and aligned face by face, then recognised together.
        Each face's own failure is its outcome; the others go on."""
        outcomes: list[Recognized | ServiceError | None] = [None] * len(items)
        crops, waiting = [], []
        for index, (observation, principal) in enumerate(items):
            try:
                prepared = self._prepare(observation, principal)
            except ServiceError as refused:
                outcomes[index] = refused
                continue
            except BaseException as failure:  # a bug, or a native library's panic (pyo3: a BaseException), costs one face
                if isinstance(failure, (GeneratorExit, KeyboardInterrupt, SystemExit)):
                    raise
                outcomes[index] = _internal_face_error(observation)
                continue
            if isinstance(prepared, Identification):
                outcomes[index] = (prepared, None)
            else:
                crops.append(prepared[0])
                waiting.append((index, prepared[1]))
        if crops:
            for (index, kept), found in zip(waiting, self.engine.identify_aligned(np.stack(crops)), strict=True):
                outcomes[index] = (found, kept)
        return outcomes  # type: ignore[return-value] - every entry is set above

    async def _unknown_id(
        self, observation: recognition_pb2.FaceObservation, principal: Principal, found: Identification,
        crop: np.ndarray,
    ) -> str:
        """The persistent id of an UNKNOWN face (cloud/unknowns.py); "" if it cannot be had.
        The decision stands whatever happens here: a failing unknowns store costs the id only."""
        if found.embedding is None:
            return ""
        track = (str(principal), observation.camera_id, observation.track_id) if observation.track_id else None
        sighting = Sighting(found.embedding, crop, observation.camera_id, track)
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._unknowns_pool, self.engine.unknowns.observe, sighting)
        except Exception:  # noqa: BLE001 - logged; the face is still answered
            log.exception("unknowns: could not record an unknown face from %s", printable(observation.camera_id))
            return ""

    def _prepare(
        self, observation: recognition_pb2.FaceObservation, principal: Principal
    ) -> tuple[np.ndarray, np.ndarray | None] | Identification:
        """Worker thread: checks, decoding, landmarks -> the aligned crop and, when unknown
        people are kept, the canonical crop kept should the face be UNKNOWN (or, for an
        embedding payload, already the decision)."""
        camera = observation.camera_id
        if len(camera) > self.limits.max_camera_id_length or (camera and not _CAMERA_ID.match(camera)):
            raise InvalidArgument(f"camera_id must be 1-{self.limits.max_camera_id_length} printable ASCII characters")
        kind = observation.WhichOneof("payload")
        if kind is None:
            raise InvalidArgument("observation has no payload (set one of face, embedding, image)")
        payload = getattr(observation, kind)
        size = len(payload.data)
        if size > self.config.max_payload_bytes:
            raise ResourceExhausted(f"{kind} payload is {size} bytes, the limit is {self.config.max_payload_bytes}")
        if kind == "embedding":
            return self._identify_embedding(payload, principal)
        if kind == "face":
            image = self._decode_face(payload)
        else:
            image = image_from_proto(payload, "image payload", self.config.max_image_side, self.limits.max_image_pixels)
        landmarks = landmarks_from_proto(observation.payload_landmarks, "payload_landmarks")
        if landmarks is None and kind == "face":
            raise InvalidArgument("a face payload needs payload_landmarks (5 points in the crop's coordinates)")
        landmarks, _ = self.engine.locate_face(image, landmarks, f"{kind} payload")
        # Warped now, while the decoded picture is at hand: holding a whole `image` payload
        # until the decision would cost far more memory than a 128x128 crop.
        kept = warp_face(image, landmarks, CROP_TEMPLATE)[0] if self.config.unknowns.enabled else None
        return self.engine.align(image, landmarks), kept

    def _decode_face(self, face: common_pb2.EncodedFace) -> np.ndarray:
        decoder = self._decoders.get(face.codec_id)
        if decoder is None:
            raise InvalidArgument(
                f"unknown codec '{printable(face.codec_id, 64)}'; this server decodes: {', '.join(sorted(self._decoders))}"
            )
        if face.codec_version not in decoder.versions:
            raise InvalidArgument(
                f"codec '{printable(face.codec_id, 64)}' version {face.codec_version} is not supported; supported: {list(decoder.versions)}"
            )
        try:
            # A streamed face is a crop: its pixel budget is far below a whole picture's, and
            # is enforced from the header before anything is allocated.
            image = decoder.decode(face.data, max_pixels=self.limits.max_face_pixels)
        except CodecError as error:
            raise InvalidArgument(f"undecodable {face.codec_id} payload: {error}") from error
        if max(image.shape[:2]) > self.config.max_image_side:
            raise InvalidArgument(f"{face.codec_id} payload is {image.shape[1]}x{image.shape[0]}, "
                                  f"over {self.config.max_image_side} px")
        return image

    def _identify_embedding(self, embedding: common_pb2.Embedding, principal: Principal) -> Identification:
        model = self.engine.accepted(embedding.model_id) if embedding.model_id in self.engine.models else None
        if model is None:
            raise InvalidArgument(
                f"embeddings of model '{printable(embedding.model_id, 64)}' are not accepted; "
                f"accepted: {', '.join(self.engine.models)}"
            )
        # A gallery model's own space is where stored templates live: open to it, exact scores
        # reconstruct a template. Devices send query-model embeddings.
        if model.role == "recognizer" and not principal.has("embeddings"):
            raise PermissionDenied(
                f"{principal} lacks the scope 'embeddings' needed to send {model.model_id} embeddings; "
                f"send a query model's ({', '.join(self.engine.query_models) or 'none served'}) or a coded face"
            )
        dtype = _DTYPES.get(embedding.dtype)
        if dtype is None:
            raise InvalidArgument(f"embedding dtype {embedding.dtype} is not one of float32, float16, int8")
        try:
            vector = unpack_embedding(embedding.data, dtype, embedding.dim, embedding.scale)
        except ValueError as error:
            raise InvalidArgument(f"embedding: {error}") from error
        return self.engine.identify_embedding(vector, model.model_id)

    def _finish(
        self, observation: recognition_pb2.FaceObservation, found: Identification | None, error: ServiceError | None,
        principal: Principal, started: float, unknown_id: str = "",
    ) -> recognition_pb2.FaceResult:
        result = recognition_pb2.FaceResult(
            camera_id=observation.camera_id[: self.limits.max_camera_id_length],
            frame_sequence=observation.frame_sequence,
            track_id=observation.track_id,
            face_index=observation.face_index,
            request_id=observation.request_id,
        )
        if error is not None:
            result.decision = recognition_pb2.DECISION_REJECTED
            result.error.code = error.code.value[0]
            result.error.message = error.message
        elif found is not None:
            self._present(result, found, principal)
            if found.decision is Decision.UNKNOWN:
                result.unknown_id = unknown_id  # an opaque id says nothing of the gallery: every principal sees it
        elapsed = time.perf_counter() - started
        result.server_latency_us = min(int(elapsed * 1e6), 2**32 - 1)
        self._count(observation, result, elapsed)
        return result

    def _present(self, result: recognition_pb2.FaceResult, found: Identification, principal: Principal) -> None:
        """What the caller may see. A device learns the decision: MATCH with its identity and a
        rounded score, UNKNOWN with neither (the nearest name of a stranger is nobody's business).
        The `scores` scope (evaluation, benchmarks) sees exact scores and the nearest identity."""
        result.decision = _DECISIONS[found.decision]
        result.threshold = found.threshold
        result.model_id = found.model_id
        if principal.has("scores"):
            result.identity, result.score = found.identity, found.score
        elif found.decision is Decision.MATCH:
            step = self.config.security.score_step
            result.identity, result.score = found.identity, round(found.score / step) * step

    def _count(self, observation: recognition_pb2.FaceObservation, result: recognition_pb2.FaceResult, elapsed: float) -> None:
        kind = observation.WhichOneof("payload") or "none"
        decision = recognition_pb2.Decision.Name(result.decision).removeprefix("DECISION_").lower()
        self.metrics.faces.labels(kind, decision).inc()
        self.metrics.latency.labels(kind).observe(elapsed)
        if kind != "none":
            self.metrics.payload_bytes.labels(kind).inc(len(getattr(observation, kind).data))
        if result.HasField("error"):
            self.metrics.errors.labels(_CODE_NAMES.get(result.error.code, str(result.error.code))).inc()

    # -- capabilities -------------------------------------------------------------------------
    async def GetCapabilities(self, request, context) -> recognition_pb2.Capabilities:  # noqa: ANN001
        return recognition_pb2.Capabilities(
            api_version=API_VERSION,
            server_version=facelink.__version__,
            codecs=[
                recognition_pb2.CodecInfo(codec_id=codec_id, versions=list(info.versions), description=info.description)
                for codec_id, info in sorted(self._codecs.items())
            ],
            # Every gallery model ("recognizer", the primary first) and every accepted query model.
            models=[
                recognition_pb2.ModelInfo(
                    model_id=model.model_id, role=model.role, embedding_dim=model.dim, input=model.input, sha256=model.sha256
                )
                for model in self.engine.models.values()
            ],
            limits=recognition_pb2.Limits(
                max_message_bytes=self.config.max_message_bytes,
                max_payload_bytes=self.config.max_payload_bytes,
                max_images_per_enroll=self.config.max_images_per_enroll,
                max_image_side=self.config.max_image_side,
            ),
            match_threshold=self.engine.threshold,
            image_formats=list(_IMAGE_FORMATS),
        )


class GalleryService(gallery_pb2_grpc.GalleryServicer):
    """Gallery changes, each recorded in the audit log with who asked, from where, and how it went."""

    def __init__(self, engine: RecognitionEngine, audit: AuditLog) -> None:
        self.engine = engine
        self.audit = audit
        # One writer thread: SQLite serialises writes anyway, and the loop must stay free.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="facelink-gallery")
        # Unknown people's retention lives here, beside the audit log that records its erasures.
        self.unknowns = engine.unknowns
        self.unknowns.on_erased = self._record_expiry
        self._expiry: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind to the running event loop (called once, by the server): retention now and on a timer."""
        self._expiry = asyncio.get_running_loop().create_task(self._expire_unknowns(), name="facelink-unknowns-expiry")

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            await asyncio.gather(self._expiry, return_exceptions=True)
        self._pool.shutdown(wait=True)
        self.unknowns.close()

    async def _expire_unknowns(self) -> None:
        """Erase unknown people past their retention, at start and every purge_interval_s."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(self._pool, self.unknowns.expire)
            except Exception:  # noqa: BLE001 - retried at the next tick; the log says why
                log.exception("unknowns: the retention period could not be enforced")
            await asyncio.sleep(self.engine.config.unknowns.purge_interval_s)

    def _record_expiry(self, why: str, unknown_ids: list[str], crops: int) -> None:
        """The audit record of unknown people erased by the server itself (retention, capacity)."""
        shown = ", ".join(unknown_ids[:16]) + (f" and {len(unknown_ids) - 16} more" if len(unknown_ids) > 16 else "")
        self.audit.record(principal="system:unknowns", peer="-", call="UnknownsRetention", identity=None, outcome="ok",
                          counts={"unknowns": len(unknown_ids), "crops": crops}, detail=f"{why}: {shown}")

    async def _run(self, context: grpc.aio.ServicerContext, call: str, identity: str | None,
                   work: Callable[[], Any], counts: Callable[[Any], dict[str, int]] | None = None,
                   detail: str | None = None) -> Any:
        """`work` on the gallery thread, recorded in the audit log whatever its outcome
        (`detail` goes with the intent and the success).

        The intent is recorded first: the gallery commits before the outcome is written, and a
        crash between the two must not leave a change that no record mentions (SIGKILL rounds,
        `facelink bench crash-durability`)."""
        principal = _principal()
        await self._record(principal, context, call, identity, "started", None, detail)
        try:
            value = await asyncio.get_running_loop().run_in_executor(self._pool, work)
        except ServiceError as error:
            await self._record(principal, context, call, identity, f"refused {error.code.name}", None, error.message)
            raise
        except GalleryError as error:  # bounds, names and quotas the gallery itself enforces
            refused = _gallery_error(error)
            await self._record(principal, context, call, identity, f"refused {refused.code.name}", None, refused.message)
            raise refused from error
        except Exception:
            await self._record(principal, context, call, identity, "failed INTERNAL", None, None)
            raise
        await self._record(principal, context, call, identity, "ok", counts(value) if counts else None, detail)
        return value

    async def _record(self, principal: Principal, context: grpc.aio.ServicerContext, call: str, identity: str | None,
                      outcome: str, counts: dict[str, int] | None, detail: str | None) -> None:
        await asyncio.get_running_loop().run_in_executor(
            None,
            lambda: self.audit.record(principal=str(principal), peer=context.peer(), call=call, identity=identity,
                                      outcome=outcome, counts=counts, detail=detail),
        )

    async def Enroll(self, request: gallery_pb2.EnrollRequest, context: grpc.aio.ServicerContext) -> gallery_pb2.EnrollResponse:
        limits = self.engine.config
        if not request.images:
            raise InvalidArgument("enroll needs at least one image")
        if len(request.images) > limits.max_images_per_enroll:
            raise ResourceExhausted(f"{len(request.images)} images in one call, the limit is {limits.max_images_per_enroll}")

        def enroll() -> tuple[int, int, list[np.ndarray | None]]:
            faces = [
                EnrollFace(
                    image_from_proto(item.image, f"image {i}", limits.max_image_side, limits.limits.max_image_pixels),
                    landmarks_from_proto(item.landmarks, f"image {i}"),
                )
                for i, item in enumerate(request.images)
            ]
            return self.engine.enroll(request.identity, faces, replace=request.replace, metadata=dict(request.metadata))

        call = "Enroll(replace)" if request.replace else "Enroll"
        added, total, boxes = await self._run(
            context, call, request.identity, enroll, lambda v: {"pictures": len(request.images), "added": v[0], "total": v[1]}
        )
        return gallery_pb2.EnrollResponse(
            identity=normalize_identity(request.identity), templates_added=added,
            templates_total=total, faces=[box_to_proto(b) for b in boxes],
        )

    async def RemoveIdentity(self, request, context) -> gallery_pb2.RemoveIdentityResponse:  # noqa: ANN001
        def remove() -> int:
            try:
                return self.engine.gallery.remove(request.identity)
            except UnknownIdentityError:
                raise NotFound(f"unknown identity '{printable(request.identity, 64)}'") from None

        removed = await self._run(context, "RemoveIdentity", request.identity, remove, lambda n: {"templates": n})
        return gallery_pb2.RemoveIdentityResponse(identity=request.identity, templates_removed=removed)

    async def ListIdentities(self, request, context) -> gallery_pb2.ListIdentitiesResponse:  # noqa: ANN001
        page_size = request.page_size or 100
        if page_size > 1000:
            raise InvalidArgument(f"page_size {page_size} is over 1000")
        if request.page_token and not _PAGE_TOKEN.match(request.page_token):
            raise InvalidArgument("page_token was not issued by this server")
        offset = int(request.page_token or 0)
        # Not on the writer thread: a listing must not wait behind an enrollment's detection.
        records, total = await asyncio.get_running_loop().run_in_executor(None, self.engine.gallery.list, offset, page_size)
        next_offset = offset + len(records)
        return gallery_pb2.ListIdentitiesResponse(
            identities=[
                gallery_pb2.IdentityInfo(
                    identity=r.identity, templates=r.templates, created_time_us=r.created_time_us, metadata=r.metadata
                )
                for r in records
            ],
            next_page_token=str(next_offset) if next_offset < total else "",
            total=total,
        )

    # -- unknown people (cloud/unknowns.py) ------------------------------------------------------
    async def ListUnknowns(self, request, context) -> gallery_pb2.ListUnknownsResponse:  # noqa: ANN001
        page_size = request.page_size or 20
        if page_size > 100:
            raise InvalidArgument(f"page_size {page_size} is over 100")
        if request.page_token and not _PAGE_TOKEN.match(request.page_token):
            raise InvalidArgument("page_token was not issued by this server")
        before = int(request.page_token) if request.page_token else None
        max_crops = min(request.max_crops, self.engine.config.unknowns.crops_per_unknown)
        budget = self.engine.config.max_message_bytes // 2  # room for the fields around the pictures
        records, next_row, total = await asyncio.get_running_loop().run_in_executor(
            None, self.unknowns.list, before, page_size, max_crops, budget
        )
        # Looking at pictures of people who never enrolled is itself recorded.
        shown = sum(len(r.crops) for r in records)
        counts = {"unknowns": len(records), "crops": shown}
        await self._record(_principal(), context, "ListUnknowns", None, "ok", counts, None)
        return gallery_pb2.ListUnknownsResponse(
            unknowns=[_unknown_to_proto(r) for r in records],
            next_page_token="" if next_row is None else str(next_row),
            total=total,
        )

    async def EnrollUnknown(self, request, context) -> gallery_pb2.EnrollUnknownResponse:  # noqa: ANN001
        # The interceptor checked `unknowns` (METHOD_SCOPES); naming someone also enrolls.
        principal = _principal()
        if not principal.has("enroll"):
            method = "/facelink.v1.Gallery/EnrollUnknown"
            refused = PermissionDenied(f"{principal} lacks the scope 'enroll' that {method} needs")
            await self._record(principal, context, method, None, "denied", None, refused.message)
            raise refused
        most = self.engine.config.max_images_per_enroll
        limit = min(request.max_crops or most, most)

        def enroll() -> tuple[int, int, int]:
            crops = self._kept_crops(request.unknown_id, limit)
            # The server's own crops (128x128 JPEG), decoded as any picture is.
            faces = [EnrollFace(decode_image(c.jpeg, what=f"crop {i}"), CROP_TEMPLATE.points.copy())
                     for i, c in enumerate(crops)]
            added, total, _ = self.engine.enroll(request.identity, faces, replace=request.replace,
                                                 metadata=dict(request.metadata))
            try:
                self.unknowns.forget(request.unknown_id)  # recorded by this call's audit record
            except UnknownNotFound:  # expired meanwhile: erased all the same
                pass
            return added, total, len(faces)

        call = "EnrollUnknown(replace)" if request.replace else "EnrollUnknown"
        added, total, _ = await self._run(
            context, call, request.identity, enroll, lambda v: {"pictures": v[2], "added": v[0], "total": v[1]},
            detail=f"from {printable(request.unknown_id, 32)}",
        )
        return gallery_pb2.EnrollUnknownResponse(
            identity=normalize_identity(request.identity), templates_added=added, templates_total=total,
            unknown_id=request.unknown_id,
        )

    async def ForgetUnknown(self, request, context) -> gallery_pb2.ForgetUnknownResponse:  # noqa: ANN001
        def forget() -> int:
            self._check_unknown_id(request.unknown_id)
            try:
                return self.unknowns.forget(request.unknown_id)
            except UnknownNotFound:
                raise NotFound(f"no unknown person '{printable(request.unknown_id, 32)}' is kept") from None

        erased = await self._run(context, "ForgetUnknown", request.unknown_id, forget, lambda n: {"crops": n})
        return gallery_pb2.ForgetUnknownResponse(unknown_id=request.unknown_id, crops_erased=erased)

    def _kept_crops(self, unknown_id: str, limit: int) -> list[KeptCrop]:
        self._check_unknown_id(unknown_id)
        try:
            crops = self.unknowns.crops(unknown_id, limit)
        except UnknownNotFound:
            raise NotFound(f"no unknown person '{printable(unknown_id, 32)}' is kept") from None
        if not crops:
            raise FailedPrecondition(f"unknown person {unknown_id} has no crop to enroll")
        return crops

    @staticmethod
    def _check_unknown_id(unknown_id: str) -> None:
        if not valid_id(unknown_id):
            raise InvalidArgument("unknown_id must be 'u-' and 12 hex digits, as FaceResult.unknown_id")


def _jpeg(crop: KeptCrop) -> common_pb2.Image:
    return common_pb2.Image(format=common_pb2.IMAGE_FORMAT_JPEG, data=crop.jpeg)


def _unknown_to_proto(record: UnknownRecord) -> gallery_pb2.UnknownInfo:
    points = [common_pb2.Point(x=float(x), y=float(y)) for x, y in CROP_TEMPLATE.points]
    return gallery_pb2.UnknownInfo(
        unknown_id=record.unknown_id,
        first_seen_time_us=record.first_seen_us,
        last_seen_time_us=record.last_seen_us,
        cameras=record.cameras,
        sightings=record.sightings,
        crops=[
            gallery_pb2.UnknownCrop(image=_jpeg(c), landmarks=common_pb2.Landmarks(points=points), quality=c.quality,
                                    camera_id=c.camera_id, seen_time_us=c.seen_us)
            for c in record.crops
        ],
        crops_kept=record.crops_kept,
    )


def _gallery_error(error: GalleryError) -> ServiceError:
    from .gallery import GalleryQuotaError, InvalidIdentityError

    if isinstance(error, GalleryQuotaError):
        return ResourceExhausted(str(error))
    if isinstance(error, (InvalidIdentityError, ValueError)):
        return InvalidArgument(str(error))
    return InvalidArgument(str(error))
