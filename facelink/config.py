"""All of facelink's configuration, in one typed place.

Every knob a user can turn lives in one of the models below; command-line flags and
environment variables only fill them in. Paths to data that is not ours (../shared, LFW) are
resolved here and nowhere else, so there is one rule for where things are looked up:
an explicit argument, then an environment variable, then the default beside the repository.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from facelink.transport import ClientSecurity  # StreamConfig.security; transport imports no config

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Environment variables read by facelink (and only these).
ENV_SHARED = "FACELINK_SHARED"  # folder with data/ and models/ (default: ../shared beside the repo)
ENV_DATA = "FACELINK_DATA"      # an LFW folder (default: $FACELINK_SHARED/data/lfw)
ENV_CACHE = "FACELINK_CACHE"    # downloads and caches (default: ~/.cache/facelink)
# FACELINK_TOKEN (facelink.transport.ENV_TOKEN): the bearer token a client sends when no --token-file is given
#: The bundled query model: what `embedding` payloads carry by default and the benchmarks measure.
DEFAULT_QUERY_MODEL = "facelink-query-v9"


def shared_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The shared data/models folder: `override`, then $FACELINK_SHARED, then ../shared."""
    if override is not None:
        return Path(override).expanduser().resolve()
    if os.environ.get(ENV_SHARED):
        return Path(os.environ[ENV_SHARED]).expanduser().resolve()
    return (REPO_ROOT.parent / "shared").resolve()


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "facelink").expanduser()


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackendConfig(_Config):
    """How ONNX models are run (ONNX Runtime today; TensorRT where present).

    `providers`: ONNX Runtime execution providers in order of preference, each a full provider
    name optionally followed by its options ("TensorrtExecutionProvider:trt_fp16_enable=1");
    `facelink edge --providers tensorrt,cuda,cpu` fills them in from short names
    (runtime/backends/onnxruntime_backend.py: `providers_from_names`).
    """

    intra_op_threads: int = Field(1, ge=0, description="threads per model; 0 lets ONNX Runtime decide")
    providers: tuple[str, ...] = Field(("CPUExecutionProvider",), min_length=1)


class CanonicalCrop(_Config):
    """The one aligned crop the edge sends per face.

    It is the ArcFace 112x112 template scaled by `scale` and centred in a `size` x `size`
    square. With the defaults (128 px, scale 1) it holds the ArcFace crop with an 8-pixel
    border and the whole region of dlib's 150x150 face chip (which reaches further below the
    mouth), so the cloud can re-warp it to any recogniser's template from the landmarks that
    travel with it.
    """

    size: int = Field(128, ge=64, le=512)
    scale: float = Field(1.0, gt=0.5, le=4.0)


class CropRegionCoding(_Config):
    """Canonical crops coded by the learned codec with the outer ring of latent cells coarser
    (bitstream v2).

    The crop is aligned, so where the face is is known without a detector: with the default
    128 px crop, the ring of 16 px cells along its edges holds the 8 px margin and the ArcFace
    crop's own edges (hair, background, the sides of the cheeks), which recognisers weigh
    least. Coded at quality 1 it frees bytes for the face; at equal identity the crop costs
    fewer bytes (`facelink bench rate-accuracy -- --protocols edge --face-aware wide`).
    """

    background_quality: int = Field(1, ge=1, description="the rate point whose table codes the ring")
    background_step: int = Field(1, ge=1, le=255, description="the ring's quantisation step, in that rate point's steps")
    border_cells: int = Field(1, ge=1, description="width of the ring, in latent cells (16 px each)")


