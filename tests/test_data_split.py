import collections

import numpy as np
import pytest

from xlsr_jax.data.sources import Example, load_manifest
from xlsr_jax.data.split import make_split, speaker_disjoint_split
from xlsr_jax.errors import UserError
from xlsr_jax.text import TextNormalization


def _corpus(speakers: int = 120, seed: int = 0, sentences: int = 400) -> list[Example]:
    """Common Voice-like: clips per speaker heavy-tailed (1 to ~200), sentences each read by a few."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(speakers):
        for k in range(int(min(200, rng.pareto(1.2) + 1))):
            out.append(Example(f"/clips/{s}_{k}.mp3", f"Sentence {rng.integers(sentences)}.", speaker=f"spk{s}",
                               duration_s=float(rng.uniform(1, 10)), language="en"))
    return out


def _speakers(rows):
    return {e.speaker for e in rows}


def test_no_speaker_in_two_splits_and_shares_near_the_fractions():
    corpus = _corpus()
    split = speaker_disjoint_split(corpus, dev=0.1, test=0.15, seed=3)
    train, dev, test = (split.splits[k] for k in ("train", "dev", "test"))
    assert sorted(train + dev + test, key=lambda e: e.path) == sorted(corpus, key=lambda e: e.path)
    assert not (_speakers(train) & _speakers(dev) or _speakers(train) & _speakers(test)
                or _speakers(dev) & _speakers(test))
    assert len(dev) / len(corpus) == pytest.approx(0.10, abs=0.01)
    assert len(test) / len(corpus) == pytest.approx(0.15, abs=0.01)
    # The most prolific speaker is too big for dev/test: it trains.
    top = collections.Counter(e.speaker for e in corpus).most_common(1)[0][0]
    assert top in _speakers(train)


def test_sentences_kept_apart_when_that_is_cheap_else_counted():
    few_readers = _corpus(sentences=10_000)  # most sentences read once; by speakers alone 11 would be shared
    split = speaker_disjoint_split(few_readers, seed=0)
    assert split.sentence_disjoint and split.shared_sentences == 0
    assert len(split.splits["test"]) / len(few_readers) == pytest.approx(0.1, abs=0.01)
    texts = {k: {e.text for e in v} for k, v in split.splits.items()}
    assert not (texts["train"] & texts["test"] or texts["train"] & texts["dev"] or texts["dev"] & texts["test"])
    # 10 sentences read by everyone join all speakers into one group: speakers alone, shared ones counted.
    everyone = _corpus(sentences=10)
    split = speaker_disjoint_split(everyone, seed=0)
    assert not split.sentence_disjoint and split.shared_sentences == 10
    assert len(split.splits["test"]) / len(everyone) == pytest.approx(0.1, abs=0.01)


def test_deterministic_by_seed():
    corpus = _corpus()
    first, again = (speaker_disjoint_split(corpus, seed=7) for _ in range(2))
    assert first.splits == again.splits
    assert speaker_disjoint_split(corpus, seed=8).splits["test"] != first.splits["test"]


def test_utterances_without_speaker_are_their_own_speakers_and_bad_fractions_are_refused():
    rows = [Example(f"/c/{i}.wav", f"t {i}") for i in range(50)]
    split = speaker_disjoint_split(rows, dev=0.2, test=0.2, seed=0)
    assert (len(split.splits["dev"]), len(split.splits["test"]), split.no_speaker) == (10, 10, 50)
    with pytest.raises(UserError, match="--dev 0.6, --test 0.5"):
        speaker_disjoint_split(rows, dev=0.6, test=0.5)
    with pytest.raises(UserError, match="no utterances"):
        speaker_disjoint_split([])


def test_manifests_round_trip_through_the_manifest_reader(tmp_path):
    corpus = _corpus(speakers=30) + [Example("/c/tab.mp3", 'He said "hi"\tthen\nleft', speaker="tabby",
                                             duration_s=None, language="en")]
    split, paths = make_split(corpus, str(tmp_path / "out"), dev=0.1, test=0.1, seed=0,
                              normalization=TextNormalization(language="en"))
    read = {k: load_manifest(p) for k, p in paths.items()}
    assert {k: len(v) for k, v in read.items()} == {k: len(v) for k, v in split.splits.items()}
    for name in read:
        for got, want in zip(read[name], split.splits[name]):
            assert (got.path, got.speaker, got.language) == (want.path, want.speaker, want.language)
            assert got.duration_s == (None if want.duration_s is None else pytest.approx(want.duration_s, abs=1e-3))
    (tabby,) = [e for rows in read.values() for e in rows if e.speaker == "tabby"]
    assert tabby.text == 'He said "hi" then left'
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dev.tsv", "test.tsv", "train.tsv"]
