"""Reading EDM and EDM2 network pickles (such as `edm-imagenet-64x64-cond-adm.pkl`) without
running any code from the file.

EDM's training loop saves `pickle.dump(dict(ema=net, loss_fn=..., augment_pipe=...,
dataset_kwargs={...}))` (protocol 4, Python's default), EDM2's a `dnnlib.util.EasyDict(encoder=...,
dataset_kwargs=..., loss_fn=..., ema=net)` with the network in float16. Every network, loss,
augmentation and encoder object comes from a class decorated by `torch_utils.persistence`, and is
pickled as the call `torch_utils.persistence._reconstruct_persistent_obj(meta)`: `meta` holds the
Python source of the module that defined the class (`module_src`), the class name and the
object's `__dict__` (`state`), which includes its constructor arguments (`_init_args`,
`_init_kwargs`). `pickle.load` executes that source, so a pickle can run anything.

Here a restricted unpickler resolves only the globals such files need, each to an inert
stand-in, and refuses every other one:

- `_reconstruct_persistent_obj` -> a `PersistentRecord` of class name, sha256 of the module
  source and state: the source is hashed, never compiled or executed;
- `torch.storage._load_from_bytes` (each tensor's storage is a nested `torch.save` blob) ->
  `torch.load(..., weights_only=True)`, so the blob cannot run code either;
- `torch._utils._rebuild_tensor_v2` and `_rebuild_parameter` -> the tensor, after checking that
  offset, sizes and strides stay inside its storage (torch would instead grow the storage and
  hand back uninitialised memory);
- `collections.OrderedDict` -> itself; `dnnlib.util.EasyDict` -> `dict`;
  `torch.nn.ModuleDict` -> a `ModuleDictRecord` of its state;
- numpy (`numpy.core` or, written under numpy 2, `numpy._core`): `multiarray.scalar` with
  `numpy.dtype` -> a Python bool, int or float decoded from the scalar's bytes (EDM's layers get
  `np.sqrt(...)` values as constructor arguments); `multiarray._reconstruct` with
  `numpy.ndarray`, and protocol 5's `numeric._frombuffer` -> a small tensor (EDM2's encoders
  keep float32 arrays). Only plain numeric dtypes (bool, signed and unsigned integers, float16,
  float32, float64, either byte order) and only the exact argument and BUILD records numpy
  writes are accepted; arrays hold at most `MAX_ARRAY_ELEMENTS` elements;
- for files written with pickle protocols 2 and 3: `builtins.set` of a list, `builtins.bytes()`
  (empty) and `_codecs.encode(text, "latin1")`, as those protocols spell sets and bytes.

The objects the unpickler hands out (records and wrapped functions) refuse pickle's BUILD step,
or accept it once in numpy's exact form, so a file cannot set attributes on them: for instance
re-`set_` a tensor past its storage or change a function's defaults for later loads. When the
load is done, tensors and arrays replace their records and anything else that is not plain data,
a record or a tensor is refused.

`read_persistent_pickle` gives that data; `load_edm_network` rebuilds an EDM network from our
classes in `edm_networks.py` with the recorded constructor arguments and loads the parameters
and buffers gathered from the records strictly. `module_tensors` and `constructor_arguments`
serve loaders of other persistent networks (EDM2's).

A hostile file cannot run code this way, but it can still make the loader allocate much memory
(a storage blob claiming a large size, huge recorded constructor arguments) before it is refused.
"""
from __future__ import annotations

import collections
import hashlib
import io
import math
import os
import pickle
import struct
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, existing_file, load_state_dict_strict, sha256_file
from .edm_networks import NETWORK_CLASS_NAMES, PRECONDITIONERS

KIND = "edm-network-pickle"
#: Most elements a numpy array in a pickle may have (EDM2's encoders keep 4 per array).
MAX_ARRAY_ELEMENTS = 4096
_UNET_CLASS_NAMES = ("SongUNet", "DhariwalUNet")
# Deepest nesting of containers and records the final pass walks (EDM's is about 15).
_MAX_DEPTH = 200


class _Refusal(CheckpointError):
    """A problem found while reading; `read_persistent_pickle` prefixes the file name."""


