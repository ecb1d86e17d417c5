"""Kneser-Ney ARPA writer: kenlm reads it, distributions normalise, values match a hand computation."""

from __future__ import annotations

import math
import random

import kenlm  # the test extra installs it: a missing kenlm must fail here, not skip
import pytest

from xlsr_jax.errors import UserError
from xlsr_jax.infer import ngram


def _grammar_sentences(n: int, seed: int) -> list[str]:
    """Word order carries the structure (a unigram model cannot see it); Zipfian word choice gives
    varied count-of-counts, so the Chen & Goodman discounts apply rather than the fallback."""
    rng = random.Random(seed)

    def pick(words):
        return rng.choices(words, weights=[1 / (i + 1) for i in range(len(words))])[0]

    def noun_phrase():
        return f"{pick(['the', 'a', 'my', 'her', 'one'])} {pick(['', 'small ', 'old ', 'red ', 'quiet '])}" \
               f"{pick(['cat', 'dog', 'bird', 'friend', 'brother', 'ball', 'tree', 'house', 'stone'])}"

    verbs = ["sees", "likes", "chases", "finds", "paints", "hears", "follows"]
    tails = ["", " today", " again", " in the garden", " at night", " near the river"]
    return [f"{noun_phrase()} {pick(verbs)} {noun_phrase()}{pick(tails)}" for _ in range(n)]


def _read_arpa(path) -> dict[str, tuple[float, float | None]]:
    """{"w1 w2": (log10 p, log10 bow or None)} for every n-gram line."""
    entries = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split("\t")
        if len(fields) >= 2:
            entries[fields[1]] = (float(fields[0]), float(fields[2]) if len(fields) == 3 else None)
    return entries


def _state_after(model, words: list[str]):
    state = kenlm.State()
    model.BeginSentenceWrite(state)
    for word in words:
        out = kenlm.State()
        model.BaseScore(state, word, out)
        state = out
    return state


@pytest.mark.parametrize("order", [2, 3, 4])  # kenlm cannot load a unigram model (see below)
def test_conditionals_sum_to_one(tmp_path, order):
    sentences = _grammar_sentences(300, seed=0)
    arpa = ngram.build_arpa(sentences, tmp_path / "lm.arpa", order=order)
    model = kenlm.Model(str(arpa))
    assert model.order == order
    predictable = ngram.read_unigrams(arpa) + ["</s>", "<unk>"]
    contexts = [[], ["the"], ["the", "cat"], ["my", "friend", "likes"], ["cat", "the"],
                ["zebra"], ["the", "zebra"], ["a", "small", "stone", "again"], ["in", "the"]]
    for context in contexts:
        state = _state_after(model, context)
        total = sum(10 ** model.BaseScore(state, w, kenlm.State()) for w in predictable)
        assert total == pytest.approx(1.0, abs=1e-4), (order, context)
    # Bigrams and up get Chen & Goodman discounts; the unigram continuation counts of a 40-word
    # vocabulary lack a count of 2 or 3, so the fallback covers that order.
    counts = ngram.adjusted_counts(ngram.count_ngrams(sentences, order))
    assert ngram.discounts(counts[0].values()) == ngram.FALLBACK_DISCOUNTS
    assert all(ngram.discounts(c.values()) != ngram.FALLBACK_DISCOUNTS for c in counts[1:])


