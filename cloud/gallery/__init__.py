"""The cloud gallery: who the server can name.

`Gallery` keeps enrolled face templates durably in SQLite (`GalleryStore`) and searches them
with one exact faiss cosine index per recognition model (`EmbeddingIndex`).
"""

from .gallery import Gallery
from .index import EmbeddingIndex, Match
from .store import (
    SCHEMA_VERSION,
    GalleryError,
    GalleryStore,
    IdentityRecord,
    InvalidIdentityError,
    UnknownIdentityError,
)

__all__ = [
    "SCHEMA_VERSION",
    "EmbeddingIndex",
    "Gallery",
    "GalleryError",
    "GalleryStore",
    "IdentityRecord",
    "InvalidIdentityError",
    "Match",
    "UnknownIdentityError",
]