class PersistentRecord:
    """One object pickled by EDM's persistence mechanism, as data: `class_name` (e.g.
    "EDMPrecond"), `version` of the persistence format (6 for EDM and EDM2),
    `module_src_sha256` (hex sha256 of the UTF-8 module source) and `state` (the object's
    `__dict__`: for a torch module `_parameters`, `_buffers`, `_modules`, its attributes, and
    `_init_args` / `_init_kwargs`, the arguments its constructor was called with)."""

    __slots__ = ("class_name", "module_src_sha256", "state", "version")

    def __init__(self, class_name: str, version: object, module_src_sha256: str, state: object) -> None:
        self.class_name = class_name
        self.version = version
        self.module_src_sha256 = module_src_sha256
        self.state = state

    @property
    def init_args(self) -> tuple | None:
        """Positional constructor arguments as recorded, or None when the state has none."""
        args = self.state.get("_init_args") if isinstance(self.state, dict) else None
        return tuple(args) if isinstance(args, (tuple, list)) else None

    @property
    def init_kwargs(self) -> dict | None:
        """Keyword constructor arguments as recorded, or None when the state has none."""
        kwargs = self.state.get("_init_kwargs") if isinstance(self.state, dict) else None
        return dict(kwargs) if isinstance(kwargs, dict) else None

    def __setstate__(self, state: object) -> None:
        raise _Refusal(f"the pickle tries to set attributes of the persistent object {self.class_name!r}")

    def __repr__(self) -> str:
        return f"PersistentRecord({self.class_name!r}, module_src_sha256={self.module_src_sha256[:12]}...)"


class ModuleDictRecord:
    """A `torch.nn.ModuleDict` of the pickle: its state arrives once through pickle's BUILD."""

    __slots__ = ("state",)
    class_name = "ModuleDict"

    def __setstate__(self, state: object) -> None:
        if getattr(self, "state", None) is not None:
            raise _Refusal("the pickle sets the state of a ModuleDict twice")
        self.state = state


class _StorageRecord:
    """A tensor storage read from a nested `torch.save` blob."""

    __slots__ = ("storage",)

    def __init__(self, storage: torch.storage.TypedStorage) -> None:
        self.storage = storage

    def __setstate__(self, state: object) -> None:
        raise _Refusal("the pickle tries to set attributes of a tensor storage")


class _TensorRecord:
    """A tensor checked to lie inside its storage; `is_parameter` when wrapped as a Parameter."""

    __slots__ = ("is_parameter", "tensor")

    def __init__(self, tensor: torch.Tensor, is_parameter: bool) -> None:
        self.tensor = tensor
        self.is_parameter = is_parameter

    def __setstate__(self, state: object) -> None:
        raise _Refusal("the pickle tries to set the state of a tensor (which could re-point it past its storage)")


def _persistent_object(meta: object) -> PersistentRecord:
    """Stand-in for `torch_utils.persistence._reconstruct_persistent_obj(meta)`."""
    if not isinstance(meta, dict):
        raise _Refusal(f"a persistent object's description is a {type(meta).__name__}, not a dict")
    class_name, module_src = meta.get("class_name"), meta.get("module_src")
    if meta.get("type") != "class" or not isinstance(class_name, str) or not isinstance(module_src, str):
        raise _Refusal("a persistent object lacks its type 'class', class name or module source")
    # The source is only hashed, to identify the code that wrote the file.
    digest = hashlib.sha256(module_src.encode("utf-8", "surrogatepass")).hexdigest()
    return PersistentRecord(class_name, meta.get("version"), digest, meta.get("state"))


def _storage_from_bytes(blob: object) -> _StorageRecord:
    """Stand-in for `torch.storage._load_from_bytes(blob)`, which would `torch.load` the blob
    with code execution allowed."""
    if not isinstance(blob, (bytes, bytearray)):
        raise _Refusal(f"a tensor storage blob is a {type(blob).__name__}, not bytes")
    try:
        storage = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for unsafe or damaged blobs
        raise _Refusal(f"refused a nested tensor blob that is not a plain tensor storage "
                       f"({type(err).__name__}: {err})") from err
    if not isinstance(storage, torch.storage.TypedStorage):
        raise _Refusal(f"a nested tensor blob holds a {type(storage).__name__}, not a tensor storage")
    return _StorageRecord(storage)


def _is_index(value: object) -> bool:
    return type(value) is int and value >= 0


