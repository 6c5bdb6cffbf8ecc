"""Unknown people: a persistent id per stranger across streams, cameras and restarts, listed with
their best crops to those holding the `unknowns` scope, enrolled or erased on request, and
erased by retention. Erasure is checked the way tests/test_gallery_privacy.py checks the
gallery's: by scanning the raw bytes of the files for the erased crops and centroid.
"""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from facelink.cloud.audit import read_audit, verify_audit
from facelink.cloud.auth import AuthStore
from facelink.cloud.unknowns import CROP_TEMPLATE, UNKNOWNS_DB, Sighting, UnknownClusters, UnknownNotFound, sharpness
from facelink.config import EdgeConfig, UnknownsConfig
from facelink.edge.pipeline import EdgePipeline
from facelink.v1 import gallery_pb2, gallery_pb2_grpc, recognition_pb2

from .support import needs_shared
from .test_service import ENROLLED, Stream, enroll_request, observe

ID = re.compile(r"^u-[0-9a-f]{12}$")
# Two strangers (never enrolled) whose LFW pictures MobileFaceNet places well within its
# match threshold of each other (cosine 0.6-0.85 between any two of pictures 1-4).
STRANGER = "Hugo_Chavez"
OTHER_STRANGER = "John_Ashcroft"


# -- the store on its own (synthetic embeddings, no models) ------------------------------------------
def unit(rng: np.random.Generator, dim: int = 128) -> np.ndarray:
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def near(rng: np.random.Generator, v: np.ndarray, noise: float = 0.3) -> np.ndarray:
    return unit(rng, v.size) * noise + v


def crop(rng: np.random.Generator, blur: int = 0) -> np.ndarray:
    image = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    return cv2.GaussianBlur(image, (0, 0), blur) if blur else image


def store(tmp_path: Path, **config) -> UnknownClusters:
    return UnknownClusters(tmp_path / UNKNOWNS_DB, UnknownsConfig(**config), "m@1", threshold=0.5)


def test_the_store_clusters_by_cosine_and_keeps_the_best_crops(tmp_path) -> None:
    rng = np.random.default_rng(19)
    a, b = unit(rng), unit(rng)
    s = store(tmp_path, crops_per_unknown=2)
    assert not (tmp_path / UNKNOWNS_DB).exists()  # nothing kept, nothing written
    first = s.observe(Sighting(a, crop(rng, blur=3), "cam-1", None))
    assert ID.match(first)
    assert s.observe(Sighting(near(rng, a), crop(rng), "cam-2", None)) == first
    assert s.observe(Sighting(near(rng, a), crop(rng, blur=1), "cam-1", None)) == first
    other = s.observe(Sighting(b, crop(rng), "cam-1", None))
    assert other != first and len(s) == 2
    (record,), _, _ = s.list(None, 1, 5, 10**9)  # newest first
    assert record.unknown_id == other
    page, token, total = s.list(None, 1, 5, 10**9)
    (older,), token, _ = s.list(token, 1, 5, 10**9)
    assert older.unknown_id == first and token is None and total == 2
    assert older.sightings == 3 and older.cameras == ["cam-2", "cam-1"] and older.crops_kept == 2
    qualities = [c.quality for c in older.crops]
    assert qualities == sorted(qualities, reverse=True) and min(qualities) > sharpness(crop(rng, blur=3))  # blurred one dropped
    assert (tmp_path / UNKNOWNS_DB).stat().st_mode & 0o777 == 0o600
    s.close()


def test_a_track_keeps_its_id_and_one_crop_but_never_moves_the_centroid(tmp_path) -> None:
    rng = np.random.default_rng(20)
    a = unit(rng)
    s = store(tmp_path)
    track = ("token:door", "door-1", 7)
    first = s.observe(Sighting(a, crop(rng, blur=2), "door-1", track))
    profile = unit(rng)  # alone it matches nobody
    assert s.observe(Sighting(profile, crop(rng), "door-1", track)) == first
    assert s.observe(Sighting(profile, crop(rng), "door-1", None)) != first  # untracked: a new person
    assert s.observe(Sighting(near(rng, a), crop(rng), "door-1", track)) == first
    (record,) = [r for r in s.list(None, 10, 10, 10**9)[0] if r.unknown_id == first]
    assert record.sightings == 3 and record.crops_kept == 1  # one crop per track: its best
    assert record.crops[0].quality > sharpness(crop(rng, blur=2))


