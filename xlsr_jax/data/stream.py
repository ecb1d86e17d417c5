"""`data.streaming`: the training pipeline run lazily over sources too big to decode up front.

Rows come from an :class:`~xlsr_jax.data.stream_sources.ElementStream` (one read order per epoch, a pure
function of (seed, epoch)); each is decoded on the fly, in worker threads but in stream order, and kept or
dropped by prepare.py's rules (undecodable, silent, empty text, duration, CTC-infeasible: counted, never
fatal). Kept clips pass a shuffle buffer, then wait in their length bucket until it holds a batch. When an
epoch's stream ends, the buffer is drained and the buckets' remainders are cut like BatchLoader's last
batches (carried up to the next bucket, the last one filled with dummy rows).

Shapes are static and known before training: the buckets are placed on the lengths of a probe, the first
``data.streaming_probe`` rows of epoch 0, the largest at ``data.max_duration_s`` so that every clip fits; a
bucket's label length is the most labels its frames can align (any clip CTC can train on fits).

Resuming is exact: after each batch the loader's state (epoch, reader positions, the keys of the clips in
the shuffle buffer and the buckets, random generator states; small and JSON-able) is recorded, the loop
saves the state of the step it checkpoints (:func:`save_stream_state`), and a loader given that state
re-reads only the rows it names and decodes only those.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from xlsr_jax.data.audio import normalize_int16_into
from xlsr_jax.data.batch import empty_batch
from xlsr_jax.data.buckets import bucket_boundaries, padding_fraction
from xlsr_jax.data.cache import decode_clip
from xlsr_jax.data.loader import per_bucket_sizes, prefetched, cut_batches
from xlsr_jax.data.prepare import (PreparedDataset, log_report, clip_problem, infeasible_detail,
                                   missing_characters)
from xlsr_jax.data.report import REASONS, BadClip, count_reasons, format_counts
from xlsr_jax.data.stream_sources import Element, ElementStream
from xlsr_jax.rundir import as_path, write_atomically
from xlsr_jax.text import Vocab

log = logging.getLogger(__name__)

_NAMED_BAD = 10  # dropped clips of epoch 0 named in the log; the rest are counted (metrics: data/clips_dropped)


@dataclasses.dataclass
class Clip:
    """A kept row: where it came from, its audio and its labels."""

    key: list[int]  # Element.key: [ordinal, source, slot, row]
    pcm: np.ndarray  # int16 [samples]
    label: np.ndarray  # int32 [chars]
    example: Any = None


class ClipMaker:
    """One element -> (kept :class:`Clip` or None, :class:`BadClip` naming why it was dropped or flagged,
    or None): prepare.py's rules, one clip at a time."""

    def __init__(self, *, vocab: Vocab, normalize: Callable, sampling_rate: int,
                 length_range: tuple[float, float], frames_fn: Callable[[np.ndarray], np.ndarray],
                 split: str = "train"):
        self.vocab, self.normalize, self.sampling_rate = vocab, normalize, sampling_rate
        self.length_range, self.frames_fn, self.split = length_range, frames_fn, split

    def __call__(self, element: Element) -> tuple[Clip | None, BadClip | None]:
        ex = element.example
        decoded = decode_clip(ex.path, self.sampling_rate, element.data, ex.problem)
        if isinstance(decoded, tuple):
            reason, message = decoded
            return None, BadClip(self.split, ex.source, ex.path, reason, message.removeprefix(f"{ex.path}: "))
        text = self.normalize(ex)
        problem = clip_problem(ex, text, len(decoded), self.length_range, self.sampling_rate)
        if problem is not None:
            return None, BadClip(self.split, ex.source, ex.path, *problem)
        label = self.vocab.encode(text)
        frames = int(np.asarray(self.frames_fn(np.asarray([len(decoded)]))).reshape(-1)[0])
        detail = infeasible_detail(label, frames)
        if detail is not None:
            return None, BadClip(self.split, ex.source, ex.path, "infeasible", detail)
        clip, missing = Clip(element.key, decoded, label, ex), missing_characters(text, self.vocab)
        flag = (BadClip(self.split, ex.source, ex.path, "out_of_vocabulary",
                        f"not in the vocabulary: {' '.join(missing)}", dropped=False) if missing else None)
        return clip, flag


