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
# "istanbulda"): they are rare, inconsistent and mostly unpronounced.
DEFAULT_CHARS_TO_IGNORE = (
    ",?.!-;:\"“”„‚‟%‘’'`«»‹›()[]{}<>…–—―‐‑/\\*&#@´¨^~_|+=$€£§°¿¡؟،؛"
    "。、，！？：；「」『』•″′\u00ad\ufffd"
)

WORD_DELIMITER = "|"
UNK = "[UNK]"
PAD = "[PAD]"

_SPACE_RE = re.compile(r"\s+")
# Languages whose dotted/dotless i pair breaks Python's locale-free str.lower().
_DOTLESS_I_LANGUAGES = frozenset({"tr", "az"})


def _base_language(language: str | None) -> str:
    """'tr-TR' / 'tr_TR' / 'TR' -> 'tr'; None -> ''."""
    if not language:
        return ""
    return re.split(r"[-_]", language, maxsplit=1)[0].lower()


@functools.lru_cache(maxsize=16)
def _deletion_table(chars: str) -> dict[int, None]:
    return {ord(c): None for c in chars}


def normalize_text(
    text: str,
    *,
    language: str | None = None,
    lowercase: bool = True,
    chars_to_ignore: str = DEFAULT_CHARS_TO_IGNORE,
) -> str:
    """Normalise one transcript for character-level CTC.

    NFC first so that precomposed and combining spellings of a letter become one vocab entry.
    Lowercasing is locale-aware for Turkish/Azerbaijani: Python maps 'İ' to 'i' + U+0307 and 'I'
    to 'i', both wrong there.
    """
    text = unicodedata.normalize("NFC", text)
    if lowercase:
        if _base_language(language) in _DOTLESS_I_LANGUAGES:
            text = text.replace("I", "ı").replace("İ", "i")
        text = unicodedata.normalize("NFC", text.lower())
    if chars_to_ignore:
        text = text.translate(_deletion_table(chars_to_ignore))
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

    ``language`` None means each utterance's own locale decides (Common Voice's locale column).
    """

    language: str | None = None
    lowercase: bool = True
    chars_to_ignore: str = DEFAULT_CHARS_TO_IGNORE

    def __call__(self, text: str, language: str | None = None) -> str:
        """Normalise ``text``; ``language`` (the utterance's locale) applies when ours is None."""
        return normalize_text(text, language=self.language or language or None, lowercase=self.lowercase,
                              chars_to_ignore=self.chars_to_ignore)

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
        return cls(**values)


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

    def decode_ctc(self, ids: Sequence[int] | np.ndarray) -> str:
        """Greedy CTC decode of one frame-wise argmax ``[frames]``: collapse repeats, drop blanks."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size == 0:
            return ""
        keep = np.ones(ids.shape, dtype=bool)
        keep[1:] = ids[1:] != ids[:-1]
        pad = self.pad_id
        chars = [
            " " if t == WORD_DELIMITER else t
            for t in (self.tokens[int(i)] for i in ids[keep] if i != pad)
        ]
        return _SPACE_RE.sub(" ", "".join(chars)).strip()

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
