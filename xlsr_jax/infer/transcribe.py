"""Transcribe long audio with a Flax CTC model: chunk, run batched on device, stitch, decode, write.

Chunking and stitching follow transformers' ASR pipeline for CTC models (`chunk_length_s`,
`stride_length_s`) number for number, so a file gives the same text here as through
`pipeline("automatic-speech-recognition", model=exported_folder)`:

- chunk and strides are rounded to multiples of `inputs_to_logits_ratio` (the conv stack's total stride);
- each chunk is normalised on its own (the feature extractor's zero-mean / unit-variance);
- each chunk's logits lose their stride frames, with the pipeline's own rounding (`rescale_stride`);
- layer-norm models get an attention mask (their feature extractor returns one); group-norm models run
  without, so their short last chunk runs at its own length: padding would change its group norm.

Files are read in blocks (`stream_audio`), and each chunk's samples kept only until its batch has run, so
memory stays flat in a file's length: an hour's file needs no hour of samples in memory.

Word times are the pipeline's `return_timestamps="word"`: frame * inputs_to_logits_ratio / sampling_rate,
a word running from its first character's first frame to the end of its last character's last frame.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import itertools
import json
import math
import os
import sys
from typing import Callable, Iterable, Iterator, Protocol, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from xlsr_jax.data.audio import SAMPLING_RATE, AudioError, normalize_waveform, stream_audio
from xlsr_jax.model.wav2vec2 import feat_extract_output_lengths, receptive_field
from xlsr_jax.text import Vocab

# Frames of a file read at a time: 5.5 s at 48 kHz, 1 MB a channel; small against a batch of chunks.
READ_BLOCK_FRAMES = 1 << 18

# A decoded word in CTC frames: (word, start_frame, end_frame), end exclusive.
FrameWord = tuple[str, int, int]


class CTCDecoder(Protocol):
    """A beam-search decoder (e.g. an n-gram LM) used instead of greedy decoding."""

    def decode_words(self, log_probs: np.ndarray) -> tuple[str, list[FrameWord]]:
        """log_probs float32 [frames, vocab] -> (text, [(word, start_frame, end_frame)])."""


@dataclasses.dataclass(frozen=True)
class Word:
    text: str
    start_s: float
    end_s: float


@dataclasses.dataclass(frozen=True)
class Transcript:
    path: str
    text: str
    words: list[Word]
    duration_s: float


@dataclasses.dataclass(eq=False)
class _File:
    """A file being transcribed: each chunk's kept frames (None until its batch ran), its length once read."""

    path: str
    pieces: list[np.ndarray | None] = dataclasses.field(default_factory=list)
    num_samples: int | None = None


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Samples [start, end) of a file, and the logit frames [keep_start, keep_end) it contributes."""

    start: int
    end: int
    keep_start: int
    keep_end: int


# --- chunk geometry: transformers' chunk_iter + rescale_stride ---------------------------------------


def chunk_geometry(chunk_length_s: float, stride_length_s, align_to: int,
                   sampling_rate: int = SAMPLING_RATE) -> tuple[int, int, int]:
    """(chunk, left stride, right stride) in samples, each rounded to a multiple of `align_to`.

    `stride_length_s`: None (chunk / 6 on each side), seconds on both sides, or (left, right).
    """
    if stride_length_s is None:
        stride_length_s = chunk_length_s / 6
    if isinstance(stride_length_s, (int, float)):
        stride_length_s = (stride_length_s, stride_length_s)
    chunk, left, right = (int(round(s * sampling_rate / align_to) * align_to)
                          for s in (chunk_length_s, *stride_length_s))
    if chunk - left - right <= 0:
        raise ValueError(f"chunk_length_s={chunk_length_s} must exceed the two strides {tuple(stride_length_s)}")
    return chunk, left, right


def plan_chunks(num_samples: int, chunk: int, left: int, right: int, align_to: int) -> list[Chunk]:
    """The pipeline's chunks of a `num_samples` file and the logit frames each keeps.

    Frame counts use the pipeline's estimate round(samples / align_to), not the conv arithmetic; the
    caller also cuts at the frames the model really made, as slicing the shorter tensor does there.
    The pipeline's `chunk.shape[0] > stride_left` test is left out: it never fails, since a chunk after
    the first follows one that was not last, so it has more than left + right samples.
    """
    chunks = []
    for start in range(0, num_samples, chunk - left - right):
        is_last = start + chunk >= num_samples
        chunks.append(chunk_at(start, min(chunk, num_samples - start), is_last, left, right, align_to))
        if is_last:
            break
    return chunks


def chunk_at(start: int, size: int, is_last: bool, left: int, right: int, align_to: int) -> Chunk:
    """The chunk of `size` samples at `start` and its kept frames. Only the last chunk's size depends on
    the file's length, so a file read front to back can be cut without knowing its length beforehand."""
    ratio = 1 / align_to  # the pipeline multiplies by this rather than dividing: same float rounding
    stride_left = 0 if start == 0 else left
    stride_right = 0 if is_last else right
    frames = int(round(size * ratio))
    keep_start = int(round(stride_left / size * frames))
    keep_end = frames - int(round(stride_right / size * frames))
    return Chunk(start, start + size, keep_start, keep_end)


