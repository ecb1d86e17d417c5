"""One frozen, typed config tree, loaded from YAML plus `--set a.b=value` overrides.

Every key carries a one-line meaning (`field.metadata["help"]`), which `describe_config` prints next to
the resolved value. Unknown keys and bad values fail at start with the key's dotted name (and the
closest valid key) and where it came from (the YAML file or the `--set` override); nothing is silently
ignored. The resolved tree is written next to the checkpoints.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import difflib
import os
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from xlsr_jax.errors import UserError
from xlsr_jax.text import DEFAULT_CHARS_TO_IGNORE, UNICODE_FORMS, TextNormalization

# The model's execution options and their allowed values. Here, at the bottom, so that model/ (which
# implements them) and this file (which validates them) share one list without config importing model/.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "plain")
# Names of jax.checkpoint_policies; "full" saves nothing and recomputes the whole layer.
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
POS_CONV_IMPLS = ("auto", "xla", "tap_grad", "isolated", "fft")
EXECUTION_OPTIONS = {"remat_policy": REMAT_POLICIES, "attention": ATTENTION_IMPLS, "pos_conv": POS_CONV_IMPLS}


def _key(default: Any = dataclasses.MISSING, meaning: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its one-line meaning (units, allowed values), shown by `describe_config`."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": meaning})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network. Regularisation fields keep Hugging Face's `Wav2Vec2Config` names and meaning."""

    pretrained: str | None = _key("facebook/wav2vec2-large-xlsr-53",
                                  "HF folder or hub id to start from; null: from scratch (see architecture)")
    architecture: Mapping[str, Any] = _key(meaning="Wav2Vec2Config kwargs for a model built from scratch "
                                                   "(hidden_size, num_hidden_layers, ...)", factory=dict)
    attention_dropout: float = _key(0.1, "dropout on attention probabilities, in [0, 1]")
    hidden_dropout: float = _key(0.1, "dropout on transformer hidden states and feed-forward output, [0, 1]")
    activation_dropout: float = _key(0.0, "dropout after the feed-forward activation, in [0, 1]")
    feat_proj_dropout: float = _key(0.0, "dropout on the projected conv features, in [0, 1]")
    final_dropout: float = _key(0.0, "dropout before the CTC head, in [0, 1]")
    layerdrop: float = _key(0.1, "probability of skipping each transformer layer in a training step, [0, 1]")
    mask_time_prob: float = _key(0.05, "SpecAugment: share of frames masked along time, in [0, 1]")
    mask_time_length: int = _key(10, "SpecAugment: length of each time mask span, in frames")
    mask_time_min_masks: int = _key(2, "SpecAugment: at least this many time mask spans per utterance")
    mask_feature_prob: float = _key(0.0, "SpecAugment: share of hidden channels masked, in [0, 1]; 0: off")
    mask_feature_length: int = _key(10, "SpecAugment: length of each channel mask span, in channels")
    ctc_loss_reduction: str = _key("mean", "mean: each utterance's CTC loss over its label length, averaged "
                                           "over the batch | sum: summed over the batch")
    freeze_feature_encoder: bool = _key(True, "keep the conv feature encoder's weights fixed "
                                              "(an optimizer mask)")
    freeze_transformer_steps: int = _key(0, "train only the new CTC head for this many first updates, then "
                                            "everything but a frozen feature encoder (fairseq's "
                                            "freeze_finetune_updates); 0: off")
    # How the model runs, never what it computes: parameters, checkpoints and exports are the same.
    remat_policy: str = _key("none", "what each layer keeps for the backward pass: none (everything) | full "
                                     "(nothing: least memory, ~1/3 more compute) | dots_saveable | "
                                     "dots_with_no_batch_dims_saveable (jax.checkpoint_policies)")
    scan_layers: bool = _key(True, "run the transformer layers under nn.scan: one layer compiles, not 24 "
                                   "(parameters stay per layer under Hugging Face's names)")
    # Attention dropout needs the attention probabilities, which a fused kernel never materialises: a
    # training step with attention_dropout > 0 runs the plain path (evaluation always runs fused).
    # The XLSR recipe's 0.1 is kept as the default for accuracy on small data; set it to 0 to train
    # with cuDNN's flash attention on a GPU. Measured cost of 0.1 on an H200 (XLSR-53, bf16, frozen
    # feature encoder): 105.5 vs 83.0 ms per step at 8 x 10 s, 131.9 vs 108.2 ms at 32 x 5 s (+22-27 %);
    # with the isolated positional conv, 90.3 vs 72.5 ms at 32 x 5 s (+25 %, 2026-11-28). Since then the
    # plain path no longer keeps the dropped probabilities for the backward pass (XLA's plan: ~105 MiB a
    # layer less at 32 x 5 s; its GPU time is to be measured).
    attention: str = _key("auto", "auto (cuDNN flash attention via jax.nn.dot_product_attention on a GPU in "
                                  "bfloat16, else plain) | xla | cudnn | plain (explicit softmax)")
    pos_conv: str = _key("auto", "positional conv: auto (fft on CPU in float32, where XLA's grouped-conv "
                                 "kernel gradient is ~7x slower and the FFT 2-3x faster than per-tap matmuls, "
                                 "tap_grad in bfloat16; isolated on a GPU, where XLA would fuse the adds "
                                 "around it into a slow cuDNN call; xla elsewhere) | xla | tap_grad | "
                                 "isolated | fft")

    def __post_init__(self):
        for name in ("attention_dropout", "hidden_dropout", "activation_dropout", "feat_proj_dropout",
                     "final_dropout", "layerdrop", "mask_time_prob", "mask_feature_prob"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"model.{name}", "must be in [0, 1]")
        _check(self.ctc_loss_reduction in ("mean", "sum"), "model.ctc_loss_reduction", "must be mean or sum")
        _check(self.freeze_transformer_steps >= 0, "model.freeze_transformer_steps", "must be >= 0")
        _check(self.pretrained is not None or bool(self.architecture), "model.architecture",
               "is required when model.pretrained is not set", related=["model.pretrained"])
        for name, allowed in EXECUTION_OPTIONS.items():
            _check(getattr(self, name) in allowed, f"model.{name}", f"must be one of {', '.join(allowed)}")

    def execution_options(self) -> dict[str, Any]:
        """`FlaxWav2Vec2ForCTC` keyword arguments for training."""
        return {"freeze_feature_encoder": self.freeze_feature_encoder, "remat_policy": self.remat_policy,
                "scan_layers": self.scan_layers, "attention": self.attention, "pos_conv": self.pos_conv}

    def regularisation(self) -> dict[str, Any]:
        """The fields that override a `Wav2Vec2Config`."""
        names = ("attention_dropout", "hidden_dropout", "activation_dropout", "feat_proj_dropout",
                 "final_dropout", "layerdrop", "mask_time_prob", "mask_time_length", "mask_time_min_masks",
                 "mask_feature_prob", "mask_feature_length", "ctc_loss_reduction")
        return {name: getattr(self, name) for name in names}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the audio comes from and how transcripts become labels."""

    train: tuple[str, ...] = _key((), "training sources: cv:DIR[:SPLITS] (Common Voice, splits joined by +), "
                                      "manifest:FILE, hf:NAME[:CONFIG][:SPLITS] (Hugging Face dataset or "
                                      "local folder); each may end in ?weight=W&language=L&audio=COL&text=COL")
    eval: tuple[str, ...] = _key((), "evaluation sources, same forms as data.train (no weight); empty: no "
                                     "evaluation")
    allow_test_split_in_train: bool = _key(False, "allow a Common Voice test split (the benchmark) in data.train")
    language: str | None = _key(None, "language code choosing the text normalisation preset (tr, de, en-US: "
                                      "dotted/dotless i, apostrophes, NFKC; see xlsr_jax/text.py); null: each "
                                      "source's locale (Common Voice's)")
    lowercase: bool = _key(True, "lowercase transcripts before building labels")
    chars_to_ignore: str = _key(DEFAULT_CHARS_TO_IGNORE, "characters deleted from transcripts (punctuation)")
    keep_apostrophes: bool | None = _key(None, "keep apostrophes between two letters (it's, l'homme) as \"'\" "
                                               "though chars_to_ignore lists them; null: the language preset")
    unicode_normalization: str | None = _key(None, "NFC | NFKC (also folds full-width forms, ligatures, "
                                                   "presentation forms); null: the language preset")
    vocab: str | None = _key(None, "an existing vocab.json; null: built from train + eval text")
    min_duration_s: float = _key(0.5, "drop training clips shorter than this, in seconds")
    max_duration_s: float = _key(20.0, "drop training clips longer than this, in seconds")
    max_skip_fraction: float = _key(0.2, "stop at start-up if a source drops more than this share of its clips "
                                         "(missing, broken, silent, empty text...; all listed in data_report.tsv), "
                                         "in [0, 1]")
    num_buckets: int = _key(8, "length buckets (batch shapes) for training batches, >= 1")
    eval_num_buckets: int = _key(4, "length buckets (batch shapes) for evaluation batches, >= 1")
    max_train_examples: int | None = _key(None, "use at most this many training clips, drawn at random; "
                                                "null: all")
    max_eval_examples: int | None = _key(None, "use at most this many evaluation clips, drawn at random; "
                                               "null: all")
    cache_dir: str | None = _key(None, "decoded-audio and archive cache; null: ~/.cache/xlsr_jax")
    num_workers: int = _key(2, "parallel workers decoding audio into the cache")
    shard_cache_by_host: bool = _key(True, "multi-host runs: each host decodes only its share of the clips "
                                           "(example i: host i mod hosts) into its own cache folder, and loads "
                                           "only those; false: every host decodes every clip")
    prefetch: int = _key(4, "batches prepared ahead of the training step")
    loader_workers: int = _key(1, "threads assembling batches (same batches, same order); 2 gave 1.2-1.8x "
                                  "the audio-s/s of 1 on a 2-core host (scripts/bench_input.py)")
    streaming: bool = _key(False, "read data.train lazily, decoding clips as batches need them (sources too big "
                                  "for RAM or disk: hf: Hub streams, local parquet shards); every host decodes "
                                  "the whole stream; needs train.max_steps; data.eval stays decoded up front")
    shuffle_buffer: int = _key(1000, "data.streaming: decoded clips held and drawn at random, >= 1 (memory: "
                                     "about this many clips of int16 audio)")
    streaming_probe: int = _key(1000, "data.streaming: rows at the start of the stream whose lengths place the "
                                      "buckets (the last is data.max_duration_s) and whose texts build the "
                                      "vocabulary when data.vocab is null, >= 1")

    def __post_init__(self):
        _check(self.num_buckets >= 1, "data.num_buckets", "must be >= 1")
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
        _check(self.streaming_probe >= 1, "data.streaming_probe", "must be >= 1")
        _check(not (self.streaming and self.max_train_examples is not None), "data.max_train_examples",
               "must be null with data.streaming=true (a stream is read whole each epoch)", related=["data.streaming"])
        _check(self.loader_workers >= 1, "data.loader_workers", "must be >= 1")
        _check(self.eval_num_buckets >= 1, "data.eval_num_buckets", "must be >= 1")
        _check(0 <= self.min_duration_s < self.max_duration_s, "data.max_duration_s",
               "must be greater than data.min_duration_s >= 0", related=["data.min_duration_s"])
        _check(0 <= self.max_skip_fraction <= 1, "data.max_skip_fraction", "must be in [0, 1]")
        _check(self.unicode_normalization in (None, *UNICODE_FORMS), "data.unicode_normalization",
               f"must be null or one of {', '.join(UNICODE_FORMS)}")

    def normalization(self, language: str | None = None) -> TextNormalization:
        """The text normalisation these keys describe, for `language` (default data.language; None: each
        utterance's locale), with the language preset's values written in where keys are null."""
        return TextNormalization(language=language or self.language or None, lowercase=self.lowercase,
                                 chars_to_ignore=self.chars_to_ignore, keep_apostrophes=self.keep_apostrophes,
                                 unicode_normalization=self.unicode_normalization).resolved()


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = _key(3e-4, "peak AdamW learning rate")
    warmup_steps: int = _key(500, "optimizer steps of linear warmup from 0 to optim.learning_rate")
    schedule: str = _key("linear", "after warmup: linear (decay to 0 at the last step) | cosine | constant | "
                                   "tri_stage (fairseq's: warmup from optim.init_lr_scale, hold, exponential "
                                   "decay to optim.final_lr_scale)")
    hold_steps: int | None = _key(None, "tri_stage: steps held at the peak after warmup; null: 40 % of the run")
    init_lr_scale: float = _key(0.01, "tri_stage: warmup starts at this share of optim.learning_rate")
    final_lr_scale: float = _key(0.05, "tri_stage: the decay ends at this share of optim.learning_rate")
    weight_decay: float = _key(0.0, "AdamW weight decay, on kernels only (not biases, norms, embeddings)")
    adam_b1: float = _key(0.9, "AdamW beta1")
    adam_b2: float = _key(0.999, "AdamW beta2")
    adam_eps: float = _key(1e-8, "AdamW epsilon")
    max_grad_norm: float = _key(1.0, "clip gradients to this global L2 norm")
    gradient_accumulation_steps: int = _key(1, "micro-batches summed into one optimizer step, >= 1")
    max_consecutive_skips: int = _key(100, "stop the run with an error once this many updates in a row were "
                                           "skipped for a non-finite loss or gradient (checked at logging steps)")

    def __post_init__(self):
        _check(self.learning_rate > 0, "optim.learning_rate", "must be > 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(self.schedule in ("linear", "cosine", "constant", "tri_stage"), "optim.schedule",
               "must be linear, cosine, constant or tri_stage")
        _check(self.hold_steps is None or self.hold_steps >= 0, "optim.hold_steps", "must be >= 0 or null")
        _check(0 <= self.init_lr_scale <= 1, "optim.init_lr_scale", "must be in [0, 1]")
        _check(0 < self.final_lr_scale <= 1, "optim.final_lr_scale", "must be in (0, 1]")
        _check(self.gradient_accumulation_steps >= 1, "optim.gradient_accumulation_steps", "must be >= 1")
        _check(self.max_consecutive_skips >= 1, "optim.max_consecutive_skips", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    output_dir: str = _key("runs/xlsr", "run folder: checkpoints, metrics.jsonl, vocab.json, resolved config")
    max_steps: int = _key(-1, "optimizer steps to train; > 0 overrides train.num_train_epochs")
    num_train_epochs: float = _key(30.0, "passes over the training data (used when train.max_steps <= 0)")
    per_device_batch_size: int = _key(16, "clips per device per micro-batch, >= 1")
    per_device_audio_seconds: float | None = _key(
        None, "token-budget batching: padded audio seconds per device per micro-batch; each length bucket "
              "gets the most clips that fit (at least 1); null: train.per_device_batch_size clips for every "
              "bucket")
    eval_steps: int = _key(500, "evaluate every this many steps, >= 1")
    save_steps: int = _key(500, "checkpoint every this many steps and at the end (evaluated steps too while "
                                 "checkpoint.best_metric is set), >= 1")
    logging_steps: int = _key(50, "log training metrics every this many steps, >= 1")
    precision: str = _key("float32", "compute dtype, float32 or bfloat16; parameters and optimizer state "
                                     "stay float32")
    seed: int = _key(42, "seed for initialisation, shuffling, dropout and example subsets")
    compilation_cache: str | None = _key("~/.cache/xlsr_jax/jax", "persistent XLA compilation cache folder; "
                                                                  "null: off")
    overwrite_output_dir: bool = _key(False, "start over in train.output_dir, deleting the old run's files "
                                              "(checkpoints, metrics, vocab, hf_model...; other files stay); "
                                              "false: a folder with checkpoints resumes")
    init_from: str | None = _key(None, "RUN_DIR[:STEP]: start a new run (step 0, fresh optimizer) from another "
                                       "run's parameters and vocab (its newest checkpoint without :STEP)")
    early_stopping_patience: int | None = _key(None, "end the run after this many evaluations in a row without "
                                                     "a better checkpoint.best_metric; null: off")

    def __post_init__(self):
        if "://" not in self.output_dir:  # a local folder: ~ is the user's home, as in a shell
            object.__setattr__(self, "output_dir", os.path.expanduser(self.output_dir))
        _check(self.precision in ("float32", "bfloat16"), "train.precision", "must be float32 or bfloat16")
        _check(self.per_device_batch_size >= 1, "train.per_device_batch_size", "must be >= 1")
        _check(self.per_device_audio_seconds is None or 0 < self.per_device_audio_seconds < float("inf"),
               "train.per_device_audio_seconds", "must be > 0 (and finite) or null")
        _check(self.max_steps > 0 or self.num_train_epochs > 0, "train.max_steps",
               "set train.max_steps > 0 or train.num_train_epochs > 0", related=["train.num_train_epochs"])
        for name in ("eval_steps", "save_steps", "logging_steps"):
            _check(getattr(self, name) >= 1, f"train.{name}", "must be >= 1")
        _check(self.early_stopping_patience is None or self.early_stopping_patience >= 1,
               "train.early_stopping_patience", "must be >= 1 or null")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ("data", "fsdp"). Batches split over both axes; parameters shard over "fsdp".

    `rules` are (regex over a parameter's path `a/b/kernel`, partition spec per dimension) pairs, first
    match wins; parameters no rule matches shard their largest dimension divisible by the fsdp size.
    The optimizer's copies of a parameter (Adam's moments) always shard like the parameter.
    """

    data: int = _key(-1, "devices along the data axis; -1: every device not used by fsdp")
    fsdp: int = _key(1, "devices along the fsdp axis, over which parameters shard, >= 1")
    rules: tuple[tuple[str, tuple[str | None, ...]], ...] = _key(
        (), "[regex over a parameter path a/b/kernel, [axis or null per dimension]] pairs, first match wins; "
            "unmatched parameters shard their largest dimension")
    distributed: bool = _key(False, "start JAX's multi-process runtime (jax.distributed.initialize): TPU pods and "
                                    "SLURM/Open MPI clusters find their peers; elsewhere set the three keys below")
    # A cluster JAX cannot detect (several machines started by hand, or processes on one machine) names its
    # coordinator and each process's place; the environment variables let one config serve every process.
    coordinator_address: str | None = _key(None, "host:port of process 0's coordinator (implies "
                                                 "mesh.distributed); null: $JAX_COORDINATOR_ADDRESS or auto-detect")
    num_processes: int | None = _key(None, "processes in the run; null: $JAX_NUM_PROCESSES or auto-detect")
    process_id: int | None = _key(None, "this process's index, 0 .. num_processes - 1; null: $JAX_PROCESS_ID "
                                        "or auto-detect")

    def __post_init__(self):
        _check(self.fsdp >= 1, "mesh.fsdp", "must be >= 1")
        _check(self.data == -1 or self.data >= 1, "mesh.data", "must be -1 or >= 1")
        _check(self.num_processes is None or self.num_processes >= 1, "mesh.num_processes", "must be >= 1")
        _check(self.process_id is None or self.process_id >= 0, "mesh.process_id", "must be >= 0")
        _check(self.process_id is None or self.num_processes is None or self.process_id < self.num_processes,
               "mesh.process_id", "must be less than mesh.num_processes", related=["mesh.num_processes"])
        _check(self.coordinator_address is None or re.fullmatch(r".+:\d+", self.coordinator_address) is not None,
               "mesh.coordinator_address", "must be host:port")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    save_total_limit: int = _key(2, "keep this many newest checkpoints, >= 1")
    resume: bool = _key(True, "continue from the newest checkpoint in train.output_dir (false: a folder "
                              "holding checkpoints is an error; see train.overwrite_output_dir)")
    resume_step: int | None = _key(None, "resume from this kept step instead of the newest; null: the newest "
                                         "that restores")
    best_metric: str | None = _key("eval/wer", "also keep the best checkpoint by this metrics.jsonl metric "
                                               "(eval/wer, eval/cer, eval/loss); null: keep only the newest")
    best_mode: str = _key("min", "min or max: whether a lower or a higher checkpoint.best_metric is better")

    def __post_init__(self):
        _check(self.save_total_limit >= 1, "checkpoint.save_total_limit", "must be >= 1")
        _check(self.resume_step is None or self.resume_step >= 0, "checkpoint.resume_step", "must be >= 0 or null")
        _check(self.best_metric is None or self.best_metric.startswith("eval/"), "checkpoint.best_metric",
               "must be null or an eval/ metric (eval/wer, eval/cer, eval/loss)")
        _check(self.best_mode in ("min", "max"), "checkpoint.best_mode", "must be min or max")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Audio augmentation of training clips (data/augment.py), drawn per (train.seed, step, row): a
    resumed run sees the same audio. SpecAugment stays in the model (model.mask_time_prob)."""

    speed_factors: tuple[float, ...] = _key((), "speed perturbation factors, e.g. [0.9, 1.0, 1.1] (Kaldi's): "
                                                "each epoch plays each clip at one of them, drawn anew; the "
                                                "length changes (bucketing and the label check use it); "
                                                "empty: off")
    pitch_prob: float = _key(0.0, "share of clips pitch-shifted (same length), in [0, 1]")
    pitch_semitones: float = _key(2.0, "pitch shift drawn uniformly in [-this, this] semitones")
    reverb_prob: float = _key(0.0, "share of clips through a synthetic room (decaying-noise impulse response)")
    reverb_rt60_s: tuple[float, float] = _key((0.2, 0.7), "reverberation time range [low, high], seconds")
    noise_prob: float = _key(0.0, "share of clips with added noise, in [0, 1]")
    noise_snr_db: tuple[float, float] = _key((10.0, 30.0), "signal-to-noise ratio range [low, high], dB")
    noise_kinds: tuple[str, ...] = _key(("white", "pink", "babble"), "noises drawn from: white | pink | "
                                                                     "babble (3 other training clips summed)")

    def __post_init__(self):
        _check(all(0.5 <= f <= 2.0 for f in self.speed_factors), "augment.speed_factors", "must be in [0.5, 2]")
        for name in ("pitch_prob", "reverb_prob", "noise_prob"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"augment.{name}", "must be in [0, 1]")
        _check(self.pitch_semitones >= 0, "augment.pitch_semitones", "must be >= 0")
        _check(0 < self.reverb_rt60_s[0] <= self.reverb_rt60_s[1], "augment.reverb_rt60_s", "must be 0 < low <= high")
        _check(self.noise_snr_db[0] <= self.noise_snr_db[1], "augment.noise_snr_db", "must be low <= high")
        _check(bool(self.noise_kinds) and all(k in ("white", "pink", "babble") for k in self.noise_kinds),
               "augment.noise_kinds", "must be a non-empty list of white, pink, babble")

    @property
    def active(self) -> bool:
        """Whether any augmentation drawn per row (not speed, which is planned) is on."""
        return max(self.pitch_prob, self.reverb_prob, self.noise_prob) > 0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    per_device_batch_size: int | None = _key(None, "clips per device per evaluation batch; null: "
                                                   "train.per_device_batch_size")
    num_examples_to_print: int = _key(3, "reference/prediction pairs logged at each evaluation")
    at_end: bool = _key(True, "also evaluate after the last step")


NEGATIVE_SOURCES = ("masked", "frames")
PRETRAIN_EVAL_METRICS = ("eval/loss", "eval/contrastive_loss", "eval/diversity_loss", "eval/codevector_perplexity")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """`xlsr-jax pretrain`: wav2vec 2.0's masked contrastive task (Hugging Face's `Wav2Vec2ForPreTraining`
    fields and its pretraining example's defaults). Read only by pretraining; `xlsr-jax train` ignores it."""

    num_negatives: int = _key(100, "distractors per masked frame in the contrastive loss, >= 1")
    negatives_from: str = _key("masked", "where distractors come from: masked (the masked frames of the same "
                                         "clip, fairseq's wav2vec 2.0) | frames (every real frame of the clip, "
                                         "Hugging Face's example)")
    mask_time_prob: float = _key(0.65, "share of frames that start a masked span (the targets), in (0, 1]")
    mask_time_length: int = _key(10, "length of each masked span, in frames, >= 1; shorter clips are dropped")
    mask_time_min_masks: int = _key(2, "at least this many masked spans per clip, >= 0")
    max_gumbel_temperature: float = _key(2.0, "Gumbel-softmax temperature at step 0, > 0")
    min_gumbel_temperature: float = _key(0.5, "the temperature never falls below this, > 0")
    gumbel_temperature_decay: float = _key(0.999995, "temperature = max(max * decay^step, min), in (0, 1]")
    diversity_loss_weight: float = _key(0.1, "weight of the codebook diversity loss, >= 0")
    contrastive_logits_temperature: float = _key(0.1, "temperature of the contrastive softmax, > 0")
    feat_quantizer_dropout: float = _key(0.0, "dropout on the features before the quantizer, in [0, 1]")
    codevector_dim: int = _key(256, "model.pretrained null: the quantizer's codevector size (a multiple of "
                                    "pretrain.num_codevector_groups); a pretrained folder keeps its own")
    proj_codevector_dim: int = _key(256, "model.pretrained null: size both sides are projected to for the "
                                         "contrastive loss")
    num_codevector_groups: int = _key(2, "model.pretrained null: codebooks (groups) of the product quantizer")
    num_codevectors_per_group: int = _key(320, "model.pretrained null: entries of each codebook")
    collapse_perplexity: float = _key(2.0, "collapse guard: a logged codevector perplexity below this many "
                                           "codes per group counts as collapsed (1: every frame the same code); "
                                           "0: off")
    collapse_patience: int = _key(5, "collapse guard: stop the run (checkpoint kept) after this many logged "
                                     "steps in a row counted as collapsed, >= 1")

    def __post_init__(self):
        _check(self.num_negatives >= 1, "pretrain.num_negatives", "must be >= 1")
        _check(self.negatives_from in NEGATIVE_SOURCES, "pretrain.negatives_from",
               f"must be one of {', '.join(NEGATIVE_SOURCES)}")
        _check(0.0 < self.mask_time_prob <= 1.0, "pretrain.mask_time_prob", "must be in (0, 1]")
        _check(self.mask_time_length >= 1, "pretrain.mask_time_length", "must be >= 1")
        _check(self.mask_time_min_masks >= 0, "pretrain.mask_time_min_masks", "must be >= 0")
        _check(0.0 < self.min_gumbel_temperature <= self.max_gumbel_temperature, "pretrain.min_gumbel_temperature",
               "must be > 0 and <= pretrain.max_gumbel_temperature", related=["pretrain.max_gumbel_temperature"])
        _check(0.0 < self.gumbel_temperature_decay <= 1.0, "pretrain.gumbel_temperature_decay", "must be in (0, 1]")
        _check(self.diversity_loss_weight >= 0, "pretrain.diversity_loss_weight", "must be >= 0")
        _check(self.contrastive_logits_temperature > 0, "pretrain.contrastive_logits_temperature", "must be > 0")
        _check(0.0 <= self.feat_quantizer_dropout <= 1.0, "pretrain.feat_quantizer_dropout", "must be in [0, 1]")
        for name in ("codevector_dim", "proj_codevector_dim", "num_codevector_groups", "num_codevectors_per_group"):
            _check(getattr(self, name) >= 1, f"pretrain.{name}", "must be >= 1")
        _check(self.codevector_dim % self.num_codevector_groups == 0, "pretrain.codevector_dim",
               "must be a multiple of pretrain.num_codevector_groups", related=["pretrain.num_codevector_groups"])
        _check(self.collapse_perplexity >= 0, "pretrain.collapse_perplexity", "must be >= 0 (0: off)")
        _check(self.collapse_patience >= 1, "pretrain.collapse_patience", "must be >= 1")

    def min_frames(self) -> int:
        """Fewest model frames a clip needs: one whole masked span, and a distractor other than itself."""
        return max(self.mask_time_length, 2)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = _key(meaning="the network; regularisation keys keep Hugging Face's Wav2Vec2Config "
                                      "names and meaning", factory=ModelConfig)
    data: DataConfig = _key(meaning="where the audio comes from and how transcripts become labels",
                            factory=DataConfig)
    augment: AugmentConfig = _key(meaning="audio augmentation of training clips (speed, pitch, reverberation, "
                                          "noise)", factory=AugmentConfig)
    optim: OptimConfig = _key(meaning="AdamW, learning-rate schedule, clipping, accumulation",
                              factory=OptimConfig)
    train: TrainConfig = _key(meaning="the run: length, batch size, cadence of eval/save/log, precision",
                              factory=TrainConfig)
    mesh: MeshConfig = _key(meaning='device mesh ("data", "fsdp"): batches split over both axes, parameters '
                                    'shard over fsdp', factory=MeshConfig)
    checkpoint: CheckpointConfig = _key(meaning="which checkpoints are kept, and resuming",
                                        factory=CheckpointConfig)
    eval: EvalConfig = _key(meaning="evaluation during and after training", factory=EvalConfig)
    pretrain: PretrainConfig = _key(meaning="xlsr-jax pretrain: masking, distractors, quantizer, losses, collapse "
                                            "guard (xlsr-jax train ignores it)", factory=PretrainConfig)

    def __post_init__(self):
        _check(self.train.early_stopping_patience is None or bool(self.checkpoint.best_metric and self.data.eval),
               "train.early_stopping_patience", "needs checkpoint.best_metric and data.eval (the metric it watches)",
               related=["checkpoint.best_metric", "data.eval"])
        _check(not self.data.streaming or self.train.max_steps > 0, "train.max_steps",
               "must be > 0 with data.streaming=true: a stream's epoch length is unknown until it has been read, so "
               "train.num_train_epochs cannot say how many steps to train", related=["data.streaming"])


class ConfigError(ValueError, UserError):
    """A config key or value that cannot be used; the message names the dotted key.

    `keys` are the dotted keys the error is about (a cross-field check names all of them), so that
    `load_config` can tell whether the YAML file or a `--set` override caused it.
    """

    def __init__(self, message: str, keys: Sequence[str] = ()):
        super().__init__(message)
        self.keys = tuple(keys)


def _cut(text: str, limit: int = 200) -> str:
    """`text` for an error message, cut at `limit` characters (a value or an override may be huge)."""
    return text if len(text) <= limit else text[:limit] + "..."


_REPR = reprlib.Repr()  # Python 3.11's Repr takes no keywords
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 200, 200, 3


def _shown(value: Any) -> str:
    """`repr(value)` for an error message, bounded however large or nested the value is."""
    return _cut(_REPR.repr(value))


def _check(ok: bool, key: str, message: str, related: Sequence[str] = ()) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}", (key, *related))


