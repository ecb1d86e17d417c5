"""Weight mapping (convert.py) and checkpoint loading/saving (pretrained.py) against transformers' PyTorch models."""

from __future__ import annotations

import copy
import pickle

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import save_file
from transformers import Wav2Vec2ForCTC, Wav2Vec2ForPreTraining, Wav2Vec2Model

from _models import padded_batch, tiny_config
from xlsr_jax.model import FlaxWav2Vec2ForCTC, flax_to_pytorch, pytorch_to_flax
from xlsr_jax.model.pretrained import load_pretrained, read_state_dict, save_pytorch_weights
from xlsr_jax.model.wav2vec2 import frame_mask_from_attention_mask

POS_CONV = "wav2vec2.encoder.pos_conv_embed.conv."


def _torch_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _flat(params) -> dict[tuple[str, ...], np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(params)).items()}


def _assert_params_equal(a, b):
    flat_a, flat_b = _flat(a), _flat(b)
    assert sorted(flat_a) == sorted(flat_b)
    for path in flat_a:
        np.testing.assert_array_equal(flat_a[path], flat_b[path], err_msg="/".join(path))


def _write_folder(folder, config, state: dict[str, np.ndarray]):
    """A checkpoint folder: config.json + model.safetensors holding `state`."""
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


# ---------------------------------------------------------------- shared checkpoint, model and logits

@pytest.fixture(scope="module")
def ctc_checkpoint(tmp_path_factory):
    """(torch Wav2Vec2ForCTC, its save_pretrained folder, its state dict), tiny XLSR-style config."""
    torch.manual_seed(0)
    reference = Wav2Vec2ForCTC(tiny_config("stable")).eval()
    folder = tmp_path_factory.mktemp("ctc")
    reference.save_pretrained(folder)
    return reference, folder, _torch_state(reference)


@pytest.fixture(scope="module")
def batch():
    return padded_batch([4000, 2500, 1234], 4000)


@pytest.fixture(scope="module")
def loaded(ctc_checkpoint, batch):
    """(model, params, flax logits on `batch`, frame mask) of load_pretrained(ctc folder)."""
    _, folder, _ = ctc_checkpoint
    model, params = load_pretrained(folder)
    x, mask = batch
    logits = np.asarray(jax.jit(model.apply, static_argnames="deterministic")(
        {"params": params}, x, attention_mask=mask, deterministic=True))
    frames = np.asarray(frame_mask_from_attention_mask(model.config, mask, logits.shape[1]))
    return model, params, logits, frames


# ---------------------------------------------------------------- convert.py

@pytest.mark.parametrize("kind", ["stable", "group"])
def test_torch_flax_torch_round_trip_is_bit_exact(kind):
    torch.manual_seed(1)
    config = tiny_config(kind)
    state = _torch_state(Wav2Vec2ForCTC(config))
    assert any(k.endswith("parametrizations.weight.original0") for k in state)
    params, missing, unexpected = pytorch_to_flax(state, FlaxWav2Vec2ForCTC(config).abstract_params())
    assert missing == [] and unexpected == []
    back = flax_to_pytorch(params)
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        assert back[key].dtype == np.float32 and back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_flax_to_pytorch_rejects_unknown_weight_norm_style(loaded):
    with pytest.raises(ValueError, match="weight_norm_style='old'"):
        flax_to_pytorch(loaded[1], weight_norm_style="old")


# ---------------------------------------------------------------- load_pretrained

def test_load_pretrained_gives_torch_logits(ctc_checkpoint, batch, loaded, report):
    reference, _, _ = ctc_checkpoint
    _, _, logits, frames = loaded
    x, mask = batch
    with torch.no_grad():
        expected = reference(torch.from_numpy(x), attention_mask=torch.from_numpy(mask)).logits.numpy()
    assert logits.shape == expected.shape and frames.sum() < frames.size  # a padded batch
    error = float(np.abs(logits - expected)[frames].max())
    report("load_pretrained vs torch, max|dlogits| (valid frames)", error)
    assert error <= 1e-4


def test_legacy_weight_norm_names_load_to_same_params(ctc_checkpoint, loaded, tmp_path):
    reference, _, state = ctc_checkpoint
    legacy = dict(state)
    legacy[POS_CONV + "weight_g"] = legacy.pop(POS_CONV + "parametrizations.weight.original0")
    legacy[POS_CONV + "weight_v"] = legacy.pop(POS_CONV + "parametrizations.weight.original1")
    _, params = load_pretrained(_write_folder(tmp_path / "legacy", reference.config, legacy))
    _assert_params_equal(params, loaded[1])


def test_pretraining_checkpoint_gets_fresh_ctc_head(tmp_path):
    torch.manual_seed(2)
    config = tiny_config("stable")
    pretraining = Wav2Vec2ForPreTraining(config)
    pretraining.save_pretrained(tmp_path)
    state = _torch_state(pretraining)
    assert any(k.startswith(("quantizer.", "project_hid.", "project_q.")) for k in state)
    model, params = load_pretrained(tmp_path, vocab_size=7)
    assert model.config.vocab_size == 7
    kernel, bias = np.asarray(params["lm_head"]["kernel"]), np.asarray(params["lm_head"]["bias"])
    assert kernel.shape == (config.hidden_size, 7) and bias.shape == (7,)
    np.testing.assert_array_equal(bias, 0.0)
    # 224 draws of N(0, 0.02): the sample std is within 20 % (>4 standard errors) of 0.02.
    assert abs(kernel.std() / config.initializer_range - 1) < 0.2
    assert abs(kernel.mean()) < 4 * config.initializer_range / np.sqrt(kernel.size)
    encoder = {k: v for k, v in state.items() if k.startswith("wav2vec2.")}
    written = flax_to_pytorch(params)
    assert sorted(written) == sorted([*encoder, "lm_head.weight", "lm_head.bias"])
    for key, value in encoder.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)


