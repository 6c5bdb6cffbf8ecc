"""The cloud gallery: who the server can name.

Two backends behind one interface (`GalleryBackend`, chosen by `open_gallery(spec)`): the
embedded `Gallery` and the distributed `QdrantGallery` (qdrant.py, imported on demand so that
qdrant-client stays optional).

`Gallery` keeps enrolled face templates durably in SQLite (`GalleryStore`) and searches them
with one exact faiss cosine index per model (`EmbeddingIndex`). Query models are served from
templates derived from the stored gallery-model ones (`QueryModel`). What a client may store
(normalised names, bounded metadata, quotas) is in `rules`; how an erasure leaves nothing
behind in the files is in `store`.
"""

from .backend import GalleryBackend, GallerySettings, is_backend_url, open_gallery
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
    "GalleryBackend",
    "GalleryError",
    "GalleryLimits",
    "GalleryQuotaError",
    "GallerySettings",
    "GalleryStore",
    "IdentityRecord",
    "InvalidIdentityError",
    "InvalidMetadataError",
    "Match",
    "QueryModel",
    "TemplateRecord",
    "UnknownIdentityError",
    "check_metadata",
    "is_backend_url",
    "normalize_identity",
    "open_gallery",
]
