import json

import numpy as np
import pytest

from xlsr_jax.text import DEFAULT_CHARS_TO_IGNORE, PAD, UNK, Vocab, normalize_text


def test_turkish_lowercasing_and_punctuation():
    assert normalize_text("İstanbul'da IŞIK", language="tr") == "istanbulda ışık"
    assert normalize_text("İstanbul'da IŞIK", language="tr-TR") == "istanbulda ışık"
    assert normalize_text("IŞIK", language="az") == "ışık"
    # Without the language Python's lower() is used: 'I' -> 'i', 'İ' -> 'i' + U+0307.
    assert normalize_text("IŞIK İ") == "işik i\u0307"


def test_german_and_general_normalisation():
    assert normalize_text("Die Straße – „GROSS“!", language="de") == "die straße gross"
    assert normalize_text("  ¿Qué   tal?\t¡Bien!  ") == "qué tal bien"
    assert normalize_text("Ab\ufffdc", lowercase=False) == "Abc"
    # NFC: a decomposed 'é' becomes the precomposed one, so it is one vocab entry.
    assert normalize_text("e\u0301") == "\u00e9"
    assert normalize_text("a,b", chars_to_ignore="") == "a,b"
    for ch in ",?.!-;:\"“”„‚%‘’'«»()[]{}…–—/\\*&#@´¿¡\ufffd":
        assert ch in DEFAULT_CHARS_TO_IGNORE, ch


def test_vocab_build_layout():
    vocab = Vocab.build(["ba c", "ab"])
    assert vocab.tokens == ("a", "b", "c", "|", UNK, PAD)
    assert (vocab.word_delimiter_id, vocab.unk_id, vocab.pad_id, len(vocab)) == (3, 4, 5, 6)
    np.testing.assert_array_equal(vocab.encode("ab cz"), [0, 1, 3, 2, 4])
    assert vocab.encode("ab").dtype == np.int32
    # '|' is always present, even with single-word texts.
    assert "|" in Vocab.build(["abc"]).tokens


def test_decode_ctc_collapses_repeats_and_blanks():
    vocab = Vocab.build(["ab c"])  # a b c | [UNK] [PAD]
    p, d = vocab.pad_id, vocab.word_delimiter_id
    assert vocab.decode_ctc([0, 0, p, 0, 1, 1, d, d, p, d, 2]) == "aab c"
    assert vocab.decode_ctc([d, p, 0, d, d, p]) == "a"
    assert vocab.decode_ctc([]) == ""
    ids = np.array([[0, 0, 1, p, p], [2, 2, 2, 2, 2]])
    assert vocab.decode_ctc_batch(ids, [3, 2]) == ["ab", "c"]


def test_decode_ctc_matches_hf_tokenizer(tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer

    from xlsr_jax.hub.export import processor_for

    vocab = Vocab.build([normalize_text("İstanbul'da IŞIK yanıyor çok güzel", language="tr")])
    processor_for(vocab, Wav2Vec2Config(), tmp_path).save_pretrained(tmp_path)
    assert {"vocab.json", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}
    tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == len(vocab)
    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = rng.integers(0, len(vocab), size=rng.integers(0, 25))
        ids = np.repeat(ids, rng.integers(1, 4, size=ids.size))  # repeats
        ids[rng.random(ids.size) < 0.3] = vocab.pad_id  # blanks
        expected = tokenizer.decode(ids.tolist())
        # HF keeps the double space of '| blank |'; we collapse it (CER should not count it).
        assert vocab.decode_ctc(ids) == " ".join(expected.split()), ids
        if "  " not in expected:
            assert vocab.decode_ctc(ids) == expected, ids
    text = "çok güzel ışık"
    assert tokenizer(text).input_ids == vocab.encode(text).tolist()


def test_save_load_round_trip(tmp_path):
    vocab = Vocab.build(["straße über", "çok"])
    vocab.save(tmp_path / "vocab.json")
    assert Vocab.load(tmp_path / "vocab.json") == vocab
    mapping = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert mapping["ß"] == vocab.tokens.index("ß") and mapping[PAD] == len(vocab) - 1


def test_invalid_vocab_files(tmp_path):
    (tmp_path / "gap.json").write_text('{"a": 0, "|": 2, "[UNK]": 3, "[PAD]": 4}')
    with pytest.raises(ValueError, match="gap.json"):
        Vocab.load(tmp_path / "gap.json")
    with pytest.raises(ValueError, match="PAD"):
        Vocab(("a", "|", UNK))


def test_headline_metric_is_cer_for_languages_without_word_spaces():
    from xlsr_jax.text import headline_metric

    assert [headline_metric(x) for x in ("zh-CN", "ja", "yue", "th", "tr", "de", None)] == \
        ["cer", "cer", "cer", "cer", "wer", "wer", "wer"]


def test_text_normalization_round_trips_and_applies_its_language(tmp_path):
    from xlsr_jax.text import TextNormalization

    turkish = TextNormalization(language="tr", chars_to_ignore=",!")
    turkish.save(tmp_path / "n.json")
    assert TextNormalization.load(tmp_path / "n.json") == turkish
    assert turkish("IŞIK, İstanbul!", language="de") == "ışık istanbul"  # the stored language wins
    assert TextNormalization()("IŞIK", language="tr") == "ışık"  # none stored: the utterance's locale
    assert TextNormalization()("IŞIK") == "işik"
    (tmp_path / "bad.json").write_text('{"language": "tr", "lowercase_all": true}')
    with pytest.raises(ValueError, match=r"bad.json: unknown keys \['lowercase_all'\]"):
        TextNormalization.load(tmp_path / "bad.json")
