"""The rows of `data.streaming` sources, read lazily in an order that is a pure function of (seed, epoch).

Each source reads its rows from a position ``(slot, row)``: ``slot`` is a shard in the epoch's shard
order, ``row`` a row within it. A ``cv:`` or ``manifest:`` source is its table of paths and texts (read
once, no audio), one slot in a fresh permutation each epoch. An ``hf:`` source is a
``datasets.IterableDataset`` (the Hub's streaming mode, or local parquet shards, a ``save_to_disk`` folder
or an audiofolder read as one), each data file a slot, the slots in a fresh permutation each epoch, rows in
file order; audio stays bytes (``Audio(decode=False)``), decoded later by our own decoder. Nothing here
decodes audio or writes a file.

:class:`ElementStream` interleaves the sources into one read order per epoch and says, after each row,
where every source stands (JSON-able), so a reader can start again from there.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Sequence

import numpy as np

from xlsr_jax.data.sources import Example, expand_specs, parse_source, split_hf_spec, split_options

Position = tuple[int, int]  # (slot, row)


@dataclasses.dataclass(frozen=True)
class Element:
    """One row of one source, read but not decoded."""

    ordinal: int  # place in the epoch's interleaved read order
    source: int  # index into the stream's sources
    slot: int
    row: int
    example: Example  # path (a name for clips held as bytes), raw text, speaker, source spec, language
    data: bytes | None = None  # the audio file's bytes, for hub rows that store them

    @property
    def key(self) -> list[int]:
        """Where to find it again: ``[ordinal, source, slot, row]``."""
        return [self.ordinal, self.source, self.slot, self.row]


class ListSource:
    """A ``cv:`` or ``manifest:`` source: its examples in a fresh permutation each epoch (one slot)."""

    def __init__(self, spec: str, examples: list[Example], seed: int, index: int):
        if not examples:
            raise ValueError(f"{spec}: no utterances")
        self.spec, self.examples, self.size = spec, examples, len(examples)
        self._seed = [seed, index]

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([*self._seed, epoch]).permutation(self.size)

    def rows(self, epoch: int, start: Position) -> Iterator[tuple[int, int, Example, None]]:
        """(slot, row, example, None) from ``start`` on."""
        order = self._order(epoch)
        for row in range(start[1] if start[0] == 0 else self.size, self.size):
            yield 0, row, self.examples[order[row]], None

    def fetch(self, epoch: int, positions: Sequence[Position]) -> dict[Position, tuple[Example, None]]:
        order = self._order(epoch)
        return {(slot, row): (self.examples[order[row]], None) for slot, row in positions}


class HubSource:
    """An ``hf:`` source read as a stream: each data file a slot, slots permuted each epoch."""

    def __init__(self, spec: str, dataset, *, base: str | None, columns: dict[str, str | None], seed: int,
                 index: int, size: int | None):
        self.spec, self.dataset, self.base, self.columns = spec, dataset, base, columns
        self.size = size  # rows the dataset's card promises, if it says (only weighs the interleaving)
        self.slots = max(1, int(dataset.n_shards))
        self._seed = [seed, index]

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([*self._seed, epoch]).permutation(self.slots)

    def rows(self, epoch: int, start: Position) -> Iterator[tuple[int, int, Example, bytes | None]]:
        order = self._order(epoch)
        for slot in range(start[0], self.slots):
            first = start[1] if slot == start[0] else 0
            shard = self.dataset.shard(self.slots, int(order[slot])) if self.slots > 1 else self.dataset
            for row, record in enumerate(shard.skip(first) if first else shard, start=first):
                yield (slot, row, *self._example(record, int(order[slot]), row))

    def fetch(self, epoch: int, positions: Sequence[Position]) -> dict[Position, tuple[Example, bytes | None]]:
        """The rows at ``positions``: read forward from the first of them (a stream has no random access)."""
        wanted, found = set(positions), {}
        if not wanted:
            return found
        for slot, row, example, data in self.rows(epoch, min(wanted)):
            if (slot, row) in wanted:
                found[(slot, row)] = example, data
                if len(found) == len(wanted):
                    break
        return found

    def _example(self, record: dict[str, Any], shard: int, row: int) -> tuple[Example, bytes | None]:
        c = self.columns
        audio = record[c["audio"]]
        data, path = (audio.get("bytes"), audio.get("path")) if isinstance(audio, dict) else (None, audio)
        if data is not None:
            # A name for reports and errors; its extension tells the decoder the container.
            path = f"{self.spec.split('?')[0]}#{shard}/{row}/{os.path.basename(path or '')}"
        elif path:
            path = path if self.base is None else os.path.join(self.base, os.path.expanduser(path))
        else:
            path = ""  # neither bytes nor path: reported as a missing file
        text = record[c["text"]]

        def optional(name: str) -> str:
            return str(record[c[name]] or "") if c.get(name) else ""
        return Example(path=path, text=str(text or ""), speaker=optional("speaker"), source=self.spec,
                       language=optional("language")), data


def open_sources(specs: str | Sequence[str], *, seed: int, cache_dir: str,
                 hub_cache_dir: str) -> list[ListSource | HubSource]:
    """One source per spec; a ``cv:`` spec of several splits (``cv:DIR:train+dev``) is one source, an ``hf:``
    one a source per split. A ``?weight=`` is not applied (train/setup.py refuses it under streaming)."""
    sources: list[ListSource | HubSource] = []
    for spec in expand_specs(specs):
        base, options = split_options(spec)
        if base.startswith("hf:"):
            sources.extend(_hub_sources(spec, options, seed=seed, first=len(sources)))
        else:
            sources.append(ListSource(spec, parse_source(spec, cache_dir=cache_dir, hub_cache_dir=hub_cache_dir),
                                      seed, len(sources)))
    return sources


def _hub_sources(spec: str, options: dict[str, str], *, seed: int, first: int) -> list[HubSource]:
    from xlsr_jax.data.hf_datasets import AUDIO_COLUMNS, LANGUAGE_COLUMNS, SPEAKER_COLUMNS, pick_column, stream_split
    from xlsr_jax.data.sources import TEXT_COLUMNS

    name, config, splits = split_hf_spec(split_options(spec)[0].split(":", 1)[1])
    out = []
    for split in splits:
        dataset, base, size = stream_split(name, config, split, spec)
        names = list(dataset.column_names or dataset.features or [])
        columns = {"audio": pick_column(names, options.get("audio"), AUDIO_COLUMNS, "audio", spec),
                   "text": pick_column(names, options.get("text"), TEXT_COLUMNS, "text", spec),
                   "speaker": next((c for c in SPEAKER_COLUMNS if c in names), None),
                   "language": next((c for c in LANGUAGE_COLUMNS if c in names), None)}
        dataset = dataset.select_columns([c for c in dict.fromkeys(columns.values()) if c])
        out.append(HubSource(spec, dataset, base=base, columns=columns, seed=seed, index=first + len(out),
                             size=size))
    return out


class ElementStream:
    """The sources interleaved into one read order per epoch, a pure function of (seed, epoch).

    Each next row comes from a source drawn at random among those not yet exhausted, with probability
    proportional to its rows left when every source's size is known (a uniform merge), else uniformly.
    Every row of every source is read once per epoch.
    """

    def __init__(self, sources: Sequence[ListSource | HubSource], seed: int):
        if not sources:
            raise ValueError("no training sources")
        self.sources, self.seed = list(sources), seed

    @property
    def specs(self) -> list[str]:
        return [s.spec for s in self.sources]

    def start(self, epoch: int) -> dict[str, Any]:
        """The reader state at the start of ``epoch`` (JSON-able)."""
        rng = np.random.default_rng([self.seed, epoch, len(self.sources)])
        k = len(self.sources)
        return {"rng": rng.bit_generator.state, "cursors": [[0, 0]] * k, "taken": [0] * k,
                "exhausted": [False] * k, "read": 0}

    def read(self, epoch: int, state: dict[str, Any] | None = None) -> Iterator[tuple[Element, dict[str, Any]]]:
        """(element, reader state after it) for the rest of ``epoch``'s rows, from ``state`` (default: the
        epoch's start). Starting from the state given with an element reads what followed it."""
        state = _copy(state or self.start(epoch))
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        iters: dict[int, Iterator] = {}
        sizes = [s.size for s in self.sources]
        while True:
            active = [i for i, done in enumerate(state["exhausted"]) if not done]
            if not active:
                return
            if len(active) == 1:
                i = active[0]
            elif all(sizes[j] is not None for j in active):
                left = np.asarray([max(sizes[j] - state["taken"][j], 1) for j in active], dtype=np.float64)
                i = active[int(rng.choice(len(active), p=left / left.sum()))]
            else:
                i = active[int(rng.integers(len(active)))]
            if i not in iters:
                iters[i] = self.sources[i].rows(epoch, tuple(state["cursors"][i]))
            row = next(iters[i], None)
            if row is None:
                state["exhausted"][i] = True
                state["rng"] = rng.bit_generator.state
                continue
            slot, number, example, data = row
            element = Element(state["read"], i, slot, number, example, data)
            state["read"] += 1
            state["taken"][i] += 1
            state["cursors"][i] = [slot, number + 1]
            state["rng"] = rng.bit_generator.state
            yield element, _copy(state)

    def head(self, n: int) -> list[Element]:
        """The first ``n`` rows of epoch 0 (fewer if the sources hold fewer)."""
        out = []
        for element, _ in self.read(0):
            if len(out) == n:
                break
            out.append(element)
        return out

    def fetch(self, epoch: int, keys: Sequence[Sequence[int]]) -> list[Element]:
        """The elements of ``epoch`` named by ``keys`` (``Element.key``), in the order given."""
        by_source: dict[int, list[Position]] = {}
        for _, source, slot, row in keys:
            by_source.setdefault(source, []).append((slot, row))
        found = {i: self.sources[i].fetch(epoch, positions) for i, positions in by_source.items()}
        out = []
        for ordinal, source, slot, row in keys:
            if (slot, row) not in found[source]:
                raise ValueError(f"{self.sources[source].spec}: epoch {epoch} has no row {row} in slot {slot}; "
                                 "the source changed since the checkpoint was written")
            example, data = found[source][(slot, row)]
            out.append(Element(ordinal, source, slot, row, example, data))
        return out


def _copy(state: dict[str, Any]) -> dict[str, Any]:
    """A copy whose lists and dicts are new (states are handed out while the reader goes on)."""
    return {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v) for k, v in state.items()}
