"""torch_bin.py reads what `torch.save` writes, without torch, and refuses pickles that hold code."""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from transformers import Wav2Vec2ForCTC, Wav2Vec2ForPreTraining

from _models import padded_batch, tiny_config
from xlsr_jax.errors import UserError
from xlsr_jax.model import flax_to_pytorch, load_pretrained, read_state_dict
from xlsr_jax.model.torch_bin import UnreadableCheckpointError, UnsafeCheckpointError, load_torch_state_dict
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
    with pytest.raises(UnreadableCheckpointError, match=r"garbage\.bin: cannot read the pickle"):
        load_torch_state_dict(garbage)

def test_tied_and_expanded_tensors_still_read_bit_exact(tmp_path):
    """What genuine files alias (a tensor named twice, stride-0 buffers) stays within the size bounds."""
    embed = torch.randn(50, 8)
    state = {"embed.weight": embed, "lm_head.weight": embed, "decoder.embed.weight": embed,
             "position_ids": torch.arange(64).expand(1, -1), "mask": torch.ones(1, 8).expand(6, 8)}
    for fmt in FORMATS:
        path = _save(state, tmp_path / f"aliased-{fmt}.bin", fmt)
        _assert_bit_exact(load_torch_state_dict(path), torch.load(path, weights_only=True))


# ---------------------------------------------------------------- hostile files: refused fast, named

def _zip_bytes(entries: dict) -> bytes:
    """A zip made by hand, so an entry can be a raw deflate stream claiming any size: name -> bytes
    (stored) or (deflate stream, crc32, inflated size)."""
    body, directory = b"", b""
    for name, entry in entries.items():
        data, crc, size, method = ((entry, zlib.crc32(entry), len(entry), 0) if isinstance(entry, bytes)
                                   else (*entry, 8))
        fields = struct.pack("<HHHHHIIIH", 20, 0, method, 0, 0, crc, len(data), size, len(name))
        directory += (b"PK\x01\x02" + struct.pack("<H", 20) + fields
                      + struct.pack("<HHHHII", 0, 0, 0, 0, 0, len(body)) + name.encode())
        body += b"PK\x03\x04" + fields + struct.pack("<H", 0) + name.encode() + data
    end = struct.pack("<HHHHIIH", 0, 0, len(entries), len(entries), len(directory), len(body), 0)
    return body + directory + b"PK\x05\x06" + end


def _torch_zip(path, pickled: bytes, storages: dict | None = None, byteorder: bytes = b"little"):
    """A zip laid out as torch.save writes it, around any pickle and storage entries."""
    entries = {"archive/data.pkl": pickled, "archive/byteorder": byteorder}
    entries.update({f"archive/data/{key}": entry for key, entry in (storages or {}).items()})
    path.write_bytes(_zip_bytes(entries))
    return path


class _StorageStub:
    def __init__(self, numel: int):
        self.numel = numel


class _TensorStub:
    """Pickles as torch's float32 tensor over a `_StorageStub` of any size, without allocating it."""

    def __init__(self, numel: int):
        self.storage = _StorageStub(numel)

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, (self.storage.numel,), (1,), False,
                                                 collections.OrderedDict())


class _StubPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageStub):
            return "storage", torch.FloatStorage, "0", "cpu", obj.numel
        return None


def _stub_pickle(numel: int) -> bytes:
    out = io.BytesIO()
    _StubPickler(out, protocol=2).dump({"w": _TensorStub(numel)})
    return out.getvalue()


_GIB = 1 << 30
_ZEROS_CRC = 1533330096  # zlib.crc32(bytes(1 << 30)): the bomb stays a valid zip


