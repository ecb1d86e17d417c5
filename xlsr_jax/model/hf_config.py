"""The Hugging Face `Wav2Vec2Config` a run trains: the pretrained checkpoint's (or `model.architecture`'s)
fields with this run's regularisation, vocabulary size and pad id on top. Shared by the trainer (which
builds the model) and by `infer/` (which rebuilds it for runs older than model_config.json)."""

from __future__ import annotations

from typing import Any

from transformers import Wav2Vec2Config

from xlsr_jax.config import ModelConfig, PretrainConfig
from xlsr_jax.model.pretrained import resolve_model_dir
from xlsr_jax.text import Vocab


def model_overrides(config: ModelConfig, vocab: Vocab) -> dict[str, Any]:
    """`Wav2Vec2Config` fields this run sets on top of the checkpoint's (or architecture's) own."""
    return {**config.regularisation(), "vocab_size": len(vocab), "pad_token_id": vocab.pad_id,
            "ctc_zero_infinity": True}


def model_config(config: ModelConfig, vocab: Vocab) -> Wav2Vec2Config:
    """The `Wav2Vec2Config` of `config` for `vocab` (reads the pretrained folder's config.json)."""
    if config.pretrained:
        base = Wav2Vec2Config.from_pretrained(resolve_model_dir(config.pretrained, weights=False))
    else:
        base = Wav2Vec2Config(**config.architecture)
    for key, value in model_overrides(config, vocab).items():
        setattr(base, key, value)
    return base


# Wav2Vec2Config fields of wav2vec 2.0's pretraining task, set from the `pretrain:` section.
PRETRAINING_FIELDS = ("num_negatives", "mask_time_prob", "mask_time_length", "mask_time_min_masks",
                      "diversity_loss_weight", "contrastive_logits_temperature", "feat_quantizer_dropout")
# Quantizer shapes: from the `pretrain:` section for a model built from scratch, else the checkpoint's.
QUANTIZER_FIELDS = ("codevector_dim", "proj_codevector_dim", "num_codevector_groups", "num_codevectors_per_group")


def pretraining_overrides(config: ModelConfig, pretrain: PretrainConfig) -> dict[str, Any]:
    """`Wav2Vec2Config` fields a pretraining run sets on top of the checkpoint's (or architecture's) own:
    the model's regularisation, then the pretraining task's masking, distractors and loss weights."""
    return {**config.regularisation(), **{name: getattr(pretrain, name) for name in PRETRAINING_FIELDS}}


def pretraining_model_config(config: ModelConfig, pretrain: PretrainConfig) -> Wav2Vec2Config:
    """The `Wav2Vec2Config` `xlsr-jax pretrain` trains (reads the pretrained folder's config.json)."""
    if config.pretrained:
        base = Wav2Vec2Config.from_pretrained(resolve_model_dir(config.pretrained, weights=False))
    else:
        base = Wav2Vec2Config(**{**{name: getattr(pretrain, name) for name in QUANTIZER_FIELDS}, **config.architecture})
    for key, value in pretraining_overrides(config, pretrain).items():
        setattr(base, key, value)
    return base


def feature_extractor(config: Wav2Vec2Config, sampling_rate: int):
    """transformers' `Wav2Vec2FeatureExtractor` (preprocessor_config.json) of a model folder: zero-mean,
    unit-variance clips; layer-norm (XLSR / large) models are trained with padding masks, group-norm base
    models are not."""
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=sampling_rate, padding_value=0.0, do_normalize=True,
                                    return_attention_mask=config.feat_extract_norm == "layer")
