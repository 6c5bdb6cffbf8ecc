"""The gRPC service answers every fuzzed observation and unary request by its contract.

A seeded sample of the long wire fuzz run (`python -m facelink.benchmarks.fuzz_wire --requests
100000`) against a real server on loopback: one FaceResult per FaceObservation, in order, refusals
typed and readable, no INTERNAL or UNKNOWN, no hang, health checks answered, and the controls sent
between the mutated observations decided as before. Then the contract checker itself, and one test
per bug the fuzzer found: messages the server cannot parse, each on a call of its own.
"""

from __future__ import annotations

import random
from pathlib import Path

import grpc
import pytest

from facelink.benchmarks import fuzz_wire
from facelink.config import ServiceLimits
from facelink.v1 import common_pb2, recognition_pb2

from .support import needs_shared

SAMPLE_REQUESTS = 400
SAMPLE_UNARY = 40
HANG_SECONDS = 20.0  # generous: an answer takes milliseconds; this only catches a hang
Code = grpc.StatusCode


# -- the checker, without a server ----------------------------------------------------------------
def _result(**fields) -> recognition_pb2.FaceResult:
    return recognition_pb2.FaceResult(camera_id="cam", request_id=7, **fields)


def _rejected(code: grpc.StatusCode, message: str) -> recognition_pb2.FaceResult:
    error = recognition_pb2.Error(code=code.value[0], message=message)
    return _result(decision=recognition_pb2.DECISION_REJECTED, error=error)


def test_the_checker_flags_every_broken_promise() -> None:
    echo = fuzz_wire.Echo("cam", 0, 0, 0, 7)

    def problems(result: recognition_pb2.FaceResult, expected: fuzz_wire.Echo = echo) -> list[str]:
        return fuzz_wire.result_problems(result, expected)

    assert problems(_rejected(Code.INVALID_ARGUMENT, "observation has no payload")) == []
    assert problems(_rejected(Code.INTERNAL, "internal error (incident 1)")) == ["INTERNAL"]
    assert problems(_rejected(Code.UNKNOWN, "x")) == ["UNKNOWN"]
    assert problems(_rejected(Code.INVALID_ARGUMENT, "")) == ["no message"]
    assert problems(_rejected(Code.INVALID_ARGUMENT, "'NoneType' object has no attribute 'shape'")) == [
        "exception text"]
    assert problems(_rejected(Code.CANCELLED, "x")) == ["untyped code CANCELLED"]
    unknown = _result(decision=recognition_pb2.DECISION_UNKNOWN)
    assert problems(unknown) == []
    assert problems(unknown, fuzz_wire.Echo("cam", 0, 0, 0, 8)) == ["wrong echo (out of order?)"]
    assert problems(_result(decision=recognition_pb2.DECISION_MATCH, score=0.1, threshold=0.5))
    assert problems(_result()) == ["decision 0"]
    leaked = "Unexpected <class 'google.protobuf.message.DecodeError'>: Error parsing message"
    assert fuzz_wire.status_problems(Code.UNKNOWN, leaked) == ["UNKNOWN", "exception text"]
    assert fuzz_wire.status_problems(Code.NOT_FOUND, "unknown identity 'fz-1'") == []


def test_odd_values_survive_serialisation_and_probes_do_not_parse() -> None:
    """Every odd string is valid UTF-8 (else the client, not the server, would refuse it)."""
    rng = random.Random(0)
    for _ in range(500):
        recognition_pb2.FaceObservation(camera_id=fuzz_wire.odd_text(rng)).SerializeToString()
    for data in (b"", recognition_pb2.FaceObservation(camera_id="cam").SerializeToString()):
        assert all(fuzz_wire.parses(fuzz_wire.unparseable(data, rng)) is None for _ in range(50))


# -- the sample, against a real server ------------------------------------------------------------
@pytest.fixture(scope="module")
def seeds(engine_parts) -> fuzz_wire.Seeds:
    recognizer, detector = engine_parts
    people, enroll = fuzz_wire.SEED_PEOPLE[:2], fuzz_wire.ENROLL_PEOPLE[:2]
    return fuzz_wire.build_seeds(people, probes=1, enroll_people=enroll, detector=detector,
                                 recognizer=recognizer)


@pytest.fixture
def target(server_factory) -> fuzz_wire.Target:
    from facelink.cloud.auth import AuthStore

    # As the fuzzer's own server: no per-principal rate limits, or most inputs would be refused by them.
    server = server_factory(limits=ServiceLimits(face_rate=0, call_rate=0))
    config = server.engine.config
    device = AuthStore(config.auth_path).create_token("fuzz-device", ["recognize"])[1]
    return fuzz_wire.Target(server.address, server.admin_token, device, config)


@needs_shared
def test_the_seeds_cover_every_payload_and_mutation(seeds: fuzz_wire.Seeds) -> None:
    kinds = {s.kind for s in seeds.observations}
    assert {k.split()[0] for k in kinds} == {"face", "embedding", "image"}
    assert {"face learned v2 ring", "face learned v1", "face jpeg", "embedding mobilefacenet int8",
            "image jpeg"} <= kinds
    ctx = fuzz_wire.make_context(seeds, fuzz_wire.fuzz_server_config(Path("unused")))
    # Many inputs of several seeds: a generator that raises stops a long run.
    items = [fuzz_wire.make_observation(i, ctx, base, probe_rate=0.02)
             for base in range(3) for i in range(2000)]
    assert {i.what for i in items} >= {"control", "wire", "face.data", "face.codec", "landmarks", "embedding",
                                       "image", "oneof", "ids", "empty", "unparseable", "oversized"}
    assert all(fuzz_wire.parses(i.data) is not None for i in items if i.probe != "unparseable")
    again = fuzz_wire.make_observation(77, ctx, base_seed=3)
    assert fuzz_wire.make_observation(77, ctx, base_seed=3) == again  # input i is a function of (seed, i)
    unary = [fuzz_wire.make_unary(i, ctx, base, probe_rate=0.05) for base in range(3) for i in range(300)]
    assert {u.method for u in unary} == set(fuzz_wire.UNARY_METHODS)
    assert {"valid", "name", "metadata", "landmarks", "corrupt image", "wire", "unparseable"} <= {
        u.mutation for u in unary}


