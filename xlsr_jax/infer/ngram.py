"""Word n-gram language models written as ARPA files, for kenlm-backed beam search.

kenlm's Python module can only query models, and there is often no ``lmplz`` at hand, so this
module estimates one itself: interpolated modified Kneser-Ney (Chen & Goodman 1998), the model
``lmplz`` builds, written in back-off ARPA form (log10 probabilities, log10 back-off weights).

Conventions follow ``lmplz``:
- each sentence is padded as ``<s> w1 .. wk </s>`` (one ``<s>``; it is a context, never predicted,
  so its probability is written as -99);
- the highest order uses raw counts, lower orders use adjusted (continuation) counts: the number of
  distinct words seen to the left, except n-grams starting with ``<s>``, which keep raw counts;
- the unigram level interpolates with a uniform distribution over the vocabulary without ``<s>``
  (words, ``</s>``, ``<unk>``), so ``<unk>`` gets ``gamma(empty) / |V|``.

In an interpolated model the probability of an unseen ``h w`` is ``gamma(h) * p(w | h')``, so the
ARPA back-off weight of context ``h`` is exactly ``gamma(h)``; no renormalisation is needed.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

from xlsr_jax.errors import UserError

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
SPECIAL_WORDS = frozenset({BOS, EOS, UNK})
# kenlm's --discount_fallback defaults: used for an order whose count-of-counts are degenerate
# (tiny corpora: no n-gram seen exactly twice, ...) and would give discounts outside (0, k].
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)
LOG10_ZERO = -99.0  # how ARPA files spell log10(0)

Ngram = tuple[str, ...]


def count_ngrams(sentences: Iterable[str], order: int) -> list[Counter]:
    """Raw counts of the padded sentences: ``counts[n - 1][ngram]`` for n = 1..order."""
    counts = [Counter() for _ in range(order)]
    for sentence in sentences:
        words = sentence.split()
        if not words:
            continue  # lmplz would count "<s> </s>"; a blank line is an artefact, not a sentence
        padded = (BOS, *words, EOS)
        for n in range(1, order + 1):
            grams = counts[n - 1]
            for i in range(len(padded) - n + 1):
                grams[padded[i:i + n]] += 1
    return counts


def adjusted_counts(raw: list[Counter]) -> list[dict[Ngram, int]]:
    """Kneser-Ney counts: raw at the top order; below, distinct left extensions (raw after ``<s>``)."""
    order = len(raw)
    adjusted: list[dict[Ngram, int]] = [dict() for _ in range(order)]
    adjusted[-1] = dict(raw[-1])
    for n in range(order - 1, 0, -1):  # n-gram length n, extended by the (n+1)-grams
        lower = defaultdict(int)
        for gram in raw[n]:
            lower[gram[1:]] += 1
        for gram, count in raw[n - 1].items():
            if gram[0] == BOS:  # nothing precedes <s>, so continuation counts would be 0
                lower[gram] = count
        adjusted[n - 1] = dict(lower)
    return adjusted


def discounts(counts: Iterable[int]) -> tuple[float, float, float]:
    """Chen & Goodman's (D1, D2, D3+) from the count-of-counts of one order's (adjusted) counts."""
    of_count = Counter(c for c in counts if 1 <= c <= 4)
    t = [of_count[k] for k in range(1, 5)]
    if min(t[:3]) == 0:
        return FALLBACK_DISCOUNTS
    y = t[0] / (t[0] + 2 * t[1])
    amounts = tuple(k - (k + 1) * y * t[k] / t[k - 1] for k in (1, 2, 3))
    if any(not 0.0 < d <= k for k, d in zip((1, 2, 3), amounts)):
        return FALLBACK_DISCOUNTS
    return amounts  # type: ignore[return-value]


def _discount(d: tuple[float, float, float], count: int) -> float:
    return d[min(count, 3) - 1]


def _context_stats(grams: dict[Ngram, int], d: tuple[float, float, float]
                   ) -> tuple[dict[Ngram, int], dict[Ngram, float]]:
    """Per context h: total adjusted count sum_w a(h w), and gamma(h) = discounted mass / total."""
    total: dict[Ngram, int] = defaultdict(int)
    mass: dict[Ngram, float] = defaultdict(float)
    for gram, count in grams.items():
        total[gram[:-1]] += count
        mass[gram[:-1]] += _discount(d, count)
    return dict(total), {h: mass[h] / total[h] for h in total}


def interpolate(adjusted: list[dict[Ngram, int]]
                ) -> tuple[list[dict[Ngram, float]], list[dict[Ngram, float]]]:
    """Interpolated modified Kneser-Ney.

    Returns (probs, gammas): ``probs[n - 1][ngram] = p(w | h)`` for every n-gram in the counts
    (plus ``<unk>`` and ``<s>`` (0) among unigrams), ``gammas[n - 1][h]`` for every context h of
    length n - 1 that has continuations.
    """
    unigrams = {g: c for g, c in adjusted[0].items() if g != (BOS,)}  # <s> is never predicted
    vocab_size = len(unigrams) + ((UNK,) not in unigrams)
    probs: list[dict[Ngram, float]] = []
    gammas: list[dict[Ngram, float]] = []
    for n, grams in enumerate([unigrams, *adjusted[1:]], start=1):
        d = discounts(grams.values())
        total, gamma = _context_stats(grams, d)
        lower = probs[-1] if probs else None
        level = {}
        for gram, count in grams.items():
            h = gram[:-1]
            backoff = lower[gram[1:]] if lower is not None else 1.0 / vocab_size
            level[gram] = (count - _discount(d, count)) / total[h] + gamma[h] * backoff
        if n == 1:
            level.setdefault((UNK,), gamma[()] / vocab_size)
            level[(BOS,)] = 0.0
        probs.append(level)
        gammas.append(gamma)
    return probs, gammas


def _log10(p: float) -> float:
    return math.log10(p) if p > 0.0 else LOG10_ZERO


def write_arpa(probs: list[dict[Ngram, float]], gammas: list[dict[Ngram, float]],
               path: str | os.PathLike) -> None:
    """Write back-off ARPA: ``log10 p  w1 .. wn  log10 bow`` lines, n-grams sorted per order."""
    order = len(probs)
    lines = ["", "\\data\\"]
    lines += [f"ngram {n}={len(level)}" for n, level in enumerate(probs, start=1)]
    for n, level in enumerate(probs, start=1):
        lines += ["", f"\\{n}-grams:"]
        # A context's back-off weight is its gamma one order up; 0 (log10 1) when it never continues.
        up = gammas[n] if n < order else None
        for gram in sorted(level):
            row = f"{_log10(level[gram]):.7g}\t{' '.join(gram)}"
            if up is not None:
                row += f"\t{_log10(up.get(gram, 1.0)):.7g}"
            lines.append(row)
    lines += ["", "\\end\\", ""]
    Path(path).write_text("\n".join(lines), encoding="utf-8")


def build_arpa(sentences: Iterable[str], path: str | os.PathLike, order: int = 3) -> Path:
    """Estimate an interpolated modified Kneser-Ney word ``order``-gram and write it as ARPA.

    ``sentences`` are already normalised (words separated by spaces). Output is deterministic.
    An order-1 file is valid ARPA, but kenlm (so the LM decoder) only loads order 2 and up.
    """
    if order < 1:
        raise ValueError(f"n-gram order must be >= 1, got {order}")
    path = Path(path)
    raw = count_ngrams(sentences, order)
    if not raw[0]:
        raise UserError(f"{path}: no words to build a language model from (all sentences empty)")
    probs, gammas = interpolate(adjusted_counts(raw))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_arpa(probs, gammas, path)
    return path


def read_unigrams(arpa_path: str | os.PathLike) -> list[str]:
    """The words of an ARPA file's ``\\1-grams:`` section, sorted, without ``<s>``/``</s>``/``<unk>``."""
    words = set()
    in_unigrams = False
    with open(arpa_path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.startswith("\\"):
                if in_unigrams:
                    break
                in_unigrams = line == "\\1-grams:"
            elif in_unigrams and line:
                fields = line.split()  # ARPA allows tabs or spaces between fields
                if len(fields) >= 2 and fields[1] not in SPECIAL_WORDS:
                    words.add(fields[1])
    if not words:
        raise UserError(f"{arpa_path}: no unigrams found; is it an ARPA file?")
    return sorted(words)
