"""Decode once: every clip's waveform as int16 in one memory-mapped file.

Decoding MP3 and resampling costs ~1 ms per audio-second; doing it every epoch would starve an
accelerator. The cache is keyed on the audio files (path, size, mtime) and on every setting that
changes the decoded samples (sampling rate, :data:`audio.DECODE_SETTINGS`, the silence threshold, the
format version), so a re-run reuses it and a changed file or setting rebuilds it. Layout of
``<cache_dir>/audio-<sr>-<hash>/``:

  audio.bin          int16, all kept clips concatenated
  offsets.npy        int64 [n]  first sample of each kept clip
  lengths.npy        int64 [n]  samples of each kept clip
  example_index.npy  int64 [n]  index of the kept clip in the examples passed in
  meta.json          settings, counts, skipped examples as [index, reason, message]

A clip is skipped when it is missing, empty, cannot be decoded or is silent (see
:data:`SILENCE_PEAK`). The build appends to ``<folder>.building/`` (``audio.bin`` and ``progress.jsonl``,
one line per decoded chunk, written after its audio is on disk) and renames it to the final name at the
end. An interrupted build (an error, SIGTERM, SIGKILL, power loss) keeps the chunks it completed, and
the next build resumes after them; ``<folder>.lock`` lets one process build while others wait.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import time
from typing import NamedTuple, Sequence

import numpy as np

from xlsr_jax.atomic import sigterm_raises
from xlsr_jax.data.audio import DECODE_SETTINGS, SAMPLING_RATE, AudioError, load_audio
from xlsr_jax.data.sources import Example

log = logging.getLogger(__name__)

_SCALE = 32767.0
_FORMAT_VERSION = 3  # 2: skipped clips carry a reason word; 3: settings in the key and meta.json
_CHUNK = 64  # most clips a decoding worker gets at once, and per line of progress.jsonl
# A clip whose peak amplitude stays below this (-80 dBFS, ~3 steps of 16-bit audio) holds no recorded
# sound: a muted microphone or digital zeros. Any real recording, even a quiet one, has a noise floor
# far above it (-60 to -70 dBFS), so nothing a person said is lost; a transcript paired with silence
# only teaches the model to emit text from nothing.
SILENCE_PEAK = 1e-4


class DecodeFailure(NamedTuple):
    """A clip the cache does not hold: its index in the examples, a reason word (``missing_file``,
    ``empty_audio``, ``undecodable``, ``silence``) and a message naming the file."""

    index: int
    reason: str
    message: str


class AudioCache:
    """Read side of the cache: ``cache[i]`` is float32 ``[samples]`` of kept clip ``i``."""

    def __init__(self, folder: str, rows: np.ndarray | None = None):
        self.folder = folder
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            self.meta = json.load(f)
        self.sampling_rate = int(self.meta["sampling_rate"])
        offsets = np.load(os.path.join(folder, "offsets.npy"))
        lengths = np.load(os.path.join(folder, "lengths.npy"))
        example_index = np.load(os.path.join(folder, "example_index.npy"))
        self._rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        sel = slice(None) if rows is None else self._rows
        self.offsets, self.lengths = offsets[sel], lengths[sel]
        self.example_indices = example_index[sel]  # kept row -> index into the examples
        audio = os.path.join(folder, "audio.bin")
        # A host's shard whose every clip failed holds no audio, and an empty file cannot be mapped.
        self._data = (np.memmap(audio, dtype=np.int16, mode="r") if os.path.getsize(audio)
                      else np.zeros(0, np.int16))

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.offsets[i])
        return self._data[start : start + int(self.lengths[i])].astype(np.float32) / _SCALE

    def pcm(self, i: int) -> np.ndarray:
        """Kept clip ``i`` as stored: int16 ``[samples]``, a view of the memory map (no copy)."""
        start = int(self.offsets[i])
        return self._data[start : start + int(self.lengths[i])]

    def take(self, rows: Sequence[int]) -> "AudioCache":
        """A view of the given rows (same files, no copy): ``view[j] == self[rows[j]]``."""
        rows = np.asarray(rows, dtype=np.int64)
        base = rows if self._rows is None else self._rows[rows]
        return AudioCache(self.folder, base)

    def __reduce__(self):
        # Reopen the memmap in the receiving process instead of pickling the audio.
        return (AudioCache, (self.folder, self._rows))


def cache_settings(sampling_rate: int) -> dict:
    """Every setting that changes the cache's contents (besides the audio files themselves)."""
    return {"version": _FORMAT_VERSION, "sampling_rate": int(sampling_rate), "int16_scale": _SCALE,
            "silence_peak": SILENCE_PEAK, **DECODE_SETTINGS}


def cache_key(examples: Sequence[Example], sampling_rate: int) -> str:
    """Hash of the settings (:func:`cache_settings`) and of (path, size, mtime) of every clip."""
    h = hashlib.sha256(json.dumps(cache_settings(sampling_rate), sort_keys=True).encode())
    for ex in examples:
        try:
            if ex.problem is not None:
                raise OSError  # a path that is never touched, not even by stat
            st = os.stat(ex.path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"\0{ex.path}\0{stamp}".encode())
    return h.hexdigest()[:20]