class FaceRegionCoding(_Config):
    """Whole pictures coded by the learned codec with the bits on the faces (bitstream v2).

    The region of each detected face that the edge would send as its canonical crop is coded at
    the codec's quality, the rest of the picture at a coarse background level: the cloud still
    gets the whole picture to detect in, and most of the bytes go where recognition looks.
    Why a coarse background rather than none: in a scratch comparison on LFW pictures (no code
    kept) leaving the background uncoded lost clearly more identity (the detector that finds the
    face again on the reconstruction, and the decoder near the crop's edges, see the face's
    surroundings too), while twice quality 1's step cost little identity for fewer bytes than
    quality 1 itself. What the defaults give is measured by
    `facelink bench rate-accuracy -- --protocols full --face-aware wide`.
    """

    background_quality: int = Field(1, ge=1, description="the rate point whose table codes the background")
    background_step: int = Field(2, ge=1, le=255, description="the background's quantisation step, in that rate point's steps")
    margin: float = Field(0.0, ge=0.0, description="pixels added on every side of each face's crop")
    crop: CanonicalCrop = CanonicalCrop()


class DetectorConfig(_Config):
    """The face detector (runtime/detection).

    kind: `auto` takes YuNet if its model is present, else dlib's HOG. YuNet runs one of two ways,
    with the same decoding (priors, boxes, landmarks, scores, NMS; equal within float rounding):
    OpenCV's `cv2.FaceDetectorYN` (CPU), or ONNX Runtime (`yunet-ort`) with `backend.providers`,
    which is how it reaches a GPU (CUDA, TensorRT). `auto` and `yunet` pick ONNX Runtime when the
    first provider is not the CPU's, and OpenCV otherwise, so CPU-only installs run as before;
    `yunet-ort` always takes ONNX Runtime, on whatever providers are given.

    detect_size: frames whose longest side is longer are scaled down to it (aspect kept) for
    detection only; boxes and landmarks are mapped back to the frame's pixels, and alignment
    crops from the full-resolution frame. 0 detects at full resolution.
    """

    kind: Literal["auto", "yunet", "yunet-ort", "dlib"] = "auto"
    score_threshold: float = Field(0.6, ge=0.0, le=1.0)
    nms_threshold: float = Field(0.3, ge=0.0, le=1.0)
    min_face_size: int = Field(20, ge=0, description="faces smaller than this (px, box side, full resolution) are ignored")
    max_faces: int = Field(16, ge=1)
    detect_size: int = Field(
        640, ge=0, description="longest side the detector sees; larger frames are scaled down for detection (0: full resolution)"
    )
    backend: BackendConfig = Field(BackendConfig(), description="ONNX Runtime providers of the YuNet ONNX Runtime path")

    @model_validator(mode="after")
    def _sizes(self) -> DetectorConfig:
        if 0 < self.detect_size < 64:
            raise ValueError(f"detect_size must be 0 (full resolution) or at least 64 px, not {self.detect_size}")
        return self


class StreamConfig(_Config):
    """The device's link to the server."""

    server: str = "localhost:50051"
    camera_id: str = "camera-0"
    queue_size: int = Field(256, ge=1, description="faces buffered on the device while the link is busy or down")
    overflow: Literal["block", "drop_oldest"] = Field(
        "block", description="when the queue is full: block the producer (files) or drop the oldest face (live cameras)"
    )
    max_in_flight: int = Field(8, ge=1, description="faces sent but not yet answered")
    reconnect_initial_s: float = Field(0.2, gt=0)
    reconnect_max_s: float = Field(10.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)
    face_timeout_s: float = Field(
        10.0, gt=0,
        description="how long a face on the wire may wait for its answer while the link is up; past it the stream "
        "is taken as stuck, cancelled and the face resent once on a new stream; unanswered again, it is reported "
        "REJECTED with DEADLINE_EXCEEDED",
    )
    security: ClientSecurity = Field(
        ClientSecurity(), description="TLS, mutual TLS and bearer token of the link (facelink.transport)"
    )