# --- greedy CTC decoding with word offsets: Wav2Vec2CTCTokenizer.decode(..., output_word_offsets) ----


def ctc_greedy_words(ids: np.ndarray, vocab: Vocab) -> tuple[str, list[FrameWord]]:
    """ids int [frames] (frame-wise argmax) -> (text, [(word, start_frame, end_frame)]).

    Like the tokenizer: repeats collapse, blanks go, '|' becomes a space, the text is only stripped
    (so two delimiters give two spaces), and [UNK] stays as the string "[UNK]".
    """
    chars = vocab.ctc_runs(ids)  # (char, first frame, end frame)
    text = "".join(c for c, _, _ in chars).strip()  # two spaces stay two, as the tokenizer leaves them
    words: list[FrameWord] = []
    for is_space, group in itertools.groupby(chars, key=lambda c: c[0] == " "):
        if not is_space:
            group = list(group)
            words.append(("".join(c for c, _, _ in group), group[0][1], group[-1][2]))
    return text, words


# --- the model on chunks ------------------------------------------------------------------------------


def _chunk_outputs(model, params, input_values, attention_mask, with_log_probs: bool):
    """input_values float32 [batch, samples] -> ids int32 [batch, frames] or log-probs [batch, frames, vocab]."""
    logits = model.apply({"params": params}, input_values, attention_mask, deterministic=True)
    if with_log_probs:
        return jax.nn.log_softmax(logits, axis=-1)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


