"""The forms text is matched in: canonical (NFKC, invisibles gone) and TR39 skeleton.

A content filter must judge what a reader sees, and a reader does not see invisible characters,
compatibility variants or look-alike letters of another script. This module brings a text to the
form patterns are matched against, turns a pattern written the natural way into the same form,
and maps a match in a folded text back to the characters it covers.

The character data comes from ICU (the ``icu`` module of ``icukit-pyicu``, which bundles ICU
itself): the ``Default_Ignorable_Code_Point`` property and the confusables of Unicode TR39,
through ``SpoofChecker.getSkeleton``. NFKC is Python's own :mod:`unicodedata`.
"""

from __future__ import annotations

import bisect
import itertools
import re
import unicodedata
from collections.abc import Callable

import icu  # type: ignore[import-not-found, import-untyped, unused-ignore]  # PyICU has no type information


def _code_point_class(unicode_set: str) -> str:
    """A regex character class body with the code points of an ICU set pattern."""
    members = icu.UnicodeSet(unicode_set)
    ranges = (
        (ord(members.getRangeStart(number)), ord(members.getRangeEnd(number)))
        for number in range(members.getRangeCount())
    )
    return "".join(f"\\U{start:08x}-\\U{end:08x}" for start, end in ranges)


# Every Default_Ignorable_Code_Point (U+00AD soft hyphen, U+034F combining grapheme joiner,
# U+115F/U+1160/U+3164/U+FFA0 Hangul fillers, U+200B..U+200F, U+2060.., U+FE00..U+FE0F variation
# selectors, U+E0000..U+E0FFF tags...) and every other format character (U+0600 Arabic number
# sign...): a reader does not see them as letters, so they must not split a word.
_INVISIBLE = re.compile(f"[{_code_point_class('[[:Default_Ignorable_Code_Point:][:Cf:]]')}]+")

# Unicode tag characters U+E0020..U+E007E mirror printable ASCII and render invisibly, yet
# models read them ("ASCII smuggling"): they become the ASCII they mirror, not nothing.
_TAG_OFFSET = 0xE0000
_FIRST_TAG, _LAST_TAG = 0xE0020, 0xE007E


def _visible_part(invisibles: re.Match[str]) -> str:
    return "".join(chr(ord(char) - _TAG_OFFSET) for char in invisibles.group() if _FIRST_TAG <= ord(char) <= _LAST_TAG)


def canonical_text(text: str) -> str:
    """``text`` as it is matched: tag characters as the ASCII they mirror, every other
    default-ignorable or format character dropped, then NFKC (full-width ``ｂａｎ`` is ``ban``).

    Invisibles go before NFKC, so that one between a letter and its accent (``e\\u034f\\u0301``)
    does not keep them from composing."""
    if text.isascii():
        return text
    if _INVISIBLE.search(text) is not None:
        text = _INVISIBLE.sub(_visible_part, text)
    return unicodedata.normalize("NFKC", text)


_SPOOF_CHECKER = icu.SpoofChecker()
_MARKS = icu.UnicodeSet("[[:Mn:][:Me:]]")  # accents and enclosing marks drawn over a letter
_NEVER_CONFUSABLE = frozenset({"Cn", "Co", "Cs"})  # unassigned, private use, surrogates