def _is_shape(value: object) -> bool:
    return type(value) is tuple and all(map(_is_index, value))


def _is_empty_hooks(value: object) -> bool:
    return isinstance(value, dict) and not value


def _tensor(storage: object, storage_offset: object, size: object, stride: object, requires_grad: object,
            backward_hooks: object, metadata: object = None) -> _TensorRecord:
    """Stand-in for `torch._utils._rebuild_tensor_v2`: the same tensor, once its layout is
    checked to stay inside the storage."""
    if not isinstance(storage, _StorageRecord):
        raise _Refusal(f"a tensor is built on a {type(storage).__name__}, not on a storage from a tensor blob")
    if not (_is_shape(size) and _is_shape(stride) and len(size) == len(stride) and _is_index(storage_offset)):
        raise _Refusal(f"a tensor has a malformed layout: offset {storage_offset!r}, size {size!r}, stride {stride!r}")
    if not (isinstance(requires_grad, bool) and _is_empty_hooks(backward_hooks) and metadata is None):
        raise _Refusal("a tensor carries backward hooks or metadata, which EDM never saves")
    typed = storage.storage
    capacity = typed._untyped_storage.nbytes() // typed.dtype.itemsize
    extent = 0 if 0 in size else 1 + sum((n - 1) * step for n, step in zip(size, stride))
    if storage_offset + extent > capacity:
        raise _Refusal(f"tensor claims more data than its storage holds: offset {storage_offset}, size {size}, "
                       f"stride {stride} reach element {storage_offset + extent}, the storage has {capacity}")
    tensor = torch._utils._rebuild_tensor_v2(typed, storage_offset, size, stride, False, collections.OrderedDict())
    return _TensorRecord(tensor, is_parameter=False)


def _parameter(data: object, requires_grad: object, backward_hooks: object) -> _TensorRecord:
    """Stand-in for `torch._utils._rebuild_parameter`."""
    if not isinstance(data, _TensorRecord) or data.is_parameter:
        raise _Refusal(f"a parameter wraps a {type(data).__name__}, not a tensor")
    if not (isinstance(requires_grad, bool) and _is_empty_hooks(backward_hooks)):
        raise _Refusal("a parameter carries backward hooks, which EDM never saves")
    return _TensorRecord(data.tensor, is_parameter=True)


# --- numpy scalars, dtypes and small arrays, decoded from their bytes. ---

# The dtype codes numpy pickles for its plain numeric types -> (struct format, torch dtype).
_NUMPY_DTYPES: dict[str, tuple[str, torch.dtype]] = {
    "b1": ("?", torch.bool),
    "i1": ("b", torch.int8), "i2": ("h", torch.int16), "i4": ("i", torch.int32), "i8": ("q", torch.int64),
    "u1": ("B", torch.uint8), "u2": ("H", torch.uint16), "u4": ("I", torch.uint32), "u8": ("Q", torch.uint64),
    "f2": ("e", torch.float16), "f4": ("f", torch.float32), "f8": ("d", torch.float64),
}


def _exactly(value: object, expected: object) -> bool:
    """`value == expected` with the same types throughout (so True is not 1, nor 1.0 -1)."""
    if type(value) is not type(expected):
        return False
    if isinstance(expected, tuple):
        return len(value) == len(expected) and all(map(_exactly, value, expected))
    return value == expected


