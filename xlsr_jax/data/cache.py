"""Decode once: every clip's waveform as int16 in one memory-mapped file.

Decoding MP3 and resampling costs ~1 ms per audio-second; doing it every epoch would starve an
accelerator. The cache is keyed on the audio files (path, size, mtime) and the sampling rate, so
a re-run reuses it and a changed file rebuilds it. Layout of ``<cache_dir>/audio-<sr>-<hash>/``:

  audio.bin          int16, all kept clips concatenated
  offsets.npy        int64 [n]  first sample of each kept clip
  lengths.npy        int64 [n]  samples of each kept clip
  example_index.npy  int64 [n]  index of the kept clip in the examples passed in
  meta.json          sampling rate, counts, skipped examples as [index, reason, message]

A clip is skipped when it is missing, empty, cannot be decoded or is silent (see
:data:`SILENCE_PEAK`). SIGTERM or an error during the build leaves no partial folder (see atomic.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import time
from typing import NamedTuple, Sequence

import numpy as np

from xlsr_jax.data.atomic import partial_folder
from xlsr_jax.data.audio import AudioError, load_audio
from xlsr_jax.data.sources import Example

log = logging.getLogger(__name__)

_SCALE = 32767.0
_FORMAT_VERSION = 2  # 2: skipped clips carry a reason word
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
        self._data = np.memmap(os.path.join(folder, "audio.bin"), dtype=np.int16, mode="r")

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.offsets[i])
        return self._data[start : start + int(self.lengths[i])].astype(np.float32) / _SCALE

    def take(self, rows: Sequence[int]) -> "AudioCache":
        """A view of the given rows (same files, no copy): ``view[j] == self[rows[j]]``."""
        rows = np.asarray(rows, dtype=np.int64)
        base = rows if self._rows is None else self._rows[rows]
        return AudioCache(self.folder, base)

    def __reduce__(self):
        # Reopen the memmap in the receiving process instead of pickling the audio.
        return (AudioCache, (self.folder, self._rows))


def cache_key(examples: Sequence[Example], sampling_rate: int) -> str:
    """Hash of (path, size, mtime) of every clip and the sampling rate."""
    h = hashlib.sha256(f"v{_FORMAT_VERSION}:{sampling_rate}".encode())
    for ex in examples:
        try:
            st = os.stat(ex.path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"\0{ex.path}\0{stamp}".encode())
    return h.hexdigest()[:20]


def _decode_chunk(paths: list[str], sampling_rate: int) -> list[np.ndarray | tuple[str, str]]:
    """Worker: each path -> int16 ``[samples]``, or (reason, message)."""
    out: list[np.ndarray | tuple[str, str]] = []
    for path in paths:
        try:
            wav = load_audio(path, sampling_rate)
        except AudioError as err:
            out.append((err.reason, str(err)))
            continue
        peak = float(np.abs(wav).max())
        if peak < SILENCE_PEAK:
            out.append(("silence", f"{path}: silent (peak amplitude {peak:.1e} < {SILENCE_PEAK:g})"))
            continue
        out.append(np.round(np.clip(wav, -1.0, 1.0) * _SCALE).astype(np.int16))
    return out


def _decoded_chunks(paths: list[str], sampling_rate: int, num_workers: int, chunk: int):
    """Yield decoded chunks in order; in-process when ``num_workers <= 1``."""
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    if num_workers <= 1:
        for c in chunks:
            yield _decode_chunk(c, sampling_rate)
        return
    # spawn, not fork: the parent may already run JAX's threads, which fork would corrupt.
    ctx = multiprocessing.get_context("spawn")
    # Stopped early (an error, SIGTERM), map's iterator cancels the queued chunks: only the ones the
    # workers hold are finished.
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
        yield from pool.map(_decode_chunk, chunks, [sampling_rate] * len(chunks))


def _write_cache(tmp: str, examples: Sequence[Example], sampling_rate: int, num_workers: int) -> None:
    """Decode all clips into ``tmp``."""
    paths = [ex.path for ex in examples]
    chunk = max(1, min(64, len(paths) // max(1, 4 * num_workers)))
    offsets, lengths, kept, skipped = [], [], [], []
    pos, done, last_log = 0, 0, time.monotonic()
    # closing(): an exception here shuts the worker pool down now, not when the traceback is freed.
    with open(os.path.join(tmp, "audio.bin"), "wb") as f, \
            contextlib.closing(_decoded_chunks(paths, sampling_rate, num_workers, chunk)) as decoded:
        for results in decoded:
            for res in results:
                if isinstance(res, tuple):
                    skipped.append(DecodeFailure(done, *res))
                else:
                    f.write(res.tobytes())
                    offsets.append(pos)
                    lengths.append(len(res))
                    kept.append(done)
                    pos += len(res)
                done += 1
            if time.monotonic() - last_log > 30:
                log.info("audio cache: decoded %d/%d clips", done, len(paths))
                last_log = time.monotonic()
    if not kept:
        first = "; ".join(s.message for s in skipped[:3])
        raise AudioError(f"none of the {len(paths)} clips could be decoded: {first}")
    np.save(os.path.join(tmp, "offsets.npy"), np.asarray(offsets, dtype=np.int64))
    np.save(os.path.join(tmp, "lengths.npy"), np.asarray(lengths, dtype=np.int64))
    np.save(os.path.join(tmp, "example_index.npy"), np.asarray(kept, dtype=np.int64))
    meta = {
        "version": _FORMAT_VERSION, "sampling_rate": sampling_rate,
        "num_examples": len(paths), "num_kept": len(kept), "total_samples": pos,
        "skipped": [list(s) for s in skipped],
    }
    with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)


def build_audio_cache(
    examples: Sequence[Example],
    cache_dir: str | os.PathLike,
    *,
    sampling_rate: int = 16000,
    num_workers: int = 2,
) -> tuple[AudioCache, list[DecodeFailure]]:
    """Decode every clip once (or reuse a cache of the same files) -> (cache, skipped).

    ``skipped`` lists the clips left out (missing, empty, undecodable, silent); they are logged, not
    fatal, unless every clip fails (:class:`AudioError`).
    """
    if not examples:
        raise ValueError("build_audio_cache: no examples")
    folder = os.path.join(os.fspath(cache_dir), f"audio-{sampling_rate}-"
                          f"{cache_key(examples, sampling_rate)}")
    if not os.path.isfile(os.path.join(folder, "meta.json")):
        os.makedirs(cache_dir, exist_ok=True)
        start = time.monotonic()
        log.info("audio cache: decoding %d clips into %s", len(examples), folder)
        with partial_folder(folder, "building the audio cache") as tmp:
            try:
                _write_cache(tmp, examples, sampling_rate, num_workers)
                os.rename(tmp, folder)  # atomic: a half-written cache never has the final name
            except OSError:
                if not os.path.isfile(os.path.join(folder, "meta.json")):
                    raise
                log.info("audio cache: another process built %s first; using it", folder)
        log.info("audio cache: built in %.1f s", time.monotonic() - start)
    cache = AudioCache(folder)
    skipped = [DecodeFailure(int(i), str(reason), str(message)) for i, reason, message in cache.meta["skipped"]]
    if skipped:
        log.warning("audio cache: %d of %d clips are skipped (missing, empty, undecodable or silent); first: %s",
                    len(skipped), len(examples), "; ".join(s.message for s in skipped[:3]))
    return cache, skipped
