"""Configs and inputs shared by the model tests."""

from __future__ import annotations

import numpy as np
from transformers import Wav2Vec2Config

_TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
    conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=12,
)
_NO_NOISE = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                 final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, mask_feature_prob=0.0)


def tiny_config(kind: str = "stable", **overrides) -> Wav2Vec2Config:
    """kind: "stable" (XLSR-style: layer-norm convs, pre-LN) or "group" (base-style: group norm, post-LN)."""
    arch = dict(do_stable_layer_norm=True, feat_extract_norm="layer", conv_bias=True)
    if kind == "group":
        arch = dict(do_stable_layer_norm=False, feat_extract_norm="group", conv_bias=False)
    return Wav2Vec2Config(**{**_TINY, **arch, **overrides})


def quiet_config(kind: str = "stable", **overrides) -> Wav2Vec2Config:
    """A tiny config with every dropout, layerdrop and mask off unless overridden."""
    return tiny_config(kind, **{**_NO_NOISE, **overrides})


def xlsr53_config(**overrides) -> Wav2Vec2Config:
    """The architecture of facebook/wav2vec2-large-xlsr-53 (317 M parameters)."""
    return Wav2Vec2Config(**{
        "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
        "conv_dim": (512,) * 7, "conv_kernel": (10, 3, 3, 3, 3, 2, 2), "conv_stride": (5, 2, 2, 2, 2, 2, 2),
        "conv_bias": True, "feat_extract_norm": "layer", "do_stable_layer_norm": True,
        "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16, "vocab_size": 40,
        "mask_time_prob": 0.05, **overrides,
    })


def padded_batch(lengths, total: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded waveforms float32 [batch, total] (zeros on padding) and attention mask int32."""
    rng = np.random.default_rng(seed)
    x = np.zeros((len(lengths), total), np.float32)
    mask = np.zeros((len(lengths), total), np.int32)
    for i, n in enumerate(lengths):
        x[i, :n] = rng.standard_normal(n)
        mask[i, :n] = 1
    return x, mask


def perturbed(params, scale: float = 0.3, seed: int = 1):
    """`params` + N(0, scale^2) noise on every entry: weights far from Hugging Face's near-zero init, so
    attention, the positional conv and every layer visibly shape the logits."""
    import jax

    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


# (id(model), deterministic, mutable) -> (model, its jitted forward): holding the model keeps its id its own
_JITTED: dict = {}


def forward(model, params, x, mask, deterministic: bool, seed: int = 0, mutable: bool = False):
    """`model.apply` on a padded batch with dropout key `seed`, jitted once per model object and mode: run
    op by op, each of a test's forwards of the tiny model cost ~1 s of dispatch (16 noise tests: 106 -> 62 s
    on one core, 2026-12-07). Logits `[batch, frames, vocab]` (and the `intermediates` with `mutable`)."""
    import jax

    key = (id(model), deterministic, mutable)
    if key not in _JITTED:
        _JITTED[key] = model, jax.jit(lambda p, x, m, rng: model.apply(
            {"params": p}, x, attention_mask=m, deterministic=deterministic, rngs={"dropout": rng},
            mutable=["intermediates"] if mutable else False))
    return _JITTED[key][1](params, x, mask, jax.random.key(seed))


# The wav2vec2 families people fine-tune today, as their Hub config.json files give them (all XLSR-53's
# conv stack, stable layer norm and positional conv): {name: (hidden, layers, intermediate)}. Attention heads
# are 16 in each. MMS-300m and MMS-1b share XLS-R 300M's and 1B's shapes.
FAMILIES = {
    "xls-r-300m / mms-300m": (1024, 24, 4096),
    "xls-r-1b / mms-1b": (1280, 48, 5120),
    "xls-r-2b": (1920, 48, 7680),
}


def family_config(name: str, layers: int | None = None, **overrides) -> Wav2Vec2Config:
    """FAMILIES[name]'s architecture (XLSR-53's otherwise), with `layers` encoder layers if given."""
    hidden, depth, intermediate = FAMILIES[name]
    return xlsr53_config(hidden_size=hidden, num_hidden_layers=layers or depth, intermediate_size=intermediate,
                         **overrides)
