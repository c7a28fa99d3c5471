"""Image sets as metrics read them: a folder of PNGs or an npz of uint8 images, in batches,
lazily, with a pixel limit against decompression bombs; and the errors of evaluation."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image


class EvaluationError(ValueError):
    """An input to evaluation is missing, unreadable, of the wrong shape, or incompatible."""


class MissingWeightsError(EvaluationError):
    """A torch-fidelity feature extractor's weights file was not given or does not exist."""


# Images larger than this many pixels are refused unless the caller raises the limit: 4096 x 4096,
# far beyond any FID set, while a decompression bomb (a small PNG that decodes to gigabytes) stops.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


class ImageSource:
    """A fixed set of images read in batches as uint8 (B, 3, H, W) tensors, lazily: only one batch
    is decoded at a time.

    From a folder: every `*.png` below it (any depth: EDM's tree), in sorted path order.
    From an `.npz`: its `arr_0`, uint8 (N, H, W, C) with C in {1, 3} (ADM's format), memory-mapped
    where the member is stored uncompressed (as np.savez and this package write it).
    From an array in memory: uint8 (N, H, W, C), C in {1, 3}, as an npz's `arr_0` (a sample set
    scored without writing it; `path` is then the placeholder `<memory>`).
    Images of more than `max_image_pixels` pixels are refused before they are decoded.
    """

    def __init__(self, path: str | os.PathLike | np.ndarray, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        in_memory = isinstance(path, np.ndarray)
        self.path = Path("<memory>") if in_memory else Path(path)
        self.max_image_pixels = int(max_image_pixels)
        if self.max_image_pixels < 1:
            raise EvaluationError(f"max_image_pixels: must be at least 1, got {max_image_pixels}")
        self._array: np.ndarray | None = None
        self._files: list[Path] = []
        if in_memory:
            self._set_array(path)
        elif self.path.is_dir():
            self._files = sorted(self.path.rglob("*.png"))
            if not self._files:
                raise EvaluationError(f"{self.path}: no .png images in this folder or below it")
            self._image_shape = self._read_png(self._files[0]).shape
        elif self.path.is_file() and self.path.suffix == ".npz":
            self._set_array(_npz_member(self.path, "arr_0"))
        else:
            raise EvaluationError(f"{self.path}: expected a folder of PNG images or an .npz file; "
                                  f"{'no such file or folder' if not self.path.exists() else 'neither'}")

    def _set_array(self, array: np.ndarray) -> None:
        """Reads from `array` (an npz's arr_0 or an array in memory), checked."""
        what = "arr_0" if self.path.suffix == ".npz" else "images"
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] not in (1, 3):
            raise EvaluationError(f"{self.path}: {what} must be uint8 (N, H, W, 1|3) images, got "
                                  f"{array.dtype} {array.shape}")
        if len(array) == 0:
            raise EvaluationError(f"{self.path}: {what} holds no images")
        self._array = array
        self._image_shape = array.shape[1:]
        self._check_pixels(self.path, self._image_shape[1], self._image_shape[0])

    def __len__(self) -> int:
        return len(self._files) if self._array is None else len(self._array)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Consecutive batches of uint8 (B, 3, H, W) images covering the whole set once."""
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            if self._array is not None:
                batch = self._array[start:stop]
            else:
                batch = np.stack([self._read_png(p) for p in self._files[start:stop]])
            # A copy: one batch of a memory-mapped file (read-only pages) becomes an ordinary array.
            images = torch.from_numpy(np.array(batch, copy=True, order="C")).permute(0, 3, 1, 2)
            yield images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

    def _check_pixels(self, path: Path, width: int, height: int) -> None:
        if width * height > self.max_image_pixels:
            raise EvaluationError(f"{path}: an image of {width} x {height} = {width * height:,} pixels exceeds the limit of "
                                  f"{self.max_image_pixels:,} (max_image_pixels, --max-image-pixels to raise it)")

    def _read_png(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as image:
                # The header gives the size: check it before decoding a single pixel.
                self._check_pixels(path, *image.size)
                array = np.asarray(image.convert("RGB"))
        except Image.DecompressionBombError as err:
            raise EvaluationError(f"{path}: the image decodes to too many pixels ({err}); the limit is "
                                  f"{self.max_image_pixels:,} (--max-image-pixels)") from err
        except (OSError, ValueError) as err:
            raise EvaluationError(f"{path}: unreadable image ({err})") from err
        if self._files and path != self._files[0] and array.shape != self._image_shape:
            raise EvaluationError(f"{path}: image of shape {array.shape}, the first one is {self._image_shape}")
        return array


def _npz_member(path: Path, key: str) -> np.ndarray:
    """`key` of an npz, memory-mapped when stored uncompressed (read lazily, page by page),
    otherwise read whole."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(f"{key}.npy")
            stored = info.compress_type == zipfile.ZIP_STORED
    except KeyError:
        return _load_npz_member(path, key)  # names the missing member
    except (OSError, zipfile.BadZipFile) as err:
        raise EvaluationError(f"{path}: unreadable npz ({type(err).__name__}: {err})") from err
    if not stored:
        return _load_npz_member(path, key)
    with open(path, "rb") as f:
        # The member's data follows its local header: 30 bytes, the name and an extra field.
        f.seek(info.header_offset + 26)
        name_length, extra_length = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(info.header_offset + 30 + name_length + extra_length)
        try:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
        except ValueError as err:
            raise EvaluationError(f"{path}: unreadable array {key!r} ({err})") from err
        offset = f.tell()
    if dtype.hasobject or fortran:
        return _load_npz_member(path, key)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _load_npz_member(path: Path, key: str) -> np.ndarray:
    try:
        with np.load(path) as archive:
            if key not in archive.files:
                raise EvaluationError(f"{path}: no {key!r} array (holds {archive.files})")
            return archive[key]
    except EvaluationError:
        raise
    except Exception as err:  # numpy raises several types for damaged archives
        raise EvaluationError(f"{path}: unreadable npz ({type(err).__name__}: {err})") from err
