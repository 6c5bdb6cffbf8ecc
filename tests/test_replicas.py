"""Stateless replicas: several servers on one gallery see each other's enrollments and erasures
within the documented bound (GalleryBackendConfig.replica_poll_s for the embedded gallery; at
once for Qdrant, where no server holds gallery state).

The first tests use no face models (fast): two `Gallery` objects on one folder, and a second
real process writing to it. The last runs two real gRPC servers on one gallery with real faces
(skipped without ../shared), once per backend."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from facelink.cloud.gallery import Gallery, GallerySettings

MODEL = "m@1"
DIM = 32
POLL_S = 0.2


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def names(gallery: Gallery, query: np.ndarray) -> list[str]:
    return [m.identity for m in gallery.search(MODEL, query, k=5)[0]]


def test_two_galleries_on_one_folder_see_each_others_changes_within_the_bound(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    settings = GallerySettings(replica_poll_s=POLL_S)
    with Gallery(tmp_path, settings=settings) as one, Gallery(tmp_path, settings=settings) as two:
        ada, bob = unit(rng.normal(size=(2, DIM))), unit(rng.normal(size=(1, DIM)))
        assert names(two, ada[:1]) == []  # polled now: the next poll is POLL_S away
        one.enroll_pictures("ada", {MODEL: ada})
        one.enroll_pictures("bob", {MODEL: bob})
        assert len(two) == 2 and "ada" in two  # the store itself is never stale
        time.sleep(POLL_S)
        assert names(two, ada[:1]) == ["ada", "bob"]  # the index, within the bound
        new = unit(rng.normal(size=(1, DIM)))
        two.enroll_pictures("ada", {MODEL: new}, replace=True)
        assert two.remove("bob") == 1
        time.sleep(POLL_S)
        assert names(one, ada[:1]) == ["ada"] and one.search(MODEL, ada[:1], k=1)[0][0].score < 0.9
        assert one.search(MODEL, new, k=1)[0][0].score > 0.999
        assert two.search(MODEL, new, k=5)[0][0].identity == "ada"  # its own writes: at once, no duplicates
        assert len(two.search(MODEL, new, k=5)[0]) == 1


def test_a_replica_rebuilds_when_the_feed_was_pruned_past_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    with Gallery(tmp_path, settings=GallerySettings(replica_poll_s=POLL_S)) as idle, \
            Gallery(tmp_path, settings=GallerySettings(replica_poll_s=POLL_S, feed_retention_s=0.0)) as busy:
        ada = unit(rng.normal(size=(1, DIM)))
        assert names(idle, ada) == []
        busy.enroll_pictures("ada", {MODEL: ada})
        busy.enroll_pictures("bob", {MODEL: unit(rng.normal(size=(1, DIM)))})  # prunes ada's entry
        floor, _, _ = busy._store.changes_since(0)
        assert floor > idle._seen  # the idle replica missed entries
        time.sleep(POLL_S)
        assert names(idle, ada) == ["ada", "bob"]


WRITER = """
import sys, numpy as np
from facelink.cloud.gallery import Gallery
with Gallery(sys.argv[1]) as g:
    if sys.argv[2] == "enroll":
        g.enroll_pictures("carol", {"m@1": np.load(sys.argv[3])})
    else:
        g.remove("carol")
