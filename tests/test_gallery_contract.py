"""One contract, two gallery backends: every test here runs against the embedded gallery
(SQLite + faiss in a folder) and against Qdrant in its official local mode (qdrant-client's
embedded engine, `qdrant+local:///path`), both opened through `open_gallery(spec)` as the
server opens them. A remote Qdrant cluster runs the same code with a gRPC client; it is not
reachable from CI (docs/gallery.md says what ran where)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from facelink.cloud.gallery import (
    GalleryBackend,
    GalleryError,
    GalleryLimits,
    GalleryQuotaError,
    InvalidIdentityError,
    QueryModel,
    UnknownIdentityError,
    open_gallery,
)
from facelink.runtime.asymmetric import GalleryEnsemble, RejectionPolicy

A, B, Q = "a@1", "b@1", "q@1"  # two gallery models of different dimension, one query model
DIM_A, DIM_B, DIM_Q = 16, 24, 16
BACKENDS = ["embedded", "qdrant-local"]

Opener = Callable[..., GalleryBackend]


@pytest.fixture(params=BACKENDS)
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """opener(limits=None) opens (or reopens, after close) the same gallery of one backend."""
    if request.param == "qdrant-local":
        pytest.importorskip("qdrant_client", reason="the Qdrant backend needs qdrant-client (pip install facelink[qdrant])")
        spec: str | Path = f"qdrant+local://{tmp_path / 'qdrant'}"
    else:
        spec = tmp_path / "gallery"
    opened: list[GalleryBackend] = []

    def open_(limits: GalleryLimits | None = None) -> GalleryBackend:
        gallery = open_gallery(spec, limits, state_dir=tmp_path / "state")
        opened.append(gallery)
        return gallery

    yield open_
    for gallery in opened:
        gallery.close()


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def person(rng: np.random.Generator, n: int = 2) -> dict[str, np.ndarray]:
    """n pictures of one made-up person: a centre per model plus a little noise per picture."""
    return {m: unit(rng.normal(size=d) + 0.1 * rng.normal(size=(n, d))) for m, d in ((A, DIM_A), (B, DIM_B))}


def near(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return unit(x[:1] + 0.05 * rng.normal(size=x[:1].shape))


def query_model(tmp_path: Path, threshold: float | None = None, action: str = "flag") -> tuple[QueryModel, np.ndarray]:
    """A real ensemble: ONNX transforms from A (the identity) and B (random) into the query
    space, as the exporter writes them. Returns it and B's matrix."""
    pytest.importorskip("onnx", reason="the test writes tiny ONNX transforms with the onnx package")
    from tests.test_asymmetric_runtime import ensemble_in

    folder = tmp_path / "ensemble"
    folder.mkdir(exist_ok=True)
    matrices = {A: np.eye(DIM_A, DIM_Q), B: np.random.default_rng(42).normal(size=(DIM_B, DIM_Q))}
    policy = RejectionPolicy(0.1, action, threshold)  # type: ignore[arg-type]
    return QueryModel(GalleryEnsemble.load(ensemble_in(folder, matrices)), policy), matrices[B]


def test_enroll_and_search_per_model_return_distinct_identities_best_first(opener: Opener) -> None:
    rng = np.random.default_rng(0)
    gallery = opener()
    people = {name: person(rng, 3) for name in ("ada", "bob", "cy")}
    for name, pics in people.items():
        assert gallery.enroll_pictures(name, pics) == (3, 3)
    assert len(gallery) == 3 and "ada" in gallery and "zed" not in gallery
    assert gallery.dim(A) == DIM_A and gallery.dim(B) == DIM_B and gallery.dim("none@1") is None
    for model in (A, B):
        (best,) = gallery.search(model, near(people["bob"][model], rng), k=3)
        assert best[0].identity == "bob" and best[0].score > 0.9
        assert len({m.identity for m in best}) == 3  # three pictures each, yet three distinct people
        assert [m.score for m in best] == sorted((m.score for m in best), reverse=True)
    two = gallery.search(A, np.vstack([near(people["ada"][A], rng), near(people["cy"][A], rng)]), k=1)
    assert [r[0].identity for r in two] == ["ada", "cy"]
    assert gallery.search(A, near(people["ada"][A], rng), k=0) == [[]]
    assert gallery.search("unknown@1", near(people["ada"][A], rng), k=2) == [[]]
    with pytest.raises(ValueError, match="dimensional"):
        gallery.search(A, unit(rng.normal(size=(1, DIM_B))), k=1)
    with pytest.raises(ValueError, match="NaN"):
        gallery.search(A, np.full((1, DIM_A), np.nan), k=1)
    with pytest.raises(ValueError, match="same, non-zero number"):
        gallery.enroll_pictures("dee", {A: people["ada"][A], B: people["ada"][B][:1]})