class _SkeletonTable(dict[int, str]):
    """Code point -> its skeleton piece, computed on first use (``str.translate`` calls
    ``__missing__``), so the ICU call (about a microsecond) is paid once per distinct character.
    It grows to at most the assigned characters (unassigned ones are never stored)."""

    def __init__(self, lower: bool):
        super().__init__()
        self._lower = lower

    def __missing__(self, code: int) -> str:
        char = chr(code)
        if unicodedata.category(char) in _NEVER_CONFUSABLE:
            raise LookupError(code)  # translate leaves it as it is
        skeleton = _SPOOF_CHECKER.getSkeleton(0, char)
        if self._lower:
            # A capital whose prototype is a capital (Greek Ν is N) folds like that capital's
            # lower case (n), not like its own (ν, a v); one whose prototype is not (I is l)
            # folds like its own lower case (i), so that I and i agree.
            lowered = skeleton.lower()
            skeleton = _SPOOF_CHECKER.getSkeleton(0, lowered if lowered != skeleton else char.lower())
        piece = "".join(part for part in skeleton if not _MARKS.contains(part))
        self[code] = piece
        return piece

    def piece_length(self, char: str) -> int:
        try:
            return len(self[ord(char)])
        except LookupError:
            return 1


_TABLES = {lower: _SkeletonTable(lower) for lower in (False, True)}