class _NumpyDtype:
    """A `numpy.dtype(code, False, True)` of the pickle; its byte order arrives through BUILD."""

    __slots__ = ("byteorder", "code")

    def __init__(self, code: str) -> None:
        self.code = code
        self.byteorder: str | None = None

    @property
    def itemsize(self) -> int:
        return int(self.code[1:])

    def __setstate__(self, state: object) -> None:
        if self.byteorder is not None:
            raise _Refusal(f"the pickle sets the state of the numpy dtype {self.code!r} twice")
        # What numpy writes for a plain dtype: (version 3, byte order, no subarray, no names, no
        # fields, elsize -1, alignment -1, no flags); one-byte types have no byte order ('|').
        orders = ("|",) if self.itemsize == 1 else ("<", ">")
        if not any(_exactly(state, (3, order, None, None, None, -1, -1, 0)) for order in orders):
            raise _Refusal(f"the numpy dtype {self.code!r} has the state {_short(state)}, not the one numpy writes for "
                           f"a plain numeric dtype (3, {' or '.join(map(repr, orders))}, None, None, None, -1, -1, 0)")
        self.byteorder = state[1]

    def values(self, data: object, count: int) -> tuple:
        """`count` Python numbers decoded from `data`, the raw bytes of this dtype."""
        if self.byteorder is None:
            raise _Refusal(f"the numpy dtype {self.code!r} is used before its state is set")
        if not isinstance(data, (bytes, bytearray)):
            raise _Refusal(f"numpy data is a {type(data).__name__}, not bytes")
        if len(data) != count * self.itemsize:
            raise _Refusal(f"numpy data of {count} {self.code!r} values has {len(data)} bytes, "
                           f"not {count * self.itemsize}")
        struct_format, _ = _NUMPY_DTYPES[self.code]
        return struct.unpack(f"{'>' if self.byteorder == '>' else '<'}{count}{struct_format}", data)

    def tensor(self, data: object, shape: object, fortran_order: bool) -> torch.Tensor:
        """The array of `shape` stored in `data` (C or Fortran order) as a tensor."""
        if not _is_shape(shape) or len(shape) > 32:
            raise _Refusal(f"a numpy array has the malformed shape {shape!r}")
        count = math.prod(shape)
        if count > MAX_ARRAY_ELEMENTS:
            raise _Refusal(f"a numpy array of shape {shape} has {count} elements; arrays in EDM pickles are small "
                           f"and at most {MAX_ARRAY_ELEMENTS} are read")
        _, dtype = _NUMPY_DTYPES[self.code]
        flat = torch.tensor(self.values(data, count), dtype=dtype)
        if not fortran_order:
            return flat.reshape(shape)
        return flat.reshape(shape[::-1]).permute(*reversed(range(len(shape)))).contiguous()

    def __repr__(self) -> str:
        return f"numpy dtype {self.byteorder or ''}{self.code}"


class _NumpyArray:
    """A `numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')` of the pickle: its
    shape, dtype and data arrive once through BUILD."""

    __slots__ = ("tensor",)

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None

    def __setstate__(self, state: object) -> None:
        if self.tensor is not None:
            raise _Refusal("the pickle sets the state of a numpy array twice")
        # numpy writes (version 1, shape, dtype, is_fortran, raw bytes).
        if not (type(state) is tuple and len(state) == 5 and _exactly(state[0], 1)
                and isinstance(state[2], _NumpyDtype) and type(state[3]) is bool):
            raise _Refusal(f"a numpy array has a state other than numpy's (1, shape, dtype, is_fortran, bytes): "
                           f"{_short(state)}")
        self.tensor = state[2].tensor(state[4], state[1], fortran_order=state[3])


class _Marker:
    """A global that the pickle may name but not call, such as `numpy.ndarray`."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __setstate__(self, state: object) -> None:
        raise _Refusal(f"the pickle tries to set attributes of {self.name}")

    def __repr__(self) -> str:
        return self.name


_NDARRAY = _Marker("numpy.ndarray")


def _short(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _numpy_dtype(code: object, align: object, copy: object) -> _NumpyDtype:
    """Stand-in for `numpy.dtype(code, False, True)`, as numpy pickles a dtype."""
    if not (type(code) is str and code in _NUMPY_DTYPES):
        raise _Refusal(f"refused the numpy dtype {_short(code)}: only plain numeric dtypes "
                       f"({', '.join(_NUMPY_DTYPES)}) are read")
    if not (align is False and copy is True):
        raise _Refusal(f"a numpy dtype is made with align={align!r}, copy={copy!r}, not as numpy pickles it")
    return _NumpyDtype(code)


def _numpy_scalar(dtype: object, data: object) -> bool | int | float:
    """Stand-in for `numpy.core.multiarray.scalar(dtype, data)`: the Python number."""
    if not isinstance(dtype, _NumpyDtype):
        raise _Refusal(f"a numpy scalar has the dtype {type(dtype).__name__}, not a numpy dtype")
    if type(data) is not bytes:
        raise _Refusal(f"a numpy scalar's data is a {type(data).__name__}, not bytes")
    return dtype.values(data, 1)[0]


def _numpy_reconstruct(subtype: object, shape: object, typecode: object) -> _NumpyArray:
    """Stand-in for `numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')`."""
    if not (subtype is _NDARRAY and _exactly(shape, (0,)) and _exactly(typecode, b"b")):
        raise _Refusal(f"a numpy array is reconstructed from {_short((subtype, shape, typecode))}, "
                       f"not from (numpy.ndarray, (0,), b'b') as numpy pickles it")
    return _NumpyArray()


def _numpy_frombuffer(buffer: object, dtype: object, shape: object, order: object) -> torch.Tensor:
    """Stand-in for protocol 5's `numpy.core.numeric._frombuffer(buffer, dtype, shape, order)`."""
    if not (isinstance(dtype, _NumpyDtype) and type(order) is str and order in ("C", "F")):
        raise _Refusal(f"a numpy array is read from a buffer with the dtype and order "
                       f"{_short((dtype, order))}, not as numpy pickles it")
    return dtype.tensor(buffer, shape, fortran_order=order == "F")