def decode_clip(path: str, sampling_rate: int, data: bytes | None = None,
                problem: tuple[str, str] | None = None) -> np.ndarray | tuple[str, str]:
    """What the cache stores of one clip: int16 ``[samples]``, or (reason, message) when it is skipped.
    ``data``: the file's bytes when already in memory (see :func:`audio.load_audio`); ``problem``: the
    example's (:class:`Example`), which skips it unopened."""
    if problem is not None:
        return problem[0], f"{path}: {problem[1]}"
    try:
        wav = load_audio(path, sampling_rate) if data is None else load_audio(path, sampling_rate, data)
    except AudioError as err:
        return err.reason, str(err)
    peak = float(np.abs(wav).max())
    if peak < SILENCE_PEAK:
        return "silence", f"{path}: silent (peak amplitude {peak:.1e} < {SILENCE_PEAK:g})"
    return np.round(np.clip(wav, -1.0, 1.0) * _SCALE).astype(np.int16)


def _decode_chunk(clips: list[tuple[str, tuple[str, str] | None]],
                  sampling_rate: int) -> list[np.ndarray | tuple[str, str]]:
    """Worker: each (path, problem) -> int16 ``[samples]``, or (reason, message)."""
    return [decode_clip(path, sampling_rate, problem=problem) for path, problem in clips]


def _decoded_chunks(clips: list[tuple[str, tuple[str, str] | None]], sampling_rate: int, num_workers: int,
                    chunk: int):
    """Yield decoded chunks of (path, problem) in order; in-process when ``num_workers <= 1``."""
    chunks = [clips[i : i + chunk] for i in range(0, len(clips), chunk)]
    if num_workers <= 1:
        for c in chunks:
            yield _decode_chunk(c, sampling_rate)
        return
    # spawn, not fork: the parent may already run JAX's threads, which fork would corrupt.
    ctx = multiprocessing.get_context("spawn")
    # One chunk per worker and one more submitted ahead, not all at once (pool.map): stopped early (an
    # error, SIGTERM), only those are finished, and decoded audio never piles up ahead of the writer.
    todo = iter(chunks)
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
        pending = collections.deque(pool.submit(_decode_chunk, c, sampling_rate)
                                    for c in itertools.islice(todo, num_workers + 1))
        try:
            while pending:
                result = pending.popleft().result()
                for c in itertools.islice(todo, 1):
                    pending.append(pool.submit(_decode_chunk, c, sampling_rate))
                yield result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _read_progress(work: str) -> list[dict]:
    """The chunks a previous build of ``work`` completed, and ``audio.bin`` cut back to their audio:
    ``[{"start", "lengths", "skipped"}]``. A line cut short by a crash, and any audio written after the
    last complete line, are dropped (that chunk is decoded again)."""
    done, good_bytes = [], 0
    path = os.path.join(work, "progress.jsonl")
    if os.path.exists(path):
        with open(path, "rb") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    break
                if not line.endswith(b"\n"):
                    break
                done.append(entry)
                good_bytes += len(line)
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    samples = sum(n for entry in done for n in entry["lengths"] if n >= 0)
    with open(os.path.join(work, "audio.bin"), "ab") as f:  # creates it when missing
        if f.tell() < 2 * samples:  # the audio was lost after all (a file system without fsync?)
            log.warning("audio cache: %s holds less audio than its progress.jsonl says; starting over", work)
            done, samples = [], 0
            with open(path, "wb"):
                pass
        f.truncate(2 * samples)
    return done


