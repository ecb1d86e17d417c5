"""The search space of `xlsr-jax sweep`: a YAML file naming the search method, the metric, and a
distribution for each dotted config key. Grid and random trials are a pure function of (space, seed,
trial number), so a resumed sweep gives every trial the parameters it had before.

```yaml
method: random            # grid | random | tpe (optuna)
metric: eval/cer          # eval/wer (default) | eval/cer | eval/loss
mode: min                 # min (default) | max
prune: true               # end bad trials at evaluation steps (default false)
seed: 0
params:
  optim.learning_rate: {log_uniform: [1.0e-4, 3.0e-3]}
  model.mask_time_prob: {uniform: [0.0, 0.1]}
  model.mask_time_length: {int: [5, 10]}
  model.layerdrop: {choice: [0.0, 0.05]}
```
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from xlsr_jax.config import Config, ConfigError, from_dict, to_dict
from xlsr_jax.errors import UserError

METHODS = ("grid", "random", "tpe")
DISTRIBUTIONS = ("choice", "uniform", "log_uniform", "int")
METRICS = ("eval/wer", "eval/cer", "eval/loss")  # what an evaluation during training writes
_TOP_KEYS = ("method", "metric", "mode", "prune", "seed", "params")


class SpaceError(ValueError, UserError):
    """A search-space file that cannot be used; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched config key: `choice` values, or the bounds [lo, hi] of the other kinds."""

    key: str
    kind: str  # one of DISTRIBUTIONS
    values: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Space:
    method: str
    metric: str
    mode: str
    prune: bool
    seed: int
    params: tuple[Param, ...]
    source: str  # the file, for messages
    tree: Mapping[str, Any]  # as read: what sweep.json keeps
    sha256: str  # of `tree`: a rerun of a sweep must search the same space

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.params)

    def trial_params(self, number: int) -> dict[str, Any]:
        """The parameters of trial `number` (0-based) for grid and random; tpe asks optuna instead."""
        if self.method == "grid":
            if not 0 <= number < self.grid_size():
                raise IndexError(f"trial {number}: the grid has {self.grid_size()} points")
            combo = next(itertools.islice(itertools.product(*(p.values for p in self.params)), number, None))
            return {p.key: v for p, v in zip(self.params, combo)}
        if self.method == "random":
            # One generator per trial, seeded by (seed, number): no trial's draw depends on another's.
            rng = np.random.default_rng([self.seed, number])
            return {p.key: _draw(p, rng) for p in self.params}
        raise ValueError(f"method {self.method}: parameters come from optuna")


def _draw(param: Param, rng: np.random.Generator) -> Any:
    if param.kind == "choice":
        return param.values[int(rng.integers(len(param.values)))]
    lo, hi = param.values
    if param.kind == "int":
        return int(rng.integers(lo, hi + 1))
    if param.kind == "log_uniform":
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return float(rng.uniform(lo, hi))


def load_space(path: str | Path) -> Space:
    """Read and check a search-space file; every error names the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"search space file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise SpaceError(f"{path}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(tree, dict):
        raise SpaceError(f"{path}: expected a mapping with method, metric and params")
    for key in tree:
        if key not in _TOP_KEYS:
            close = difflib.get_close_matches(str(key), _TOP_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(_TOP_KEYS)}"
            raise SpaceError(f"{path}: unknown key {key}{hint}")
    method, metric = tree.get("method"), tree.get("metric", "eval/wer")
    mode, prune, seed = tree.get("mode", "min"), tree.get("prune", False), tree.get("seed", 0)
    _require(method in METHODS, path, "method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    _require(metric in METRICS, path, "metric", f"must be one of {', '.join(METRICS)}, got {metric!r}")
    _require(mode in ("min", "max"), path, "mode", f"must be min or max, got {mode!r}")
    _require(isinstance(prune, bool), path, "prune", f"must be true or false, got {prune!r}")
    _require(isinstance(seed, int) and not isinstance(seed, bool), path, "seed", f"must be an integer, got {seed!r}")
    params = tree.get("params")
    _require(isinstance(params, dict) and bool(params), path, "params",
             "must map dotted config keys to {choice: [...]}, {uniform: [lo, hi]}, {log_uniform: [lo, hi]} "
             "or {int: [lo, hi]}")
    parsed = tuple(_parse_param(path, str(key), _floats(spec), method) for key, spec in params.items())
    sha = hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()
    return Space(method, metric, mode, prune, seed, parsed, str(path), tree, sha)


def _require(ok: bool, path: Path, key: str, message: str) -> None:
    if not ok:
        raise SpaceError(f"{path}: {key} {message}")


_EXPONENT_FLOAT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


def _floats(x: Any) -> Any:
    """`x` with YAML 1.2 floats that PyYAML (YAML 1.1) reads as strings, such as `3e-4`, as floats."""
    if isinstance(x, str) and _EXPONENT_FLOAT.fullmatch(x):
        return float(x)
    if isinstance(x, list):
        return [_floats(v) for v in x]
    if isinstance(x, dict):
        return {k: _floats(v) for k, v in x.items()}
    return x


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _parse_param(path: Path, key: str, spec: Any, method: str) -> Param:
    where = f"params.{key}"
    _require(isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS, path, where,
             f"must be one of {{choice: [...]}}, {{uniform: [lo, hi]}}, {{log_uniform: [lo, hi]}}, "
             f"{{int: [lo, hi]}}; got {spec!r}")
    (kind, values), = spec.items()
    _require(method != "grid" or kind == "choice", path, where,
             f"method grid takes {{choice: [...]}} only, got {kind} (use method random or tpe to sample it)")
    _require(isinstance(values, list) and bool(values), path, where, f"{kind} needs a non-empty list, got {values!r}")
    if kind == "choice":
        # optuna's categorical values are scalars; grid and random take lists too (data.train sources).
        _require(method != "tpe" or all(v is None or isinstance(v, (bool, int, float, str)) for v in values),
                 path, where, "method tpe takes numbers, strings, booleans or null as choices")
        return Param(key, kind, tuple(values))
    _require(len(values) == 2 and all(map(_number, values)), path, where,
             f"{kind} needs [lo, hi] (two numbers), got {values!r}")
    lo, hi = values
    if kind == "int":
        _require(all(float(v).is_integer() for v in values) and lo <= hi, path, where,
                 f"int needs integer bounds lo <= hi, got {values!r}")
        return Param(key, kind, (int(lo), int(hi)))
    _require(lo < hi, path, where, f"{kind} needs lo < hi, got {values!r}")
    _require(kind != "log_uniform" or lo > 0, path, where, f"log_uniform needs lo > 0, got {values!r}")
    return Param(key, kind, (float(lo), float(hi)))


def with_params(config: Config, params: Mapping[str, Any], where: str = "") -> Config:
    """`config` with each dotted key of `params` set; a ConfigError names the key (and `where` it came from)."""
    tree = to_dict(config)
    try:
        for key, value in params.items():
            node = tree
            *sections, name = key.split(".")
            for part in sections:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{key}: {part} is not a section", [key])
            node[name] = value
        return from_dict(tree)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}" if where else str(err), err.keys) from None


def check_params(config: Config, space: Space, trials: int) -> None:
    """Fail before any trial runs if a searched key or value does not make a valid config: every
    trial's parameters for grid and random, and every choice and both bounds of each key (the values
    tpe may draw from) for all methods."""
    first = {p.key: p.values[0] for p in space.params}
    for param in space.params:
        for value in param.values:
            with_params(config, {**first, param.key: value}, f"{space.source}: params.{param.key}={value!r}")
    if space.method != "tpe":
        for number in range(trials):
            with_params(config, space.trial_params(number), f"{space.source}: trial {number}")
