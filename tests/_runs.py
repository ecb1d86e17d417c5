"""A tiny training run on the tiny Common Voice folder, shared by the loop, evaluate, export and CLI
tests (training even the tiny model costs a minute on 2 cores)."""

from __future__ import annotations

from xlsr_jax.config import Config, from_dict

# XLSR-style (layer-norm convs, pre-LN transformer): the recipe's model, trained with padding masks. 80
# samples per frame (XLSR: 320): a 1.4 s clip gives 279 frames. At 20 per frame (1119 frames) a step cost
# 0.57 s per clip on one CPU device, most of it drawing attention-dropout bits over 1119 x 1119 scores; at
# 80, 0.06 s (2026-12-07, this 2-core machine).
TINY_ARCH = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                 conv_dim=[16, 16, 16], conv_kernel=[10, 4, 4], conv_stride=[5, 4, 4],
                 num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_extract_norm="layer",
                 do_stable_layer_norm=True, conv_bias=True)


# The tiny corpus' clips fall into both of two buckets (0.6-0.9 s and 1.0-1.4 s).
TWO_BUCKETS = {"num_buckets": 2, "eval_num_buckets": 2}


def tiny_run_config(cv_dir, output_dir, mesh: dict | None = None, data: dict | None = None, **train) -> Config:
    """A tiny run of `cv_dir` into `output_dir`/run. The learning rate stays constant after its warm-up:
    the compiled train step then does not depend on train.max_steps, so runs of any length on the same
    data, mesh and model load it from the test run's compilation cache (tests/conftest.py) instead of
    compiling it again (a 4-step run after a 6-step one: 76 -> 22 s on 2 busy cores). One train and one eval
    bucket: half the shapes to compile of two buckets each, which only the tests of bucketing need (`data`
    replaces data.* keys, e.g. `TWO_BUCKETS`)."""
    return from_dict({
        "model": {"pretrained": None, "architecture": TINY_ARCH},
        "data": {"train": [f"cv:{cv_dir}:train+dev"], "eval": [f"cv:{cv_dir}:dev+test"], "language": "tr",
                 "num_buckets": 1, "eval_num_buckets": 1, "cache_dir": str(output_dir / "cache"),
                 "num_workers": 1, **(data or {})},
        "optim": {"learning_rate": 1e-3, "warmup_steps": 2, "schedule": "constant"},
        "train": {"output_dir": str(output_dir / "run"), "per_device_batch_size": 1, "logging_steps": 1,
                  **train},
        "mesh": mesh or {},
    })


# Small heads: 2 groups of 8 codes (perplexity at most 16), 20 distractors per masked frame.
QUANTIZER = dict(codevector_dim=16, proj_codevector_dim=16, num_codevector_groups=2, num_codevectors_per_group=8)


def tiny_pretrain_config(cv_dir, output_dir, *, pretrain: dict | None = None, **train):
    """A tiny pretraining run of `cv_dir`'s audio into `output_dir`/run: 8 steps, evaluated and saved every 4."""
    return from_dict({
        "model": {"pretrained": None, "architecture": TINY_ARCH, "freeze_feature_encoder": False, "layerdrop": 0.0,
                  "hidden_dropout": 0.0, "attention_dropout": 0.0},
        "data": {"train": [f"cv:{cv_dir}:train+dev"], "eval": [f"cv:{cv_dir}:dev+test"], "num_buckets": 1,
                 "eval_num_buckets": 1, "cache_dir": str(output_dir / "cache"), "num_workers": 1},
        "pretrain": {"num_negatives": 20, "mask_time_length": 10, "collapse_perplexity": 0.0, **QUANTIZER,
                     **(pretrain or {})},
        "optim": {"learning_rate": 2e-3, "warmup_steps": 2, "schedule": "constant"},
        "checkpoint": {"best_metric": "eval/loss"},
        "train": {"output_dir": str(output_dir / "run"), "per_device_batch_size": 1, "logging_steps": 1,
                  "max_steps": 8, "eval_steps": 4, "save_steps": 4, **train},
    })
