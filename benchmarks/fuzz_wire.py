"""Wire fuzzing: the gRPC service fed mutated FaceObservations and unary requests must answer each
with a result or a typed refusal, never with a bug, and stay up.

The contract checked on every request:

* the Recognize stream answers exactly one FaceResult per FaceObservation, in order (each result
  echoes its observation's camera_id, frame_sequence, track_id, face_index and request_id);
* a bad observation is answered DECISION_REJECTED with an `error` whose code is a typed gRPC code
  and whose message is not empty and shows no Python exception text; the stream goes on;
* INTERNAL (the service's "internal error (incident ...)") and UNKNOWN only come from real bugs:
  both are counted, the target is 0;
* no observation waits longer than --hang-seconds for its answer, and a stream that is closed by
  the client ends with OK;
* the unary calls (Gallery.Enroll / RemoveIdentity / ListIdentities, Recognition.GetCapabilities)
  answer OK or a typed code with a message, never UNKNOWN, INTERNAL or exception text;
* a valid observation sent between the mutated ones (a "control") gets the same decision and
  identity as before the run: nothing the fuzzer sent damaged the server's state;
* a device (a token without the `scores` scope) sees a MATCH's identity and rounded score, and of
  an UNKNOWN neither;
* the health service answers a Check within 5 s, every second, throughout.

Inputs start from real edge observations: `EdgePipeline(EdgeConfig(faces="central"))` on LFW
pictures with the learned codec (bitstream v2 with its border ring, v1, the "wide" bundle), JPEG,
WebP and PNG crops; embedding payloads (the bundled query model's, and MobileFaceNet's own in
int8, float16 and float32); and image payloads (the LFW JPEG itself, re-encoded PNG / WebP, with
and without landmarks). They are mutated at the protobuf-field level (codec ids and versions;
payload bytes flipped, truncated, spliced, their header fields rewritten, with the learned codec's
CRC-32 and PNG's chunk CRCs recomputed so the mutation reaches the parser behind them; landmarks
NaN, infinite, huge, off the picture, degenerate, too many or too few; embeddings of the wrong
dimension, dtype or scale, NaN or all zeros; odd ids, control characters and bidi overrides in
strings; every member of the payload oneof, none, or an empty one; empty observations) and at the
byte level (the serialised observation mutated, concatenated with another - protobuf merges them -,
given unknown fields, or random bytes; whatever parses as a FaceObservation is sent as is). A few
"probes" go on a stream of their own: bytes that do not parse as a FaceObservation, and a message
over the server's max_message_bytes; either gets a REJECTED result or ends its stream with a typed
status, never INTERNAL or UNKNOWN.

Unary requests: Enroll with odd names (invisible characters, bidi overrides, 10k characters,
NFKC bombs), many or odd metadata keys and values, corrupt or odd images (wrong format, no face,
1x1, grey, RGBA, 16-bit, a header that lies about its size), odd landmarks, too many images;
ListIdentities with odd page tokens and sizes; RemoveIdentity with odd names; GetCapabilities with
unknown fields. A device token (scope `recognize` only) makes some of the calls, so refusals by
scope are exercised too.

Streams are of every length (from none to a thousand observations, up to --window in flight),
half of them a device's; a few are cancelled by their client halfway with answers in flight. The
server's log is scanned for tracebacks at the end.

The server runs in a subprocess (`facelink.cloud.server.serve` with a CloudConfig on port 0 and
a fresh gallery in a temporary folder; the per-principal face and call rate limits are off, or
nearly every input would be answered RESOURCE_EXHAUSTED), its log kept under --save-dir. Input i
is a function of (--seed, i) and the seeds only. Any input that breaks the contract is saved there
as the bytes that went on the wire (`stream-<problem>-seed<S>-<index>.binpb`, or for a unary call
`unary-<Method>-<problem>-...`), and --replay FILE sends it again to a fresh server.

    python -m facelink.benchmarks.fuzz_wire --requests 100000             # the long run
    python -m facelink.benchmarks.fuzz_wire --requests 500 --json /tmp/w.json   # a smoke test
    python -m facelink.benchmarks.fuzz_wire --replay ~/.cache/facelink/fuzz-wire/stream-*-seed0-1014.binpb
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import math
import os
import random
import re
import shlex
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from facelink.config import CloudConfig, ServiceLimits, cache_dir, shared_dir
from facelink.runtime.codecs.bitstream import varint
from facelink.v1 import common_pb2, gallery_pb2, recognition_pb2

from . import reporting
from .fuzz_codecs import fix_learned_checksum, fix_png_crcs, mutate_bytes, mutate_dimensions, mutate_header

DEFAULT_JSON = Path("benchmarks/results/fuzz_wire.json")
DEFAULT_SAVE_DIR = cache_dir() / "fuzz-wire"
#: Enrolled before the run (picture 1); their pictures 2.. are the seed observations, so a control
#: observation is a MATCH. The unary fuzzer never names them: it enrolls other people as "fz-*".
SEED_PEOPLE = ("Colin_Powell", "Tony_Blair", "Serena_Williams", "George_W_Bush", "Gerhard_Schroeder")
ENROLL_PEOPLE = ("Ariel_Sharon", "Hugo_Chavez", "Jean_Chretien", "Junichiro_Koizumi")
FaceObservation = recognition_pb2.FaceObservation
FaceResult = recognition_pb2.FaceResult
OK_CODE = grpc.StatusCode.OK
#: Codes a refusal may carry: each says what the client did wrong and whether to retry.
TYPED_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAUTHENTICATED,
})
_CODES = {code.value[0]: code for code in grpc.StatusCode}
#: What Python exception text looks like; none of it may reach a client.
_LEAK_MARKERS = (
    "Traceback (most recent call last)", 'File "', "<class '", "object has no attribute", "NoneType",
    "unsupported operand", "index out of range", "invalid literal for", "is not subscriptable",
    "unhashable type", "cv2.error", "onnxruntime", "sqlite3", "google.protobuf", "Unexpected <", "KeyError",
    "TypeError", "AttributeError", "IndexError", "ValueError", "ZeroDivisionError", "OverflowError",
    "RuntimeError", "AssertionError", "UnicodeDecodeError", "UnicodeEncodeError", "MemoryError",
    "RecursionError", "DecodeError",
)
EXAMPLES_PER_KIND = 5
SAVED_PER_KIND = 50
HEALTH_TIMEOUT_S = 5.0


# -- seeds: real observations and pictures ---------------------------------------------------
@dataclass(frozen=True)
class SeedObservation:
    kind: str      # e.g. "face flc-default v2", "embedding mobilefacenet int8", "image jpeg+landmarks"
    person: str    # the LFW person in it
    data: bytes    # the serialised FaceObservation, as the edge sent it


@dataclass(frozen=True)
class Picture:
    """A picture for Enroll: a real face (with the detector's landmarks) or an odd file."""

    kind: str
    format: int  # common_pb2.ImageFormat
    data: bytes
    landmarks: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class Seeds:
    observations: tuple[SeedObservation, ...]
    enroll: tuple[tuple[str, bytes], ...]  # (SEED_PEOPLE name, JPEG of picture 1): the gallery before the run
    pictures: tuple[Picture, ...]          # for the unary fuzzer and the image payload mutations

    def of_payload(self, kind: str) -> list[SeedObservation]:
        return [s for s in self.observations if s.kind.split()[0] == kind]


def _lfw(name: str, index: int) -> Path:
    return shared_dir() / "data" / "lfw" / "lfw-deepfunneled" / name / f"{name}_{index:04d}.jpg"


def _read_rgb(path: Path) -> np.ndarray:
    import cv2

    bgr = cv2.imread(str(path))
    if bgr is None:
        raise FileNotFoundError(f"cannot read {path} (is ../shared laid out? set FACELINK_SHARED)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _encode(image: np.ndarray, ext: str) -> bytes:
    import cv2

    converted = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 and image.shape[2] == 3 else image
    ok, buffer = cv2.imencode(ext, converted)
    assert ok, ext
    return buffer.tobytes()


def _edge_configs() -> dict[str, Any]:
    """Every payload the edge can send: each codec, the learned codec's bitstream versions and
    bundles, and embeddings of the bundled query model and of the recogniser itself."""
    from facelink.config import EdgeConfig

    central = {"faces": "central"}
    mobilefacenet = {**central, "payload": "embedding", "query_model": "mobilefacenet"}
    return {
        "face learned v2 ring": EdgeConfig(**central),
        "face learned v1": EdgeConfig(**central, crop_border=None),
        "face learned-wide v2 ring": EdgeConfig(**central, codec="learned:wide"),
        "face jpeg": EdgeConfig(**central, codec="jpeg"),
        "face webp": EdgeConfig(**central, codec="webp"),
        "face png": EdgeConfig(**central, codec="png"),
        "embedding query int8": EdgeConfig(**central, payload="embedding"),
        "embedding mobilefacenet int8": EdgeConfig(**mobilefacenet),
        "embedding mobilefacenet float16": EdgeConfig(**mobilefacenet, embedding_dtype="float16"),
        "embedding mobilefacenet float32": EdgeConfig(**mobilefacenet, embedding_dtype="float32"),
    }


def _image_observations(
    person: str, path: Path, image: np.ndarray, landmarks: np.ndarray, index: int
) -> list[SeedObservation]:
    """A whole picture as the payload: the file itself, re-encoded, with and without landmarks."""
    formats = common_pb2
    pictures = {
        "image jpeg": (formats.IMAGE_FORMAT_JPEG, path.read_bytes(), False),
        "image jpeg+landmarks": (formats.IMAGE_FORMAT_JPEG, path.read_bytes(), True),
        "image png": (formats.IMAGE_FORMAT_PNG, _encode(image, ".png"), False),
        "image webp+landmarks": (formats.IMAGE_FORMAT_WEBP, _encode(image, ".webp"), True),
    }
    seeds = []
    for kind, (fmt, data, with_landmarks) in pictures.items():
        observation = FaceObservation(camera_id="seed-image", frame_sequence=index, request_id=index)
        observation.image.CopyFrom(common_pb2.Image(format=fmt, data=data))
        if with_landmarks:
            _set_points(observation.payload_landmarks, landmarks)
        seeds.append(SeedObservation(kind, person, observation.SerializeToString()))
    return seeds


def _odd_pictures(rng: np.random.Generator) -> list[Picture]:
    """Valid files that are odd pictures: no face, tiny, grey, with alpha, 16 bits, too wide."""
    from .fuzz_codecs import synthetic_pictures

    noface = synthetic_pictures(rng, [(96, 96)])[0]
    jpeg, png, webp = common_pb2.IMAGE_FORMAT_JPEG, common_pb2.IMAGE_FORMAT_PNG, common_pb2.IMAGE_FORMAT_WEBP
    return [
        Picture("no face jpeg", jpeg, _encode(noface, ".jpg")),
        Picture("no face webp", webp, _encode(noface, ".webp")),
        Picture("1x1 png", png, _encode(np.zeros((1, 1, 3), np.uint8), ".png")),
        Picture("grey png", png, _encode(noface[..., 0], ".png")),
        Picture("rgba png", png, _encode(np.dstack([noface, noface[..., :1]]), ".png")),
        Picture("16-bit png", png, _encode(noface.astype(np.uint16) * 257, ".png")),
        Picture("4100x2 png", png, _encode(np.zeros((2, 4100, 3), np.uint8), ".png")),
    ]


def build_seeds(
    people: Sequence[str] = SEED_PEOPLE, probes: int = 2, enroll_people: Sequence[str] = ENROLL_PEOPLE,
    detector: Any = None, recognizer: Any = None,
) -> Seeds:
    """Seed observations of `people` (pictures 2..probes+1) from every edge configuration, the
    pictures that enroll them (picture 1), and pictures for the unary fuzzer."""
    from facelink.edge.pipeline import EdgePipeline
    from facelink.edge.sources import Frame
    from facelink.runtime.detection import create_detector, largest

    detector = detector or create_detector()
    pipelines = {}
    for kind, config in _edge_configs().items():
        # MobileFaceNet's own embeddings: the server's recogniser, reused rather than loaded again
        own = config.payload == "embedding" and config.query_model == "mobilefacenet"
        pipelines[kind] = EdgePipeline(config, detector=detector, query=recognizer if own else None)
    observations: list[SeedObservation] = []
    for person in people:
        for index in range(2, probes + 2):
            path = _lfw(person, index)
            image = _read_rgb(path)
            for kind, pipeline in pipelines.items():
                frame = Frame(image, index, 0, path.name)
                faces = pipeline.process(frame, camera_id=f"seed-{kind.split()[0]}")
                if faces:
                    data = faces[0].observation.SerializeToString()
                    observations.append(SeedObservation(kind, person, data))
            face = largest(detector.detect(image))
            if face is not None:
                observations += _image_observations(person, path, image, face.landmarks, index)
    pictures = []
    for person in enroll_people:
        path = _lfw(person, 1)
        face = largest(detector.detect(_read_rgb(path)))
        landmarks = tuple((float(x), float(y)) for x, y in face.landmarks) if face is not None else ()
        pictures.append(Picture(f"face {person}", common_pb2.IMAGE_FORMAT_JPEG, path.read_bytes(), landmarks))
    pictures += _odd_pictures(np.random.default_rng(0))
    enroll = tuple((person, _lfw(person, 1).read_bytes()) for person in people)
    return Seeds(tuple(observations), enroll, tuple(pictures))


# -- odd values ----------------------------------------------------------------------------
ODD_TEXT = (
    "", " ", "  x  ", "\x00", "a\x00b", "\n", "forged\nINFO line", "\r\n", "\t", "\x1b[31mred\x1b[0m", "\x7f",
    "\u200b", "x\u200by", "\u200d", "\ufeff", "\u202egpj.exe", "\u2066x\u2069", "\u00a0", "\u3000", "\u2028",
    "\ufe0f", "\u3164", "\ue000", "\U000e0001", "\U0010fffd", "\ufffe", "\ufdfa" * 60, "\ufb01",
    "\uff26\uff55\uff4c\uff4c",
    "e\u0301", "\u0301", "\U0001f600", "\U0001f469\u200d\U0001f469\u200d\U0001f467", "../../etc/passwd",
    "'; DROP TABLE identities;--", "%s%n%x", "{0}{1}", "${jndi:ldap://x}", "<script>", "None", "\\", '"',
)
ODD_FLOATS = (
    math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, 1e-10, 65504.0, 1e6, -1e6, 1e38, -1e38, 3.4028235e38,
)
ODD_UINT32 = (0, 1, 2, 5, 127, 128, 255, 65535, 2**31 - 1, 2**31, 2**32 - 1)
ODD_UINT64 = (0, 1, 2**32, 2**53 + 1, 2**63, 2**64 - 1)


def odd_text(rng: random.Random, base: str = "fz") -> str:
    """A string a client should not send, often around `base`: invisible, reversed, long, bombs."""
    choice = rng.random()
    if choice < 0.45:
        return rng.choice(ODD_TEXT)
    if choice < 0.75:
        odd = rng.choice(ODD_TEXT)
        return rng.choice((base + odd, odd + base, base + odd + base))
    if choice < 0.9:
        length = rng.choice((128, 129, 256, 257, 1024, 1025, 10_000))
        return (base + rng.choice("xyz")) * (length // (len(base) + 1) + 1)
    return rng.choice(ODD_TEXT[1:]) * rng.choice((2, 64, 300, 5000))


def odd_float(rng: random.Random, current: float) -> float:
    return rng.choice(ODD_FLOATS) if rng.random() < 0.8 else current * rng.choice((-1.0, 1e-3, 1e3, 1e30))


# -- inputs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Echo:
    """What a FaceResult must echo of its observation."""

    camera_id: str
    frame_sequence: int
    track_id: int
    face_index: int
    request_id: int

    @classmethod
    def of(cls, observation: FaceObservation, max_camera_id: int) -> Echo:
        return cls(observation.camera_id[:max_camera_id], observation.frame_sequence, observation.track_id,
                   observation.face_index, observation.request_id)

    @classmethod
    def of_result(cls, result: FaceResult) -> Echo:
        r = result
        return cls(r.camera_id, r.frame_sequence, r.track_id, r.face_index, r.request_id)


@dataclass(frozen=True)
class WireInput:
    index: int
    mutation: str       # the class of mutation, e.g. "face.data", "landmarks", "wire"; "control": none
    seed: int           # index of the seed observation
    data: bytes         # what goes on the wire
    probe: str | None = None  # "unparseable" / "oversized": not a FaceObservation the server can read

    @property
    def what(self) -> str:
        return self.probe or self.mutation


MutateObservation = Callable[[FaceObservation, random.Random, "Context"], None]


@dataclass(frozen=True)
class Context:
    """What a mutation may draw on besides its own seed."""

    seeds: Seeds
    codec_ids: tuple[str, ...]
    model_ids: tuple[str, ...]
    max_payload_bytes: int
    max_message_bytes: int


def make_context(seeds: Seeds, config: CloudConfig) -> Context:
    faces = [FaceObservation.FromString(s.data) for s in seeds.of_payload("face")]
    embeddings = [FaceObservation.FromString(s.data) for s in seeds.of_payload("embedding")]
    return Context(seeds, tuple(sorted({o.face.codec_id for o in faces})),
                   tuple(sorted({o.embedding.model_id for o in embeddings})),
                   config.max_payload_bytes, config.max_message_bytes)


def _points(message: common_pb2.Landmarks) -> list[list[float]]:
    return [[p.x, p.y] for p in message.points]


def _set_points(message: common_pb2.Landmarks, points: Sequence[Sequence[float]]) -> None:
    del message.points[:]
    message.points.extend(common_pb2.Point(x=float(x), y=float(y)) for x, y in points)


def mutate_landmarks(points: list[list[float]], rng: random.Random) -> list[list[float]]:
    """Five landmarks made odd: non-finite, huge, off the picture, degenerate, too many or too few."""
    if not points:
        points = [[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]]  # ArcFace's template
    points = [list(p) for p in points]
    what = rng.randrange(11)
    if what == 0:  # too few or too many
        count = rng.choice((0, 1, 2, 3, 4, 6, 7, 10, 68, 1000))
        return [list(points[i % len(points)]) for i in range(count)]
    if what == 1:
        for _ in range(rng.randint(1, 4)):
            rng.choice(points)[rng.randrange(2)] = rng.choice((math.nan, math.inf, -math.inf))
    elif what == 2:
        rng.choice(points)[rng.randrange(2)] = rng.choice(ODD_FLOATS)
    elif what == 3:  # off the picture
        dx, dy = (rng.choice((-1, 1)) * rng.choice((200.0, 1e4, 1e9)) for _ in range(2))
        points = [[x + dx, y + dy] for x, y in points]
    elif what == 4:  # all one point
        x, y = rng.choice(points)
        points = [[x, y] for _ in points]
    elif what == 5:  # on a line
        y = points[0][1]
        points = [[x, y] for x, _ in points]
    elif what == 6:  # scrambled or mirrored
        if rng.random() < 0.5:
            rng.shuffle(points)
        else:
            points = [[-x, y] for x, y in points]
    elif what == 7:  # scaled about the origin
        factor = rng.choice((1e-6, 0.01, 0.1, 3.0, 100.0))
        points = [[x * factor, y * factor] for x, y in points]
    elif what == 8:  # subnormal or zero
        points = [[rng.choice((0.0, 1e-45)), rng.choice((0.0, 1e-45))] for _ in points]
    else:  # a little jitter: mostly still a face
        points = [[x + rng.uniform(-3, 3), y + rng.uniform(-3, 3)] for x, y in points]
    return points


def _mutate_landmarks(o: FaceObservation, rng: random.Random, ctx: Context) -> None:
    if rng.random() < 0.1:
        o.ClearField("payload_landmarks")
    else:
        _set_points(o.payload_landmarks, mutate_landmarks(_points(o.payload_landmarks), rng))


def _mutate_payload_bytes(data: bytes, rng: random.Random) -> bytes:
    """Mutated payload bytes, with the learned codec's CRC or PNG's chunk CRCs fixed afterwards."""
    from facelink.runtime.codecs.bitstream import MAGIC

    learned = data[: len(MAGIC)] == MAGIC
    choice = rng.random()
    if learned and choice < 0.35:
        with suppress(Exception):  # a stream that no longer unpacks gets its bytes mutated instead
            return mutate_header(data, rng, ())
    if not learned and choice < 0.15:
        return mutate_dimensions(data, rng)
    mutated = mutate_bytes(data, rng, ())
    if learned and rng.random() < 0.95:
        return fix_learned_checksum(mutated)
    return fix_png_crcs(mutated) if rng.random() < 0.7 else mutated


def _mutate_face_data(o: FaceObservation, rng: random.Random, ctx: Context) -> None:
    face, choice = o.face, rng.random()
    if choice < 0.88:
        face.data = _mutate_payload_bytes(face.data, rng)
    elif choice < 0.93:
        face.data = face.data[: rng.randrange(len(face.data) + 1)]  # truncated, checksum left wrong
    elif choice < 0.95:
        face.data = b""
    elif choice < 0.99:  # another codec's bytes under this codec id
        other = FaceObservation.FromString(rng.choice(ctx.seeds.of_payload("face")).data)
        face.data = other.face.data
    else:
        face.data = bytes(ctx.max_payload_bytes + rng.choice((1, 1000)))


def _mutate_face_codec(o: FaceObservation, rng: random.Random, ctx: Context) -> None:
    face = o.face
    if rng.random() < 0.7:
        odd = ("learned", "flc-default-00000000", "JPEG", "h266", "", face.codec_id + "\x00",
               face.codec_id.upper())
        face.codec_id = rng.choice((*ctx.codec_ids, *odd, odd_text(rng, face.codec_id)))
    if rng.random() < 0.6:
        face.codec_version = rng.choice(ODD_UINT32)


_NAN_BYTES = {common_pb2.DTYPE_FLOAT32: (b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff"),
              common_pb2.DTYPE_FLOAT16: (b"\x00\x7e", b"\x00\x7c", b"\x00\xfc")}
_HUGE_BYTES = {common_pb2.DTYPE_FLOAT32: struct.pack("<f", 3.4e38),
               common_pb2.DTYPE_FLOAT16: struct.pack("<e", 65504.0), common_pb2.DTYPE_INT8: b"\x7f"}


def _mutate_embedding_data(e: common_pb2.Embedding, rng: random.Random) -> None:
    width = {common_pb2.DTYPE_FLOAT32: 4, common_pb2.DTYPE_FLOAT16: 2}.get(e.dtype, 1)
    data, what = bytearray(e.data), rng.randrange(6)
    if what == 0 and e.dtype in _NAN_BYTES and len(data) >= width:  # a NaN or an infinity among the values
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(data) // width) * width
            data[i : i + width] = rng.choice(_NAN_BYTES[e.dtype])
    elif what == 1:
        data = bytearray(len(data))  # all zeros
    elif what == 2:  # every value at the dtype's largest: the norm overflows float32
        data = bytearray(_HUGE_BYTES.get(e.dtype, b"\x7f") * max(1, len(data) // width))
    elif what == 3:
        if rng.random() < 0.5:
            data = data[: rng.randrange(len(data) + 1)]
        else:
            data += bytes(rng.choice((1, 2, 4, 128)))
    else:
        data = bytearray(mutate_bytes(bytes(data) or b"\0", rng, ()))
    e.data = bytes(data)


def _mutate_embedding(o: FaceObservation, rng: random.Random, ctx: Context) -> None:
    e = o.embedding
    for _ in range(rng.randint(1, 3)):
        what = rng.randrange(5)
        if what == 0:
            odd = ("", "mobilefacenet", "someone-elses-model@3", odd_text(rng, e.model_id))
            e.model_id = rng.choice((*ctx.model_ids, *odd))
        elif what == 1:
            e.dtype = rng.choice((0, 1, 2, 3, 4, 7, -1, 2**31 - 1))
        elif what == 2:
            near = (e.dim - 1, e.dim + 1, e.dim * 2, e.dim // 2)
            e.dim = rng.choice((*ODD_UINT32, *(d % 2**32 for d in near), 512))  # a uint32 either way
        elif what == 3:
            e.scale = odd_float(rng, e.scale)
        else:
            _mutate_embedding_data(e, rng)


def _mutate_image(o: FaceObservation, rng: random.Random, ctx: Context) -> None:
    image, choice = o.image, rng.random()
    if choice < 0.2:
        image.format = rng.choice((0, 1, 2, 3, 4, 99, -5))
    elif choice < 0.8:
        image.data = _mutate_payload_bytes(image.data, rng)
    elif choice < 0.9:
        picture = rng.choice(ctx.seeds.pictures)
        image.format, image.data = picture.format, picture.data
    elif choice < 0.95:
        image.data = FaceObservation.FromString(rng.choice(ctx.seeds.of_payload("face")).data).face.data
    else:
        image.data = rng.choice((b"", bytes(ctx.max_payload_bytes + 1)))
    if rng.random() < 0.3:
        _mutate_landmarks(o, rng, ctx)


def _payload_data(o: FaceObservation) -> bytes:
    kind = o.WhichOneof("payload")
    return getattr(o, kind).data if kind else b""


def _mutate_oneof(o: FaceObservation, rng: random.Random, ctx: Context) -> None:
    """Another member of the payload oneof, none, or an empty one; the landmarks stay."""
    data, what = _payload_data(o), rng.randrange(5)
    if what == 0:
        kind = o.WhichOneof("payload")
        if kind:
            o.ClearField(kind)
    elif what == 1:  # an empty member: present, no fields
        member = getattr(o, rng.choice(("face", "embedding", "image")))
        member.Clear()
        member.SetInParent()
    elif what == 2:  # these bytes under another member
        target = rng.choice(("face", "embedding", "image"))
        if target == "face":
            codec_id, version = rng.choice(ctx.codec_ids), rng.choice((1, 2))
            o.face.CopyFrom(common_pb2.EncodedFace(codec_id=codec_id, codec_version=version, data=data))
        elif target == "image":
            o.image.CopyFrom(common_pb2.Image(format=rng.choice((1, 2, 3)), data=data))
        else:
            model_id, dtype = rng.choice(ctx.model_ids), rng.choice((1, 2, 3))
            o.embedding.CopyFrom(common_pb2.Embedding(model_id=model_id, dtype=dtype, dim=max(1, len(data)),
                                                      scale=1.0, data=data))
    else:  # another seed's payload, with this one's landmarks
        other = FaceObservation.FromString(rng.choice(ctx.seeds.observations).data)
        kind = other.WhichOneof("payload")
        getattr(o, kind).CopyFrom(getattr(other, kind))


def _mutate_ids(o: FaceObservation, rng: random.Random, ctx: Context) -> None:
    """The fields around the payload: ids, clocks, the source frame's box and landmarks."""
    for _ in range(rng.randint(1, 3)):
        what = rng.randrange(8)
        if what in (0, 1):
            o.camera_id = odd_text(rng, "cam")
        elif what == 2:
            o.frame_sequence = rng.choice(ODD_UINT64)
        elif what == 3:
            o.capture_time_us = rng.choice((0, -1, -(2**63), 2**63 - 1))
        elif what == 4:
            setattr(o, rng.choice(("track_id", "face_index")), rng.choice(ODD_UINT32))
        elif what == 5:
            o.request_id = rng.choice(ODD_UINT64)
        elif what == 6:
            setattr(o.box, rng.choice(("x", "y", "width", "height")), odd_float(rng, 10.0))
        else:
            _set_points(o.landmarks, mutate_landmarks(_points(o.landmarks), rng))


def _mutate_empty(o: FaceObservation, rng: random.Random, ctx: Context) -> None:
    if rng.random() < 0.7:
        o.CopyFrom(FaceObservation(camera_id=o.camera_id, request_id=o.request_id))
    else:
        o.Clear()


#: Field-level mutations and their weights, by the payload of the seed they start from.
FIELD_MUTATIONS: dict[str, tuple[tuple[str, MutateObservation, float], ...]] = {
    "face": (("face.data", _mutate_face_data, 4), ("face.codec", _mutate_face_codec, 1.2),
             ("landmarks", _mutate_landmarks, 2), ("oneof", _mutate_oneof, 0.8), ("ids", _mutate_ids, 1),
             ("empty", _mutate_empty, 0.2)),
    "embedding": (("embedding", _mutate_embedding, 4), ("oneof", _mutate_oneof, 0.8), ("ids", _mutate_ids, 1),
                  ("landmarks", _mutate_landmarks, 0.3), ("empty", _mutate_empty, 0.1)),
    "image": (("image", _mutate_image, 3), ("landmarks", _mutate_landmarks, 2), ("oneof", _mutate_oneof, 0.8),
              ("ids", _mutate_ids, 1), ("empty", _mutate_empty, 0.1)),
}


# -- byte-level mutation -----------------------------------------------------------------------
def _unknown_field(rng: random.Random) -> bytes:
    """A field this schema does not define, of any wire type: a parser must skip it."""
    number = rng.choice((9, 13, 19, 21, 99, 1000, 2**29 - 1))
    wire_type = rng.choice((0, 1, 2, 5))
    payload = {0: varint(rng.choice(ODD_UINT64)), 1: rng.randbytes(8), 5: rng.randbytes(4)}.get(wire_type)
    if payload is None:
        body = rng.randbytes(rng.choice((0, 1, 16, 1000)))
        payload = varint(len(body)) + body
    return varint(number << 3 | wire_type) + payload


def _overlong_varint(value: int, extra: int) -> bytes:
    """`value` as a varint padded with continuation bytes: valid, and no encoder writes it."""
    encoded = bytearray(varint(value))
    encoded[-1] |= 0x80
    return bytes(encoded) + b"\x80" * (extra - 1) + b"\x00"


def _wire_candidate(data: bytes, rng: random.Random, ctx: Context) -> bytes:
    what = rng.randrange(6)
    if what == 0:
        return mutate_bytes(data, rng, ())
    if what == 1:  # two observations back to back: protobuf merges them (10 landmarks, last payload wins)
        return data + rng.choice(ctx.seeds.observations).data
    if what == 2:
        fields = [_unknown_field(rng) for _ in range(rng.randint(1, 3))]
        at = rng.choice((0, len(data)))
        return data[:at] + b"".join(fields) + data[at:]
    if what == 3:  # the frame_sequence field written overlong, after the message (it wins)
        return data + b"\x10" + _overlong_varint(rng.choice(ODD_UINT64[:4]), rng.randint(1, 4))
    if what == 4:
        return data + data
    return rng.randbytes(rng.choice((0, 1, 2, 3, 5, 8)))


def parses(data: bytes) -> FaceObservation | None:
    try:
        return FaceObservation.FromString(data)
    except Exception:  # noqa: BLE001 - DecodeError, or whatever upb raises
        return None


def mutate_wire(data: bytes, rng: random.Random, ctx: Context) -> bytes:
    """Serialised-observation bytes mutated until they still parse (at most 16 tries)."""
    for _ in range(16):
        candidate = _wire_candidate(data, rng, ctx)
        if parses(candidate) is not None:
            return candidate
    return data + _unknown_field(rng)


def unparseable(data: bytes, rng: random.Random) -> bytes:
    """Bytes that are not a FaceObservation: invalid UTF-8 in a string, a known field of the wrong
    wire type, a truncated varint or length, or noise."""
    choices = (
        lambda: b"\x0a\x02\xc3\x28" + data,         # camera_id holding invalid UTF-8
        lambda: b"\x10\x05\x00\x00\x00" + data,     # frame_sequence (a varint) as a 32-bit field
        lambda: data + b"\x18" + b"\xff" * 10 + b"\x01",  # a varint of 11 bytes
        lambda: data + b"\x52\x10\x0a",             # a face sub-message promised 16 bytes, given one
        lambda: rng.randbytes(rng.choice((3, 20, 200))),
    )
    for _ in range(16):
        candidate = rng.choice(choices)()
        if parses(candidate) is None:
            return candidate
    return b"\x0a\x02\xc3\x28"


# -- making input i ---------------------------------------------------------------------------
PROBES = ("unparseable", "oversized")


def make_observation(index: int, ctx: Context, base_seed: int = 0, probe_rate: float = 0.002,
                     control_rate: float = 0.05, wire_rate: float = 0.12) -> WireInput:
    """Input `index` of a run: a function of (base_seed, index) and the seeds only."""
    rng = random.Random(base_seed * (1 << 40) + index)
    seed_index = rng.randrange(len(ctx.seeds.observations))
    seed = ctx.seeds.observations[seed_index]
    observation = FaceObservation.FromString(seed.data)
    observation.request_id = index + 1  # unique, so that an answer out of order shows
    data = observation.SerializeToString()
    choice = rng.random()
    if choice < probe_rate:
        probe = rng.choice(PROBES)
        if probe == "oversized":
            observation.face.data = bytes(ctx.max_message_bytes + 1)
            return WireInput(index, probe, seed_index, observation.SerializeToString(), probe)
        return WireInput(index, probe, seed_index, unparseable(data, rng), probe)
    choice -= probe_rate
    if choice < control_rate:
        return WireInput(index, "control", seed_index, data)
    if choice < control_rate + wire_rate:
        return WireInput(index, "wire", seed_index, mutate_wire(data, rng, ctx))
    mutations = FIELD_MUTATIONS[seed.kind.split()[0]]
    name, mutate, _ = rng.choices(mutations, weights=[w for *_, w in mutations])[0]
    mutate(observation, rng, ctx)
    if rng.random() < 0.1 and name != "ids":
        _mutate_ids(observation, rng, ctx)  # now and then the ids go odd too
    return WireInput(index, name, seed_index, observation.SerializeToString())


# -- unary requests -----------------------------------------------------------------------------
RECOGNIZE = "/facelink.v1.Recognition/Recognize"
UNARY_METHODS = {
    "Enroll": ("/facelink.v1.Gallery/Enroll", gallery_pb2.EnrollResponse),
    "RemoveIdentity": ("/facelink.v1.Gallery/RemoveIdentity", gallery_pb2.RemoveIdentityResponse),
    "ListIdentities": ("/facelink.v1.Gallery/ListIdentities", gallery_pb2.ListIdentitiesResponse),
    "GetCapabilities": ("/facelink.v1.Recognition/GetCapabilities", recognition_pb2.Capabilities),
}
_UNARY_WEIGHTS = {"Enroll": 4, "RemoveIdentity": 2, "ListIdentities": 2.5, "GetCapabilities": 1}
_REQUESTS = {"Enroll": gallery_pb2.EnrollRequest, "RemoveIdentity": gallery_pb2.RemoveIdentityRequest,
             "ListIdentities": gallery_pb2.ListIdentitiesRequest,
             "GetCapabilities": recognition_pb2.GetCapabilitiesRequest}
FUZZ_NAMES = 40  # "fz-0".."fz-39": enrolled, replaced and removed again during a run
_VALID_PAGE_TOKENS = ("", "0", "1", "2")
_PAGE_TOKENS = (*_VALID_PAGE_TOKENS, "-1", "abc", "0x10", " 1", "1 ", "1e3", "9999999999", "99999999999",
                "4294967296", "\uff11", "\u0661", "\x00", "0" * 11, "00000000001", "1" * 10_000, "\u202e1")
_PAGE_SIZES = (0, 1, 2, 100, 1000, 1001, 2**31, 2**32 - 1)
_METADATA_KEYS = ("site", "badge", "", " ", "a b", "\u043a\u043b\u044e\u0447", "\x00", "../x", "k" * 64,
                  "k" * 65, "k" * 10_000, "\u200bsite", "site\n", "A.b-c_d")


@dataclass(frozen=True)
class UnaryInput:
    index: int
    method: str
    mutation: str
    data: bytes
    device: bool = False  # sent with the device token (scope `recognize` only)
    probe: str | None = None

    @property
    def what(self) -> str:
        return f"{self.method}: {self.probe or self.mutation}"


def _fuzz_name(rng: random.Random) -> str:
    return f"fz-{rng.randrange(FUZZ_NAMES)}"


def _enroll_image(rng: random.Random, ctx: Context) -> tuple[str, gallery_pb2.EnrollImage]:
    faces = [p for p in ctx.seeds.pictures if p.landmarks]
    picture = rng.choice(faces) if rng.random() < 0.6 else rng.choice(ctx.seeds.pictures)
    item = gallery_pb2.EnrollImage(image=common_pb2.Image(format=picture.format, data=picture.data))
    what = "images" if picture.landmarks else "odd picture"
    if picture.landmarks and rng.random() < 0.25:
        _set_points(item.landmarks, picture.landmarks)
    choice = rng.random()
    if choice < 0.15:
        item.image.data = _mutate_payload_bytes(item.image.data, rng)
        what = "corrupt image"
    elif choice < 0.2:
        item.image.format = rng.choice((0, 4, 99, -1))
        what = "image format"
    elif choice < 0.35:
        _set_points(item.landmarks, mutate_landmarks(list(map(list, picture.landmarks)), rng))
        what = "landmarks"
    return what, item


def _metadata_value(rng: random.Random, many: bool) -> str:
    """An odd value; short when there are many keys, so the request stays under max_message_bytes."""
    if many:
        return rng.choice(ODD_TEXT) if rng.random() < 0.5 else "v" * rng.choice((1, 1024, 1025))
    return odd_text(rng, "v") if rng.random() < 0.5 else "v" * rng.choice((1, 1024, 1025, 100_000))


def _enroll(rng: random.Random, ctx: Context) -> tuple[str, gallery_pb2.EnrollRequest]:
    request = gallery_pb2.EnrollRequest(identity=_fuzz_name(rng), replace=rng.random() < 0.2)
    labels = []
    if rng.random() < 0.3:
        request.identity = odd_text(rng, _fuzz_name(rng))
        labels.append("name")
    count = rng.choices((0, 1, 2, 3, 65), weights=(0.05, 0.7, 0.15, 0.05, 0.02))[0]
    for _ in range(count):
        what, item = _enroll_image(rng, ctx)
        request.images.append(item)
        labels.append(what)
    if rng.random() < 0.3:
        keys = rng.choice((1, 3, 33, 1000))
        for k in range(keys):
            key = rng.choice(_METADATA_KEYS) if rng.random() < 0.5 else f"key{k}"
            request.metadata[key] = _metadata_value(rng, many=keys > 3)
        labels.append("metadata")
    if not count:
        labels.append("no images")
    odd = [label for label in labels if label != "images"]
    return (odd[0] if odd else "valid"), request


def _unary_request(method: str, rng: random.Random, ctx: Context) -> tuple[str, Any]:
    if method == "Enroll":
        return _enroll(rng, ctx)
    if method == "RemoveIdentity":
        if rng.random() < 0.5:
            return "fuzz name", gallery_pb2.RemoveIdentityRequest(identity=_fuzz_name(rng))
        return "name", gallery_pb2.RemoveIdentityRequest(identity=odd_text(rng, _fuzz_name(rng)))
    if method == "ListIdentities":
        size, token = rng.choice(_PAGE_SIZES), rng.choice(_PAGE_TOKENS)
        valid = token in _VALID_PAGE_TOKENS and size <= 1000
        request = gallery_pb2.ListIdentitiesRequest(page_size=size, page_token=token)
        return ("page" if valid else "odd page"), request
    return "empty", recognition_pb2.GetCapabilitiesRequest()


def make_unary(index: int, ctx: Context, base_seed: int = 0, probe_rate: float = 0.01) -> UnaryInput:
    """Unary input `index`: a function of (base_seed, index) and the seeds only."""
    rng = random.Random(base_seed * (1 << 40) + (1 << 39) + index)
    method = rng.choices(list(_UNARY_WEIGHTS), weights=list(_UNARY_WEIGHTS.values()))[0]
    device = rng.random() < 0.08
    mutation, request = _unary_request(method, rng, ctx)
    data = request.SerializeToString()
    if rng.random() < probe_rate:
        broken = unparseable(b"", rng)
        if _parses_as(method, broken) is None:
            return UnaryInput(index, method, "unparseable", broken, device, "unparseable")
    if rng.random() < 0.1:
        for _ in range(16):  # byte-level, kept where it still parses as the request
            if rng.random() < 0.5:
                candidate = data + _unknown_field(rng)
            else:
                candidate = mutate_bytes(data or b"\0", rng, ())
            if _parses_as(method, candidate) is not None:
                return UnaryInput(index, method, "wire", candidate, device)
    return UnaryInput(index, method, mutation, data, device)


def _parses_reply(method: str, data: bytes) -> Any:
    try:
        return UNARY_METHODS[method][1].FromString(data)
    except Exception:  # noqa: BLE001
        return None


def _parses_as(method: str, data: bytes) -> Any:
    try:
        return _REQUESTS[method].FromString(data)
    except Exception:  # noqa: BLE001
        return None


# -- the contract ----------------------------------------------------------------------------------
def leaks(message: str) -> str | None:
    """The Python exception text in `message`, if any."""
    return next((marker for marker in _LEAK_MARKERS if marker in message), None)


def status_problems(code: grpc.StatusCode, details: str | None) -> list[str]:
    """What is wrong with a refusal's status (an empty list: nothing)."""
    if code == OK_CODE:
        return []
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        problems = [code.name]
    elif code not in TYPED_CODES:
        problems = [f"untyped code {code.name}"]
    else:
        problems = []
    if not (details or "").strip():
        problems.append("no message")
    elif leaks(details or ""):
        problems.append("exception text")
    return problems


def result_problems(result: FaceResult, expected: Echo | None) -> list[str]:
    """What is wrong with one FaceResult, against the observation it must answer."""
    problems = []
    if expected is not None and Echo.of_result(result) != expected:
        problems.append("wrong echo (out of order?)")
    decision = result.decision
    if decision == recognition_pb2.DECISION_REJECTED:
        if not result.HasField("error") or result.error.code == 0:
            return [*problems, "REJECTED without an error code"]
        code = _CODES.get(result.error.code)
        if code is None:
            return [*problems, f"unknown code {result.error.code}"]
        problems += status_problems(code, result.error.message)
    elif decision in (recognition_pb2.DECISION_MATCH, recognition_pb2.DECISION_UNKNOWN):
        if result.HasField("error"):
            problems.append("an error on a decision")
        over = result.identity and result.score >= result.threshold
        if decision == recognition_pb2.DECISION_MATCH and not over:
            problems.append("MATCH without an identity over the threshold")
    else:
        problems.append(f"decision {decision}")
    return problems


def outcome(result: FaceResult) -> str:
    if result.decision == recognition_pb2.DECISION_REJECTED and result.HasField("error"):
        code = _CODES.get(result.error.code)
        return f"REJECTED {code.name if code else result.error.code}"
    return recognition_pb2.Decision.Name(result.decision).removeprefix("DECISION_")


# -- the tally -----------------------------------------------------------------------------------
@dataclass
class Tally:
    requests: int = 0
    unary: int = 0
    by_mutation: dict[str, Counter] = field(default_factory=dict)
    by_method: dict[str, Counter] = field(default_factory=dict)
    problems: Counter = field(default_factory=Counter)
    problems_by_input: dict[str, Counter] = field(default_factory=dict)  # the class of input that broke it
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    saved: Counter = field(default_factory=Counter)
    unanswered: int = 0
    unsent: int = 0
    streams: int = 0
    stream_failures: list[dict[str, Any]] = field(default_factory=list)
    hangs: list[dict[str, Any]] = field(default_factory=list)
    slowest: tuple[float, int, str] = (0.0, -1, "")
    messages: Counter = field(default_factory=Counter)  # refusal messages, digits folded: for a human to read
    longest_message: int = 0
    abandoned: int = 0
    abandoned_requests: int = 0

    def count(self, table: dict[str, Counter], key: str, what: str) -> None:
        table.setdefault(key, Counter())[what] += 1

    def message(self, code: str, text: str) -> None:
        self.messages[f"{code}: {re.sub(r'[0-9]+', 'N', text)[:120]}"] += 1
        self.longest_message = max(self.longest_message, len(text))


@dataclass
class RunConfig:
    requests: int
    unary: int | None = None      # default: requests // 40
    seed: int = 0
    streams: int = 4              # streams open at once
    window: int = 8               # observations in flight per stream (the server allows 32)
    hang_seconds: float = 30.0
    probe_rate: float = 0.002
    duration: float | None = None
    save_dir: Path | None = DEFAULT_SAVE_DIR
    progress_every: float = 30.0
    on_progress: Callable[[dict[str, Any]], None] | None = None

    @property
    def unary_requests(self) -> int:
        return self.requests // 40 if self.unary is None else self.unary


@dataclass
class Target:
    """A running server and the credentials to call it with."""

    address: str
    admin_token: str
    device_token: str
    config: CloudConfig
    pid: int | None = None        # whose RSS to watch (default: this process, for a server in-process)
    log_path: Path | None = None  # the server's log, searched for its internal errors at the end


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class HealthMonitor:
    """A thread that calls Health.Check every `interval` seconds and samples the server's RSS."""

    def __init__(self, address: str, pid: int, interval: float = 1.0) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self._request = health_pb2.HealthCheckRequest(service="")
        self._serving = health_pb2.HealthCheckResponse.SERVING
        self._channel = grpc.insecure_channel(address)
        self._stub = health_pb2_grpc.HealthStub(self._channel)
        self.pid, self.interval = pid, interval
        self.checks = self.failures = 0
        self.slowest_s = 0.0
        self.failure_examples: list[str] = []
        self.rss_start_mb = _rss_mb(pid) or 0.0
        self.rss_peak_mb = self.rss_last_mb = self.rss_start_mb
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fuzz-wire-health", daemon=True)

    def start(self) -> HealthMonitor:
        self._thread.start()
        return self

    def check(self) -> bool:
        started = time.monotonic()
        try:
            ok = self._stub.Check(self._request, timeout=HEALTH_TIMEOUT_S).status == self._serving
            detail = "not SERVING"
        except grpc.RpcError as error:
            ok, detail = False, f"{error.code().name}: {error.details()}"
        seconds = time.monotonic() - started
        self.checks += 1
        self.slowest_s = max(self.slowest_s, seconds)
        if not ok:
            self.failures += 1
            if len(self.failure_examples) < EXAMPLES_PER_KIND:
                self.failure_examples.append(f"{detail} after {seconds:.2f} s")
        rss = _rss_mb(self.pid)
        if rss is not None:
            self.rss_last_mb, self.rss_peak_mb = rss, max(self.rss_peak_mb, rss)
        return ok

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(HEALTH_TIMEOUT_S + 1)
        self.check()  # one last look after everything was sent
        self._channel.close()

    def summary(self) -> dict[str, Any]:
        return {"checks": self.checks, "failures": self.failures, "slowest_s": round(self.slowest_s, 3),
                "failure_examples": self.failure_examples, "rss_start_mb": round(self.rss_start_mb, 1),
                "rss_peak_mb": round(self.rss_peak_mb, 1), "rss_end_mb": round(self.rss_last_mb, 1)}


def _raw(data: bytes) -> bytes:
    return data


@dataclass(frozen=True)
class StreamPlan:
    start: int
    stop: int
    device: bool            # the device token (scope `recognize`), else the admin token
    abandon: bool = False   # the client cancels the call halfway through, answers in flight


def plan_streams(requests: int, base_seed: int = 0) -> list[StreamPlan]:
    """Streams of every length, from none to a thousand observations; half of them a device's,
    a few abandoned by their client halfway."""
    rng = random.Random(base_seed * (1 << 40) + (1 << 38))
    plans, start = [], 0
    while start < requests:
        length = rng.choices((0, 1, 3, 10, 50, 200, 1000), weights=(0.2, 1, 1, 2, 3, 3, 2))[0]
        device, abandon = rng.random() < 0.5, rng.random() < 0.03
        plans.append(StreamPlan(start, min(requests, start + length), device, abandon))
        start += length
    return plans


class WireFuzzer:
    """Drives streams and unary calls at a running server and checks every answer."""

    def __init__(self, config: RunConfig, seeds: Seeds, target: Target) -> None:
        self.config, self.seeds, self.target = config, seeds, target
        self.ctx = make_context(seeds, target.config)
        self.max_camera_id = target.config.limits.max_camera_id_length
        self.tally = Tally()
        self.baseline: dict[tuple[int, bool], tuple[int, str]] = {}
        self.started_at = time.monotonic()
        self._stop = False

    # -- plumbing ---------------------------------------------------------------------------------
    def _metadata(self, device: bool) -> tuple[tuple[str, str], ...]:
        token = self.target.device_token if device else self.target.admin_token
        return (("authorization", f"Bearer {token}"),)

    def _open(self) -> None:
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 64 << 20)]
        self.channel = grpc.aio.insecure_channel(self.target.address, options=options)
        # Raw bytes out: what was generated is exactly what the server parses.
        self.recognize = self.channel.stream_stream(RECOGNIZE, request_serializer=_raw,
                                                    response_deserializer=FaceResult.FromString)
        self.unary_calls = {
            name: self.channel.unary_unary(path, request_serializer=_raw, response_deserializer=_raw)
            for name, (path, _) in UNARY_METHODS.items()
        }

    def _out_of_time(self) -> bool:
        duration = self.config.duration
        return self._stop or (duration is not None and time.monotonic() - self.started_at > duration)

    def _save(self, what: str, index: int, data: bytes, name: str = "stream") -> str | None:
        if self.config.save_dir is None or self.tally.saved[what] >= SAVED_PER_KIND:
            return None
        self.tally.saved[what] += 1
        self.config.save_dir.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", what)
        path = self.config.save_dir / f"{name}-{safe}-seed{self.config.seed}-{index}.binpb"
        path.write_bytes(data)
        return str(path)

    def _problem(self, what: str, index: int, data: bytes, detail: str, label: str,
                 name: str = "stream") -> None:
        """One broken promise: counted, an example kept, the input saved for replay."""
        self.tally.problems[what] += 1
        self.tally.count(self.tally.problems_by_input, label.split(" of ")[0], what)
        examples = self.tally.examples.setdefault(what, [])
        file = self._save(what, index, data, name)
        if len(examples) < EXAMPLES_PER_KIND:
            examples.append({"index": index, "input": label, "detail": detail[:500], "file": file,
                             "data_b64": base64.b64encode(data[:4096]).decode()})

    # -- the stream ---------------------------------------------------------------------------------
    def _expected(self, item: WireInput) -> Echo | None:
        parsed = parses(item.data)
        return Echo.of(parsed, self.max_camera_id) if parsed is not None else None

    def _check(self, item: WireInput, result: FaceResult, device: bool, seconds: float) -> None:
        label = f"{item.what} of {self.seeds.observations[item.seed].kind}"
        self.tally.count(self.tally.by_mutation, item.what, outcome(result))
        if result.HasField("error"):
            self.tally.message(outcome(result), result.error.message)
        for problem in result_problems(result, self._expected(item)):
            self._problem(problem, item.index, item.data, f"{outcome(result)}: {result.error.message}", label)
        if device and not self._private(result):
            self._problem("a device sees more than the decision", item.index, item.data,
                          f"{outcome(result)} {result.identity!r} score {result.score}", label)
        if item.mutation == "control":
            got = (result.decision, result.identity)
            if self.baseline.setdefault((item.seed, device), got) != got:
                self._problem("control changed", item.index, item.data,
                              f"{got} where the baseline was {self.baseline[(item.seed, device)]}", label)
        if seconds > self.tally.slowest[0]:
            self.tally.slowest = (seconds, item.index, label)

    def _private(self, result: FaceResult) -> bool:
        """What a principal without the `scores` scope may see: a MATCH's identity and its score
        rounded to score_step; of an UNKNOWN, neither (service._present)."""
        if result.decision == recognition_pb2.DECISION_UNKNOWN:
            return not result.identity and result.score == 0.0
        if result.decision == recognition_pb2.DECISION_MATCH:
            steps = result.score / self.target.config.security.score_step
            return abs(steps - round(steps)) < 1e-3
        return True

    async def _write_all(self, call: Any, items: Sequence[WireInput], window: asyncio.Semaphore,
                         sent: asyncio.Queue) -> None:
        try:
            for item in items:
                await window.acquire()
                started = time.monotonic()
                await call.write(item.data)
                sent.put_nowait((item, started))
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            pass  # the call ended: the reader finds out how
        finally:
            sent.put_nowait(None)

    async def _read_all(
        self, call: Any, window: asyncio.Semaphore, sent: asyncio.Queue, device: bool
    ) -> tuple[int, list[WireInput], str | None]:
        """(answered, the items sent and not answered, why reading stopped early or None)."""
        answered, waiting = 0, []
        while True:
            try:
                entry = await asyncio.wait_for(sent.get(), self.config.hang_seconds)
            except asyncio.TimeoutError:
                return answered, waiting, "hang: a write blocked"
            if entry is None:
                return answered, waiting, None
            item, started = entry
            waiting.append(item)
            try:
                left = self.config.hang_seconds - (time.monotonic() - started)
                result = await asyncio.wait_for(call.read(), max(0.01, left))
            except asyncio.TimeoutError:
                return answered, waiting, "hang"
            except grpc.aio.AioRpcError as error:  # the server's status, before our own writes can mask it
                return answered, waiting, f"ended {error.code().name}: {error.details()}"
            if result is grpc.aio.EOF:
                return answered, waiting, "ended"
            waiting.pop(0)
            answered += 1
            window.release()
            self._check(item, result, device, time.monotonic() - started)

    async def _stream(self, items: Sequence[WireInput], device: bool) -> None:
        call = self.recognize(metadata=self._metadata(device))
        window, sent = asyncio.Semaphore(self.config.window), asyncio.Queue()
        writer = asyncio.ensure_future(self._write_all(call, items, window, sent))
        answered, waiting, stopped = await self._read_all(call, window, sent, device)
        if stopped and stopped.startswith("hang"):
            call.cancel()
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        while not sent.empty():  # written, never read: unanswered too
            entry = sent.get_nowait()
            if entry is not None:
                waiting.append(entry[0])
        self.tally.streams += 1
        self.tally.requests += answered + len(waiting)
        self.tally.unanswered += len(waiting)
        self.tally.unsent += len(items) - answered - len(waiting)
        if stopped and stopped.startswith("hang"):
            self._record_failure("hang", items, waiting, stopped, device)
            return
        try:
            code = await asyncio.wait_for(call.code(), self.config.hang_seconds)
            details = await call.details()
        except asyncio.TimeoutError:
            call.cancel()
            code, details = None, "the stream did not end after done_writing"
        if code != OK_CODE or stopped or waiting:
            # `stopped` keeps the status the failed read saw: a later write of ours can turn the
            # call's own status into the client's "Internal error from Core".
            detail = f"{code and code.name}: {details}" + (f" (read: {stopped})" if stopped else "")
            self._record_failure("stream failure", items, waiting, detail, device, code)

    def _record_failure(self, what: str, items: Sequence[WireInput], waiting: Sequence[WireInput],
                        detail: str, device: bool, code: grpc.StatusCode | None = None) -> None:
        """A stream that hung or ended early: counted once, every input it left unanswered saved."""
        record = {"detail": detail[:500], "device": device, "first_index": items[0].index if items else None,
                  "unanswered": [i.index for i in waiting][:50]}
        (self.tally.hangs if what == "hang" else self.tally.stream_failures).append(record)
        if code is not None:
            for problem in status_problems(code, detail.partition(": ")[2]):
                self.tally.problems[f"stream {problem}"] += 1
        blamed = list(waiting) or list(items[-1:])
        label = f"{blamed[0].what} of {self.seeds.observations[blamed[0].seed].kind}"
        self._problem(what, blamed[0].index, blamed[0].data, detail, label)
        for item in blamed[1:]:
            self._save(what, item.index, item.data)

    async def _probe(self, item: WireInput, device: bool) -> None:
        """A message the server cannot read, then a control on the same stream. Either the probe
        is answered REJECTED and the stream goes on, or the stream ends with a typed status."""
        control = WireInput(item.index, "control", item.seed, self.seeds.observations[item.seed].data)
        call = self.recognize(metadata=self._metadata(device))
        label = f"probe {item.probe}"
        self.tally.requests += 1
        try:
            answers = await self._exchange(call, item.data, [])
            if answers:  # the stream went on: so must the control behind the probe
                await self._exchange(call, control.data, answers)
            await self._end_writing(call)
            code = await asyncio.wait_for(call.code(), self.config.hang_seconds)
            details = await call.details()
        except asyncio.TimeoutError:
            call.cancel()
            self.tally.hangs.append({"detail": label, "device": device, "first_index": item.index,
                                     "unanswered": [item.index]})
            self._problem("hang", item.index, item.data, label, label)
            return
        if answers:
            first = answers[0]
            self.tally.count(self.tally.by_mutation, label, outcome(first))
            for problem in result_problems(first, None):
                detail = f"{outcome(first)}: {first.error.message}"
                self._problem(problem, item.index, item.data, detail, label)
            if len(answers) > 1:
                self._check(control, answers[1], device, 0.0)
            elif code == OK_CODE:
                self._problem("control unanswered after a probe", item.index, item.data, "", label)
            return
        self.tally.count(self.tally.by_mutation, label, f"stream {code.name}")
        ended_ok = ["stream ended OK without an answer"]
        problems = ended_ok if code == OK_CODE else status_problems(code, details)
        for problem in problems:
            self._problem(f"probe {problem}", item.index, item.data, f"{code.name}: {details}", label)

    async def _exchange(self, call: Any, data: bytes, answers: list[FaceResult]) -> list[FaceResult]:
        """Writes one message and reads its answer into `answers`, unless the call ends. One at a
        time: a write after the server ended the call makes the client report its own INTERNAL
        ("Internal error from Core") instead of the server's status."""
        try:
            await call.write(data)
            answer = await asyncio.wait_for(call.read(), self.config.hang_seconds)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            return answers
        if answer is not grpc.aio.EOF:
            answers.append(answer)
        return answers

    async def _end_writing(self, call: Any) -> None:
        try:
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            pass

    async def _abandon(self, items: Sequence[WireInput], device: bool) -> None:
        """All of `items` written, half of the answers read, then the call cancelled: the server
        must drop the rest without a trace (its log is scanned for tracebacks at the end)."""
        call = self.recognize(metadata=self._metadata(device))
        try:
            for item in items:
                await call.write(item.data)
            for _ in range(len(items) // 2):
                if await asyncio.wait_for(call.read(), self.config.hang_seconds) is grpc.aio.EOF:
                    break
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError, asyncio.TimeoutError):
            pass
        call.cancel()
        self.tally.abandoned += 1
        self.tally.abandoned_requests += len(items)

    async def _run_plan(self, plan: StreamPlan) -> None:
        c = self.config
        items = [make_observation(i, self.ctx, c.seed, c.probe_rate) for i in range(plan.start, plan.stop)]
        regular = [item for item in items if item.probe is None]
        if plan.abandon and regular:  # its first few, not counted as requests: nobody waits for their answers
            await self._abandon(regular[: self.config.window], plan.device)
            if regular[self.config.window :]:
                await self._stream(regular[self.config.window :], plan.device)
        elif regular or not items:  # an empty plan: a stream that sends nothing and must end OK
            await self._stream(regular, plan.device)
        for probe in (item for item in items if item.probe is not None):
            await self._probe(probe, plan.device)

    async def _stream_worker(self, plans: asyncio.Queue) -> None:
        while not self._out_of_time():
            try:
                plan = plans.get_nowait()
            except asyncio.QueueEmpty:
                return
            await self._run_plan(plan)

    # -- unary ----------------------------------------------------------------------------------------
    async def _unary(self, item: UnaryInput) -> None:
        label = item.what
        self.tally.unary += 1
        started = time.monotonic()
        try:
            reply = await self.unary_calls[item.method](item.data, metadata=self._metadata(item.device),
                                                        timeout=self.config.hang_seconds)
            code, details = OK_CODE, ""
            if _parses_reply(item.method, reply) is None:
                detail = f"{len(reply)} bytes"
                name = f"unary-{item.method}"
                self._problem("unreadable reply", item.index, item.data, detail, label, name)
        except grpc.aio.AioRpcError as error:
            code, details = error.code(), error.details() or ""
        seconds = time.monotonic() - started
        self.tally.count(self.tally.by_method, label, code.name)
        if code != OK_CODE:
            self.tally.message(code.name, details)
        name = f"unary-{item.method}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self.tally.hangs.append({"detail": label, "unary": True, "index": item.index,
                                     "seconds": round(seconds, 1)})
            self._problem("hang", item.index, item.data, label, label, name)
            return
        for problem in status_problems(code, details):
            self._problem(problem, item.index, item.data, f"{code.name}: {details}", label, name)

    async def _unary_worker(self, total: int) -> None:
        """Unary calls spread over the run: call j waits until the streams are j/total through."""
        for j in range(total):
            while (self.tally.requests < j * self.config.requests / max(total, 1) and not self._streams_done
                   and not self._out_of_time()):
                await asyncio.sleep(0.05)
            if self._out_of_time():
                return
            # Unary calls are fewer: more of them are probes, so that a run has some.
            probe_rate = self.config.probe_rate * 5
            await self._unary(make_unary(j, self.ctx, self.config.seed, probe_rate=probe_rate))

    # -- the run ----------------------------------------------------------------------------------------
    async def _baseline(self) -> None:
        """Each seed once per token before anything odd is sent: what a control must get again."""
        for device in (False, True):
            items = [WireInput(-1, "control", i, s.data) for i, s in enumerate(self.seeds.observations)]
            await self._stream(items, device)
        # The baselines are not part of the run's counts, but whatever they broke is.
        before = self.tally
        self.tally = Tally(problems=before.problems, problems_by_input=before.problems_by_input,
                           examples=before.examples, saved=before.saved)

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(self.config.progress_every)
            if self.config.on_progress:
                self.config.on_progress(self.summary("running"))

    async def run_async(self, health: HealthMonitor | None = None) -> dict[str, Any]:
        self._open()
        self._health = health
        self._streams_done = False
        try:
            await self._baseline()
            self.started_at = time.monotonic()
            plans: asyncio.Queue[StreamPlan] = asyncio.Queue()
            for plan in plan_streams(self.config.requests, self.config.seed):
                plans.put_nowait(plan)
            progress = asyncio.ensure_future(self._progress())
            unary = asyncio.ensure_future(self._unary_worker(self.config.unary_requests))
            await asyncio.gather(*(self._stream_worker(plans) for _ in range(self.config.streams)))
            self._streams_done = True
            await unary
            progress.cancel()
        except (KeyboardInterrupt, asyncio.CancelledError):
            self._stop = True
            return self.summary("interrupted")
        finally:
            await self.channel.close()
        return self.summary("stopped at --duration" if self._out_of_time() else "complete")

    def summary(self, status: str) -> dict[str, Any]:
        t, elapsed = self.tally, time.monotonic() - self.started_at
        internal = sum(v for k, v in t.problems.items() if k.endswith("INTERNAL"))
        unknown = sum(v for k, v in t.problems.items() if k.endswith("UNKNOWN"))
        return {
            "status": status,
            "requests_requested": self.config.requests,
            "requests": t.requests,
            "unary_requests": t.unary,
            "streams": t.streams,
            "abandoned_streams": t.abandoned,
            "abandoned_requests": t.abandoned_requests,
            "seconds": round(elapsed, 1),
            "requests_per_s": round(t.requests / elapsed, 1) if elapsed else None,
            "internal": internal,
            "unknown": unknown,
            "unanswered_faces": t.unanswered,
            "unsent_after_stream_failure": t.unsent,
            "stream_failures": t.stream_failures[:20],
            "stream_failure_count": len(t.stream_failures),
            "hangs": t.hangs[:20],
            "hang_count": len(t.hangs),
            "problems": dict(sorted(t.problems.items())),
            "problems_by_input": {k: dict(sorted(v.items())) for k, v in sorted(t.problems_by_input.items())},
            "health": self._health.summary() if getattr(self, "_health", None) else None,
            "slowest": {"seconds": round(t.slowest[0], 3), "index": t.slowest[1], "input": t.slowest[2]},
            "longest_message_chars": t.longest_message,
            "messages": dict(t.messages.most_common(80)),
            "by_mutation": {k: dict(sorted(v.items())) for k, v in sorted(t.by_mutation.items())},
            "by_method": {k: dict(sorted(v.items())) for k, v in sorted(t.by_method.items())},
            "examples": t.examples,
        }


def enroll_seed_people(address: str, token: str, seeds: Seeds) -> None:
    """The gallery the controls are matched against."""
    from facelink.v1 import gallery_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = gallery_pb2_grpc.GalleryStub(channel)
        for person, jpeg in seeds.enroll:
            picture = common_pb2.Image(format=common_pb2.IMAGE_FORMAT_JPEG, data=jpeg)
            image = gallery_pb2.EnrollImage(image=picture)
            stub.Enroll(gallery_pb2.EnrollRequest(identity=person, images=[image]), timeout=60,
                        metadata=(("authorization", f"Bearer {token}"),))


def run_fuzz(config: RunConfig, seeds: Seeds, target: Target) -> dict[str, Any]:
    """Enrolls the seed people, fuzzes, and returns the summary (health and RSS included)."""
    enroll_seed_people(target.address, target.admin_token, seeds)
    health = HealthMonitor(target.address, target.pid or os.getpid()).start()
    fuzzer = WireFuzzer(config, seeds, target)
    try:
        result = asyncio.run(fuzzer.run_async(health))
    finally:
        health.stop()
    result["health"] = health.summary()
    if target.log_path is not None:
        result["server_log"] = scan_server_log(target.log_path)
    return result


# -- the server under test ----------------------------------------------------------------------
def fuzz_server_config(gallery_dir: Path, **overrides: Any) -> CloudConfig:
    """The production defaults on a fresh gallery, without the per-principal rate limits (else
    nearly every input would be answered RESOURCE_EXHAUSTED and nothing behind the limit tested)."""
    limits = ServiceLimits(face_rate=0, call_rate=0)
    return CloudConfig(port=0, gallery_dir=gallery_dir, limits=limits, **overrides)


def create_tokens(config: CloudConfig) -> tuple[str, str]:
    """(admin token, device token with the scope `recognize` only)."""
    from facelink.cloud.auth import AuthStore

    store = AuthStore(config.auth_path)
    return store.create_token("fuzz-admin", ["admin"])[1], store.create_token("fuzz-device", ["recognize"])[1]


_SERVE = (
    "import logging, sys\n"
    "logging.basicConfig(level=logging.WARNING, format='%(asctime)s %(levelname)s %(name)s: %(message)s')\n"
    "from facelink.config import CloudConfig\n"
    "from facelink.cloud.server import serve\n"
    "serve(CloudConfig.model_validate_json(sys.argv[1]))\n"
)


@contextmanager
def server_process(log_path: Path, start_timeout: float = 120.0) -> Iterator[Target]:
    """A server in a subprocess (a crash there is a finding, not the end of the fuzzer) on a
    fresh gallery; its stderr goes to `log_path`."""
    with tempfile.TemporaryDirectory(prefix="fuzz-wire-") as folder:
        config = fuzz_server_config(Path(folder) / "gallery")
        admin, device = create_tokens(config)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:
            process = subprocess.Popen([sys.executable, "-c", _SERVE, config.model_dump_json()],
                                       stdout=subprocess.PIPE, stderr=log, text=True)
            try:
                port = _wait_for_port(process, start_timeout, log_path)
                yield Target(f"127.0.0.1:{port}", admin, device, config, process.pid, log_path)
            finally:
                _stop_process(process)


def _wait_for_port(process: subprocess.Popen, timeout: float, log_path: Path) -> int:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}; see {log_path}")
        match = re.search(r"listening on \S+:(\d+)", line)
        if match:
            return int(match.group(1))
    raise RuntimeError(f"the server did not start in {timeout:.0f} s; see {log_path}")


def _stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def scan_server_log(path: Path) -> dict[str, Any]:
    """The server's own record of internal errors: how many, and the last line of each traceback."""
    text = path.read_text(errors="replace") if path.is_file() else ""
    lines = text.splitlines()
    errors = Counter()
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            j = i + 1
            while j < len(lines) and (lines[j].startswith(" ") or lines[j].startswith("\t")):
                j += 1
            if j < len(lines):
                errors[lines[j][:300]] += 1
    return {"path": str(path), "internal_error_lines": sum("internal error" in line for line in lines),
            "tracebacks": dict(errors.most_common(20))}


# -- the report ------------------------------------------------------------------------------
def _column_order(name: str) -> tuple[bool, str]:
    """Decisions and OK first, then refusals, then how probes' streams ended."""
    return (not name[:1].isupper() or name.startswith("REJECTED"), name)


def _table(rows: dict[str, dict[str, int]], first: str) -> list[str]:
    columns = sorted({k for counts in rows.values() for k in counts}, key=_column_order)
    body = [[name, str(sum(counts.values())), *[str(counts.get(c, 0) or "") for c in columns]]
            for name, counts in rows.items()]
    return reporting.markdown_table([first, "requests", *columns], body)


def _problems_line(r: dict[str, Any]) -> str:
    by_input = r["problems_by_input"].items()
    return "; ".join(f"{k}: {', '.join(f'{p} {n}' for p, n in v.items())}" for k, v in by_input) or "none"


def _summary_lines(payload: dict[str, Any]) -> list[str]:
    r, hang = payload["result"], payload["hang_seconds"]
    health, log = r.get("health") or {}, r.get("server_log") or {}
    run = (f"{r['status']}: {r['requests']:,} of {r['requests_requested']:,} observations on "
           f"{r['streams']:,} streams and {r['unary_requests']:,} unary requests in {r['seconds']:.0f} s "
           f"({r['requests_per_s']} observations/s); {r['abandoned_streams']} streams "
           f"({r['abandoned_requests']} observations) cancelled by the client halfway")
    contract = (f"INTERNAL: {r['internal']}; UNKNOWN: {r['unknown']}; unanswered faces: "
                f"{r['unanswered_faces']}; stream failures: {r['stream_failure_count']}; hangs (> {hang} s): "
                f"{r['hang_count']}; problems by input: {_problems_line(r)}")
    server = (f"health checks: {health.get('checks', 0)}, failed {health.get('failures', 0)}, slowest "
              f"{health.get('slowest_s', 0)} s; server RSS {health.get('rss_start_mb', 0):.0f} -> peak "
              f"{health.get('rss_peak_mb', 0):.0f} -> end {health.get('rss_end_mb', 0):.0f} MB; server log: "
              f"{log.get('internal_error_lines', 0)} internal-error lines")
    return [run, contract, server]


def format_report(payload: dict[str, Any]) -> str:
    r = payload["result"]
    return "\n".join([
        f"command: {payload['command']}",
        f"{reporting.machine_line(payload['machine'])}; date: {payload['date']}",
        "",
        *_table(r["by_mutation"], "observation mutation"),
        "",
        *_table(r["by_method"], "unary request"),
        "",
        *_summary_lines(payload),
    ])


def clean(result: dict[str, Any]) -> bool:
    """The whole contract held: nothing broken, unanswered, failed or hung, and health all along."""
    broken = (result["problems"], result["unanswered_faces"], result["hang_count"],
              result["stream_failure_count"])
    return not any(broken) and not (result.get("health") or {}).get("failures")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m facelink.benchmarks.fuzz_wire", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    default = " (default: %(default)s)"
    p.add_argument("--requests", type=int, default=10_000, help="observations to send" + default)
    p.add_argument("--unary", type=int, help="unary requests, spread over the run (default: requests / 40)")
    p.add_argument("--seed", type=int, default=0, help="the run's seed: input i is a function of (seed, i)")
    p.add_argument("--streams", type=int, default=4, help="streams open at once" + default)
    p.add_argument("--window", type=int, default=8, help="observations in flight per stream" + default)
    p.add_argument("--hang-seconds", type=float, default=30.0,
                   help="an answer later than this is a hang" + default)
    p.add_argument("--probe-rate", type=float, default=0.002,
                   help="share of inputs that are unreadable or oversized messages, each on its own stream")
    p.add_argument("--people", type=int, default=len(SEED_PEOPLE), help="LFW people in the seed observations")
    p.add_argument("--probes", type=int, default=2, help="pictures per person in the seed observations")
    p.add_argument("--duration", type=float, help="stop after this many seconds and record how far it got")
    p.add_argument("--save-dir", type=Path, default=DEFAULT_SAVE_DIR,
                   help="where failing inputs and the server log go")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file" + default)
    p.add_argument("--replay", type=Path, nargs="+",
                   help="send saved inputs to a fresh server and print the answers")
    return p


# -- replay ------------------------------------------------------------------------------------------
def _replay_one(channel: grpc.Channel, path: Path, metadata: tuple[tuple[str, str], ...]) -> str:
    data = path.read_bytes()
    method = next((m for m in UNARY_METHODS if path.name.startswith(f"unary-{m}-")), None)
    try:
        if method is None:
            call = channel.stream_stream(RECOGNIZE, request_serializer=_raw,
                                         response_deserializer=FaceResult.FromString)
            return str([str(a).strip() for a in call(iter([data]), metadata=metadata, timeout=60)])
        path_of_method = UNARY_METHODS[method][0]
        call = channel.unary_unary(path_of_method, request_serializer=_raw, response_deserializer=_raw)
        return f"OK, {len(call(data, metadata=metadata, timeout=60))} bytes"
    except grpc.RpcError as error:
        return f"{error.code().name}: {error.details()}"


def replay(paths: Sequence[Path], log_path: Path) -> int:
    """Each saved input to a fresh server: a stream input on a stream of its own, a unary one to
    the method its file is named after."""
    with server_process(log_path) as target:
        metadata = (("authorization", f"Bearer {target.admin_token}"),)
        with grpc.insecure_channel(target.address, options=[("grpc.max_send_message_length", -1)]) as channel:
            for path in paths:
                print(f"{path.name}: {_replay_one(channel, path, metadata)}")
    print(f"server log: {log_path}")
    return 0


def _progress_line(result: dict[str, Any]) -> str:
    r = result
    return (f"[{r['seconds']:.0f} s] {r['requests']:,} observations ({r['requests_per_s']}/s), "
            f"{r['unary_requests']:,} unary; INTERNAL {r['internal']}, UNKNOWN {r['unknown']}, "
            f"unanswered {r['unanswered_faces']}, hangs {r['hang_count']}, problems {r['problems']}")


def main(argv: list[str] | None = None) -> int:
    argv = reporting.bench_argv(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    log_path = args.save_dir / f"server-seed{args.seed}.log"
    if args.replay:
        return replay(args.replay, log_path)
    command = shlex.join(["python", "-m", "facelink.benchmarks.fuzz_wire", *argv])
    seeds = build_seeds(SEED_PEOPLE[: args.people], args.probes)
    payload: dict[str, Any] = {
        "benchmark": "fuzz_wire",
        "command": command,
        "date": reporting.utc_now(),
        "machine": reporting.machine_info(),
        "seed": args.seed,
        "streams": args.streams,
        "window": args.window,
        "hang_seconds": args.hang_seconds,
        "probe_rate": args.probe_rate,
        "seeds": dict(sorted(Counter(s.kind for s in seeds.observations).items())),
    }

    def progress(result: dict[str, Any]) -> None:
        print(_progress_line(result), file=sys.stderr, flush=True)
        # A long run leaves a record as it goes.
        reporting.write_results(args.json, {**payload, "result": result})

    config = RunConfig(args.requests, args.unary, args.seed, args.streams, args.window, args.hang_seconds,
                       args.probe_rate, args.duration, args.save_dir, on_progress=progress)
    with server_process(log_path) as target:
        server = target.config
        payload["server"] = {"max_message_bytes": server.max_message_bytes,
                             "max_payload_bytes": server.max_payload_bytes,
                             "limits": "face_rate=0, call_rate=0"}
        payload["result"] = run_fuzz(config, seeds, target)
    print(format_report(payload))
    reporting.write_results(args.json, payload)
    print(f"wrote {args.json}")
    return 0 if clean(payload["result"]) else 1


if __name__ == "__main__":
    sys.exit(main())
