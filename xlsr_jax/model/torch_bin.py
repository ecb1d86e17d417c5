"""Read PyTorch `pytorch_model.bin` checkpoints into numpy arrays, without torch.

Why: the Hub's `facebook/wav2vec2-large-xlsr-53` ships only `pytorch_model.bin`, and the `cuda`/`tpu`
installs of xlsr-jax do not install torch. A `.bin` is a pickle, and unpickling a downloaded file may run
any code it names, so the unpickler here resolves only the handful of globals a state dict needs (tensor
rebuild functions, storage types, dtypes, `OrderedDict`) to local stand-ins, and refuses every other
global before anything runs. Nothing from torch is ever imported or called.

Both formats `torch.save` writes are read:
- zip (torch >= 1.6): `<archive>/data.pkl`, one `<archive>/data/<key>` entry per storage and
  `<archive>/byteorder`;
- legacy (`_use_new_zipfile_serialization=False`): magic number, protocol, sys info and the object as
  consecutive pickles, then the list of storage keys, then each storage as an int64 element count and
  its raw bytes.
Not read: torch < 1.0's storage views and torch < 0.1.10's tar files (re-save those with a recent torch).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch's dtype names (as pickled: `torch.<name>`) -> numpy dtypes; bfloat16 and float8 via ml_dtypes.
_DTYPES = {
    "float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8,
    "uint64": np.uint64, "uint32": np.uint32, "uint16": np.uint16, "uint8": np.uint8, "bool": np.bool_,
    "complex64": np.complex64, "complex128": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
}
# Typed storage classes (`torch.FloatStorage`, ...) name their element type.
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint's pickle names a global that a state dict never needs; nothing of it was run."""


@dataclass(frozen=True)
class _DType:
    """Stand-in for `torch.<dtype>` (a `_rebuild_tensor_v3` argument)."""
    dtype: np.dtype


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for `torch.FloatStorage` & co (dtype set) or `torch.storage.UntypedStorage` (bytes)."""
    dtype: np.dtype | None


@dataclass(frozen=True)
class _Storage:
    """A storage named by a persistent id: its key in the file and its size in bytes."""
    key: str
    dtype: np.dtype | None
    nbytes: int


@dataclass(frozen=True)
class _TensorRef:
    """A tensor to build once the storages are read: `storage[offset + sum(i * stride)]`, in elements."""
    storage: _Storage
    dtype: np.dtype
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, dtype=None) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor storage is a {type(storage).__name__}, not a storage")
    dtype = dtype.dtype if isinstance(dtype, _DType) else storage.dtype
    if dtype is None:
        raise pickle.UnpicklingError(f"storage {storage.key}: untyped storage and no dtype")
    ints = (storage_offset, *size, *stride)
    if not all(isinstance(i, int) and i >= 0 for i in ints) or len(size) != len(stride):
        raise pickle.UnpicklingError(f"storage {storage.key}: bad view (offset {storage_offset}, "
                                     f"size {size}, stride {stride})")
    return _TensorRef(storage, np.dtype(dtype), storage_offset, tuple(size), tuple(stride))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    if not isinstance(dtype, _DType):
        raise pickle.UnpicklingError(f"tensor dtype is a {type(dtype).__name__}, not a torch dtype")
    return _rebuild_tensor(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    return data  # a Parameter is its tensor; hooks and Python attributes are not weights


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch.storage", "UntypedStorage"): _StorageType(None),
    }
    allowed.update({("torch", name): _DType(np.dtype(t)) for name, t in _DTYPES.items()})
    allowed.update({("torch", name): _StorageType(np.dtype(_DTYPES[dtype]))
                    for name, dtype in _STORAGE_DTYPES.items()})
    return allowed


_ALLOWED = _allowed_globals()


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED` globals; persistent ids ('storage', type, key, location, numel) become
    `_Storage` records, which `on_storage` sees in the order they appear."""

    def __init__(self, file, path: Path, on_storage: Callable[[_Storage], None] | None = None):
        super().__init__(file)
        self._path, self._on_storage = path, on_storage

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._path}: refused to unpickle the global {module}.{name}: a state dict holds only "
                "tensors, and this file names code that would run when loaded. Nothing of it was run."
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        if self._on_storage is None:
            raise pickle.UnpicklingError(f"{self._path}: unexpected persistent id {pid!r}")
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and isinstance(pid[4], int) and pid[4] >= 0):
            raise pickle.UnpicklingError(f"{self._path}: not a tensor storage id: {pid!r}")
        if len(pid) == 6 and pid[5] is not None:  # storage views: torch < 1.0 only
            raise pickle.UnpicklingError(f"{self._path}: storage views (torch < 1.0) are not supported: "
                                         "re-save it with a recent torch")
        dtype = pid[1].dtype
        storage = _Storage(pid[2], dtype, pid[4] * (dtype.itemsize if dtype is not None else 1))
        self._on_storage(storage)
        return storage


def _unpickle(file, path: Path, on_storage: Callable[[_Storage], None] | None = None) -> Any:
    """One pickle from `file` through `_StateDictUnpickler`; any failure names `path`."""
    try:
        return _StateDictUnpickler(file, path, on_storage).load()
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - a corrupt pickle fails in many ways; name the file either way
        raise pickle.UnpicklingError(f"{path}: cannot read the pickle ({type(err).__name__}: {err})") from err