# --- building the tree from plain data -----------------------------------------------------------------


def _suggest(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` (from YAML) as type `hint`, or ConfigError naming `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is tuple:
        if isinstance(value, (str, int, float)) and args[-1] is Ellipsis:
            value = [value]  # one source where a list is expected
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_shown(value)}", [key])
        item_hints = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(item_hints) != len(value):
            raise ConfigError(f"{key}: expected {len(item_hints)} items, got {_shown(value)}", [key])
        return tuple(_coerce(v, h, f"{key}[{i}]") for i, (v, h) in enumerate(zip(value, item_hints)))
    if origin in (collections.abc.Mapping, dict) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {_shown(value)}", [key])
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {_shown(value)}", [key])
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {_shown(value)}", [key])
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {_shown(value)}", [key])
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {_shown(value)}", [key])
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {_shown(value)}", [key])
    raise ConfigError(f"{key}: unsupported type {hint}", [key])


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(values, Mapping):
        where = prefix.rstrip(".")
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {_shown(values)}", [where] * bool(where))
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            raise ConfigError(f"unknown key {prefix}{_cut(str(name))}{_suggest(str(name), fields)}",
                              [f"{prefix}{name}"])
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


MAX_DEPTH = 50  # nesting a config never needs; deeper YAML would exhaust Python's recursion first


