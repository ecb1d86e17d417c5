"""Load Hugging Face wav2vec2 checkpoints (folders or hub ids) into the Flax model, and save them back.

Reads `model.safetensors` (also sharded) with numpy, or `pytorch_model.bin` (also sharded) without torch
through `torch_bin.load_torch_state_dict`, whose unpickler refuses anything but tensors: a downloaded
pickle must never run code, and accelerator installs have no torch.
Pretraining checkpoints (XLSR-53 is a `Wav2Vec2ForPreTraining`) load whole into `FlaxWav2Vec2ForPreTraining`
(`head="pretraining"`), or lose their quantizer/projection heads and get a fresh CTC head of `vocab_size`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from transformers import Wav2Vec2Config

from xlsr_jax.model.convert import PRETRAINING_PREFIXES, flax_to_pytorch, pytorch_to_flax
from xlsr_jax.model.pretraining import FlaxWav2Vec2ForPreTraining
from xlsr_jax.model.torch_bin import load_torch_state_dict
from xlsr_jax.model.wav2vec2 import FlaxWav2Vec2ForCTC

logger = logging.getLogger(__name__)

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
# Parameters a checkpoint may lack: a new CTC head, and the mask embedding of models saved without masking.
_MAY_BE_MISSING = ("lm_head/", "wav2vec2/masked_spec_embed")
# What can name a Hub repo (huggingface_hub's rule, in short): `name` or `owner/name`.
_HUB_REPO_ID = re.compile(r"([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")


def resolve_model_dir(path_or_hub_id: str | os.PathLike, weights: bool = True) -> Path:
    """A local folder as is; otherwise download the hub repo's config and (with `weights`) its weights (cached)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path}: expected a model folder (config.json + weights), got a file")
    if not _HUB_REPO_ID.fullmatch(str(path_or_hub_id)):  # ./x, /data/m, ~/m, a/b/c: a local path, so say that
        raise FileNotFoundError(f"{path_or_hub_id}: no such model folder (and not a Hub repo id: owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(
            str(path_or_hub_id),
            allow_patterns=["*.json", "*.safetensors", "pytorch_model*.bin"] if weights else ["*.json"],
        ))
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; name the model either way
        raise OSError(f"{path_or_hub_id}: not a local folder and could not be downloaded from the "
                      f"Hugging Face Hub ({type(err).__name__}: {err})") from err


