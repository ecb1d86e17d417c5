"""Building what a run needs from its config: vocabulary, datasets and loaders, model, sharded state."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from transformers import Wav2Vec2Config

from xlsr_jax import parallel
from xlsr_jax.config import Config, ConfigError, DataConfig
from xlsr_jax.data import BatchLoader, Example, bucket_boundaries, prepare_dataset
from xlsr_jax.data.buckets import bucket_batch_sizes
from xlsr_jax.data.augment import Augmenter, speed_variants
from xlsr_jax.data.prepare import PreparedDataset
from xlsr_jax.data.report import report_bad_data
from xlsr_jax.data.sources import source_weight
from xlsr_jax.errors import UserError
from xlsr_jax.data.stream import ClipMaker, StreamingLoader, probe_dataset, stream_boundaries
from xlsr_jax.data.stream_sources import ElementStream, open_sources
from xlsr_jax.data.audio import SAMPLING_RATE
from xlsr_jax.data.pipeline import cache_root, check_specs, eval_loader, prepare_kwargs, read_examples
from xlsr_jax.model import FlaxWav2Vec2ForCTC, FlaxWav2Vec2ForPreTraining, feat_extract_output_lengths, load_pretrained
from xlsr_jax.model.hf_config import model_config, model_overrides
from xlsr_jax.text import TextNormalization, Vocab
from xlsr_jax.train.optim import build_optimizer
from xlsr_jax.train.resume import vocab_to_reuse
from xlsr_jax.train.state import TrainState, create_state

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Data:
    vocab: Vocab | None  # None: audio only (pretraining)
    normalization: TextNormalization | None
    train: BatchLoader | StreamingLoader
    eval: BatchLoader | None
    reports: dict[str, dict]
    clips: PreparedDataset | None = None  # the training clips, before speed perturbation made rows of them

    def report_bad_clips(self, path, max_skip_fraction: float, *, write: bool) -> None:
        """Write `path` (the run's data_report.tsv) naming every clip of both splits that was skipped or
        flagged, with its reason; then stop (UserError) if a source dropped more than `max_skip_fraction`."""
        datasets = {"train": self.clips or self.train.dataset, **({"eval": self.eval.dataset} if self.eval else {})}
        report_bad_data(datasets, path, max_skip_fraction, write=write)


def _subset(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """At most `limit` examples, drawn at random (a prefix would often be one speaker)."""
    if limit is None or limit >= len(examples):
        return examples
    keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:limit])
    return [examples[i] for i in keep]


def resolve_vocab(config: Config, texts: list[str], output_dir: Path) -> Vocab:
    """The vocab.json of the checkpoints this run continues from (its own when resuming, or
    `train.init_from`'s), else an explicit `data.vocab`, else built from `texts`. A fresh run never
    reads an old vocab.json left in `output_dir`; a `data.vocab` must equal a reused one."""
    reused = vocab_to_reuse(config, output_dir)
    if reused is not None and not reused.exists():
        raise UserError(f"{reused}: missing; the checkpoints next to it were trained with it")
    vocab = Vocab.load(reused) if reused is not None else None
    if config.data.vocab:
        given = Vocab.load(config.data.vocab)
        if vocab is not None and given != vocab:
            raise UserError(f"data.vocab={config.data.vocab} differs from {reused}, the vocabulary the checkpoints "
                            "to continue from were trained with; leave data.vocab unset to use that one")
        return given
    return vocab if vocab is not None else Vocab.build(texts)


def choose_normalization(data: DataConfig, train_examples: list[Example]) -> TextNormalization:
    """The run's text normalisation: `data.language`, else the training data's one locale (Common
    Voice's locale column or folder name), else None (each utterance's own locale)."""
    language = data.language
    if language is None:
        locales = {e.language for e in train_examples}
        language = locales.pop() if len(locales) == 1 and "" not in locales else None
    return data.normalization(language or None)


def train_batch_sizes(config: Config, boundaries: np.ndarray, batch_size: int,
                      data_parallel: int) -> int | list[int]:
    """The training loader's global batch: `batch_size` for every bucket or, with
    `train.per_device_audio_seconds` set, one size per bucket of `boundaries` ``[k]``, each a multiple
    of data_parallel x accumulation steps (the train step splits it into micro-batches over devices)."""
    if config.train.per_device_audio_seconds is None:
        return batch_size
    return bucket_batch_sizes(boundaries, config.train.per_device_audio_seconds, devices=data_parallel,
                              accum=config.optim.gradient_accumulation_steps)


def build_data(config: Config, output_dir: Path, batch_size: int, eval_batch_size: int, *,
               data_parallel: int, audio_only: Wav2Vec2Config | None = None) -> Data:
    """Sources -> vocab -> decoded, filtered datasets -> bucketed loaders for this process's rows.

    `batch_size` is the global training batch (`eval_batch_size` the evaluation one); with
    `train.per_device_audio_seconds` set, each training bucket gets its own size instead, for
    `data_parallel` devices. `audio_only` (pretraining: the model trained, for its frame counts): no
    transcripts and no vocabulary; clips under `config.pretrain.min_frames()` frames are dropped."""
    d = config.data
    if not d.train:
        raise ConfigError("data.train is empty: give a source, e.g. --set data.train=cv:/path/to/tr:train")
    if d.streaming and audio_only is not None:
        raise ConfigError("data.streaming=true is not supported by xlsr-jax pretrain yet: set it to false",
                          ("data.streaming",))
    if d.streaming and (config.augment.speed_factors or config.augment.active):
        raise ConfigError("augment.* is not supported with data.streaming=true yet; train from the cache "
                          "(data.streaming=false) to augment", ("augment", "data.streaming"))
    if d.streaming:
        return _build_streaming(config, output_dir, batch_size, eval_batch_size, data_parallel=data_parallel)
    need_text = audio_only is None
    train_examples = _subset(read_examples(d.train, d, purpose="train", need_text=need_text), d.max_train_examples,
                             config.train.seed)
    eval_examples = (_subset(read_examples(d.eval, d, purpose="eval", need_text=need_text), d.max_eval_examples,
                             config.train.seed) if d.eval else [])
    if audio_only is None:
        normalization = choose_normalization(d, train_examples)
        texts = [normalization(e.text, e.language) for e in train_examples + eval_examples]
        vocab = resolve_vocab(config, texts, output_dir)
        w2v_config, min_frames = model_config(config.model, vocab), 0
    else:
        normalization = vocab = None
        w2v_config, min_frames = audio_only, config.pretrain.min_frames()
    kwargs = prepare_kwargs(d, vocab, normalization, functools.partial(feat_extract_output_lengths, w2v_config))
    train_set, train_report = prepare_dataset(
        train_examples, min_duration_s=d.min_duration_s, max_duration_s=d.max_duration_s, name="train",
        min_frames=min_frames, **kwargs)
    clips, weights = train_set, [source_weight(e.source) for e in train_set.examples]
    a = config.augment
    if a.speed_factors:  # one row per (clip, factor); each epoch draws about one of a clip's rows
        train_set, _ = speed_variants(clips, a.speed_factors, kwargs["frames_fn"])
        weights = [source_weight(e.source) / len(a.speed_factors) for e in train_set.examples]
        logger.info("augment: %d clips at speeds %s: %d rows (%d dropped: transcript too long for the faster "
                    "audio)", len(clips), list(a.speed_factors), len(train_set),
                    len(clips) * len(a.speed_factors) - len(train_set))
    boundaries = bucket_boundaries(train_set.lengths, d.num_buckets)
    train = BatchLoader(train_set, batch_size=train_batch_sizes(config, boundaries, batch_size, data_parallel),
                        seed=config.train.seed, shuffle=True, boundaries=boundaries,
                        process_index=jax.process_index(), process_count=jax.process_count(), prefetch=d.prefetch,
                        workers=d.loader_workers, owners=train_set.owners, weights=weights,
                        augment=augmenter(config, clips))
    reports, evaluation = {"train": train_report}, None
    if eval_examples:
        evaluation, reports["eval"] = eval_loader(eval_examples, data=d, vocab=vocab, normalization=normalization,
                                                  frames_fn=kwargs["frames_fn"], batch_size=eval_batch_size,
                                                  min_frames=min_frames)
    return Data(vocab, normalization, train, evaluation, reports, clips)


def augmenter(config: Config, clips: PreparedDataset) -> Augmenter | None:
    """The per-row augmentation of training batches (None when off). Babble noise mixes clips this host
    holds (all of them, or its part when each host decoded its own)."""
    a = config.augment
    if not a.active:
        return None
    held = (np.arange(len(clips)) if clips.owners is None
            else np.flatnonzero(clips.owners == jax.process_index()))
    return Augmenter(seed=config.train.seed, sampling_rate=SAMPLING_RATE, noise_prob=a.noise_prob,
                     noise_snr_db=a.noise_snr_db, noise_kinds=a.noise_kinds, reverb_prob=a.reverb_prob,
                     reverb_rt60_s=a.reverb_rt60_s, pitch_prob=a.pitch_prob, pitch_semitones=a.pitch_semitones,
                     babble=lambda rng: clips.audio[int(held[rng.integers(len(held))])])


def _build_streaming(config: Config, output_dir: Path, batch_size: int, eval_batch_size: int, *,
                     data_parallel: int) -> Data:
    """`build_data` for `data.streaming`: the training sources become a stream (data/stream.py) whose first
    `data.streaming_probe` rows choose the text normalisation, the vocabulary (with the eval texts) and the
    buckets; the evaluation set is decoded up front as always."""
    d, seed = config.data, config.train.seed
    specs = check_specs(d.train, d, purpose="train")
    weighted = [spec for spec in specs if source_weight(spec) != 1]
    if weighted:
        raise ConfigError(f"data.train: {weighted}: ?weight= is not supported with data.streaming=true (each epoch "
                          "reads every source once); drop the option or stream without it",
                          ("data.train", "data.streaming"))
    stream = ElementStream(open_sources(specs, seed=seed, cache_dir=os.path.join(cache_root(d), "cv"),
                                        hub_cache_dir=os.path.join(cache_root(d), "hf")), seed)
    eval_examples = (_subset(read_examples(d.eval, d, purpose="eval"), d.max_eval_examples, seed) if d.eval else [])
    head = stream.head(d.streaming_probe)
    normalization = choose_normalization(d, [e.example for e in head])
    texts = [normalization(e.text, e.language) for e in [h.example for h in head] + eval_examples]
    vocab = resolve_vocab(config, texts, output_dir)
    w2v_config = model_config(config.model, vocab)
    kwargs = prepare_kwargs(d, vocab, normalization, functools.partial(feat_extract_output_lengths, w2v_config))
    make = ClipMaker(vocab=vocab, normalize=kwargs["normalize"], sampling_rate=SAMPLING_RATE,
                     frames_fn=kwargs["frames_fn"],
                     length_range=(d.min_duration_s * SAMPLING_RATE, d.max_duration_s * SAMPLING_RATE))
    probe, report = probe_dataset(head, make, d.num_workers)
    boundaries = stream_boundaries(probe.lengths, d.num_buckets, d.max_duration_s * SAMPLING_RATE)
    train = StreamingLoader(stream, make, probe=probe, boundaries=boundaries, shuffle_buffer=d.shuffle_buffer,
                            batch_size=train_batch_sizes(config, boundaries, batch_size, data_parallel),
                            process_index=jax.process_index(), process_count=jax.process_count(),
                            prefetch=d.prefetch, workers=d.num_workers,
                            description={"probe": d.streaming_probe, "duration_s": [d.min_duration_s, d.max_duration_s],
                                         "vocab": list(vocab.tokens)})
    reports, evaluation = {"train": report}, None
    if eval_examples:
        evaluation, reports["eval"] = eval_loader(eval_examples, data=d, vocab=vocab, normalization=normalization,
                                                  frames_fn=kwargs["frames_fn"], batch_size=eval_batch_size)
    return Data(vocab, normalization, train, evaluation, reports)


def build_model(config: Config, vocab: Vocab, weights: bool = True) -> tuple[FlaxWav2Vec2ForCTC, dict | None]:
    """The model, and host (numpy) params when starting from a pretrained checkpoint (`weights`; without,
    only its config.json is read)."""
    m = config.model
    dtype = jnp.bfloat16 if config.train.precision == "bfloat16" else jnp.float32
    if m.pretrained and weights:
        return load_pretrained(m.pretrained, seed=config.train.seed, dtype=dtype, options=m.execution_options(),
                               **model_overrides(m, vocab))
    return FlaxWav2Vec2ForCTC(model_config(m, vocab), dtype=dtype, **m.execution_options()), None


def _put(host_params: dict, shardings: Any) -> Any:
    """Host numpy params -> global arrays; each process fills only the shards its devices hold."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]), host_params, shardings)


def abstract_state(config: Config, model: FlaxWav2Vec2ForCTC | FlaxWav2Vec2ForPreTraining, mesh: Mesh,
                   total_steps: int) -> tuple[Any, Any, optax.GradientTransformation, optax.Schedule]:
    """(the train state's shapes and dtypes, its shardings over `mesh`, optimizer, lr schedule), nothing
    computed: what `build_state` builds, and what `plan` compiles steps for."""
    abstract_params = model.abstract_params()
    tx, schedule = build_optimizer(config.optim, total_steps, abstract_params, config.model.freeze_feature_encoder,
                                   config.model.freeze_transformer_steps)
    shapes = jax.eval_shape(lambda p: create_state(p, tx, config.train.seed), abstract_params)
    return shapes, parallel.tree_shardings(shapes, mesh, config.mesh.rules), tx, schedule


def build_state(config: Config, model: FlaxWav2Vec2ForCTC | FlaxWav2Vec2ForPreTraining, host_params: dict | None,
                mesh: Mesh,
                total_steps: int) -> tuple[TrainState, Any, optax.GradientTransformation, optax.Schedule]:
    """(state built already sharded, its shardings, optimizer, lr schedule)."""
    _, shardings, tx, schedule = abstract_state(config, model, mesh, total_steps)
    seed = config.train.seed
    if host_params is None:
        def init(rng):
            return create_state(model.init_params(rng), tx, seed)
        state = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
    else:
        params = _put(host_params, shardings.params)
        state = jax.jit(lambda p: create_state(p, tx, seed), out_shardings=shardings)(params)
    return state, shardings, tx, schedule

