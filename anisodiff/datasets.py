"""Image sources for ``anisodiff fit``: a folder of images, an ``.npy``/``.npz`` array, or a built-in
procedural dataset. Each is a map-style ``torch.utils.data.Dataset`` of ``[C, H, W]`` float tensors,
so it goes straight into a ``DataLoader`` and ``anisodiff.fit``.

Value range: 8-bit images (files, uint8 arrays) map to ``[-1, 1]`` (``x / 127.5 - 1``), the range
diffusion models train on; float arrays are used as stored. Channel PCA axes and the spectral slope do
not depend on this scale, the eigenvalues and the power do.

Every problem with the data itself (missing path, unreadable file, mixed sizes, wrong array rank or
dtype) raises :class:`DataError`, a ``ValueError`` whose message names the file.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from . import reference
from .ops import white_noise

__all__ = ["DataError", "ImageFolder", "ArrayImages", "ProceduralImages", "open_images",
           "IMAGE_SUFFIXES", "BUILTIN_DATASETS", "PROCEDURAL_AXES", "PROCEDURAL_VARIANCES",
           "PROCEDURAL_MEAN"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_GREY_MODES = ("1", "L", "LA")


class DataError(ValueError):
    """The data cannot be read as a set of same-size images."""


def _from_uint8_hwc(pixels: np.ndarray) -> torch.Tensor:
    """``[H, W, C]`` uint8 -> ``[C, H, W]`` float32 in ``[-1, 1]``."""
    x = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)  # a copy: PIL/mmap arrays are read-only
    return x.to(torch.float32) / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------
# A folder of PNG/JPEG files
# ---------------------------------------------------------------------------------------------
def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading image files needs Pillow: pip install pillow") from None
    return Image


class ImageFolder(Dataset):
    """Every PNG/JPEG file under ``root`` (recursively, sorted by path) as a ``[C, H, W]`` float32
    tensor in ``[-1, 1]``.

    Channels: 1 when every file is greyscale, else 3 (RGB; alpha and palettes are converted away).
    Sizes: all files must share one size, unless ``size`` is given: then each image is resized so
    its shorter side is ``size`` (bicubic, antialiased) and center-cropped to ``size x size``.
    Resizing filters the high frequencies, so prefer data that already has one size for a spectral
    fit. The headers are read on construction, so a mixed-size folder fails before any pixel is read.
    """

    def __init__(self, root, size: int | None = None):
        Image = _pil()
        self.root = Path(root)
        self.files = sorted(p for p in self.root.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise DataError(f"{self.root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the "
                            "folder")
        headers = [self._header(Image, p) for p in self.files]
        self.mode = "L" if all(mode in _GREY_MODES for _, mode in headers) else "RGB"
        self.size = size
        if size is None:
            first = headers[0][0]
            for path, (wh, _) in zip(self.files, headers):
                if wh != first:
                    raise DataError(
                        f"images differ in size: {self.files[0]} is {first[0]}x{first[1]}, {path} is "
                        f"{wh[0]}x{wh[1]} (width x height); resize them, or let anisodiff resize and "
                        "center-crop every image to N x N (size=N, CLI: --size N)")

    @staticmethod
    def _header(Image, path: Path) -> tuple[tuple[int, int], str]:
        try:
            with Image.open(path) as im:
                return im.size, im.mode
        except (OSError, ValueError) as exc:  # PIL.UnidentifiedImageError is an OSError
            raise DataError(f"{path}: not a readable image ({exc})") from None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        Image = _pil()
        path = self.files[index]
        try:
            with Image.open(path) as im:
                im = im.convert(self.mode)
                if self.size is not None:
                    im = _resize_center_crop(Image, im, self.size)
                pixels = np.asarray(im, dtype=np.uint8)
        except OSError as exc:
            raise DataError(f"{path}: cannot decode the image ({exc})") from None
        return _from_uint8_hwc(pixels.reshape(pixels.shape[0], pixels.shape[1], -1))


def _resize_center_crop(Image, im, size: int):
    """Shorter side to ``size`` (bicubic), then the central ``size x size`` square."""
    w, h = im.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return im.crop((left, top, left + size, top + size))


# ---------------------------------------------------------------------------------------------
# A .npy / .npz array
# ---------------------------------------------------------------------------------------------
_NPZ_KEYS = ("images", "x", "data")


def _load_array(path: Path) -> np.ndarray:
    """The image array of a ``.npy`` (memory-mapped) or ``.npz`` file (its only array, or the one
    named ``images``, ``x`` or ``data``)."""
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False)
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            if len(keys) == 1:
                return archive[keys[0]]
            for key in _NPZ_KEYS:
                if key in archive:
                    return archive[key]
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable NumPy file ({exc})") from None
    raise DataError(f"{path}: the archive holds {len(keys)} arrays {keys[:8]}; keep one, or name "
                    f"the images one of {list(_NPZ_KEYS)}")


class ArrayImages(Dataset):
    """The images of a ``.npy`` / ``.npz`` file, told apart by dtype:

    * ``uint8`` -> ``[N, H, W, C]`` (``C <= 4``), as PIL, imageio and most dataset dumps store
      pictures; mapped to ``[-1, 1]``.
    * floating -> ``[N, C, H, W]``, as a model sees them (e.g. latents); used as stored. A float
      array shaped like ``[N, H, H, 1|3|4]`` with ``H > 4`` is refused as probably channels-last.

    Anything else (another rank or dtype) raises :class:`DataError`.
    """

    def __init__(self, path):
        self.path = Path(path)
        array = _load_array(self.path)
        shape = tuple(array.shape)
        if array.ndim != 4:
            raise DataError(f"{self.path}: expected a 4-D array, [N, H, W, C] uint8 or [N, C, H, W] "
                            f"float, got shape {list(shape)}")
        if array.dtype == np.uint8:
            if shape[3] > 4:
                raise DataError(f"{self.path}: uint8 arrays are read as [N, H, W, C] with C <= 4, "
                                f"got shape {list(shape)}")
        elif np.issubdtype(array.dtype, np.floating):
            if shape[1] == shape[2] > 4 and shape[3] in (1, 3, 4):
                raise DataError(f"{self.path}: float arrays are read as [N, C, H, W], but shape "
                                f"{list(shape)} looks channels-last; transpose it to [N, C, H, W]")
        else:
            raise DataError(f"{self.path}: expected uint8 [N, H, W, C] or float [N, C, H, W], got "
                            f"dtype {array.dtype}")
        if shape[0] == 0:
            raise DataError(f"{self.path}: the array holds no images")
        self.array = array

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        item = np.asarray(self.array[index])
        if item.dtype == np.uint8:
            return _from_uint8_hwc(item)
        dtype = torch.float64 if item.dtype == np.float64 else torch.float32
        return torch.from_numpy(np.array(item)).to(dtype)


# ---------------------------------------------------------------------------------------------
# The procedural built-in
# ---------------------------------------------------------------------------------------------
# Colour statistics of natural images: the RGB principal axes and variances of ImageNet (the
# fb.resnet.torch "lighting" PCA), the variances rescaled to a per-channel std of 0.45 in [-1, 1],
# and the ImageNet mean colour mapped to [-1, 1].
PROCEDURAL_AXES = torch.tensor([[-0.5675, 0.7192, 0.4009],
                                [-0.5808, -0.0045, -0.8140],
                                [-0.5836, -0.6948, 0.4203]], dtype=torch.float64)
_IMAGENET_EIGENVALUES = torch.tensor([0.2175, 0.0188, 0.0045], dtype=torch.float64)
PROCEDURAL_VARIANCES = _IMAGENET_EIGENVALUES * (3 * 0.45**2 / float(_IMAGENET_EIGENVALUES.sum()))
PROCEDURAL_MEAN = 2 * torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64) - 1


class ProceduralImages(Dataset):
    """``n`` RGB images with natural-image statistics, generated deterministically, no download.

    Image ``i`` is the ``i``-th sample of anisodiff's Philox stream with key ``seed`` (so it does not
    depend on batching), made:

    * spatially 1/f: each of three independent white planes is filtered with the amplitude
      ``1 / max(r, 1/size)`` (r in cycles/pixel), so the power is ``~ r^-2`` at every non-DC
      frequency (the DC bin has the power of the lowest ring), and scaled to unit variance;
    * colour-correlated: the planes are mixed by ``PROCEDURAL_AXES diag(sqrt(PROCEDURAL_VARIANCES))``
      (ImageNet's RGB principal axes; the first, luminance, holds ~90% of the variance) and
      ``PROCEDURAL_MEAN`` is added.

    The values are not clipped (clipping would bend both statistics), so a few leave ``[-1, 1]``.
    """

    def __init__(self, n: int, size: int = 32, seed: int = 0):
        if n < 1 or size < 2:
            raise DataError(f"procedural: need n >= 1 images of size >= 2, got n={n}, size={size}")
        self.n, self.size, self.seed = n, size, seed
        r = reference.radius(size, size)
        amplitude = 1.0 / r.clamp_min(1.0 / size)
        self._amplitude = amplitude * reference.calibration(amplitude)
        self._mix = PROCEDURAL_AXES * PROCEDURAL_VARIANCES.sqrt()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices) -> list[torch.Tensor]:
        """Several images at once (one batched FFT; the DataLoader calls this for each batch)."""
        shape = (3, self.size, self.size)
        counters = math.ceil(math.prod(shape) / 4)
        white = []
        for index in indices:
            if not 0 <= index < self.n:
                raise IndexError(f"procedural: index {index} out of range for {self.n} images")
            white.append(white_noise(shape, seed=self.seed, offset=index * counters))
        planes = reference.filter_planes(torch.stack(white), self._amplitude)
        images = torch.einsum("ck,bkhw->bchw", self._mix, planes) + PROCEDURAL_MEAN[:, None, None]
        return list(images.to(torch.float32))


BUILTIN_DATASETS = ("procedural",)
PROCEDURAL_DEFAULT_COUNT = 10_000
PROCEDURAL_DEFAULT_SIZE = 32


# ---------------------------------------------------------------------------------------------
# DATA argument -> dataset
# ---------------------------------------------------------------------------------------------
def open_images(source: str, *, size: int | None = None, limit: int | None = None,
                seed: int = 0) -> Dataset:
    """The dataset named by ``source``: an existing folder (:class:`ImageFolder`), an ``.npy`` /
    ``.npz`` file (:class:`ArrayImages`) or a built-in name (``"procedural"``; a path of that name
    wins). ``size``: resize/center-crop size of a folder, or the side of procedural images.
    ``limit``: use the first ``limit`` images (procedural: generate that many, default 10000).
    ``seed``: the procedural stream key."""
    path = Path(source)
    if path.is_dir():
        dataset = ImageFolder(path, size)
    elif path.is_file():
        if path.suffix.lower() not in (".npy", ".npz"):
            raise DataError(f"{path}: unsupported file; DATA is a folder of images, an .npy/.npz "
                            "array, or a built-in dataset name")
        if size is not None:
            raise DataError(f"{path}: arrays are used as stored; resizing (size) applies to image "
                            "folders and built-in datasets")
        dataset = ArrayImages(path)
    elif source in BUILTIN_DATASETS:
        return ProceduralImages(limit or PROCEDURAL_DEFAULT_COUNT, size or PROCEDURAL_DEFAULT_SIZE,
                                seed)
    else:
        raise DataError(f"{source}: no such file or folder, and not a built-in dataset "
                        f"({', '.join(BUILTIN_DATASETS)})")
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    return dataset