def _made_in_order(pool: concurrent.futures.Executor, make: ClipMaker, items: Iterator, window: int) -> Iterator:
    """(item, make(item[0])) for each (element, ...) item, decoded ``window`` ahead on ``pool``, in order."""
    pending: collections.deque = collections.deque()
    items = iter(items)
    for item in itertools.islice(items, window):
        pending.append((item, pool.submit(make, item[0])))
    while pending:
        item, future = pending.popleft()
        for following in itertools.islice(items, 1):
            pending.append((following, pool.submit(make, following[0])))
        yield item, future.result()


def _made(make: ClipMaker, elements: Sequence[Element], workers: int) -> list[tuple[Clip | None, BadClip | None]]:
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="xlsr_jax-stream") as pool:
        return list(pool.map(make, elements))


def probe_dataset(head: Sequence[Element], make: ClipMaker, workers: int) -> tuple[PreparedDataset, dict]:
    """The kept clips of ``head`` (epoch 0's first rows) as a dataset (audio: the first 8 clips only, for
    export checks) and a report of counts like prepare_dataset's."""
    results = _made(make, head, workers)
    kept = [(e, clip) for e, (clip, _) in zip(head, results) if clip is not None]
    if not kept:
        first = "; ".join(f"{b.path}: {b.reason} ({b.detail})" for _, b in results[:3] if b is not None)
        raise ValueError(f"data.streaming: none of the first {len(head)} clips of the stream is usable: {first}")
    bad = [b for _, b in results if b is not None]
    lengths = np.asarray([len(c.pcm) for _, c in kept], dtype=np.int64)
    dataset = PreparedDataset(
        texts=[make.normalize(e.example) for e, _ in kept], labels=[c.label for _, c in kept], lengths=lengths,
        audio=[c.pcm.astype(np.float32) / 32767.0 for _, c in kept[:8]], examples=[e.example for e, _ in kept],
        bad=bad)
    report = {"total": len(head), "kept": len(kept), "hours": float(lengths.sum()) / make.sampling_rate / 3600.0,
              **dict.fromkeys(REASONS, 0), **count_reasons(bad)}
    log_report(f"{make.split} (streaming probe: the first {len(head)} rows)", report, bad)
    return dataset, report


def stream_boundaries(probe_lengths: np.ndarray, num_buckets: int, max_samples: int, multiple: int = 320) -> np.ndarray:
    """Bucket lengths ``[k]``, ``k <= num_buckets``, minimising the probe's padding under the condition that
    the largest is ``max_samples`` (rounded up to ``multiple``), so that every clip the duration filter keeps
    fits: placed for the probe's lengths plus one clip of ``max_samples``."""
    lengths = np.append(np.asarray(probe_lengths, dtype=np.int64), int(np.ceil(max_samples)))
    return bucket_boundaries(lengths, num_buckets, multiple=multiple)


