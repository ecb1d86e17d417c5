"""torch_bin.py reads what `torch.save` writes, without torch, and refuses pickles that hold code."""

from __future__ import annotations

import json
import os
import pickle
import sys
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from transformers import Wav2Vec2ForCTC, Wav2Vec2ForPreTraining

from _models import padded_batch, tiny_config
from xlsr_jax.model import flax_to_pytorch, load_pretrained, read_state_dict
from xlsr_jax.model.torch_bin import UnsafeCheckpointError, load_torch_state_dict
from xlsr_jax.model.wav2vec2 import frame_mask_from_attention_mask

FORMATS = ["zip", "legacy"]
# torch dtypes numpy lacks, read back as their ml_dtypes twins (compared through same-size integers).
_BITS = {torch.bfloat16: torch.int16, torch.uint16: torch.int16, torch.float8_e4m3fn: torch.int8}


def _save(obj, path, fmt: str):
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return path


def _flat(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def _assert_bit_exact(ours: dict[str, np.ndarray], reference: dict[str, torch.Tensor]):
    assert list(ours) == list(reference)
    for key, tensor in reference.items():
        tensor = tensor.detach().contiguous()
        expected = tensor.view(_BITS[tensor.dtype]) if tensor.dtype in _BITS else tensor
        got = ours[key]
        assert got.shape == tuple(tensor.shape) and got.flags.c_contiguous, key
        assert got.dtype.itemsize == tensor.element_size(), key
        np.testing.assert_array_equal(got.view(expected.numpy().dtype), expected.numpy(), err_msg=key)
        assert got.tobytes() == expected.numpy().tobytes(), key


def _mixed_state() -> dict:
    """Every case a reader can get wrong: dtypes, views, shared storage, empty, scalar, nesting."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5, 6, generator=gen)
    return {
        "fp32": torch.randn(3, 4, generator=gen),
        "fp16": torch.randn(7, generator=gen).half(),
        "bf16": torch.randn(2, 3, generator=gen).bfloat16(),
        "int64": torch.tensor([-(2**40), 0, 7, 2**62]),
        "bool": torch.tensor([True, False, True]),
        "transposed": torch.randn(4, 3, generator=gen).t(),  # non-contiguous
        "rows": base[1:3],  # offset 6 into a storage that "cols" shares
        "cols": base[:, 2:5],
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "nested": {"inner": {"weight": torch.arange(6, dtype=torch.int32).reshape(2, 3)}},
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_dict_reads_bit_exact_as_torch_load(fmt, tmp_path):
    state = _mixed_state()
    assert not state["transposed"].is_contiguous() and state["rows"].storage_offset() == 6
    assert state["rows"].untyped_storage().data_ptr() == state["cols"].untyped_storage().data_ptr()
    path = _save(state, tmp_path / "state.bin", fmt)
    if fmt == "zip":
        assert zipfile.is_zipfile(path)
    ours = load_torch_state_dict(path)
    _assert_bit_exact(ours, _flat(torch.load(path, weights_only=True)))
    assert ours["bf16"].dtype == ml_dtypes.bfloat16 and ours["bool"].dtype == np.bool_
    assert ours["rows"].base is None and ours["cols"].base is None  # copies, not views of one buffer
    ours["rows"][0, 0] = 1e6
    assert ours["cols"][1, 0] != 1e6


def test_dtypes_of_newer_torch_read_bit_exact(tmp_path):
    # torch writes uint16 and float8 as an UntypedStorage plus a dtype, through _rebuild_tensor_v3.
    state = {"uint16": torch.tensor([1, 40000, 65535]).to(torch.uint16),
             "fp8": torch.tensor([0.5, -3.0, 448.0]).to(torch.float8_e4m3fn),
             "complex": torch.tensor([1 + 2j, -3.5j], dtype=torch.complex64)}
    path = _save(state, tmp_path / "new.bin", "zip")
    assert b"_rebuild_tensor_v3" in zipfile.ZipFile(path).read("new/data.pkl")
    ours = load_torch_state_dict(path)
    _assert_bit_exact(ours, torch.load(path, weights_only=True))
    assert ours["fp8"].dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(ours["fp8"].astype(np.float32), [0.5, -3.0, 448.0])


def test_big_endian_archive_reads_same_values(tmp_path):
    """A zip whose `byteorder` says big and whose storages are byte-swapped, as a big-endian host writes."""
    state = {"fp32": torch.randn(3, 2), "bf16": torch.randn(4).bfloat16(), "int64": torch.tensor([1, -2]),
             "complex": torch.tensor([1 + 2j], dtype=torch.complex64), "bool": torch.tensor([True, False])}
    little = _save(state, tmp_path / "little.bin", "zip")
    units = [4, 2, 8, 4, 1]  # the swap unit of each storage; complex swaps each float
    big = tmp_path / "big.bin"
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "little/byteorder":
                data = b"big"
            elif "/data/" in info.filename:
                tensor = list(state.values())[int(info.filename.rsplit("/", 1)[1])]
                assert data == tensor.contiguous().view(torch.uint8).numpy().tobytes()  # key i is tensor i
                unit = units[int(info.filename.rsplit("/", 1)[1])]
                data = np.frombuffer(data, f"<u{unit}").astype(f">u{unit}").tobytes()
            dst.writestr(info, data)
    _assert_bit_exact(load_torch_state_dict(big), state)


# ---------------------------------------------------------------- a pickle that would run code

class _SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _OpenForWriting:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("payload, global_name", [(_SystemCall, f"{os.system.__module__}.system"),
                                                  (_OpenForWriting, f"{open.__module__}.open")])
def test_pickle_that_runs_code_is_refused_before_it_runs(fmt, payload, global_name, tmp_path):
    marker = tmp_path / "touched"
    path = _save({"weight": torch.ones(2), "extra": payload(marker)}, tmp_path / "evil.bin", fmt)
    torch.load(path, weights_only=False)  # the payload is live: a plain load creates the file
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafeCheckpointError, match=rf"evil\.bin: refused .*global {global_name}:"):
        load_torch_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_not_a_state_dict_names_the_file(fmt, tmp_path):
    path = _save({"weights": [torch.ones(2)]}, tmp_path / "list.bin", fmt)
    with pytest.raises(ValueError, match=r"list\.bin: 'weights' is a list, not a tensor"):
        load_torch_state_dict(path)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(pickle.UnpicklingError, match=r"garbage\.bin: cannot read the pickle"):
        load_torch_state_dict(garbage)


# ---------------------------------------------------------------- pretrained.py reads .bin without torch

@pytest.fixture
def no_torch(monkeypatch):
    """`import torch` raises ImportError inside the test (call it after all torch work is done)."""
    return lambda: monkeypatch.setitem(sys.modules, "torch", None)


def _write_bin_folder(folder, config, state, shards: int = 1):
    """config.json + pytorch_model.bin, or `shards` files and pytorch_model.bin.index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    keys = list(state)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(keys)), shards)):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({keys[j]: state[keys[j]] for j in part}, folder / name)
        weight_map.update({keys[j]: name for j in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def ctc_torch():
    torch.manual_seed(0)
    return Wav2Vec2ForCTC(tiny_config("stable")).eval()


def test_load_pretrained_from_bin_without_torch_gives_torch_logits(ctc_torch, tmp_path, no_torch, report):
    folder = _write_bin_folder(tmp_path / "ctc", ctc_torch.config, ctc_torch.state_dict())
    x, mask = padded_batch([4000, 2500, 1234], 4000)
    with torch.no_grad():
        expected = ctc_torch(torch.from_numpy(x), attention_mask=torch.from_numpy(mask)).logits.numpy()
    state = {k: v.numpy().copy() for k, v in ctc_torch.state_dict().items()}
    no_torch()
    with pytest.raises(ImportError):
        import torch as _  # noqa: F401 - proves the loading below runs without torch
    read = read_state_dict(folder)
    assert sorted(read) == sorted(state)
    for key, value in state.items():
        np.testing.assert_array_equal(read[key], value, err_msg=key)
    model, params = load_pretrained(folder)
    logits = np.asarray(jax.jit(model.apply, static_argnames="deterministic")(
        {"params": params}, x, attention_mask=mask, deterministic=True))
    frames = np.asarray(frame_mask_from_attention_mask(model.config, mask, logits.shape[1]))
    assert logits.shape == expected.shape and frames.sum() < frames.size  # a padded batch
    error = float(np.abs(logits - expected)[frames].max())
    report("pytorch_model.bin without torch vs torch, max|dlogits|", error)
    assert error <= 1e-5


def test_sharded_and_bf16_bins_read_without_torch(ctc_torch, tmp_path, no_torch):
    state = ctc_torch.state_dict()
    sharded = _write_bin_folder(tmp_path / "sharded", ctc_torch.config, state, shards=3)
    half = _write_bin_folder(tmp_path / "bf16", ctc_torch.config, {k: v.bfloat16() for k, v in state.items()})
    expected = {k: v.numpy().copy() for k, v in state.items()}
    expected_bf16 = {k: v.bfloat16().float().numpy() for k, v in state.items()}
    no_torch()
    assert len(list(sharded.glob("pytorch_model-*.bin"))) == 3
    for folder, reference in ((sharded, expected), (half, expected_bf16)):
        read = read_state_dict(folder)
        assert sorted(read) == sorted(reference)
        for key, value in reference.items():
            assert read[key].dtype == np.float32, key
            np.testing.assert_array_equal(read[key], value, err_msg=f"{folder.name}: {key}")


def test_pretraining_bin_gets_fresh_ctc_head_without_torch(tmp_path, no_torch):
    torch.manual_seed(2)
    config = tiny_config("stable")
    pretraining = Wav2Vec2ForPreTraining(config)
    folder = _write_bin_folder(tmp_path / "pretraining", config, pretraining.state_dict())
    state = {k: v.detach().numpy().copy() for k, v in pretraining.state_dict().items()}
    assert any(k.startswith(("quantizer.", "project_q.")) for k in state)
    no_torch()
    model, params = load_pretrained(folder, vocab_size=7)
    assert params["lm_head"]["kernel"].shape == (config.hidden_size, 7)
    np.testing.assert_array_equal(params["lm_head"]["bias"], 0.0)
    assert np.asarray(params["lm_head"]["kernel"]).std() > 0
    written = flax_to_pytorch(params)
    encoder = {k: v for k, v in state.items() if k.startswith("wav2vec2.")}
    assert sorted(written) == sorted([*encoder, "lm_head.weight", "lm_head.bias"])
    for key, value in encoder.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)