def test_names_are_normalised_and_bad_ones_refused(opener: Opener) -> None:
    rng = np.random.default_rng(1)
    gallery = opener()
    gallery.enroll_pictures("  Ada   Lovelace ", person(rng))
    assert gallery.resolve("Ada Lovelace") == "Ada Lovelace" and "Ａｄａ Lovelace" in gallery
    (best,) = gallery.search(A, near(person(rng)[A], rng), k=1)
    assert best[0].identity == "Ada Lovelace"
    with pytest.raises(InvalidIdentityError):
        gallery.enroll_pictures("ada\u200b", person(rng))
    with pytest.raises(UnknownIdentityError):
        gallery.resolve("nobody")


def test_replace_forgets_the_old_pictures_and_metadata_merge_does_not(opener: Opener) -> None:
    rng = np.random.default_rng(2)
    gallery = opener()
    old, new = person(rng, 3), person(rng, 1)
    gallery.enroll_pictures("ada", old, metadata={"team": "a", "badge": "7"})
    assert gallery.enroll_pictures("ada", person(rng, 1), metadata={"badge": "8"}) == (1, 4)
    (record,), _ = gallery.list()
    assert record.templates == 4 and record.metadata == {"team": "a", "badge": "8"}
    assert gallery.enroll_pictures("ada", new, replace=True, metadata={"desk": "3"}) == (1, 1)
    (record,), total = gallery.list()
    assert total == 1 and record.templates == 1 and record.metadata == {"desk": "3"}
    (best,) = gallery.search(A, old[A][:1], k=1)
    assert best[0].score < 0.9  # the old pictures are gone: only the new centre is left
    (best,) = gallery.search(A, new[A], k=1)
    assert best[0].identity == "ada" and best[0].score > 0.999