# --- how protocols 2 and 3 spell sets and bytes. ---

def _set_of(items: object) -> set:
    if type(items) is not list:
        raise _Refusal(f"a set is made from a {type(items).__name__}, not a list")
    return set(items)


def _empty_bytes() -> bytes:
    return b""


def _latin1_bytes(text: object, encoding: object) -> bytes:
    if not (type(text) is str and _exactly(encoding, "latin1")):
        raise _Refusal("_codecs.encode is called other than as pickle spells bytes (text, 'latin1')")
    return text.encode("latin1")


class _Allowed:
    """A function the pickle may call. Unlike a plain function object, it refuses BUILD, so a
    file cannot change its attributes (such as `__defaults__`) for later loads."""

    __slots__ = ("_function",)

    def __init__(self, function: Callable[..., object]) -> None:
        self._function = function

    def __call__(self, *args: object) -> object:
        return self._function(*args)

    def __setstate__(self, state: object) -> None:
        raise _Refusal("the pickle tries to set attributes of a function")

    def __repr__(self) -> str:
        return f"the function {self._function.__name__}"


_NUMPY_SCALAR = _Allowed(_numpy_scalar)
_NUMPY_RECONSTRUCT = _Allowed(_numpy_reconstruct)
_NUMPY_FROMBUFFER = _Allowed(_numpy_frombuffer)
_SET = _Allowed(_set_of)
_BYTES = _Allowed(_empty_bytes)

