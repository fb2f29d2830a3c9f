"""Data sources for ``anisodiff fit``: a folder of images, an ``.npy``/``.npz`` array, cached latents
(``.npy``, ``.npz``, ``.pt``, ``.safetensors``: one file or a folder of them), or a built-in procedural
dataset. Each is a map-style ``torch.utils.data.Dataset`` of ``[C, H, W]`` (video latents:
``[C, F, H, W]``) float tensors, so it goes straight into a ``DataLoader`` and ``anisodiff.fit``;
:meth:`LatentFiles.batches` reads latent files in chunks instead.

Value range: 8-bit images (files, uint8 arrays) map to ``[-1, 1]`` (``x / 127.5 - 1``), the range
diffusion models train on; float arrays and latents are used as stored. Channel PCA axes and the
spectral slope do not depend on this scale, the eigenvalues and the power do.

Every problem with the data itself (missing path, unreadable or empty file, mixed sizes, wrong
array rank or dtype, NaN in a latent) raises :class:`DataError`, a ``ValueError`` whose message names
the file.
"""
from __future__ import annotations

import bisect
import math
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from . import reference
from .ops import white_noise

__all__ = ["DataError", "ImageFolder", "ArrayImages", "LatentFiles", "ProceduralImages",
           "open_images", "IMAGE_SUFFIXES", "LATENT_SUFFIXES", "LATENT_KEYS", "BUILTIN_DATASETS",
           "PROCEDURAL_AXES", "PROCEDURAL_VARIANCES", "PROCEDURAL_MEAN"]

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
# Cached latents: .npy / .npz / .pt / .safetensors, one file or a folder of them
# ---------------------------------------------------------------------------------------------
LATENT_SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")
LATENT_KEYS = ("latents", "latent", "images", "x", "data", "samples")
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def _pick_key(path: Path, keys: list, key: str | None) -> str:
    """The entry of a multi-tensor file that holds the latents."""
    if key is not None:
        if key not in keys:
            raise DataError(f"{path}: no entry {key!r} (entries: {keys[:8]})")
        return key
    if len(keys) == 1:
        return keys[0]
    for name in LATENT_KEYS:
        if name in keys:
            return name
    raise DataError(f"{path}: the file holds {len(keys)} arrays {keys[:8]}; keep one, name the "
                    f"latents one of {list(LATENT_KEYS)}, or pass key= (CLI: --key)")


def _npy_header(f) -> tuple[tuple, np.dtype]:
    """``(shape, dtype)`` from the header of an open ``.npy`` stream (the data is not read)."""
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, _, dtype = read(f)
    return tuple(shape), dtype


