"""A real gRPC server on an ephemeral loopback port, real faces, real models."""

from __future__ import annotations

import queue
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from facelink.config import EdgeConfig
from facelink.edge.pipeline import EdgePipeline
from facelink.edge.sources import Frame
from facelink.runtime.embeddings import unpack_embedding
from facelink.v1 import common_pb2, gallery_pb2, gallery_pb2_grpc, recognition_pb2, recognition_pb2_grpc

from .support import lfw_image, needs_shared, read_rgb

pytestmark = needs_shared

ENROLLED = ("Colin_Powell", "Tony_Blair", "Serena_Williams")
STRANGER = "Aaron_Eckhart"  # never enrolled


def enroll_request(name: str, index: int = 1) -> gallery_pb2.EnrollRequest:
    data = lfw_image(name, index).read_bytes()
    return gallery_pb2.EnrollRequest(
        identity=name, images=[gallery_pb2.EnrollImage(image=common_pb2.Image(format=common_pb2.IMAGE_FORMAT_JPEG, data=data))]
    )


class Stream:
    """A bidirectional call driven one observation at a time, as a test needs it."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._responses = recognition_pb2_grpc.RecognitionStub(channel).Recognize(iter(self._requests.get, None))

    def send(self, observation: recognition_pb2.FaceObservation) -> recognition_pb2.FaceResult:
        self._requests.put(observation)
        return next(self._responses)

    def close(self) -> None:
        self._requests.put(None)


@pytest.fixture
def pipeline(engine_parts) -> EdgePipeline:
    return EdgePipeline(EdgeConfig(faces="central"), detector=engine_parts[1])


def observe(pipeline: EdgePipeline, name: str, index: int) -> recognition_pb2.FaceObservation:
    frame = Frame(read_rgb(lfw_image(name, index)), index, 0, f"{name}_{index}")
    faces = pipeline.process(frame)
    assert faces, f"no face detected in {name} {index}"
    return faces[0].observation


@pytest.fixture
def enrolled_server(server_factory, channel_to):
    server = server_factory()
    gallery = gallery_pb2_grpc.GalleryStub(channel_to(server.address))
    for name in ENROLLED:
        reply = gallery.Enroll(enroll_request(name), timeout=30)
        assert reply.templates_added == 1 and reply.faces[0].width > 20
    return server


def test_enroll_stream_identify_and_reject_a_stranger(enrolled_server, channel_to, pipeline) -> None:
    stream = Stream(channel_to(enrolled_server.address))
    for name in ENROLLED:
        result = stream.send(observe(pipeline, name, 2))
        assert result.decision == recognition_pb2.DECISION_MATCH, result
        assert result.identity == name
        assert result.score >= result.threshold and result.server_latency_us > 0
    stranger = stream.send(observe(pipeline, STRANGER, 1))
    assert stranger.decision == recognition_pb2.DECISION_UNKNOWN
    assert stranger.score < stranger.threshold
    stream.close()


def test_the_default_crop_has_a_coarser_border_ring_and_travels_as_bitstream_v2(enrolled_server, channel_to, engine_parts) -> None:
    from facelink.runtime.codecs import bitstream

    observation = observe(EdgePipeline(EdgeConfig(faces="central"), detector=engine_parts[1]), "Tony_Blair", 3)
    assert observation.face.codec_id.startswith("flc-default-") and observation.face.codec_version == 2
    header, _ = bitstream.unpack(observation.face.data)
    assert header.quality == 5 and header.regions == (bitstream.Region(1, 1, 7, 7),)  # the bundle's border_ring_quality
    whole = EdgeConfig(faces="central", crop_border=None)
    plain = observe(EdgePipeline(whole, detector=engine_parts[1]), "Tony_Blair", 3)
    assert plain.face.codec_version == 1 and bitstream.unpack(plain.face.data)[0].quality == 4
    assert len(observation.face.data) < len(plain.face.data)
    stream = Stream(channel_to(enrolled_server.address))
    for sent in (observation, plain):
        result = stream.send(sent)
        assert result.decision == recognition_pb2.DECISION_MATCH and result.identity == "Tony_Blair", result
    stream.close()


def test_malformed_payloads_are_rejected_and_the_stream_survives(enrolled_server, channel_to, pipeline, engine_parts) -> None:
    stream = Stream(channel_to(enrolled_server.address))
    good = observe(pipeline, "Tony_Blair", 3)
    assert good.face.codec_id.startswith("flc-default-")  # the edge's default payload: the learned codec

    cases = {}
    for codec, message in (("learned", "not a facelink learned-codec bitstream"), ("jpeg", "undecodable jpeg")):
        bad = observe(EdgePipeline(EdgeConfig(faces="central", codec=codec), detector=engine_parts[1]), "Tony_Blair", 3)
        bad.face.data = b"\xff\xd8 this is not a " + codec.encode()
        cases[f"undecodable {codec}"] = (bad, grpc.StatusCode.INVALID_ARGUMENT, message)

    truncated = recognition_pb2.FaceObservation()
    truncated.CopyFrom(good)
    truncated.face.data = good.face.data[: len(good.face.data) // 2]
    cases["truncated"] = (truncated, grpc.StatusCode.INVALID_ARGUMENT, "checksum")

    unknown_codec = recognition_pb2.FaceObservation()
    unknown_codec.CopyFrom(good)
    unknown_codec.face.codec_id = "h266"
    cases["unknown codec"] = (unknown_codec, grpc.StatusCode.INVALID_ARGUMENT, "unknown codec 'h266'")

    future_version = recognition_pb2.FaceObservation()
    future_version.CopyFrom(good)
    future_version.face.codec_version = 7
    cases["codec version"] = (future_version, grpc.StatusCode.INVALID_ARGUMENT, "version 7 is not supported")

    oversized = recognition_pb2.FaceObservation()
    oversized.CopyFrom(good)
    oversized.face.data = b"\x00" * (enrolled_server.engine.config.max_payload_bytes + 1)
    cases["oversized"] = (oversized, grpc.StatusCode.RESOURCE_EXHAUSTED, "the limit is")

    no_landmarks = recognition_pb2.FaceObservation()
    no_landmarks.CopyFrom(good)
    no_landmarks.ClearField("payload_landmarks")
    cases["no landmarks"] = (no_landmarks, grpc.StatusCode.INVALID_ARGUMENT, "needs payload_landmarks")

    cases["empty"] = (recognition_pb2.FaceObservation(camera_id="x"), grpc.StatusCode.INVALID_ARGUMENT, "no payload")

    for label, (observation, code, message) in cases.items():
        result = stream.send(observation)
        assert result.decision == recognition_pb2.DECISION_REJECTED, label
        assert result.error.code == code.value[0], (label, result.error)
        assert message in result.error.message, (label, result.error.message)
        # ... and the very same stream still answers a good face.
        after = stream.send(good)
        assert after.decision == recognition_pb2.DECISION_MATCH and after.identity == "Tony_Blair", label
    stream.close()


def test_embedding_payloads(enrolled_server, channel_to, engine_parts) -> None:
    """The edge's `embedding` payload: the query model runs on the device, 128 int8 bytes travel."""
    config = EdgeConfig(faces="central", payload="embedding", query_model="mobilefacenet")
    edge = EdgePipeline(config, detector=engine_parts[1], query=engine_parts[0])
    observation = observe(edge, "Colin_Powell", 3)
    assert observation.WhichOneof("payload") == "embedding"
    assert observation.embedding.dtype == common_pb2.DTYPE_INT8 and len(observation.embedding.data) == 128
    stream = Stream(channel_to(enrolled_server.address))
    result = stream.send(observation)
    assert result.decision == recognition_pb2.DECISION_MATCH and result.identity == "Colin_Powell"
    stranger = stream.send(observe(edge, STRANGER, 1))
    assert stranger.decision == recognition_pb2.DECISION_UNKNOWN

    observation.embedding.model_id = "someone-elses-model@3"
    refused = stream.send(observation)
    assert refused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "not accepted" in refused.error.message
    stream.close()