# (module, name) -> stand-in, for every global an EDM or EDM2 pickle needs.
_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _Allowed(_persistent_object),
    ("torch.storage", "_load_from_bytes"): _Allowed(_storage_from_bytes),
    ("torch._utils", "_rebuild_tensor_v2"): _Allowed(_tensor),
    ("torch._utils", "_rebuild_parameter"): _Allowed(_parameter),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.nn.modules.container", "ModuleDict"): ModuleDictRecord,
    ("dnnlib.util", "EasyDict"): dict,
    ("numpy", "dtype"): _Allowed(_numpy_dtype),
    ("numpy", "ndarray"): _NDARRAY,
    # numpy 1 names its core `numpy.core`, numpy 2 `numpy._core`.
    ("numpy.core.multiarray", "scalar"): _NUMPY_SCALAR,
    ("numpy._core.multiarray", "scalar"): _NUMPY_SCALAR,
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _NUMPY_FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _NUMPY_FROMBUFFER,
    # Protocols 2 and 3 (protocol 2 names Python 3's `builtins` `__builtin__`).
    ("builtins", "set"): _SET,
    ("__builtin__", "set"): _SET,
    ("builtins", "bytes"): _BYTES,
    ("__builtin__", "bytes"): _BYTES,
    ("_codecs", "encode"): _Allowed(_latin1_bytes),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `_ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str) -> object:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise _Refusal(f"refused the global {module}.{name}: it is not one of the {len(_ALLOWED_GLOBALS)} "
                           f"that EDM and EDM2 network pickles need, and loading it could run code")
        return allowed

    def persistent_load(self, pid: object) -> object:
        raise _Refusal("refused a persistent id: EDM network pickles have none")


def _finished(value: object, done: dict[int, object], depth: int = 0) -> object:
    """`value` with tensor and array records replaced by their tensors, once the whole pickle is
    read; refuses anything that is not plain data, a record or a tensor. `done` maps the ids of
    values already seen to their results (pickles share objects, and may hold cycles)."""
    # Tensors come only from the stand-ins (protocol 5's numpy arrays are tensors at once).
    if value is None or type(value) in (bool, int, float, str, bytes, bytearray, torch.Tensor):
        return value
    key = id(value)
    if key in done:
        return done[key]
    if depth > _MAX_DEPTH:
        raise _Refusal(f"the pickle nests containers more than {_MAX_DEPTH} levels deep")
    if isinstance(value, _TensorRecord):
        result: object = value.tensor
    elif isinstance(value, _NumpyArray):
        if value.tensor is None:
            raise _Refusal("a numpy array never receives its data")
        result = value.tensor
    elif isinstance(value, (PersistentRecord, ModuleDictRecord)):
        done[key] = value
        value.state = _finished(getattr(value, "state", None), done, depth + 1)
        return value
    elif isinstance(value, dict):
        done[key] = value
        for name, item in value.items():
            if not (name is None or type(name) in (bool, int, float, str, bytes)):
                raise _Refusal(f"the pickle uses {_short(name)} as a dict key")
            value[name] = _finished(item, done, depth + 1)
        return value
    elif isinstance(value, list):
        done[key] = value
        value[:] = [_finished(item, done, depth + 1) for item in value]
        return value
    elif type(value) is tuple:
        # A tuple cannot hold itself, so it is finished before anything refers to its result.
        result = tuple(_finished(item, done, depth + 1) for item in value)
    elif type(value) in (set, frozenset):
        if not all(item is None or type(item) in (bool, int, float, str, bytes) for item in value):
            raise _Refusal("the pickle holds a set of objects other than numbers and strings")
        result = value
    else:
        raise _Refusal(f"the pickle leaves {_short(value)} ({type(value).__name__}) in its data, which EDM's "
                       f"pickles never do")
    done[key] = result
    return result


def read_persistent_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level dict of an EDM or EDM2 pickle, read without running any of its code.

    Persistent objects (networks and their layers, losses, augmentation pipelines, encoders)
    come back as `PersistentRecord`s, `torch.nn.ModuleDict`s as `ModuleDictRecord`s, tensors and
    numpy arrays as CPU tensors, numpy scalars as Python numbers, `EasyDict`s as dicts.

    Raises:
        CheckpointError: missing or unreadable file, a global outside the allowlist, a stand-in
            called or built other than as EDM's pickles do, a nested blob that is not a plain
            storage, a tensor reaching past its storage, an array beyond `MAX_ARRAY_ELEMENTS`,
            or a file that does not hold a dict.
    """
    p = existing_file(path, "EDM network pickle")
    try:
        with open(p, "rb") as f:
            data = _RestrictedUnpickler(f).load()
        data = _finished(data, {})
    except _Refusal as err:
        raise CheckpointError(f"{p}: {err}") from err
    except Exception as err:  # pickle raises many types for truncated or damaged files
        raise CheckpointError(f"{p}: not a readable EDM network pickle ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{p}: holds a {type(data).__name__}, not EDM's dict with an 'ema' network")
    return data


def _network_record(data: dict, key: str, source: Path) -> PersistentRecord:
    """The preconditioner stored under `key`, with the state of a torch module."""
    if key not in data:
        raise CheckpointError(f"{source}: no key {key!r}; the pickle holds {sorted(map(str, data))}")
    record = data[key]
    if not isinstance(record, PersistentRecord):
        raise CheckpointError(f"{source}: {key!r} holds a {type(record).__name__}, not a persistent EDM network")
    if record.class_name not in PRECONDITIONERS:
        raise CheckpointError(f"{source}: {key!r} is an unknown class {record.class_name!r}; "
                              f"expected one of {sorted(PRECONDITIONERS)}")
    return record


def _module_state(record: object, name: str, class_names: Collection[str], source: str | Path) -> dict:
    """The state of a pickled module (a persistent layer of `class_names` or a ModuleDict),
    checked to hold the dicts of parameters, buffers and submodules that torch modules have."""
    if isinstance(record, PersistentRecord):
        if record.class_name not in class_names:
            raise CheckpointError(f"{source}: module {name!r} is an unknown class {record.class_name!r}, "
                                  f"not one of the network's classes")
    elif not isinstance(record, ModuleDictRecord):
        raise CheckpointError(f"{source}: module {name!r} is a {type(record).__name__}, not a torch module")
    state = getattr(record, "state", None)
    fields = ("_parameters", "_buffers", "_modules")
    if not isinstance(state, dict) or not all(isinstance(state.get(field), dict) for field in fields):
        raise CheckpointError(f"{source}: module {name!r} ({record.class_name}) does not have the state of a torch "
                              f"module (dicts {', '.join(fields)})")
    return state


def module_tensors(record: PersistentRecord, class_names: Collection[str] = NETWORK_CLASS_NAMES, *,
                   source: str | os.PathLike = "<pickle>") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(parameters, persistent buffers) of the module tree under `record`, by state-dict name.

    Every persistent module of the tree must be of one of `class_names` (EDM's network classes
    by default) or a ModuleDict; each module appears once (EDM networks are trees). `source`
    names the file in errors.
    """
    parameters: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    pending: list[tuple[str, object]] = [("", record)]
    while pending:
        prefix, module = pending.pop()
        where = prefix.rstrip(".") or "<root>"
        # A pickle may reference one object twice or in a cycle.
        if id(module) in seen:
            raise CheckpointError(f"{source}: module {where!r} appears more than once in the network")
        seen.add(id(module))
        state = _module_state(module, where, class_names, source)
        non_persistent = state.get("_non_persistent_buffers_set", set())
        if not isinstance(non_persistent, (set, frozenset)):
            raise CheckpointError(f"{source}: module {where!r} has a malformed list of non-persistent buffers")
        for field, target in (("_parameters", parameters), ("_buffers", buffers)):
            for name, value in state[field].items():
                if not isinstance(name, str) or "." in name:
                    raise CheckpointError(f"{source}: malformed tensor name {name!r} in module {where!r}")
                if value is None or (field == "_buffers" and name in non_persistent):
                    continue
                if not isinstance(value, torch.Tensor):
                    raise CheckpointError(f"{source}: {prefix}{name} is a {type(value).__name__}, not a tensor")
                target[prefix + name] = value
        for name, child in state["_modules"].items():
            if not isinstance(name, str) or "." in name:
                raise CheckpointError(f"{source}: malformed submodule name {name!r} in module {where!r}")
            if child is not None:
                pending.append((f"{prefix}{name}.", child))
    return parameters, buffers


def _is_plain(value: object, depth: int = 0) -> bool:
    """Whether `value` is constructor-argument data: numbers, strings, None, and lists, tuples
    and str-keyed dicts of them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if depth > 8:
        return False
    if isinstance(value, (list, tuple)):
        return all(_is_plain(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def constructor_arguments(record: PersistentRecord, *,
                          source: str | os.PathLike = "<pickle>") -> tuple[tuple, dict[str, Any]]:
    """The (args, kwargs) EDM's persistence recorded for the object's constructor, checked to be
    plain data (numbers, strings, None, lists, tuples and dicts of them)."""
    args, kwargs = record.init_args, record.init_kwargs
    if args is None or kwargs is None:
        raise CheckpointError(f"{source}: {record.class_name} does not record its constructor arguments "
                              f"(_init_args, _init_kwargs), so the architecture is unknown")
    if not (_is_plain(args) and _is_plain(kwargs)):
        raise CheckpointError(f"{source}: {record.class_name}'s constructor arguments hold objects other than "
                              f"numbers, strings, lists and dicts")
    return args, kwargs


def _unet_class_name(record: PersistentRecord, source: Path) -> str:
    """Class name of the preconditioner's U-Net (`state['_modules']['model']`)."""
    model = _module_state(record, "<root>", NETWORK_CLASS_NAMES, source)["_modules"].get("model")
    if not isinstance(model, PersistentRecord) or model.class_name not in _UNET_CLASS_NAMES:
        found = model.class_name if isinstance(model, PersistentRecord) else type(model).__name__
        raise CheckpointError(f"{source}: {record.class_name}.model is {found!r}, not one of {_UNET_CLASS_NAMES}")
    return model.class_name


def _read(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    data = read_persistent_pickle(path)
    return Path(path).expanduser(), data


def load_edm_network(path: str | os.PathLike, *, key: str = "ema",
                     device: str | torch.device = "cpu") -> torch.nn.Module:
    """The EDM network stored under `key` of an EDM pickle, rebuilt from our classes.

    Nothing from the file is executed: see the module docstring for what is read and how.

    Args:
        path: local EDM pickle, e.g. `edm-imagenet-64x64-cond-adm.pkl` or a training snapshot
            `network-snapshot-*.pkl`.
        key: top-level key of the network; EDM's snapshots keep the EMA weights under "ema".
        device: where the returned network lives.

    Returns:
        An `EDMPrecond`, `VPPrecond`, `VEPrecond` or `iDDPMPrecond` (around a `DhariwalUNet` or
        `SongUNet`) built with the constructor arguments recorded in the file, in eval mode, with
        parameters frozen (gradients with respect to the input still flow). Call it as
        `net(x, sigma, class_labels)` with x (B, C, R, R) and sigma a float, 0-d or (B,) tensor.

    Raises:
        CheckpointError: what `read_persistent_pickle` refuses, a missing key, an unknown class,
            a state that is not a torch module's, unrecorded constructor arguments, or weights
            that do not fit the rebuilt network or are not finite.
    """
    source, data = _read(path)
    record = _network_record(data, key, source)
    unet_name = _unet_class_name(record, source)
    parameters, buffers = module_tensors(record, source=source)
    args, kwargs = constructor_arguments(record, source=source)
    cls = PRECONDITIONERS[record.class_name]
    try:
        # Random initial weights are overwritten below; keep the caller's random stream as it was.
        with torch.random.fork_rng(devices=[]):
            net = cls(*args, **kwargs)
    except Exception as err:  # a constructor rejects bad arguments with several types
        raise CheckpointError(f"{source}: cannot build {record.class_name} from the recorded arguments {kwargs} "
                              f"({type(err).__name__}: {err})") from err
    if type(net.model).__name__ != unet_name:
        raise CheckpointError(f"{source}: the recorded arguments build a {type(net.model).__name__}, "
                              f"but the file holds a {unet_name}")
    load_state_dict_strict(net, {**parameters, **buffers}, str(source))
    return net.eval().requires_grad_(False).to(device)


def describe_edm_pickle(path: str | os.PathLike, *, key: str = "ema", data: dict | None = None) -> dict[str, Any]:
    """What an EDM pickle holds, read with the same restrictions as `load_edm_network`, without
    building or running the network.

    Returns a dict with `kind` ("edm-network-pickle"), `architecture` (e.g.
    "EDMPrecond(DhariwalUNet)"), `resolution` (pixels), `channels`, `label_dim` (0:
    unconditional), `use_fp16`, `parameters` (number of parameter elements), `dtype` (of the
    parameters, e.g. "float32"), `sha256` (of the file), `module_src_sha256` (of the network's
    module source, identifying the code that wrote it), `keys` (the top-level keys) and
    `dataset_kwargs` (the training set options a training snapshot records, or None). `data`:
    the file as `read_persistent_pickle` already read it, to spare a second read.
    """
    source, data = (Path(path).expanduser(), data) if data is not None else _read(path)
    record = _network_record(data, key, source)
    unet_name = _unet_class_name(record, source)
    parameters, _ = module_tensors(record, source=source)

    def plain(value: object) -> object:
        return value if _is_plain(value) else None

    dataset_kwargs = data.get("dataset_kwargs")

    return {
        "kind": KIND,
        "architecture": f"{record.class_name}({unet_name})",
        # The preconditioners keep these constructor arguments as attributes.
        "resolution": plain(record.state.get("img_resolution")),
        "channels": plain(record.state.get("img_channels")),
        "label_dim": plain(record.state.get("label_dim")),
        "use_fp16": plain(record.state.get("use_fp16")),
        "parameters": sum(t.numel() for t in parameters.values()),
        "dtype": ",".join(sorted({str(t.dtype).removeprefix("torch.") for t in parameters.values()})),
        "sha256": sha256_file(source),
        "module_src_sha256": record.module_src_sha256,
        "keys": [str(k) for k in data],
        "dataset_kwargs": plain(dataset_kwargs) if isinstance(dataset_kwargs, dict) else None,
    }