class Skeleton:
    """The TR39 skeleton of canonical text, one character at a time: confusables folded to one
    prototype (Cyrillic ``а``, Greek ``ο`` and dotless ``ı`` become ``a``, ``o``, ``i``; ``m``
    becomes ``rn``, ``0`` becomes ``O``, capital ``I`` becomes ``l``), combining and enclosing
    marks dropped (``b̲a̲n̲``, ``bán`` become ``ban``). With ``lower`` (case-insensitive matching)
    each character is folded with its lower case: ``I`` and ``i`` are both ``i`` (TR39 alone
    makes ``I`` an ``l``), Greek ``Ν`` and ``N`` are both ``n``, ``0`` and ``O`` both ``o``."""

    __slots__ = ("_table", "_ascii_singles", "_ascii_expansions")

    def __init__(self, lower: bool):
        self._table = _TABLES[lower]
        # ASCII text, the common case, takes str.translate's fast path, which holds only for
        # one ASCII character per character; the few longer pieces (m is rn) are replaced after.
        self._ascii_singles: dict[int, str] = {}
        self._ascii_expansions: list[tuple[str, str]] = []
        for code in range(128):
            piece = self._table[code]
            if len(piece) == 1 and piece.isascii():
                self._ascii_singles[code] = piece
            else:
                self._ascii_expansions.append((chr(code), piece))

    def fold(self, canonical: str) -> str:
        if not canonical.isascii():
            return canonical.translate(self._table)
        folded = canonical.translate(self._ascii_singles)
        for char, piece in self._ascii_expansions:
            if char in folded:
                folded = folded.replace(char, piece)
        return folded

    def literal(self, char: str) -> str:
        """The skeleton piece of one character of a pattern."""
        return char.translate(self._table)

    def to_canonical(self, canonical: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Spans of ``fold(canonical)`` as spans of ``canonical``: each covers every character
        whose skeleton piece the span touches (a match of ``n`` inside ``m``'s ``rn`` is ``m``)."""
        ends = list(itertools.accumulate(self._table.piece_length(char) for char in canonical))
        mapped = []
        for start, end in spans:
            first = bisect.bisect_right(ends, start)
            last = bisect.bisect_left(ends, end)
            mapped.append((min(first, len(canonical)), min(last + 1, len(canonical))))
        return mapped


# --- patterns --------------------------------------------------------------------------------

FLEXIBLE_SPACE = r"(?:[\s\v\x{1c}-\x{1f}\x{85}\p{Z}]*)"
"""What a space of a pattern becomes with ``flexible_whitespace``: any run of characters Python
calls whitespace (ASCII and Unicode spaces, line and paragraph separators, NEL), including none,
because invisibles (a zero-width space, a Hangul filler used as a space) are already gone."""

_REGEX_SYNTAX = frozenset(".^$|)*+?")
_NEEDS_ESCAPE = frozenset("\\.^$|?*+()[]{}")
_REPEAT = re.compile(r"\{\d+(?:,\d*)?\}")
_INLINE_FLAGS = re.compile(r"\(\?([imsU]*)(?:-[imsU]*)?[:)]")


class PatternFormError(ValueError):
    """A pattern cannot be brought to the form the text is matched in."""


def pattern_in_form(pattern: str, literal: Callable[[str], str] | None, flexible_whitespace: bool) -> str:
    """``pattern`` with each literal character replaced by ``literal(char)`` (escaped; wrapped
    in ``(?:...)`` unless it is one character) and, with ``flexible_whitespace``, each run of
    literal spaces by :data:`FLEXIBLE_SPACE`. Escapes (``\\d``, ``\\.``, ``\\x{41}``,
    ``\\p{Greek}``), character classes and repetition counts are kept as written; ``\\Q...\\E``
    text is literal. ``pattern`` must be valid RE2."""
    out: list[str] = []
    position, length = 0, len(pattern)
    while position < length:
        char = pattern[position]
        if char == "\\":
            if pattern.startswith("\\Q", position):
                close = pattern.find("\\E", position + 2)
                quoted_end = length if close < 0 else close
                out.extend(_literal(c, literal) for c in pattern[position + 2 : quoted_end])
                position = length if close < 0 else close + 2
                continue
            end = _escape_end(pattern, position)
        elif char == "[":
            end = _class_end(pattern, position)
        elif char == "(":
            end = _group_opening_end(pattern, position)
        elif char == "{" and (repeat := _REPEAT.match(pattern, position)) is not None:
            end = repeat.end()
        elif char in _REGEX_SYNTAX:
            end = position + 1
        elif char == " " and flexible_whitespace:
            while position < length and pattern[position] == " ":
                position += 1
            out.append(FLEXIBLE_SPACE)
            continue
        else:
            out.append(_literal(char, literal))
            position += 1
            continue
        out.append(pattern[position:end])
        position = end
    return "".join(out)


def inline_case_flag(pattern: str) -> bool:
    """Whether ``pattern`` turns case-insensitive matching on with an inline ``(?i)`` flag."""
    return any("i" in flags.group(1) for flags in _INLINE_FLAGS.finditer(pattern))


def _literal(char: str, literal: Callable[[str], str] | None) -> str:
    if literal is None:
        return char
    piece = literal(char)
    escaped = "".join("\\" + c if c in _NEEDS_ESCAPE else c for c in piece)
    return escaped if len(piece) == 1 else f"(?:{escaped})"


def _escape_end(pattern: str, start: int) -> int:
    # \pN, \p{Greek}, \x41, \x{41}, \123 (octal) and one-character escapes (\d, \., \b...).
    kind = pattern[start + 1 : start + 2]
    after = start + 2
    if kind in ("p", "P", "x") and pattern.startswith("{", after):
        close = pattern.find("}", after)
        return len(pattern) if close < 0 else close + 1
    if kind in ("p", "P"):
        return after + 1
    if kind == "x":
        return after + 2
    if kind.isdigit():
        while after < len(pattern) and after < start + 4 and pattern[after] in "01234567":
            after += 1
    return after


def _class_end(pattern: str, start: int) -> int:
    position = start + 1
    if pattern.startswith("^", position):
        position += 1
    if pattern.startswith("]", position):  # a ] first in a class is a member
        position += 1
    while position < len(pattern):
        char = pattern[position]
        if char == "\\":
            position = _escape_end(pattern, position)
            continue
        if pattern.startswith("[:", position):
            close = pattern.find(":]", position + 2)
            if close >= 0:
                position = close + 2
                continue
        if char == "]":
            return position + 1
        position += 1
    return position


def _group_opening_end(pattern: str, start: int) -> int:
    # "(", "(?:", "(?i)", "(?i:", "(?P<name>", "(?<name>": the syntax, not the group's content.
    if not pattern.startswith("(?", start):
        return start + 1
    if pattern.startswith(("(?P<", "(?<"), start):
        return pattern.find(">", start) + 1
    flags = _INLINE_FLAGS.match(pattern, start)
    return flags.end() if flags is not None else start + 2