def test_an_int8_query_model_on_the_board_is_matched_in_its_sources_space(
    enrolled_server, channel_to, engine_parts, tmp_path
) -> None:
    from facelink.export.deploy.pipeline import ExportOptions, export_onnx
    from facelink.export.deploy.source import resolve_source
    from facelink.runtime.recognition import create_recognizer

    options = ExportOptions(precision="int8", calib_count=8, parity_count=4)
    board_model = create_recognizer(export_onnx(resolve_source("mobilefacenet"), options, tmp_path).manifest_path)
    edge = EdgePipeline(EdgeConfig(faces="central", payload="embedding"), detector=engine_parts[1], query=board_model)
    observation = observe(edge, "Serena_Williams", 2)
    assert observation.embedding.model_id == "mobilefacenet@ms1m-1"
    stream = Stream(channel_to(enrolled_server.address))
    result = stream.send(observation)
    assert result.decision == recognition_pb2.DECISION_MATCH and result.identity == "Serena_Williams"
    stream.close()


def test_the_bundled_query_model_on_the_edge(engine_parts) -> None:
    edge = EdgePipeline(EdgeConfig(faces="central", payload="embedding"), detector=engine_parts[1])
    embedding = observe(edge, "Tony_Blair", 1).embedding
    assert embedding.model_id == "facelink-query@v9" and embedding.dim == 128
    vector = unpack_embedding(embedding.data, "int8", embedding.dim, embedding.scale)
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 0.02


