"""Locating and reading the face data sets facelink is trained and evaluated on.

`LFW` is the benchmark (View 2 pairs are the test set; `LFW.training_images` is all training may
see of it), `CelebADev` the shared training/second-evaluation subset. Both are found by the
project's one lookup rule (argument, environment, ../shared, cache), and every miss raises
`DatasetNotFoundError` saying where we looked and what to pass instead.
"""

from facelink.datasets.celeba import CelebADev
from facelink.datasets.download import ChecksumError, DatasetNotFoundError, download, extract_tgz
from facelink.datasets.lfw import LFW, Pair

__all__ = ["LFW", "CelebADev", "ChecksumError", "DatasetNotFoundError", "Pair", "download", "extract_tgz"]
