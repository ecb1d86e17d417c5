"""Transcriber against transformers' ASR pipeline on the same exported model and audio."""

from __future__ import annotations

import csv
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, pipeline
from transformers.pipelines.automatic_speech_recognition import chunk_iter, rescale_stride

from _models import quiet_config
from xlsr_jax.cli import main
from xlsr_jax.data.audio import AudioError, load_audio, normalize_waveform, resample, stream_audio
from xlsr_jax.hub.export import write_hf_folder
from xlsr_jax.infer import transcribe as transcribe_mod
from xlsr_jax.infer.transcribe import (
    Transcriber, Transcript, Word, chunk_geometry, ctc_greedy_words, plan_chunks, read_json, write_json,
    write_text, write_tsv,
)
from xlsr_jax.model.wav2vec2 import FlaxWav2Vec2ForCTC
from xlsr_jax.text import Vocab

SR = 16000
VOCAB = Vocab.build(["abcdefghi"])  # a..i, |, [UNK], [PAD]: the tiny configs' 12 outputs
# Four convs with total stride 320 (50 frames/s) like XLSR, so the pipeline's rounding to 320 is exercised.
CONV = dict(conv_dim=(16,) * 4, conv_kernel=(10, 4, 4, 4), conv_stride=(5, 4, 4, 4))


