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

A hostile file gets nothing but an error naming it, and no more memory or time than its size allows:
- BUILD (setting attributes) is refused but for the one torch writes, `OrderedDict._metadata`, and the
  stand-ins are made afresh for each pickle, so no file can change how a later one reads;
- what is read and built is bounded by the file's size: storages total at most the file (torch stores
  every byte uncompressed), the arrays built at most `_OUTPUT_FACTOR` times it, and no zip entry or
  pickle length is read past the size the file can back;
- names flattened from nested dicts total at most `_NAME_FACTOR` times the pickle's size, nested at
  most `_MAX_DEPTH` deep (memo references can share one dict exponentially often).
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import reprlib
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

from xlsr_jax.errors import UserError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b"PK\x03\x04"  # what torch.load checks to tell its two formats apart

# Genuine files alias storages a little (tied weights name one tensor twice; `arange(n).expand(1, n)`
# buffers and slices reuse bytes), so the arrays built may outgrow the file, but not by much. A stride-0
# view can ask 4 GiB of 4 bytes; rather than judge each view's layout, all arrays together are bounded.
_OUTPUT_FACTOR, _OUTPUT_SLACK = 4, 16 << 20
# Flat state dicts' names are their keys, already in the pickle; nesting repeats prefixes a little.
_NAME_FACTOR, _NAME_SLACK = 4, 1 << 20
_MAX_DEPTH = 32  # state dicts nest dicts 1-3 deep
_BYTEORDER_MOST = 16  # "little" or "big"
_REPR = reprlib.Repr()  # a hostile value in a message: cut short, and no recursion into deep nests
_REPR.maxstring = _REPR.maxother = 120

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


class UnsafeCheckpointError(UserError, pickle.UnpicklingError):
    """A checkpoint tries what a state dict never does (names code, sets attributes, asks far more memory
    than its size); refused before any of it ran. A `UserError`: the CLI prints it."""


class UnreadableCheckpointError(UserError, ValueError):
    """A checkpoint that is corrupt, truncated, or not a state dict of tensors. A `ValueError` too, as
    this module raised before it had its own class."""


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


# No defaults in the rebuild functions: a default is state a pickle could replace (`__defaults__`).
def _rebuild_tensor(storage, storage_offset, size, stride, dtype) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor storage is a {type(storage).__name__}, not a storage")
    dtype = dtype.dtype if isinstance(dtype, _DType) else storage.dtype
    if dtype is None:
        raise pickle.UnpicklingError(f"storage {_REPR.repr(storage.key)}: untyped storage and no dtype")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and all(isinstance(i, int) and 0 <= i < 2**63 for i in (storage_offset, *size, *stride))):
        raise pickle.UnpicklingError(f"storage {_REPR.repr(storage.key)}: bad view (offset "
                                     f"{_REPR.repr(storage_offset)}, size {_REPR.repr(size)}, "
                                     f"stride {_REPR.repr(stride)})")
    return _TensorRef(storage, np.dtype(dtype), storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, *metadata):
    return _rebuild_tensor(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       *metadata):
    if not isinstance(dtype, _DType):
        raise pickle.UnpicklingError(f"tensor dtype is a {type(dtype).__name__}, not a torch dtype")
    return _rebuild_tensor(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, *state):
    return data  # a Parameter is its tensor; hooks and Python attributes are not weights


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The globals a state dict names, with fresh stand-ins: nothing one pickle holds is another's."""
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


class _Opcodes(dict):
    """The unpickler's opcode table; an unknown opcode is said as the C unpickler says it, not a KeyError."""

    def __missing__(self, code: int):
        raise pickle.UnpicklingError(f"invalid opcode {bytes([code])!r}")


