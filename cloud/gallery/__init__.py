"""The cloud gallery: who the server can name.

`Gallery` keeps enrolled face templates durably in SQLite (`GalleryStore`) and searches them
with one exact faiss cosine index per model (`EmbeddingIndex`). Query models are served from
templates derived from the stored gallery-model ones (`QueryModel`). What a client may store
(normalised names, bounded metadata, quotas) is in `rules`; how an erasure leaves nothing
behind in the files is in `store`.
"""

from .derived import QueryModel
from .errors import (
    GalleryError,
    GalleryQuotaError,
    InvalidIdentityError,
    InvalidMetadataError,
    UnknownIdentityError,
)
from .gallery import Gallery
from .index import EmbeddingIndex, Match
from .rules import GalleryLimits, check_metadata, normalize_identity
from .store import (
    SCHEMA_VERSION,
    STATUSES,
    GalleryStore,
    IdentityRecord,
    TemplateRecord,
)

__all__ = [
    "SCHEMA_VERSION",
    "STATUSES",
    "EmbeddingIndex",
    "Gallery",
    "GalleryError",
    "GalleryLimits",
    "GalleryQuotaError",
    "GalleryStore",
    "IdentityRecord",
    "InvalidIdentityError",
    "InvalidMetadataError",
    "Match",
    "QueryModel",
    "TemplateRecord",
    "UnknownIdentityError",
    "check_metadata",
    "normalize_identity",
]
