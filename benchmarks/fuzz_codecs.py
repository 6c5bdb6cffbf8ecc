"""Decoder fuzzing: every payload decoder the cloud runs, fed mutated streams, must answer with an
image or a `CodecError`, in bounded time and memory.

Inputs are made from real streams: synthetic pictures (and LFW faces, where ../shared has them)
coded by every codec this build registers (JPEG, PNG, WebP, and each bundled learned codec at
each quality, bitstream v1 and v2: whole crop, crop with its border ring, several regions, one
region covering everything), then mutated: bit flips, interesting bytes and 32-bit words, inserts,
deletes, truncation, splices, and for learned-codec streams a rewrite of the header's fields.
A learned-codec stream gets its CRC-32 recomputed after the mutation (PNG its chunk CRCs), so the
mutation reaches the parser behind the checksum instead of being refused by it. A share of the
inputs are random bytes, some behind a valid learned-codec header. Each input is decoded once, with
or without a pixel budget (`max_pixels`), through the codec's `decode` or, for the "image" target,
`decode_image` as the cloud's picture payloads are.

Input i is a function of (--seed, i) and the seed streams only, so any input is made again from its
index. Workers (one per core) decode chunks of indices; a watchdog kills a worker whose current
input runs over --hang-seconds, records the input as a hang (its bytes saved under --save-dir), and
goes on from the next index. A worker that dies (a crash in a native decoder) is recorded the same
way. Counted: inputs, outcomes (decoded, CodecError, any other exception by type), hangs, crashes,
the peak RSS of any worker, decodes per second.

    python -m facelink.benchmarks.fuzz_codecs --inputs 1000000            # the long run
    python -m facelink.benchmarks.fuzz_codecs --inputs 2000 --json /tmp/f.json   # a smoke test
    python -m facelink.benchmarks.fuzz_codecs --inputs 1000000 --duration 5400   # stop after 90 min

Workers leave stderr alone unless --quiet-native is given: OpenCV's image libraries print a line
for every corrupt input.
"""

from __future__ import annotations

import argparse
import base64
import multiprocessing as mp
import os
import queue
import random
import resource
import shlex
import signal
import struct
import sys
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facelink.config import cache_dir, shared_dir
from facelink.runtime.codecs.bitstream import varint

from . import reporting

DEFAULT_JSON = Path("benchmarks/results/fuzz_codecs.json")
DEFAULT_SAVE_DIR = cache_dir() / "fuzz-codecs"
IMAGE_TARGET = "image"  # decode_image, the cloud's path for picture payloads (not a codec id)
IMAGE_MAX_SIDE = 4096   # the cloud's default max_image_side
BUDGETS = (None, 512 * 512, 128 * 128)  # max_pixels: none (the decoder's own limit), the cloud's, a crop
CHUNK = 64
DECODED, CODEC_ERROR = "decoded", "CodecError"
EXAMPLES_PER_KIND = 5
MAX_STARTUP_FAILURES = 5
RECHECK_STARTUP_SECONDS = 60.0


# -- seeds: real streams of every codec ------------------------------------------------------
@dataclass(frozen=True)
class Seed:
    target: str  # codec id, or IMAGE_TARGET
    kind: str    # what the stream is, e.g. "v2 ring q3 128x128"
    data: bytes