class _StateDictUnpickler(pickle._Unpickler):  # noqa: SLF001
    """Resolves only `_allowed_globals`; persistent ids ('storage', type, key, location, numel) become
    `_Storage` records, one per key, collected in `storages` (None: persistent ids are refused).

    The pure-Python unpickler, because its opcodes can be replaced and its memo is a dict: the C one
    allocates a memo list as long as the largest index a pickle names (9 bytes ask for gigabytes)."""

    dispatch = _Opcodes(pickle._Unpickler.dispatch)  # noqa: SLF001

    def __init__(self, file, path: Path, storages: dict[str, _Storage] | None):
        super().__init__(file)
        self._path, self.storages, self._globals = path, storages, _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._globals[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._path}: refused to unpickle the global {module}.{name}: a state dict holds only "
                "tensors, and this file names code that would run when loaded. Nothing of it was run."
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        if self.storages is None:
            raise pickle.UnpicklingError(f"unexpected persistent id {_REPR.repr(pid)}")
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and isinstance(pid[4], int) and 0 <= pid[4] < 2**62):
            raise pickle.UnpicklingError(f"not a tensor storage id: {_REPR.repr(pid)}")
        if len(pid) == 6 and pid[5] is not None:  # storage views: torch < 1.0 only
            raise UnreadableCheckpointError(f"{self._path}: storage views (torch < 1.0) are not supported: "
                                            "re-save it with a recent torch")
        dtype = pid[1].dtype
        storage = _Storage(pid[2], dtype, pid[4] * (dtype.itemsize if dtype is not None else 1))
        known = self.storages.setdefault(storage.key, storage)
        if known != storage:  # torch refuses to save one storage as two types
            raise pickle.UnpicklingError(f"storage {_REPR.repr(storage.key)} named with two types or sizes")
        return known

    def _load_build(self) -> None:
        state = self.stack.pop()
        # torch.save's only BUILD: the state dict's `_metadata` (module versions, not weights), dropped.
        # Any other would set attributes, e.g. on a rebuild function or a dtype stand-in.
        if not (type(self.stack[-1]) is collections.OrderedDict and type(state) is dict
                and set(state) <= {"_metadata"}):
            raise UnsafeCheckpointError(
                f"{self._path}: refused to set the attributes of a {type(self.stack[-1]).__name__} "
                "(pickle BUILD): a state dict never does, and it could change how tensors read")

    def _load_buffer(self) -> None:
        # Protocol 5's out-of-band buffers and BYTEARRAY8 (which allocates the length it reads): torch
        # writes protocol 2.
        raise UnsafeCheckpointError(f"{self._path}: refused a pickle buffer opcode no state dict has")

    dispatch[pickle.BUILD[0]] = _load_build
    dispatch.update(dict.fromkeys(pickle.BYTEARRAY8 + pickle.NEXT_BUFFER + pickle.READONLY_BUFFER,
                                  _load_buffer))  # opcodes are one byte each


def _unpickle(file, path: Path, storages: dict[str, _Storage] | None = None) -> Any:
    """One pickle from `file` through `_StateDictUnpickler`; any failure names `path`."""
    try:
        return _StateDictUnpickler(file, path, storages).load()
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - a corrupt pickle fails in many ways; name the file either way
        raise UnreadableCheckpointError(f"{path}: cannot read the pickle ({type(err).__name__}: "
                                        f"{str(err)[:200]})") from err


def _tensor_refs(obj: Any, path: Path, budget: int) -> dict[str, _TensorRef]:
    """A (possibly nested) dict of tensors as {dotted name: tensor}, the way state dicts name them.

    Memo references let a pickle share one dict under two keys at each of 30 levels (500 bytes naming
    2**30 tensors), so the names made may total at most `budget` characters, `_MAX_DEPTH` dicts deep."""
    if not isinstance(obj, dict):
        raise UnreadableCheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict "
                                        "(a dict of tensors)")
    refs: dict[str, _TensorRef] = {}
    left = budget

    def walk(node: dict, prefix: str, depth: int) -> None:
        nonlocal left
        if depth > _MAX_DEPTH:
            raise UnsafeCheckpointError(f"{path}: dicts nested over {_MAX_DEPTH} deep (at "
                                        f"{_REPR.repr(prefix)}): a state dict's nesting is shallow")
        for key, value in node.items():
            if not isinstance(key, str):
                raise UnreadableCheckpointError(f"{path}: key {_REPR.repr(key)} under {_REPR.repr(prefix)} "
                                                f"is a {type(key).__name__}, not a name")
            name = prefix + key
            left -= len(name) + 1
            if left < 0:
                raise UnsafeCheckpointError(
                    f"{path}: its nested dicts name more than {budget} characters of tensors, "
                    f"{_NAME_FACTOR}x its pickle: dicts shared by memo references (a 'billion laughs')")
            if isinstance(value, dict):
                walk(value, name + ".", depth + 1)
            elif isinstance(value, _TensorRef):
                refs[name] = value
            else:
                raise UnreadableCheckpointError(f"{path}: {_REPR.repr(name)} is a {type(value).__name__}, "
                                                "not a tensor: not a state dict")

    walk(obj, "", 1)
    return refs