def test_erasure_removes_every_trace_the_backend_exposes(opener: Opener, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    gallery = opener()
    ada, bob = person(rng, 2), person(rng, 1)
    gallery.enroll_pictures("Ada Erasable", ada, metadata={"badge": "7"})
    gallery.enroll_pictures("bob", bob)
    assert gallery.remove("Ada  Erasable") == 2  # looked up normalised
    assert "Ada Erasable" not in gallery and len(gallery) == 1
    assert [r.identity for r in gallery.list()[0]] == ["bob"]
    for model in (A, B):
        (found,) = gallery.search(model, ada[model][:1], k=5)
        assert [m.identity for m in found] == ["bob"]
    with pytest.raises(UnknownIdentityError):
        gallery.templates_of("Ada Erasable")
    with pytest.raises(UnknownIdentityError):
        gallery.remove("Ada Erasable")
    gallery.close()
    reopened = opener()  # and it stays gone
    assert "Ada Erasable" not in reopened and len(reopened) == 1
    if (tmp_path / "gallery").is_dir():  # the embedded backend: its files themselves
        for path in (tmp_path / "gallery").iterdir():
            assert b"Ada Erasable" not in path.read_bytes(), path.name


def test_list_pages_in_name_order_with_the_total(opener: Opener) -> None:
    rng = np.random.default_rng(4)
    gallery = opener()
    names = ["eve", "Zoe", "al", "bo", "cy", "dee", "fay"]
    for i, name in enumerate(names):
        gallery.enroll_pictures(name, person(rng, 1 + i % 3), metadata={"i": str(i)})
    pages, offset = [], 0
    while True:
        page, total = gallery.list(offset, 3)
        assert total == len(names)
        if not page:
            break
        pages.append(page)
        offset += len(page)
    listed = [r for page in pages for r in page]
    assert [r.identity for r in listed] == sorted(names) and [len(p) for p in pages] == [3, 3, 1]
    by_name = {r.identity: r for r in listed}
    assert by_name["cy"].templates == 1 + names.index("cy") % 3 and by_name["cy"].metadata == {"i": "4"}
    assert by_name["al"].created_time_us > 0
    assert gallery.list(100, 3) == ([], len(names))
    with pytest.raises(ValueError):
        gallery.list(-1, 3)


def test_derived_query_model_templates_are_rebuilt_from_stored_embeddings(opener: Opener, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    qm, _ = query_model(tmp_path)
    gallery = opener()
    people = {name: person(rng, 2) for name in ("ada", "bob")}
    for name, pics in people.items():
        gallery.enroll_pictures(name, pics)  # enrolled while the query model was not served
    assert gallery.search(Q, unit(rng.normal(size=(1, DIM_Q))), k=1) == [[]]
    counts = gallery.rebuild_derived(qm)
    assert counts == {"ok": 4, "flagged": 0, "dropped": 0}
    people["cy"] = person(rng, 2)
    gallery.enroll_pictures("cy", people["cy"], [qm])  # and derived at enrollment
    for name, pics in people.items():
        query = qm.ensemble.transform({A: pics[A][:1], B: pics[B][:1]}).vectors
        (best,) = gallery.search(Q, query, k=1)
        assert best[0].identity == name and best[0].score > 0.99
    assert gallery.dim(Q) == DIM_Q
    assert sorted(r.model_id for r in gallery.templates_of("cy")) == [A, A, B, B, Q, Q]
    assert gallery.rebuild_derived(qm) == {"ok": 6, "flagged": 0, "dropped": 0}  # idempotent, cy included
    assert sorted(r.model_id for r in gallery.templates_of("cy")) == [A, A, B, B, Q, Q]


def test_rejection_flags_are_recorded_and_dropped_templates_never_match(opener: Opener, tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    qm, matrix_b = query_model(tmp_path, threshold=0.2, action="drop")
    gallery = opener()
    # A's transform is the identity and B's a random map: a B embedding of x @ pinv(B) lands on
    # x in the query space. "calm": both models agree (uncertainty ~0); "torn": B says
    # something orthogonal to A (uncertainty 1), which the policy drops.
    face = unit(rng.normal(size=(1, DIM_A)))
    other = rng.normal(size=(1, DIM_A))
    other = unit(other - (other @ face.T) * face)
    inverse = np.linalg.pinv(matrix_b)
    calm = {A: face, B: unit(face @ inverse)}
    torn = {A: face, B: unit(other @ inverse)}
    gallery.enroll_pictures("calm", calm, [qm])
    gallery.enroll_pictures("torn", torn, [qm])
    verdict = {name: next(r for r in gallery.templates_of(name) if r.model_id == Q) for name in ("calm", "torn")}
    assert verdict["calm"].status == "ok" and verdict["calm"].uncertainty is not None and verdict["calm"].uncertainty < 0.01
    assert verdict["torn"].status == "dropped" and "disagree" in (verdict["torn"].reason or "")
    assert all(r.status == "ok" for r in gallery.templates_of("torn") if r.model_id != Q)
    query = qm.ensemble.transform(torn).vectors  # torn's own derived template, exactly
    assert [m.identity for m in gallery.search(Q, query, k=5)[0]] == ["calm"]  # torn is kept, never matched
    (by_a,) = gallery.search(A, face, k=2)
    assert {m.identity for m in by_a} == {"calm", "torn"}  # its gallery-model templates still match
    assert gallery.rebuild_derived(qm) == {"ok": 1, "flagged": 0, "dropped": 1}
    assert [m.identity for m in gallery.search(Q, query, k=5)[0]] == ["calm"]


def test_bounds_are_enforced_the_same_way(opener: Opener) -> None:
    rng = np.random.default_rng(7)
    gallery = opener(GalleryLimits(max_identities=2, max_pictures_per_identity=3, max_metadata_keys=2))
    gallery.enroll_pictures("ada", person(rng, 2), metadata={"a": "1"})
    gallery.enroll_pictures("bob", person(rng, 1))
    with pytest.raises(GalleryQuotaError, match="max_identities"):
        gallery.enroll_pictures("cy", person(rng, 1))
    with pytest.raises(GalleryQuotaError, match="max_pictures_per_identity"):
        gallery.enroll_pictures("ada", person(rng, 2))
    with pytest.raises(GalleryQuotaError, match="metadata keys"):
        gallery.enroll_pictures("ada", person(rng, 1), metadata={"b": "2", "c": "3"})
    assert gallery.enroll_pictures("ada", person(rng, 3), replace=True) == (3, 3)  # a replace frees them
    assert len(gallery) == 2 and "cy" not in gallery


def test_concurrent_writers_lose_nothing(opener: Opener) -> None:
    gallery = opener()
    errors: list[BaseException] = []

    def writer(worker: int) -> None:
        rng = np.random.default_rng(100 + worker)
        try:
            for i in range(5):
                gallery.enroll_pictures(f"w{worker}-{i}", person(rng, 1))
                gallery.enroll_pictures("shared", person(rng, 1))
            gallery.remove(f"w{worker}-0")
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    records, total = gallery.list(0, 100)
    assert total == 4 * 4 + 1
    assert {r.identity: r.templates for r in records}["shared"] == 4 * 5


def test_a_restart_keeps_everything(opener: Opener, tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    qm, _ = query_model(tmp_path)
    gallery = opener()
    ada = person(rng, 2)
    gallery.enroll_pictures("ada", ada, [qm], metadata={"k": "v"})
    gallery.enroll_pictures("bob", person(rng, 1), [qm])
    def state(g: GalleryBackend) -> tuple:
        found = [(m.identity, round(m.score, 5)) for m in g.search(A, ada[A][:1], k=2)[0]]
        return g.list(), g.templates_of("ada"), found

    before = state(gallery)
    gallery.close()
    with pytest.raises(GalleryError):
        gallery.search(A, ada[A][:1], k=1)
    assert state(opener()) == before


# -- choosing and reaching a backend -----------------------------------------------------------

def test_gallery_urls_are_parsed_and_unsafe_ones_refused(tmp_path: Path) -> None:
    from facelink.cloud.gallery.backend import is_backend_url, parse_qdrant_url

    remote = parse_qdrant_url("qdrants://db.internal/site-a")
    assert (remote.host, remote.port, remote.prefix, remote.tls, remote.local) == ("db.internal", 6334, "site-a", True, False)
    assert parse_qdrant_url("qdrant://10.0.0.5:7334").prefix == "facelink"
    assert parse_qdrant_url(f"qdrant+local://{tmp_path}").path == tmp_path
    assert is_backend_url("qdrant://x") and not is_backend_url("gallery") and not is_backend_url(tmp_path)
    for bad, why in (("qdrant://user:secret@db:6334", "no user, password"), ("qdrant://db:6334?api_key=x", "query"),
                     ("qdrant://db:6334/a/b", "prefix"), ("qdrant://:6334", "no host"), ("qdrant://db:99999", "(?i)port"),
                     ("qdrant+local://", "needs a folder")):
        with pytest.raises(GalleryError, match=why):
            parse_qdrant_url(bad)
    with pytest.raises(GalleryError, match="unknown URL scheme"):
        open_gallery("postgres://db/gallery", state_dir=tmp_path)
    with pytest.raises(GalleryError, match="state folder"):
        open_gallery("qdrant://db:6334")


def test_the_api_key_comes_from_the_environment_or_a_file_and_never_travels_in_plaintext(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("qdrant_client")
    from facelink.cloud.gallery.backend import API_KEY_ENV, GallerySettings, parse_qdrant_url, read_api_key
    from facelink.cloud.gallery.qdrant import QdrantGallery

    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    settings = GallerySettings(api_key_file=key_file)
    assert read_api_key(settings, {}) == "from-file"
    assert read_api_key(settings, {API_KEY_ENV: "from-env"}) == "from-env"
    assert read_api_key(GallerySettings(), {}) is None
    key_file.write_text("")
    with pytest.raises(GalleryError, match="empty"):
        read_api_key(settings, {})
    monkeypatch.setenv(API_KEY_ENV, "secret")
    with pytest.raises(GalleryError, match="plaintext") as refused:
        QdrantGallery.connect(parse_qdrant_url("qdrant://db.example:6334"), tmp_path / "state")
    assert "secret" not in str(refused.value)


def test_the_server_opens_the_configured_backend_and_keeps_its_own_files_in_the_state_folder(tmp_path: Path) -> None:
    pytest.importorskip("qdrant_client")
    from facelink.cloud.gallery import Gallery
    from facelink.cloud.gallery.qdrant import QdrantGallery
    from facelink.cloud.server import open_gallery as server_gallery
    from facelink.config import CloudConfig, GalleryBackendConfig

    embedded = CloudConfig(gallery_dir=tmp_path / "folder")
    with server_gallery(embedded) as gallery:
        assert isinstance(gallery, Gallery) and gallery.directory == tmp_path / "folder"
    url = f"qdrant+local://{tmp_path / 'engine'}"
    remote = CloudConfig(gallery_dir=tmp_path / "state", gallery_backend=GalleryBackendConfig(url=url))
    with server_gallery(remote) as gallery:
        assert isinstance(gallery, QdrantGallery) and gallery.directory == tmp_path / "state"
        assert remote.auth_path.parent == gallery.directory  # tokens and audit log stay local


def test_a_qdrant_enrollment_cut_short_is_never_searchable_and_is_swept(tmp_path: Path) -> None:
    """No transactions in Qdrant: a crash after the pending writes, before the flip to live,
    leaves nothing a search, a listing or a count shows; the next open deletes it."""
    pytest.importorskip("qdrant_client")
    from qdrant_client import QdrantClient

    from facelink.cloud.gallery.backend import GallerySettings
    from facelink.cloud.gallery.qdrant import QdrantGallery

    rng = np.random.default_rng(9)
    client = QdrantClient(path=str(tmp_path / "engine"))
    try:
        gallery = QdrantGallery(client, tmp_path / "state", local=True, owns_client=False)
        gallery.enroll_pictures("bob", person(rng, 1))
        ada = person(rng, 2)
        real_set_payload = client.set_payload

        def crash(*args: object, **kwargs: object) -> None:
            raise ConnectionError("the server died between the pending writes and the flip")

        client.set_payload = crash  # type: ignore[method-assign]
        with pytest.raises(ConnectionError):
            gallery.enroll_pictures("ada", ada)
        client.set_payload = real_set_payload  # type: ignore[method-assign]
        assert [m.identity for m in gallery.search(A, ada[A][:1], k=5)[0]] == ["bob"]
        assert "ada" not in gallery and len(gallery) == 1 and [r.identity for r in gallery.list()[0]] == ["bob"]
        assert client.count(gallery.pictures, exact=True).count == 3  # bob's, and ada's two pending
        swept = QdrantGallery(client, tmp_path / "state", settings=GallerySettings(pending_grace_s=1e-6),
                              local=True, owns_client=False)
        assert client.count(swept.pictures, exact=True).count == 1 and len(swept) == 1
        assert swept.enroll_pictures("ada", ada) == (2, 2)  # and the retry enrolls her
        assert swept.search(A, ada[A][:1], k=1)[0][0].identity == "ada"
    finally:
        client.close()