def test_tiny_corpus_matches_hand_computed_bigram_kn(tmp_path):
    # <s> a b </s> / <s> a c </s> / <s> b c </s>. Every order's count-of-counts lack a 3, so the
    # fallback discounts (0.5, 1, 1.5) apply. Unigram continuation counts a=1, b=c=</s>=2 (T=7),
    # gamma() = (0.5*1 + 1*3)/7 = 1/2, |V| = 5 with <unk>: p(a) = 0.5/7 + 0.5/5 = 6/35,
    # p(b) = 1/7 + 1/10 = 17/70, p(<unk>) = 1/10.
    # Bigrams: context a: (a b 1, a c 1), gamma = 1/2, p(b|a) = 0.5/2 + 17/140 = 13/35;
    # context <s>: (<s> a 2, <s> b 1), gamma = (1 + 0.5)/3 = 1/2, p(a|<s>) = 1/3 + 3/35 = 44/105;
    # context b: (b </s> 1, b c 1), p(</s>|b) = 13/35.
    arpa = ngram.build_arpa(["a b", "a c", "b c"], tmp_path / "tiny.arpa", order=2)
    entries = _read_arpa(arpa)
    expected = {"a": 6 / 35, "b": 17 / 70, "<unk>": 1 / 10, "a b": 13 / 35, "<s> a": 44 / 105,
                "b </s>": 13 / 35}
    for gram, p in expected.items():
        assert entries[gram][0] == pytest.approx(math.log10(p), abs=1e-6), gram
    assert entries["a"][1] == pytest.approx(math.log10(0.5), abs=1e-6)
    assert entries["<s>"][0] == -99.0
    model = kenlm.Model(str(arpa))
    assert model.score("a b", bos=True, eos=True) == pytest.approx(
        math.log10(44 / 105 * 13 / 35 * 13 / 35), abs=1e-5)


def test_discounts_from_count_of_counts():
    # t1=4, t2=2, t3=1, t4=1: Y = 4/8; D1 = 1 - 2Y*2/4 = 0.5; D2 = 2 - 3Y/2 = 1.25; D3+ = 3 - 4Y = 1.
    assert ngram.discounts([1, 1, 1, 1, 2, 2, 3, 4, 9]) == pytest.approx((0.5, 1.25, 1.0))
    assert ngram.discounts([1, 1, 3, 4]) == ngram.FALLBACK_DISCOUNTS  # nothing seen twice
    assert ngram.discounts([1, 1, 2, 4]) == ngram.FALLBACK_DISCOUNTS  # nothing seen three times


def test_trigram_has_lower_heldout_perplexity_than_unigram(tmp_path):
    train, heldout = _grammar_sentences(400, seed=1), _grammar_sentences(100, seed=2)
    tokens = sum(len(s.split()) + 1 for s in heldout)  # words + </s>
    trigram = kenlm.Model(str(ngram.build_arpa(train, tmp_path / "o3.arpa", order=3)))
    log10_prob = {3: sum(trigram.score(s, bos=True, eos=True) for s in heldout)}
    # kenlm only loads bigram-and-up models, so score the unigram ARPA straight from its table.
    unigram = {g: lp for g, (lp, _) in _read_arpa(ngram.build_arpa(train, tmp_path / "o1.arpa", 1)).items()}
    assert sum(10 ** lp for g, lp in unigram.items() if g != "<s>") == pytest.approx(1.0, abs=1e-5)
    log10_prob[1] = sum(unigram.get(w, unigram["<unk>"]) for s in heldout for w in s.split() + ["</s>"])
    perplexity = {order: 10 ** (-lp / tokens) for order, lp in log10_prob.items()}
    assert perplexity[3] < 0.5 * perplexity[1], perplexity


def test_output_is_deterministic_and_order_free(tmp_path):
    sentences = _grammar_sentences(50, seed=3)
    first = ngram.build_arpa(sentences, tmp_path / "a.arpa").read_bytes()
    shuffled = sentences[::-1]
    assert ngram.build_arpa(shuffled, tmp_path / "b.arpa").read_bytes() == first


def test_read_unigrams_skips_markers(tmp_path):
    arpa = ngram.build_arpa(["b a", "c"], tmp_path / "lm.arpa", order=2)
    assert ngram.read_unigrams(arpa) == ["a", "b", "c"]


def test_empty_input_names_the_file(tmp_path):
    with pytest.raises(UserError, match="empty.arpa"):
        ngram.build_arpa(["", "  "], tmp_path / "empty.arpa")
