"""Training images as one (N, C, H, W) tensor, read as float32 in [-1, 1]: the bundled digits, a folder, or CIFAR-10.

* ``"digits"``: scikit-learn's 8x8 handwritten digits (1,797 images, bundled with scikit-learn, no
  download). Pixel values 0..16 are divided by 16, upsampled 8x8 -> 16x16 bilinearly
  (``align_corners=False``), then mapped to [-1, 1] by ``2 x - 1``; 16x16 is the smallest size the
  U-Net's two levels and 8x8 attention work at. A fixed permutation (seed 0) splits 1,497 training
  and 300 held-out images; the held-out ones are what :mod:`ddpm_fast.evaluate` scores samples against.
  Digits are never flipped by default (a mirrored 2, 3, 4, 5, 6, 7 or 9 is not that digit).
* a folder of PNG / JPEG images (searched recursively): each is turned upright by its EXIF orientation,
  converted to RGB (or L with ``channels=1``), its shorter side resized to ``size`` (bicubic), then
  center-cropped to size x size; 8-bit values x map to x / 255 * 2 - 1. 16-bit grayscale maps by
  x / 65535 * 2 - 1 (resized in float); 16-bit color PNGs arrive from Pillow already reduced to 8 bits.
* a CIFAR-10 "python version" directory (``data_batch_1`` .. ``data_batch_5``, or ``test_batch`` with
  ``split="test"``): 32x32 RGB. The pickles are read with an unpickler that only builds numpy arrays, so a
  tampered file cannot run code.

Everything lands in memory, and 8-bit images stay 8-bit there (``ImageDataset.data`` is uint8; ``images`` maps
it to [-1, 1] when read): CIFAR-10 takes 150 MB, 30,000 RGB images at 256x256 5.9 GB (23.6 GB as float32).
Data that is not 8-bit (the digits, 16-bit grayscale, a resized CIFAR-10) is held as float32. A missing,
empty or corrupt dataset raises :class:`DatasetError` naming the path and what is wrong.
"""

from __future__ import annotations

import io
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DatasetError", "ImageDataset", "load_cifar10", "load_dataset", "load_digits", "load_image_folder",
           "to_unit_range"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DIGITS_HELD_OUT = 300
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


class DatasetError(ValueError):
    """A dataset that is missing, empty or unreadable; the message names the path and the problem."""


@dataclass(init=False)
class ImageDataset:
    """data: (N, C, H, W) uint8 pixel values 0..255, or floating point in [-1, 1]; labels: (N,) int64 or None;
    flip: the default for training. ``images`` is the data in [-1, 1] (see :func:`to_unit_range`): for uint8
    data a new float32 tensor on each read (index ``data`` first for a few images; an edit of it is not kept).
    ``ImageDataset(name, images=...)`` (the older name of ``data``) still works."""

    name: str
    data: torch.Tensor
    labels: torch.Tensor | None = None
    flip: bool = True

    def __init__(self, name: str, data: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                 flip: bool = True, *, images: torch.Tensor | None = None):
        if (data is None) == (images is None):
            raise TypeError("ImageDataset: give the images once, as data (or images, its older name)")
        self.name, self.labels, self.flip = name, labels, flip
        self.images = data if data is not None else images

    @property
    def images(self) -> torch.Tensor:
        return to_unit_range(self.data)

    @images.setter
    def images(self, value: torch.Tensor) -> None:
        if not isinstance(value, torch.Tensor) or value.dim() != 4 or not (
                value.dtype == torch.uint8 or value.is_floating_point()):
            got = f"{value.dtype} of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value)
            raise TypeError(f"ImageDataset: images must be (N, C, H, W) uint8 or floating point, got {got}")
        self.data = value

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The per-image shape (C, H, W)."""
        return tuple(self.data.shape[1:])


def _to_unit_range(pixels01: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1], in place (the caller's own tensor: a dataset's memory is not held twice)."""
    return pixels01.mul_(2.0).sub_(1.0).clamp_(-1.0, 1.0).contiguous()


# Byte x's value in [-1, 1]: x / 255 * 2 - 1 in float32 on the CPU, as the loaders computed it. A table, not
# arithmetic, so that every device gives these values (CUDA divides by a scalar as a multiply by its reciprocal,
# 1 ulp off for 111 of the 256 bytes).
_BYTE_VALUES = _to_unit_range(torch.arange(256, dtype=torch.float32).div_(255.0))
_byte_values_on: dict[torch.device, torch.Tensor] = {}


