#!/usr/bin/env python3
"""Time the jitted train step for several model settings side by side, in one process.

    python scripts/bench_train_step.py --arch xlsr53 --batch 16 --seconds 5 \
        --variants fp32 bf16 bf16+remat bf16+remat+frozen

Prints, per variant: compile time, median step time, audio seconds per second, peak device memory
(where the backend reports it) and the ratio to the first variant. Random weights, a random batch
and random labels: this measures speed, not learning.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from transformers import Wav2Vec2Config

from xlsr_jax.config import OptimConfig
from xlsr_jax.model import FlaxWav2Vec2ForCTC
from xlsr_jax.train.optim import build_optimizer
from xlsr_jax.train.state import create_state
from xlsr_jax.train.step import train_step

ARCHS = {
    "xlsr53": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                   conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                   conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True,
                   num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16),
    "demo": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                 conv_dim=(32, 64, 128, 128, 128, 128, 128, 128), conv_kernel=(10, 3, 3, 3, 3, 2, 2, 2),
                 conv_stride=(5, 2, 2, 2, 2, 2, 2, 2), conv_bias=True, feat_extract_norm="layer",
                 do_stable_layer_norm=True, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=16),
}
# XLSR fine-tuning week's regularisation
REGULARISATION = dict(attention_dropout=0.1, hidden_dropout=0.1, feat_proj_dropout=0.0, layerdrop=0.1,
                      mask_time_prob=0.05)


def _variant(name: str) -> dict:
    parts = set(name.split("+"))
    unknown = parts - {"fp32", "bf16", "remat", "frozen"}
    if unknown:
        raise SystemExit(f"unknown variant part(s) {sorted(unknown)} in {name!r}: use fp32, bf16, remat, frozen")
    return dict(dtype=jnp.bfloat16 if "bf16" in parts else jnp.float32, gradient_checkpointing="remat" in parts,
                freeze_feature_encoder="frozen" in parts)


def _batch(batch: int, samples: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    label_len = max(samples // 16000 * 15, 8)
    return {
        "input_values": rng.standard_normal((batch, samples)).astype(np.float32),
        "attention_mask": np.ones((batch, samples), np.int32),
        "labels": rng.integers(0, vocab - 1, (batch, label_len)).astype(np.int32),
        "example_mask": np.ones((batch,), np.float32),
    }


def _peak_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def bench(config: Wav2Vec2Config, variant: str, batch: dict, repeats: int) -> dict:
    model = FlaxWav2Vec2ForCTC(config, **_variant(variant))
    params = model.init_params(jax.random.key(0))
    tx, schedule = build_optimizer(OptimConfig(learning_rate=1e-4, warmup_steps=10), 1000, params,
                                   _variant(variant)["freeze_feature_encoder"])
    state = jax.jit(lambda p: create_state(p, tx, 0))(params)
    del params
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                                     blank_id=config.vocab_size - 1, reduction="mean"), donate_argnums=0)
    batch = jax.device_put(batch)
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return {"compile_s": compile_s, "step_s": statistics.median(times), "loss": float(metrics["loss"]),
            "peak_gib": (_peak_bytes() or 0) / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="demo")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0, help="audio seconds per example")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args()
    config = Wav2Vec2Config(**ARCHS[args.arch], **REGULARISATION, vocab_size=40, pad_token_id=39)
    batch = _batch(args.batch, int(args.seconds * 16000), config.vocab_size)
    audio = args.batch * args.seconds
    print(f"{jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}; arch {args.arch}, "
          f"batch {args.batch} x {args.seconds:g} s")
    first = None
    for variant in args.variants:
        result = bench(config, variant, batch, args.repeats)
        first = first or result["step_s"]
        print(f"{variant:24s} compile {result['compile_s']:6.1f} s  step {result['step_s'] * 1000:8.1f} ms  "
              f"{audio / result['step_s']:8.0f} audio-s/s  peak {result['peak_gib']:6.2f} GiB  "
              f"x{result['step_s'] / first:.2f} of {args.variants[0]}  loss {result['loss']:.2f}", flush=True)


if __name__ == "__main__":
    main()
