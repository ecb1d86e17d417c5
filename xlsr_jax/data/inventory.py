"""`xlsr-jax inventory`: the characters of a source's transcripts before and after normalisation.

Every character that survives normalisation becomes a vocabulary entry, so this is where a user sees
what the model will have to spell and decides what to add to `data.chars_to_ignore`, with the seed's
rule in mind: never remove a character that changes a word's meaning (an apostrophe in English it's,
the ı of Turkish ışık).
"""

from __future__ import annotations

import collections
import dataclasses
import unicodedata
from typing import Iterable

from xlsr_jax.data.sources import Example
from xlsr_jax.text import TextNormalization


@dataclasses.dataclass(frozen=True)
class CharCount:
    char: str
    count: int
    example: str  # the first word it appeared in

    @property
    def code(self) -> str:
        return f"U+{ord(self.char):04X}"

    @property
    def name(self) -> str:
        return unicodedata.name(self.char, f"<unnamed {unicodedata.category(self.char)}>")


@dataclasses.dataclass(frozen=True)
class Inventory:
    """Characters of ``utterances`` transcripts, most frequent first, before and after normalisation."""

    utterances: int
    before: list[CharCount]
    after: list[CharCount]
    normalization: TextNormalization


def count_chars(texts: Iterable[str]) -> list[CharCount]:
    """Every character of ``texts`` except the space, with its count and first word; most frequent first."""
    counts: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    for text in texts:
        counts.update(text)
        for char in set(text) - examples.keys():
            examples[char] = next((w for w in text.split() if char in w), text.strip())
    counts.pop(" ", None)
    return [CharCount(c, n, examples[c]) for c, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def character_inventory(examples: list[Example], normalization: TextNormalization) -> Inventory:
    """Raw and normalised character counts of ``examples``, each normalised with its own locale when
    ``normalization`` has no language (as training does)."""
    return Inventory(len(examples), count_chars(e.text for e in examples),
                     count_chars(normalization(e.text, e.language) for e in examples), normalization)


def _shown(char: str) -> str:
    """A printable stand-in: combining marks on a dotted circle, invisible characters escaped."""
    category = unicodedata.category(char)
    if category.startswith("M"):
        return "\u25cc" + char
    if category in ("Cc", "Cf", "Co", "Cn", "Cs") or category.startswith("Z"):
        return f"\\u{ord(char):04x}"
    return char


def _table(rows: list[CharCount]) -> list[str]:
    lines = [f"  {'char':<6}{'code':<10}{'count':>9}  {'name':<40}example"]
    lines += [f"  {_shown(r.char):<6}{r.code:<10}{r.count:>9}  {r.name:<40}{r.example}" for r in rows]
    return lines


def _settings(n: TextNormalization) -> str:
    language = n.language or "each utterance's locale"
    apostrophes = {None: "per language preset", True: "kept inside words", False: "removed"}[n.keep_apostrophes]
    return (f"language {language}, {n.unicode_normalization or 'NFC/NFKC per language preset'}, "
            f"lowercase {n.lowercase}, apostrophes {apostrophes}")


def format_inventory(inventory: Inventory) -> str:
    """Both tables as text; the last two lines are `characters_before: N` and `characters_after: N`."""
    before, after = inventory.before, inventory.after
    kept = {r.char for r in after}
    gone = [r.char for r in before if r.char not in kept]
    lines = [f"before normalisation: {len(before)} characters in {inventory.utterances} utterances", *_table(before),
             "", f"after normalisation ({_settings(inventory.normalization)}): {len(after)} characters, "
                 "each a vocabulary entry", *_table(after), "",
             f"not in the labels (removed, lowercased or folded): {' '.join(_shown(c) for c in gone) or '-'}",
             "to drop a character, add it to data.chars_to_ignore; keep any that tells words apart",
             f"characters_before: {len(before)}", f"characters_after: {len(after)}"]
    return "\n".join(lines) + "\n"