def to_unit_range(data: torch.Tensor) -> torch.Tensor:
    """Dataset values as float32 in [-1, 1]: uint8 x -> x / 255 * 2 - 1 (the same values on every device); floating
    point data is returned as it is."""
    if data.dtype != torch.uint8:
        return data
    table = _byte_values_on.get(data.device)
    if table is None:  # copied once per device: a copy per batch would make the host wait for the GPU
        table = _byte_values_on[data.device] = _BYTE_VALUES.to(data.device)
    return table[data.long()]


# --------------------------------------------------------------------------------------------------- digits

def load_digits(split: str = "train", size: int = 16) -> ImageDataset:
    """scikit-learn's digits: split "train" (1,497 images), "test" (300 held out) or "all" (1,797).

    Returns (N, 1, size, size) images in [-1, 1] (see the module docstring for the scaling) with labels.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"load_digits: split must be 'train', 'test' or 'all', got {split!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"load_digits: size must be an int >= 8, got {size!r}")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise DatasetError("the digits dataset needs scikit-learn (pip install 'ddpm-fast[demo]')") from error
    bunch = sklearn_digits()
    pixels = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    if size != 8:
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    if split != "all":
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        keep = order[DIGITS_HELD_OUT:] if split == "train" else order[:DIGITS_HELD_OUT]
        pixels, labels = pixels[keep], labels[keep]
    return ImageDataset(f"digits-{split}", _to_unit_range(pixels), labels, flip=False)


# --------------------------------------------------------------------------------------------- image folder

def _resize_center_crop(image, size: int):
    """A PIL image -> size x size: shorter side to ``size`` (bicubic), then the center square."""
    from PIL import Image
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


# Modes Pillow's PNG / JPEG readers give 8-bit samples in, which convert("L" / "RGB") maps exactly (16-bit color
# PNGs open as RGB / RGBA, already reduced to their high bytes).
_EIGHT_BIT_MODES = frozenset({"1", "L", "P", "LA", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
# 16-bit grayscale (older Pillow opens such a PNG as "I"): convert() clips these at 255, so mid-grey 32768 came
# out white; they are scaled by 65535 in float instead.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def _image_pixels(image, size: int, channels: int) -> np.ndarray:
    """An opened PIL image -> (size, size, channels): uint8 for 8-bit images, float32 in [0, 1] for 16-bit ones
    (bicubic overshoot left to the caller)."""
    from PIL import Image, ImageOps
    image = ImageOps.exif_transpose(image)  # the orientation every viewer shows, before any resize or crop
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float32)
        if values.min() < 0 or values.max() > 65535:  # "I" is also a 32-bit TIFF named .png
            raise ValueError(f"mode {image.mode!r} with values {values.min():.0f}..{values.max():.0f} is not "
                             "a 16-bit image (expected 0..65535)")
        grey = np.asarray(_resize_center_crop(Image.fromarray(values), size), dtype=np.float32) / 65535.0
        return np.repeat(grey[:, :, None], channels, axis=2)
    if image.mode not in _EIGHT_BIT_MODES:
        raise ValueError(f"mode {image.mode!r} is not supported (expected 8-bit L / RGB / RGBA / P / CMYK, or "
                         "16-bit grayscale)")
    pixels = np.array(_resize_center_crop(image.convert("L" if channels == 1 else "RGB"), size), dtype=np.uint8)
    return pixels[:, :, None] if channels == 1 else pixels


def _read_image(file: Path, size: int, channels: int) -> torch.Tensor:
    """One image file -> (channels, size, size), uint8 or float32 in [0, 1] (see _image_pixels)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(file) as image:
            return torch.from_numpy(_image_pixels(image, size, channels)).permute(2, 0, 1)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"cannot read image {str(file)!r}: {error}") from None


