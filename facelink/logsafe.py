"""Client strings made safe to print, and the one definition of a character nobody can see.

Anything a client sends (an identity name, a metadata value, a peer's certificate subject) may
hold a newline that starts a forged log line, an ANSI escape that rewrites a terminal, a bidi
override that shows text reversed, or a zero-width character that makes two different strings
look the same. `printable` escapes all of those so that a log line always shows exactly what
was received, on one line; `hidden` is the rule the gallery applies to names and metadata.
"""

from __future__ import annotations

import unicodedata

#: Categories with no visible glyph: controls (Cc), format characters (Cf: zero-width space and
#: joiners, bidi overrides, soft hyphen), lone surrogates (Cs), private use (Co: whatever a font
#: decides), unassigned (Cn: may get a meaning later) and the line/paragraph separators (Zl, Zp).
HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})

# Default-ignorable code points (Unicode DerivedCoreProperties) that are *not* in the categories
# above: they are letters or marks by category, yet render as nothing. The Hangul fillers are a
# known way to make a "blank" user name, and variation selectors make look-alikes of any text.
_IGNORABLE_RANGES = (
    (0x034F, 0x034F),  # COMBINING GRAPHEME JOINER
    (0x115F, 0x1160),  # HANGUL CHOSEONG / JUNGSEONG FILLER
    (0x17B4, 0x17B5),  # KHMER VOWEL INHERENT AQ / AA
    (0x180B, 0x180F),  # MONGOLIAN FREE VARIATION SELECTORS (180E is Cf, included for clarity)
    (0x3164, 0x3164),  # HANGUL FILLER
    (0xFE00, 0xFE0F),  # VARIATION SELECTOR-1..16
    (0xFFA0, 0xFFA0),  # HALFWIDTH HANGUL FILLER
    (0xE0100, 0xE01EF),  # VARIATION SELECTOR-17..256
)

ELLIPSIS = "\u2026"


def hidden(char: str) -> bool:
    """True if `char` (one character) has no visible glyph of its own.

    Space separators (Zs) are not judged here: U+0020 is visible as a gap, and whether a
    no-break or ideographic space is acceptable depends on whether the caller normalises it.
    """
    if unicodedata.category(char) in HIDDEN_CATEGORIES:
        return True
    code = ord(char)
    return any(low <= code <= high for low, high in _IGNORABLE_RANGES)


def escape_char(char: str) -> str:
    """`char` as a Python-style escape: \\xNN, \\uNNNN or \\UNNNNNNNN."""
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


_UNNAMED = {"Cc": "a control character", "Cs": "a surrogate", "Co": "private use", "Cn": "unassigned"}


def describe_char(char: str) -> str:
    """'U+200B (ZERO WIDTH SPACE)', for error messages that must name a character unseen."""
    category = unicodedata.category(char)
    name = unicodedata.name(char, "") or _UNNAMED.get(category, category)
    return f"U+{ord(char):04X} ({name})"


def _shown(char: str) -> str:
    # The backslash is doubled, or a client could send the four characters "\x0a" and have them
    # read as an escaped newline. Every space but U+0020 is escaped: a no-break space printed as
    # is would look like a space.
    if char == "\\":
        return "\\\\"
    if hidden(char) or (char != " " and unicodedata.category(char) == "Zs"):
        return escape_char(char)
    return char


def printable(text: object, limit: int = 200) -> str:
    """`text` for a log line: one line, every invisible character visible as an escape.

    Controls, newlines, format and private-use characters, unassigned code points and separators
    other than the plain space are escaped (\\xNN, \\uNNNN, \\UNNNNNNNN) and a backslash doubled;
    everything else, accents and scripts included, is kept. The result is at most `limit`
    characters: longer text is cut (never inside an escape) and ends with an ellipsis. A value
    that is not a string is printed as its str().
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    source = text if isinstance(text, str) else str(text)
    out: list[str] = []
    length = 0
    for char in source:
        piece = _shown(char)
        if length + len(piece) > limit:
            return _cut(out, length, limit)
        out.append(piece)
        length += len(piece)
    return "".join(out)


def _cut(pieces: list[str], length: int, limit: int) -> str:
    """The pieces, dropping whole pieces from the end until an ellipsis fits in `limit`."""
    while pieces and length + len(ELLIPSIS) > limit:
        length -= len(pieces.pop())
    return "".join(pieces) + ELLIPSIS
