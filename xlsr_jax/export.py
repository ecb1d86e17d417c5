"""A Hugging Face PyTorch model folder from Flax params: what `Wav2Vec2ForCTC.from_pretrained` and
`pipeline("automatic-speech-recognition", model=DIR)` load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor

from xlsr_jax.model import save_pytorch_weights
from xlsr_jax.text import PAD, UNK, Vocab


def export_hf(params: Any, config: Wav2Vec2Config, vocab: Vocab, out_dir: str | Path) -> Path:
    """Write config.json, model.safetensors, vocab.json, tokenizer_config.json, special_tokens_map.json
    and preprocessor_config.json into `out_dir`."""
    out_dir = Path(out_dir)
    save_pytorch_weights(params, config, out_dir)
    vocab.save_tokenizer(out_dir)
    (out_dir / "special_tokens_map.json").write_text(json.dumps({"unk_token": UNK, "pad_token": PAD}, indent=2))
    # Layer-norm (XLSR / large) models are trained with padding masks; group-norm base models are not.
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
        return_attention_mask=config.feat_extract_norm == "layer",
    ).save_pretrained(out_dir)
    return out_dir
