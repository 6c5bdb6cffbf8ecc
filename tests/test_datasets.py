"""facelink.datasets: the real ../shared copies (skipped when absent) and fakes that always run."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from facelink.config import shared_dir
from facelink.datasets import LFW, CelebADev, DatasetNotFoundError, download, extract_tgz
from facelink.datasets import lfw as lfw_module

SHARED_LFW = shared_dir() / "data" / "lfw"
SHARED_CELEBA = shared_dir() / "data" / "celeba-dev"
needs_lfw = pytest.mark.skipif(not SHARED_LFW.is_dir(), reason=f"shared LFW not present at {SHARED_LFW}")
needs_celeba = pytest.mark.skipif(
    not SHARED_CELEBA.is_dir(), reason=f"shared CelebA-dev not present at {SHARED_CELEBA}"
)


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No shared folder, an empty cache and no FACELINK_DATA: only what a test builds exists."""
    (tmp_path / "no-shared").mkdir()
    monkeypatch.setenv("FACELINK_SHARED", str(tmp_path / "no-shared"))
    monkeypatch.setenv("FACELINK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FACELINK_DATA", raising=False)
    return tmp_path


# --- the real data (../shared) ------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_lfw() -> LFW:
    return LFW.locate(SHARED_LFW, download=False)


@needs_lfw
@pytest.mark.shared
def test_shared_lfw_view2(shared_lfw: LFW) -> None:
    pairs = shared_lfw.pairs()
    assert len(pairs) == 6000
    per_fold = Counter((p.fold, p.same) for p in pairs)
    assert per_fold == {(fold, same): 300 for fold in range(10) for same in (True, False)}
    test, train = shared_lfw.pair_images(), shared_lfw.training_images()
    assert len(test) == 7701
    assert len(train) == 5532
    assert not test & set(train)
    people = shared_lfw.people()
    assert len(people) == 5749
    assert sum(map(len, people.values())) == 13233
    assert shared_lfw.image("Abel_Pacheco", 4).is_file()
    assert all(p.a.is_file() and p.b.is_file() for p in pairs[:10])


@needs_lfw
@pytest.mark.shared
def test_shared_lfw_accepts_image_folder(shared_lfw: LFW) -> None:
    by_images = LFW.locate(SHARED_LFW / "lfw-deepfunneled", download=False)
    assert (by_images.root, by_images.image_dir) == (shared_lfw.root, shared_lfw.image_dir)


@needs_celeba
@pytest.mark.shared
def test_shared_celeba_dev() -> None:
    celeba = CelebADev.locate()
    items = celeba.items()
    assert len(items) == 4092
    assert len(celeba.identities()) == 199
    assert items[0][0].is_file()


# --- fakes --------------------------------------------------------------------------------


def make_lfw(root: Path, pairs: str = "1\t1\nAna\t1\t2\nAna\t1\tBob\t1\n") -> Path:
    """A tiny LFW root: Ana (3 images), Bob (1), Cy (2), and the given pairs.txt."""
    images = root / "lfw-deepfunneled"
    for name, count in (("Ana", 3), ("Bob", 1), ("Cy", 2)):
        (images / name).mkdir(parents=True)
        for i in range(1, count + 1):
            (images / name / f"{name}_{i:04d}.jpg").write_bytes(b"\xff\xd8fake")
    (root / "pairs.txt").write_text(pairs)
    return root


def test_fake_lfw_parsed(isolated: Path) -> None:
    lfw = LFW.locate(make_lfw(isolated / "lfw"), download=False)
    img = lfw.image_dir
    assert lfw.pairs() == [
        lfw_module.Pair(img / "Ana" / "Ana_0001.jpg", img / "Ana" / "Ana_0002.jpg", same=True, fold=0),
        lfw_module.Pair(img / "Ana" / "Ana_0001.jpg", img / "Bob" / "Bob_0001.jpg", same=False, fold=0),
    ]
    ana1, ana2, ana3 = (img / "Ana" / f"Ana_000{i}.jpg" for i in (1, 2, 3))
    assert lfw.pair_images() == {ana1, ana2, img / "Bob" / "Bob_0001.jpg"}
    assert lfw.training_images() == [ana3, img / "Cy" / "Cy_0001.jpg", img / "Cy" / "Cy_0002.jpg"]
    assert list(lfw.people()) == ["Ana", "Bob", "Cy"]
    with pytest.raises(ValueError, match="1-based"):
        lfw.image("Ana", 0)


@pytest.mark.parametrize(
    ("pairs", "match"),
    [
        ("1\t1\nAna\t1\t2\nAna\t1\tBob\n", "line 3"),  # a different pair missing its index
        ("1\t1\nAna\t1\tBob\t1\nAna\t1\t2\n", "line 2"),  # blocks swapped
        ("1\t1\nAna\tx\t2\nAna\t1\tBob\t1\n", "line 2"),  # not an index
        ("10 300\nAna\t1\t2\nAna\t1\tBob\t1\n", "found 2"),  # header promises more lines
        ("ten\nAna\t1\t2\n", "line 1"),
    ],
)
def test_malformed_pairs(isolated: Path, pairs: str, match: str) -> None:
    lfw = LFW.locate(make_lfw(isolated / "lfw", pairs), download=False)
    with pytest.raises(ValueError, match=match):
        lfw.pairs()