def _tensor_refs(obj: Any, path: Path, prefix: str = "") -> dict[str, _TensorRef]:
    """A (possibly nested) dict of tensors as {dotted name: tensor}, the way state dicts name them."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
    refs = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            refs.update(_tensor_refs(value, path, name + "."))
        elif isinstance(value, _TensorRef) and isinstance(key, str):
            refs[name] = value
        else:
            raise ValueError(f"{path}: {name!r} is a {type(value).__name__}, not a tensor: not a state dict")
    return refs


def _elements(raw: bytes, ref: _TensorRef, swap: bool) -> np.ndarray:
    """The storage's bytes as a 1-d array of `ref.dtype` in native byte order."""
    dtype = ref.dtype
    count = ref.storage.nbytes // dtype.itemsize
    if swap and dtype.itemsize > 1:
        unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize  # complex: swap each half
        words = np.frombuffer(raw, np.dtype(f"u{unit}"), count * dtype.itemsize // unit)
        return words.byteswap().view(dtype)
    return np.frombuffer(raw, dtype, count)


def _build(ref: _TensorRef, elements: np.ndarray, name: str, path: Path) -> np.ndarray:
    """A C-contiguous copy of `elements[offset + sum(index * stride)]`, shaped `ref.size`."""
    if 0 in ref.size:
        return np.zeros(ref.size, ref.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if last >= elements.size:  # a view past its storage would read foreign memory
        raise ValueError(f"{path}: tensor {name!r} reaches element {last} of a storage of {elements.size}")
    strides = tuple(s * ref.dtype.itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(elements[ref.offset:], ref.size, strides, writeable=False)
    return np.array(view, order="C")


def _materialise(obj: Any, read: Callable[[_Storage], bytes], swap: bool,
                 path: Path) -> dict[str, np.ndarray]:
    """Each tensor of `obj` built from its storage; a storage is read once and dropped after its views."""
    refs = _tensor_refs(obj, path)
    by_storage: dict[str, list[str]] = collections.defaultdict(list)
    for name, ref in refs.items():
        by_storage[ref.storage.key].append(name)
    out = {}
    for names in by_storage.values():
        storage = refs[names[0]].storage
        raw = read(storage)
        if len(raw) < storage.nbytes:
            raise ValueError(f"{path}: storage {storage.key} holds {len(raw)} bytes, "
                             f"{storage.nbytes} expected")
        for name in names:
            out[name] = _build(refs[name], _elements(raw, refs[name], swap), name, path)
    return {name: out[name] for name in refs}


def _load_zip(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path}: a zip archive, but not a PyTorch checkpoint (no <archive>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        names = set(archive.namelist())
        byteorder = "little"  # files from before torch wrote `byteorder` are little-endian
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode().strip()
        if byteorder not in ("little", "big"):
            raise ValueError(f"{path}: unknown byte order {byteorder!r} in {prefix}byteorder")
        obj = _unpickle(io.BytesIO(archive.read(pickles[0])), path, on_storage=lambda storage: None)

        def read(storage: _Storage) -> bytes:
            entry = f"{prefix}data/{storage.key}"
            if entry not in names:
                raise ValueError(f"{path}: storage {storage.key} has no entry {entry}")
            return archive.read(entry)

        return _materialise(obj, read, byteorder != sys.byteorder, path)


def _load_legacy(path: Path, file) -> dict[str, np.ndarray]:
    """torch's pre-1.6 format: consecutive pickles, then each storage as an int64 count and its bytes."""
    magic = _unpickle(file, path)
    if magic != _LEGACY_MAGIC:
        raise ValueError(f"{path}: not a PyTorch checkpoint in torch's zip or legacy format (a file from "
                         "torch < 0.1.10? re-save it with a recent torch: torch.save(torch.load(f), f))")
    protocol = _unpickle(file, path)
    if protocol != _LEGACY_PROTOCOL:
        raise ValueError(f"{path}: legacy PyTorch protocol {protocol!r}, only {_LEGACY_PROTOCOL} is known")
    sys_info = _unpickle(file, path)
    little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    storages: dict[str, _Storage] = {}
    obj = _unpickle(file, path, on_storage=lambda storage: storages.setdefault(storage.key, storage))
    keys = _unpickle(file, path)
    if not (isinstance(keys, list) and set(keys) == set(storages)):
        raise ValueError(f"{path}: the storage list does not match the storages the tensors use")
    raw = {}
    for key in keys:  # in file order: the bytes follow one another
        head = file.read(8)
        itemsize = storages[key].dtype.itemsize if storages[key].dtype is not None else 1
        count = struct.unpack("<q" if little else ">q", head)[0] if len(head) == 8 else -1
        raw[key] = file.read(count * itemsize) if count >= 0 else b""
        if count < 0 or len(raw[key]) != count * itemsize:
            raise ValueError(f"{path}: truncated: storage {key} is cut short")
    return _materialise(obj, lambda storage: raw[storage.key], little != (sys.byteorder == "little"), path)


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a `torch.save`d state dict as {name: numpy array}, without torch.

    Arrays keep the stored dtype (bfloat16 and float8 as `ml_dtypes` types, so `.astype(np.float32)`
    works), native byte order, shape and values; views (transposes, slices, tensors sharing a storage)
    come back as separate C-contiguous copies. Nested dicts are flattened with dotted names. Raises
    `UnsafeCheckpointError` for a pickle that names anything but tensors, before any of it runs, and
    `ValueError` for anything that is not a state dict; both name the file.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    with open(path, "rb") as file:
        return _load_legacy(path, file)