class _Refused(yaml.MarkedYAMLError):
    """YAML that parses but that a config may not hold: an alias, nesting deeper than MAX_DEPTH."""


class _ConfigLoader(yaml.SafeLoader):
    """Safe YAML as a config needs it: no aliases (`*name`: a "billion laughs" of nested aliases expands
    exponentially) and nothing nested deeper than MAX_DEPTH."""

    def fetch_flow_collection_start(self, token_class):
        # The scanner reads `[[[[...` ahead of the composer, at a cost that grows with the square of the depth.
        if self.flow_level >= MAX_DEPTH:
            raise _Refused(None, None, f"nested deeper than {MAX_DEPTH} levels", self.get_mark())
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(None, None, f"aliases (*{event.anchor}) are not allowed in a config", event.start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {_cut(item)}: expected section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except _Refused as err:
        raise ConfigError(f"--set {key.strip()}=...: {err.problem}", [key.strip()]) from None
    except yaml.YAMLError:
        value = raw  # not YAML: the string as written
    return key.strip().split("."), value


def merge_overrides(tree: dict, overrides: Sequence[str]) -> dict:
    """Apply `a.b=value` strings (values parsed as YAML) to a copy of a nested dict."""
    tree = copy.deepcopy(dict(tree))
    for item in overrides:
        path, value = _parse_override(item)
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {_cut(item)}: {part} is not a section")
        node[path[-1]] = value
    return tree


def from_dict(tree: Mapping[str, Any]) -> Config:
    return _build(Config, tree, "")


def _touches(override: str, key: str) -> bool:
    """Whether `--set override` set `key` (`mesh.rules[0]`), a section above it or a key below it."""
    set_key, key = override.split("=", 1)[0].strip(), re.sub(r"\[\d+\]", "", key)
    return set_key == key or set_key.startswith(key + ".") or key.startswith(set_key + ".")


def _in_tree(tree: Mapping[str, Any], key: str) -> bool:
    node: Any = tree
    for part in re.sub(r"\[\d+\]", "", key).split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _blame(err: ConfigError, path: Path | None, tree: Mapping[str, Any], overrides: Sequence[str]) -> str:
    """Where the keys of a failed check came from: for each key, the overrides that set it, else the
    YAML file if it has it. When that finds nothing (the error names no key), the file and every override."""
    from_file, from_overrides = False, set()
    for key in err.keys:
        setters = {item for item in overrides if _touches(item, key)}
        from_overrides |= setters
        from_file |= not setters and path is not None and _in_tree(tree, key)
    if not from_file and not from_overrides:
        from_file, from_overrides = path is not None, set(overrides)
    named = [f"--set {_cut(item)}" for item in overrides if item in from_overrides]
    return ", ".join([str(path)] * from_file + named)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" if not path.exists() else f"{path}: not a file")
    try:
        tree = _load_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return tree


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """YAML file (optional) + overrides -> validated Config.

    An error names its source: `configs/x.yaml: ...` for a key or value from the file, `--set a.b=c: ...`
    for one from an override (a cross-field check names every override that set one of its keys).
    """
    path = Path(path) if path is not None else None
    tree = _read_yaml(path) if path is not None else {}
    merged = merge_overrides(tree, overrides)  # a malformed override names itself
    try:
        return from_dict(merged)
    except ConfigError as err:
        where = _blame(err, path, tree, overrides)
        raise ConfigError(f"{where}: {err}" if where else str(err), err.keys) from None


def to_dict(config: Config) -> dict:
    """Plain nested dict (tuples as lists) for YAML."""
    return _plain(dataclasses.asdict(config))


def _plain(x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return [_plain(v) for v in x]
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    return x


def save_config(config: Config, path: str | Path, header: str = "") -> None:
    """The resolved tree as YAML that `load_config` reads back, after `header` (comment lines)."""
    text = yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)
    Path(path).write_text(f"{header}\n{text}" if header else text, encoding="utf-8")


# --- the commented tree --------------------------------------------------------------------------------

_ONE_LINE = 1 << 30  # a YAML line width no value reaches: every value stays on one line


class _OneLineDumper(yaml.SafeDumper):
    """Safe YAML that writes a string holding a line break double-quoted (`"a\\nb"`), on one line."""


_OneLineDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style='"' if any(c in text for c in "\n\r\x85\u2028\u2029") else None))


