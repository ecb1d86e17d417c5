"""From a `DataConfig` to examples and loaders: source specs -> utterances (with the test-split and
weight refusals), the arguments every split's `prepare_dataset` shares, and the evaluation loader that
the trainer's periodic evaluation and `xlsr-jax evaluate` both use, so both read, normalise and batch an
eval set the same way.

`frames_fn` (samples -> CTC frames) is passed in: it is the model's rule, and data/ does not import
model/."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import jax
import numpy as np

from xlsr_jax.config import ConfigError, DataConfig
from xlsr_jax.data.audio import SAMPLING_RATE
from xlsr_jax.data.buckets import bucket_boundaries
from xlsr_jax.data.loader import BatchLoader
from xlsr_jax.data.prepare import prepare_dataset
from xlsr_jax.data.shards import HostShard
from xlsr_jax.data.sources import Example, expand_specs, is_test_split, load_sources, split_options
from xlsr_jax.text import TextNormalization, Vocab


def cache_root(data: DataConfig) -> str:
    """Where decoded audio, extracted Common Voice archives and hub clips stored as bytes are cached."""
    return data.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "xlsr_jax")


def read_examples(specs: Sequence[str], data: DataConfig, *, purpose: str | None = None,
                  need_text: bool = True) -> list[Example]:
    """The utterances of every source spec (Common Voice archives are extracted once into the cache, hub
    clips stored as bytes written once into it). ``need_text=False``: audio alone (`parse_source`).

    ``purpose="train"`` refuses a Common Voice test split (the benchmark) unless
    ``data.allow_test_split_in_train``; ``purpose="eval"`` refuses a ``weight`` (every utterance is scored
    once)."""
    specs = check_specs(specs, data, purpose=purpose)
    return load_sources(specs, cache_dir=os.path.join(cache_root(data), "cv"),
                        hub_cache_dir=os.path.join(cache_root(data), "hf"), need_text=need_text)


def check_specs(specs: Sequence[str], data: DataConfig, *, purpose: str | None = None) -> list[str]:
    """One spec per source, after `read_examples`' refusals for ``purpose`` (ConfigError)."""
    specs = expand_specs(specs)
    if purpose == "train":
        tests = [spec for spec in specs if is_test_split(spec)]
        if tests and not data.allow_test_split_in_train:
            raise ConfigError(f"data.train: {tests} names a Common Voice test split, the benchmark: a model "
                              "trained on it has a meaningless test WER. Train on train (and dev); set "
                              "data.allow_test_split_in_train=true only if you mean it.",
                              ("data.train", "data.allow_test_split_in_train"))
    if purpose == "eval":
        weighted = [spec for spec in specs if "weight" in split_options(spec)[1]]
        if weighted:
            raise ConfigError(f"data.eval: {weighted}: evaluation sources take no weight (every utterance "
                              "is scored once)", ("data.eval",))
    return specs


def host_shard(data: DataConfig) -> HostShard | None:
    """This process's part of the clips to decode (`data.shard_cache_by_host`); None in a one-process run."""
    if jax.process_count() == 1 or not data.shard_cache_by_host:
        return None
    from jax.experimental import multihost_utils

    return HostShard(jax.process_index(), jax.process_count(),
                     lambda x: np.asarray(multihost_utils.process_allgather(x)))


def prepare_kwargs(data: DataConfig, vocab: Vocab | None, normalization: TextNormalization | None,
                   frames_fn: Callable[[int], int]) -> dict:
    """The arguments `prepare_dataset` takes that are the same for every split of a run; `frames_fn` maps
    a clip's samples to the model's CTC frames. No vocabulary and normalisation: audio only (pretraining)."""
    normalize = None if normalization is None else (lambda e: normalization(e.text, e.language))
    return dict(vocab=vocab, normalize=normalize, sampling_rate=SAMPLING_RATE,
                cache_dir=os.path.join(cache_root(data), "audio"), num_workers=data.num_workers,
                frames_fn=frames_fn, shard=host_shard(data))


def eval_loader(examples: Sequence[Example], *, data: DataConfig, vocab: Vocab | None,
                normalization: TextNormalization | None, frames_fn: Callable[[int], int], batch_size: int,
                name: str = "eval", min_frames: int = 0) -> tuple[BatchLoader, dict]:
    """(loader over every decodable utterance, report of counts). Nothing is filtered by duration, and
    utterances too long for their frames are kept and counted: dropping them would flatter the WER.
    Without a vocabulary (pretraining), clips under `min_frames` frames are dropped."""
    dataset, report = prepare_dataset(examples, drop_infeasible=False, name=name, min_frames=min_frames,
                                      **prepare_kwargs(data, vocab, normalization, frames_fn))
    loader = BatchLoader(dataset, batch_size=batch_size, shuffle=False,
                         boundaries=bucket_boundaries(dataset.lengths, data.eval_num_buckets),
                         process_index=jax.process_index(), process_count=jax.process_count(),
                         prefetch=data.prefetch, workers=data.loader_workers, owners=dataset.owners)
    return loader, report
