"""benchmarks/rate_accuracy.py: the parity point on synthetic curves, the CelebA pairs protocol,
learned codecs joining the sweep by themselves, and one tiny real run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from facelink.benchmarks import rate_accuracy as ra
from facelink.config import shared_dir

from .learned_codec_fixture import make_bundle

SHARED_LFW = shared_dir() / "data" / "lfw"
SHARED_MODELS = shared_dir() / "models"


# --- parity ------------------------------------------------------------------------------------
def test_parity_interpolates_in_log_bpp() -> None:
    # 98 at 0.1 bpp, 100 at 1 bpp; the band starts at 99.7, 85% of the way in log-bpp.
    point = ra.parity([0.1, 1.0], [98.0, 100.0], reference=100.0)
    assert point.status == "interpolated"
    assert point.bpp == pytest.approx(10 ** (-1 + 0.85))
    # A measured point exactly at the edge of the band is the parity point.
    assert ra.parity([0.1, 0.2, 0.4], [97.0, 99.7, 99.9], reference=100.0).bpp == pytest.approx(0.2)
    # Order of the points does not matter; above the reference counts as within.
    assert ra.parity([1.0, 0.1], [100.4, 98.0], reference=100.0).bpp == pytest.approx(10 ** (-1 + 1.7 / 2.4))


def test_parity_at_the_lowest_rate_and_never() -> None:
    low = ra.parity([0.2, 0.5, 1.0], [99.8, 99.9, 100.0], reference=100.0)
    assert (low.bpp, low.status) == (0.2, "at or below the lowest rate measured")
    never = ra.parity([0.2, 0.5, 1.0], [90.0, 95.0, 99.6], reference=100.0)
    assert (never.bpp, never.status) == (None, "not reached")


def test_monotone_fit_pools_adjacent_violators() -> None:
    np.testing.assert_allclose(ra.monotone_fit([1, 3, 2, 4]), [1, 2.5, 2.5, 4])
    np.testing.assert_allclose(ra.monotone_fit([5, 1, 1, 9]), [7 / 3] * 3 + [9])
    np.testing.assert_allclose(ra.monotone_fit([1, 2, 3]), [1, 2, 3])


def test_parity_of_non_monotonic_curves_reads_the_monotone_fit() -> None:
    # A dip at 0.4 bpp: 0.2 and 0.4 pool to 99.65, outside the band; the fit enters it between
    # 0.4 (99.65) and 0.8 (99.9), a fifth of the way.
    point = ra.parity([0.1, 0.2, 0.4, 0.8], [95.0, 99.8, 99.5, 99.9], reference=100.0)
    assert point.status == "interpolated"
    assert point.bpp == pytest.approx(0.4 * 2**0.2)
    # A lucky lowest point does not claim parity: it pools with the worse point after it.
    lucky = ra.parity([0.1, 0.2, 0.4, 0.8], [99.8, 98.0, 99.0, 99.9], reference=100.0)
    assert lucky.bpp == pytest.approx(0.4 * 2 ** (0.7 / 0.9))
    # An unlucky finest setting pools with the ones below it: parity holds if their mean does...
    assert ra.parity([0.1, 0.2, 0.4], [99.9, 99.9, 99.5], reference=100.0).status.startswith("at or below")
    # ...and not if it does not.
    assert ra.parity([0.1, 0.2, 0.4], [99.9, 99.9, 99.0], reference=100.0).bpp is None


def test_parity_rejects_bad_curves() -> None:
    with pytest.raises(ValueError):
        ra.parity([], [], reference=99.0)
    with pytest.raises(ValueError):
        ra.parity([0.0, 1.0], [98.0, 99.0], reference=99.0)


def test_parity_rows_give_the_ratio_to_x265_crf23() -> None:
    def row(protocol: str, codec: str, quality: int | None, bpp: float | None, acc: float) -> dict:
        return {
            "set": "lfw",
            "recognizer": "m",
            "protocol": protocol,
            "codec": codec,
            "quality": quality,
            "bpp": bpp,
            "accuracy_mean": acc,
            "pixels_per_face": 16384.0,
        }

    rows = [
        row(ra.ORIGINAL, ra.NOT_CODED, None, None, 99.0),
        row("edge", "x265", 23, 0.5, 99.0),
        row("edge", "x265", 36, 0.2, 97.0),
        row("edge", "jpeg", 10, 0.4, 98.0),
        row("edge", "jpeg", 50, 1.0, 98.6),
    ]
    by_codec = {p["codec"]: p for p in ra.parity_rows(rows)}
    x265 = by_codec["x265"]
    assert x265["x265_crf23_bpp"] == 0.5 and x265["status"] == "interpolated"
    assert x265["ratio_to_x265_crf23"] == pytest.approx(x265["bpp"] / 0.5)
    assert x265["bytes_per_face"] == pytest.approx(x265["bpp"] * 16384 / 8)
    assert by_codec["jpeg"]["bpp"] is None and by_codec["jpeg"]["ratio_to_x265_crf23"] is None
    assert x265["identity_status"] is None  # no identity cosine measured: no identity match


def test_parity_rows_match_x265_crf23s_identity_cosine() -> None:
    def row(codec: str, quality: int | None, bpp: float | None, acc: float, cosine: float | None) -> dict:
        return {"set": "lfw", "recognizer": "m", "protocol": ra.ORIGINAL if bpp is None else "edge",
                "codec": codec, "quality": quality, "bpp": bpp, "accuracy_mean": acc,
                "pixels_per_face": 16384.0, "identity_cosine": None if cosine is None else {"mean": cosine}}

    rows = [
        row(ra.NOT_CODED, None, None, 99.0, None),
        row("x265", 18, 1.0, 99.0, 0.99),
        row("x265", 23, 0.5, 98.8, 0.96),
        row("learned:x", 1, 0.2, 98.0, 0.94),
        row("learned:x", 2, 0.4, 98.5, 0.98),
    ]
    by_codec = {p["codec"]: p for p in ra.parity_rows(rows)}
    assert by_codec["x265"]["bpp_at_x265_crf23_identity"] == pytest.approx(0.5)
    learned = by_codec["learned:x"]
    # 0.96 is half way from 0.94 to 0.98: half way from 0.2 to 0.4 bpp in log scale.
    assert learned["bpp_at_x265_crf23_identity"] == pytest.approx(0.2 * 2**0.5)
    assert learned["identity_ratio_to_x265_crf23"] == pytest.approx(0.2 * 2**0.5 / 0.5)
    assert learned["status"] == "not reached"  # accuracy parity is a separate reading


# --- the CelebA pairs protocol -----------------------------------------------------------------
def synthetic_celeba(identities: int = 45, pictures: int = 6) -> list[tuple[Path, int]]:
    items = [
        (Path(f"/data/images/{i:03d}{j:02d}.jpg"), 1000 + i)
        for i in range(identities)
        for j in range(pictures)
    ]
    return items + [(Path("/data/images/lonely.jpg"), 9)]  # one picture only: cannot take part


def test_celeba_pairs_are_deterministic_and_identity_disjoint() -> None:
    items = synthetic_celeba()
    pairs = ra.celeba_pairs(items, per_fold=20)
    shuffled = list(items)
    random.Random(5).shuffle(shuffled)
    assert ra.celeba_pairs(shuffled, per_fold=20) == pairs  # a function of the data, not of its order
    assert ra.celeba_pairs(items, seed=1, per_fold=20) != pairs
    identity = {path: i for path, i in items}
    fold_identities: dict[int, set[int]] = {}
    for fold in range(10):
        in_fold = [p for p in pairs if p.fold == fold]
        assert sum(p.same for p in in_fold) == 20 and sum(not p.same for p in in_fold) == 20
        for p in in_fold:
            assert (identity[p.a] == identity[p.b]) == p.same and p.a != p.b
            fold_identities.setdefault(fold, set()).update({identity[p.a], identity[p.b]})
    for a in range(10):
        for b in range(a + 1, 10):
            assert not fold_identities[a] & fold_identities[b]
    keys = [frozenset((p.a, p.b)) for p in pairs]
    assert len(keys) == len(set(keys))  # no pair twice
    # Round-robin over identities: 4-5 identities per fold share the 20 same pairs evenly.
    same_fold0 = [identity[p.a] for p in pairs if p.fold == 0 and p.same]
    assert max(same_fold0.count(i) for i in set(same_fold0)) <= 5
    assert Path("/data/images/lonely.jpg") not in {x for p in pairs for x in (p.a, p.b)}


def test_celeba_pairs_refuse_a_set_too_small() -> None:
    with pytest.raises(ValueError):
        ra.celeba_pairs(synthetic_celeba(identities=12), per_fold=5)
    with pytest.raises(ValueError):
        ra.celeba_pairs(synthetic_celeba(identities=20, pictures=2), per_fold=5)  # 2 same pairs per fold


# --- the cache -----------------------------------------------------------------------------------
def test_two_runs_share_the_cache_without_locking_each_other(tmp_path: Path) -> None:
    """Rows wait in memory until a commit, so a run that is computing holds no lock on the file."""
    first, second = ra.Store(tmp_path / "c.sqlite"), ra.Store(tmp_path / "c.sqlite")
    second.db.execute("PRAGMA busy_timeout = 0")  # fail at once instead of waiting, were it locked
    coded = ra.Coded(100, 64, 30.0, 1.0, 2.0, 0.0, None)
    first.put_coded("a", "x.jpg", coded)
    second.put_coded("b", "y.jpg", coded)
    second.commit()
    assert first.coded("a") == {} and "y.jpg" in first.coded("b")  # pending rows are not written yet
    first.close()
    assert second.coded("a") == {"x.jpg": coded}
    second.close()


# --- learned codecs join by themselves ---------------------------------------------------------
def test_every_quality_of_every_bundled_learned_codec_is_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnx", reason="the synthetic learned codec is written with onnx")
    from facelink.runtime.codecs import learned

    manifest = make_bundle(tmp_path)
    monkeypatch.setattr(learned, "codec_manifests", lambda: {"synthetic": manifest})
    protocol = ra.protocols()["edge"]
    settings = ra.codec_settings(protocol, [ra.LEARNED], ra.SWEEPS, "medium")
    coded = [s for s in settings if s.make is not None]
    assert [(s.codec, s.quality) for s in coded] == [("learned:synthetic", 1), ("learned:synthetic", 2)]
    assert coded[0].spec["codec"].startswith("flc-synthetic-")  # keyed by the weights, not by the name
    assert coded[0].key("p") != coded[1].key("p")
    assert settings[0].label == "crop (not coded)"
    codec = coded[1].make()
    assert codec.decode(codec.encode(np.zeros((128, 128, 3), np.uint8))).shape == (128, 128, 3)


def test_face_aware_settings_join_the_full_and_edge_protocols(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnx", reason="the synthetic learned codec is written with onnx")
    from facelink.runtime.codecs import bitstream, learned

    manifest = make_bundle(tmp_path)
    monkeypatch.setattr(learned, "codec_manifests", lambda: {"synthetic": manifest})
    full, edge, edge112 = (ra.protocols()[name] for name in ("full", "edge", "edge112"))
    families = lambda p: [(s.codec, s.quality) for s in ra.codec_settings(p, [ra.LEARNED], ra.SWEEPS, "medium", ["synthetic"])]  # noqa: E731
    assert families(full) == [("learned:synthetic", 1), ("learned:synthetic", 2),
                              ("learned:synthetic+faces", 1), ("learned:synthetic+faces", 2)]
    assert families(edge) == [(ra.NOT_CODED, None), ("learned:synthetic", 1), ("learned:synthetic", 2),
                              ("learned:synthetic+faces", 1), ("learned:synthetic+faces", 2)]
    assert families(edge112) == [(ra.NOT_CODED, None), ("learned:synthetic", 1), ("learned:synthetic", 2)]
    ring = ra.codec_settings(edge, [ra.LEARNED], ra.SWEEPS, "medium", ["synthetic"])[-1].make()
    assert bitstream.unpack(ring.encode(np.zeros((128, 128, 3), np.uint8)))[0].regions == (bitstream.Region(1, 1, 7, 7),)
    aware = ra.codec_settings(full, [ra.LEARNED], ra.SWEEPS, "medium", ["synthetic"])[2]
    assert aware.spec["regions"]["background_step"] == 2 and aware.key("p") != ra.codec_settings(
        full, [ra.LEARNED], ra.SWEEPS, "medium")[0].key("p")
    only = [(s.codec, s.quality) for s in ra.codec_settings(edge, [ra.LEARNED], ra.SWEEPS, "medium", ["synthetic"],
                                                             face_aware_only=True)]
    assert only == [(ra.NOT_CODED, None), ("learned:synthetic+faces", 1), ("learned:synthetic+faces", 2)]
    second = [(s.codec, s.quality) for s in ra.codec_settings(edge, [ra.LEARNED], ra.SWEEPS, "medium", ["synthetic"],
                                                               learned_qualities=[2])]
    assert second == [(ra.NOT_CODED, None), ("learned:synthetic", 2), ("learned:synthetic+faces", 2)]
    with pytest.raises(SystemExit):
        ra.main(["--face-aware-only", "--protocols", "edge"])  # nothing face-aware named
    with pytest.raises(SystemExit):
        ra.main(["--face-aware", "nonesuch", "--protocols", "full"])
    with pytest.raises(SystemExit):
        ra.main(["--face-aware", "synthetic", "--protocols", "edge112"])


# --- one real run -------------------------------------------------------------------------------
@pytest.mark.shared
@pytest.mark.skipif(not SHARED_LFW.is_dir(), reason=f"shared LFW not present at {SHARED_LFW}")
@pytest.mark.skipif(
    not (SHARED_MODELS / "mobilefacenet-ms1m").is_dir() or not (SHARED_MODELS / "yunet").is_dir(),
    reason=f"MobileFaceNet / YuNet not present under {SHARED_MODELS}",
)
def test_end_to_end_tiny(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip(
        "imagecodecs", reason="the JPEG baseline needs imagecodecs: pip install 'facelink[bench]'"
    )
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib: pip install 'facelink[bench]'")
    monkeypatch.setenv("FACELINK_CACHE", str(tmp_path / "cache"))
    out, png = tmp_path / "ra.json", tmp_path / "ra.png"
    args = [
        "--data",
        str(SHARED_LFW),
        "--limit-pairs",
        "2",
        "--codecs",
        "jpeg",
        "--quality",
        "jpeg=20,60",
        "--recognizer",
        "mobilefacenet",
        "--protocols",
        "edge",
        "--json",
        str(out),
        "--plot",
        str(png),
    ]
    assert ra.main(args) == 0
    report = json.loads(out.read_text())
    assert report["command"].startswith("facelink bench rate-accuracy")
    assert report["sets"]["lfw"]["pairs"] == 40 and report["sets"]["lfw"]["limit_pairs"] == 2
    rows = {(r["protocol"], r["label"]): r for r in report["rows"]}
    assert set(rows) == {
        ("original", "original"),
        ("edge", "crop (not coded)"),
        ("edge", "jpeg q20"),
        ("edge", "jpeg q60"),
    }
    low, high = rows[("edge", "jpeg q20")], rows[("edge", "jpeg q60")]
    assert 0 < low["bytes_per_face"] < high["bytes_per_face"]
    assert high["bpp"] == pytest.approx(8 * high["bytes_per_face"] / (128 * 128))
    assert all(
        r["folds"] == 10 and r["pairs"] == 40 and 50 <= r["accuracy_mean"] <= 100 for r in rows.values()
    )
    assert low["encode_ms"]["median"] > 0 and rows[("original", "original")]["bpp"] is None
    (parity,) = report["parity"]
    assert (parity["protocol"], parity["codec"]) == ("edge", "jpeg") and parity["x265_crf23_bpp"] is None
    assert png.stat().st_size > 10_000
    assert "| codec" in capsys.readouterr().out

    # Again through the CLI: everything comes from the cache, the numbers do not move.
    from facelink.cli import main as cli_main

    assert cli_main(["bench", "rate-accuracy", "--", *args]) == 0
    again = {(r["protocol"], r["label"]): r for r in json.loads(out.read_text())["rows"]}
    assert again[("edge", "jpeg q20")]["accuracy_mean"] == low["accuracy_mean"]
    assert again[("edge", "jpeg q20")]["encode_ms"] == low["encode_ms"]  # not re-measured


# --- identity kept -------------------------------------------------------------------------------
def test_identity_cosine_compares_each_image_with_itself_uncoded() -> None:
    rng = np.random.default_rng(0)
    uncoded = rng.normal(size=(40, 8))
    assert ra.identity_cosine(3 * uncoded, uncoded) == pytest.approx({"mean": 1.0, "p5": 1.0})
    flipped = uncoded.copy()
    flipped[:4] *= -1  # a tenth of the faces lose their identity entirely
    kept = ra.identity_cosine(flipped, uncoded)
    assert kept["mean"] == pytest.approx(0.8) and kept["p5"] == pytest.approx(-1.0)


def test_identity_references_are_the_uncoded_crop_or_the_original() -> None:
    def setting(protocol: str, codec: str, coded: bool) -> ra.Setting:
        return ra.Setting(protocol, codec, 1 if coded else None, f"{protocol} {codec}", {"codec": codec},
                          {"protocol": protocol}, (lambda: None) if coded else None)

    original = setting(ra.ORIGINAL, ra.NOT_CODED, False)
    crop = setting("edge", ra.NOT_CODED, False)
    settings = [original, crop, setting("edge", "x265", True), setting("full", "x265", True)]
    assert ra.identity_references(settings) == {"edge": crop, "full": original}