def _torch_load(path: Path):
    """``torch.load`` of tensors only (``weights_only=True``), memory-mapped where the format allows."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # the legacy format


def _pt_tensor(path: Path, key: str | None) -> tuple[torch.Tensor, str]:
    obj = _torch_load(path)
    if isinstance(obj, torch.Tensor):
        return obj, ""
    if isinstance(obj, dict):
        tensors = [k for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)]
        name = _pick_key(path, tensors, key)
        return obj[name], name
    raise DataError(f"{path}: expected a tensor or a dict of tensors, got {type(obj).__name__}")


class _TensorFile:
    """One file's latent tensor: where it is, its shape and dtype (read from the header, or from a
    memory map), and ``read(start, stop)`` of its samples ``[start, stop)``."""

    def __init__(self, path: Path, key: str | None):
        self.path = path
        suffix = path.suffix.lower()
        self.format = {".npy": "npy", ".npz": "npz", ".pt": "pt", ".pth": "pt",
                       ".safetensors": "safetensors"}[suffix]
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty")
        try:
            self.key, self.shape, self.dtype = self._header(key)
        except DataError:
            raise
        except Exception as exc:  # every loader has its own errors (EOFError, SafetensorError, ...)
            raise DataError(f"{path}: not a readable {self.format} file ({type(exc).__name__}: "
                            f"{exc})") from None

    def _header(self, key):
        path = self.path
        if self.format == "npy":
            with open(path, "rb") as f:
                shape, dtype = _npy_header(f)
            return "", shape, str(dtype)
        if self.format == "npz":
            with zipfile.ZipFile(path) as archive:
                names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
                name = _pick_key(path, names, key)
                with archive.open(name + ".npy") as f:
                    shape, dtype = _npy_header(f)
            return name, shape, str(dtype)
        if self.format == "pt":
            tensor, name = _pt_tensor(path, key)
            return name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            name = _pick_key(path, list(f.keys()), key)
            part = f.get_slice(name)
            code = part.get_dtype()
            return name, tuple(part.get_shape()), _SAFETENSORS_DTYPES.get(code, code.lower())

    def read(self, start: int, stop: int, cache: dict) -> torch.Tensor:
        """Samples ``[start, stop)`` as ``[n, *sample_shape]`` (a copy); ``cache`` keeps the last
        whole array of an ``.npz`` / ``.pt`` file, so chunked reads do not reload it."""
        single = len(self.shape) == 3  # one latent [C, H, W] per file
        if self.format == "safetensors":
            from safetensors import safe_open

            with safe_open(self.path, framework="pt") as f:
                if single:
                    return f.get_tensor(self.key)[None]
                return f.get_slice(self.key)[start:stop]
        if self.format == "npy":
            array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        else:
            if cache.get("path") != self.path:
                cache.clear()
                if self.format == "npz":
                    with np.load(self.path, allow_pickle=False) as archive:
                        cache["array"] = archive[self.key]
                else:
                    cache["array"] = _pt_tensor(self.path, self.key or None)[0]
                cache["path"] = self.path
            array = cache["array"]
        part = array[None] if single else array[start:stop]
        if isinstance(part, torch.Tensor):
            return part.clone()
        return torch.from_numpy(np.array(part))


class LatentFiles(Dataset):
    """Cached latents, e.g. a VAE's encodings of a dataset: one ``.npy``, ``.npz``, ``.pt`` /
    ``.pth`` (read with ``torch.load(weights_only=True)``, memory-mapped) or ``.safetensors`` file, or
    a folder of them (searched recursively, sorted by path), used as stored.

    Each file holds one floating tensor (float16, bfloat16, float32 or float64; a multi-entry
    ``.npz`` / ``.pt`` dict / ``.safetensors`` file: the entry ``key``, or the one named one of
    :data:`LATENT_KEYS`, e.g. ``latents`` as kohya's and diffusers' caches name it). Its rank tells
    the layout: ``[C, H, W]`` is one latent, ``[N, C, H, W]`` a batch, ``[N, C, F, H, W]`` a batch of
    video latents (F frames; save a single video as ``[1, C, F, H, W]``). Every file must hold latents
    of one per-sample shape; any channel count. Headers are read on construction (no data), so a
    bad file fails first. ``limit``: use the first ``limit`` latents.

    Items are float32 (float64 files: float64) ``[C, H, W]`` / ``[C, F, H, W]`` tensors;
    :meth:`batches` reads contiguous chunks and checks them for NaN / Inf. ``.npy``, ``.pt`` and
    ``.safetensors`` files are read chunk by chunk (memory maps, slices); an ``.npz`` archive
    (possibly compressed) is decompressed whole, one file at a time.
    """

    def __init__(self, source, key: str | None = None, limit: int | None = None):
        root = Path(source)
        if root.is_dir():
            paths = sorted(p for p in root.rglob("*")
                           if p.is_file() and p.suffix.lower() in LATENT_SUFFIXES)
            if not paths:
                raise DataError(f"{root}: no latent files ({', '.join(LATENT_SUFFIXES)}) in the "
                                "folder")
        elif root.is_file():
            if root.suffix.lower() not in LATENT_SUFFIXES:
                raise DataError(f"{root}: not a latent file ({', '.join(LATENT_SUFFIXES)})")
            paths = [root]
        else:
            raise DataError(f"{root}: no such file or folder")
        self.root = root
        self.files = self._headers(paths, key)
        counts = []
        self.sample_shape = None
        for f in self.files:
            count, shape = self._check(f)
            if self.sample_shape is None:
                self.sample_shape, first = shape, f.path
            elif shape != self.sample_shape:
                raise DataError(f"{f.path}: latents of shape {list(shape)} per sample, but "
                                f"{first} holds {list(self.sample_shape)}; every file must hold "
                                "latents of one shape")
            counts.append(count)
        self._ends = np.cumsum(counts).tolist()
        total = self._ends[-1]
        if total == 0:
            raise DataError(f"{root}: holds no latents")
        self.count = total if limit is None else min(total, limit)
        self.dtype = torch.float64 if all(f.dtype == "float64" for f in self.files) else torch.float32
        self._cache: dict = {}

    HEADER_PROGRESS = 256  # a progress bar over the headers of folders with more files

    @classmethod
    def _headers(cls, paths: list, key: str | None) -> list:
        if len(paths) <= cls.HEADER_PROGRESS:
            return [_TensorFile(p, key) for p in paths]
        from ._progress import progress

        bar, files = progress(len(paths), "reading latent headers"), []
        try:
            for p in paths:
                files.append(_TensorFile(p, key))
                bar.update()
        finally:
            bar.close()
        return files

    @staticmethod
    def _check(f: _TensorFile) -> tuple[int, tuple]:
        """``(count, sample_shape)`` of one file, or a DataError naming what is wrong."""
        shape = f.shape
        if f.dtype not in _FLOAT_DTYPES:
            raise DataError(f"{f.path}: latents must be floating point ({', '.join(_FLOAT_DTYPES)}), "
                            f"got {f.dtype}; 8-bit pictures go in an image folder or a uint8 "
                            "[N, H, W, C] .npy/.npz")
        if len(shape) not in (3, 4, 5):
            raise DataError(f"{f.path}: expected [C, H, W] (one latent), [N, C, H, W] or "
                            f"[N, C, F, H, W] (video), got shape {list(shape)}")
        count, sample = (1, shape) if len(shape) == 3 else (shape[0], shape[1:])
        if len(sample) == 3 and sample[0] == sample[1] > 4 and sample[2] in (1, 3, 4):
            raise DataError(f"{f.path}: latents are read as [N, C, H, W], but shape {list(shape)} "
                            "looks channels-last; transpose it to [N, C, H, W]")
        if count == 0 or 0 in sample:
            raise DataError(f"{f.path}: holds no latents (shape {list(shape)})")
        return count, tuple(sample)

    def __len__(self) -> int:
        return self.count

    def _read(self, start: int, stop: int, check: bool = False):
        """Samples ``[start, stop)`` of the whole set, as pieces per file."""
        pieces = []
        while start < stop:
            i = bisect.bisect_right(self._ends, start)
            begin = self._ends[i - 1] if i else 0
            end = min(stop, self._ends[i])
            f = self.files[i]
            piece = f.read(start - begin, end - begin, self._cache)
            if check and not bool(torch.isfinite(piece).all()):
                bad = int((~torch.isfinite(piece)).flatten(1).any(dim=1).nonzero()[0]) + start - begin
                raise DataError(f"{f.path}: latent {bad} of the file contains NaN or Inf")
            pieces.append(piece.to(self.dtype))
            start = end
        return pieces

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.count:
            raise IndexError(f"latents: index {index} out of range for {self.count}")
        return self._read(index, index + 1)[0][0]

    def __getitems__(self, indices) -> list[torch.Tensor]:
        """Several latents; a contiguous run is read as one chunk (the DataLoader calls this)."""
        indices = list(indices)
        if indices and indices == list(range(indices[0], indices[0] + len(indices))) and \
                0 <= indices[0] and indices[-1] < self.count:
            return list(torch.cat(self._read(indices[0], indices[-1] + 1)))
        return [self[i] for i in indices]

    def batches(self, batch_size: int = 256) -> "LatentBatches":
        """The latents in chunks of ``batch_size`` (the last one shorter), read straight from the
        files (memory-mapped where the format allows), each checked for NaN / Inf."""
        return LatentBatches(self, batch_size)


class LatentBatches:
    """Iterable of ``[b, *sample_shape]`` chunks of a :class:`LatentFiles`; ``len()`` is the number
    of chunks (what a progress bar counts)."""

    def __init__(self, latents: LatentFiles, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.latents, self.batch_size = latents, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.latents) / self.batch_size)

    def __iter__(self):
        n = len(self.latents)
        for start in range(0, n, self.batch_size):
            yield torch.cat(self.latents._read(start, min(n, start + self.batch_size), check=True))


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
                seed: int = 0, key: str | None = None) -> Dataset:
    """The dataset named by ``source``: a folder of images (:class:`ImageFolder`), a uint8 ``.npy`` /
    ``.npz`` array of pictures (:class:`ArrayImages`), latents (:class:`LatentFiles`: a float
    ``.npy`` / ``.npz``, a ``.pt`` / ``.pth`` / ``.safetensors`` file, or a folder of such files) or a
    built-in name (``"procedural"``; a path of that name wins). ``size``: resize/center-crop size of
    an image folder, or the side of procedural images. ``limit``: use the first ``limit`` images
    (procedural: generate that many, default 10000). ``seed``: the procedural stream key. ``key``:
    the entry of a multi-tensor latent file."""
    path = Path(source)
    if path.is_dir():
        has_images = any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*") if p.is_file())
        has_latents = any(p.suffix.lower() in LATENT_SUFFIXES for p in path.rglob("*") if p.is_file())
        if has_images and has_latents:
            raise DataError(f"{path}: the folder holds both images ({', '.join(IMAGE_SUFFIXES)}) "
                            f"and latent files ({', '.join(LATENT_SUFFIXES)}); keep one kind")
        if has_latents:
            _no_resize(path, size)
            return LatentFiles(path, key=key, limit=limit)
        dataset = ImageFolder(path, size)
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix not in LATENT_SUFFIXES:
            raise DataError(f"{path}: unsupported file; DATA is a folder of images, an .npy/.npz "
                            "array, a latent file (.pt, .safetensors, .npy, .npz) or folder of "
                            "them, or a built-in dataset name")
        _no_resize(path, size)
        if suffix in (".npy", ".npz") and _TensorFile(path, key).dtype == "uint8":
            dataset = ArrayImages(path)
        else:
            return LatentFiles(path, key=key, limit=limit)
    elif source in BUILTIN_DATASETS:
        return ProceduralImages(limit or PROCEDURAL_DEFAULT_COUNT, size or PROCEDURAL_DEFAULT_SIZE,
                                seed)
    else:
        raise DataError(f"{source}: no such file or folder, and not a built-in dataset "
                        f"({', '.join(BUILTIN_DATASETS)})")
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    return dataset


def _no_resize(path: Path, size: int | None) -> None:
    if size is not None:
        raise DataError(f"{path}: arrays and latents are used as stored; resizing (size) applies to "
                        "image folders and built-in datasets")
