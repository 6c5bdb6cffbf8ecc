"""What the gallery raises on purpose; each maps onto one gRPC status in the service."""

from __future__ import annotations

from facelink.logsafe import printable


class GalleryError(Exception):
    """Base class of every error the gallery raises on purpose."""


class UnknownIdentityError(GalleryError, KeyError):
    """The identity is not enrolled (NOT_FOUND)."""

    def __init__(self, name: str) -> None:
        # printable, not repr: the name comes from a client and the message ends up in logs.
        super().__init__(f"unknown identity '{printable(name, 300)}'")
        self.identity = name

    def __str__(self) -> str:  # KeyError would otherwise print the message with extra quotes
        return str(self.args[0])


class InvalidIdentityError(GalleryError, ValueError):
    """The identity name is empty, too long, or holds a character nobody can see (INVALID_ARGUMENT)."""


class InvalidMetadataError(GalleryError, ValueError):
    """A metadata key or value breaks the rules of `rules.check_metadata` (INVALID_ARGUMENT)."""


class GalleryQuotaError(GalleryError):
    """Storing this would exceed a `GalleryLimits` bound (RESOURCE_EXHAUSTED): too many
    identities in the gallery, pictures of one identity, or metadata keys of one identity."""
