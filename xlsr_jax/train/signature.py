"""A run's signature: the facts a resumed run must share with the run that wrote its checkpoints.

One flat, JSON-able dict with sorted keys, cheap and deterministic to compute (hashes, not lists of
examples), written to the run directory as `run_signature.json` when training starts. A resume compares
the `RESUME_KEYS` subset and stops, naming each change, instead of restoring weights onto another
vocabulary or model shape, or silently continuing on another batch order. Changing the step budget,
the cadence of evaluation, logging or saving, or the learning rate on resume is legitimate: those
only count in the hash of the whole config, which is recorded but not compared.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping

import numpy as np
from transformers import Wav2Vec2Config

from xlsr_jax.config import Config, to_dict

# Wav2Vec2Config fields that decide parameter names or shapes (or what a parameter means).
MODEL_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                "conv_dim", "conv_kernel", "conv_stride", "conv_bias", "feat_extract_norm", "do_stable_layer_norm",
                "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "vocab_size", "add_adapter",
                "adapter_kernel_size", "adapter_stride", "num_adapter_layers", "output_hidden_size")

# What a checkpoint's weights and its place in the batch order depend on.
RESUME_KEYS = ("objective", "vocab.size", "vocab.sha256", *(f"model.{f}" for f in MODEL_FIELDS), "model.scan_layers",
               "train.global_batch_sizes", "train.utterances", "train.plan_sha256", "train.seed")
# What another run's parameters must match to start from them (train.init_from).
PARAMETER_KEYS = tuple(k for k in RESUME_KEYS if k.startswith(("vocab.", "model.")))


def _sha256(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))  # framed: ("ab", "c") != ("a", "bc")
        digest.update(part)
    return digest.hexdigest()


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")


def _plain(value: Any) -> Any:
    """A JSON value of a config field (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


def plan_sha256(plan: Iterable[tuple[int, np.ndarray]], lengths: np.ndarray) -> str:
    """Hash of an epoch's batch plan `[(bucket, example indices [batch])]` and of the examples' lengths
    in samples ``[n]`` (what the plan was cut from: a clip that decodes to another length shows)."""
    parts = [np.asarray(lengths, np.int64).tobytes()]
    for bucket, indices in plan:
        parts += [int(bucket).to_bytes(8, "little"), np.asarray(indices, np.int64).tobytes()]
    return _sha256(*parts)


def loader_plan_sha256(loader) -> str:
    """`plan_sha256` of a loader's first epoch; a streaming loader has no plan up front and gives its own
    digest (sources, seed, buckets, batch sizes and the probe's lengths: data/stream.py)."""
    if getattr(loader, "streaming", False):
        return loader.plan_sha256()
    return plan_sha256(loader.epoch_batches(0), loader.dataset.lengths)


def run_signature(config: Config, data, model_config: Wav2Vec2Config, objective: str = "ctc") -> dict[str, Any]:
    """The signature of a run about to train `model_config` on `data` (train/setup.py's `Data`) for
    `objective` (noted unless "ctc", which runs written before pretraining existed had)."""
    train = data.train
    tokens = list(data.vocab.tokens) if data.vocab is not None else []
    signature = {
        **({"objective": objective} if objective != "ctc" else {}),
        "vocab.size": len(tokens),
        "vocab.sha256": _sha256(_json_bytes(tokens)),
        "model.scan_layers": config.model.scan_layers,
        "train.global_batch_sizes": [int(b) for b in train.batch_sizes],
        "train.utterances": len(train.dataset),
        "train.plan_sha256": loader_plan_sha256(train),
        "train.seed": config.train.seed,
        "train.precision": config.train.precision,
        "config.sha256": _sha256(_json_bytes(to_dict(config))),
    }
    for field in MODEL_FIELDS:
        signature[f"model.{field}"] = _plain(getattr(model_config, field, None))
    return dict(sorted(signature.items()))


def differences(old: Mapping[str, Any], new: Mapping[str, Any], keys: Iterable[str] | None = None) -> list[str]:
    """One line per key whose value differs, `"train.global_batch_sizes: [16, 16] -> [32, 32]"`, over
    `keys` (default: every key of either); a key one side lacks shows as `(none)`."""
    keys = sorted(set(old) | set(new)) if keys is None else keys
    return [f"{key}: {_show(old.get(key, '(none)'))} -> {_show(new.get(key, '(none)'))}"
            for key in keys if old.get(key) != new.get(key)]


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64:  # a sha256: its first 12 digits tell two apart
        return value[:12]
    return json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