class StreamingLoader:
    """Batches of a stream, the same dicts as ``BatchLoader.load_batch`` (see its docstring), with
    ``index`` the clip's place in its epoch's read order (-1 for dummy rows).

    There is no fixed epoch length (``batches_per_epoch`` is None): the loop trains ``train.max_steps``.
    ``dataset`` is the probe's (see :func:`probe_dataset`). Start with :meth:`iter_from_step` at 0, or
    at a checkpoint's step after :meth:`restore` of the state :meth:`state_at` gave for it.
    """

    streaming = True
    batches_per_epoch = None

    def __init__(self, stream: ElementStream, make: ClipMaker, *, probe: PreparedDataset, boundaries,
                 batch_size: int | Sequence[int], shuffle_buffer: int, label_multiple: int = 16,
                 process_index: int = 0, process_count: int = 1, prefetch: int = 2, workers: int = 1,
                 description: dict | None = None):
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer={shuffle_buffer} must be >= 1")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        self.stream, self.make, self.dataset = stream, make, probe
        self.boundaries = np.asarray(boundaries, dtype=np.int64)
        self.batch_sizes = per_bucket_sizes(batch_size, len(self.boundaries), process_count)
        self.local_batch_sizes = tuple(bs // process_count for bs in self.batch_sizes)
        frames = np.asarray(make.frames_fn(self.boundaries), dtype=np.int64).reshape(-1)
        # A clip CTC can align has at most one label per frame: the bucket's frames bound its labels.
        self.label_lengths = -(-np.maximum(frames, 1) // label_multiple) * label_multiple
        self.shuffle_buffer, self.prefetch, self.workers = shuffle_buffer, prefetch, workers
        self.process_index, self.process_count = process_index, process_count
        self.description = {"sources": stream.specs, "seed": stream.seed, "shuffle_buffer": shuffle_buffer,
                            "boundaries": self.boundaries.tolist(), "label_lengths": self.label_lengths.tolist(),
                            "batch_sizes": list(self.batch_sizes), **(description or {})}
        self._history: collections.deque = collections.deque(maxlen=prefetch + 64)  # (step, state)
        self._lock = threading.Lock()
        self._restored: dict | None = None
        self._probe_padding = padding_fraction(probe.lengths, self.boundaries)

    # ------------------------------------------------------------ what the loop asks

    @property
    def shapes(self) -> dict[int, tuple[int, int]]:
        """Bucket -> (padded samples S, padded label length L)."""
        return {b: (int(s), int(l)) for b, (s, l) in enumerate(zip(self.boundaries, self.label_lengths))}

    @property
    def batch_shapes(self) -> dict[int, tuple[int, int, int]]:
        """Bucket -> (global batch size B, padded samples S, padded label length L): every step shape."""
        return {b: (self.batch_sizes[b], s, l) for b, (s, l) in self.shapes.items()}

    @property
    def padding_fraction(self) -> float:
        """Padded samples / all samples of the batches made so far (the probe's estimate before any)."""
        with self._lock:
            state = self._history[-1][1] if self._history else self._restored
        total, real = state["samples"] if state else (0, 0)
        return (total - real) / total if total else self._probe_padding

    def plan_sha256(self) -> str:
        """What decides every batch: the description and the probe's lengths (in place of a plan)."""
        digest = hashlib.sha256(json.dumps(self.description, sort_keys=True).encode())
        digest.update(np.asarray(self.dataset.lengths, np.int64).tobytes())
        return digest.hexdigest()

    def state_at(self, step: int) -> dict[str, Any]:
        """The loader's state after global batch ``step`` (JSON-able), for the checkpoint of that step."""
        with self._lock:
            for done, state in reversed(self._history):
                if done == step:
                    return state
            if step == 0 or (self._restored is not None and self._restored["step"] == step):
                return self._restored or self._initial()
            known = [done for done, _ in self._history]
        raise ValueError(f"streaming loader: no state for step {step} (it holds steps {known[:1]}..{known[-1:]})")

    def metrics_at(self, step: int) -> dict[str, float]:
        state = self.state_at(step)
        return {"data/epoch": float(state["epoch"]), "data/clips_dropped": float(sum(state["dropped"].values()))}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_at`, e.g. read back with :func:`load_stream_state`)."""
        if state.get("buckets") is None or len(state["buckets"]) != len(self.boundaries):
            raise ValueError("streaming loader state: its buckets do not match this loader's")
        self._restored = state

    def iter_from_step(self, step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Endless batches after global batch ``step`` (0, or the step of the restored state)."""
        if step == 0 and (self._restored is None or self._restored["step"] != 0):
            state = self._initial()
        elif self._restored is not None and self._restored["step"] == step:
            state = self._restored
        else:
            raise ValueError(f"streaming loader: cannot start at step {step} without its saved state (restore "
                             "the state saved with that checkpoint first)")
        return prefetched(self._produce(state), self.prefetch)

    # ------------------------------------------------------------ the pipeline

    def _initial(self) -> dict[str, Any]:
        rng = np.random.default_rng([self.stream.seed, len(self.stream.sources), 7])  # the shuffle buffer's
        return {"step": 0, "epoch": 0, "phase": "read", "reader": None, "buffer": [],
                "buckets": [[] for _ in self.boundaries], "pending": [], "shuffle_rng": rng.bit_generator.state,
                "dropped": {}, "flagged": {}, "samples": [0, 0]}

    def _produce(self, state: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
        st = json.loads(json.dumps(state))  # a private deep copy
        rng = np.random.default_rng()
        rng.bit_generator.state = st["shuffle_rng"]
        pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="xlsr_jax-stream")
        try:
            clips = self._fetch_clips(st, pool)
            while True:
                if st["phase"] == "read":
                    reader = self.stream.read(st["epoch"], st["reader"])
                    for (element, after), (clip, bad) in _made_in_order(pool, self.make, reader, 4 * self.workers):
                        st["reader"] = after
                        if bad is not None:
                            self._count(st, bad)
                        if clip is None:
                            continue
                        clips[clip.key[0]] = clip
                        out = self._shuffle(st, rng, clip.key)
                        batch = self._place(st, out, clips) if out is not None else None
                        if batch is not None:
                            yield self._emit(st, rng, batch, clips)
                    while st["buffer"]:  # the stream ended: drain the buffer at random
                        batch = self._place(st, st["buffer"].pop(int(rng.integers(len(st["buffer"])))), clips)
                        if batch is not None:
                            yield self._emit(st, rng, batch, clips)
                    st["pending"], st["buckets"] = self._cut(st["buckets"]), [[] for _ in self.boundaries]
                    st["phase"] = "flush"
                    self._log_epoch(st)
                while st["pending"]:
                    yield self._emit(st, rng, st["pending"].pop(0), clips)
                st.update(epoch=st["epoch"] + 1, phase="read", reader=None)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _fetch_clips(self, st: dict, pool) -> dict[int, Clip]:
        """Decode again the clips ``st`` holds (shuffle buffer, buckets, batches still to emit)."""
        keys = st["buffer"] + [k for b in st["buckets"] for k in b] + [k for _, ks in st["pending"] for k in ks if k]
        if not keys:
            return {}
        elements = self.stream.fetch(st["epoch"], keys)
        clips = {}
        for element, (clip, bad) in zip(elements, pool.map(self.make, elements)):
            if clip is None:
                raise ValueError(f"{element.example.path}: kept when the checkpoint was written, now dropped "
                                 f"({bad.reason}: {bad.detail}); the data changed since")
            clips[clip.key[0]] = clip
        return clips

    def _count(self, st: dict, bad: BadClip) -> None:
        counts = st["dropped"] if bad.dropped else st["flagged"]
        counts[bad.reason] = counts.get(bad.reason, 0) + 1
        if bad.dropped and st["epoch"] == 0 and sum(st["dropped"].values()) <= _NAMED_BAD:
            log.warning("%s: dropped %s (%s: %s)", bad.source, bad.path, bad.reason, bad.detail)

    def _shuffle(self, st: dict, rng: np.random.Generator, key: list[int]) -> list[int] | None:
        """Put ``key`` in the shuffle buffer; once it is full, one key drawn at random comes out."""
        buffer = st["buffer"]
        if len(buffer) < self.shuffle_buffer:
            buffer.append(key)
            return None
        j = int(rng.integers(len(buffer)))
        out, buffer[j] = buffer[j], key
        return out

    def _place(self, st: dict, key: list[int], clips: dict[int, Clip]) -> tuple[int, list] | None:
        """Add a clip to its bucket; (bucket, keys) when that fills a batch."""
        b = int(np.searchsorted(self.boundaries, len(clips[key[0]].pcm), side="left"))
        members = st["buckets"][b]
        members.append(key)
        if len(members) < self.batch_sizes[b]:
            return None
        st["buckets"][b] = []
        return b, members

    def _cut(self, buckets: list[list]) -> list[list]:
        """The buckets' remainders as batches, as BatchLoader cuts an epoch (`loader.cut_batches`): each
        carried up into the next bucket (its clips fit there), the last one filled with dummy rows (None)
        in the largest bucket that holds any."""
        if not any(buckets):
            return []
        keys = [key for members in buckets for key in members]
        ends = np.cumsum([len(members) for members in buckets])
        positions = [np.arange(end - len(members), end, dtype=np.int64) for end, members in zip(ends, buckets)]
        return [[int(b), [keys[i] if i >= 0 else None for i in rows]]
                for b, rows in cut_batches([positions], self.batch_sizes)]

    def _emit(self, st: dict, rng: np.random.Generator, batch, clips: dict[int, Clip]) -> dict[str, np.ndarray]:
        bucket, keys = batch
        st["step"] += 1
        st["shuffle_rng"] = rng.bit_generator.state
        st["samples"] = [st["samples"][0] + int(self.boundaries[bucket]) * len(keys),
                         st["samples"][1] + sum(len(clips[k[0]].pcm) for k in keys if k)]
        out = self._assemble(bucket, keys, clips)
        for k in keys:
            if k:
                del clips[k[0]]
        snapshot = json.loads(json.dumps(st))
        with self._lock:
            self._history.append((st["step"], snapshot))
        return out

    def _assemble(self, bucket: int, keys: list, clips: dict[int, Clip]) -> dict[str, np.ndarray]:
        """This process's rows of one global batch, padded to the bucket's shape."""
        p, local = self.process_index, self.local_batch_sizes[bucket]
        rows = keys[p * local : (p + 1) * local]
        samples, label_len = int(self.boundaries[bucket]), int(self.label_lengths[bucket])
        batch = empty_batch(samples, label_len, [k[0] if k else -1 for k in rows])
        for r, key in enumerate(rows):
            if key is None:
                continue
            clip = clips[key[0]]
            n = len(clip.pcm)
            normalize_int16_into(clip.pcm, batch["input_values"][r, :n])
            batch["attention_mask"][r, :n] = 1
            batch["labels"][r, : len(clip.label)] = clip.label
        return batch

    def _log_epoch(self, st: dict) -> None:
        read = st["reader"]["read"] if st["reader"] else 0
        if read == 0:
            raise ValueError(f"data.streaming: epoch {st['epoch']} of {self.stream.specs} has no rows")
        log.info("stream epoch %d: %d rows read; dropped so far: %s; flagged so far: %s", st["epoch"], read,
                 format_counts(st["dropped"]), format_counts(st["flagged"]))


# ---------------------------------------------------------------- the state saved with each checkpoint


def save_stream_state(folder, step: int, state: dict[str, Any], keep: Sequence[int] = ()) -> None:
    """Write ``<folder>/<step>.json`` (atomically) and delete the files of steps neither ``step`` nor in
    ``keep`` (the checkpoints kept before this one is saved: a file whose checkpoint orbax deletes for
    this save goes at the next)."""
    folder = as_path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / f"{step}.json", lambda tmp: Path(tmp).write_text(json.dumps(state)))
    for path in folder.glob("*.json"):
        if path.stem.isdigit() and int(path.stem) != step and int(path.stem) not in set(keep):
            path.unlink()


def load_stream_state(folder, step: int) -> dict[str, Any]:
    """The state saved with the checkpoint of ``step``; an error names the file when it is missing."""
    path = as_path(folder) / f"{step}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; a data.streaming run resumes from the loader state saved with "
                                f"its checkpoint of step {step}")
    return json.loads(path.read_text())