class TrackPolicy(_Config):
    """Which shots of a track the edge sends, and when a track is over (edge/tracks.py).

    A *track* is one person followed across frames by the tracker; a *shot* is one face of that
    track in one frame. Sending every shot costs 150-250 observations per appearance and decides
    no better than a few good ones: the cloud answers each shot alone, the edge pools the answers.
    """

    send: Literal["best", "first", "every"] = Field(
        "best",
        description="best: after a short look (best_window_s) the track's best shot so far, then a clearly better one "
        "(better_by), or another look while the track is not a MATCH, at most every resend_after_s, up to "
        "max_shots; first: the first shot over min_quality only; "
        "every: every shot over min_quality (one observation per face and frame)",
    )
    max_shots: int = Field(3, ge=1, description="shots sent per track at most (send=best)")
    resend_after_s: float = Field(
        2.0, ge=0, description="send=best: a better shot is sent only this long after the track's last one"
    )
    better_by: float = Field(0.1, ge=0, le=1, description="send=best: how much higher a shot's quality must be to be resent")
    min_quality: float = Field(0.2, ge=0, le=1, description="shots below this quality (edge/quality.py) are never sent")
    best_window_s: float = Field(
        0.4, ge=0,
        description="send=best: how long a new track is watched before its first shot goes out (the best of that window)",
    )
    lost_frames: int = Field(10, ge=0, description="a track unseen for more than this many frames has ended")
    lost_s: float = Field(2.0, gt=0, description="a track unseen for this long (capture time) has ended")
    iou_threshold: float = Field(0.3, gt=0, le=1, description="the tracker's box overlap to continue a track")


class LiveSourceConfig(_Config):
    """How a live source (camera, RTSP, GStreamer pipeline) is read: never fall behind, never give up."""

    fps: float | None = Field(
        None, gt=0, description="frames a second processed at most (None: as fast as the edge keeps up); the rest dropped"
    )
    reconnect_initial_s: float = Field(0.5, gt=0, description="first wait before reopening a lost camera")
    reconnect_max_s: float = Field(
        5.0, gt=0, description="longest wait between attempts (doubling up to it): a camera back is used within it"
    )


class EventsConfig(_Config):
    """Where the edge sends its track events (edge/events.py). Nothing set: no events."""

    jsonl: str | None = Field(None, description='JSON lines to this file (appended), or "-" for stdout')
    webhook_url: str | None = Field(None, description="POST each event here (https://, or http:// on loopback)")
    webhook_secret_file: Path | None = Field(None, description="file holding the webhook's HMAC secret")
    mqtt_host: str | None = Field(None, description="MQTT broker host")
    mqtt_port: int | None = Field(None, ge=1, le=65535, description="default 1883, or 8883 with TLS")
    mqtt_topic_prefix: str = Field("facelink", description="topics are <prefix>/<camera>/...")
    mqtt_username: str | None = None
    mqtt_password_file: Path | None = Field(None, description="file holding the MQTT password")
    mqtt_tls_ca: Path | None = Field(None, description="CA bundle of the broker's certificate; turns TLS on")

    @model_validator(mode="after")
    def _complete(self) -> EventsConfig:
        if self.webhook_url and not self.webhook_secret_file:
            raise ValueError("webhook_url needs webhook_secret_file: every request is signed with that secret")
        if self.webhook_secret_file and not self.webhook_url:
            raise ValueError("webhook_secret_file is set but webhook_url is not")
        if self.mqtt_password_file and not self.mqtt_username:
            raise ValueError("mqtt_password_file needs mqtt_username")
        mqtt_options = (self.mqtt_username, self.mqtt_password_file, self.mqtt_tls_ca, self.mqtt_port)
        if not self.mqtt_host and any(o is not None for o in mqtt_options):
            raise ValueError("MQTT options are set but mqtt_host is not")
        prefix = self.mqtt_topic_prefix.strip("/")
        # The same rule as edge/events.py's MqttSink (which checks it again): no wildcards, no '$'.
        if not prefix or prefix.startswith("$") or any(c in "+#%" or ord(c) < 32 for c in prefix):
            raise ValueError(
                f"MQTT topic prefix {self.mqtt_topic_prefix!r} must be non-empty, without '+', '#', '%' or control "
                "characters, and must not start with '$'"
            )
        return self

    @property
    def any(self) -> bool:
        return bool(self.jsonl or self.webhook_url or self.mqtt_host)


