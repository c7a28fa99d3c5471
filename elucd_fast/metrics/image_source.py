"""Image sets as metrics read them: a folder of PNGs or an npz of uint8 images, in batches,
lazily, with a pixel limit against decompression bombs; and the errors of evaluation."""
from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..checks import file_kind
from ..npz_reader import DEFAULT_MAX_ARRAY_BYTES, NpzError, npz_members, read_npz_member


class EvaluationError(ValueError):
    """An input to evaluation is missing, unreadable, of the wrong shape, or incompatible."""


class MissingWeightsError(EvaluationError):
    """A torch-fidelity feature extractor's weights file was not given or does not exist."""


# Images larger than this many pixels are refused unless the caller raises the limit: 4096 x 4096,
# far beyond any FID set, while a decompression bomb (a small PNG that decodes to gigabytes) stops.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


def image_files(folder: Path) -> list[Path]:
    """Every `*.png` below `folder` (any depth: EDM's tree), in sorted path order. A PNG name that is
    not a regular file (a FIFO, a socket, a device) is refused by name: reading it would block."""
    files = []
    for path in sorted(folder.rglob("*.png")):
        try:
            mode = path.stat().st_mode
        except OSError as err:  # a dangling or looping symbolic link
            raise EvaluationError(f"{path}: cannot be read ({err.strerror or err})") from None
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            raise EvaluationError(f"{path}: is {file_kind(mode)}, not a regular file; an image folder may hold "
                                  "regular .png files only")
        files.append(path)
    return files


class ImageSource:
    """A fixed set of images read in batches as uint8 (B, 3, H, W) tensors, lazily: only one batch
    is decoded at a time.

    From a folder: every `*.png` below it (any depth: EDM's tree), in sorted path order.
    From an `.npz`: its `arr_0`, uint8 (N, H, W, C) with C in {1, 3} (ADM's format), memory-mapped
    where the member is stored uncompressed (as np.savez and this package write it); a deflated
    member is read whole, only if it holds at most `max_array_bytes` (its size is known from the
    file's headers before anything is inflated).
    From an array in memory: uint8 (N, H, W, C), C in {1, 3}, as an npz's `arr_0` (a sample set
    scored without writing it; `path` is then the placeholder `<memory>`).
    Images of more than `max_image_pixels` pixels are refused before they are decoded.
    """

    def __init__(self, path: str | os.PathLike | np.ndarray, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 max_array_bytes: int = DEFAULT_MAX_ARRAY_BYTES):
        in_memory = isinstance(path, np.ndarray)
        self.path = Path("<memory>") if in_memory else Path(path)
        self.max_image_pixels = int(max_image_pixels)
        self.max_array_bytes = int(max_array_bytes)
        if self.max_image_pixels < 1:
            raise EvaluationError(f"max_image_pixels: must be at least 1, got {max_image_pixels}")
        if self.max_array_bytes < 1:
            raise EvaluationError(f"max_array_bytes: must be at least 1, got {max_array_bytes}")
        self._array: np.ndarray | None = None
        self._files: list[Path] = []
        if in_memory:
            self._set_array(path)
        elif self.path.is_dir():
            self._files = image_files(self.path)
            if not self._files:
                raise EvaluationError(f"{self.path}: no .png images in this folder or below it")
            self._image_shape = self._read_png(self._files[0]).shape
        elif self.path.suffix == ".npz" and self.path.exists():
            self._array = self._read_npz()
            self._image_shape = self._array.shape[1:]
        else:
            raise EvaluationError(f"{self.path}: expected a folder of PNG images or an .npz file; "
                                  f"{'no such file or folder' if not self.path.exists() else 'neither'}")

    def _read_npz(self) -> np.ndarray:
        """arr_0, checked from its header (dtype, shape, pixels, bytes) before any data is read."""
        try:
            members = npz_members(self.path)
            if "arr_0" not in members:
                raise EvaluationError(f"{self.path}: no 'arr_0' array (holds {sorted(members)})")
            member = members["arr_0"]
            if member.dtype != np.uint8 or len(member.shape) != 4 or member.shape[3] not in (1, 3):
                raise EvaluationError(f"{self.path}: arr_0 must be uint8 (N, H, W, 1|3) images, got "
                                      f"{member.dtype} {member.shape}")
            if member.shape[0] == 0:
                raise EvaluationError(f"{self.path}: arr_0 holds no images")
            self._check_pixels(self.path, member.shape[2], member.shape[1])
            return read_npz_member(self.path, "arr_0", max_bytes=self.max_array_bytes, mmap=True, member=member)
        except NpzError as err:
            raise EvaluationError(str(err)) from err

    def _set_array(self, array: np.ndarray) -> None:
        """Reads from `array` (images in memory), checked."""
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] not in (1, 3):
            raise EvaluationError(f"{self.path}: images must be uint8 (N, H, W, 1|3), got {array.dtype} {array.shape}")
        if len(array) == 0:
            raise EvaluationError(f"{self.path}: images holds no images")
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