@needs_shared
def test_a_seeded_sample_of_fuzzed_requests_keeps_the_contract(
    seeds: fuzz_wire.Seeds, target: fuzz_wire.Target, tmp_path: Path
) -> None:
    config = fuzz_wire.RunConfig(SAMPLE_REQUESTS, SAMPLE_UNARY, seed=20240601, streams=2,
                                 hang_seconds=HANG_SECONDS, probe_rate=0.02, save_dir=tmp_path)
    result = fuzz_wire.run_fuzz(config, seeds, target)
    keys = ("problems", "unanswered_faces", "stream_failure_count", "hang_count")
    found = {key: result[key] for key in keys}
    assert fuzz_wire.clean(result), f"{found}; examples: {result['examples']}"
    assert result["requests"] + result["abandoned_requests"] == SAMPLE_REQUESTS
    assert result["unary_requests"] == SAMPLE_UNARY
    assert result["internal"] == result["unknown"] == 0
    assert result["health"]["checks"] > 0 and result["health"]["failures"] == 0
    outcomes = {outcome for counts in result["by_mutation"].values() for outcome in counts}
    assert {"MATCH", "REJECTED INVALID_ARGUMENT"} <= outcomes  # both paths were exercised
    assert result["by_mutation"]["control"].get("MATCH", 0) > 0
    assert {"probe unparseable", "probe oversized"} <= set(result["by_mutation"])


def _alone_on_a_stream(
    target: fuzz_wire.Target, *messages: bytes
) -> tuple[list[recognition_pb2.FaceResult], Code]:
    """`messages` on a stream of their own: the answers, and how the stream ended."""
    options = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(target.address, options=options) as channel:
        call = channel.stream_stream(fuzz_wire.RECOGNIZE, request_serializer=fuzz_wire._raw,
                                     response_deserializer=recognition_pb2.FaceResult.FromString)
        metadata = (("authorization", f"Bearer {target.admin_token}"),)
        responses = call(iter(messages), metadata=metadata, timeout=HANG_SECONDS)
        answers = []
        try:
            answers.extend(responses)
        except grpc.RpcError:
            pass
        return answers, responses.code()


@needs_shared
def test_a_message_over_max_message_bytes_ends_its_stream_resource_exhausted(
    target: fuzz_wire.Target,
) -> None:
    """gRPC refuses it before the service sees it: the stream ends, with a typed status."""
    face = common_pb2.EncodedFace(data=bytes(target.config.max_message_bytes + 1))
    observation = recognition_pb2.FaceObservation(face=face)
    assert _alone_on_a_stream(target, observation.SerializeToString()) == ([], Code.RESOURCE_EXHAUSTED)


@needs_shared
def test_an_unreadable_stream_message_is_rejected_and_the_stream_goes_on(
    target: fuzz_wire.Target, seeds: fuzz_wire.Seeds
) -> None:
    """Was: the stream ended INTERNAL (the parser's DecodeError reached the interceptor)."""
    control = next(s.data for s in seeds.observations if s.kind == "face learned v2 ring")
    answers, code = _alone_on_a_stream(target, b"\x0a\x02\xc3\x28", control)  # camera_id: invalid UTF-8
    assert code == Code.OK
    assert [a.error.code for a in answers] == [Code.INVALID_ARGUMENT.value[0], 0]
    assert fuzz_wire.leaks(answers[0].error.message) is None
    assert answers[1].decision == recognition_pb2.DECISION_UNKNOWN  # decided: nobody is enrolled here


@needs_shared
def test_an_unreadable_unary_request_is_invalid_argument(target: fuzz_wire.Target) -> None:
    """Was: UNKNOWN "Unexpected <class 'google.protobuf.message.DecodeError'>: ..." (grpc parsed the
    request before any interceptor ran)."""
    metadata = (("authorization", f"Bearer {target.admin_token}"),)
    with grpc.insecure_channel(target.address) as channel:
        call = channel.unary_unary("/facelink.v1.Gallery/ListIdentities", request_serializer=fuzz_wire._raw,
                                   response_deserializer=fuzz_wire._raw)
        with pytest.raises(grpc.RpcError) as error:
            call(b"\xff\xff", metadata=metadata, timeout=HANG_SECONDS)
    assert error.value.code() == Code.INVALID_ARGUMENT
    assert fuzz_wire.leaks(error.value.details()) is None


@needs_shared
def test_an_unreadable_health_check_is_invalid_argument(target: fuzz_wire.Target) -> None:
    with grpc.insecure_channel(target.address) as channel:
        call = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=fuzz_wire._raw,
                                   response_deserializer=fuzz_wire._raw)
        with pytest.raises(grpc.RpcError) as error:
            call(b"\xff\xff", timeout=HANG_SECONDS)
    assert error.value.code() == Code.INVALID_ARGUMENT
    assert fuzz_wire.leaks(error.value.details()) is None