class EdgeConfig(_Config):
    detector: DetectorConfig = DetectorConfig()
    crop: CanonicalCrop = CanonicalCrop()
    faces: Literal["all", "largest", "central"] = Field(
        "all", description="which faces of a frame to send: all, the largest, or the one nearest the centre"
    )
    payload: Literal["face", "embedding"] = Field(
        "face",
        description="face: send the coded canonical crop (the cloud runs its large recognisers on it); "
        "embedding: send the query model's embedding of the face (a few hundred bytes at most, "
        "matched against the gallery through the query model's ensemble)",
    )
    # The learned codec, the crop's border ring at quality 1 and the face at the bundle's
    # `border_ring_quality` (5 for `default`): LFW verification within 0.3 points of the original
    # pictures with MobileFaceNet and dlib's ResNet at ~1.1 kB per face, 4.4x fewer bytes than
    # JPEG q90, and more identity kept than the whole crop at its default quality 4 (1.16 kB;
    # benchmarks/results/rate_accuracy.json, `learned:default+faces`).
    codec: str = Field("learned", description="payload codec id: learned, jpeg, webp, png (see `facelink edge --help`)")
    quality: int | None = Field(
        None, ge=1, le=100, description="codec quality; None: the codec's default (90 for jpeg/webp, the bundle's for learned)"
    )
    crop_border: CropRegionCoding | None = Field(
        CropRegionCoding(), description="learned codecs: the crop's border ring of latent cells at this coarser level "
        "(None: the whole crop at the quality)",
    )
    query_model: str = Field(
        DEFAULT_QUERY_MODEL, description="the query model (manifest name or path) of `embedding` payloads"
    )
    embedding_dtype: Literal["float32", "float16", "int8"] = Field(
        "int8", description="how an embedding travels: int8 (one byte per dimension and a scale) costs no accuracy"
    )
    stream: StreamConfig = StreamConfig()
    backend: BackendConfig = BackendConfig()
    tracks: TrackPolicy = TrackPolicy()
    live: LiveSourceConfig = LiveSourceConfig()
    events: EventsConfig = EventsConfig()
    drain_timeout_s: float = Field(
        10.0, gt=0, description="on SIGTERM/SIGINT or the source's end: how long in-flight faces and sinks may take"
    )


class CameraSpec(_Config):
    """One camera of a multi-camera edge (`facelink edge --config cameras.yaml`).

    Anything not given here is the command line's (or its defaults'): a camera only says what
    differs from its neighbours.
    """

    source: str = Field(min_length=1, description="camera index, RTSP/HTTP URL, GStreamer pipeline, video or folder")
    camera_id: str = Field(min_length=1, max_length=128)
    stride: int = Field(1, ge=1)
    max_frames: int | None = Field(None, ge=0)
    faces: Literal["all", "largest", "central"] | None = None
    tracks: TrackPolicy | None = None
    live: LiveSourceConfig | None = None