def test_pairs_missing_image(isolated: Path) -> None:
    lfw = LFW.locate(make_lfw(isolated / "lfw", "1\t1\nAna\t1\t9\nAna\t1\tBob\t1\n"), download=False)
    with pytest.raises(FileNotFoundError, match="line 2.*Ana_0009.jpg"):
        lfw.pairs()


def test_resolution_order(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arg, env, shared = make_lfw(isolated / "arg"), make_lfw(isolated / "env"), isolated / "shared"
    make_lfw(shared / "data" / "lfw")
    monkeypatch.setenv("FACELINK_SHARED", str(shared))
    assert LFW.locate(download=False).root == (shared / "data" / "lfw").resolve()
    monkeypatch.setenv("FACELINK_DATA", str(env / "lfw-deepfunneled"))  # the image folder works too
    assert LFW.locate(download=False).root == env.resolve()
    assert LFW.locate(arg, download=False).root == arg.resolve()


def test_explicit_path_without_lfw_is_an_error(isolated: Path) -> None:
    (isolated / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="--data"):
        LFW.locate(isolated / "empty")  # no fallback, no download


def test_not_found_without_download(isolated: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        LFW.locate(download=False)
    message = str(err.value)
    assert "no-shared" in message and "cache" in message
    assert "--data" in message and "FACELINK_DATA" in message


def test_download_offline_fails_fast(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lfw_module, "LFW_URL", "http://127.0.0.1:9/lfw.tgz")
    monkeypatch.setattr(lfw_module, "PAIRS_URL", "http://127.0.0.1:9/pairs.txt")
    with pytest.raises(DatasetNotFoundError) as err:
        LFW.locate(download=True)
    message = str(err.value)
    assert "http://127.0.0.1:9/lfw.tgz" in message
    assert "--data" in message and "FACELINK_DATA" in message
    assert not list((isolated / "cache").rglob("*.part"))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """A local HTTP server (its own thread) serving one file; yields (url, its bytes)."""
    body = b"facelink test payload\n" * 100
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "blob.bin").write_bytes(body)
    handler = functools.partial(_QuietHandler, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/blob.bin", body
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_verifies_checksum(tmp_path: Path, served: tuple[str, bytes]) -> None:
    url, body = served
    dest = tmp_path / "out" / "blob.bin"
    with pytest.raises(DatasetNotFoundError, match="checksum"):
        download(url, dest, md5="0" * 32, desc="blob")
    assert not dest.exists() and not dest.with_name("blob.bin.part").exists()

    good = hashlib.md5(body).hexdigest()
    assert download(url, dest, md5=good, sha256=hashlib.sha256(body).hexdigest(), desc="blob") == dest
    assert dest.read_bytes() == body and not dest.with_name("blob.bin.part").exists()


def test_download_http_error(tmp_path: Path, served: tuple[str, bytes]) -> None:
    url, _ = served
    with pytest.raises(DatasetNotFoundError, match="404"):
        download(url.replace("blob.bin", "missing.bin"), tmp_path / "x", md5=None, desc="missing")


def _tgz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_extract_tgz(tmp_path: Path) -> None:
    archive = _tgz(tmp_path / "ok.tgz", {"top/a.txt": b"a", "top/sub/b.txt": b"b"})
    extract_tgz(archive, tmp_path / "out")
    assert (tmp_path / "out" / "top" / "sub" / "b.txt").read_bytes() == b"b"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["top"]  # no staging folder left


@pytest.mark.parametrize("name", ["../evil", "top/../../evil", "/tmp/evil"])
def test_extract_tgz_refuses_escapes(tmp_path: Path, name: str) -> None:
    archive = _tgz(tmp_path / "bad.tgz", {"top/fine.txt": b"ok", name: b"pwned"})
    with pytest.raises(ValueError, match="refusing"):
        extract_tgz(archive, tmp_path / "out")
    assert not (tmp_path / "evil").exists()
    assert list((tmp_path / "out").iterdir()) == []  # nothing extracted at all


def test_celeba_not_found(isolated: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="not downloadable"):
        CelebADev.locate()


def test_fake_celeba(isolated: Path) -> None:
    root = isolated / "celeba"
    (root / "images").mkdir(parents=True)
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        (root / "images" / name).write_bytes(b"")
    (root / "identity.txt").write_text("image identity\n2.jpg 7\n1.jpg 7\n3.jpg 5\n")
    celeba = CelebADev.locate(root)
    assert celeba.items()[0] == (root.resolve() / "images" / "2.jpg", 7)
    assert celeba.identities() == {5: [root.resolve() / "images" / "3.jpg"],
                                   7: [root.resolve() / "images" / n for n in ("1.jpg", "2.jpg")]}
    (root / "identity.txt").write_text("image identity\n1.jpg seven\n")
    with pytest.raises(ValueError, match="line 2"):
        CelebADev.locate(root).items()
