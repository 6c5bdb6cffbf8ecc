"""The CelebA development subset from ../shared: training data that is not LFW.

It is a curated, downscaled subset (4,092 unaligned images of 199 identities) that exists only
in the shared folder; there is nothing official to download, so locating it never touches the
network and a miss says where the subset comes from.
"""

from __future__ import annotations

import os
from pathlib import Path

from facelink.config import ENV_SHARED, shared_dir
from facelink.datasets.download import DatasetNotFoundError

IDENTITY_FILE = "identity.txt"
IMAGES_DIR = "images"


class CelebADev:
    """A located CelebA-dev copy: `root/identity.txt` maps `root/images/*.jpg` to identity numbers."""

    root: Path
    image_dir: Path

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.image_dir = self.root / IMAGES_DIR
        self._items: list[tuple[Path, int]] | None = None

    def __repr__(self) -> str:
        return f"CelebADev(root={str(self.root)!r})"

    @classmethod
    def locate(cls, data: str | os.PathLike[str] | None = None) -> CelebADev:
        """`data` if given, else shared_dir()/data/celeba-dev. Never downloads (see module doc)."""
        source = "the data argument" if data is not None else f"${ENV_SHARED}/data/celeba-dev or ../shared"
        root = Path(data).expanduser().resolve() if data is not None else shared_dir() / "data" / "celeba-dev"
        missing = [IDENTITY_FILE] if not (root / IDENTITY_FILE).is_file() else []
        missing += [f"{IMAGES_DIR}/"] if not (root / IMAGES_DIR).is_dir() else []
        if missing:
            raise DatasetNotFoundError(
                f"CelebA-dev not found at {root} (from {source}): missing {', '.join(missing)}. "
                "This subset is not downloadable; it comes from the shared folder "
                "(../shared/data/celeba-dev). Pass its folder with --data PATH, "
                f"or set {ENV_SHARED}=PATH to the folder holding data/celeba-dev."
            )
        return cls(root)

    def items(self) -> list[tuple[Path, int]]:
        """(image path, identity number) for every line of identity.txt, in file order.

        Parsed once and validated (header, two fields, integer identity, image present), with
        the line number in any error, so a damaged copy fails here and not mid-training.
        """
        if self._items is None:
            path = self.root / IDENTITY_FILE
            lines = path.read_text(encoding="utf-8").splitlines()
            if not lines or lines[0].split() != ["image", "identity"]:
                got = lines[0] if lines else ""
                raise ValueError(f"{path} line 1: expected the header 'image identity', got {got!r}")
            present = set(os.listdir(self.image_dir))
            items: list[tuple[Path, int]] = []
            for lineno, line in enumerate(lines[1:], start=2):
                if not line.strip():
                    continue
                fields = line.split()
                if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
                    raise ValueError(f"{path} line {lineno}: expected 'file.jpg <identity>', got {line!r}")
                if fields[0] not in present:
                    raise FileNotFoundError(f"{path} line {lineno}: {fields[0]} is not in {self.image_dir}")
                items.append((self.image_dir / fields[0], int(fields[1])))
            self._items = items
        return list(self._items)

    def identities(self) -> dict[int, list[Path]]:
        """Identity number -> its image paths (sorted), identities in ascending order."""
        grouped: dict[int, list[Path]] = {}
        for image, identity in sorted(self.items(), key=lambda item: (item[1], item[0])):
            grouped.setdefault(identity, []).append(image)
        return grouped
