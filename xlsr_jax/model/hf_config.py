"""The Hugging Face `Wav2Vec2Config` a run trains: the pretrained checkpoint's (or `model.architecture`'s)
fields with this run's regularisation, vocabulary size and pad id on top. Shared by the trainer (which
builds the model) and by `infer/` (which rebuilds it for runs older than model_config.json)."""

from __future__ import annotations

from typing import Any

from transformers import Wav2Vec2Config

from xlsr_jax.config import ModelConfig
from xlsr_jax.model.pretrained import resolve_model_dir
from xlsr_jax.text import Vocab


def model_overrides(config: ModelConfig, vocab: Vocab) -> dict[str, Any]:
    """`Wav2Vec2Config` fields this run sets on top of the checkpoint's (or architecture's) own."""
    return {**config.regularisation(), "vocab_size": len(vocab), "pad_token_id": vocab.pad_id,
            "ctc_zero_infinity": True}


def model_config(config: ModelConfig, vocab: Vocab) -> Wav2Vec2Config:
    """The `Wav2Vec2Config` of `config` for `vocab` (reads the pretrained folder's config.json)."""
    if config.pretrained:
        base = Wav2Vec2Config.from_pretrained(resolve_model_dir(config.pretrained))
    else:
        base = Wav2Vec2Config(**config.architecture)
    for key, value in model_overrides(config, vocab).items():
        setattr(base, key, value)
    return base