def _inflating_entry() -> tuple[bytes, int, int]:
    """1 MiB of deflate (each 1 MiB block flushed, so identical) that inflates to 1 GiB of zeros."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(bytes(1 << 20)) + deflate.flush(zlib.Z_FULL_FLUSH)
    return block * 1024 + deflate.flush(), _ZEROS_CRC, _GIB


def _stride0_bomb(path):
    return _save({"w": torch.zeros(1).expand(_GIB)}, path, "zip")  # torch writes it: 4 bytes, asks 4 GiB


def _inflation_bomb(path):
    return _torch_zip(path, _stub_pickle(4), {"0": _inflating_entry()})  # 16 bytes declared


def _inflation_bomb_declared(path):
    return _torch_zip(path, _stub_pickle(_GIB // 4), {"0": _inflating_entry()})  # the pickle agrees


def _billion_laughs(path):
    level: dict = {}
    for _ in range(30):
        level = {"a": level, "b": level}  # pickled once, referenced twice: 2**30 names
    pickled = pickle.dumps(level, protocol=2)
    assert len(pickled) < 1000
    return _torch_zip(path, pickled)


def _deep_dicts(path):
    """{"a": {"a": ... {}}} 100000 deep, 4 bytes a level: key 'a' memoised, then dicts and SETITEMs."""
    depth = 100_000
    pickled = b"\x80\x02X\x01\x00\x00\x00aq\x000" + b"}h\x00" * depth + b"}" + b"s" * depth + b"."
    return _torch_zip(path, pickled)


def _memo_index(path):
    return _torch_zip(path, b"\x80\x02}r\x00\x00\x00\x10.")  # {} memoised at 2**28: the C memo is a list


def _bytearray8(path):
    return _torch_zip(path, b"\x80\x05\x96" + struct.pack("<Q", 1 << 40) + b".")  # allocates the length


def _legacy_length(path):
    path.write_bytes(b"\x80\x04\x8d" + struct.pack("<Q", 1 << 40) + b"x" * 64)  # BINUNICODE8 of 2**40
    return path


# One subprocess loads each bomb in turn, measuring from a reset peak RSS: a clean reading, and a guard
# that breaks cannot take the test's own memory.
_PROBE = """
import importlib.util, json, resource, signal, sys, time
spec = importlib.util.spec_from_file_location("torch_bin", sys.argv[1])  # not xlsr_jax.model: no jax
torch_bin = sys.modules["torch_bin"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(torch_bin)
limit = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize() + (1 << 30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # a safety net, not the measure


def timeout(*_):  # a safety net too
    raise TimeoutError("over 20 s")


signal.signal(signal.SIGALRM, timeout)
results = []
for path in sys.argv[2:]:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS counts from here
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    signal.alarm(20)
    try:
        tensors, error = len(torch_bin.load_torch_state_dict(path)), None
    except Exception as err:
        tensors, error = None, err
    signal.alarm(0)
    results.append({"seconds": time.perf_counter() - start, "tensors": tensors,
                    "extra_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
                    "error": type(error).__name__ if error else None, "message": str(error)})
print(json.dumps(results))
"""

# bomb -> (how to make it, the error's class, what its message says after the file's path)
_BOMBS = {
    "stride0": (_stride0_bomb, "UnsafeCheckpointError", r"would take 4294967296 bytes \(the largest, 'w'"),
    "inflation": (_inflation_bomb, "UnsafeCheckpointError",
                  r"entry 'archive/data/0' would inflate to 1073741824 bytes, over the 16 it may hold"),
    "inflation-declared": (_inflation_bomb_declared, "UnsafeCheckpointError",
                           r"storages hold 1073741824 bytes, more than the \d+ bytes of the whole file"),
    "billion-laughs": (_billion_laughs, "UnsafeCheckpointError", r"billion laughs"),
    "deep-dicts": (_deep_dicts, "UnsafeCheckpointError", r"dicts nested over 32 deep"),
    "bytearray8": (_bytearray8, "UnsafeCheckpointError", r"refused a pickle buffer opcode"),
    "legacy-length": (_legacy_length, "UnreadableCheckpointError",
                      r"cannot read the pickle \(UnpicklingError: pickle data was truncated\)"),
    "memo-index": (_memo_index, None, None),  # an empty dict: read as one
}


@pytest.fixture(scope="module")
def bomb_probes(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    folder = tmp_path_factory.mktemp("bombs")
    paths = {name: make(folder / f"{name}.bin") for name, (make, _, _) in _BOMBS.items()}
    torch_bin = Path(__file__).parents[1] / "xlsr_jax" / "model" / "torch_bin.py"
    run = subprocess.run([sys.executable, "-c", _PROBE, str(torch_bin), *map(str, paths.values())],
                         capture_output=True, text=True, timeout=300, cwd=torch_bin.parents[2])
    assert run.returncode == 0, run.stderr
    return {name: (paths[name], probe) for name, probe in zip(paths, json.loads(run.stdout))}


@pytest.mark.slow  # a subprocess (bomb_probes)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the peak memory")
@pytest.mark.parametrize("bomb", list(_BOMBS))
def test_bomb_is_refused_in_little_time_and_memory(bomb, bomb_probes):
    _, error, message = _BOMBS[bomb]
    path, probe = bomb_probes[bomb]
    assert path.stat().st_size < 2 << 20
    assert probe["error"] == error, probe
    if error is None:
        assert probe["tensors"] == 0, probe
    else:
        assert re.search(rf"^{re.escape(str(path))}: .*{message}", probe["message"]), probe
    assert probe["seconds"] < 2, probe
    assert probe["extra_mib"] < 200, probe


def _honest_state() -> dict:
    """float32 (read through `_rebuild_tensor_v2`) and uint16/float8 (through `_rebuild_tensor_v3`)."""
    return {"fp32": torch.tensor([1.5, -2.25, 3.0, 1e-3]),
            "uint16": torch.tensor([1, 40000, 65535]).to(torch.uint16),
            "fp8": torch.tensor([0.5, -3.0, 448.0]).to(torch.float8_e4m3fn)}


# BUILD aimed at what every later load uses: slot state (setattr) on a rebuild function, which makes
# float32 storages read as float16; dict state on the uint16 stand-in, which makes it int16. Either file
# alone reads as an empty state dict, so without the guard nothing would show.
_POISONS = {
    "rebuild-defaults": b"\x80\x02ctorch._utils\n_rebuild_tensor\nN}X\x0c\x00\x00\x00__defaults__"
                        b"ctorch\nfloat16\n\x85s\x86b0}.",
    "dtype-stand-in": b"\x80\x02ctorch\nuint16\n}X\x05\x00\x00\x00dtypectorch\nint16\nsb0}.",
}


@pytest.mark.parametrize("poison", sorted(_POISONS))
def test_build_is_refused_and_cannot_poison_later_loads(poison, tmp_path):
    path = _torch_zip(tmp_path / "poison.bin", _POISONS[poison])
    with pytest.raises(UnsafeCheckpointError, match=r"poison\.bin: refused to set the attributes of a "
                                                     r"\w+ \(pickle BUILD\)") as refused:
        load_torch_state_dict(path)
    assert isinstance(refused.value, UserError)  # the CLI prints it, exit 2
    honest = _save(_honest_state(), tmp_path / "honest.bin", "zip")
    ours, reference = load_torch_state_dict(honest), torch.load(honest, weights_only=True)
    _assert_bit_exact(ours, reference)
    assert [ours[k].dtype for k in ours] == [np.float32, np.uint16, ml_dtypes.float8_e4m3fn]
    np.testing.assert_array_equal(ours["uint16"], [1, 40000, 65535])


def _genuine(tmp_path, fmt: str) -> bytes:
    state = {"weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "bias": torch.ones(3)}
    return _save(state, tmp_path / f"genuine-{fmt}.bin", fmt).read_bytes()


def _flip(data: bytes, find: bytes) -> bytes:
    at = data.index(find)
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def _rezip_with_byteorder(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    return _zip_bytes({**entries, "genuine-zip/byteorder": b"\xff\xfebig"})


# damage -> (the format damaged, what it does to the file, what the error says after the file's path)
_DAMAGES = {
    "zip cut short": (
        "zip", lambda data: data[: len(data) * 2 // 3],
        r"cannot read it as a PyTorch checkpoint \(BadZipFile: File is not a zip file\)"),
    "zip storage bytes changed": (
        "zip", lambda data: _flip(data, np.arange(12, dtype=np.float32)[5:].tobytes()),
        r"\(BadZipFile: Bad CRC-32 for file 'genuine-zip/data/0'\)"),
    "byteorder not text": ("zip", _rezip_with_byteorder, r"unknown byte order b'\\xff\\xfebig'"),
    "legacy cut in its storages": (  # which storage comes last varies
        "legacy", lambda data: data[:-5],
        r"cut short: storage '\d+' needs (20 more bytes, 15|56 more bytes, 51) are left"),
    "legacy cut inside 'OrderedDict'": (
        "legacy", lambda data: data[: data.index(b"OrderedDict") + 2],
        r"cannot read the pickle \(UnpicklingError: pickle data was truncated\)"),
}


@pytest.mark.parametrize("damage", list(_DAMAGES))
def test_corrupt_file_is_a_user_error_naming_it(damage, tmp_path):
    fmt, damaged, message = _DAMAGES[damage]
    path = tmp_path / "damaged.bin"
    path.write_bytes(damaged(_genuine(tmp_path, fmt)))
    with pytest.raises(UnreadableCheckpointError, match=rf"^{re.escape(str(path))}: .*{message}"):
        load_torch_state_dict(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_any_damage_reads_or_fails_as_a_user_error_naming_the_file(fmt, tmp_path):
    """Every third byte of a small file flipped, and the file cut at every tenth: no other exception."""
    data = _genuine(tmp_path, fmt)
    path = tmp_path / "damaged.bin"
    failures = collections.Counter()
    variants = [data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:] for at in range(0, len(data), 3)]
    for damaged in variants + [data[:at] for at in range(0, len(data), 10)]:
        path.write_bytes(damaged)
        try:
            load_torch_state_dict(path)
        except UserError as err:
            assert str(err).startswith(f"{path}: "), err
            failures[type(err).__name__] += 1
    assert failures["UnreadableCheckpointError"] > len(data) // 10  # the damage was seen, not just survived


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
