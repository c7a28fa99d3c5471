"""EDM2's `dataset-refs` statistics files (`img512.pkl`, `img64.pkl`, ...), read without running
any code from them, and written in the same format.

EDM2's `calculate_metrics.py ref` saves, with `pickle.dump`,

    {"num_images": int,
     "fid":       {"mu": float64 (2048,), "sigma": float64 (2048, 2048)},   # Inception-v3
     "fd_dinov2": {"mu": float64 (1024,), "sigma": float64 (1024, 1024)}}   # DINOv2 ViT-L/14

where a metric's entry is present only if it was computed, and `mu`/`sigma` are numpy arrays
(from `torch.Tensor.numpy()`). `pickle.load` would run whatever a file asks, so here a restricted
unpickler resolves only the numpy globals that array pickles use, each to a stand-in that checks
its arguments, and refuses every other global (`os.system`, `builtins.eval`, ...) before it is
called:

- `numpy.ndarray` and `numpy.core.multiarray._reconstruct` (`numpy._core` in numpy 2), the
  default protocols' arrays: an empty record that takes the array's state (shape, dtype, Fortran
  order, raw bytes) once;
- `numpy.core.numeric._frombuffer`, protocol 5's arrays: the same from a buffer, shape and order;
- `numpy.dtype`: numeric dtypes only (bool, integers, floats, complex), never objects or records;
- `numpy.core.multiarray.scalar`: a numeric numpy scalar, as a Python number.

Every array's bytes come from the file, and the total size of the arrays built is bounded by the
file's size, so a small hostile file cannot make the reader allocate much memory.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..runs.atomic import atomic_write

NUM_IMAGES_KEY = "num_images"
MAX_FILE_BYTES = 1 << 30
_NUMERIC_KINDS = "biufc"
_CORE_MODULES = ("numpy.core", "numpy._core")
_MAX_DEPTH = 8


class DatasetRefsError(ValueError):
    """A dataset-refs file is missing, not such a file, or asks for anything but numeric arrays."""


class _Refusal(Exception):
    """A problem found while unpickling; `read_dataset_refs` names the file."""


class _DtypeRecord:
    """A numeric `numpy.dtype`; pickle's BUILD may set its byte order once."""

    __slots__ = ("dtype", "built")

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype, self.built = dtype, False

    def __setstate__(self, state: object) -> None:
        # numpy's dtype state: (version, byte order, subarray, names, fields, itemsize, alignment, flags).
        if self.built or not isinstance(state, tuple) or len(state) < 5 or state[1] not in ("<", ">", "|", "="):
            raise _Refusal(f"an unexpected dtype state {state!r:.80}")
        if any(part is not None for part in state[2:5]):
            raise _Refusal("a structured or sub-array dtype")
        self.built = True
        if state[1] in "<>":
            self.dtype = self.dtype.newbyteorder(state[1])


class _ArrayRecord:
    """A numpy array being read: empty until its state arrives, then `array`."""

    __slots__ = ("budget", "array")

    def __init__(self, budget: list[int]) -> None:
        self.budget, self.array = budget, None

    def fill(self, data: object, dtype: object, shape: object, fortran: bool) -> None:
        if self.array is not None:
            raise _Refusal("an array's state given twice")
        if not isinstance(dtype, _DtypeRecord):
            raise _Refusal(f"an array of dtype {type(dtype).__name__}, not a numeric numpy dtype")
        if (not isinstance(shape, tuple) or len(shape) > 8
                or not all(type(n) is int and n >= 0 for n in shape)):
            raise _Refusal(f"an array shape {shape!r:.80}")
        if not isinstance(data, (bytes, bytearray)):
            raise _Refusal(f"array data of type {type(data).__name__}, not bytes")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.dtype.itemsize
        if nbytes != len(data):
            raise _Refusal(f"array data of {len(data)} bytes for shape {shape} of {dtype.dtype}")
        if nbytes > self.budget[0]:
            raise _Refusal("arrays larger in total than the file itself")
        self.budget[0] -= nbytes
        flat = np.frombuffer(data, dtype=dtype.dtype).copy()
        self.array = flat.reshape(shape, order="F" if fortran else "C")

    def __setstate__(self, state: object) -> None:
        # numpy's ndarray state: (version, shape, dtype, is_fortran, raw bytes).
        if not isinstance(state, tuple) or len(state) != 5 or type(state[3]) is not bool:
            raise _Refusal(f"an unexpected array state {state!r:.80}")
        self.fill(state[4], state[2], state[1], state[3])


class _Global:
    """A global the file may name, standing in for numpy's: calls `function` (None: not callable,
    only an argument) and refuses pickle's BUILD, so that a file cannot change it."""

    __slots__ = ("name", "function")

    def __init__(self, name: str, function: Any = None) -> None:
        self.name, self.function = name, function

    def __call__(self, *args: object) -> object:
        if self.function is None:
            raise _Refusal(f"a call of {self.name}")
        return self.function(*args)

    def __setstate__(self, state: object) -> None:
        raise _Refusal(f"it tries to set attributes of {self.name}")


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, budget: int) -> None:
        super().__init__(file)
        self.budget = [budget]

    def find_class(self, module: str, name: str) -> Any:
        allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): None, ("numpy", "dtype"): _dtype}
        for core in _CORE_MODULES:
            allowed.update({(f"{core}.multiarray", "_reconstruct"): self._reconstruct,
                            (f"{core}.numeric", "_frombuffer"): self._frombuffer,
                            (f"{core}.multiarray", "scalar"): _scalar})
        if (module, name) not in allowed:
            raise _Refusal(f"it refers to {module}.{name}, which statistics never need; nothing was run")
        return _Global(f"{module}.{name}", allowed[module, name])

    def persistent_load(self, pid: object) -> object:
        raise _Refusal("it refers to a persistent object")

    def _reconstruct(self, cls: object, shape: object, typecode: object) -> _ArrayRecord:
        if not (isinstance(cls, _Global) and cls.name == "numpy.ndarray") or shape != (0,) or typecode != b"b":
            raise _Refusal("an unexpected numpy _reconstruct call")
        return _ArrayRecord(self.budget)

    def _frombuffer(self, data: object, dtype: object, shape: object, order: object) -> _ArrayRecord:
        if order not in ("C", "F"):
            raise _Refusal(f"an array order {order!r:.20}")
        record = _ArrayRecord(self.budget)
        record.fill(data, dtype, shape, order == "F")
        return record


