"""Labeled Faces in the Wild: where it is, and which of its images are the test set.

LFW View 2 (`pairs.txt`) is the benchmark every face recogniser quotes, so the one rule that
keeps our numbers honest lives here: the 7,701 images `pairs.txt` references are the test set
(`LFW.pair_images`), and training may only ever see the others (`LFW.training_images`).

Finding the data follows the project's single lookup rule (see `facelink.config`): an explicit
argument, then $FACELINK_DATA, then ../shared/data/lfw, then our cache; only if all of those
miss is the official archive downloaded (and checksummed) into the cache.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from facelink.config import ENV_DATA, cache_dir, shared_dir
from facelink.datasets.download import DatasetNotFoundError, download, extract_tgz

# Official LFW files, URLs and md5 checksums as used by torchvision
# (torchvision/datasets/lfw.py: `download_url_prefix`, `file_dict["deepfunneled"]`, `checksums["pairs.txt"]`).
LFW_BASE_URL = "http://vis-www.cs.umass.edu/lfw/"
LFW_URL = LFW_BASE_URL + "lfw-deepfunneled.tgz"
LFW_MD5 = "68331da3eb755a505a502b5aacb3c201"
PAIRS_URL = LFW_BASE_URL + "pairs.txt"
PAIRS_MD5 = "9f1ba174e4e1c508ff7cdf10ac338a7d"

#: Image folders we recognise under an LFW root, preferred first (deep-funneled, then original).
IMAGE_DIR_NAMES = ("lfw-deepfunneled", "lfw")
PAIRS_FILE = "pairs.txt"
_HINT = (
    f"pass --data /path/to/lfw or set {ENV_DATA}=/path/to/lfw "
    "(a folder with pairs.txt and lfw-deepfunneled/)"
)


@dataclass(frozen=True)
class Pair:
    """One View 2 verification pair: two image paths, whether they show the same person, and
    the fold (0-based) it belongs to, so 10-fold evaluation can pick thresholds per fold."""

    a: Path
    b: Path
    same: bool
    fold: int


def _is_image_dir(path: Path) -> bool:
    """True if `path` holds LFW person folders (`<Name>/<Name>_NNNN.jpg`), judged from a few."""
    if not path.is_dir():
        return False
    with os.scandir(path) as it:
        for seen, entry in enumerate(it):
            if entry.is_dir() and (Path(entry.path) / f"{entry.name}_0001.jpg").is_file():
                return True
            if seen >= 50:
                break
    return False


def _resolve(path: Path) -> tuple[Path, Path] | str:
    """(root, image_dir) if `path` is an LFW root or its image folder, else why it is not."""
    if not path.exists():
        return "does not exist"
    if (path / PAIRS_FILE).is_file():
        for name in IMAGE_DIR_NAMES:
            if _is_image_dir(path / name):
                return path, path / name
        if _is_image_dir(path):  # pairs.txt dropped straight into the image folder
            return path, path
        return f"has {PAIRS_FILE} but no image folder ({' or '.join(IMAGE_DIR_NAMES)}/<Name>/<Name>_0001.jpg)"
    if _is_image_dir(path):
        if (path.parent / PAIRS_FILE).is_file():
            return path.parent, path
        return f"is an image folder but {path.parent / PAIRS_FILE} is missing"
    return f"has no {PAIRS_FILE} and no image folder ({' or '.join(IMAGE_DIR_NAMES)}/)"


class LFW:
    """A located LFW copy: `root` holds pairs.txt, `image_dir` the `<Name>/` folders."""

    root: Path
    image_dir: Path

    def __init__(self, root: Path, image_dir: Path) -> None:
        self.root = Path(root)
        self.image_dir = Path(image_dir)
        self._people: dict[str, list[Path]] | None = None
        self._pairs: list[Pair] | None = None

    def __repr__(self) -> str:
        return f"LFW(root={str(self.root)!r}, image_dir={str(self.image_dir)!r})"

    @classmethod
    def locate(cls, data: str | os.PathLike[str] | None = None, *, download: bool = True) -> LFW:
        """Find LFW: `data`, then $FACELINK_DATA, then shared_dir()/data/lfw, then cache_dir()/lfw.

        `data` (and $FACELINK_DATA) may name the root (with pairs.txt) or the image folder.
        A path the user gave explicitly that does not hold LFW is an error straight away: falling
        back to another copy (or a 100 MB download) would silently evaluate on data they did not
        ask for. If nothing is found and `download` is true, the official archive is fetched into
        the cache; otherwise, or if that fails, `DatasetNotFoundError` lists every place tried.
        """
        explicit = [("the data argument", data), (f"${ENV_DATA}", os.environ.get(ENV_DATA) or None)]
        for label, value in explicit:
            if value is None:
                continue
            path = Path(value).expanduser().resolve()
            found = _resolve(path)
            if isinstance(found, tuple):
                return cls(*found)
            raise DatasetNotFoundError(
                f"LFW not found at {path} (from {label}): it {found}. Point it at the folder that "
                f"contains {PAIRS_FILE} and lfw-deepfunneled/ (or at lfw-deepfunneled/ itself); {_HINT}"
            )

        tried: list[str] = []
        cache = cache_dir() / "lfw"
        for label, path in (("shared", shared_dir() / "data" / "lfw"), ("cache", cache)):
            found = _resolve(path)
            if isinstance(found, tuple):
                return cls(*found)
            tried.append(f"  {label}: {path} ({found})")
        searched = "LFW not found. Looked for pairs.txt + lfw-deepfunneled/ in:\n" + "\n".join(tried)
        if not download:
            raise DatasetNotFoundError(f"{searched}\nDownloading was not allowed; {_HINT}")
        try:
            _download_into(cache)
        except DatasetNotFoundError as err:
            raise DatasetNotFoundError(f"{searched}\nDownloading it failed: {err}") from err
        found = _resolve(cache)
        if not isinstance(found, tuple):  # the archive was not laid out as expected
            raise DatasetNotFoundError(f"{searched}\nDownloaded into {cache}, but it {found}; {_HINT}")
        return cls(*found)

    def people(self) -> dict[str, list[Path]]:
        """Name -> that person's image paths, sorted (names sorted too). Scanned once, cached."""
        if self._people is None:
            people: dict[str, list[Path]] = {}
            for entry in sorted(os.scandir(self.image_dir), key=lambda e: e.name):
                if entry.is_dir():
                    images = sorted(Path(entry.path, f) for f in os.listdir(entry.path) if f.endswith(".jpg"))
                    if images:
                        people[entry.name] = images
            self._people = people
        return self._people

    def image(self, name: str, index: int) -> Path:
        """The path of `name`'s `index`-th image, 1-based as in pairs.txt (not checked to exist)."""
        if index < 1:
            raise ValueError(f"LFW image indices are 1-based, got {index} for {name!r}")
        return self.image_dir / name / f"{name}_{index:04d}.jpg"

    def pairs(self) -> list[Pair]:
        """View 2: `folds` x (`n` same + `n` different) pairs, exactly as pairs.txt lists them.

        The header and every line are validated (field count, positive indices, image present),
        because a silently mis-parsed protocol gives plausible-looking but wrong accuracy. Any
        problem is a ValueError (FileNotFoundError for a missing image) naming the line.
        """
        if self._pairs is None:
            self._pairs = self._parse_pairs(self.root / PAIRS_FILE)
        return list(self._pairs)

    def _parse_pairs(self, path: Path) -> list[Pair]:
        lines = path.read_text(encoding="utf-8").splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        if not lines:
            raise ValueError(f"{path}: empty; expected a header line 'folds pairs_per_half'")
        header = lines[0].split()
        if len(header) != 2 or not all(h.isdigit() and int(h) > 0 for h in header):
            raise ValueError(
                f"{path} line 1: expected a header 'folds pairs_per_half' (e.g. '10 300'), got {lines[0]!r}"
            )
        folds, n = int(header[0]), int(header[1])
        expected = folds * 2 * n
        if len(lines) - 1 != expected:
            raise ValueError(
                f"{path}: header says {folds} folds x (2 x {n}) = {expected} pair lines, "
                f"found {len(lines) - 1}"
            )
        known = {p for images in self.people().values() for p in images}
        pairs: list[Pair] = []
        for offset, line in enumerate(lines[1:]):
            lineno = offset + 2
            fold, same = offset // (2 * n), offset % (2 * n) < n
            fields = line.split()
            want = "'name i j' (a same pair)" if same else "'name1 i name2 j' (a different pair)"
            if len(fields) != (3 if same else 4):
                raise ValueError(f"{path} line {lineno}: expected {want} in fold {fold}, got {line!r}")
            names, indices = (fields[:1] * 2, fields[1:]) if same else (fields[0::2], fields[1::2])
            if not all(i.isdigit() and int(i) >= 1 for i in indices):
                raise ValueError(
                    f"{path} line {lineno}: image indices must be positive integers, got {line!r}"
                )
            a, b = (self.image(name, int(i)) for name, i in zip(names, indices))
            for img in (a, b):
                if img not in known:
                    raise FileNotFoundError(
                        f"{path} line {lineno}: references {img}, which is not in {self.image_dir}"
                    )
            pairs.append(Pair(a=a, b=b, same=same, fold=fold))
        return pairs

    def pair_images(self) -> set[Path]:
        """Every image pairs.txt references: the TEST set, never to be trained on."""
        return {p for pair in self.pairs() for p in (pair.a, pair.b)}

    def training_images(self) -> list[Path]:
        """Every image pairs.txt does NOT reference (sorted): the only LFW images training may use."""
        test = self.pair_images()
        return [p for images in self.people().values() for p in images if p not in test]


def _download_into(cache: Path) -> None:
    """Fetch the official deep-funneled archive and pairs.txt into `cache`, verified by md5.

    Only what is missing is fetched; an image folder that does not look complete is replaced.
    The archive is deleted once extracted (it is 100+ MB and the images are what we read).
    """
    images = cache / IMAGE_DIR_NAMES[0]
    if not _is_image_dir(images):
        archive = download(
            LFW_URL, cache / "lfw-deepfunneled.tgz", md5=LFW_MD5, desc="LFW images", hint=_HINT
        )
        if images.exists():
            shutil.rmtree(images)
        extract_tgz(archive, cache)
        archive.unlink()
    download(PAIRS_URL, cache / PAIRS_FILE, md5=PAIRS_MD5, desc="LFW pairs.txt", hint=_HINT)