def _flow(value: Any) -> str:
    """`value` as inline YAML: 0.0003, null, [a, b], {x: 1}."""
    text = yaml.dump(value, Dumper=_OneLineDumper, default_flow_style=True, width=_ONE_LINE,
                     allow_unicode=True).strip()
    return text[: -len("...")].strip() if text.endswith("\n...") else text


def _commented_key(name: str, value: Any, comment: str) -> list[str]:
    """`  name: value  # comment`; a non-empty mapping (model.architecture) one entry a line below it."""
    if isinstance(value, Mapping) and value:
        return [f"  {name}:  # {comment}"] + [f"    {_flow(k)}: {_flow(v)}" for k, v in value.items()]
    return [f"  {name}: {_flow(value)}  # {comment}"]


def describe_config(config: Config) -> str:
    """The resolved tree as YAML that `load_config` reads back: a header comment per section, and after
    each key its meaning, plus `(default: ...)` where the value differs from the default."""
    values = to_dict(config)
    lines = ["# xlsr-jax config: each key's meaning; '(default: ...)' marks a value changed from the default"]
    for section in dataclasses.fields(Config):
        lines += ["", f"# {section.name}: {section.metadata['help']}", f"{section.name}:"]
        for field in dataclasses.fields(type(getattr(config, section.name))):
            value = values[section.name][field.name]
            default = _plain(field.default if field.default_factory is dataclasses.MISSING
                             else field.default_factory())
            comment = field.metadata["help"] + ("" if value == default else f" (default: {_flow(default)})")
            lines += _commented_key(field.name, value, comment)
    return "\n".join(lines) + "\n"
