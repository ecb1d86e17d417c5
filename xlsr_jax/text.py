"""Text side of character-level CTC: normalisation, the vocabulary, greedy decoding.

A run's normalisation settings are stored with it and with its export (``text_normalization.json``)
so that evaluation scores transcripts exactly as training prepared them.

The vocabulary follows the Hugging Face XLSR fine-tuning recipe so that a saved ``vocab.json`` is a
drop-in ``Wav2Vec2CTCTokenizer`` vocabulary: sorted characters, space renamed to ``|``, then
``[UNK]`` and ``[PAD]`` (pad last; pad doubles as the CTC blank).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import unicodedata
from typing import Iterable, Sequence

import numpy as np

# The XLSR fine-tuning week's punctuation set, widened with the quotes, dashes and brackets that
# Common Voice sentences actually contain. Apostrophes are removed too ("İstanbul'da" ->
# "istanbulda"): they are rare, inconsistent and mostly unpronounced; the languages whose
# word-internal apostrophes carry meaning keep those (LANGUAGE_PRESETS).
DEFAULT_CHARS_TO_IGNORE = (
    ",?.!-;:\"“”„‚‟%‘’'`«»‹›()[]{}<>…–—―‐‑/\\*&#@´¨^~_|+=$€£§°¿¡؟،؛"
    "。、，！？：；「」『』•″′\u00ad\ufffd"
)

WORD_DELIMITER = "|"
UNK = "[UNK]"
PAD = "[PAD]"

_SPACE_RE = re.compile(r"\s+")
UNICODE_FORMS = ("NFC", "NFKC")
# Spellings of the apostrophe people type inside words (it’s, l´homme, Ukrainian мʼясо); with
# keep_apostrophes they all become "'", one vocabulary entry.
APOSTROPHES = "'’ʼ`´‘"
_INNER_APOSTROPHE = re.compile(rf"(?<=\w)[{APOSTROPHES}](?=\w)")
_OUTER_APOSTROPHE = re.compile(r"(?<!\w)'|'(?!\w)")


@dataclasses.dataclass(frozen=True)
class LanguagePreset:
    """What a language's transcripts need beyond lowercasing and removing ``chars_to_ignore``."""

    dotless_i: bool = False  # I -> ı and İ -> i when lowercasing (Python's str.lower is locale-free)
    keep_apostrophes: bool = False  # keep apostrophes between two letters (it's, l'homme)
    unicode_normalization: str = "NFKC"


# A language with no entry gets DEFAULT_PRESET; an unknown one (no code) gets UNKNOWN_PRESET.
#
# Apostrophes are kept where they tell words apart or are part of the spelling: English it's/its,
# we'll/well; French, Italian, Catalan, Occitan, Romansh elision (l'homme, dell'anno); Dutch zo'n,
# 's avonds; Welsh i'r, a'r; Irish and Scottish Gaelic d'fhág; Luxembourgish; Breton, where c'h is a
# letter; Ukrainian and Belarusian, where the apostrophe is a letter-like sign (м'ясо vs мясо). Elsewhere
# they are dropped: in Turkish and Azerbaijani it only separates a suffix from a proper noun
# (İstanbul'da), is often left out by writers, and Common Voice fine-tuning recipes delete it; German
# geht's/gibt's is colloquial and also written without one.
#
# NFKC folds compatibility variants into the letter a reader sees (full-width Ａ１, half-width ｶ,
# ligatures ﬁ ĳ, Arabic and Hebrew presentation forms, ŀ -> l·), so one sound has one label. It is
# skipped (NFC only) where it changes letters (checked over every letter and mark NFKC alters):
# Korean (compatibility jamo ㄱ ㅏ would compose into the syllable 가), Thai and Lao (the vowel ำ / ຳ
# splits into two marks; ໜ ໝ split into two letters), Armenian (the letter և becomes ե + ւ), Taiwanese
# Hokkien (POJ's nasal ⁿ would become the consonant n), Tifinagh Tamazight (the labialisation mark ⵯ
# would become the letter ⵡ). Without a language code the script is unknown, so NFC only.
DEFAULT_PRESET = LanguagePreset()
UNKNOWN_PRESET = LanguagePreset(unicode_normalization="NFC")
_NFC_ONLY = LanguagePreset(unicode_normalization="NFC")
_APOSTROPHES_KEPT = LanguagePreset(keep_apostrophes=True)
LANGUAGE_PRESETS: dict[str, LanguagePreset] = {
    "tr": LanguagePreset(dotless_i=True), "az": LanguagePreset(dotless_i=True),
    **dict.fromkeys(("en", "fr", "it", "ca", "oc", "rm", "nl", "lb", "cy", "ga", "gd", "br", "uk", "be"),
                    _APOSTROPHES_KEPT),
    **dict.fromkeys(("ko", "th", "lo", "hy", "nan", "zgh", "tzm"), _NFC_ONLY),
}


