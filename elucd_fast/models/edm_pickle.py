"""Reading EDM network pickles (such as `edm-imagenet-64x64-cond-adm.pkl`) without running any
code from the file.

EDM saves `pickle.dump({'ema': net, 'loss_fn': ..., 'augment_pipe': ..., 'dataset_kwargs': {...}})`
where every network object comes from a class decorated by EDM's `torch_utils.persistence`. Such
an object is pickled as the call `torch_utils.persistence._reconstruct_persistent_obj(meta)`:
`meta` holds the Python source of the module that defined the class (`module_src`), the class
name and the object's `__dict__` (`state`), which includes its constructor arguments
(`_init_args`, `_init_kwargs`). `pickle.load` executes that source, so a pickle can run anything.

Here a restricted unpickler resolves only the globals such a file needs, each to an inert
stand-in, and refuses every other one:

- `_reconstruct_persistent_obj` -> a `PersistentRecord` of class name, sha256 of the module
  source and state: the source is hashed, never compiled or executed;
- `torch.storage._load_from_bytes` (each tensor's storage is a nested `torch.save` blob) ->
  `torch.load(..., weights_only=True)`, so the blob cannot run code either;
- `torch._utils._rebuild_tensor_v2` and `_rebuild_parameter` -> the tensor, after checking that
  offset, sizes and strides stay inside its storage (torch would instead grow the storage and
  hand back uninitialised memory);
- `collections.OrderedDict` -> itself; `torch.nn.ModuleDict` -> a record of its state.

The objects the unpickler hands out (records and wrapped functions) refuse pickle's BUILD step,
so a file cannot set attributes on them, for instance re-`set_` a tensor past its storage or
change a function's defaults for later loads. The network itself is rebuilt from our classes in
`edm_networks.py` with the recorded constructor arguments, and the parameters and buffers
gathered from the records are loaded strictly.

A hostile file cannot run code this way, but it can still make the loader allocate much memory
(a storage blob claiming a large size, huge recorded constructor arguments) before it is refused.
"""
from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, existing_file, load_state_dict_strict, sha256_file
from .edm_networks import NETWORK_CLASS_NAMES, PRECONDITIONERS

KIND = "edm-network-pickle"
_UNET_CLASS_NAMES = ("SongUNet", "DhariwalUNet")


class _Refusal(CheckpointError):
    """A problem found while reading; `_read_pickle` prefixes the file name."""


class PersistentRecord:
    """One object pickled by EDM's persistence mechanism, as data: `class_name` (e.g.
    "EDMPrecond"), `version` of the persistence format, `module_src_sha256` (hex sha256 of the
    UTF-8 module source) and `state` (the object's `__dict__`)."""

    __slots__ = ("class_name", "version", "module_src_sha256", "state")

    def __init__(self, class_name: str, version: object, module_src_sha256: str, state: object) -> None:
        self.class_name = class_name
        self.version = version
        self.module_src_sha256 = module_src_sha256
        self.state = state

    def __setstate__(self, state: object) -> None:
        raise _Refusal(f"the pickle tries to set attributes of the persistent object {self.class_name!r}")

    def __repr__(self) -> str:
        return f"PersistentRecord({self.class_name!r}, module_src_sha256={self.module_src_sha256[:12]}...)"


class _ContainerRecord:
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

    __slots__ = ("tensor", "is_parameter")

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


def _is_empty_hooks(value: object) -> bool:
    return isinstance(value, dict) and not value


def _tensor(storage: object, storage_offset: object, size: object, stride: object, requires_grad: object,
            backward_hooks: object, metadata: object = None) -> _TensorRecord:
    """Stand-in for `torch._utils._rebuild_tensor_v2`: the same tensor, once its layout is
    checked to stay inside the storage."""
    if not isinstance(storage, _StorageRecord):
        raise _Refusal(f"a tensor is built on a {type(storage).__name__}, not on a storage from a tensor blob")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and all(map(_is_index, size)) and all(map(_is_index, stride)) and _is_index(storage_offset)):
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