class CamerasFile(_Config):
    """The file `facelink edge --config` reads (YAML or JSON): ``cameras: [{source, camera_id, ...}, ...]``."""

    cameras: tuple[CameraSpec, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> CamerasFile:
        ids = [c.camera_id for c in self.cameras]
        if len(set(ids)) != len(ids):
            raise ValueError(f"camera ids must be unique, got {ids}")
        return self


class CloudSecurity(_Config):
    """Transport and credentials of the service (docs/security.md has the threat model).

    No anonymous access: every call but health checks needs a bearer token (`facelink cloud
    token create`) or a client certificate signed by `client_ca`. TLS is required on any
    address but loopback unless `insecure` says otherwise, out loud.
    """

    tls_cert: Path | None = Field(None, description="server certificate chain (PEM)")
    tls_key: Path | None = Field(None, description="its private key (PEM)")
    client_ca: Path | None = Field(None, description="CA of device certificates: mutual TLS, every client shows one")
    insecure: bool = Field(False, description="allow plaintext on a non-loopback address (never in production)")
    auth_file: Path | None = Field(None, description="tokens and certificate grants (default: GALLERY/auth.json)")
    audit_file: Path | None = Field(None, description="append-only audit log (default: GALLERY/audit.jsonl)")
    reflection: bool = Field(False, description="serve gRPC reflection (admin scope only)")
    score_step: float = Field(
        0.05, gt=0, le=1, description="principals without the `scores` scope see MATCH scores rounded to this step"
    )


class ServiceLimits(_Config):
    """What one client may cost the service. Past a limit a call or face gets RESOURCE_EXHAUSTED
    at once (with a retry delay where waiting helps), never a silent wait."""

    max_streams: int = Field(512, ge=1, description="Recognize streams open at once, all clients together")
    max_in_flight_per_stream: int = Field(
        32, ge=1, description="faces of one stream received and not yet answered; more are answered RESOURCE_EXHAUSTED"
    )
    max_pending_faces: int = Field(
        1024, ge=1, description="faces being decoded or recognised, all streams together; past it streams are read slower"
    )
    stream_idle_timeout_s: float = Field(600.0, gt=0, description="a stream that sends nothing for this long is closed")
    face_rate: float = Field(200.0, ge=0, description="faces a second per principal, on average (0: no limit)")
    face_burst: float = Field(400.0, ge=1, description="faces a principal may send at once above that rate")
    call_rate: float = Field(20.0, ge=0, description="unary calls a second per principal (0: no limit)")
    call_burst: float = Field(60.0, ge=1)
    max_face_pixels: int = Field(
        512 * 512, ge=64 * 64, description="largest decoded face payload (a streamed crop is 128x128); larger is refused"
    )
    max_image_pixels: int = Field(
        12_000_000, ge=64 * 64, description="largest picture (enrollment, image payloads), read from its header"
    )
    max_camera_id_length: int = Field(128, ge=1)
    max_identities: int = Field(1_000_000, ge=1, description="identities the gallery may hold")
    max_pictures_per_identity: int = Field(1000, ge=1, description="enrollment pictures one identity may hold")


class BatchingConfig(_Config):
    """Faces from every stream recognised together, as Triton's dynamic batcher would.

    Each worker takes a whole batch and decodes, aligns and recognises it: one thread hop per
    batch rather than two per face, which is what the in-process engine does too
    (`facelink bench load` compares the two)."""

    max_faces: int = Field(16, ge=1, description="faces per batch at most")
    max_delay_ms: float = Field(2.0, ge=0, description="how long a face waits for others to fill its batch")
    workers: int = Field(
        max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)),
        ge=1, description="threads that decode and recognise batches (a bounded pool; default: the cores)",
    )


class UnknownsConfig(_Config):
    """Unknown people: faces answered UNKNOWN grouped per person under a persistent id, with a
    few of their best crops, so that someone can name them later (cloud/unknowns.py).

    These are pictures of people who never consented: they are kept in GALLERY/unknowns.sqlite3
    (0600, erased like the gallery), seen only with the `unknowns` scope, and erased when not
    seen for `retention_days` (docs/security.md, "Unknown people"). `enabled=False` keeps
    nothing new; what is already kept is still listed, erased on request and expired.
    """

    enabled: bool = Field(True, description="keep unknown people (off: FaceResult.unknown_id stays empty)")
    threshold: float | None = Field(
        None, ge=-1, le=1,
        description="cosine to a person's centroid at which a face is that person; None: the recogniser's match threshold",
    )
    retention_days: float = Field(30.0, gt=0, description="an unknown person not seen for this long is erased")
    max_unknowns: int = Field(10_000, ge=1, description="unknown people kept at most; past it the least recently seen is erased")
    crops_per_unknown: int = Field(5, ge=1, le=32, description="best crops kept per unknown person")
    purge_interval_s: float = Field(3600.0, gt=0, description="how often the retention period is enforced (and once at start)")
    track_memory_s: float = Field(
        30.0, ge=0,
        description="a track's later faces keep its unknown id for this long even when one of them alone would not match",
    )


