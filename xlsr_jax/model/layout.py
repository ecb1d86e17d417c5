"""The encoder layers' two parameter layouts, and the conversion between them.

per layer (Hugging Face's names, what checkpoints on the Hub, exports and `pytorch_to_flax` use):
    wav2vec2/encoder/layers/{0, 1, ...}/attention/q_proj/kernel   [hidden, hidden]
stacked (what a model with `scan_layers=True` trains with, so the optimizer sees one array per weight
whatever the depth, and a run's checkpoints hold):
    wav2vec2/encoder/layers/layer/attention/q_proj/kernel         [layers, hidden, hidden]

Works on numpy arrays (host parameters), jax arrays, and `jax.ShapeDtypeStruct`s (abstract trees).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

STACKED = "layer"  # the scanned body's name: layers/layer/... holds every layer's weights


def _layers(params: Any) -> Any:
    return params.get("wav2vec2", {}).get("encoder", {}).get("layers")


def is_stacked(params: Any) -> bool:
    layers = _layers(params)
    return layers is not None and STACKED in layers


def _with_layers(params: Any, layers: Any) -> Any:
    encoder = {**params["wav2vec2"]["encoder"], "layers": layers}
    return {**params, "wav2vec2": {**params["wav2vec2"], "encoder": encoder}}


def _stack(*leaves):
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype)
    if isinstance(first, np.ndarray):
        return np.stack(leaves)
    return jnp.stack(leaves)


def _unstack(leaf, i: int):
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    return leaf[i]


def stack_layers(params: Any) -> Any:
    """Per-layer -> stacked. A tree without encoder layers, or already stacked, is returned as is."""
    layers = _layers(params)
    if not layers or STACKED in layers:
        return params
    ordered = [layers[str(i)] for i in range(len(layers))]
    return _with_layers(params, {STACKED: jax.tree.map(_stack, *ordered)})


def unstack_layers(params: Any) -> Any:
    """Stacked -> per-layer (Hugging Face's names). A per-layer tree is returned as is."""
    if not is_stacked(params):
        return params
    stacked = _layers(params)[STACKED]
    count = jax.tree.leaves(stacked)[0].shape[0]
    return _with_layers(params, {str(i): jax.tree.map(lambda x, i=i: _unstack(x, i), stacked)
                                 for i in range(count)})


def to_layout(params: Any, stacked: bool) -> Any:
    return stack_layers(params) if stacked else unstack_layers(params)