def _base_language(language: str | None) -> str:
    """'tr-TR' / 'tr_TR' / 'TR' -> 'tr'; None -> ''."""
    if not language:
        return ""
    return re.split(r"[-_]", language, maxsplit=1)[0].lower()


def language_preset(language: str | None) -> LanguagePreset:
    """The preset of a language code ('tr', 'tr-TR', 'zh-CN'); UNKNOWN_PRESET for None or ''."""
    base = _base_language(language)
    return LANGUAGE_PRESETS.get(base, DEFAULT_PRESET) if base else UNKNOWN_PRESET


@functools.lru_cache(maxsize=16)
def _deletion_table(chars: str) -> dict[int, None]:
    return {ord(c): None for c in chars}


@functools.lru_cache(maxsize=1)
def _orphan_marks() -> re.Pattern:
    """Combining marks after whitespace or at the start: what NFKC leaves of a spacing accent
    (´ -> space + U+0301, the isolated Arabic fatha ﹶ -> space + U+064E), with no letter to sit on."""
    marks = "".join(re.escape(chr(c)) for c in range(0x110000) if unicodedata.category(chr(c)) in ("Mn", "Mc", "Me"))
    return re.compile(rf"(?:(?<=\s)|^)[{marks}]+")


def _remove_ignored(text: str, chars_to_ignore: str, keep_apostrophes: bool) -> str:
    if not keep_apostrophes:
        return text.translate(_deletion_table(chars_to_ignore)) if chars_to_ignore else text
    text = _INNER_APOSTROPHE.sub("'", text)
    text = text.translate(_deletion_table(chars_to_ignore.replace("'", "")))
    # An apostrophe that is not between two letters is a quotation mark: removed if "'" is ignored.
    return _OUTER_APOSTROPHE.sub("", text) if "'" in chars_to_ignore else text


def normalize_text(
    text: str,
    *,
    language: str | None = None,
    lowercase: bool = True,
    chars_to_ignore: str = DEFAULT_CHARS_TO_IGNORE,
    keep_apostrophes: bool | None = None,
    unicode_normalization: str | None = None,
) -> str:
    """Normalise one transcript for character-level CTC.

    ``keep_apostrophes`` and ``unicode_normalization`` (NFC | NFKC) None take the language's preset
    (see LANGUAGE_PRESETS). NFC always, so that precomposed and combining spellings of a letter become
    one vocab entry. Lowercasing is locale-aware for Turkish/Azerbaijani: Python maps 'İ' to 'i' +
    U+0307 and 'I' to 'i', both wrong there. It is str.lower, never str.casefold, which would turn
    German ß into ss.
    """
    preset = language_preset(language)
    keep = preset.keep_apostrophes if keep_apostrophes is None else keep_apostrophes
    form = unicode_normalization or preset.unicode_normalization
    if form not in UNICODE_FORMS:
        raise ValueError(f"unicode_normalization {form!r}: expected one of {UNICODE_FORMS}")
    text = unicodedata.normalize("NFC", text)
    if form == "NFKC":
        # Ignored characters go first: NFKC turns the spacing accents among them (´ ¨) into a space
        # plus a combining mark that the deletion would no longer find.
        text = unicodedata.normalize("NFKC", _remove_ignored(text, chars_to_ignore, keep))
        text = _orphan_marks().sub("", text)
    if lowercase:
        if preset.dotless_i:
            text = text.replace("I", "ı").replace("İ", "i")
        text = unicodedata.normalize(form, text.lower())
    text = _remove_ignored(text, chars_to_ignore, keep)
    return _SPACE_RE.sub(" ", text).strip()