def test_gallery_calls_and_their_errors(enrolled_server, channel_to) -> None:
    gallery = gallery_pb2_grpc.GalleryStub(channel_to(enrolled_server.address))
    listing = gallery.ListIdentities(gallery_pb2.ListIdentitiesRequest(page_size=2))
    assert listing.total == 3 and [i.identity for i in listing.identities] == sorted(ENROLLED)[:2]
    rest = gallery.ListIdentities(gallery_pb2.ListIdentitiesRequest(page_size=2, page_token=listing.next_page_token))
    assert [i.identity for i in rest.identities] == sorted(ENROLLED)[2:] and rest.next_page_token == ""

    with pytest.raises(grpc.RpcError) as missing:
        gallery.RemoveIdentity(gallery_pb2.RemoveIdentityRequest(identity="Nobody"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND and "Nobody" in missing.value.details()

    blank = common_pb2.Image(format=common_pb2.IMAGE_FORMAT_PNG, data=_png(np.full((200, 200, 3), 127, np.uint8)))
    no_face = gallery_pb2.EnrollRequest(identity="Ghost", images=[enroll_request("Tony_Blair").images[0], gallery_pb2.EnrollImage(image=blank)])
    with pytest.raises(grpc.RpcError) as faceless:
        gallery.Enroll(no_face)
    assert faceless.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 1: no face found" in faceless.value.details()

    corrupt = gallery_pb2.EnrollRequest(identity="Ghost", images=[gallery_pb2.EnrollImage(image=common_pb2.Image(format=common_pb2.IMAGE_FORMAT_JPEG, data=b"nope"))])
    with pytest.raises(grpc.RpcError) as undecodable:
        gallery.Enroll(corrupt)
    assert undecodable.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image 0" in undecodable.value.details()
    assert "Ghost" not in [i.identity for i in gallery.ListIdentities(gallery_pb2.ListIdentitiesRequest()).identities]

    with pytest.raises(grpc.RpcError) as bad_name:
        gallery.Enroll(gallery_pb2.EnrollRequest(identity="", images=enroll_request("Tony_Blair").images))
    assert bad_name.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    removed = gallery.RemoveIdentity(gallery_pb2.RemoveIdentityRequest(identity="Tony_Blair"))
    assert removed.templates_removed == 1


def test_oversized_message_is_resource_exhausted(server_factory, channel_to) -> None:
    server = server_factory(max_message_bytes=64 * 1024)
    gallery = gallery_pb2_grpc.GalleryStub(channel_to(server.address))
    huge = gallery_pb2.EnrollRequest(
        identity="Big", images=[gallery_pb2.EnrollImage(image=common_pb2.Image(format=common_pb2.IMAGE_FORMAT_JPEG, data=b"\0" * 100_000))]
    )
    with pytest.raises(grpc.RpcError) as error:
        gallery.Enroll(huge)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_gallery_survives_a_restart(server_factory, channel_to, pipeline, tmp_path) -> None:
    first = server_factory(gallery_dir=tmp_path / "durable")
    gallery_pb2_grpc.GalleryStub(channel_to(first.address)).Enroll(enroll_request("Serena_Williams"))
    first.stop()

    second = server_factory(gallery_dir=tmp_path / "durable")
    result = Stream(channel_to(second.address)).send(observe(pipeline, "Serena_Williams", 4))
    assert result.decision == recognition_pb2.DECISION_MATCH and result.identity == "Serena_Williams"


def test_health_reflection_and_capabilities(server_factory, channel_to) -> None:
    from facelink.config import CloudSecurity

    channel = channel_to(server_factory(security=CloudSecurity(reflection=True)).address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "facelink.v1.Recognition", "facelink.v1.Gallery"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING

    replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    services = {s.name for s in next(replies).list_services_response.service}
    assert {"facelink.v1.Recognition", "facelink.v1.Gallery", "grpc.health.v1.Health"} <= services

    caps = recognition_pb2_grpc.RecognitionStub(channel).GetCapabilities(recognition_pb2.GetCapabilitiesRequest())
    assert caps.api_version == "facelink.v1"
    assert {"jpeg": [1]}.items() <= {c.codec_id: list(c.versions) for c in caps.codecs}.items()
    assert caps.models[0].model_id == "mobilefacenet@ms1m-1" and caps.models[0].embedding_dim == 128
    assert caps.limits.max_payload_bytes > 0 and 0 < caps.match_threshold < 1


def test_concurrent_streams(enrolled_server, channel_to, engine_parts) -> None:
    """Several devices at once: each gets its own answers, in order."""
    errors: list[BaseException] = []

    def device(camera: str) -> None:
        try:
            local = EdgePipeline(EdgeConfig(faces="central"), detector=engine_parts[1])
            stream = Stream(channel_to(enrolled_server.address))
            for index in (2, 3):
                observation = observe(local, "Colin_Powell", index)
                observation.camera_id = camera
                result = stream.send(observation)
                assert result.camera_id == camera and result.identity == "Colin_Powell"
            stream.close()
        except BaseException as error:  # collected: assertions in threads must reach the test
            errors.append(error)

    threads = [threading.Thread(target=device, args=(f"cam-{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def _png(image: np.ndarray) -> bytes:
    import cv2

    return cv2.imencode(".png", image)[1].tobytes()


def test_metrics_count_faces_and_errors(enrolled_server, channel_to, pipeline) -> None:
    stream = Stream(channel_to(enrolled_server.address))
    stream.send(observe(pipeline, "Tony_Blair", 2))
    stream.send(recognition_pb2.FaceObservation(camera_id="x"))
    stream.close()
    registry = enrolled_server.metrics.registry
    assert registry.get_sample_value("facelink_faces_total", {"payload": "face", "decision": "match"}) == 1
    assert registry.get_sample_value("facelink_face_errors_total", {"code": "INVALID_ARGUMENT"}) == 1
    assert registry.get_sample_value("facelink_payload_bytes_total", {"payload": "face"}) > 500
