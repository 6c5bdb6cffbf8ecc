"""The service facing the network: TLS, mutual TLS, tokens and scopes, what a device may see,
limits that answer at once, and calls that stay prompt while every stream is busy."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from facelink.cloud.auth import AuthStore
from facelink.cloud.server import InsecureConfigError
from facelink.config import CloudSecurity, EdgeConfig, ServiceLimits
from facelink.edge.pipeline import EdgePipeline
from facelink.v1 import common_pb2, gallery_pb2, gallery_pb2_grpc, recognition_pb2, recognition_pb2_grpc

from .conftest import token_channel
from .support import needs_shared
from .test_service import ENROLLED, STRANGER, Stream, enroll_request, observe

pytestmark = needs_shared


@pytest.fixture
def pipeline(engine_parts) -> EdgePipeline:
    return EdgePipeline(EdgeConfig(faces="central"), detector=engine_parts[1])


def token_for(server, name: str, *scopes: str) -> str:
    return AuthStore(server.engine.config.auth_path).create_token(name, scopes)[1]


def caps_call(channel: grpc.Channel, timeout: float = 10) -> recognition_pb2.Capabilities:
    return recognition_pb2_grpc.RecognitionStub(channel).GetCapabilities(recognition_pb2.GetCapabilitiesRequest(), timeout=timeout)


def refused(call, *args) -> grpc.RpcError:  # noqa: ANN001, ANN002
    with pytest.raises(grpc.RpcError) as error:
        call(*args, timeout=10)
    return error.value


@pytest.fixture
def enrolled(server_factory, channel_to):
    server = server_factory()
    gallery = gallery_pb2_grpc.GalleryStub(channel_to(server.address))
    for name in ENROLLED:
        gallery.Enroll(enroll_request(name), timeout=30)
    return server


# -- credentials and scopes ------------------------------------------------------------------------
def test_every_call_needs_a_principal_and_health_stays_open(enrolled, channel_to) -> None:
    anonymous = channel_to(enrolled.address, token=None)
    error = refused(caps_call, anonymous)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "no credentials" in error.details()
    error = refused(gallery_pb2_grpc.GalleryStub(anonymous).ListIdentities, gallery_pb2.ListIdentitiesRequest())
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    forged = channel_to(enrolled.address, token="flk_000000000000_" + "A" * 43)
    assert refused(caps_call, forged).code() == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(anonymous).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_scopes_are_least_privilege_and_name_what_is_missing(enrolled, channel_to) -> None:
    device = channel_to(enrolled.address, token=token_for(enrolled, "door-1", "recognize"))
    assert caps_call(device).api_version == "facelink.v1"
    gallery = gallery_pb2_grpc.GalleryStub(device)
    for call, request, scope in (
        (gallery.ListIdentities, gallery_pb2.ListIdentitiesRequest(), "read"),
        (gallery.RemoveIdentity, gallery_pb2.RemoveIdentityRequest(identity="Tony_Blair"), "remove"),
        (gallery.Enroll, enroll_request("Aaron_Eckhart"), "enroll"),
    ):
        error = refused(call, request)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"token:door-1 lacks the scope '{scope}'" in error.details()
    reader = gallery_pb2_grpc.GalleryStub(channel_to(enrolled.address, token=token_for(enrolled, "auditor", "read")))
    assert reader.ListIdentities(gallery_pb2.ListIdentitiesRequest(), timeout=10).total == len(ENROLLED)


def test_a_revoked_token_stops_working_on_the_running_server(enrolled, channel_to) -> None:
    secret = token_for(enrolled, "temp", "recognize")
    channel = channel_to(enrolled.address, token=secret)
    assert caps_call(channel).api_version
    assert AuthStore(enrolled.engine.config.auth_path).revoke("temp")
    time.sleep(1.1)  # the server re-reads the file at most once a second
    error = refused(caps_call, channel)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in error.details()


def test_tokens_are_stored_hashed_in_a_private_file(tmp_path) -> None:
    store = AuthStore(tmp_path / "auth.json")
    record, secret = store.create_token("door-1", ["recognize"])
    text = (tmp_path / "auth.json").read_text()
    assert secret not in text and record.sha256 in text
    assert (tmp_path / "auth.json").stat().st_mode & 0o777 == 0o600
    assert store.authenticate_token(secret).scopes == frozenset({"recognize"})
    with pytest.raises(ValueError, match="unknown scope"):
        store.create_token("x", ["everything"])


def test_reflection_is_off_by_default_and_admin_only(server_factory, channel_to) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    def list_services(channel: grpc.Channel) -> set[str]:
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        return {s.name for s in next(replies).list_services_response.service}

    plain = server_factory()
    with pytest.raises(grpc.RpcError) as off:
        list_services(channel_to(plain.address))
    assert off.value.code() == grpc.StatusCode.UNIMPLEMENTED
    on = server_factory(security=CloudSecurity(reflection=True))
    assert "facelink.v1.Recognition" in list_services(channel_to(on.address))
    with pytest.raises(grpc.RpcError) as device:
        list_services(channel_to(on.address, token=token_for(on, "cam", "recognize")))
    assert device.value.code() == grpc.StatusCode.PERMISSION_DENIED


# -- what a device may learn -------------------------------------------------------------------------
def test_a_device_sees_decisions_not_nearest_names_or_exact_scores(enrolled, channel_to, pipeline) -> None:
    device = Stream(channel_to(enrolled.address, token=token_for(enrolled, "cam", "recognize")))
    match = device.send(observe(pipeline, "Tony_Blair", 2))
    assert match.decision == recognition_pb2.DECISION_MATCH and match.identity == "Tony_Blair"
    assert abs(match.score / 0.05 - round(match.score / 0.05)) < 1e-3  # rounded to the step
    stranger = device.send(observe(pipeline, STRANGER, 1))
    assert stranger.decision == recognition_pb2.DECISION_UNKNOWN
    assert stranger.identity == "" and stranger.score == 0.0
    device.close()
    evaluator = Stream(channel_to(enrolled.address, token=token_for(enrolled, "bench", "recognize", "scores")))
    nearest = evaluator.send(observe(pipeline, STRANGER, 1))
    assert nearest.identity in ENROLLED and nearest.score != 0.0
    evaluator.close()


def test_gallery_model_embeddings_need_their_own_scope(enrolled, channel_to, engine_parts) -> None:
    recognizer = engine_parts[0]
    edge = EdgePipeline(EdgeConfig(faces="central", payload="embedding"), detector=engine_parts[1], query=recognizer)
    observation = observe(edge, "Colin_Powell", 2)
    device = Stream(channel_to(enrolled.address, token=token_for(enrolled, "cam", "recognize")))
    result = device.send(observation)
    assert result.decision == recognition_pb2.DECISION_REJECTED
    assert result.error.code == grpc.StatusCode.PERMISSION_DENIED.value[0] and "'embeddings'" in result.error.message
    device.close()
    trusted = Stream(channel_to(enrolled.address, token=token_for(enrolled, "svc", "recognize", "embeddings")))
    assert trusted.send(observation).identity == "Colin_Powell"
    trusted.close()


def test_rate_limits_answer_resource_exhausted_with_a_retry_delay(server_factory, channel_to) -> None:
    server = server_factory(limits=ServiceLimits(call_rate=1.0, call_burst=2.0))
    channel = channel_to(server.address)
    stub = recognition_pb2_grpc.RecognitionStub(channel)
    stub.GetCapabilities(recognition_pb2.GetCapabilitiesRequest(), timeout=10)
    stub.GetCapabilities(recognition_pb2.GetCapabilitiesRequest(), timeout=10)
    with pytest.raises(grpc.RpcError) as error:
        stub.GetCapabilities(recognition_pb2.GetCapabilitiesRequest(), timeout=10)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry after" in error.value.details()
    assert int(dict(error.value.trailing_metadata())["retry-after-ms"]) > 0


# -- transport -----------------------------------------------------------------------------------------
def test_plaintext_on_a_network_address_is_refused_unless_insecure(server_factory) -> None:
    with pytest.raises(InsecureConfigError, match="plaintext"):
        server_factory(host="0.0.0.0")
    server = server_factory(host="0.0.0.0", security=CloudSecurity(insecure=True))
    assert server.port > 0


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from facelink.pki import make_ca, make_client_cert, make_server_cert, write_pem

    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca()
    server = make_server_cert(ca, ["localhost", "127.0.0.1"])
    device = make_client_cert(ca, "door-1")
    stranger_ca = make_ca("someone else's CA")
    paths = {}
    for stem, pair in (("ca", ca), ("server", server), ("door-1", device), ("other-ca", stranger_ca)):
        paths[stem + ".key"] = write_pem(folder / f"{stem}.key", pair.key_pem, private=True)
        paths[stem + ".crt"] = write_pem(folder / f"{stem}.crt", pair.cert_pem, private=False)
    return paths


def test_tls_with_a_token(server_factory, pki) -> None:
    from pydantic import SecretStr

    from facelink.transport import ClientSecurity, client_channel

    server = server_factory(security=CloudSecurity(tls_cert=pki["server.crt"], tls_key=pki["server.key"]))
    address = f"localhost:{server.port}"
    good = client_channel(address, ClientSecurity(tls_ca=pki["ca.crt"], token=SecretStr(server.admin_token)))
    assert caps_call(good).api_version == "facelink.v1"
    wrong_ca = client_channel(address, ClientSecurity(tls_ca=pki["other-ca.crt"], token=SecretStr(server.admin_token)))
    assert refused(caps_call, wrong_ca).code() == grpc.StatusCode.UNAVAILABLE
    plaintext = token_channel(address, server.admin_token)
    assert refused(caps_call, plaintext).code() == grpc.StatusCode.UNAVAILABLE
    for channel in (good, wrong_ca, plaintext):
        channel.close()


def test_mutual_tls_names_the_device_and_gives_it_recognize_only(server_factory, pki) -> None:
    from facelink.transport import ClientSecurity, client_channel

    server = server_factory(
        security=CloudSecurity(tls_cert=pki["server.crt"], tls_key=pki["server.key"], client_ca=pki["ca.crt"])
    )
    address = f"localhost:{server.port}"
    device = client_channel(address, ClientSecurity(tls_ca=pki["ca.crt"], tls_cert=pki["door-1.crt"], tls_key=pki["door-1.key"]))
    assert caps_call(device).api_version == "facelink.v1"
    error = refused(gallery_pb2_grpc.GalleryStub(device).ListIdentities, gallery_pb2.ListIdentitiesRequest())
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "certificate:door-1" in error.details()
    AuthStore(server.engine.config.auth_path).grant("door-1", ["recognize", "read"])
    time.sleep(1.1)
    assert gallery_pb2_grpc.GalleryStub(device).ListIdentities(gallery_pb2.ListIdentitiesRequest(), timeout=10).total == 0
    no_cert = client_channel(address, ClientSecurity(tls_ca=pki["ca.crt"]))
    assert refused(caps_call, no_cert).code() == grpc.StatusCode.UNAVAILABLE
    device.close()
    no_cert.close()


# -- load: limits that answer at once, and no starvation ---------------------------------------------
def open_idle_stream(channel: grpc.Channel) -> tuple[queue.Queue, object]:
    requests: queue.Queue = queue.Queue()
    call = recognition_pb2_grpc.RecognitionStub(channel).Recognize(iter(requests.get, None))
    return requests, call


def test_idle_streams_starve_nothing_and_the_stream_limit_answers_at_once(server_factory, channel_to, pipeline) -> None:
    server = server_factory(limits=ServiceLimits(max_streams=100))
    channel = channel_to(server.address)
    streams = [open_idle_stream(channel) for _ in range(100)]
    deadline = time.monotonic() + 30
    while server.recognition.open_streams < 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.recognition.open_streams == 100
    # Health, capabilities and gallery calls answer promptly beside 100 idle streams.
    started = time.perf_counter()
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    caps_call(channel)
    gallery_pb2_grpc.GalleryStub(channel).ListIdentities(gallery_pb2.ListIdentitiesRequest(), timeout=5)
    assert time.perf_counter() - started < 5
    # One more stream is refused at once, with the reason, and an open one still works.
    extra, call = open_idle_stream(channel)
    with pytest.raises(grpc.RpcError) as error:
        next(call)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in error.value.details()
    requests, responses = streams[0]
    requests.put(observe(pipeline, "Tony_Blair", 2))
    assert next(responses).decision == recognition_pb2.DECISION_UNKNOWN  # empty gallery, answered
    for requests, _ in streams:
        requests.put(None)


def test_an_idle_stream_is_closed_with_a_reason(server_factory, channel_to) -> None:
    server = server_factory(limits=ServiceLimits(stream_idle_timeout_s=0.5))
    _, call = open_idle_stream(channel_to(server.address))
    with pytest.raises(grpc.RpcError) as error:
        next(call)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "no observation for" in error.value.details()


def test_the_per_stream_in_flight_limit_is_enforced_by_the_server(server_factory, channel_to, pipeline) -> None:
    server = server_factory(limits=ServiceLimits(max_in_flight_per_stream=1))
    observation = observe(pipeline, "Tony_Blair", 2)
    batch = []
    for request_id in range(20):
        copy = recognition_pb2.FaceObservation()
        copy.CopyFrom(observation)
        copy.request_id = request_id
        batch.append(copy)
    results = list(recognition_pb2_grpc.RecognitionStub(channel_to(server.address)).Recognize(iter(batch), timeout=60))
    assert [r.request_id for r in results] == list(range(20))  # one answer each, in order
    codes = {r.error.code for r in results if r.decision == recognition_pb2.DECISION_REJECTED}
    assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}
    assert any(r.decision == recognition_pb2.DECISION_UNKNOWN for r in results)


# -- typed answers to bad input --------------------------------------------------------------------------
def test_a_bug_is_internal_with_an_incident_id_never_its_text(enrolled, channel_to, monkeypatch) -> None:
    def broken(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("secret internals /etc/passwd")

    monkeypatch.setattr(enrolled.engine.gallery, "list", broken)
    error = refused(gallery_pb2_grpc.GalleryStub(channel_to(enrolled.address)).ListIdentities, gallery_pb2.ListIdentitiesRequest())
    assert error.code() == grpc.StatusCode.INTERNAL and "incident" in error.details()
    assert "secret" not in error.details() and "RuntimeError" not in error.details()


def test_page_tokens_are_parsed_strictly(enrolled, channel_to) -> None:
    gallery = gallery_pb2_grpc.GalleryStub(channel_to(enrolled.address))
    for token in ("-1", " 1", "1_0", "+2", "1e3", "99999999999"):
        error = refused(gallery.ListIdentities, gallery_pb2.ListIdentitiesRequest(page_token=token))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, token


def test_landmarks_off_the_picture_or_shapeless_are_refused(enrolled, channel_to, pipeline) -> None:
    gallery = gallery_pb2_grpc.GalleryStub(channel_to(enrolled.address))
    request = enroll_request("Aaron_Eckhart")
    far = [common_pb2.Point(x=x, y=y) for x, y in ((5000, 10), (5040, 10), (5020, 30), (5005, 50), (5035, 50))]
    request.images[0].landmarks.points.extend(far)
    error = refused(gallery.Enroll, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside the 250x250 picture" in error.details()

    observation = observe(pipeline, "Tony_Blair", 2)
    del observation.payload_landmarks.points[:]
    line = [common_pb2.Point(x=20 + 20 * i, y=60) for i in range(5)]  # five points on a line
    observation.payload_landmarks.points.extend(line)
    stream = Stream(channel_to(enrolled.address))
    result = stream.send(observation)
    assert result.decision == recognition_pb2.DECISION_REJECTED and "face's shape" in result.error.message
    stream.close()


def test_camera_ids_are_bounded(enrolled, channel_to, pipeline) -> None:
    stream = Stream(channel_to(enrolled.address))
    for camera in ("x" * 200, "door\n2026-12-05 INFO forged line", "cam\u202e1"):
        observation = observe(pipeline, "Tony_Blair", 2)
        observation.camera_id = camera
        result = stream.send(observation)
        assert result.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "camera_id" in result.error.message
    stream.close()


def test_gallery_changes_are_audited_with_their_principal(enrolled, channel_to) -> None:
    from facelink.cloud.audit import read_audit, verify_audit

    remover = gallery_pb2_grpc.GalleryStub(channel_to(enrolled.address, token=token_for(enrolled, "dpo", "remove")))
    remover.RemoveIdentity(gallery_pb2.RemoveIdentityRequest(identity="Tony_Blair"), timeout=10)
    refused(remover.ListIdentities, gallery_pb2.ListIdentitiesRequest())
    records = read_audit(enrolled.engine.config.audit_path)
    enrolls = [r for r in records if r["call"] == "Enroll"]
    assert {r["identity"] for r in enrolls} == set(ENROLLED) and all(r["principal"] == "token:test-admin" for r in enrolls)
    erasure = [r for r in records if r["call"] == "RemoveIdentity"]
    assert erasure[-1]["principal"] == "token:dpo" and erasure[-1]["outcome"] == "ok" and erasure[-1]["identity"] == "Tony_Blair"
    assert any(r["outcome"] == "denied" and r["principal"] == "token:dpo" and "'read'" in (r.get("detail") or "") for r in records)
    assert verify_audit(enrolled.engine.config.audit_path)[0]


def test_gallery_files_are_private(enrolled) -> None:
    folder = enrolled.engine.config.gallery_dir
    assert folder.stat().st_mode & 0o077 == 0
    for path in folder.iterdir():
        assert path.stat().st_mode & 0o077 == 0, path


def test_many_concurrent_streams_are_all_answered(server_factory, channel_to, pipeline) -> None:
    server = server_factory()
    channel = channel_to(server.address)
    observation = observe(pipeline, "Tony_Blair", 2)
    results: list[list[int]] = [[] for _ in range(64)]

    def device(index: int) -> None:
        batch = []
        for request_id in range(3):
            copy = recognition_pb2.FaceObservation()
            copy.CopyFrom(observation)
            copy.request_id = request_id
            batch.append(copy)
        for result in recognition_pb2_grpc.RecognitionStub(channel).Recognize(iter(batch), timeout=120):
            results[index].append(result.decision)

    threads = [threading.Thread(target=device, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert all(r == [recognition_pb2.DECISION_UNKNOWN] * 3 for r in results)
    assert server.recognition._batcher.faces == 64 * 3  # noqa: SLF001