def synthetic_pictures(rng: np.random.Generator, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Pictures with structure a codec spends bits on: gradients, blobs, edges and noise."""
    pictures = []
    for height, width in sizes:
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
        blob = np.exp(-(((y - cy) / (0.3 * height + 1)) ** 2 + ((x - cx) / (0.25 * width + 1)) ** 2))
        base = np.stack([x / max(width, 1), y / max(height, 1), blob], -1) * 200
        base += ((x // 9 + y // 13) % 2)[..., None] * 30 + rng.normal(0, 12, (height, width, 3))
        pictures.append(np.clip(base, 0, 255).astype(np.uint8))
    return pictures


def lfw_faces(count: int) -> list[np.ndarray]:
    """A few real faces (the centre 128x128 of LFW pictures) when ../shared has LFW; else none."""
    import cv2

    folder = shared_dir() / "data" / "lfw" / "lfw-deepfunneled"
    if not folder.is_dir():
        return []
    faces = []
    for path in sorted(folder.glob("*/*_0001.jpg"))[:count]:
        bgr = cv2.imread(str(path))
        if bgr is not None and min(bgr.shape[:2]) >= 128:
            h, w = bgr.shape[:2]
            faces.append(np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)[(h - 128) // 2 : (h + 128) // 2, (w - 128) // 2 : (w + 128) // 2]))
    return faces


def _standard_seeds(codec_id: str, pictures: Sequence[np.ndarray]) -> list[Seed]:
    from facelink.runtime.codecs import create_codec

    seeds = []
    for quality in (90, 20):
        codec = create_codec(codec_id, quality)
        for picture in pictures:
            data = codec.encode(picture)
            label = f"q{quality} {picture.shape[1]}x{picture.shape[0]}"
            seeds += [Seed(codec_id, label, data), Seed(IMAGE_TARGET, f"{codec_id} {label}", data)]
        if codec_id == "png":  # lossless: one quality
            break
    return seeds + _animated_seeds(codec_id, pictures[:3])


def _animated_seeds(codec_id: str, pictures: Sequence[np.ndarray]) -> list[Seed]:
    """APNG and animated WebP: OpenCV decodes their first frame, through its own chunk parser."""
    import cv2

    if codec_id not in ("png", "webp") or not hasattr(cv2, "imencodeanimation"):
        return []
    seeds = []
    for picture in pictures:
        animation = cv2.Animation()
        bgr = cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)
        animation.frames, animation.durations = [bgr, bgr[::-1].copy(), 255 - bgr], [40, 40, 40]
        ok, buffer = cv2.imencodeanimation(f".{codec_id}", animation)
        if ok:
            label = f"animated {picture.shape[1]}x{picture.shape[0]}"
            data = buffer.tobytes()
            seeds += [Seed(codec_id, label, data), Seed(IMAGE_TARGET, f"{codec_id} {label}", data)]
    return seeds


def _learned_seeds(codec_id: str, pictures: Sequence[np.ndarray], qualities: Iterable[int] | None) -> list[Seed]:
    """v1 streams, and v2 streams with a border ring, two regions, one region covering everything."""
    from facelink.runtime.codecs import available_codecs
    from facelink.runtime.codecs.bitstream import Background
    from facelink.runtime.codecs.face_aware import AlignedCropCodec

    info = available_codecs()[codec_id]
    first = info.create(info.default_quality)
    seeds = []
    for quality in qualities or range(1, first.manifest.qualities + 1):
        codec = first.at_quality(quality)
        ring = AlignedCropCodec(codec)
        for picture in pictures:
            h, w = picture.shape[:2]
            size = f"q{quality} {w}x{h}"
            seeds.append(Seed(codec_id, f"v1 {size}", codec.encode(picture)))
            seeds.append(Seed(codec_id, f"v2 ring {size}", ring.encode(picture)))
            two = [(0.0, 0.0, w / 3, h / 2), (w / 2, h / 3, float(w), float(h))]
            seeds.append(Seed(codec_id, f"v2 regions {size}", codec.encode(picture, regions=two, background=Background(1, 2))))
            whole = [(0.0, 0.0, float(w), float(h))]
            seeds.append(Seed(codec_id, f"v2 whole {size}", codec.encode(picture, regions=whole, background=Background(1))))
    return seeds + _extreme_seeds(codec_id, first)


def _extreme_seeds(codec_id: str, codec: Any) -> list[Seed]:
    """Valid streams no encoder would write: latents of extreme symbols (escapes up to the
    coder's 24 bits), which push the decoder network towards inf and NaN."""
    from facelink.runtime.codecs import bitstream

    rng = np.random.default_rng(1)
    channels, seeds = codec.manifest.latent_channels, []
    for quality in (1, codec.manifest.qualities):
        for label, high in (("huge", (1 << 23) - 1), ("large", 1 << 12), ("small", 3)):
            symbols = rng.integers(-high, high + 1, size=(channels, 2, 3))
            payload = codec.entropy_coder(quality).encode(symbols)
            header = bitstream.Header(codec.manifest.tag, quality, 3 * codec.manifest.stride, 2 * codec.manifest.stride)
            seeds.append(Seed(codec_id, f"v1 extreme {label} q{quality}", bitstream.pack(header, payload)))
    return seeds


def seed_streams(pictures: Sequence[np.ndarray], learned_qualities: Iterable[int] | None = None) -> list[Seed]:
    """Valid streams of every codec id this build registers (learned: every quality unless given)."""
    from facelink.runtime.codecs import available_codecs
    from facelink.runtime.codecs.learned import LearnedFaceCodec

    seeds: list[Seed] = []
    for codec_id, info in sorted(available_codecs().items()):
        if info.versions == LearnedFaceCodec.versions and codec_id.startswith("flc-"):
            seeds += _learned_seeds(codec_id, pictures, learned_qualities)
        else:
            seeds += _standard_seeds(codec_id, pictures)
    return seeds


DEFAULT_SIZES = ((128, 128), (112, 112), (37, 53), (64, 160), (250, 250), (16, 16), (1, 40))


def default_seeds(lfw: int = 4, learned_qualities: Iterable[int] | None = None) -> list[Seed]:
    pictures = synthetic_pictures(np.random.default_rng(0), DEFAULT_SIZES) + lfw_faces(lfw)
    return seed_streams(pictures, learned_qualities)


# -- mutation ------------------------------------------------------------------------------
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0xFE, 0x10, 0x40)
INTERESTING_WORDS = (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x00010000, 0x0000FFFF)
INTERESTING_SIDES = (0, 1, 15, 16, 17, 127, 128, 129, 255, 256, 1000, 1920, 4096, 16383, 65535, 65536, 1 << 20, 1 << 28)


def _flip_bits(b: bytearray, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)


def _set_bytes(b: bytearray, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(len(b))] = rng.choice(INTERESTING_BYTES) if rng.random() < 0.7 else rng.randrange(256)


def _add_to_byte(b: bytearray, rng: random.Random) -> None:
    i = rng.randrange(len(b))
    b[i] = (b[i] + rng.randint(-16, 16)) & 0xFF


def _set_word(b: bytearray, rng: random.Random) -> None:
    if len(b) >= 4:
        i = rng.randrange(len(b) - 3)
        if rng.random() < 0.5:
            i -= i % 4  # the learned payload is 32-bit words (up to the header's odd length)
        value = rng.choice(INTERESTING_WORDS) if rng.random() < 0.7 else rng.getrandbits(32)
        b[i : i + 4] = struct.pack("<I", value)


def _insert(b: bytearray, rng: random.Random) -> None:
    i = rng.randrange(len(b) + 1)
    if rng.random() < 0.5 and b:
        j = rng.randrange(len(b))
        chunk = b[j : j + rng.randint(1, 64)]
    else:
        chunk = bytearray(rng.getrandbits(8) for _ in range(rng.choice((1, 2, 4, 8, 32))))
    b[i:i] = chunk


def _delete(b: bytearray, rng: random.Random) -> None:
    i = rng.randrange(len(b))
    del b[i : i + rng.randint(1, max(1, min(64, len(b) // 4)))]


def _truncate(b: bytearray, rng: random.Random) -> None:
    del b[rng.randrange(len(b)) :]


def _duplicate(b: bytearray, rng: random.Random) -> None:
    i = rng.randrange(len(b))
    chunk = b[i : i + rng.randint(1, 256)]
    b[i:i] = chunk * rng.randint(1, 16)


BYTE_MUTATIONS: tuple[Callable[[bytearray, random.Random], None], ...] = (
    _flip_bits, _flip_bits, _set_bytes, _add_to_byte, _set_word, _set_word, _insert, _delete, _truncate, _duplicate,
)


def mutate_bytes(data: bytes, rng: random.Random, others: Sequence[Seed]) -> bytes:
    """One to four stacked byte-level mutations, or a splice with another seed."""
    b = bytearray(data)
    if rng.random() < 0.05 and others:
        other = rng.choice(others).data
        b = b[: rng.randrange(len(b) + 1)] + bytearray(other[rng.randrange(len(other) + 1) :])
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        if not b:
            break
        rng.choice(BYTE_MUTATIONS)(b, rng)
    return bytes(b)


def fix_learned_checksum(data: bytes) -> bytes:
    """A learned-codec stream with its trailing CRC-32 recomputed, so that a mutation reaches the
    parser behind the checksum instead of being refused by it."""
    from facelink.runtime.codecs.bitstream import MAGIC

    if len(data) < 8 or data[: len(MAGIC)] != MAGIC:
        return data
    body = data[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def fix_png_crcs(data: bytes) -> bytes:
    """Every whole chunk's CRC recomputed, so a mutation inside a chunk reaches libpng's parser."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    b = bytearray(data)
    pos = 8
    while pos + 12 <= len(b):
        length = struct.unpack(">I", b[pos : pos + 4])[0]
        end = pos + 8 + length
        if end + 4 > len(b):
            break
        b[end : end + 4] = struct.pack(">I", zlib.crc32(bytes(b[pos + 4 : end])))
        pos = end + 4
    return bytes(b)


def _side(rng: random.Random, current: int) -> int:
    choice = rng.random()
    if choice < 0.4:
        return rng.choice(INTERESTING_SIDES)
    if choice < 0.8:
        return max(0, current + rng.randint(-40, 40))
    return rng.randrange(1 << rng.choice((8, 12, 16, 21)))


def _cell(rng: random.Random, current: int) -> int:
    return rng.choice((0, 1, 2, 7, 8, 9, 16, 255, 1 << 14, 1 << 21)) if rng.random() < 0.4 else max(0, current + rng.randint(-3, 3))


@dataclass
class _Fields:
    """A learned-codec header as plain numbers, written back without any validation."""

    version: int
    tag: bytes
    quality: int
    width: int
    height: int
    background: tuple[int, int]
    regions: list[list[int]]
    payload: bytes

    def pack(self) -> bytes:
        from facelink.runtime.codecs.bitstream import MAGIC

        body = MAGIC + bytes([self.version & 0xFF]) + self.tag + bytes([self.quality & 0xFF])
        body += varint(self.width) + varint(self.height)
        if self.version == 2:
            body += bytes([self.background[0] & 0xFF, self.background[1] & 0xFF]) + varint(len(self.regions))
            body += b"".join(varint(v) for region in self.regions for v in region)
        return fix_learned_checksum(body + self.payload + b"\0\0\0\0")


def _mutate_fields(f: _Fields, rng: random.Random, others: Sequence[Seed]) -> None:
    for _ in range(rng.randint(1, 3)):
        what = rng.randrange(9)
        if what == 0:
            f.version = rng.choice((1, 2, 2, 0, 3, 255))
        elif what == 1:
            f.quality = rng.choice((0, 1, 2, 3, 4, 5, 6, 255))
        elif what == 2:
            f.width = _side(rng, f.width)
        elif what == 3:
            f.height = _side(rng, f.height)
        elif what == 4:
            f.background = (rng.choice((0, 1, 2, 5, 6, 255)), rng.choice((0, 1, 2, 3, 255)))
        elif what == 5 and f.regions:
            region = rng.choice(f.regions)
            i = rng.randrange(4)
            region[i] = _cell(rng, region[i])
        elif what == 6:
            count = rng.choice((0, 1, 2, 3, 256, 257, 300))
            f.regions = [[_cell(rng, 0), _cell(rng, 0), _cell(rng, 4), _cell(rng, 4)] for _ in range(count)]
        elif what == 7:
            f.payload = rng.choice(others).data[14:-4] if others and rng.random() < 0.5 else mutate_bytes(f.payload or b"\0", rng, ())
        else:
            f.tag = bytes(rng.getrandbits(8) for _ in range(4))


def mutate_header(data: bytes, rng: random.Random, others: Sequence[Seed]) -> bytes:
    """A valid learned-codec stream with some of its header's fields rewritten (checksum fixed)."""
    from facelink.runtime.codecs import bitstream

    header, payload = bitstream.unpack(data)
    regions = [[r.x0, r.y0, r.x1, r.y1] for r in header.regions] or [[0, 0, 1, 1]]
    background = header.background or bitstream.Background(1, 1)
    fields = _Fields(header.version, header.codec_tag, header.quality, header.width, header.height,
                     (background.quality, background.step), regions, payload)
    _mutate_fields(fields, rng, others)
    return fields.pack()


def _jpeg_size_offset(data: bytes) -> int | None:
    """Where a JPEG's SOFn frame header keeps its height and width (big-endian u16 each)."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return pos + 5
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    return None


def mutate_dimensions(data: bytes, rng: random.Random) -> bytes:
    """A JPEG, PNG or WebP whose header claims another size (a decompression bomb, or a lie)."""
    b = bytearray(data)
    width, height = (rng.choice((0, 1, 255, 4097, 16383, 30000, 65535)) for _ in range(2))
    if b.startswith(b"\x89PNG") and len(b) >= 24:
        b[16:24] = struct.pack(">II", width if rng.random() < 0.9 else rng.getrandbits(32), height)
        return fix_png_crcs(bytes(b))
    if b.startswith(b"\xff\xd8"):
        offset = _jpeg_size_offset(data)
        if offset is not None and offset + 4 <= len(b):
            b[offset : offset + 4] = struct.pack(">HH", height, width)
        return bytes(b)
    if b[:4] == b"RIFF" and b[8:12] == b"WEBP" and len(b) >= 30:
        if b[12:16] == b"VP8 ":
            b[26:30] = struct.pack("<HH", width & 0x3FFF, height & 0x3FFF)
        elif b[12:16] == b"VP8L":
            bits = ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14) | (struct.unpack("<I", b[21:25])[0] & ~0xFFFFFFF)
            b[21:25] = struct.pack("<I", bits & 0xFFFFFFFF)
    return bytes(b)


# -- inputs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FuzzInput:
    index: int
    target: str
    kind: str
    data: bytes
    max_pixels: int | None


def _random_input(rng: random.Random, targets: Sequence[str], learned: Sequence[Seed]) -> tuple[str, str, bytes]:
    from facelink.runtime.codecs.bitstream import MAGIC

    target = rng.choice(targets)
    length = rng.choice((0, 1, 4, 13, 14, 15, 17, 20, 64, 300, 2000))
    noise = bytes(rng.getrandbits(8) for _ in range(length))
    if learned and target.startswith("flc-") and rng.random() < 0.7:
        seed = rng.choice([s for s in learned if s.target == target] or learned)
        prefix = MAGIC + bytes([rng.choice((1, 2))]) + seed.data[3:7]
        return target, "random behind a learned header", fix_learned_checksum(prefix + noise + b"\0\0\0\0")
    return target, "random bytes", noise


def make_input(index: int, seeds: Sequence[Seed], base_seed: int = 0, budgets: Sequence[int | None] = BUDGETS) -> FuzzInput:
    """Input `index` of a run: a function of (base_seed, index) and the seeds only."""
    rng = random.Random(base_seed * (1 << 40) + index)
    budget = rng.choice(budgets)
    targets = sorted({s.target for s in seeds})
    learned = [s for s in seeds if s.target.startswith("flc-")]
    if rng.random() < 0.06:
        target, kind, data = _random_input(rng, targets, learned)
        return FuzzInput(index, target, kind, data, budget)
    seed = rng.choice(seeds)
    target = seed.target if rng.random() > 0.03 else rng.choice(targets)  # now and then, another decoder's bytes
    is_learned = seed.target.startswith("flc-")
    choice = rng.random()
    if is_learned and choice < 0.3:
        kind, data = "header", mutate_header(seed.data, rng, learned)
    elif not is_learned and choice < 0.15:
        kind, data = "dimensions", mutate_dimensions(seed.data, rng)
    else:
        kind, data = "bytes", mutate_bytes(seed.data, rng, seeds)
        if is_learned and rng.random() < 0.97:
            data = fix_learned_checksum(data)
        elif seed.data.startswith(b"\x89PNG") and rng.random() < 0.7:
            data = fix_png_crcs(data)
    return FuzzInput(index, target, f"{kind} of {seed.target} {seed.kind}", data, budget)


# -- decoding --------------------------------------------------------------------------------
class Decoders:
    """One decoder per target, built on first use (a worker builds its own)."""

    def __init__(self) -> None:
        from facelink.runtime.codecs import available_codecs

        self._infos = available_codecs()
        self._codecs: dict[str, Any] = {}

    def decode(self, target: str, data: bytes, max_pixels: int | None) -> np.ndarray:
        from facelink.runtime.codecs import decode_image

        budget = {} if max_pixels is None else {"max_pixels": max_pixels}
        if target == IMAGE_TARGET:
            return decode_image(data, what="image payload", max_side=IMAGE_MAX_SIDE, **budget)
        codec = self._codecs.get(target)
        if codec is None:
            info = self._infos[target]
            codec = self._codecs[target] = info.create(info.default_quality)
        return codec.decode(data, **budget)

    def outcome(self, item: FuzzInput) -> tuple[str, str]:
        """(outcome, detail): DECODED, CODEC_ERROR, or the type of any other exception."""
        from facelink.runtime.codecs import CodecError

        try:
            image = self.decode(item.target, item.data, item.max_pixels)
        except CodecError as error:
            return CODEC_ERROR, str(error)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # noqa: BLE001 - what the fuzzer is for; Rust panics are BaseException
            return f"{type(error).__module__}.{type(error).__qualname__}", str(error)[:500]
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            return "bad output", f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
        if item.max_pixels is not None and image.shape[0] * image.shape[1] > item.max_pixels:
            return "over budget", f"{image.shape[1]}x{image.shape[0]} decoded under a budget of {item.max_pixels} pixels"
        return DECODED, ""


# -- the run ---------------------------------------------------------------------------------
@dataclass
class Tally:
    """What a chunk (or the whole run) found."""

    inputs: int = 0
    outcomes: Counter = field(default_factory=Counter)
    by_target: dict[str, Counter] = field(default_factory=dict)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    slowest: tuple[float, int, str] = (0.0, -1, "")
    max_rss_mb: float = 0.0

    def add(self, item: FuzzInput, outcome: str, detail: str, seconds: float) -> None:
        self.inputs += 1
        self.outcomes[outcome] += 1
        self.by_target.setdefault(item.target, Counter())[outcome] += 1
        if outcome not in (DECODED, CODEC_ERROR) and len(self.examples.setdefault(outcome, [])) < EXAMPLES_PER_KIND:
            self.examples[outcome].append(
                {"index": item.index, "target": item.target, "kind": item.kind, "max_pixels": item.max_pixels,
                 "message": detail, "data_b64": base64.b64encode(item.data[:4096]).decode()}
            )
        if seconds > self.slowest[0]:
            self.slowest = (seconds, item.index, f"{item.target}: {item.kind}")

    def merge(self, other: Tally) -> None:
        self.inputs += other.inputs
        self.outcomes.update(other.outcomes)
        for target, counts in other.by_target.items():
            self.by_target.setdefault(target, Counter()).update(counts)
        for kind, examples in other.examples.items():
            mine = self.examples.setdefault(kind, [])
            mine.extend(examples[: EXAMPLES_PER_KIND - len(mine)])
        self.slowest = max(self.slowest, other.slowest)
        self.max_rss_mb = max(self.max_rss_mb, other.max_rss_mb)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _worker(slot: int, tasks: mp.Queue, results: mp.Queue, current: Any, started: Any, seeds: list[Seed],
            base_seed: int, budgets: tuple[int | None, ...], memory_limit_mb: int, quiet: bool) -> None:
    """Decodes chunks of indices; `current`/`started` tell the watchdog what it is on since when."""
    if quiet:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
    if memory_limit_mb:
        # An allocation past this fails inside the decoder, so it shows up as an exception here
        # instead of the machine swapping.
        limit = memory_limit_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the run
    decoders = Decoders()
    while True:
        task = tasks.get()
        if task is None:
            return
        start, stop = task
        tally = Tally()
        for index in range(start, stop):
            item = make_input(index, seeds, base_seed, budgets)
            current.value, started.value = index, time.monotonic()
            outcome, detail = decoders.outcome(item)
            seconds = time.monotonic() - started.value
            current.value = -1
            tally.add(item, outcome, detail, seconds)
        tally.max_rss_mb = _peak_rss_mb()
        results.put((slot, start, stop, tally))


def _recheck_one(item: FuzzInput, answer: Any) -> None:
    """Decodes one input twice in a fresh process (the first run builds the decoder) and sends
    back the outcome and the second run's time."""
    decoders = Decoders()
    decoders.outcome(item)
    started = time.monotonic()
    outcome, _ = decoders.outcome(item)
    answer.send((outcome, time.monotonic() - started))


@dataclass
class _Slot:
    process: Any
    tasks: Any
    current: Any
    started: Any
    task: tuple[int, int] | None = None


@dataclass
class RunConfig:
    inputs: int
    workers: int = 2
    seed: int = 0
    hang_seconds: float = 2.0
    duration: float | None = None  # stop after this many seconds, whatever is left
    budgets: tuple[int | None, ...] = BUDGETS
    memory_limit_mb: int = 6144
    save_dir: Path | None = DEFAULT_SAVE_DIR
    quiet_native: bool = False
    progress_every: float = 30.0
    on_progress: Callable[[dict[str, Any]], None] | None = None


class Fuzzer:
    """The parent: hands out chunks, watches the workers, and keeps the tally."""

    def __init__(self, config: RunConfig, seeds: list[Seed]) -> None:
        self.config = config
        self.seeds = seeds
        self.context = mp.get_context("spawn")  # no ONNX Runtime or OpenCV state crosses a fork
        self.results = self.context.Queue()
        self.pending: deque[tuple[int, int]] = deque(
            (start, min(start + CHUNK, config.inputs)) for start in range(0, config.inputs, CHUNK)
        )
        self.tally = Tally()
        self.hangs: list[dict[str, Any]] = []
        self.crashes: list[dict[str, Any]] = []
        self.slots: list[_Slot] = []
        self.startup_failures = 0
        self.started_at = time.monotonic()

    # -- workers -------------------------------------------------------------------------------
    def _spawn(self, slot: int) -> _Slot:
        c = self.config
        tasks = self.context.Queue()
        current, started = self.context.Value("q", -1, lock=False), self.context.Value("d", 0.0, lock=False)
        process = self.context.Process(
            target=_worker, daemon=True,
            args=(slot, tasks, self.results, current, started, self.seeds, c.seed, c.budgets, c.memory_limit_mb, c.quiet_native),
        )
        process.start()
        return _Slot(process, tasks, current, started)

    def _assign(self, slot: _Slot) -> None:
        if slot.task is None and self.pending and not self._out_of_time():
            slot.task = self.pending.popleft()
            slot.tasks.put(slot.task)

    def _out_of_time(self) -> bool:
        return self.config.duration is not None and time.monotonic() - self.started_at > self.config.duration

    def _record(self, bucket: list[dict[str, Any]], index: int, what: str, seconds: float | None) -> None:
        item = make_input(index, self.seeds, self.config.seed, self.config.budgets)
        entry = {"index": index, "target": item.target, "kind": item.kind, "max_pixels": item.max_pixels,
                 "seconds": seconds, "bytes": len(item.data), "data_b64": base64.b64encode(item.data).decode()}
        if self.config.save_dir is not None:
            self.config.save_dir.mkdir(parents=True, exist_ok=True)
            path = self.config.save_dir / f"{what}-seed{self.config.seed}-{index}.bin"
            path.write_bytes(item.data)
            entry["file"] = str(path)
        bucket.append(entry)
        self.tally.inputs += 1
        self.tally.outcomes[what] += 1
        self.tally.by_target.setdefault(item.target, Counter())[what] += 1

    def _replace(self, i: int, index: int, what: str, seconds: float | None) -> None:
        """A worker that hung or died on input `index`: record it, requeue the rest of its chunk."""
        slot = self.slots[i]
        if slot.process.is_alive():
            slot.process.kill()
        slot.process.join()
        self._record(self.hangs if what == "hang" else self.crashes, index, what, seconds)
        assert slot.task is not None
        start, stop = slot.task
        # The chunk's tally died with the worker: decode its other inputs again (they are
        # deterministic) in two chunks around the one recorded.
        for part in ((start, index), (index + 1, stop)):
            if part[0] < part[1]:
                self.pending.appendleft(part)
        self.slots[i] = self._spawn(i)

    def _watch(self) -> None:
        now = time.monotonic()
        for i, slot in enumerate(self.slots):
            index = slot.current.value
            if slot.task is None:
                continue
            if index >= 0 and now - slot.started.value > self.config.hang_seconds:
                self._replace(i, index, "hang", round(now - slot.started.value, 2))
            elif not slot.process.is_alive():
                if index >= 0:
                    self._replace(i, index, "crash", None)
                else:
                    self._restart(i)

    def _restart(self, i: int) -> None:
        """A worker that died between inputs (at start-up: an import error, no memory): no input
        is to blame, so its chunk goes back to the queue; one that keeps dying stops the run."""
        slot = self.slots[i]
        slot.process.join()
        self.startup_failures += 1
        if self.startup_failures > MAX_STARTUP_FAILURES:
            raise RuntimeError(f"fuzz workers keep dying outside any input (exit code {slot.process.exitcode}); "
                               "run one by hand: python -c 'import facelink.benchmarks.fuzz_codecs'")
        if slot.task is not None:
            self.pending.appendleft(slot.task)
        self.slots[i] = self._spawn(i)

    def _collect(self, timeout: float) -> None:
        try:
            slot, start, stop, tally = self.results.get(timeout=timeout)
        except queue.Empty:
            return
        if self.slots[slot].task == (start, stop):
            self.slots[slot].task = None
            self.tally.merge(tally)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.slots = [self._spawn(i) for i in range(self.config.workers)]
        last_progress = time.monotonic()
        interrupted = False
        try:
            while self.pending or any(s.task is not None for s in self.slots):
                if self._out_of_time() and all(s.task is None for s in self.slots):
                    break
                for slot in self.slots:
                    self._assign(slot)
                self._collect(timeout=0.1)
                self._watch()
                if time.monotonic() - last_progress > self.config.progress_every:
                    last_progress = time.monotonic()
                    if self.config.on_progress:
                        self.config.on_progress(self.summary("running"))
        except KeyboardInterrupt:
            interrupted = True
        finally:
            self._stop()
        if not interrupted:
            for hang in self.hangs:
                self._recheck(hang)
        status = "interrupted" if interrupted else ("stopped at --duration" if self.tally.inputs < self.config.inputs else "complete")
        return self.summary(status)

    def _recheck(self, hang: dict[str, Any]) -> None:
        """Decodes a hang's input again, alone: on a busy machine a decode of milliseconds can
        wait seconds for a core. Confirmed unless it then finishes within --hang-seconds."""
        item = make_input(hang["index"], self.seeds, self.config.seed, self.config.budgets)
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(target=_recheck_one, args=(item, send), daemon=True)
        process.start()
        # Start-up (imports, the decoder's session) plus two decodes, each allowed 5x the limit.
        answered = receive.poll(RECHECK_STARTUP_SECONDS + 10 * self.config.hang_seconds)
        if answered:
            outcome, seconds = receive.recv()
            hang["recheck"] = {"outcome": outcome, "seconds": round(seconds, 3)}
            hang["confirmed"] = seconds > self.config.hang_seconds
        else:
            hang["recheck"] = {"outcome": "no answer" if process.is_alive() else f"died ({process.exitcode})"}
            hang["confirmed"] = True
        if process.is_alive():
            process.kill()
        process.join()

    def _stop(self) -> None:
        for slot in self.slots:
            if slot.process.is_alive():
                slot.tasks.put(None)
        deadline = time.monotonic() + 5
        for slot in self.slots:
            slot.process.join(max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()

    def summary(self, status: str) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started_at
        t = self.tally
        others = {k: v for k, v in t.outcomes.items() if k not in (DECODED, CODEC_ERROR, "hang", "crash")}
        return {
            "status": status,
            "inputs_requested": self.config.inputs,
            "inputs": t.inputs,
            "seconds": round(elapsed, 1),
            "decodes_per_s": round(t.inputs / elapsed, 1) if elapsed else None,
            "decoded": t.outcomes[DECODED],
            "codec_errors": t.outcomes[CODEC_ERROR],
            "other_exceptions": dict(sorted(others.items())),
            "hangs": self.hangs,
            "hangs_confirmed": sum(bool(h.get("confirmed", True)) for h in self.hangs),
            "crashes": self.crashes,
            "max_rss_mb": round(t.max_rss_mb, 1),
            "slowest": {"seconds": round(t.slowest[0], 3), "index": t.slowest[1], "input": t.slowest[2]},
            "by_target": {k: dict(sorted(v.items())) for k, v in sorted(t.by_target.items())},
            "examples": t.examples,
        }


def run_fuzz(config: RunConfig, seeds: list[Seed] | None = None) -> dict[str, Any]:
    """Fuzzes `config.inputs` inputs made from `seeds` (default: `default_seeds()`)."""
    return Fuzzer(config, seeds if seeds is not None else default_seeds()).run()


# -- the report ------------------------------------------------------------------------------
def format_report(payload: dict[str, Any]) -> str:
    r = payload["result"]
    others = ", ".join(f"{k}: {v}" for k, v in r["other_exceptions"].items()) or "none"
    rows = [
        [target, str(sum(counts.values())), str(counts.get(DECODED, 0)), str(counts.get(CODEC_ERROR, 0)),
         str(sum(v for k, v in counts.items() if k not in (DECODED, CODEC_ERROR)))]
        for target, counts in r["by_target"].items()
    ]
    return "\n".join([
        f"command: {payload['command']}",
        f"{reporting.machine_line(payload['machine'])}; date: {payload['date']}",
        "",
        *reporting.markdown_table(["target", "inputs", "decoded", "CodecError", "other / hang / crash"], rows),
        "",
        f"{r['status']}: {r['inputs']:,} of {r['inputs_requested']:,} inputs in {r['seconds']:.0f} s "
        f"({r['decodes_per_s']} decodes/s, {payload['workers']} workers); decoded {r['decoded']:,}, "
        f"CodecError {r['codec_errors']:,}; other exceptions: {others}; hangs (> {payload['hang_seconds']} s): "
        f"{r['hangs_confirmed']} ({len(r['hangs']) - r['hangs_confirmed']} more were slow once, not when run "
        f"again alone); crashes: {len(r['crashes'])}; peak worker RSS {r['max_rss_mb']:.0f} MB; "
        f"slowest input {r['slowest']['seconds']} s ({r['slowest']['input']})",
    ])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m facelink.benchmarks.fuzz_codecs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", type=int, default=100_000, help="how many inputs to decode (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the run's seed: input i is a function of (seed, i)")
    p.add_argument("--workers", type=int, default=reporting.cpu_count(), help="decoding processes (default: one per core)")
    p.add_argument("--hang-seconds", type=float, default=2.0, help="an input that takes longer is a hang (default: %(default)s)")
    p.add_argument("--duration", type=float, help="stop after this many seconds and record how many inputs were done")
    p.add_argument("--memory-limit-mb", type=int, default=6144, help="address-space limit per worker; 0: none")
    p.add_argument("--lfw", type=int, default=4, help="LFW faces among the seed pictures, when ../shared has LFW")
    p.add_argument("--save-dir", type=Path, default=DEFAULT_SAVE_DIR, help="where hangs' and crashes' bytes go")
    p.add_argument("--quiet-native", action="store_true", help="silence the workers' stderr (OpenCV's libraries' chatter)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file (default: %(default)s)")
    return p


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = reporting.bench_argv(argv)
    args = build_parser().parse_args(argv)
    # A long run is started with nohup in the background, where SIGINT is ignored: SIGTERM or
    # SIGINT stop it the same way, with the workers stopped and the JSON written.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    command = shlex.join(["python", "-m", "facelink.benchmarks.fuzz_codecs", *argv])
    seeds = default_seeds(lfw=args.lfw)
    payload: dict[str, Any] = {
        "benchmark": "fuzz_codecs",
        "command": command,
        "date": reporting.utc_now(),
        "machine": reporting.machine_info(),
        "seed": args.seed,
        "workers": args.workers,
        "hang_seconds": args.hang_seconds,
        "budgets": list(BUDGETS),
        "seeds": dict(sorted(Counter(f"{s.target} {s.kind.split()[0]}" for s in seeds).items())),
    }

    def progress(result: dict[str, Any]) -> None:
        print(f"[{result['seconds']:.0f} s] {result['inputs']:,} inputs, {result['decodes_per_s']}/s, other exceptions "
              f"{result['other_exceptions']}, hangs {len(result['hangs'])}, crashes {len(result['crashes'])}",
              file=sys.stderr, flush=True)
        reporting.write_results(args.json, {**payload, "result": result})  # a long run leaves a record as it goes

    config = RunConfig(args.inputs, args.workers, args.seed, args.hang_seconds, args.duration,
                       memory_limit_mb=args.memory_limit_mb, save_dir=args.save_dir, quiet_native=args.quiet_native,
                       on_progress=progress)
    payload["result"] = Fuzzer(config, seeds).run()
    print(format_report(payload))
    reporting.write_results(args.json, payload)
    print(f"wrote {args.json}")
    r = payload["result"]
    return 0 if not (r["other_exceptions"] or r["hangs_confirmed"] or r["crashes"]) else 1


if __name__ == "__main__":
    sys.exit(main())