class Transcriber:
    """Runs a Flax `FlaxWav2Vec2ForCTC` over files of any length.

    Full-length chunks of one or more files go through one jitted function in batches of
    `[batch, chunk samples]`, batch a power of two up to `batch_size`. Layer-norm models also pad and mask
    their short chunks into that shape; group-norm models run a short chunk alone at its own length (one
    compile per distinct length).
    """

    def __init__(self, model, params, vocab: Vocab, *, chunk_length_s: float = 20.0, stride_length_s=None,
                 batch_size: int = 8, decoder: CTCDecoder | None = None):
        config = model.config
        if config.vocab_size != len(vocab):
            raise ValueError(f"model vocab_size={config.vocab_size} but the vocab has {len(vocab)} tokens")
        self.config, self.params, self.vocab, self.decoder = config, params, vocab, decoder
        self.batch_size = batch_size
        self.align_to = math.prod(config.conv_stride)
        self.chunk, self.stride_left, self.stride_right = chunk_geometry(
            chunk_length_s, stride_length_s, self.align_to)
        self.masked = config.feat_extract_norm == "layer"
        self._min_samples = receptive_field(config)
        self._forward = jax.jit(functools.partial(_chunk_outputs, model),
                                static_argnames="with_log_probs")

    def plan(self, num_samples: int) -> list[Chunk]:
        """Chunks of a `num_samples` file; those too short for one frame are left out."""
        chunks = plan_chunks(num_samples, self.chunk, self.stride_left, self.stride_right, self.align_to)
        return [c for c in chunks if c.end - c.start >= self._min_samples]

    def transcribe_audio(self, audio: np.ndarray, path: str = "") -> Transcript:
        """audio float [samples], mono at 16 kHz -> Transcript."""
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 1:
            raise ValueError(f"{path or 'audio'}: expected mono samples [samples], got shape {audio.shape}")
        plan = self.plan(audio.size)
        return self._decode(path, audio.size, self._run_chunks([(audio[c.start:c.end], c) for c in plan]))

    def transcribe_files(self, paths: Iterable[str],
                         on_error: Callable[[str, Exception], None] | None = None) -> Iterator[Transcript]:
        """Transcripts of `paths` in order, batching chunks across files.

        Files are read in blocks and cut into chunks as they are read; the waiting chunks run as soon as
        they fill a batch, so memory holds a batch of chunks, not a file. A file that cannot be decoded
        (also part way through) raises `AudioError` (its message names the file), or, with `on_error`,
        is handed to `on_error(path, error)` and skipped.
        """
        files: collections.deque[_File] = collections.deque()  # read or being read, not yet yielded
        waiting: list[tuple[_File, int, np.ndarray, Chunk]] = []  # (file, chunk index, samples, chunk)
        for path in map(os.fspath, paths):
            file = _File(path)
            files.append(file)
            try:
                for samples, c in self._read_chunks(file):
                    waiting.append((file, len(file.pieces), samples, c))
                    file.pieces.append(None)
                    if len(waiting) >= self.batch_size:
                        self._run_waiting(waiting)
                        waiting = []
                        yield from self._finished(files)
            except AudioError as err:
                files.remove(file)
                waiting = [w for w in waiting if w[0] is not file]
                if on_error is None:
                    raise
                on_error(path, err)
        if waiting:
            self._run_waiting(waiting)
        yield from self._finished(files)

    def _read_chunks(self, file: _File) -> Iterator[tuple[np.ndarray, Chunk]]:
        """`plan`'s chunks of `file` as it is read, each with its samples float32 [chunk samples]; sets
        `file.num_samples` at the end.

        A window of the file holds the current chunk and one sample more (is there more after it? else it
        is the last chunk); samples before the next chunk's start are let go.
        """
        blocks = stream_audio(file.path, SAMPLING_RATE, READ_BLOCK_FRAMES)
        step = self.chunk - self.stride_left - self.stride_right
        window, offset, more, start = np.zeros(0, np.float32), 0, True, 0  # window: samples [offset, ...)
        while True:
            parts, have = [window], offset + window.size
            while more and have <= start + self.chunk:
                block = next(blocks, None)
                more = block is not None
                if more:
                    parts.append(block)
                    have += block.size
            window = np.concatenate(parts) if len(parts) > 1 else window
            is_last = start + self.chunk >= have  # only at the end of the file: have is its length
            size = min(self.chunk, have - start)
            if size >= self._min_samples:
                yield (window[start - offset:start - offset + size].copy(),
                       chunk_at(start, size, is_last, self.stride_left, self.stride_right, self.align_to))
            if is_last:
                file.num_samples = have
                return
            start += step
            window, offset = window[start - offset:], start

    def _run_waiting(self, waiting: list[tuple[_File, int, np.ndarray, Chunk]]) -> None:
        """Run the waiting chunks; each one's kept frames go to its file's place for it."""
        for (file, index, _, _), kept in zip(waiting, self._run_chunks([(x, c) for _, _, x, c in waiting])):
            file.pieces[index] = kept

    def _finished(self, files: collections.deque[_File]) -> Iterator[Transcript]:
        """Transcripts of the files at the front of `files` that are read and run, in order."""
        while files and files[0].num_samples is not None and all(p is not None for p in files[0].pieces):
            file = files.popleft()
            yield self._decode(file.path, file.num_samples, file.pieces)

    def _run_chunks(self, work: list[tuple[np.ndarray, Chunk]]) -> list[np.ndarray]:
        """work: (the chunk's samples float32 [end - start], chunk) -> each chunk's kept frames: ids int32
        [kept] or log-probs float32 [kept, vocab], in order."""
        out: list[np.ndarray | None] = [None] * len(work)
        full = [i for i, (_, c) in enumerate(work) if self.masked or c.end - c.start == self.chunk]
        for at in range(0, len(full), self.batch_size):
            rows = full[at:at + self.batch_size]
            # Powers of two up to batch_size: a lone file does not pay for batch_size rows, and there are
            # still only log2(batch_size) + 1 shapes to compile.
            batch = min(self.batch_size, 1 << (len(rows) - 1).bit_length())
            x = np.zeros((batch, self.chunk), np.float32)
            # Filler rows keep a full mask: an all-masked row would only invite NaNs into a discarded row.
            mask = np.ones((batch, self.chunk), np.int32)
            for row, i in enumerate(rows):
                samples, c = work[i]
                x[row, :c.end - c.start] = normalize_waveform(samples)
                mask[row, c.end - c.start:] = 0
            result = self._device_run(x, mask if self.masked else None)
            for row, i in enumerate(rows):
                out[i] = self._keep(result[row], work[i][1])
        for i, (samples, c) in enumerate(work):
            if out[i] is None:  # a group-norm model's short chunk: its own length, no mask
                x = normalize_waveform(samples)[None]
                out[i] = self._keep(self._device_run(x, None)[0], c)
        return out

    def _device_run(self, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        return np.asarray(self._forward(self.params, x, mask, with_log_probs=self.decoder is not None))

    def _keep(self, frames: np.ndarray, c: Chunk) -> np.ndarray:
        """Cut one chunk's output [frames, ...] to the frames the pipeline keeps (and the model really made)."""
        real = int(feat_extract_output_lengths(self.config, c.end - c.start))
        return frames[c.keep_start:min(c.keep_end, real)]

    def _decode(self, path: str, num_samples: int, pieces: list[np.ndarray]) -> Transcript:
        width = () if self.decoder is None else (len(self.vocab),)
        frames = np.concatenate(pieces) if pieces else np.zeros((0, *width), np.float32)
        if self.decoder is None:
            text, words = ctc_greedy_words(frames, self.vocab)
        else:
            text, words = self.decoder.decode_words(frames)
        seconds = self.align_to / SAMPLING_RATE
        return Transcript(path, text, [Word(w, s * seconds, e * seconds) for w, s, e in words],
                          num_samples / SAMPLING_RATE)


# --- writers --------------------------------------------------------------------------------------------


def write_text(transcripts: Iterable[Transcript], file: TextIO = sys.stdout) -> int:
    """One `path<TAB>text` line per transcript (just the text when there is no path); returns the count."""
    count = 0
    for t in transcripts:
        file.write(f"{t.path}\t{t.text}\n" if t.path else f"{t.text}\n")
        file.flush()  # a long job shows its progress line by line
        count += 1
    return count


def write_tsv(transcripts: Iterable[Transcript], path: str | os.PathLike) -> int:
    """A TSV with header `path, text, duration_s`, written as transcripts arrive; returns the count."""
    count = 0
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["path", "text", "duration_s"])
        for t in transcripts:
            writer.writerow([t.path, t.text, repr(t.duration_s)])
            f.flush()
            count += 1
    return count