NORMALIZATION_FILE = "text_normalization.json"
# Written without spaces between words: word error rate means little there, CER is the headline.
CHARACTER_LANGUAGES = frozenset({"zh", "ja", "yue", "th", "lo", "km", "my", "bo"})


def headline_metric(language: str | None) -> str:
    """'cer' for languages written without word spaces (zh, ja, th, ...), else 'wer'."""
    return "cer" if _base_language(language) in CHARACTER_LANGUAGES else "wer"


@dataclasses.dataclass(frozen=True)
class TextNormalization:
    """How a run turns raw transcripts into label text; stored with the run and its export.

    ``language`` None means each utterance's own locale decides (Common Voice's locale column), and
    so does its preset. ``keep_apostrophes`` / ``unicode_normalization`` None: the language preset's;
    :meth:`resolved` writes the preset's values in when the language is known, so that the stored file
    says what was done.
    """

    language: str | None = None
    lowercase: bool = True
    chars_to_ignore: str = DEFAULT_CHARS_TO_IGNORE
    keep_apostrophes: bool | None = None
    unicode_normalization: str | None = None

    def __post_init__(self):
        if self.unicode_normalization not in (None, *UNICODE_FORMS):
            raise ValueError(f"unicode_normalization {self.unicode_normalization!r}: expected null or one of "
                             f"{UNICODE_FORMS}")

    def __call__(self, text: str, language: str | None = None) -> str:
        """Normalise ``text``; ``language`` (the utterance's locale) applies when ours is None."""
        return normalize_text(text, language=self.language or language or None, lowercase=self.lowercase,
                              chars_to_ignore=self.chars_to_ignore, keep_apostrophes=self.keep_apostrophes,
                              unicode_normalization=self.unicode_normalization)

    def resolved(self) -> "TextNormalization":
        """With a language set, the preset's values in place of None (what a run stores)."""
        if not self.language:
            return self
        preset = language_preset(self.language)
        return dataclasses.replace(
            self, keep_apostrophes=preset.keep_apostrophes if self.keep_apostrophes is None else self.keep_apostrophes,
            unicode_normalization=self.unicode_normalization or preset.unicode_normalization)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(self), f, ensure_ascii=False, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TextNormalization":
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; expected {sorted(fields)}")
        # A file written before the presets existed: its run kept no apostrophe and applied NFC only.
        values.setdefault("keep_apostrophes", False)
        values.setdefault("unicode_normalization", "NFC")
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Character vocabulary; ``tokens[i]`` is the token with id ``i``."""

    tokens: tuple[str, ...]

    def __post_init__(self):
        for required in (WORD_DELIMITER, UNK, PAD):
            if required not in self.tokens:
                raise ValueError(f"vocab lacks the required token {required!r}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("vocab has duplicate tokens")
        # Derived lookup table; frozen dataclass, so bypass __setattr__.
        object.__setattr__(self, "_ids", {t: i for i, t in enumerate(self.tokens)})

    @classmethod
    def build(cls, texts: Iterable[str]) -> "Vocab":
        """Sorted characters of ``texts`` (already normalised), space as '|', then [UNK], [PAD]."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        chars.discard(" ")
        chars.discard(WORD_DELIMITER)  # '|' in text would alias the delimiter; it maps to it anyway
        return cls(tuple(sorted(chars | {WORD_DELIMITER})) + (UNK, PAD))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def pad_id(self) -> int:
        """Padding id, also the CTC blank."""
        return self._ids[PAD]

    @property
    def unk_id(self) -> int:
        return self._ids[UNK]

    @property
    def word_delimiter_id(self) -> int:
        return self._ids[WORD_DELIMITER]

    def token_to_id(self, token: str) -> int:
        return self._ids.get(token, self.unk_id)

    def encode(self, text: str) -> np.ndarray:
        """Characters of ``text`` -> int32 ids ``[chars]``; space -> '|', unknown -> [UNK]."""
        ids, unk, delim = self._ids, self.unk_id, self.word_delimiter_id
        return np.array(
            [delim if c == " " else ids.get(c, unk) for c in text], dtype=np.int32
        )

    def ctc_runs(self, ids: Sequence[int] | np.ndarray) -> list[tuple[str, int, int]]:
        """Greedy CTC of one frame-wise argmax ``[frames]``: (character, first frame, end frame) of each
        token kept — repeats collapsed, blanks dropped, '|' as a space, [UNK] as the string "[UNK]".
        The one greedy rule: `decode_ctc` (scoring) and transcribe (words with times) both read it."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size == 0:
            return []
        starts = np.flatnonzero(np.concatenate([[True], ids[1:] != ids[:-1]]))
        ends = np.append(starts[1:], ids.size)
        tokens, pad = self.tokens, self.pad_id
        return [(" " if tokens[int(ids[s])] == WORD_DELIMITER else tokens[int(ids[s])], int(s), int(e))
                for s, e in zip(starts, ends) if ids[s] != pad]

    def decode_ctc(self, ids: Sequence[int] | np.ndarray) -> str:
        """Greedy CTC decode of one frame-wise argmax ``[frames]`` for scoring: `ctc_runs`' characters,
        runs of spaces made one (as the normalised references have them)."""
        return _SPACE_RE.sub(" ", "".join(c for c, _, _ in self.ctc_runs(ids))).strip()

    def decode_ctc_batch(self, ids: np.ndarray, lengths: Sequence[int] | np.ndarray) -> list[str]:
        """Greedy CTC decode of ``ids [batch, frames]``, each row cut at ``lengths [batch]``."""
        ids = np.asarray(ids)
        return [self.decode_ctc(row[: int(n)]) for row, n in zip(ids, np.asarray(lengths))]

    def save(self, path: str | os.PathLike) -> None:
        """Write a Hugging Face ``vocab.json`` ({token: id})."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump({t: i for i, t in enumerate(self.tokens)}, f, ensure_ascii=False, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocab":
        """Read a ``vocab.json`` written by :meth:`save` or by the HF recipe."""
        with open(path, encoding="utf-8") as f:
            mapping = json.load(f)
        ids = sorted(mapping.values())
        if ids != list(range(len(mapping))):
            raise ValueError(f"{path}: ids are not 0..{len(mapping) - 1}")
        by_id = {i: t for t, i in mapping.items()}
        return cls(tuple(by_id[i] for i in range(len(mapping))))


def required_frames(labels, label_mask):
    """Fewest frames a CTC alignment needs per row: one per label plus a blank between each pair of
    equal neighbours. The one feasibility rule: data/prepare.py drops clips too short for their
    transcript with it, model/loss.py masks such rows of a batch with it.

    labels int [batch, label_len], label_mask bool [batch, label_len] (numpy or jax arrays) -> int32 [batch].
    """
    repeats = label_mask[:, 1:] & label_mask[:, :-1] & (labels[:, 1:] == labels[:, :-1])
    return label_mask.sum(-1).astype("int32") + repeats.sum(-1).astype("int32")