class _Allowed:
    """A function the pickle may call. Unlike a plain function object, it refuses BUILD, so a
    file cannot change its attributes (such as `__defaults__`) for later loads."""

    __slots__ = ("_function",)

    def __init__(self, function: Any) -> None:
        self._function = function

    def __call__(self, *args: object) -> object:
        return self._function(*args)

    def __setstate__(self, state: object) -> None:
        raise _Refusal("the pickle tries to set attributes of a function")


# (module, name) -> stand-in, for every global an EDM network pickle needs.
_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _Allowed(_persistent_object),
    ("torch.storage", "_load_from_bytes"): _Allowed(_storage_from_bytes),
    ("torch._utils", "_rebuild_tensor_v2"): _Allowed(_tensor),
    ("torch._utils", "_rebuild_parameter"): _Allowed(_parameter),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.nn.modules.container", "ModuleDict"): _ContainerRecord,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `_ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str) -> object:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise _Refusal(f"refused the global {module}.{name}: it is not one of the {len(_ALLOWED_GLOBALS)} "
                           f"an EDM network pickle needs, and loading it could run code")
        return allowed

    def persistent_load(self, pid: object) -> object:
        raise _Refusal("refused a persistent id: EDM network pickles have none")


def _read_pickle(path: str | os.PathLike) -> tuple[Path, dict]:
    """(path, top-level dict) of an EDM pickle read by the restricted unpickler."""
    p = existing_file(path, "EDM network pickle")
    try:
        with open(p, "rb") as f:
            data = _RestrictedUnpickler(f).load()
    except _Refusal as err:
        raise CheckpointError(f"{p}: {err}") from err
    except Exception as err:  # pickle raises many types for truncated or damaged files
        raise CheckpointError(f"{p}: not a readable EDM network pickle ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{p}: holds a {type(data).__name__}, not EDM's dict with an 'ema' network")
    return p, data


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


def _module_state(record: object, name: str, source: Path) -> dict:
    """The state of a pickled module (a persistent EDM layer or a ModuleDict), checked to hold
    the dicts of parameters, buffers and submodules that torch modules have."""
    if isinstance(record, PersistentRecord):
        if record.class_name not in NETWORK_CLASS_NAMES:
            raise CheckpointError(f"{source}: module {name!r} is an unknown class {record.class_name!r}, "
                                  f"not one of EDM's network classes")
    elif not isinstance(record, _ContainerRecord):
        raise CheckpointError(f"{source}: module {name!r} is a {type(record).__name__}, not a torch module")
    state = getattr(record, "state", None)
    fields = ("_parameters", "_buffers", "_modules")
    if not isinstance(state, dict) or not all(isinstance(state.get(field), dict) for field in fields):
        raise CheckpointError(f"{source}: module {name!r} ({record.class_name}) does not have the state of a torch "
                              f"module (dicts {', '.join(fields)})")
    return state


