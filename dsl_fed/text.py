"""Names users type (labels, speakers, class lists): two names must never print alike.

A label ``rising`` followed by a zero-width space is a different class that prints exactly like ``rising``;
a line or paragraph separator breaks tables and logs. Such characters are refused where a name is read, and
names are compared by `spelling_key`, so ``SPK02`` and ``spk02`` (or a composed and a decomposed ``é``) are
one name written two ways.
"""

from __future__ import annotations

import unicodedata

from dsl_fed.errors import DslFedError

# Format (zero-width space, joiners, direction marks, BOM), control, line and paragraph separators.
INVISIBLE_CATEGORIES = frozenset({"Cf", "Cc", "Zl", "Zp"})


def invisible_character(text: str) -> str | None:
    """``U+200B ZERO WIDTH SPACE`` for the first character of `text` that does not print, else None."""
    for char in text:
        if unicodedata.category(char) in INVISIBLE_CATEGORIES:
            return f"U+{ord(char):04X} {unicodedata.name(char, 'control character')}"
    return None


def check_visible(text: str, what: str) -> None:
    """Raise if `text` holds a character that does not print; `what` names it (``"line 7: label"``)."""
    found = invisible_character(text)
    if found is not None:
        raise DslFedError(f"{what} {text!r} contains {found}, which does not print; remove it (two names would "
                          "look the same)")


def spelling_key(text: str) -> str:
    """What a reader sees: compatibility-normalised (NFKC) and case-folded."""
    return unicodedata.normalize("NFKC", text).casefold()
