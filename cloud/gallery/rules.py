"""What a client may store in the gallery: identity names, metadata, and how much of either.

Names are normalised so that two names a person reads as the same are one identity:

* Unicode NFKC, so compatibility forms fold into the plain ones: full-width "Ａｄａ" is "Ada",
  a no-break or ideographic space is a space, the ligature "ﬁ" is "fi";
* runs of spaces become one space, and leading and trailing spaces go;
* a character nobody can see is refused, not silently dropped (`facelink.logsafe.hidden`:
  controls, newlines, zero-width spaces and joiners, bidi overrides, private-use, unassigned,
  line and paragraph separators, fillers and variation selectors; and any space separator that
  NFKC does not turn into a plain space). Dropping them would accept a name the client did not
  mean; refusing says which character, where.

Case is kept: a name is a display name and is shown back as it was enrolled, "ada lovelace" is
visibly a different string from "Ada Lovelace" (the rule is about strings that *look* the same),
and case-insensitive equality is language-dependent (Turkish dotted and dotless i). Look-alikes
across scripts (a Cyrillic "а" for a Latin "a") are not caught: that needs the Unicode
confusables tables (UTS #39), which this module does not carry.

Lookups (remove, templates_of, membership) normalise the same way, after first trying the
exact string: a gallery written before names were normalised may hold "Ada  Lovelace" with two
spaces, and that identity must still be reachable by the name ListIdentities shows.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

from facelink.logsafe import describe_char, hidden, printable

from .errors import InvalidIdentityError, InvalidMetadataError

MAX_NAME_LENGTH = 256
# NFKC expands some characters up to 18-fold (U+FDFA); input longer than this cannot normalise to
# a valid name anyway, and bounding it first keeps a huge string from costing a normalisation.
_MAX_RAW_NAME_LENGTH = 4 * MAX_NAME_LENGTH
_SPACE_RUNS = re.compile(" {2,}")
_METADATA_KEY = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class GalleryLimits:
    """Bounds on everything a client can make the gallery store.

    `max_identities` is gallery-wide; `max_pictures_per_identity` counts pictures as
    ListIdentities does (templates of the model holding the most); metadata bounds apply to the
    identity's metadata after a merge, not only to one request's.
    """

    max_identities: int = 1_000_000
    max_pictures_per_identity: int = 1000
    max_metadata_keys: int = 32
    max_metadata_key_length: int = 64
    max_metadata_value_length: int = 1024

    def __post_init__(self) -> None:
        for field, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GalleryLimits.{field} must be a positive integer, got {value!r}")


def normalize_identity(name: object) -> str:
    """The canonical form of an identity name, or InvalidIdentityError saying what is wrong."""
    if not isinstance(name, str):
        raise InvalidIdentityError(f"identity must be a string, got {type(name).__name__}")
    if len(name) > _MAX_RAW_NAME_LENGTH:
        raise InvalidIdentityError(f"identity is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}")
    _check_visible(name, "identity")
    canonical = _SPACE_RUNS.sub(" ", unicodedata.normalize("NFKC", name)).strip(" ")
    if not canonical:
        raise InvalidIdentityError("identity must not be empty or only spaces")
    if len(canonical) > MAX_NAME_LENGTH:
        how = "" if canonical == name else " once normalised"
        raise InvalidIdentityError(
            f"identity is {len(canonical)} characters long{how}; the limit is {MAX_NAME_LENGTH}"
        )
    return canonical


def stored_form(name: object) -> str | None:
    """`name` itself if a gallery written before normalisation could hold it, else None.

    Those galleries refused only empty, over-long and control-character (Cc) names, and lone
    surrogates (Cs) cannot be sent to SQLite at all; any other string may be a stored name.
    """
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
        return None
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        return None
    return name


def check_metadata(metadata: Mapping[str, str] | None, limits: GalleryLimits) -> dict[str, str] | None:
    """A copy of `metadata` if every key and value is acceptable, else InvalidMetadataError.

    Keys are 1 to `max_metadata_key_length` characters of A-Z a-z 0-9 _ . - (they are field
    names, shown in tables and used in scripts); values are free text up to
    `max_metadata_value_length` characters without invisible characters or newlines (the same
    rule as names). Values are stored as given, not normalised: they are the client's data.
    """
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise InvalidMetadataError(f"metadata must be a mapping of strings, got {type(metadata).__name__}")
    if len(metadata) > limits.max_metadata_keys:
        raise InvalidMetadataError(f"metadata has {len(metadata)} keys; the limit is {limits.max_metadata_keys}")
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidMetadataError(
                f"metadata must map strings to strings, got {type(key).__name__} -> {type(value).__name__}"
            )
        _check_metadata_key(key, limits)
        _check_metadata_value(key, value, limits)
        out[key] = value
    return out


def _check_metadata_key(key: str, limits: GalleryLimits) -> None:
    shown = printable(key, 80)
    if not key or len(key) > limits.max_metadata_key_length:
        raise InvalidMetadataError(
            f"metadata key '{shown}' is {len(key)} characters long; keys are 1 to "
            f"{limits.max_metadata_key_length} characters"
        )
    if not _METADATA_KEY.fullmatch(key):
        index, char = next((i, c) for i, c in enumerate(key) if not _METADATA_KEY.fullmatch(c))
        raise InvalidMetadataError(
            f"metadata key '{shown}' holds {describe_char(char)} at index {index}; "
            "keys use only A-Z a-z 0-9 _ . -"
        )


def _check_metadata_value(key: str, value: str, limits: GalleryLimits) -> None:
    if len(value) > limits.max_metadata_value_length:
        raise InvalidMetadataError(
            f"metadata value of '{key}' is {len(value)} characters long; the limit is "
            f"{limits.max_metadata_value_length}"
        )
    _check_visible(value, f"metadata value of '{key}'", InvalidMetadataError)


def _check_visible(
    text: str, what: str, error: type[ValueError] = InvalidIdentityError
) -> None:
    """Raise `error` naming the first character of `text` nobody can see, and its index."""
    for index, char in enumerate(text):
        if _invisible(char):
            raise error(
                f"{what} '{printable(text, 80)}' holds {describe_char(char)} at index {index}, "
                "a character that cannot be seen; remove it"
            )


def _invisible(char: str) -> bool:
    # A space separator is acceptable only where NFKC turns it into the plain space (no-break,
    # en, em, ideographic spaces...); others (U+1680 OGHAM SPACE MARK) would stay as they are.
    if unicodedata.category(char) == "Zs":
        return char != " " and unicodedata.normalize("NFKC", char) != " "
    return hidden(char)