def _network_tensors(record: PersistentRecord,
                     source: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(parameters, persistent buffers) of the module tree under `record`, by state-dict name."""
    parameters: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    pending: list[tuple[str, object]] = [("", record)]
    while pending:
        prefix, module = pending.pop()
        where = prefix.rstrip(".") or "<root>"
        # A pickle may reference one object twice or in a cycle; EDM networks are trees.
        if id(module) in seen:
            raise CheckpointError(f"{source}: module {where!r} appears more than once in the network")
        seen.add(id(module))
        state = _module_state(module, where, source)
        non_persistent = state.get("_non_persistent_buffers_set", set())
        if not isinstance(non_persistent, (set, frozenset)):
            raise CheckpointError(f"{source}: module {where!r} has a malformed list of non-persistent buffers")
        for field, target in (("_parameters", parameters), ("_buffers", buffers)):
            for name, value in state[field].items():
                if not isinstance(name, str) or "." in name:
                    raise CheckpointError(f"{source}: malformed tensor name {name!r} in module {where!r}")
                if value is None or (field == "_buffers" and name in non_persistent):
                    continue
                if not isinstance(value, _TensorRecord):
                    raise CheckpointError(f"{source}: {prefix}{name} is a {type(value).__name__}, not a tensor")
                target[prefix + name] = value.tensor
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


def _init_arguments(record: PersistentRecord, source: Path) -> tuple[tuple, dict[str, Any]]:
    """The (args, kwargs) EDM's persistence recorded for the network's constructor."""
    args, kwargs = record.state.get("_init_args"), record.state.get("_init_kwargs")
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        raise CheckpointError(f"{source}: {record.class_name} does not record its constructor arguments "
                              f"(_init_args, _init_kwargs), so the architecture is unknown")
    if not (_is_plain(args) and _is_plain(kwargs)):
        raise CheckpointError(f"{source}: {record.class_name}'s constructor arguments hold objects other than "
                              f"numbers, strings, lists and dicts")
    return tuple(args), dict(kwargs)


def _unet_class_name(record: PersistentRecord, source: Path) -> str:
    """Class name of the preconditioner's U-Net (`state['_modules']['model']`)."""
    model = _module_state(record, "<root>", source)["_modules"].get("model")
    if not isinstance(model, PersistentRecord) or model.class_name not in _UNET_CLASS_NAMES:
        found = model.class_name if isinstance(model, PersistentRecord) else type(model).__name__
        raise CheckpointError(f"{source}: {record.class_name}.model is {found!r}, not one of {_UNET_CLASS_NAMES}")
    return model.class_name


def load_edm_network(path: str | os.PathLike, *, key: str = "ema",
                     device: str | torch.device = "cpu") -> torch.nn.Module:
    """The EDM network stored under `key` of an EDM pickle, rebuilt from our classes.

    Nothing from the file is executed: see the module docstring for what is read and how.

    Args:
        path: local EDM pickle, e.g. `edm-imagenet-64x64-cond-adm.pkl`.
        key: top-level key of the network; EDM's snapshots keep the EMA weights under "ema".
        device: where the returned network lives.

    Returns:
        An `EDMPrecond`, `VPPrecond`, `VEPrecond` or `iDDPMPrecond` (around a `DhariwalUNet` or
        `SongUNet`) built with the constructor arguments recorded in the file, in eval mode, with
        parameters frozen (gradients with respect to the input still flow). Call it as
        `net(x, sigma, class_labels)` with x (B, C, R, R) and sigma a float, 0-d or (B,) tensor.

    Raises:
        CheckpointError: missing or unreadable file, a global outside the allowlist, a nested
            blob that is not a plain storage, a tensor reaching past its storage, a missing key,
            an unknown class, a state that is not a torch module's, unrecorded constructor
            arguments, or weights that do not fit the rebuilt network or are not finite.
    """
    source, data = _read_pickle(path)
    record = _network_record(data, key, source)
    unet_name = _unet_class_name(record, source)
    parameters, buffers = _network_tensors(record, source)
    args, kwargs = _init_arguments(record, source)
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


def describe_edm_pickle(path: str | os.PathLike, *, key: str = "ema") -> dict[str, Any]:
    """What an EDM pickle holds, read with the same restrictions as `load_edm_network`, without
    building or running the network.

    Returns a dict with `kind` ("edm-network-pickle"), `architecture` (e.g.
    "EDMPrecond(DhariwalUNet)"), `resolution` (pixels), `channels`, `label_dim` (0:
    unconditional), `use_fp16`, `parameters` (number of parameter elements), `dtype` (of the
    parameters, e.g. "float32"), `sha256` (of the file), `module_src_sha256` (of the network's
    module source, identifying the code that wrote it) and `keys` (the top-level keys).
    """
    source, data = _read_pickle(path)
    record = _network_record(data, key, source)
    unet_name = _unet_class_name(record, source)
    parameters, _ = _network_tensors(record, source)

    def attribute(name: str) -> object:
        # The preconditioners keep these constructor arguments as attributes.
        value = record.state.get(name)
        return value if _is_plain(value) else None

    return {
        "kind": KIND,
        "architecture": f"{record.class_name}({unet_name})",
        "resolution": attribute("img_resolution"),
        "channels": attribute("img_channels"),
        "label_dim": attribute("label_dim"),
        "use_fp16": attribute("use_fp16"),
        "parameters": sum(t.numel() for t in parameters.values()),
        "dtype": ",".join(sorted({str(t.dtype).removeprefix("torch.") for t in parameters.values()})),
        "sha256": sha256_file(source),
        "module_src_sha256": record.module_src_sha256,
        "keys": [str(k) for k in data],
    }