def load_image_folder(path, size: int = 32, channels: int = 3) -> ImageDataset:
    """Every PNG / JPEG under ``path`` (sorted, recursive) as (N, channels, size, size) in [-1, 1]."""
    try:
        import PIL  # noqa: F401
    except ImportError as error:
        raise DatasetError("reading an image folder needs Pillow (pip install pillow)") from error
    if channels not in (1, 3):
        raise ValueError(f"load_image_folder: channels must be 1 or 3, got {channels!r}")
    # Checked here: a size of 0 or below used to fail inside the first image's resize, blaming that file.
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"load_image_folder: size must be an int >= 1, got {size!r}")
    root = Path(path)
    if not root.exists():
        raise DatasetError(f"dataset folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset {str(root)!r} is not a folder (expected PNG / JPEG images inside)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DatasetError(f"dataset folder {str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    # Filled in place: the dataset's memory once, not a list, a stack and copies. 8-bit values stay uint8; the
    # first 16-bit image turns the whole dataset into float32 in [0, 1], then [-1, 1].
    images = torch.empty((len(files), channels, size, size), dtype=torch.uint8)
    # Decoded and resized by a few threads (Pillow lets go of the GIL there), placed in order by this one.
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        for i, pixels in enumerate(pool.map(lambda file: _read_image(file, size, channels), files)):
            if pixels.dtype == torch.float32 and images.dtype == torch.uint8:
                images = images.float().div_(255.0)
            images[i] = pixels if pixels.dtype == images.dtype else pixels.float().div_(255.0)
    finally:  # after a bad file, the images not yet read are not read
        pool.shutdown(wait=True, cancel_futures=True)
    return ImageDataset(root.name or str(root), images if images.dtype == torch.uint8 else _to_unit_range(images),
                        None, flip=True)


# ------------------------------------------------------------------------------------------------- CIFAR-10

class _ArrayUnpickler(pickle.Unpickler):
    """Builds the dicts, lists, bytes and numpy arrays of a CIFAR-10 batch, and nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (a CIFAR-10 batch holds only arrays)")


def _read_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(file, "rb") as f:
            batch = _ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        raise DatasetError(f"corrupt CIFAR-10 batch {str(file)!r}: {type(error).__name__}: {error}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != data.shape[0]:
        raise DatasetError(f"corrupt CIFAR-10 batch {str(file)!r}: data has shape {data.shape} "
                           f"(expected (N, 3072)) and {len(labels)} labels")
    return data, labels


def load_cifar10(path, split: str = "train") -> ImageDataset:
    """The CIFAR-10 python-pickle directory (cifar-10-batches-py): (50,000 or 10,000, 3, 32, 32) in [-1, 1]."""
    if split not in ("train", "test"):
        raise ValueError(f"load_cifar10: split must be 'train' or 'test', got {split!r}")
    root = Path(path)
    names = CIFAR_TRAIN_BATCHES if split == "train" else ("test_batch",)
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise DatasetError(f"CIFAR-10 folder {str(root)!r} lacks {', '.join(missing)} (expected the python "
                           "version, cifar-10-batches-py)")
    parts = [_read_cifar_batch(root / n) for n in names]
    data = np.concatenate([d for d, _ in parts]).reshape(-1, 3, 32, 32)
    labels = torch.from_numpy(np.concatenate([lab for _, lab in parts]))
    return ImageDataset(f"cifar10-{split}", torch.from_numpy(np.ascontiguousarray(data)), labels, flip=True)


# ------------------------------------------------------------------------------------------------- dispatch

def is_cifar10_dir(path) -> bool:
    return (Path(path) / "data_batch_1").is_file() or (Path(path) / "test_batch").is_file()


def has_held_out_split(spec) -> bool:
    """Whether ``load_dataset(spec, split="test")`` gives images the run did not train on: the digits' test
    half, a CIFAR-10 directory with both its training batches and test_batch. Image folders have no split."""
    if spec == "digits":
        return True
    root = Path(spec)
    return (root / "data_batch_1").is_file() and (root / "test_batch").is_file()


def load_dataset(spec: str, size: int | None = None, channels: int = 3, split: str = "train") -> ImageDataset:
    """``"digits"`` (16x16 unless ``size``), a CIFAR-10 python directory (32x32), or an image folder (``size``, 32).

    ``split="test"``: the held-out images of the digits or of CIFAR-10 (see :func:`has_held_out_split`). A
    CIFAR-10 directory holding only test_batch serves it as its training split too.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"load_dataset: spec must be 'digits' or a path, got {type(spec).__name__}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"load_dataset: size must be an int >= 1 or None, got {size!r}")  # before any reading
    if split not in ("train", "test"):
        raise ValueError(f"load_dataset: split must be 'train' or 'test', got {split!r}")
    if split == "test" and spec != "digits" and not has_held_out_split(spec):
        raise DatasetError(f"dataset {str(spec)!r} has no held-out split (only the digits and a CIFAR-10 "
                           "directory with its training batches and test_batch have one)")
    if spec == "digits":
        return load_digits(split, 16 if size is None else size)
    if not os.path.exists(spec):
        raise DatasetError(f"dataset {str(spec)!r} does not exist (give 'digits', an image folder or a "
                           "CIFAR-10 python directory)")
    if os.path.isdir(spec) and is_cifar10_dir(spec):
        held_out = split == "test" or not (Path(spec) / "data_batch_1").exists()
        dataset = load_cifar10(spec, "test" if held_out else "train")
        if size not in (None, 32):
            dataset.images = F.interpolate(dataset.images, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False).clamp_(-1, 1)
        return dataset
    return load_image_folder(spec, 32 if size is None else size, channels)