def test_retention_and_capacity_erase_and_report(tmp_path) -> None:
    rng = np.random.default_rng(21)
    erased: list[tuple[str, list[str], int]] = []
    s = store(tmp_path, max_unknowns=2, retention_days=1)
    s.on_erased = lambda why, ids, crops: erased.append((why, ids, crops))
    ids = [s.observe(Sighting(unit(rng), crop(rng), "cam", None)) for _ in range(3)]
    assert len(s) == 2 and erased == [("over max_unknowns (2)", [ids[0]], 1)]
    with pytest.raises(UnknownNotFound):
        s.crops(ids[0])
    assert s.expire() == 0
    assert s.expire(now=time.time_ns() // 1000 + 2 * 86400 * 10**6) == 2
    assert len(s) == 0 and erased[-1][0] == "not seen for 1 days" and sorted(erased[-1][1]) == sorted(ids[1:])
    s.close()
    reopened = store(tmp_path)
    assert len(reopened) == 0


def test_ids_and_centroids_survive_reopening(tmp_path) -> None:
    rng = np.random.default_rng(22)
    a = unit(rng)
    s = store(tmp_path)
    first = s.observe(Sighting(a, crop(rng), "cam", None))
    s.close()
    assert store(tmp_path).observe(Sighting(near(rng, a), crop(rng), "cam", None)) == first


# -- the service (real faces, real models) ---------------------------------------------------------------
@pytest.fixture
def pipeline(engine_parts) -> EdgePipeline:
    return EdgePipeline(EdgeConfig(faces="central"), detector=engine_parts[1])


@pytest.fixture
def server(server_factory, channel_to):
    running = server_factory()
    gallery = gallery_pb2_grpc.GalleryStub(channel_to(running.address))
    for name in ENROLLED:
        gallery.Enroll(enroll_request(name), timeout=30)
    return running


def token_for(server, name: str, *scopes: str) -> str:
    return AuthStore(server.engine.config.auth_path).create_token(name, scopes)[1]


def seen(stream: Stream, pipeline: EdgePipeline, name: str, index: int, camera: str, track: int = 0) -> recognition_pb2.FaceResult:
    observation = observe(pipeline, name, index)
    observation.camera_id, observation.track_id = camera, track
    return stream.send(observation)


def unknowns_of(channel: grpc.Channel, max_crops: int = 5) -> dict[str, gallery_pb2.UnknownInfo]:
    reply = gallery_pb2_grpc.GalleryStub(channel).ListUnknowns(gallery_pb2.ListUnknownsRequest(max_crops=max_crops), timeout=10)
    return {u.unknown_id: u for u in reply.unknowns}


def refused(call, request) -> grpc.RpcError:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as error:
        call(request, timeout=30)
    return error.value


@needs_shared
def test_a_stranger_keeps_one_id_across_streams_and_cameras(server, channel_to, pipeline) -> None:
    device = token_for(server, "door", "recognize")
    door, hall = Stream(channel_to(server.address, token=device)), Stream(channel_to(server.address, token=device))
    first = seen(door, pipeline, STRANGER, 1, "door-1", track=1)
    assert first.decision == recognition_pb2.DECISION_UNKNOWN and ID.match(first.unknown_id), first
    assert first.identity == "" and first.score == 0  # a device still learns nothing of the gallery
    again = seen(hall, pipeline, STRANGER, 2, "hall-2", track=1)
    assert again.decision == recognition_pb2.DECISION_UNKNOWN and again.unknown_id == first.unknown_id
    assert seen(door, pipeline, STRANGER, 3, "door-1").unknown_id == first.unknown_id  # another track
    other = seen(hall, pipeline, OTHER_STRANGER, 1, "hall-2")
    assert ID.match(other.unknown_id) and other.unknown_id != first.unknown_id
    known = seen(door, pipeline, "Tony_Blair", 2, "door-1")
    assert known.decision == recognition_pb2.DECISION_MATCH and known.unknown_id == ""
    for stream in (door, hall):
        stream.close()

    listed = unknowns_of(channel_to(server.address))
    assert set(listed) == {first.unknown_id, other.unknown_id}
    person = listed[first.unknown_id]
    assert person.sightings == 3 and sorted(person.cameras) == ["door-1", "hall-2"]
    assert person.first_seen_time_us <= person.last_seen_time_us and 1 <= len(person.crops) == person.crops_kept <= 3
    for kept in person.crops:
        picture = cv2.imdecode(np.frombuffer(kept.image.data, np.uint8), cv2.IMREAD_COLOR)
        assert picture.shape == (128, 128, 3) and kept.quality > 0 and kept.camera_id in ("door-1", "hall-2")
        assert np.allclose([(p.x, p.y) for p in kept.landmarks.points], CROP_TEMPLATE.points)
    assert [c.quality for c in person.crops] == sorted((c.quality for c in person.crops), reverse=True)
    assert all(not u.crops for u in unknowns_of(channel_to(server.address), max_crops=0).values())


@needs_shared
def test_ids_survive_a_restart(server_factory, channel_to, pipeline, tmp_path) -> None:
    folder = tmp_path / "restart"
    before = server_factory(gallery_dir=folder)
    stream = Stream(channel_to(before.address))
    unknown_id = seen(stream, pipeline, STRANGER, 1, "door-1").unknown_id
    stream.close()
    before.stop()
    after = server_factory(gallery_dir=folder)
    stream = Stream(channel_to(after.address))
    assert seen(stream, pipeline, STRANGER, 4, "door-1").unknown_id == unknown_id
    stream.close()
    assert unknowns_of(channel_to(after.address))[unknown_id].sightings == 2


@needs_shared
def test_unknowns_need_their_own_scope(server, channel_to, pipeline) -> None:
    stream = Stream(channel_to(server.address))
    unknown_id = seen(stream, pipeline, STRANGER, 1, "door-1").unknown_id
    stream.close()
    for scopes in (("recognize",), ("read", "enroll", "remove", "scores", "embeddings")):
        stub = gallery_pb2_grpc.GalleryStub(channel_to(server.address, token=token_for(server, "nosy", *scopes)))
        for call, request in ((stub.ListUnknowns, gallery_pb2.ListUnknownsRequest(max_crops=3)),
                              (stub.ForgetUnknown, gallery_pb2.ForgetUnknownRequest(unknown_id=unknown_id)),
                              (stub.EnrollUnknown, gallery_pb2.EnrollUnknownRequest(unknown_id=unknown_id, identity="X"))):
            error = refused(call, request)
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "'unknowns'" in error.details()
    viewer = gallery_pb2_grpc.GalleryStub(channel_to(server.address, token=token_for(server, "dpo", "unknowns")))
    assert unknown_id in {u.unknown_id for u in viewer.ListUnknowns(gallery_pb2.ListUnknownsRequest(), timeout=10).unknowns}
    error = refused(viewer.EnrollUnknown, gallery_pb2.EnrollUnknownRequest(unknown_id=unknown_id, identity="Hugo"))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "'enroll'" in error.details()
    assert refused(viewer.ForgetUnknown, gallery_pb2.ForgetUnknownRequest(unknown_id="u-000000000000")).code() == grpc.StatusCode.NOT_FOUND
    assert refused(viewer.ForgetUnknown, gallery_pb2.ForgetUnknownRequest(unknown_id="x")).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused(viewer.ListUnknowns, gallery_pb2.ListUnknownsRequest(page_size=101)).code() == grpc.StatusCode.INVALID_ARGUMENT
    records = read_audit(server.engine.config.audit_path)
    assert any(r["outcome"] == "denied" and r["principal"] == "token:dpo" and "'enroll'" in r["detail"] for r in records)
    assert any(r["call"] == "ListUnknowns" and r["principal"] == "token:dpo" for r in records)  # who looked


@needs_shared
def test_enroll_unknown_names_the_stranger_and_erases_the_cluster(server, channel_to, pipeline) -> None:
    stream = Stream(channel_to(server.address))
    unknown_id = seen(stream, pipeline, STRANGER, 1, "door-1").unknown_id
    assert seen(stream, pipeline, STRANGER, 2, "hall-2").unknown_id == unknown_id
    kept = unknowns_of(channel_to(server.address))[unknown_id].crops_kept
    namer = gallery_pb2_grpc.GalleryStub(channel_to(server.address, token=token_for(server, "desk", "unknowns", "enroll")))
    reply = namer.EnrollUnknown(gallery_pb2.EnrollUnknownRequest(unknown_id=unknown_id, identity="Hugo  Chavez"), timeout=60)
    assert reply.identity == "Hugo Chavez" and reply.templates_added == kept == reply.templates_total
    assert reply.unknown_id == unknown_id
    # Every gallery model's templates were made, as for any enrollment.
    models = {t.model_id for t in server.engine.gallery.templates_of("Hugo Chavez")}
    assert set(server.engine.recognizers) <= models
    later = seen(stream, pipeline, STRANGER, 3, "door-1")
    assert later.decision == recognition_pb2.DECISION_MATCH and later.identity == "Hugo Chavez" and later.unknown_id == ""
    stream.close()
    assert unknown_id not in unknowns_of(channel_to(server.address))
    error = refused(namer.EnrollUnknown, gallery_pb2.EnrollUnknownRequest(unknown_id=unknown_id, identity="Hugo Chavez"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    (record,) = [r for r in read_audit(server.engine.config.audit_path) if r["call"] == "EnrollUnknown" and r["outcome"] == "ok"]
    assert record["principal"] == "token:desk" and record["identity"] == "Hugo  Chavez"
    assert record["detail"] == f"from {unknown_id}" and record["counts"]["pictures"] == kept


def secrets_of(path: Path, unknown_id: str) -> dict[str, list[bytes]]:
    """Byte strings that give an unknown person away: windows of its centroid and of each kept
    JPEG's entropy-coded data (their headers are alike), read from the file itself."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        (centroid,) = conn.execute("SELECT centroid FROM clusters WHERE unknown_id = ?", (unknown_id,)).fetchone()
        jpegs = [j for (j,) in conn.execute(
            "SELECT jpeg FROM crops JOIN clusters c ON c.id = crops.cluster_id WHERE c.unknown_id = ?", (unknown_id,))]
    finally:
        conn.close()
    step = len(centroid) // 4
    out = {"id": [unknown_id.encode()], "centroid": [centroid[i : i + 16] for i in (0, step, 2 * step, len(centroid) - 16)]}
    out["crops"] = [j[k : k + 32] for j in jpegs for k in (len(j) // 2, len(j) * 3 // 4, len(j) - 40)]
    return out


def raw_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name.startswith(UNKNOWNS_DB))


def found(secrets: dict[str, list[bytes]], data: bytes) -> dict[str, int]:
    return {kind: sum(s in data for s in items) for kind, items in secrets.items() if any(s in data for s in items)}


@needs_shared
def test_forget_unknown_leaves_nothing_in_the_files(server, channel_to, pipeline) -> None:
    stream = Stream(channel_to(server.address))
    victim = seen(stream, pipeline, STRANGER, 1, "door-1").unknown_id
    seen(stream, pipeline, STRANGER, 2, "door-1")
    kept = seen(stream, pipeline, OTHER_STRANGER, 1, "door-1").unknown_id
    stream.close()
    folder = server.engine.config.gallery_dir
    path = folder / UNKNOWNS_DB
    secrets, theirs = secrets_of(path, victim), secrets_of(path, kept)
    assert len(secrets["crops"]) >= 6
    assert found(secrets, raw_bytes(folder)) == {k: len(v) for k, v in secrets.items()}  # the scan sees them

    dpo = gallery_pb2_grpc.GalleryStub(channel_to(server.address, token=token_for(server, "dpo", "unknowns")))
    reply = dpo.ForgetUnknown(gallery_pb2.ForgetUnknownRequest(unknown_id=victim), timeout=10)
    assert reply.crops_erased == 2
    data = raw_bytes(folder)  # the server still runs: the database file, its WAL and shm
    assert found(secrets, data) == {}
    assert found(theirs, data) == {k: len(v) for k, v in theirs.items()}
    assert set(unknowns_of(channel_to(server.address))) == {kept}
    assert refused(dpo.ForgetUnknown, gallery_pb2.ForgetUnknownRequest(unknown_id=victim)).code() == grpc.StatusCode.NOT_FOUND
    records = [r for r in read_audit(server.engine.config.audit_path) if r["call"] == "ForgetUnknown"]
    assert [(r["outcome"], r["identity"], r["principal"]) for r in records][:2] == [
        ("started", victim, "token:dpo"), ("ok", victim, "token:dpo")]
    assert records[1]["counts"] == {"crops": 2}
    for name in path.parent.iterdir():
        assert name.stat().st_mode & 0o077 == 0, name


@needs_shared
def test_retention_erases_old_strangers_at_start_and_records_it(server_factory, channel_to, pipeline, tmp_path) -> None:
    folder = tmp_path / "retained"
    first = server_factory(gallery_dir=folder)
    stream = Stream(channel_to(first.address))
    old = seen(stream, pipeline, STRANGER, 1, "door-1").unknown_id
    recent = seen(stream, pipeline, OTHER_STRANGER, 1, "door-1").unknown_id
    stream.close()
    first.stop()
    secrets = secrets_of(folder / UNKNOWNS_DB, old)
    conn = sqlite3.connect(folder / UNKNOWNS_DB)  # as if last seen 31 days ago
    with conn:
        conn.execute("UPDATE clusters SET last_seen_us = last_seen_us - ? WHERE unknown_id = ?", (31 * 86400 * 10**6, old))
    conn.close()

    second = server_factory(gallery_dir=folder)
    deadline = time.monotonic() + 10
    while old in unknowns_of(channel_to(second.address)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(unknowns_of(channel_to(second.address))) == {recent}
    assert found(secrets, raw_bytes(folder)) == {}
    (record,) = [r for r in read_audit(second.engine.config.audit_path) if r["call"] == "UnknownsRetention"]
    assert record["principal"] == "system:unknowns" and record["counts"] == {"unknowns": 1, "crops": 1}
    assert record["detail"] == f"not seen for 30 days: {old}"
    assert verify_audit(second.engine.config.audit_path)[0]


@needs_shared
def test_capacity_erases_the_least_recently_seen(server_factory, channel_to, pipeline) -> None:
    server = server_factory(unknowns=UnknownsConfig(max_unknowns=1))
    stream = Stream(channel_to(server.address))
    first = seen(stream, pipeline, STRANGER, 1, "door-1").unknown_id
    second = seen(stream, pipeline, OTHER_STRANGER, 1, "door-1").unknown_id
    stream.close()
    assert set(unknowns_of(channel_to(server.address))) == {second} and first != second
    records = [r for r in read_audit(server.engine.config.audit_path) if r["call"] == "UnknownsRetention"]
    assert [r["detail"] for r in records] == [f"over max_unknowns (1): {first}"]


@needs_shared
def test_no_unknowns_keeps_nothing(server_factory, channel_to, pipeline) -> None:
    server = server_factory(unknowns=UnknownsConfig(enabled=False))
    stream = Stream(channel_to(server.address))
    result = seen(stream, pipeline, STRANGER, 1, "door-1")
    stream.close()
    assert result.decision == recognition_pb2.DECISION_UNKNOWN and result.unknown_id == ""
    assert not (server.engine.config.gallery_dir / UNKNOWNS_DB).exists()
    assert unknowns_of(channel_to(server.address)) == {}


@needs_shared
def test_the_cli_lists_saves_crops_enrolls_and_forgets(server, channel_to, pipeline, tmp_path, capsys) -> None:
    from facelink.cli import main

    stream = Stream(channel_to(server.address))
    named = seen(stream, pipeline, STRANGER, 1, "door-1").unknown_id
    erased = seen(stream, pipeline, OTHER_STRANGER, 1, "door-1").unknown_id
    stream.close()
    token = tmp_path / "ops.token"
    token.write_text(token_for(server, "ops", "unknowns", "enroll") + "\n")
    client = ["--server", server.address, "--token-file", str(token)]
    assert main(["cloud", "unknowns", "list", *client, "--out", str(tmp_path / "crops"), "--crops", "2"]) == 0
    listed = capsys.readouterr().out
    assert named in listed and erased in listed and "door-1" in listed
    saved = sorted(p.name for p in (tmp_path / "crops").iterdir())
    assert saved == sorted([f"{named}-0.jpg", f"{erased}-0.jpg"])
    assert all(p.stat().st_mode & 0o077 == 0 for p in (tmp_path / "crops").iterdir())
    assert main(["cloud", "unknowns", "enroll", named, "Hugo Chavez", *client]) == 0
    assert "Hugo Chavez" in capsys.readouterr().out
    assert main(["cloud", "unknowns", "forget", "--all", *client]) == 0
    assert f"erased {erased}" in capsys.readouterr().out
    assert unknowns_of(channel_to(server.address)) == {}
    assert server.engine.gallery.resolve("Hugo Chavez") == "Hugo Chavez"