def write_json(transcripts: Iterable[Transcript], path: str | os.PathLike) -> int:
    """A JSON list of {path, text, duration_s, words: [{text, start_s, end_s}]}, streamed; returns the count."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for t in transcripts:
            f.write(("," if count else "") + "\n" + json.dumps(dataclasses.asdict(t), ensure_ascii=False))
            f.flush()
            count += 1
        f.write("\n]\n")
    return count


def read_json(path: str | os.PathLike) -> list[Transcript]:
    """The transcripts `write_json` wrote."""
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    return [Transcript(r["path"], r["text"], [Word(**w) for w in r["words"]], r["duration_s"]) for r in rows]


# --- the `xlsr-jax transcribe` command ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TranscribeResult:
    written: int  # transcripts written
    skipped: list[str]  # one 'path: cannot decode (why)' per file that could not be read, in order


def run_transcribe(source: str, files: Sequence[str], *, step: int | None = None, best: bool = False,
                   average: int = 1, out: str | None = None, chunk_length_s: float = 20.0, stride_length_s=None,
                   batch_size: int = 8, lm: str | None = None, alpha: float | None = None,
                   beta: float | None = None, beam_width: int = 100, file: TextIO = sys.stdout) -> TranscribeResult:
    """Transcribe `files` with `source` (run dir, model folder or hub id): `path<TAB>text` lines to
    `file`, or a .tsv / .json (with word times) at `out`. Files that cannot be read are skipped and
    returned, each named with why; UserError when no file could be read."""
    from xlsr_jax.errors import UserError
    from xlsr_jax.infer.load import load_model

    writer = {".json": write_json, ".tsv": write_tsv}.get(os.path.splitext(out)[1].lower()) if out else None
    if out and writer is None:
        raise UserError(f"--out {out}: expected a .tsv or .json file")
    loaded = load_model(source, step=step, best=best, average=average)
    decoder = None
    if lm is not None:
        from xlsr_jax.infer.lm import LMDecoder  # needs the `lm` extra

        decoder = LMDecoder.from_path(lm, loaded.vocab, alpha=alpha, beta=beta, beam_width=beam_width)
    transcriber = Transcriber(loaded.model, loaded.params, loaded.vocab, chunk_length_s=chunk_length_s,
                              stride_length_s=stride_length_s, batch_size=batch_size, decoder=decoder)
    failed: list[str] = []
    transcripts = transcriber.transcribe_files(files, on_error=lambda path, err: failed.append(str(err)))
    count = writer(transcripts, out) if writer else write_text(transcripts, file)
    if not count:
        raise UserError(f"no file could be transcribed: {'; '.join(failed)}")
    return TranscribeResult(count, failed)