def _dtype(name: object, align: object = False, copy: object = True) -> _DtypeRecord:
    if not isinstance(name, str) or len(name) > 8:
        raise _Refusal(f"a dtype {name!r:.40}")
    try:
        dtype = np.dtype(name)
    except TypeError as err:
        raise _Refusal(f"a dtype {name!r}") from err
    if dtype.kind not in _NUMERIC_KINDS:
        raise _Refusal(f"a dtype {name!r} that is not numeric")
    return _DtypeRecord(dtype)


def _scalar(dtype: object, data: object) -> int | float | complex | bool:
    if not isinstance(dtype, _DtypeRecord) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise _Refusal("an unexpected numpy scalar")
    return np.frombuffer(data, dtype=dtype.dtype)[0].item()


def _plain(value: object, depth: int = 0) -> object:
    """The unpickled value with its array records replaced by arrays; anything but dicts with
    string keys, lists, tuples, numbers, strings and arrays is refused."""
    if depth > _MAX_DEPTH:
        raise _Refusal("containers nested too deeply")
    if isinstance(value, _ArrayRecord):
        if value.array is None:
            raise _Refusal("an array without data")
        return value.array
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise _Refusal("a dict with keys that are not strings")
        return {key: _plain(item, depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item, depth + 1) for item in value)
    if value is None or isinstance(value, (bool, int, float, complex, str)):
        return value
    raise _Refusal(f"a value of type {type(value).__name__}")


def read_dataset_refs(path: str | os.PathLike) -> dict[str, Any]:
    """The statistics of an EDM2 dataset-refs file: {"num_images": int | None, metric: {"mu":
    float64 (D,), "sigma": float64 (D, D)}, ...} for every metric entry it holds ("fid",
    "fd_dinov2"). Raises DatasetRefsError, without running anything from the file, for a file that
    asks for any object but numeric numpy arrays, or whose statistics are malformed."""
    path = Path(path)
    if not path.is_file():
        raise DatasetRefsError(f"{path}: no such file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DatasetRefsError(f"{path}: {size} bytes, more than any statistics file ({MAX_FILE_BYTES})")
    try:
        # Read from memory: the unpickler then never reads (allocates) past the file's end.
        data = _plain(_Unpickler(io.BytesIO(path.read_bytes()), budget=size).load())
    except _Refusal as err:
        raise DatasetRefsError(f"{path}: refused as EDM2 dataset-refs statistics: {err}") from None
    except Exception as err:  # a damaged pickle raises many types; none of them runs the file's code
        raise DatasetRefsError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise DatasetRefsError(f"{path}: holds a {type(data).__name__}, not EDM2's dict of statistics")
    num_images = data.get(NUM_IMAGES_KEY)
    if num_images is not None and (type(num_images) is not int or num_images < 2):
        raise DatasetRefsError(f"{path}: num_images {num_images!r} is not a count of at least 2 images")
    result: dict[str, Any] = {NUM_IMAGES_KEY: num_images}
    for metric, entry in data.items():
        if metric == NUM_IMAGES_KEY:
            continue
        if not isinstance(entry, dict) or not {"mu", "sigma"} <= set(entry):
            raise DatasetRefsError(f"{path}: entry {metric!r} is not a dict with mu and sigma")
        mu, sigma = entry["mu"], entry["sigma"]
        if not (isinstance(mu, np.ndarray) and isinstance(sigma, np.ndarray) and mu.ndim == 1
                and sigma.shape == (len(mu), len(mu)) and mu.dtype.kind == "f" and sigma.dtype.kind == "f"):
            raise DatasetRefsError(f"{path}: {metric} mu and sigma must be float arrays (D,) and (D, D), got "
                                   f"{getattr(mu, 'shape', type(mu).__name__)} and "
                                   f"{getattr(sigma, 'shape', type(sigma).__name__)}")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise DatasetRefsError(f"{path}: {metric} statistics are not all finite")
        result[metric] = {"mu": mu.astype(np.float64), "sigma": sigma.astype(np.float64)}
    if len(result) == 1:
        raise DatasetRefsError(f"{path}: holds no statistics (keys {sorted(data)})")
    return result


def write_dataset_refs(path: str | os.PathLike, statistics: dict[str, tuple[np.ndarray, np.ndarray]],
                       num_images: int) -> None:
    """Writes `statistics` (metric -> (mu, sigma)) as EDM2 does, atomically, so that EDM2's
    `calculate_metrics.py calc --ref` reads it too."""
    stats: dict[str, Any] = {NUM_IMAGES_KEY: int(num_images)}
    for metric, (mu, sigma) in statistics.items():
        stats[metric] = {"mu": np.asarray(mu, dtype=np.float64), "sigma": np.asarray(sigma, dtype=np.float64)}
    blob = pickle.dumps(stats, protocol=4)
    atomic_write(Path(path), lambda f: f.write(blob))


__all__ = ["DatasetRefsError", "MAX_FILE_BYTES", "NUM_IMAGES_KEY", "read_dataset_refs", "write_dataset_refs"]