class GalleryIndexConfig(_Config):
    """How the embedded gallery searches one model's templates (cloud/gallery/ann.py).

    Below `hnsw_min_templates` the index is exact (flat): nothing is lost and a search costs a few
    ms. From it on, `large_kind`: an IVF index (default; `ivf_nprobe` trades recall for time) or an
    HNSW graph (`hnsw_ef_search` does), both faiss, inner product (benchmarks/results/gallery_scale*.json
    measure recall@1 against exact search per size; docs/gallery-scale.md).
    """

    hnsw_min_templates: int = Field(
        50_000, ge=1, description="templates of one model from which the large index (large_kind) replaces exact search"
    )
    hnsw_m: int = Field(32, ge=4, le=128, description="HNSW links per node (memory: ~8 x M bytes per template)")
    hnsw_ef_construction: int = Field(40, ge=8, description="HNSW build beam: larger builds slower, finds better links")
    hnsw_ef_search: int = Field(
        256, ge=1, description="HNSW search beam: larger searches slower, misses less (256: recall@1 0.99 at 1e5)"
    )
    rebuild_tombstone_fraction: float = Field(
        0.2, gt=0.0, le=1.0, description="rebuild the graph once this fraction of its nodes are erased templates"
    )
    snapshot: bool = Field(True, description="persist HNSW indexes in the gallery folder so a start does not rebuild them")
    # Large galleries: an HNSW graph or an inverted-file index (IVF, docs/gallery-scale.md compares them at 1e6).
    # IVF is the default: at 1e6 it found more exact answers than HNSW within p99 <= 10 ms, built 12x faster and
    # took 20% less RAM (benchmarks/results/gallery_scale_1e6_ivf.json); neither reaches recall 0.99 there.
    large_kind: Literal["hnsw", "ivf"] = Field(
        "ivf", description="index from hnsw_min_templates on: ivf (k-means lists, exact within the lists probed) or hnsw (graph)"
    )
    ivf_nlist: int | None = Field(
        None, ge=1, description="IVF lists (k-means centroids); None: 4 x sqrt(templates at training), at most 1 per 39 samples"
    )
    ivf_nprobe: int = Field(
        512, ge=1, description="IVF lists searched per query: larger searches slower, misses less (512: p99 8-12 ms at 1e6)"
    )
    ivf_train_size: int = Field(200_000, ge=1_000, description="templates sampled (seeded) to train the IVF k-means")
    ivf_retrain_growth: float = Field(
        4.0, gt=1.0, description="retrain the IVF lists once the gallery holds this many times the templates it was trained on"
    )


