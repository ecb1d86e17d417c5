"""One frozen, typed config tree, loaded from YAML plus `--set a.b=value` overrides.

Unknown keys and bad values fail at start with the key's dotted name (and the closest valid key);
nothing is silently ignored. The resolved tree is written next to the checkpoints.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from xlsr_jax.text import DEFAULT_CHARS_TO_IGNORE


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network. Regularisation fields keep Hugging Face's `Wav2Vec2Config` names and meaning."""

    pretrained: str | None = "facebook/wav2vec2-large-xlsr-53"  # HF folder or hub id; null: from scratch
    architecture: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # Wav2Vec2Config kwargs
    attention_dropout: float = 0.1
    hidden_dropout: float = 0.1
    activation_dropout: float = 0.0
    feat_proj_dropout: float = 0.0
    final_dropout: float = 0.0
    layerdrop: float = 0.1
    mask_time_prob: float = 0.05
    mask_time_length: int = 10
    mask_time_min_masks: int = 2
    mask_feature_prob: float = 0.0
    mask_feature_length: int = 10
    ctc_loss_reduction: str = "mean"
    gradient_checkpointing: bool = False
    freeze_feature_encoder: bool = True

    def __post_init__(self):
        for name in ("attention_dropout", "hidden_dropout", "activation_dropout", "feat_proj_dropout",
                     "final_dropout", "layerdrop", "mask_time_prob", "mask_feature_prob"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"model.{name}", "must be in [0, 1]")
        _check(self.ctc_loss_reduction in ("mean", "sum"), "model.ctc_loss_reduction", "must be mean or sum")
        _check(self.pretrained is not None or bool(self.architecture), "model.architecture",
               "is required when model.pretrained is not set")

    def regularisation(self) -> dict[str, Any]:
        """The fields that override a `Wav2Vec2Config`."""
        names = ("attention_dropout", "hidden_dropout", "activation_dropout", "feat_proj_dropout",
                 "final_dropout", "layerdrop", "mask_time_prob", "mask_time_length", "mask_time_min_masks",
                 "mask_feature_prob", "mask_feature_length", "ctc_loss_reduction")
        return {name: getattr(self, name) for name in names}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the audio comes from and how transcripts become labels."""

    train: tuple[str, ...] = ()  # source specs: cv:DIR[:SPLITS], manifest:FILE
    eval: tuple[str, ...] = ()
    language: str | None = None  # lowercasing rules (tr, az); null: each source's locale (Common Voice's)
    lowercase: bool = True
    chars_to_ignore: str = DEFAULT_CHARS_TO_IGNORE
    vocab: str | None = None  # an existing vocab.json; default: built from train + eval text
    min_duration_s: float = 0.5
    max_duration_s: float = 20.0
    num_buckets: int = 8
    eval_num_buckets: int = 4
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    cache_dir: str | None = None  # decoded-audio cache; default ~/.cache/xlsr_jax
    num_workers: int = 2
    prefetch: int = 4

    def __post_init__(self):
        _check(self.num_buckets >= 1, "data.num_buckets", "must be >= 1")
        _check(self.eval_num_buckets >= 1, "data.eval_num_buckets", "must be >= 1")
        _check(0 <= self.min_duration_s < self.max_duration_s, "data.max_duration_s",
               "must be greater than data.min_duration_s >= 0")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 3e-4
    warmup_steps: int = 500
    schedule: str = "linear"  # linear warmup, then: linear decay to 0 | cosine | constant
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1

    def __post_init__(self):
        _check(self.learning_rate > 0, "optim.learning_rate", "must be > 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(self.schedule in ("linear", "cosine", "constant"), "optim.schedule",
               "must be linear, cosine or constant")
        _check(self.gradient_accumulation_steps >= 1, "optim.gradient_accumulation_steps", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/xlsr"
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 30.0
    per_device_batch_size: int = 16
    eval_steps: int = 500
    save_steps: int = 500
    logging_steps: int = 50
    precision: str = "float32"  # compute dtype; parameters and optimizer state stay float32
    seed: int = 42
    compilation_cache: str | None = "~/.cache/xlsr_jax/jax"  # persistent XLA cache; null: off

    def __post_init__(self):
        _check(self.precision in ("float32", "bfloat16"), "train.precision", "must be float32 or bfloat16")
        _check(self.per_device_batch_size >= 1, "train.per_device_batch_size", "must be >= 1")
        _check(self.max_steps > 0 or self.num_train_epochs > 0, "train.max_steps",
               "set train.max_steps > 0 or train.num_train_epochs > 0")
        for name in ("eval_steps", "save_steps", "logging_steps"):
            _check(getattr(self, name) >= 1, f"train.{name}", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ("data", "fsdp"). Batches split over both axes; parameters shard over "fsdp".

    `rules` are (regex over a parameter's path `a/b/kernel`, partition spec per dimension) pairs, first
    match wins; parameters no rule matches shard their largest dimension divisible by the fsdp size.
    """

    data: int = -1  # -1: every device not used by fsdp
    fsdp: int = 1
    rules: tuple[tuple[str, tuple[str | None, ...]], ...] = ()
    distributed: bool = False  # call jax.distributed.initialize() (multi-host TPU pods, multi-node GPU)

    def __post_init__(self):
        _check(self.fsdp >= 1, "mesh.fsdp", "must be >= 1")
        _check(self.data == -1 or self.data >= 1, "mesh.data", "must be -1 or >= 1")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    save_total_limit: int = 2
    resume: bool = True  # continue from the newest checkpoint in train.output_dir

    def __post_init__(self):
        _check(self.save_total_limit >= 1, "checkpoint.save_total_limit", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    per_device_batch_size: int | None = None  # default: train.per_device_batch_size
    num_examples_to_print: int = 3
    at_end: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the dotted key."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")


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
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is tuple:
        if isinstance(value, (str, int, float)) and args[-1] is Ellipsis:
            value = [value]  # one source where a list is expected
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_hints = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(item_hints) != len(value):
            raise ConfigError(f"{key}: expected {len(item_hints)} items, got {value!r}")
        return tuple(_coerce(v, h, f"{key}[{i}]") for i, (v, h) in enumerate(zip(value, item_hints)))
    if origin in (collections.abc.Mapping, dict) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {hint}")


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            raise ConfigError(f"unknown key {prefix}{name}{_suggest(str(name), fields)}")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def merge_overrides(tree: dict, overrides: Sequence[str]) -> dict:
    """Apply `a.b=value` strings (values parsed as YAML) to a nested dict."""
    tree = {k: dict(v) if isinstance(v, Mapping) else v for k, v in tree.items()}
    for item in overrides:
        path, value = _parse_override(item)
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[path[-1]] = value
    return tree


def from_dict(tree: Mapping[str, Any]) -> Config:
    return _build(Config, tree, "")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """YAML file (optional) + overrides -> validated Config."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    try:
        return from_dict(merge_overrides(tree, overrides))
    except ConfigError as err:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{err}") from None


def to_dict(config: Config) -> dict:
    """Plain nested dict (tuples as lists) for YAML."""
    def plain(x):
        if isinstance(x, (tuple, list)):
            return [plain(v) for v in x]
        if isinstance(x, Mapping):
            return {k: plain(v) for k, v in x.items()}
        return x
    return plain(dataclasses.asdict(config))


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True))
