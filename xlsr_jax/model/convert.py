"""Hugging Face PyTorch state dict <-> Flax parameters, both directions.

The Flax tree mirrors the PyTorch module names, so a parameter's PyTorch name is its Flax path joined
with dots, with Flax leaf names renamed (`kernel` -> `weight` transposed, `scale` -> `weight`). The
positional conv's weight norm is kept in PyTorch layout; both spellings of it are read
(`weight_g`/`weight_v` from older checkpoints, `parametrizations.weight.original0/1` from torch's newer
weight-norm), and either can be written. The pretraining heads map the same way: `quantizer.codevectors`
is a plain parameter in the same layout on both sides, `quantizer.weight_proj`, `project_hid` and
`project_q` are Linear layers.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from xlsr_jax.model.layout import unstack_layers

# Checkpoint keys that belong to pretraining heads (Wav2Vec2ForPreTraining) and have no place in a CTC model.
PRETRAINING_PREFIXES = ("quantizer.", "project_hid.", "project_q.")

_WEIGHT_NORM_LEGACY = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}


def _torch_name(path: tuple[str, ...], weight_norm_style: str = "legacy") -> str:
    *modules, leaf = path
    if leaf in ("kernel", "scale"):
        leaf = "weight"
    elif leaf in _WEIGHT_NORM_LEGACY and weight_norm_style == "parametrizations":
        leaf = _WEIGHT_NORM_LEGACY[leaf]
    return ".".join([*modules, leaf])


def _to_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return value
    if value.ndim == 2:  # Dense [in, out] -> Linear [out, in]
        return value.T
    if value.ndim == 3:  # Conv [kernel, in, out] -> Conv1d [out, in, kernel]
        return value.transpose(2, 1, 0)
    raise ValueError(f"{'/'.join(path)}: unexpected kernel rank {value.ndim}")


def _to_flax_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return value
    return value.T if value.ndim == 2 else value.transpose(2, 1, 0)


def canonical_torch_key(key: str) -> str:
    """Normalise a checkpoint key: newer weight-norm names -> `weight_g`/`weight_v`, bare
    `Wav2Vec2Model` keys -> `wav2vec2.` prefixed."""
    for legacy, modern in _WEIGHT_NORM_LEGACY.items():
        if key.endswith(modern):
            key = key[: -len(modern)] + legacy
    if not key.startswith(("wav2vec2.", "lm_head.")) and not key.startswith(PRETRAINING_PREFIXES):
        key = "wav2vec2." + key
    return key


def flax_to_pytorch(params: Mapping[str, Any], weight_norm_style: str = "parametrizations") -> dict[str, np.ndarray]:
    """Flax params (per-layer or stacked) -> Hugging Face `Wav2Vec2ForCTC` (or `Wav2Vec2ForPreTraining`)
    state dict (float32 numpy, PyTorch layouts).

    weight_norm_style: "parametrizations" (what transformers 5 `save_pretrained` writes) or "legacy"
    (`weight_g`/`weight_v`, as in the Hub's original checkpoints).
    """
    if weight_norm_style not in ("parametrizations", "legacy"):
        raise ValueError(f"weight_norm_style={weight_norm_style!r}: use 'parametrizations' or 'legacy'")
    flat = traverse_util.flatten_dict(dict(unstack_layers(params)))
    return {
        _torch_name(path, weight_norm_style): np.ascontiguousarray(
            _to_torch_layout(path, np.asarray(value, dtype=np.float32))
        )
        for path, value in flat.items()
    }


def pytorch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    target: Mapping[str, Any],
) -> tuple[dict, list[str], list[str]]:
    """Checkpoint -> Flax params shaped like `target` (a params tree or its `jax.eval_shape`).

    Returns (params with only the keys found, missing Flax paths as `a/b/c`, unexpected checkpoint keys).
    Shape mismatches raise, naming the key.
    """
    by_name = {_torch_name(path): path for path in traverse_util.flatten_dict(dict(target))}
    shapes = {path: tuple(x.shape) for path, x in traverse_util.flatten_dict(dict(target)).items()}
    found: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for key, value in state_dict.items():
        name = canonical_torch_key(key)
        path = by_name.get(name)
        if path is None:
            unexpected.append(key)
            continue
        value = _to_flax_layout(path, np.asarray(value, dtype=np.float32))
        if tuple(value.shape) != shapes[path]:
            raise ValueError(f"checkpoint key {key!r}: shape {tuple(value.shape)} does not fit the model's "
                             f"{'/'.join(path)} {shapes[path]}")
        found[path] = value
    missing = ["/".join(path) for path in shapes if path not in found]
    return traverse_util.unflatten_dict(found), missing, unexpected