def _read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    state = {}
    for file in files:
        with safe_open(str(file), framework="flax") as f:  # flax handles bf16; numpy cannot
            for key in f.keys():
                state[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
    return state


def _read_torch_bin(files: list[Path]) -> dict[str, np.ndarray]:
    state = {}
    for file in files:
        state.update({k: v.astype(np.float32, copy=False) for k, v in load_torch_state_dict(file).items()})
    return state


def _shard_files(model_dir: Path, index_name: str) -> list[Path]:
    index = json.loads((model_dir / index_name).read_text())
    return [model_dir / name for name in sorted(set(index["weight_map"].values()))]


def read_state_dict(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """The checkpoint's tensors as float32 numpy arrays, keyed by PyTorch names."""
    model_dir = Path(model_dir)
    if (model_dir / SAFETENSORS).exists():
        return _read_safetensors([model_dir / SAFETENSORS])
    if (model_dir / SAFETENSORS_INDEX).exists():
        return _read_safetensors(_shard_files(model_dir, SAFETENSORS_INDEX))
    if (model_dir / TORCH_BIN).exists():
        return _read_torch_bin([model_dir / TORCH_BIN])
    if (model_dir / TORCH_BIN_INDEX).exists():
        return _read_torch_bin(_shard_files(model_dir, TORCH_BIN_INDEX))
    found = sorted(p.name for p in model_dir.iterdir())
    raise FileNotFoundError(f"{model_dir}: no {SAFETENSORS} or {TORCH_BIN} (found: {found})")


def _init_missing(missing: list[str], config: Wav2Vec2Config, target, seed: int) -> dict:
    """Hugging Face's initialisation for the parameters a checkpoint may lack."""
    shapes = {"/".join(p): x.shape for p, x in traverse_util.flatten_dict(dict(target)).items()}
    rng = np.random.default_rng(seed)
    out = {}
    for name in missing:
        shape = shapes[name]
        if name == "lm_head/kernel":
            value = rng.normal(0.0, config.initializer_range, shape)
        elif name == "wav2vec2/masked_spec_embed":
            value = rng.uniform(0.0, 1.0, shape)
        else:  # lm_head/bias
            value = np.zeros(shape)
        out[tuple(name.split("/"))] = value.astype(np.float32)
    return traverse_util.unflatten_dict(out)


HEADS = ("ctc", "pretraining")


def _read_config(model_dir: Path, vocab_size: int | None, overrides: Mapping[str, Any]) -> Wav2Vec2Config:
    config = Wav2Vec2Config.from_pretrained(model_dir)
    if vocab_size is not None:
        config.vocab_size = vocab_size
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"{key!r} is not a Wav2Vec2Config field")
        setattr(config, key, value)
    return config


def _without_mismatched_ctc_head(state: dict, config: Wav2Vec2Config, model_dir: Path) -> dict:
    head_shape = (config.hidden_size, config.vocab_size)
    if "lm_head.weight" in state and state["lm_head.weight"].T.shape != head_shape:
        logger.info("%s: CTC head has %d outputs, vocab_size is %d: initialising a new head",
                    model_dir, state["lm_head.weight"].shape[0], config.vocab_size)
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    return state


def load_pretrained(
    path_or_hub_id: str | os.PathLike,
    vocab_size: int | None = None,
    *,
    head: str = "ctc",
    dtype: Any = jnp.float32,
    options: dict[str, Any] | None = None,
    seed: int = 0,
    **config_overrides: Any,
) -> tuple[FlaxWav2Vec2ForCTC | FlaxWav2Vec2ForPreTraining, dict]:
    """(model, params) from a Hugging Face wav2vec2 folder or hub id.

    head: "ctc" (`FlaxWav2Vec2ForCTC`; a pretraining checkpoint's quantizer and projections are dropped) or
    "pretraining" (`FlaxWav2Vec2ForPreTraining`; the checkpoint must hold the quantizer and projections,
    as XLSR-53's does; a CTC head in it is dropped).
    `options` are the model's execution options (freeze_feature_encoder, remat_policy, scan_layers,
    attention, pos_conv). `vocab_size` (and any `Wav2Vec2Config` field in `config_overrides`, e.g. `pad_token_id`,
    `mask_time_prob`, `layerdrop`) replace the checkpoint's values. A CTC head whose size differs from
    `vocab_size`, or a missing head (pretraining checkpoints), is initialised fresh. Params are float32
    numpy arrays in a nested dict in the model's layout (stacked layers with `scan_layers`), ready to be
    sharded.
    """
    if head not in HEADS:
        raise ValueError(f"head={head!r}: use one of {', '.join(HEADS)}")
    model_dir = resolve_model_dir(path_or_hub_id)
    config = _read_config(model_dir, vocab_size, config_overrides)
    model_class = FlaxWav2Vec2ForCTC if head == "ctc" else FlaxWav2Vec2ForPreTraining
    model = model_class(config, dtype=dtype, **(options or {}))
    target = model.to_hf_layout(model.abstract_params())
    state = read_state_dict(model_dir)
    if head == "ctc":
        state = _without_mismatched_ctc_head(state, config, model_dir)
    params, missing, unexpected = pytorch_to_flax(state, target)
    other_heads = PRETRAINING_PREFIXES if head == "ctc" else ("lm_head.",)
    unexpected = [k for k in unexpected if not k.startswith(other_heads)]
    if unexpected:
        raise ValueError(f"{model_dir}: checkpoint keys the model does not have: {unexpected[:10]}"
                         f"{' …' if len(unexpected) > 10 else ''}")
    fatal = [m for m in missing if not m.startswith(_MAY_BE_MISSING)]
    if fatal:
        hint = " (head='pretraining' needs a Wav2Vec2ForPreTraining checkpoint)" if head == "pretraining" else ""
        raise ValueError(f"{model_dir}: checkpoint lacks {len(fatal)} parameters, e.g. {fatal[:5]}{hint}")
    if missing:
        logger.info("%s: initialising %s", model_dir, ", ".join(missing))
        params = _merge(params, _init_missing(missing, config, target, seed))
    return model, model.from_hf_layout(params)


def _merge(a: dict, b: dict) -> dict:
    flat = traverse_util.flatten_dict(a)
    flat.update(traverse_util.flatten_dict(b))
    return traverse_util.unflatten_dict(flat)


def save_pytorch_weights(
    params: Mapping[str, Any],
    config: Wav2Vec2Config,
    out_dir: str | os.PathLike,
    weight_norm_style: str = "parametrizations",
) -> Path:
    """Write `config.json` and `model.safetensors` that transformers' `Wav2Vec2ForCTC` loads, or its
    `Wav2Vec2ForPreTraining` when `params` are `FlaxWav2Vec2ForPreTraining`'s (they hold a quantizer)."""
    from safetensors.numpy import save_file

    config = copy.deepcopy(config)  # the caller's (often the model's own) config stays as it was
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = flax_to_pytorch(jax.device_get(params), weight_norm_style)
    if not (config.mask_time_prob > 0 or config.mask_feature_prob > 0):
        state.pop("wav2vec2.masked_spec_embed", None)  # the torch model would not have it
    config.architectures = ["Wav2Vec2ForPreTraining" if "quantizer" in params else "Wav2Vec2ForCTC"]
    config.save_pretrained(out_dir)
    save_file(state, str(out_dir / SAFETENSORS), metadata={"format": "pt"})
    return out_dir