def _check_sizes(refs: dict[str, _TensorRef], path: Path, file_size: int) -> None:
    """Refuses, before any storage is read, tensors that need more bytes than the file can back."""
    stored = sum({ref.storage.key: ref.storage.nbytes for ref in refs.values()}.values())
    if stored > file_size:
        raise UnsafeCheckpointError(f"{path}: its tensors' storages hold {stored} bytes, more than the "
                                    f"{file_size} bytes of the whole file (torch.save does not compress)")
    sizes = {name: math.prod(ref.size) * ref.dtype.itemsize for name, ref in refs.items()}
    total = sum(sizes.values())
    if total > _OUTPUT_FACTOR * file_size + _OUTPUT_SLACK:
        largest = max(sizes, key=sizes.get)
        raise UnsafeCheckpointError(
            f"{path}: its tensors would take {total} bytes (the largest, {_REPR.repr(largest)}, "
            f"{sizes[largest]}), over {_OUTPUT_FACTOR}x the file's {file_size} bytes: views that repeat "
            "their storage's bytes (stride 0, overlaps) that often are no state dict's. Nothing was built.")


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
        raise UnreadableCheckpointError(f"{path}: tensor {_REPR.repr(name)} reaches element {last} of a "
                                        f"storage of {elements.size}")
    strides = tuple(s * ref.dtype.itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(elements[ref.offset:], ref.size, strides, writeable=False)
    return np.array(view, order="C")


def _materialise(obj: Any, read: Callable[[_Storage], bytes], swap: bool, path: Path, *, file_size: int,
                 pickle_size: int) -> dict[str, np.ndarray]:
    """Each tensor of `obj` built from its storage; a storage is read once and dropped after its views.
    The sizes (in bytes) bound what may be built."""
    refs = _tensor_refs(obj, path, _NAME_FACTOR * pickle_size + _NAME_SLACK)
    _check_sizes(refs, path, file_size)
    by_storage: dict[str, list[str]] = collections.defaultdict(list)
    for name, ref in refs.items():
        by_storage[ref.storage.key].append(name)
    out = {}
    for names in by_storage.values():
        storage = refs[names[0]].storage
        raw = read(storage)
        if len(raw) != storage.nbytes:
            raise UnreadableCheckpointError(f"{path}: storage {_REPR.repr(storage.key)} holds {len(raw)} "
                                            f"bytes, its tensors' {storage.nbytes}")
        for name in names:
            out[name] = _build(refs[name], _elements(raw, refs[name], swap), name, path)
    return {name: out[name] for name in refs}


def _read_entry(archive: zipfile.ZipFile, name: str, path: Path, most: int) -> bytes:
    """Zip entry `name`, refused unread if its directory says it inflates past `most` bytes, and read no
    further than that size if it lies (a 1 MB deflated entry can hold 1 GiB)."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise UnreadableCheckpointError(f"{path}: no entry {_REPR.repr(name)}") from None
    if info.file_size > most:
        raise UnsafeCheckpointError(f"{path}: entry {_REPR.repr(name)} would inflate to {info.file_size} "
                                    f"bytes, over the {most} it may hold; refused unread")
    with archive.open(info) as entry:
        return entry.read(info.file_size)


def _load_zip(path: Path, file, file_size: int) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(file) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise UnreadableCheckpointError(f"{path}: a zip archive, but not a PyTorch checkpoint "
                                            "(no <archive>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = b"little"  # files from before torch wrote `byteorder` are little-endian
        if prefix + "byteorder" in archive.namelist():
            byteorder = _read_entry(archive, prefix + "byteorder", path, _BYTEORDER_MOST).strip()
        if byteorder not in (b"little", b"big"):
            raise UnreadableCheckpointError(f"{path}: unknown byte order {_REPR.repr(byteorder)} in "
                                            f"{prefix}byteorder")
        data = _read_entry(archive, pickles[0], path, file_size)  # stored uncompressed: within the file
        storages: dict[str, _Storage] = {}
        obj = _unpickle(_Capped(io.BytesIO(data), len(data)), path, storages)

        def read(storage: _Storage) -> bytes:
            return _read_entry(archive, f"{prefix}data/{storage.key}", path, storage.nbytes)

        swap = byteorder.decode() != sys.byteorder
        return _materialise(obj, read, swap, path, file_size=file_size, pickle_size=len(data))


class _Capped:
    """A file that refuses reads past its end, for the pure-Python unpickler: `BufferedReader.read(n)`
    allocates n bytes first, a pickle length may say 2**60, and that unpickler takes a short read (or
    'Or' cut from 'OrderedDict') as it comes."""

    def __init__(self, file, size: int):
        self._file, self.left = file, size - file.tell()

    def read(self, n: int) -> bytes:
        if n > self.left:
            raise pickle.UnpicklingError("pickle data was truncated")
        self.left -= n
        return self._file.read(n)

    def readline(self) -> bytes:
        line = self._file.readline(self.left)
        self.left -= len(line)
        if not line.endswith(b"\n"):
            raise pickle.UnpicklingError("pickle data was truncated")
        return line


def _load_legacy(path: Path, file: _Capped, file_size: int) -> dict[str, np.ndarray]:
    """torch's pre-1.6 format: consecutive pickles, then each storage as an int64 count and its bytes."""
    if _unpickle(file, path) != _LEGACY_MAGIC:
        raise UnreadableCheckpointError(f"{path}: not a PyTorch checkpoint in torch's zip or legacy format "
                                        "(from torch < 0.1.10? re-save it: torch.save(torch.load(f), f))")
    protocol = _unpickle(file, path)
    if protocol != _LEGACY_PROTOCOL:
        raise UnreadableCheckpointError(f"{path}: legacy PyTorch protocol {_REPR.repr(protocol)}, only "
                                        f"{_LEGACY_PROTOCOL} is known")
    sys_info = _unpickle(file, path)
    little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    storages: dict[str, _Storage] = {}
    start = file.left
    obj = _unpickle(file, path, storages)
    pickle_size = start - file.left
    keys = _unpickle(file, path)
    if not (isinstance(keys, list) and len(keys) == len(storages) and set(keys) == set(storages)):
        raise UnreadableCheckpointError(f"{path}: the storage list does not match the tensors' storages")
    raw = {}
    for key in keys:  # in file order: the bytes follow one another
        storage = storages[key]
        if file.left < 8 + storage.nbytes:
            raise UnreadableCheckpointError(f"{path}: cut short: storage {_REPR.repr(key)} needs "
                                            f"{8 + storage.nbytes} more bytes, {file.left} are left")
        count = struct.unpack("<q" if little else ">q", file.read(8))[0]
        itemsize = storage.dtype.itemsize if storage.dtype is not None else 1
        if count * itemsize != storage.nbytes:
            raise UnreadableCheckpointError(f"{path}: storage {_REPR.repr(key)} says {count} elements, its "
                                            f"tensors {storage.nbytes // itemsize}")
        raw[key] = file.read(storage.nbytes)
    swap = little != (sys.byteorder == "little")
    return _materialise(obj, lambda storage: raw[storage.key], swap, path, file_size=file_size,
                        pickle_size=pickle_size)


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a `torch.save`d state dict as {name: numpy array}, without torch.

    Arrays keep the stored dtype (bfloat16 and float8 as `ml_dtypes` types, so `.astype(np.float32)`
    works), native byte order, shape and values; views (transposes, slices, tensors sharing a storage)
    come back as separate C-contiguous copies. Nested dicts are flattened with dotted names. Raises
    `UnsafeCheckpointError` for a pickle that names code or tries what a state dict never does, before
    any of it runs, and `UnreadableCheckpointError` for a file that is corrupt or not a state dict; both
    are `xlsr_jax.errors.UserError`s and name the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as file:
            file_size = os.fstat(file.fileno()).st_size
            if file.read(4) == _ZIP_MAGIC:
                return _load_zip(path, file, file_size)
            file.seek(0)
            return _load_legacy(path, _Capped(file, file_size), file_size)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - BadZipFile, zlib.error, OSError, EOFError...: name the file
        raise UnreadableCheckpointError(f"{path}: cannot read it as a PyTorch checkpoint "
                                        f"({type(err).__name__}: {str(err)[:200]})") from err