def _decode_into(work: str, examples: Sequence[Example], done: list[dict], sampling_rate: int,
                 num_workers: int) -> list[dict]:
    """Decode the examples after those in ``done``, appending to ``work``; return all chunks."""
    start = sum(len(entry["lengths"]) for entry in done)
    clips = [(ex.path, ex.problem) for ex in examples[start:]]
    # About four chunks per worker keeps them all busy to the end; in-process too, as the unit of resuming.
    chunk = max(1, min(_CHUNK, len(examples) // (4 * max(1, num_workers))))
    last_log = time.monotonic()
    # closing(): an exception here shuts the worker pool down now, not when the traceback is freed.
    with open(os.path.join(work, "audio.bin"), "ab") as audio, \
            open(os.path.join(work, "progress.jsonl"), "ab") as progress, \
            contextlib.closing(_decoded_chunks(clips, sampling_rate, num_workers, chunk)) as decoded:
        for results in decoded:
            entry = {"start": start, "lengths": [], "skipped": []}
            for k, res in enumerate(results):
                if isinstance(res, tuple):
                    entry["lengths"].append(-1)
                    entry["skipped"].append([start + k, *res])
                else:
                    audio.write(res.tobytes())
                    entry["lengths"].append(len(res))
            # The audio reaches the disk before the line that vouches for it.
            audio.flush()
            os.fsync(audio.fileno())
            progress.write(json.dumps(entry, ensure_ascii=False).encode() + b"\n")
            progress.flush()
            os.fsync(progress.fileno())
            done.append(entry)
            start += len(results)
            if time.monotonic() - last_log > 30:
                log.info("audio cache: decoded %d/%d clips", start, len(examples))
                last_log = time.monotonic()
    return done


def _write_index(work: str, done: list[dict], sampling_rate: int, num_examples: int,
                 allow_none_kept: bool = False) -> None:
    """offsets/lengths/example_index/meta of the decoded chunks, into ``work``."""
    all_lengths = np.asarray([n for entry in done for n in entry["lengths"]], dtype=np.int64)
    skipped = [DecodeFailure(int(i), str(r), str(m)) for entry in done for i, r, m in entry["skipped"]]
    kept = np.flatnonzero(all_lengths >= 0)
    if not len(kept) and not allow_none_kept:
        first = "; ".join(s.message for s in skipped[:3])
        raise AudioError(f"none of the {num_examples} clips could be decoded: {first}")
    lengths = all_lengths[kept]
    offsets = (np.cumsum(lengths) - lengths).astype(np.int64)
    np.save(os.path.join(work, "offsets.npy"), offsets)
    np.save(os.path.join(work, "lengths.npy"), lengths)
    np.save(os.path.join(work, "example_index.npy"), kept.astype(np.int64))
    meta = {
        **cache_settings(sampling_rate),
        "num_examples": num_examples, "num_kept": len(kept), "total_samples": int(lengths.sum()),
        "skipped": [list(s) for s in skipped],
    }
    with open(os.path.join(work, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)


@contextlib.contextmanager
def _build_lock(folder: str):
    """Hold ``<folder>.lock`` (flock): one process builds a cache, others wait for it. The kernel
    releases the lock when its holder dies, however it dies. The holder removes the file when done, so
    a waiter that wakes up holding a removed file's lock opens the new one instead."""
    path, waited = f"{folder}.lock", False
    while True:
        f = open(path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not waited:
                log.warning("audio cache: another process is building %s; waiting for it", folder)
                waited = True
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        f.close()


def _build(folder: str, examples: Sequence[Example], sampling_rate: int, num_workers: int,
           allow_none_kept: bool) -> None:
    """Decode into ``<folder>.building`` (resuming what an earlier build left there), then rename it."""
    work = f"{folder}.building"
    os.makedirs(work, exist_ok=True)
    done = _read_progress(work)
    if done:
        log.info("audio cache: resuming %s after %d decoded clips", work,
                 sum(len(entry["lengths"]) for entry in done))
    else:
        log.info("audio cache: decoding %d clips into %s", len(examples), folder)
    start = time.monotonic()
    with sigterm_raises("building the audio cache"):
        try:
            done = _decode_into(work, examples, done, sampling_rate, num_workers)
        except BaseException:
            log.warning("audio cache: interrupted; %s keeps %d decoded clips for the next run", work,
                        sum(len(entry["lengths"]) for entry in done))
            raise
        try:
            _write_index(work, done, sampling_rate, len(examples), allow_none_kept)
        except AudioError:
            shutil.rmtree(work, ignore_errors=True)  # complete, and useless: nothing to resume
            raise
        os.remove(os.path.join(work, "progress.jsonl"))
        os.rename(work, folder)  # atomic: a half-written cache never has the final name
    log.info("audio cache: built in %.1f s", time.monotonic() - start)


def build_audio_cache(
    examples: Sequence[Example],
    cache_dir: str | os.PathLike,
    *,
    sampling_rate: int = SAMPLING_RATE,
    num_workers: int = 2,
    suffix: str = "",
    allow_none_kept: bool = False,
) -> tuple[AudioCache, list[DecodeFailure]]:
    """Decode every clip once (or reuse a cache of the same files and settings) -> (cache, skipped).

    ``skipped`` lists the clips left out (missing, empty, undecodable, silent); they are logged, not
    fatal, unless every clip fails (:class:`AudioError`; an empty cache with ``allow_none_kept``: one
    host's part of a corpus, see data/shards.py). ``suffix`` ends the cache folder's name (the part's
    name). An interrupted build resumes where it stopped.
    """
    if not examples:
        raise ValueError("build_audio_cache: no examples")
    examples = list(examples)
    folder = os.path.join(os.fspath(cache_dir), f"audio-{sampling_rate}-"
                          f"{cache_key(examples, sampling_rate)}{suffix}")
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.isfile(meta_path):
        os.makedirs(cache_dir, exist_ok=True)
        with _build_lock(folder):
            if not os.path.isfile(meta_path):  # not built by the process we waited for
                _build(folder, examples, sampling_rate, num_workers, allow_none_kept)
    cache = AudioCache(folder)
    skipped = [DecodeFailure(int(i), str(reason), str(message)) for i, reason, message in cache.meta["skipped"]]
    if skipped:
        log.warning("audio cache: %d of %d clips are skipped (missing, empty, undecodable or silent); first: %s",
                    len(skipped), len(examples), "; ".join(s.message for s in skipped[:3]))
    return cache, skipped
