"""The cloud gallery: who the server can name.

`Gallery` keeps enrolled face templates durably in SQLite (`GalleryStore`) and searches them
with one exact faiss cosine index per model (`EmbeddingIndex`). Query models are served from
templates derived from the stored gallery-model ones (`QueryModel`).
"""

from .derived import QueryModel
from .gallery import Gallery
from .index import EmbeddingIndex, Match
from .store import (
    SCHEMA_VERSION,
    STATUSES,
    GalleryError,
    GalleryStore,
    IdentityRecord,
    InvalidIdentityError,
    TemplateRecord,
    UnknownIdentityError,
)

__all__ = [
    "SCHEMA_VERSION",
    "STATUSES",
    "EmbeddingIndex",
    "Gallery",
    "GalleryError",
    "GalleryStore",
    "IdentityRecord",
    "InvalidIdentityError",
    "Match",
    "QueryModel",
    "TemplateRecord",
    "UnknownIdentityError",
]