def signal(seconds: float, seed: int = 0) -> np.ndarray:
    """A chirping, swelling tone plus noise, float32 [samples]: varied enough for varied argmaxes."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    tone = np.sin(2 * np.pi * (200 + 150 * np.sin(2 * np.pi * 0.3 * t)) * t) * (1 + np.sin(2 * np.pi * 0.7 * t))
    return (0.3 * tone + 0.1 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """kind -> (model, params, HF folder) for a seeded random tiny model, built once per kind."""
    cache = {}

    def build(kind: str):
        if kind not in cache:
            config = quiet_config(kind, vocab_size=len(VOCAB), **CONV)
            model = FlaxWav2Vec2ForCTC(config)
            params = model.init_params(jax.random.key(0))
            # Random heads are nearly flat: sharpen them and favour blank and '|' so the argmax moves from
            # frame to frame through blanks, repeats, words and double delimiters, as a trained head does.
            bias = np.zeros(len(VOCAB), np.float32)
            bias[VOCAB.pad_id], bias[VOCAB.word_delimiter_id] = 3.0, 1.5
            params["lm_head"] = {"kernel": params["lm_head"]["kernel"] * 20, "bias": jnp.asarray(bias)}
            cache[kind] = (model, params, write_hf_folder(params, config, VOCAB, tmp_path_factory.mktemp(kind)))
        return cache[kind]

    return build


def hf_words(chunks) -> list[tuple[str, float, float]]:
    return [(c["text"], float(c["timestamp"][0]), float(c["timestamp"][1])) for c in chunks]


def our_words(transcript: Transcript) -> list[tuple[str, float, float]]:
    return [(w.text, w.start_s, w.end_s) for w in transcript.words]


def assert_same_words(ours, theirs):
    assert [w for w, _, _ in ours] == [w for w, _, _ in theirs]
    np.testing.assert_allclose([t for _, *t in ours], [t for _, *t in theirs], rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_samples", [1, 800, 53_759, 53_760, 53_761, 64_641, 89_600, 89_601, 103_680, 103_681,
                                         140_000, 245_123])
@pytest.mark.parametrize("chunk_s, stride_s", [(4.03, (0.99, 0.61)), (3.35, None), (2.0, 0.0)])
def test_plan_is_the_pipelines_chunk_iter(num_samples, chunk_s, stride_s):
    chunk, left, right = chunk_geometry(chunk_s, stride_s, 320)
    extractor = Wav2Vec2FeatureExtractor(return_attention_mask=True)
    theirs = []
    for item in chunk_iter(np.zeros(num_samples, np.float32), extractor, chunk, left, right):
        frames, drop_left, drop_right = rescale_stride([item["stride"]], 1 / 320)[0]
        theirs.append((item["stride"][0], drop_left, frames - drop_right))
    ours = [(c.end - c.start, c.keep_start, c.keep_end) for c in plan_chunks(num_samples, chunk, left, right, 320)]
    assert ours == theirs


def test_geometry_rounds_to_the_logit_ratio_like_the_pipeline():
    # 201.5 and 49.5 frames round up, 30.5 rounds down (half to even), all as in the pipeline.
    assert chunk_geometry(4.03, (0.99, 0.61), 320) == (64_640, 16_000, 9_600)
    assert chunk_geometry(3.35, None, 320) == (53_760, 8_960, 8_960)  # 167.5 -> 168, 27.9 -> 28
    # Default stride 3.3 s / 6 = 0.55 s is 27.4999... frames in floats: 27, as in the pipeline, not 28.
    assert chunk_geometry(3.3, None, 320) == (52_800, 8_640, 8_640)
    with pytest.raises(ValueError, match="must exceed the two strides"):
        chunk_geometry(2.0, 1.0, 320)


@pytest.mark.slow  # runs the whole model (and transformers' pipeline) at several chunk shapes
@pytest.mark.parametrize("kind, chunk_s, stride_s", [("stable", 4.03, (0.99, 0.61)), ("group", 3.35, None)])
def test_chunked_text_and_word_times_equal_the_pipeline(exported, kind, chunk_s, stride_s):
    model, params, folder = exported(kind)
    audio = signal(15.3)
    transcriber = Transcriber(model, params, VOCAB, chunk_length_s=chunk_s, stride_length_s=stride_s,
                              batch_size=4)
    plan = transcriber.plan(audio.size)
    # Several batches, a filler row, and a short last chunk (own length for group norm, masked for layer norm).
    assert len(plan) in (6, 7) and plan[-1].end - plan[-1].start < transcriber.chunk
    ours = transcriber.transcribe_audio(audio, path="long.wav")

    asr = pipeline("automatic-speech-recognition", model=str(folder))
    ref = asr(audio.copy(), chunk_length_s=chunk_s, stride_length_s=stride_s, return_timestamps="word")
    assert ours.text == ref["text"]
    assert len(ours.text) > 300 and "  " in ours.text  # a real check: long, with a double delimiter
    assert len(ours.words) > 50
    assert_same_words(our_words(ours), hf_words(ref["chunks"]))
    assert ours.path == "long.wav" and ours.duration_s == audio.size / SR


@pytest.mark.slow  # compiles the whole model
@pytest.mark.parametrize("kind", ["stable", "group"])
def test_a_chunk_longer_than_the_file_is_one_model_call(exported, kind):
    model, params, folder = exported(kind)
    audio = signal(6.7, seed=1)
    ours = Transcriber(model, params, VOCAB, chunk_length_s=8.0).transcribe_audio(audio)

    apply = jax.jit(lambda p, x: model.apply({"params": p}, x, deterministic=True))
    logits = apply(params, normalize_waveform(audio)[None])
    ids = np.asarray(jnp.argmax(logits[0], axis=-1))
    tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(folder)
    ref = tokenizer.decode(ids, output_word_offsets=True)
    assert ours.text == ref.text and len(ours.words) > 15
    assert " ".join(ours.text.split()) == VOCAB.decode_ctc(ids)
    assert_same_words(our_words(ours), [(w["word"], w["start_offset"] * 0.02, w["end_offset"] * 0.02)
                                        for w in ref.word_offsets])


def test_greedy_words_follow_the_tokenizer(exported):
    *_, folder = exported("stable")
    tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(folder)
    a, b, bar, unk, pad = (VOCAB.token_to_id(t) for t in ("a", "b", "|", "[UNK]", "[PAD]"))
    cases = [[], [pad, pad], [bar, a, a, pad, a, b, bar, pad, bar, unk, b, b], [a, bar, bar, b, pad, bar],
             [pad, b, unk, unk, pad, pad, bar, a]]
    for ids in cases:
        text, words = ctc_greedy_words(np.array(ids, np.int32), VOCAB)
        ref = tokenizer.decode(ids, output_word_offsets=True)
        assert text == ref.text
        assert words == [(w["word"], w["start_offset"], w["end_offset"]) for w in ref.word_offsets]
    assert ctc_greedy_words(np.array(cases[2]), VOCAB) == ("aab  [UNK]b", [("aab", 1, 6), ("[UNK]b", 9, 12)])


class RecordingDecoder:
    """Stands in for the LM beam search: records what it gets, answers two fixed words."""

    def decode_words(self, log_probs):
        self.log_probs = log_probs
        return "ab cd", [("ab", 3, 7), ("cd", 10, 12)]


@pytest.mark.slow  # runs the whole model at several chunk shapes
def test_a_decoder_gets_the_stitched_log_probs(exported):
    model, params, _ = exported("stable")
    audio = signal(9.1, seed=2)
    greedy = Transcriber(model, params, VOCAB, chunk_length_s=4.01, batch_size=2).transcribe_audio(audio)
    decoder = RecordingDecoder()
    ours = Transcriber(model, params, VOCAB, chunk_length_s=4.01, batch_size=2, decoder=decoder
                       ).transcribe_audio(audio)

    log_probs = decoder.log_probs
    # Three chunks keep frames [0, 167), [33, 167) and [33, 186) (186 real of the pipeline's 187): 454.
    assert log_probs.shape == (454, len(VOCAB)) and log_probs.dtype == np.float32
    np.testing.assert_allclose(np.exp(log_probs).sum(-1), 1.0, rtol=1e-5)
    assert ctc_greedy_words(log_probs.argmax(-1), VOCAB)[0] == greedy.text
    assert ours.text == "ab cd"
    assert our_words(ours) == [("ab", 0.06, 0.14), ("cd", 0.2, 0.24)]


@pytest.mark.slow  # runs the whole model at several chunk shapes
def test_files_are_batched_together_and_bad_files_named(exported, tmp_path):
    model, params, _ = exported("stable")
    paths = []
    for i, seconds in enumerate([2.0, 5.3, 1.2]):
        paths.append(str(tmp_path / f"clip{i}.flac"))
        sf.write(paths[-1], signal(seconds, seed=10 + i), SR)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEnot audio")
    paths.insert(1, str(bad))
    transcriber = Transcriber(model, params, VOCAB, chunk_length_s=4.01, batch_size=3)

    errors = []
    got = list(transcriber.transcribe_files(paths, on_error=lambda p, e: errors.append((p, str(e)))))
    assert [p for p, _ in errors] == [str(bad)] and errors[0][1].startswith(f"{bad}: cannot decode")
    assert [t.path for t in got] == [paths[0], paths[2], paths[3]]
    for t in got:
        alone = transcriber.transcribe_audio(sf.read(t.path, dtype="float32")[0], path=t.path)
        assert t == alone and len(t.text) > 10
    assert [t.duration_s for t in got] == [2.0, 5.3, 1.2]
    with pytest.raises(AudioError, match="bad.wav: cannot decode"):
        list(transcriber.transcribe_files(paths))


def test_writers_round_trip(tmp_path):
    transcripts = [
        Transcript("a/b.mp3", 'çok "güzel"\tbir', [Word("çok", 0.02, 0.3), Word('"güzel"', 0.34, 0.9)],
                   1.2345625),
        Transcript("c.wav", "", [], 0.5),
    ]
    assert write_json(iter(transcripts), tmp_path / "t.json") == 2
    assert read_json(tmp_path / "t.json") == transcripts
    assert write_json([], tmp_path / "empty.json") == 0 and read_json(tmp_path / "empty.json") == []

    assert write_tsv(iter(transcripts), tmp_path / "t.tsv") == 2
    with open(tmp_path / "t.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [(r["path"], r["text"], float(r["duration_s"])) for r in rows] == [
        (t.path, t.text, t.duration_s) for t in transcripts]

    out = io.StringIO()
    assert write_text(transcripts + [Transcript("", "x y", [], 1.0)], out) == 3
    assert out.getvalue() == 'a/b.mp3\tçok "güzel"\tbir\nc.wav\t\nx y\n'


@pytest.mark.parametrize("name, rate, channels", [
    ("a.mp3", 48000, 1), ("b.mp3", 44100, 2), ("c.wav", 44100, 2), ("d.wav", 16000, 1), ("e.flac", 22050, 1),
    ("f.ogg", 48000, 2),
])
def test_blocks_are_the_whole_file(tmp_path, audio_writer, name, rate, channels):
    path = str(tmp_path / name)
    audio_writer(path, 2.3, rate, channels=channels)
    whole = load_audio(path)
    # 4001 frames: reads that end anywhere in a codec's frame, the resampler fed odd lengths.
    blocks = list(stream_audio(path, 16000, block_frames=4001))
    assert len(blocks) >= 9 and all(b.dtype == np.float32 and b.ndim == 1 for b in blocks)
    joined = np.concatenate(blocks)
    assert joined.shape == whole.shape
    if name == "a.mp3":
        # libsndfile's mpg123 decodes mono MP3 slightly differently once a read ends inside an MP3 frame
        # (float rounding only, ~1e-7); stereo MP3 and the other formats come out bit for bit.
        np.testing.assert_allclose(joined, whole, rtol=0, atol=1e-6)
    else:
        np.testing.assert_array_equal(joined, whole)


def test_a_long_file_is_read_in_blocks_as_its_chunks_run(exported, tmp_path, monkeypatch):
    model, params, _ = exported("stable")
    path = str(tmp_path / "long.flac")
    sf.write(path, resample(signal(15.3, seed=3), SR, 48000), 48000)  # 48 kHz: blocks go through soxr
    whole = load_audio(path)
    monkeypatch.setattr(transcribe_mod, "READ_BLOCK_FRAMES", 24000)  # 0.5 s of the file a block
    read = []  # samples (16 kHz) of each block handed to the transcriber so far

    def counting_stream(*args):
        for block in stream_audio(*args):
            read.append(block.size)
            yield block

    monkeypatch.setattr(transcribe_mod, "stream_audio", counting_stream)
    transcriber = Transcriber(model, params, VOCAB, chunk_length_s=4.03, stride_length_s=(0.99, 0.61),
                              batch_size=2)
    run_chunks, batches = transcriber._run_chunks, []

    def spy(work):
        batches.append((list(read), [(samples.copy(), c) for samples, c in work]))
        return run_chunks(work)

    transcriber._run_chunks = spy
    (got,) = transcriber.transcribe_files([path])

    # 244_800 samples: six chunks (starts 39_040 apart, the last 49_600 long), three batches of two.
    assert sum(read) == whole.size == 244_800 and len(batches) == 3
    # The first batch ran once the blocks covered its second chunk [39_040, 103_680) and one sample more:
    # the block before the last read ended inside that chunk, and not half the file had been read.
    blocks_then, first_work = batches[0]
    assert first_work[1][1].end == 103_680
    assert sum(blocks_then[:-1]) <= 103_680 < sum(blocks_then) < whole.size // 2
    chunks = [c for _, work in batches for _, c in work]
    assert chunks == transcriber.plan(whole.size)
    for _, work in batches:  # each chunk got exactly its samples of the whole-file decode
        for samples, c in work:
            np.testing.assert_array_equal(samples, whole[c.start:c.end])
    assert got == transcriber.transcribe_audio(whole, path=path) and len(got.text) > 300


@pytest.mark.slow  # runs the whole model at several chunk shapes
def test_cli_exit_status_names_the_unreadable_files(exported, tmp_path, capsys):
    *_, folder = exported("stable")
    good = str(tmp_path / "good.wav")
    sf.write(good, signal(3.1, seed=4), SR)
    corrupt = tmp_path / "corrupt.flac"
    corrupt.write_bytes(b"fLaC but no audio after it" * 20)
    missing = str(tmp_path / "missing.mp3")
    files = [str(corrupt), good, missing]
    out = tmp_path / "t.tsv"

    assert main(["transcribe", str(folder), *files, "--out", str(out), "--chunk-length-s", "2"]) == 1
    printed = capsys.readouterr()
    assert printed.out == f"wrote 1 transcripts to {out}\n"
    lines = printed.err.splitlines()
    assert lines[0] == "xlsr-jax transcribe: skipped 2 of 3 files that could not be read:"
    assert lines[1].startswith(f"  {corrupt}: cannot decode (")
    assert lines[2] == f"  {missing}: cannot decode (no such file)"
    with open(out, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    model, params, _ = exported("stable")
    alone = Transcriber(model, params, VOCAB, chunk_length_s=2.0).transcribe_audio(load_audio(good))
    assert [(r["path"], r["text"]) for r in rows] == [(good, alone.text)] and len(alone.text) > 20

    assert main(["transcribe", str(folder), *files, "--out", str(out), "--chunk-length-s", "2",
                 "--keep-going"]) == 0
    assert capsys.readouterr().err.splitlines() == lines  # still named
    assert main(["transcribe", str(folder), good, "--out", str(out), "--chunk-length-s", "2"]) == 0
    assert capsys.readouterr().err == ""
