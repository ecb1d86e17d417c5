"""LM beam search: corrections over greedy, word frames, the exported folder round trip, install hint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from _exports import transformers_lm_problem
from xlsr_jax.errors import UserError
from xlsr_jax.hub.verify import ExportCheckError, verify_lm
from xlsr_jax.infer import lm
from xlsr_jax.infer.ngram import build_arpa
from xlsr_jax.text import PAD, UNK, Vocab


SENTENCES = ["hello world", "hello world", "hello there", "hello world again", "the world is big",
             "there is a word", "hello big world"]
VOCAB = Vocab.build(SENTENCES)


def _log_probs(frames: list, sure: float = 0.9) -> np.ndarray:
    """Log-softmax ``[len(frames), vocab]``: a frame is one token ('-' = blank) that gets ``sure``,
    or {token: prob}; the rest of the mass is spread evenly over the other tokens."""
    rows = []
    for frame in frames:
        probs = {frame: sure} if isinstance(frame, str) else frame
        probs = {PAD if t == "-" else t: p for t, p in probs.items()}
        row = np.full(len(VOCAB), (1.0 - sum(probs.values())) / (len(VOCAB) - len(probs)))
        for token, p in probs.items():
            row[VOCAB.tokens.index(token)] = p
        rows.append(np.log(row))
    return np.asarray(rows, dtype=np.float32)


# Greedy reads "helo world": frame 4 prefers 'o' (0.55) to a second 'l' (0.4).
HELO = _log_probs([*"hel-", {"l": 0.4, "o": 0.55}, *"o|world"])
# Greedy reads "hello word": frame 10 prefers blank (0.55) to the 'l' of "world" (0.4). Both words
# are in the LM, so only the LM weight (not pyctcdecode's out-of-vocabulary penalty) can flip it.
WORD = _log_probs([*"hel-lo|wor", {"l": 0.4, "-": 0.55}, "d"])


def _greedy(log_probs: np.ndarray) -> str:
    return VOCAB.decode_ctc(log_probs.argmax(-1))


@pytest.fixture(scope="module")
def arpa(tmp_path_factory):
    return build_arpa(SENTENCES, tmp_path_factory.mktemp("lm") / "words.arpa", order=3)


def test_lm_corrects_a_misspelling(arpa):
    assert _greedy(HELO) == "helo world"
    decoder = lm.LMDecoder.from_path(arpa, VOCAB, alpha=0.5, beta=1.0, beam_width=16)
    assert decoder.decode_batch([HELO, WORD]) == ["hello world", "hello world"]


def test_zero_weight_lm_decodes_as_greedy(arpa):
    assert _greedy(WORD) == "hello word"
    decoder = lm.LMDecoder.from_path(arpa, VOCAB, alpha=0.0, beta=0.0)
    assert decoder.decode_batch([WORD, HELO]) == ["hello word", "helo world"]


def test_word_frames_are_half_open_and_ordered(arpa):
    decoder = lm.LMDecoder.from_path(arpa, VOCAB)
    text, words = decoder.decode_words(HELO)
    # h e l - l/o o | w o r l d: "hello" spans frames 0..5, "world" 7..11 (end is exclusive).
    assert text == "hello world"
    assert words == [("hello", 0, 6), ("world", 7, 12)]
    assert decoder.decode_words(HELO[:0]) == ("", [])


def test_unk_is_written_like_greedy_decoding(arpa):
    frames = _log_probs([*"hel-lo|", UNK, "-"], sure=0.95)
    assert _greedy(frames) == "hello [UNK]"
    assert lm.LMDecoder.from_path(arpa, VOCAB).decode_batch([frames]) == ["hello [UNK]"]


def _processor_folder(path) -> None:
    """What the export writes before the LM: Wav2Vec2Processor + feature extractor files."""
    from transformers import Wav2Vec2Config

    from xlsr_jax.hub.export import processor_for

    processor = processor_for(VOCAB, Wav2Vec2Config(feat_extract_norm="layer"), Path(path))
    processor.save_pretrained(path)
    processor.feature_extractor.save_pretrained(path)


def test_saved_folder_loads_in_pyctcdecode_and_decodes_alike(arpa, tmp_path):
    """What the model card tells users and the export's self-check runs: pyctcdecode's load_from_dir."""
    _processor_folder(tmp_path)
    decoder = lm.LMDecoder.from_path(arpa, VOCAB, alpha=0.7, beta=0.3, beam_width=16)
    decoder.save_for_processor(tmp_path)
    assert sorted(p.name for p in (tmp_path / "language_model").iterdir()) == [
        "attrs.json", "unigrams.txt", "words.arpa"]
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["processor_class"] == config["feature_extractor"]["processor_class"] == lm.PROCESSOR_WITH_LM
    # The saved attrs.json carries alpha/beta; both readings turn greedy's "helo world"/"hello word" right.
    assert verify_lm(tmp_path, [HELO, WORD], decoder) == [("hello world", "hello world")] * 2
    # Saved weights that differ from the decoder's (alpha 0: greedy's "helo world" stays) are caught,
    # naming the folder.
    lm.LMDecoder.from_path(arpa, VOCAB, alpha=0.0, beta=0.0).save_for_processor(tmp_path)
    with pytest.raises(ExportCheckError, match=f"{tmp_path}.*'helo world', 'hello world'"):
        verify_lm(tmp_path, [HELO, WORD], decoder)


@pytest.mark.skipif(bool(transformers_lm_problem()), reason=str(transformers_lm_problem()))
def test_saved_folder_loads_in_transformers_and_decodes_alike(arpa, tmp_path):
    from transformers import Wav2Vec2Processor, Wav2Vec2ProcessorWithLM

    _processor_folder(tmp_path)
    decoder = lm.LMDecoder.from_path(arpa, VOCAB, alpha=0.7, beta=0.3, beam_width=16)
    decoder.save_for_processor(tmp_path)
    assert type(Wav2Vec2Processor.from_pretrained(tmp_path)).__name__ == "Wav2Vec2Processor"
    processor = Wav2Vec2ProcessorWithLM.from_pretrained(tmp_path)
    assert (processor.language_model.alpha, processor.language_model.beta) == (0.7, 0.3)
    for logits in (HELO, WORD):
        # The saved attrs.json carries alpha/beta, so HF needs only the beam width.
        assert processor.decode(logits, beam_width=16).text == decoder.decode_batch([logits])[0]
    assert decoder.decode_batch([WORD]) == ["hello world"]


@pytest.mark.skipif(bool(transformers_lm_problem(pipeline=True)), reason=str(transformers_lm_problem(pipeline=True)))
def test_pipeline_picks_up_the_lm(arpa, tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC, pipeline

    _processor_folder(tmp_path)
    lm.LMDecoder.from_path(arpa, VOCAB).save_for_processor(tmp_path)
    config = Wav2Vec2Config(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
                            conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=8,
                            num_conv_pos_embedding_groups=2, pad_token_id=VOCAB.pad_id)
    Wav2Vec2ForCTC(config).save_pretrained(tmp_path)
    asr = pipeline("automatic-speech-recognition", model=str(tmp_path))
    assert asr.type == "ctc_with_lm"  # "ctc" (greedy) unless the nested processor_class says WithLM


def test_folder_as_lm_path_reads_saved_weights(arpa, tmp_path):
    _processor_folder(tmp_path)
    lm.LMDecoder.from_path(arpa, VOCAB, alpha=0.7, beta=0.3).save_for_processor(tmp_path)
    for path in (tmp_path, tmp_path / "language_model"):
        decoder = lm.LMDecoder.from_path(path, VOCAB)
        assert (decoder.alpha, decoder.beta) == (0.7, 0.3)
        assert decoder.decode_batch([HELO]) == ["hello world"]
    # Explicit weights win; re-saving into the folder the LM came from keeps it intact.
    decoder = lm.LMDecoder.from_path(tmp_path, VOCAB, alpha=0.0, beta=0.0)
    assert decoder.decode_batch([WORD]) == ["hello word"]
    decoder.save_for_processor(tmp_path)
    assert lm.LMDecoder.from_path(tmp_path, VOCAB).alpha == 0.0


def test_mismatched_vocab_and_missing_path_name_the_file(arpa, tmp_path):
    _processor_folder(tmp_path)
    other = Vocab.build(["zz top"])
    with pytest.raises(UserError, match="vocab.json"):
        lm.LMDecoder.from_path(arpa, other).save_for_processor(tmp_path)
    lm.LMDecoder.from_path(arpa, VOCAB).save_for_processor(tmp_path)
    with pytest.raises(UserError, match="alphabet.json"):
        lm.LMDecoder.from_path(tmp_path, other)
    with pytest.raises(UserError, match="nope.arpa"):
        lm.LMDecoder.from_path(tmp_path / "nope.arpa", VOCAB)


def test_require_lm_names_the_missing_module_and_install_line(arpa, monkeypatch):
    lm.require_lm()  # all installed here
    monkeypatch.setitem(sys.modules, "kenlm", None)  # import kenlm -> ImportError
    with pytest.raises(UserError) as error:
        lm.LMDecoder.from_path(arpa, VOCAB)
    message = str(error.value)
    assert "missing: kenlm." in message
    assert "pip install 'xlsr-jax[lm]' && pip install --no-deps pyctcdecode==0.5.0" in message
    assert "numpy<2" in message
