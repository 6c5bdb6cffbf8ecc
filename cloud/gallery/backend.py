"""One gallery interface, two backends, and the one place that picks between them.

The service layer (cloud/service.py, cloud/engine.py) holds a `GalleryBackend` and never asks
which one it has:

* the embedded default, `Gallery` (gallery.py): SQLite in a folder plus in-memory faiss
  indexes, with a change feed so that several server processes on one host can share the
  folder (replicas see each other's changes within `GallerySettings.replica_poll_s`);
* `QdrantGallery` (qdrant.py): a Qdrant cluster through its official client, holding no state
  in the server process, so any number of replicas serve one gallery; or Qdrant's local mode
  (`qdrant+local:///path`), which is what the contract tests run in CI.

`open_gallery(spec, ...)` chooses: a plain folder is the embedded gallery; `qdrant://host:port`
(plaintext gRPC), `qdrants://host:port` (TLS) or `qdrant+local:///path` is Qdrant, with an
optional collection prefix as the URL path (`qdrant://db:6334/site-a`). An API key never comes
in the URL or on the command line (it would show in `ps` and shell history): it is read from the
environment variable named by `API_KEY_ENV`, or from `GallerySettings.api_key_file`.
"""

from __future__ import annotations

import builtins
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol, TypeVar, runtime_checkable
from urllib.parse import unquote, urlsplit

import numpy as np

from facelink.config import GalleryIndexConfig

from .derived import QueryModel
from .errors import GalleryError
from .index import Match, unit_rows
from .rules import GalleryLimits, normalize_identity
from .store import IdentityRecord, TemplateRecord, Templates, validate_model_id

#: The environment variable an API key for a remote Qdrant is read from.
API_KEY_ENV = "FACELINK_QDRANT_API_KEY"
#: Schemes that select the Qdrant backend.
QDRANT_SCHEMES = ("qdrant", "qdrants", "qdrant+local")
DEFAULT_QDRANT_PORT = 6334  # Qdrant's gRPC port
DEFAULT_PREFIX = "facelink"
_PREFIX = re.compile(r"[A-Za-z0-9_-]{1,64}")