"""


def test_another_process_enrolls_and_erases_and_this_one_follows(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    folder = tmp_path / "gallery"
    carol = unit(rng.normal(size=(1, DIM)))
    np.save(tmp_path / "carol.npy", carol)
    with Gallery(folder, settings=GallerySettings(replica_poll_s=POLL_S)) as here:
        here.enroll_pictures("dan", {MODEL: unit(rng.normal(size=(1, DIM)))})
        assert names(here, carol) == ["dan"]
        for action, expected in (("enroll", ["carol", "dan"]), ("erase", ["dan"])):
            subprocess.run([sys.executable, "-c", WRITER, str(folder), action, str(tmp_path / "carol.npy")],
                           check=True, timeout=60)
            time.sleep(POLL_S)
            assert names(here, carol) == expected, action


# -- two real servers --------------------------------------------------------------------------

@pytest.fixture(params=["embedded", "qdrant-local"])
def two_servers(request: pytest.FixtureRequest, tmp_path: Path, engine_parts):
    """Two real servers on one gallery: one folder (embedded), or one Qdrant (a shared client)."""
    from .support import needs_shared

    if needs_shared.args[0]:
        pytest.skip(needs_shared.kwargs["reason"])
    from facelink.cloud.auth import AuthStore
    from facelink.cloud.engine import RecognitionEngine
    from facelink.cloud.server import open_gallery, start_server
    from facelink.config import CloudConfig, GalleryBackendConfig

    from .conftest import TOKENS_BY_ADDRESS

    recognizer, detector = engine_parts
    backend = GalleryBackendConfig(replica_poll_s=POLL_S)
    config = CloudConfig(port=0, gallery_dir=tmp_path / "gallery", gallery_backend=backend, ensembles=())
    token = AuthStore(config.auth_path).create_token("test-admin", ["admin"])[1]
    if request.param == "embedded":
        galleries = [open_gallery(config), open_gallery(config)]
    else:
        pytest.importorskip("qdrant_client")
        from qdrant_client import QdrantClient

        from facelink.cloud.gallery.qdrant import QdrantGallery

        client = QdrantClient(path=str(tmp_path / "qdrant"))  # local mode: one client per folder
        galleries = [QdrantGallery(client, config.gallery_dir, local=True, owns_client=False) for _ in range(2)]
    servers = []
    for gallery in galleries:
        server = start_server(config, RecognitionEngine(config, gallery, recognizer, detector))
        TOKENS_BY_ADDRESS[server.address] = token
        servers.append(server)
    yield servers
    for server in servers:
        server.stop(grace=None)
    if request.param != "embedded":
        client.close()


def test_an_enrollment_and_an_erasure_through_one_server_reach_the_other_within_the_bound(
    two_servers, channel_to, engine_parts
) -> None:
    from facelink.config import EdgeConfig
    from facelink.edge.pipeline import EdgePipeline
    from facelink.edge.sources import Frame
    from facelink.v1 import common_pb2, gallery_pb2, gallery_pb2_grpc, recognition_pb2, recognition_pb2_grpc

    from .support import lfw_image, read_rgb

    first, second = two_servers
    pipeline = EdgePipeline(EdgeConfig(faces="central"), detector=engine_parts[1])

    def recognise(server, name: str, index: int) -> recognition_pb2.FaceResult:
        faces = pipeline.process(Frame(read_rgb(lfw_image(name, index)), index, 0, f"{name}_{index}"))
        stub = recognition_pb2_grpc.RecognitionStub(channel_to(server.address))
        return next(iter(stub.Recognize(iter([faces[0].observation]), timeout=30)))

    def enroll(server, name: str) -> None:
        image = common_pb2.Image(format=common_pb2.IMAGE_FORMAT_JPEG, data=lfw_image(name, 1).read_bytes())
        request = gallery_pb2.EnrollRequest(identity=name, images=[gallery_pb2.EnrollImage(image=image)])
        gallery_pb2_grpc.GalleryStub(channel_to(server.address)).Enroll(request, timeout=30)

    for name in ("Colin_Powell", "Serena_Williams"):
        enroll(first, name)
    time.sleep(POLL_S)  # the documented bound; the second server's next search must see them
    found = recognise(second, "Serena_Williams", 4)
    assert found.decision == recognition_pb2.DECISION_MATCH and found.identity == "Serena_Williams"
    assert recognise(first, "Serena_Williams", 4).identity == "Serena_Williams"

    gallery_pb2_grpc.GalleryStub(channel_to(second.address)).RemoveIdentity(
        gallery_pb2.RemoveIdentityRequest(identity="Serena_Williams"), timeout=30)
    listing = gallery_pb2_grpc.GalleryStub(channel_to(first.address)).ListIdentities(gallery_pb2.ListIdentitiesRequest())
    assert [i.identity for i in listing.identities] == ["Colin_Powell"]  # listing reads the store: at once
    time.sleep(POLL_S)
    for server in (first, second):
        gone = recognise(server, "Serena_Williams", 4)
        assert gone.identity != "Serena_Williams" and gone.decision != recognition_pb2.DECISION_MATCH
    assert recognise(first, "Colin_Powell", 2).identity == "Colin_Powell"