def test_ctc_checkpoint_with_other_vocab_gets_new_head(ctc_checkpoint, loaded):
    _, folder, _ = ctc_checkpoint
    model, params = load_pretrained(folder, vocab_size=9)
    assert model.config.vocab_size == 9
    assert params["lm_head"]["kernel"].shape == (model.config.hidden_size, 9)
    np.testing.assert_array_equal(params["lm_head"]["bias"], 0.0)
    assert np.asarray(params["lm_head"]["kernel"]).std() > 0
    _assert_params_equal(params["wav2vec2"], loaded[1]["wav2vec2"])
    _, same = load_pretrained(folder, vocab_size=12)  # the checkpoint's own size: its head is kept
    _assert_params_equal(same, loaded[1])


def test_bare_wav2vec2_model_checkpoint_gets_prefixed(ctc_checkpoint, loaded, tmp_path):
    reference, _, _ = ctc_checkpoint
    bare = Wav2Vec2Model(reference.config)
    bare.load_state_dict({k[len("wav2vec2."):]: v for k, v in reference.state_dict().items()
                          if k.startswith("wav2vec2.")})
    bare.save_pretrained(tmp_path)
    assert not any(k.startswith("wav2vec2.") for k in read_state_dict(tmp_path))
    model, params = load_pretrained(tmp_path, vocab_size=5)
    assert params["lm_head"]["kernel"].shape == (model.config.hidden_size, 5)
    _assert_params_equal(params["wav2vec2"], loaded[1]["wav2vec2"])


def test_pytorch_model_bin_loads_same_params(ctc_checkpoint, loaded, tmp_path):
    reference, _, _ = ctc_checkpoint
    reference.config.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    _, params = load_pretrained(tmp_path)
    _assert_params_equal(params, loaded[1])


_UNPICKLED: list[str] = []


def _record_unpickling(tag: str) -> str:
    _UNPICKLED.append(tag)
    return tag


class _Payload:
    """Unpickling this object calls `_record_unpickling`: stands for code hidden in a downloaded pickle."""

    def __reduce__(self):
        return _record_unpickling, ("payload ran",)


def test_pytorch_model_bin_is_read_weights_only(ctc_checkpoint, tmp_path):
    reference, _, _ = ctc_checkpoint
    reference.config.save_pretrained(tmp_path)
    state = dict(reference.state_dict())
    state["extra"] = _Payload()
    torch.save(state, tmp_path / "pytorch_model.bin")
    # The payload is live: a plain pickle load runs it.
    torch.load(tmp_path / "pytorch_model.bin", weights_only=False)
    assert _UNPICKLED == ["payload ran"]
    _UNPICKLED.clear()
    with pytest.raises(pickle.UnpicklingError, match=r"refused to unpickle the global .*_record_unpickling"):
        load_pretrained(tmp_path)
    assert _UNPICKLED == []


# ---------------------------------------------------------------- errors name the thing

def test_folder_without_weights_names_the_folder(ctc_checkpoint, tmp_path):
    ctc_checkpoint[0].config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_pretrained(tmp_path)


def test_wrong_shape_names_the_key(ctc_checkpoint, tmp_path):
    reference, _, state = ctc_checkpoint
    key = "wav2vec2.encoder.layers.1.attention.q_proj.weight"
    bad = {**state, key: np.zeros((32, 31), np.float32)}
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_pretrained(_write_folder(tmp_path / "bad", reference.config, bad))


def test_unexpected_key_names_it(ctc_checkpoint, tmp_path):
    reference, _, state = ctc_checkpoint
    key = "wav2vec2.encoder.adapter.weight"
    bad = {**state, key: np.zeros((3,), np.float32)}
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_pretrained(_write_folder(tmp_path / "extra", reference.config, bad))


@pytest.mark.parametrize("name", ["local", "hub-like"])
def test_missing_path_offline_names_it(name, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    path = str(tmp_path / "no-such-model") if name == "local" else "xlsr-jax-test-nobody/no-such-model"
    with pytest.raises(OSError, match=path):
        load_pretrained(path)


# ---------------------------------------------------------------- save_pytorch_weights

@pytest.mark.parametrize("style", ["parametrizations", "legacy"])
def test_saved_weights_load_in_transformers_with_flax_logits(style, loaded, batch, tmp_path, report):
    model, params, logits, frames = loaded
    save_pytorch_weights(params, copy.deepcopy(model.config), tmp_path, weight_norm_style=style)
    keys = set(read_state_dict(tmp_path))
    assert (POS_CONV + "weight_g" in keys) == (style == "legacy")
    reloaded, info = Wav2Vec2ForCTC.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    x, mask = batch
    with torch.no_grad():
        expected = reloaded.eval()(torch.from_numpy(x), attention_mask=torch.from_numpy(mask)).logits.numpy()
    error = float(np.abs(logits - expected)[frames].max())
    report(f"save_pytorch_weights ({style}) -> transformers, max|dlogits|", error)
    assert error <= 1e-4