@runtime_checkable
class GalleryBackend(Protocol):
    """What the service layer asks of a gallery: exactly the operations it uses.

    `directory` is a local folder either way: the server keeps its credentials (auth.json), its
    audit log and the unknown people's store there, which are per deployment, not per backend.
    """

    directory: Path

    @property
    def limits(self) -> GalleryLimits: ...

    def enroll_pictures(
        self,
        identity: str,
        embeddings: Mapping[str, np.ndarray],
        query_models: Sequence[QueryModel] = (),
        *,
        replace: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> tuple[int, int]: ...

    def rebuild_derived(self, query_model: QueryModel) -> dict[str, int]: ...

    def remove(self, identity: str) -> int: ...

    def search(self, model_id: str, queries: np.ndarray, k: int = 5) -> builtins.list[builtins.list[Match]]: ...

    def templates_of(self, identity: str) -> builtins.list[TemplateRecord]: ...

    def resolve(self, identity: str) -> str: ...

    def dim(self, model_id: str) -> int | None: ...

    def __contains__(self, identity: object) -> bool: ...

    def __len__(self) -> int: ...

    def list(self, offset: int = 0, limit: int = 100) -> tuple[builtins.list[IdentityRecord], int]: ...

    def close(self) -> None: ...


_Closing = TypeVar("_Closing", bound="ContextClosing")


class ContextClosing:
    """`with backend:` closes it at the end (both backends)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Closing) -> _Closing:  # noqa: PYI019 - typing.Self needs Python 3.11
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass(frozen=True)
class GallerySettings:
    """How to reach and run a gallery backend (filled from `facelink.config.GalleryConfig`)."""

    #: Embedded replicas: a search applies other processes' changes first when its last look at
    #: the change feed is older than this, so a change is seen by every replica within it.
    replica_poll_s: float = 0.5
    #: Change-feed entries older than this are pruned; a replica idle for longer rebuilds.
    feed_retention_s: float = 3600.0
    api_key_file: Path | None = None
    timeout_s: float = 10.0
    #: Qdrant collection layout, applied when the collections are created.
    shards: int = 1
    replication_factor: int = 1
    write_consistency_factor: int = 1
    #: Picture points still marked pending after this long are a crashed enrollment's: deleted.
    pending_grace_s: float = 600.0
    #: The embedded gallery's index choice (exact below a size, HNSW above; cloud/gallery/ann.py);
    #: None takes GalleryIndexConfig's defaults. Qdrant indexes by its own collection settings.
    index: GalleryIndexConfig | None = None
    #: The embedded gallery's template precision on disk (store.VectorStorage); Qdrant: float32.
    #: float32 here, exact for library use; a server takes GalleryBackendConfig's (float16).
    vector_storage: Literal["float16", "float32"] = "float32"


@dataclass(frozen=True)
class QdrantLocation:
    """A parsed `qdrant://`, `qdrants://` or `qdrant+local://` URL."""

    scheme: str
    host: str | None
    port: int | None
    path: Path | None  # local mode
    prefix: str

    @property
    def local(self) -> bool:
        return self.scheme == "qdrant+local"

    @property
    def tls(self) -> bool:
        return self.scheme == "qdrants"

    def __str__(self) -> str:  # what logs show: never a secret, which the URL may not carry anyway
        if self.local:
            return f"qdrant+local://{self.path} (collections {self.prefix}_*)"
        return f"{self.scheme}://{self.host}:{self.port} (collections {self.prefix}_*)"


def is_backend_url(spec: str | Path) -> bool:
    """True for a `qdrant...://` URL, False for a folder path."""
    return isinstance(spec, str) and spec.split("://", 1)[0].lower() in QDRANT_SCHEMES and "://" in spec


def parse_qdrant_url(url: str) -> QdrantLocation:
    """Parse a Qdrant gallery URL, or raise GalleryError saying what is wrong with it."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in QDRANT_SCHEMES:
        raise GalleryError(f"gallery URL {url!r}: the scheme must be one of {', '.join(QDRANT_SCHEMES)}")
    if parts.username or parts.password or parts.query or parts.fragment:
        # Credentials in a URL end up in process listings, shell history and logs.
        raise GalleryError(
            f"gallery URL: give no user, password, query or fragment; the API key is read from ${API_KEY_ENV} "
            "or --gallery-api-key-file"
        )
    if scheme == "qdrant+local":
        if parts.netloc not in ("", "localhost"):
            raise GalleryError(f"gallery URL {url!r}: qdrant+local takes a path, qdrant+local:///var/lib/gallery")
        path = unquote(parts.path)
        if not path or path == "/":
            raise GalleryError(f"gallery URL {url!r}: qdrant+local needs a folder, qdrant+local:///var/lib/gallery")
        return QdrantLocation(scheme, None, None, Path(path), DEFAULT_PREFIX)
    if not parts.hostname:
        raise GalleryError(f"gallery URL {url!r} names no host")
    try:
        port = parts.port or DEFAULT_QDRANT_PORT
    except ValueError as exc:
        raise GalleryError(f"gallery URL {url!r}: {exc}") from exc
    prefix = parts.path.strip("/") or DEFAULT_PREFIX
    if not _PREFIX.fullmatch(prefix):
        raise GalleryError(
            f"gallery URL {url!r}: the collection prefix {prefix!r} must be 1-64 letters, digits, '_' or '-'"
        )
    return QdrantLocation(scheme, parts.hostname, port, None, prefix)


def read_api_key(settings: GallerySettings, environ: Mapping[str, str] | None = None) -> str | None:
    """The Qdrant API key from $FACELINK_QDRANT_API_KEY or the key file; None if neither is set."""
    env = os.environ if environ is None else environ
    if env.get(API_KEY_ENV):
        return env[API_KEY_ENV].strip()
    if settings.api_key_file is None:
        return None
    try:
        key = Path(settings.api_key_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise GalleryError(f"cannot read the Qdrant API key file {settings.api_key_file}: {exc.strerror}") from exc
    if not key:
        raise GalleryError(f"the Qdrant API key file {settings.api_key_file} is empty")
    return key


def open_gallery(
    spec: str | Path,
    limits: GalleryLimits | None = None,
    settings: GallerySettings | None = None,
    *,
    state_dir: str | Path | None = None,
) -> GalleryBackend:
    """Open the gallery `spec` names: a folder (embedded) or a Qdrant URL.

    `state_dir` is the local folder a Qdrant-backed server keeps its own files in (credentials,
    audit log, unknown people); for a folder `spec` it is that folder.
    """
    settings = settings or GallerySettings()
    if not is_backend_url(spec):
        if isinstance(spec, str) and "://" in spec:
            raise GalleryError(
                f"gallery {spec!r}: unknown URL scheme; use a folder or one of "
                + ", ".join(f"{s}://" for s in QDRANT_SCHEMES)
            )
        from .gallery import Gallery

        return Gallery(spec, limits, settings)
    from .qdrant import QdrantGallery

    location = parse_qdrant_url(str(spec))
    if state_dir is None:
        raise GalleryError(f"a gallery at {location} needs a local state folder for credentials and the audit log")
    return QdrantGallery.connect(location, state_dir, limits, settings)


def prepare_pictures(
    identity: str, embeddings: Mapping[str, np.ndarray], query_models: Sequence[QueryModel]
) -> tuple[builtins.list[str], builtins.list[Templates]]:
    """Check an enrollment of n pictures and build what both backends store for it.

    Returns the n new picture keys (UUIDs, as hex) and one `Templates` per gallery model and per
    query model (derived, with the rejection policy's verdict). Raises InvalidIdentityError for
    a bad name and ValueError for bad arrays (see `Gallery.enroll_pictures`).
    """
    normalize_identity(identity)  # refuse a bad name before any work on the arrays
    if not embeddings:
        raise ValueError("embeddings must hold at least one gallery model")
    vectors = {validate_model_id(m): unit_rows(e, f"{m} embeddings") for m, e in embeddings.items()}
    sizes = {len(v) for v in vectors.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"every model needs the same, non-zero number of pictures; got {sorted(sizes)}")
    keys = [uuid.uuid4().hex for _ in range(sizes.pop())]
    batches = [Templates.ok(m, v, keys) for m, v in vectors.items()]
    batches += [q.derive(vectors, keys) for q in query_models]
    if len({b.model_id for b in batches}) != len(batches):
        raise ValueError(f"a model appears twice among {[b.model_id for b in batches]}")
    return keys, batches


def check_search(model_id: str, queries: np.ndarray, k: int) -> np.ndarray:
    """Validate a search's arguments; returns the unit query rows."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    validate_model_id(model_id)
    return unit_rows(queries, "queries")


def check_dim(model_id: str, stored: int, given: int) -> None:
    if stored != given:
        raise ValueError(
            f"model {model_id!r} holds {stored}-dimensional templates; got {given}-dimensional queries"
        )


def check_page(offset: int, limit: int) -> None:
    if offset < 0 or limit < 0:
        raise ValueError(f"offset and limit must be >= 0, got offset={offset}, limit={limit}")