class GalleryBackendConfig(_Config):
    """Which gallery backend serves, and how replicas share it (docs/gallery.md).

    `url` None keeps the embedded gallery (SQLite + faiss) in `CloudConfig.gallery_dir`;
    `qdrant://host:6334[/prefix]` (gRPC, plaintext), `qdrants://...` (TLS) or
    `qdrant+local:///path` puts it in Qdrant, and `gallery_dir` then holds only the server's own
    files (auth.json, audit.jsonl, unknowns.sqlite3). The Qdrant API key is never configured
    here: it is read from $FACELINK_QDRANT_API_KEY or `api_key_file`.
    """

    url: str | None = Field(None, description="qdrant://host:6334[/prefix], qdrants://..., qdrant+local:///path; None: embedded")
    replica_poll_s: float = Field(
        0.5, gt=0, le=60,
        description="embedded replicas on one folder: a change made through one is searched by the others within this",
    )
    feed_retention_s: float = Field(3600.0, ge=60, description="embedded change-feed entries kept this long")
    api_key_file: Path | None = Field(None, description="file holding the Qdrant API key (0600), if not in the environment")
    timeout_s: float = Field(10.0, gt=0, description="Qdrant call timeout")
    shards: int = Field(1, ge=1, description="Qdrant shards per collection, set when the collections are created")
    replication_factor: int = Field(1, ge=1, description="copies of each Qdrant shard")
    write_consistency_factor: int = Field(1, ge=1, description="copies a Qdrant write waits for")
    pending_grace_s: float = Field(
        600.0, gt=0, description="Qdrant points a crashed enrollment left pending are deleted after this long"
    )
    index: GalleryIndexConfig = Field(
        GalleryIndexConfig(), description="the embedded gallery's search index (exact, then approximate past a size)"
    )
    vector_storage: Literal["float16", "float32"] = Field(
        "float16", description="precision of the embedded gallery's stored templates (float16 measured lossless on LFW)"
    )


class CloudConfig(_Config):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535, description="0 picks a free port")
    gallery_dir: Path = Field(
        Path("gallery"),
        description="where the durable gallery lives (embedded), and the server's credentials and audit log (either backend)",
    )
    gallery_backend: GalleryBackendConfig = GalleryBackendConfig()
    recognizer: str = Field(
        "auto", description="manifest name or path; auto: the strongest whose weights are present (EdgeFace-XS, "
        "then MobileFaceNet, from ../shared), else dlib (docs/recognisers.md)"
    )
    match_threshold: float | None = Field(
        None, description="cosine threshold of `recognizer`; None takes its manifest's (other models always do)"
    )
    # Asymmetric matching: enrollment runs every gallery model on each picture and stores each
    # embedding, and serves each accepted query model from templates derived from those.
    gallery_models: tuple[str, ...] = Field(
        ("auto",),
        description="recognisers (manifest names or paths) whose embeddings enrollment stores, besides `recognizer`, "
        "which is always one; auto: dlib-resnet-onnx when its weights are reachable",
    )
    ensembles: tuple[str, ...] = Field(
        ("auto",),
        description="ensemble manifests (bundled names or paths) whose query models' embeddings are accepted; "
        "auto: every bundled ensemble whose gallery models are all among the gallery models; () accepts none",
    )
    rejection_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="most uncertain fraction of gallery pictures the policy acts on (0: none)"
    )
    rejection_action: Literal["flag", "drop"] = Field(
        "flag", description="flag: record the reason, keep matching; drop: record the reason, never match"
    )
    # Full resolution: an enrollment photo may show a small face in a large picture, and the
    # cloud's CPU is not a board's (the edge detects on a downscaled frame).
    detector: DetectorConfig = DetectorConfig(detect_size=0)
    backend: BackendConfig = BackendConfig()
    security: CloudSecurity = CloudSecurity()
    limits: ServiceLimits = ServiceLimits()
    batching: BatchingConfig = BatchingConfig()
    unknowns: UnknownsConfig = UnknownsConfig()
    metrics_port: int | None = Field(None, ge=0, le=65535, description="serve Prometheus /metrics on this port")
    metrics_host: str = Field("127.0.0.1", description="address of the metrics endpoint (loopback: scrape it locally)")
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_payload_bytes: int = Field(256 * 1024, ge=256)
    max_images_per_enroll: int = Field(64, ge=1)
    max_image_side: int = Field(4096, ge=64)

    @property
    def auth_path(self) -> Path:
        return self.security.auth_file or self.gallery_dir / "auth.json"

    @property
    def audit_path(self) -> Path:
        return self.security.audit_file or self.gallery_dir / "audit.jsonl"
