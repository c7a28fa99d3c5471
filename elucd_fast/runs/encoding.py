"""Byte-stable encoders of samples: the same pixels always give the same bytes, so a file's
recorded sha256 depends on its images only."""
from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable, Mapping
from typing import BinaryIO, NamedTuple

import numpy as np
from PIL import Image

# Fixed zip metadata: the bytes of an npz, and so its recorded sha256, must depend on its
# arrays only, not on the clock or on the zipfile module's defaults.
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
_ZIP_FILE_MODE = 0o644 << 16
# Fixed PNG encoder settings (EDM's defaults, written out): the same pixels give the same bytes.
_PNG_OPTIONS = {"format": "PNG", "compress_level": 6, "optimize": False}


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of one uint8 image (H, W, C) with C = 3 (RGB) or 1 (L)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"png: expected a uint8 (H, W, 1|3) image, got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, **_PNG_OPTIONS)
    return buffer.getvalue()


class StreamedArray(NamedTuple):
    """An npz member written chunk by chunk: C-order `chunks` that concatenate to `shape`."""

    dtype: np.dtype
    shape: tuple[int, ...]
    chunks: Iterable[np.ndarray]


def write_npz(f: BinaryIO, arrays: Mapping[str, np.ndarray | StreamedArray]) -> None:
    """Writes an uncompressed npz (as `np.savez`) with fixed zip metadata, so equal arrays give
    equal bytes. A `StreamedArray` member never needs to be whole in memory."""
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, value in arrays.items():
            if isinstance(value, np.ndarray):
                value = StreamedArray(value.dtype, value.shape, [value])
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE_TIME)
            info.external_attr = _ZIP_FILE_MODE
            with archive.open(info, "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(value.dtype)),
                          "fortran_order": False, "shape": tuple(value.shape)}
                np.lib.format.write_array_header_1_0(member, header)
                written = 0
                for chunk in value.chunks:
                    chunk = np.ascontiguousarray(chunk, dtype=value.dtype)
                    member.write(chunk.tobytes())
                    written += chunk.size
                if written != int(np.prod(value.shape)):
                    raise ValueError(f"npz member {key!r}: chunks hold {written} values, shape "
                                     f"{tuple(value.shape)} needs {int(np.prod(value.shape))}")
