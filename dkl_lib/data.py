"""Data sets as tensors: the embedded digits default, CIFAR-10/100, and tiny synthetic tensors.

Every data set is a :class:`TensorData`: images as float tensors in [0, 1] of shape (N, C, H, W),
labels as int64 of shape (N,), plus the per-channel ``mean`` and ``std`` that the training code
uses to normalise a batch (``data.normalize(x)``) right before the model. The whole data set sits
in memory on one device; on CUDA that is the GPU, and :func:`augment_crop_flip` runs there too, so
no DataLoader worker is ever the bottleneck.

* :func:`digits`: scikit-learn's 8x8 digits, shipped inside scikit-learn (no network). The default
  of the ``cpu-quick`` preset and of notebook 03 on a laptop.
* :func:`cifar`: CIFAR-10/100 through torchvision, read from ``data/downloads`` (git-ignored);
  downloaded only when you pass ``download=True``. Used by the ``gpu-short`` and ``paper`` presets.
* :func:`imagenet`: ImageNet from class folders, too large for memory: a :class:`FolderData` whose
  images are decoded per batch (:class:`LazyImages`, with the standard crops); never downloaded.
* :func:`synthetic`: a few random, learnable tensors for tests.

Batching: :func:`batch_indices` / :func:`batches` shuffle with an explicit ``torch.Generator`` so a
seed fixes the order; :func:`augment_crop_flip` is the CIFAR augmentation (random crop with zero
padding, horizontal flip) done with tensor ops on the batch's own device.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import _paths
from ._checks import check_finite_values, check_int, check_label_range, check_seed, env_positive_int

__all__ = [
    "TensorData",
    "DatasetNotFoundError",
    "default_data_root",
    "digits",
    "cifar",
    "imagenet",
    "FolderData",
    "LazyImages",
    "default_decode_workers",
    "synthetic",
    "batch_indices",
    "batches",
    "augment_crop_flip",
    "CIFAR_STATS",
    "IMAGENET_STATS",
]

# Per-channel statistics used by the CIFAR teachers released with RepDistiller/mdistiller (their
# checkpoints expect inputs normalised with exactly these numbers).
CIFAR_STATS = {
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

_CIFAR_FOLDERS = {
    "cifar100": ("cifar-100-python", ("train", "test", "meta"), "CIFAR-100",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "161 MB"),
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
                "CIFAR-10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "163 MB"),
}


class DatasetNotFoundError(FileNotFoundError):
    """A data set is not on disk and downloading was not requested; the message says what to do."""


@dataclass
class TensorData:
    """A whole classification data set held as tensors on one device.

    Attributes:
        x_train, x_test: float images in [0, 1], shape (N, C, H, W).
        y_train, y_test: int64 class labels, shape (N,).
        num_classes: C_classes (the width of the logits).
        name: a short name ("digits", "cifar100", "synthetic").
        mean, std: per-channel statistics; ``normalize`` maps x to (x - mean) / std.
        augment: ``None`` or a dict of :func:`augment_crop_flip` arguments
            (``{"padding": 4, "flip": True}`` for CIFAR) that training applies to each batch.
        info: JSON-able facts that identify the split (seed, sizes, source); part of the config
            hash of cached runs.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    augment: Optional[dict] = None
    info: dict = field(default_factory=dict)
    _stats: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    lazy: ClassVar[bool] = False  # True for FolderData: images decoded per batch
    _images: ClassVar[type] = torch.Tensor  # the type of x_train / x_test (FolderData: LazyImages)

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not isinstance(x, self._images) or not isinstance(y, torch.Tensor):
                raise TypeError(f"x_{split} must be a {self._images.__name__} and y_{split} a torch.Tensor")
            if x.dim() != 4 or not x.is_floating_point():
                raise ValueError(f"x_{split} must be a float tensor of shape (N, C, H, W), got "
                                 f"{x.dtype} of shape {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"y_{split} must be int64 of shape ({x.shape[0]},), got {y.dtype} "
                                 f"of shape {tuple(y.shape)}")
            if y.device != x.device:
                raise ValueError(f"x_{split} and y_{split} are on different devices ({x.device} and {y.device})")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"train and test images differ in shape: {tuple(self.x_train.shape[1:])} "
                             f"and {tuple(self.x_test.shape[1:])}")
        if self.x_train.device != self.x_test.device:
            raise ValueError(f"x_train and x_test are on different devices ({self.x_train.device} and "
                             f"{self.x_test.device})")
        if self.x_train.shape[0] < 1:
            raise ValueError("x_train is empty (N = 0): training needs at least one image")
        self.num_classes = check_int("num_classes", self.num_classes, 2)
        channels = self.x_train.shape[1]
        self.mean, self.std = _per_channel("mean", self.mean), _per_channel("std", self.std)
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need one value per channel ({channels}), got "
                             f"{len(self.mean)} and {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.augment is not None:
            if not isinstance(self.augment, dict) or not set(self.augment) <= _AUGMENT_KEYS:
                raise ValueError(f"augment must be None or a dict of augment_crop_flip arguments (keys "
                                 f"{sorted(_AUGMENT_KEYS)}), got {self.augment!r}")
        # the values, once per construction (one pass and one device sync per tensor, never per batch)
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if y.shape[0]:
                check_label_range(f"y_{split}", y, self.num_classes, owner="num_classes says the data has")
            if not self.lazy and x.shape[0] and x.numel():
                check_finite_values(f"x_{split}", x)

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.x_train.shape[1:])

    @property
    def n_train(self) -> int:
        return self.x_train.shape[0]

    @property
    def n_test(self) -> int:
        return self.x_test.shape[0]

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "TensorData":
        """A copy on ``device`` with images of ``dtype`` (labels stay int64); self if unchanged."""
        device = torch.device(device) if device is not None else self.device
        dtype = dtype or self.x_train.dtype
        if device == self.device and dtype == self.x_train.dtype:
            return self
        return dataclasses.replace(
            self,
            x_train=self.x_train.to(device, dtype), y_train=self.y_train.to(device),
            x_test=self.x_test.to(device, dtype), y_test=self.y_test.to(device),
        )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std per channel, for a batch x of shape (B, C, H, W) on any device."""
        key = (x.device, x.dtype)
        if key not in self._stats:  # built once per device and dtype (no host copy per batch)
            self._stats[key] = (torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1),
                                torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1))
        mean, std = self._stats[key]
        return (x - mean) / std

    def describe(self) -> dict:
        """A JSON-able description (name, sizes, shapes, augmentation, info) for configs and hashes."""
        return {
            "name": self.name,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "num_classes": int(self.num_classes),
            "image_shape": list(self.image_shape),
            "mean": list(self.mean),
            "std": list(self.std),
            "augment": self.augment,
            **{k: v for k, v in self.info.items() if k not in ("name",)},
        }


_AUGMENT_KEYS = {"padding", "flip"}


def _per_channel(name: str, values) -> Tuple[float, ...]:
    """A tuple of finite floats (one per channel) from a sequence of real numbers."""
    try:
        if isinstance(values, (str, bytes)) or any(isinstance(v, (bool, str, bytes)) for v in values):
            raise TypeError
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a sequence of numbers (one per channel), got {values!r}") from None
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def _seed(value) -> int:
    """A split seed: an integer in [0, 2**32 - 1] (what scikit-learn and torch.Generator take)."""
    value = check_seed("seed", value)
    if not 0 <= value < 2**32:
        raise ValueError(f"seed must lie in [0, 2**32 - 1], got {value}")
    return value


def _check_float_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")


def _check_tensor(name: str, x, *, min_dim: int = 1) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")


def _resolve_device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def default_data_root() -> Path:
    """Where downloaded data sets live: ``$DKL_DATA_DIR`` if set, else ``<repository>/data/downloads``.

    The repository path is found from this file, so notebooks (whose working directory is
    ``notebooks/``) and the command line agree on one folder. ``data/downloads/`` is git-ignored.
    A package installed outside a clone uses ``data/downloads`` of the working directory.
    """
    env = os.environ.get("DKL_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return _paths.home() / "data" / "downloads"


# ------------------------------------------------------------------------------------------ digits
def digits(*, seed: int = 0, n_train: int = 500, n_test: Optional[int] = None, device=None,
           dtype: torch.dtype = torch.float32) -> TensorData:
    """scikit-learn's handwritten digits (1797 images, 1x8x8, 10 classes), scaled to [0, 1].

    The data ships inside scikit-learn, so this works offline. The split is stratified and fixed
    by ``seed``; the test set is the remaining images (or ``n_test`` of them). The ``cpu-quick``
    preset passes ``n_train=350``: with that few training images a small CE-only student sits
    3.9-5.5 points below its small CNN teacher (with the default 500, 2.5-3.3), so distillation has
    room to act.

    Args:
        seed: split seed (the same seed always gives the same split).
        n_train: training images, 20 <= n_train <= 1797 - 10.
        n_test: test images (default: all the others).
        device, dtype: where and in which float type to hold the images.

    Returns:
        :class:`TensorData` with name "digits", mean/std of the training images.

    Notebook: 03_knowledge_distillation (``cpu-quick`` preset).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import StratifiedShuffleSplit

    seed = _seed(seed)
    n_train = check_int("n_train", n_train, 0)
    if n_test is not None:
        n_test = check_int("n_test", n_test, 0)
    _check_float_dtype(dtype)
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float64) / 16.0  # pixel values 0..16
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    total = labels.shape[0]
    if not 20 <= n_train <= total - 10:
        raise ValueError(f"n_train must lie in [20, {total - 10}], got {n_train}")
    rest = total - n_train
    n_test = rest if n_test is None else n_test
    if not 10 <= n_test <= rest:
        raise ValueError(f"n_test must lie in [10, {rest}] for n_train={n_train}, got {n_test}")
    split = StratifiedShuffleSplit(n_splits=1, train_size=n_train, test_size=n_test,
                                   random_state=seed)
    train_idx, test_idx = next(split.split(bunch.data, bunch.target))
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    x = images.unsqueeze(1)
    x_train = x[train_idx]
    mean, std = round(float(x_train.mean()), 4), round(float(x_train.std()), 4)
    device = _resolve_device(device)
    return TensorData(
        x_train=x_train.to(device, dtype), y_train=labels[train_idx].to(device),
        x_test=x[test_idx].to(device, dtype), y_test=labels[test_idx].to(device),
        num_classes=10, name="digits", mean=(mean,), std=(std,), augment=None,
        info={"source": "sklearn.datasets.load_digits", "seed": int(seed)},
    )


# ------------------------------------------------------------------------------------------- CIFAR
def _cifar_placement(name: str, root: Path) -> str:
    """Where the extracted archive of a CIFAR data set goes, for the messages of :func:`cifar`."""
    folder, files, _, url, size = _CIFAR_FOLDERS[name]
    return (f"extract the archive {url} ({size}) so that {root / folder} exists with the files {', '.join(files)} "
            f"(another folder: pass root=... or set DKL_DATA_DIR)")


def _cifar_missing_message(name: str, root: Path) -> str:
    folder, files, pretty, *_ = _CIFAR_FOLDERS[name]
    missing = [f for f in files if not (root / folder / f).is_file()]
    what = (f"no folder {folder} with its files" if len(missing) == len(files) else
            f"the folder {root / folder} lacks {', '.join(missing)}" if missing else
            f"its files in {root / folder} failed torchvision's integrity check: a damaged or partial copy")
    return (
        f"{pretty} was not found under {root} ({what}). Either download it once: on "
        f"the command line add --download to your python -m dkl_lib.experiments command, in Python call "
        f"dkl.data.cifar({name!r}, download=True); or {_cifar_placement(name, root)}. Nothing is downloaded "
        f"unless you ask with download=True."
    )


def _cifar_download_message(name: str, root: Path, err: Exception) -> str:
    pretty = _CIFAR_FOLDERS[name][2]
    return (f"downloading {pretty} failed ({type(err).__name__}: {err}); no network here? Fetch it by hand "
            f"elsewhere and {_cifar_placement(name, root)}; then download=True (--download) is not needed")


def cifar(name: str = "cifar100", *, root=None, download: bool = False, device=None) -> TensorData:
    """CIFAR-100 or CIFAR-10 as tensors (float32 in [0, 1], (N, 3, 32, 32)), via torchvision.

    Reads ``root`` (default :func:`default_data_root`, i.e. ``data/downloads``). Downloads only
    when ``download=True``; otherwise missing files raise :class:`DatasetNotFoundError` (a
    ``FileNotFoundError``) whose message gives the exact folder to fill and the flag to pass; so does a
    download that fails (no network: the message says where to put the archive fetched by hand). On
    CUDA the tensors are moved to the GPU (about 0.7 GB for the whole set) and training augments
    them there with :func:`augment_crop_flip` (padding 4, horizontal flip).

    Args:
        name: "cifar100" or "cifar10".
        root: folder that holds (or will hold) ``cifar-100-python`` / ``cifar-10-batches-py``.
        download: fetch the archive from the official site when it is missing.
        device: where to hold the tensors (default CPU).

    Notebook: 03_knowledge_distillation (``gpu-short`` and ``paper`` presets).
    """
    if name not in _CIFAR_FOLDERS:
        raise ValueError(f"unknown CIFAR data set {name!r}; choose 'cifar100' or 'cifar10'")
    if not isinstance(download, bool):
        raise TypeError(f"download must be True or False, got {download!r}")
    root = Path(root).expanduser() if root is not None else default_data_root()
    folder, files, *_ = _CIFAR_FOLDERS[name]
    present = all((root / folder / f).is_file() for f in files)
    if not present and not download:
        raise DatasetNotFoundError(_cifar_missing_message(name, root))
    import torchvision  # lazy: only the CIFAR path needs it

    cls = torchvision.datasets.CIFAR100 if name == "cifar100" else torchvision.datasets.CIFAR10
    if download:
        root.mkdir(parents=True, exist_ok=True)
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except (OSError, RuntimeError) as err:
        # no network (URLError; also when files that are there fail the checksum and torchvision fetches them
        # again), a refused or broken download (RuntimeError)
        if download and (not present or isinstance(err, urllib.error.URLError)):
            raise DatasetNotFoundError(_cifar_download_message(name, root, err)) from err
        if not isinstance(err, RuntimeError):  # an I/O error reading files that are there: not "not found"
            raise
        # torchvision: "Dataset not found or corrupted"
        raise DatasetNotFoundError(_cifar_missing_message(name, root) + f" (torchvision: {err})") from err

    def as_tensors(ds):
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, 32, 32)
        return x.to(torch.float32).div_(255.0), torch.as_tensor(ds.targets, dtype=torch.int64)

    x_train, y_train = as_tensors(train)
    x_test, y_test = as_tensors(test)
    mean, std = CIFAR_STATS[name]
    device = _resolve_device(device)
    return TensorData(
        x_train=x_train.to(device), y_train=y_train.to(device), x_test=x_test.to(device),
        y_test=y_test.to(device), num_classes=100 if name == "cifar100" else 10, name=name,
        mean=mean, std=std, augment={"padding": 4, "flip": True},
        info={"source": f"torchvision.datasets.{cls.__name__}"},
    )


# ---------------------------------------------------------------------------------------- ImageNet
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
_CROP_TRIES = 10  # torchvision's RandomResizedCrop: 10 tries, then a centre crop


def _resized_crop_box(width: int, height: int, u: Sequence[float], *, scale=(0.08, 1.0),
                      ratio=(3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """(top, left, h, w) of torchvision's RandomResizedCrop for an image of width x height, from
    uniform numbers u (2 per try, then 2 for the position) instead of a global random state."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for t in range(_CROP_TRIES):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * t])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[2 * t + 1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[2 * _CROP_TRIES] * (height - h + 1)), height - h)
            left = min(int(u[2 * _CROP_TRIES + 1] * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height  # fallback: the centre crop of the clamped aspect ratio
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _load_image(path: str, size: int, train: bool, u) -> torch.Tensor:
    """One image as uint8 (3, size, size): the train crop (u: its uniform draws, last one the flip)
    or the test view, with Pillow as torchvision does it for PIL images."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        width, height = img.size
        if train:
            top, left, h, w = _resized_crop_box(width, height, u)
            img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
            if u[-1] < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:  # Resize(size / 0.875) on the shorter side, then CenterCrop(size): 256 / 224 at 224
            short = int(size / 0.875)
            if width <= height:
                new = (short, int(short * height / width))
            else:
                new = (int(short * width / height), short)
            img = img.resize(new, Image.BILINEAR)
            top, left = int(round((new[1] - size) / 2.0)), int(round((new[0] - size) / 2.0))
            img = img.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def default_decode_workers() -> int:
    """Decoding threads per process: ``$DKL_DECODE_WORKERS`` if set, else the CPU count shared among
    the processes torchrun starts on this machine (``$LOCAL_WORLD_SIZE``), at most 16."""
    value = env_positive_int("DKL_DECODE_WORKERS")
    if value is not None:
        return value
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(16, (os.cpu_count() or 1) // local))


class LazyImages:
    """The images of one split of an image-folder data set (ImageNet), decoded when indexed.

    It stands where a :class:`TensorData` holds its image tensor: ``x[idx]`` with int64 indices (a
    tensor on any device, or a list) decodes that batch into a float (B, 3, size, size) tensor in
    [0, 1] on ``device``; a slice gives a lazy subset; ``shape``, ``device``, ``dtype`` and ``len``
    behave as for a tensor. A training split draws torchvision's RandomResizedCrop (8-100 % of the
    area, aspect 3/4-4/3) and a horizontal flip per image from its own generator (``seed``); a test
    split resizes the shorter side to size / 0.875 and takes the centre crop (Resize(256) +
    CenterCrop(224) at size 224), as the official ImageNet evaluation. Decoding runs on a pool of
    ``workers`` threads (Pillow releases the GIL while decoding).
    """

    def __init__(self, files: Sequence[str], *, size: int, train: bool, seed: int = 0,
                 workers: Optional[int] = None, device=None, dtype: torch.dtype = torch.float32,
                 _shared: Optional[dict] = None):
        self.files = list(files)
        self.size, self.train = int(size), bool(train)
        self.workers = default_decode_workers() if workers is None else check_int("workers", workers, 1)
        self._device, self._dtype = _resolve_device(device), dtype
        # the generator and thread pool are shared by the copies .to() makes
        self._shared = _shared if _shared is not None else {"gen": torch.Generator().manual_seed(int(seed)),
                                                           "pool": None}

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.files), 3, self.size, self.size))

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def dim(self) -> int:
        return 4

    def is_floating_point(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self.files)

    def _view(self, files, device, dtype) -> "LazyImages":
        """Another view of the same split (a subset, or another device/dtype), sharing the crop
        generator and the thread pool."""
        return LazyImages(files, size=self.size, train=self.train, workers=self.workers, device=device,
                          dtype=dtype, _shared=self._shared)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "LazyImages":
        """The same lazy split decoded to ``device`` / ``dtype`` (sharing the crop generator and the pool)."""
        return self._view(self.files, device if device is not None else self._device, dtype or self._dtype)

    @property
    def generator(self) -> torch.Generator:
        """The generator of the training crops and flips (checkpointed by the trainers)."""
        return self._shared["gen"]

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, slice):
            return self._view(self.files[idx], self._device, self._dtype)
        return self.take(idx)

    def take(self, idx, keep=None) -> torch.Tensor:
        """The batch of rows ``idx``; with ``keep`` (a function selecting this process's rows of a
        global batch, e.g. ``t[rank::world]``) only those rows are decoded. The random crops are drawn
        for the whole batch first, in call order, so a seed fixes them and every torchrun rank gets
        the crops a one-process run would give its rows."""
        rows = idx.detach().cpu() if isinstance(idx, torch.Tensor) else torch.as_tensor(list(idx), dtype=torch.int64)
        draws = (torch.rand((rows.shape[0], 2 * _CROP_TRIES + 3), generator=self._shared["gen"],
                            dtype=torch.float64) if self.train else None)
        if keep is not None:
            rows, draws = keep(rows), (keep(draws) if draws is not None else None)
        jobs = zip(rows.tolist(), draws.tolist() if draws is not None else [None] * rows.shape[0])
        if self._shared["pool"] is None:
            from concurrent.futures import ThreadPoolExecutor

            self._shared["pool"] = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="dkl-decode")
        images = list(self._shared["pool"].map(
            lambda job: _load_image(self.files[job[0]], self.size, self.train, job[1]), jobs))
        if not images:
            return torch.empty((0, 3, self.size, self.size), device=self._device, dtype=self._dtype)
        return torch.stack(images).to(self._device).to(self._dtype).div_(255.0)


@dataclass
class FolderData(TensorData):
    """A :class:`TensorData` whose images are :class:`LazyImages` (decoded per batch), for data
    sets too large for memory (ImageNet). Labels are tensors as usual. The training split augments
    itself (``augment`` stays None), so the trainers neither augment again nor cache teacher logits."""

    lazy: ClassVar[bool] = True
    _images: ClassVar[type] = LazyImages


def _image_files(folder: Path, classes: Sequence[str]) -> Tuple[list, list]:
    files, labels = [], []
    for label, name in enumerate(classes):
        entries = sorted(e.path for e in os.scandir(folder / name)
                         if e.is_file() and e.name.lower().endswith(_IMAGE_SUFFIXES))
        files += entries
        labels += [label] * len(entries)
    return files, labels


def imagenet(root=None, *, size: int = 224, workers: Optional[int] = None, seed: int = 0,
             device=None) -> FolderData:
    """ImageNet (ILSVRC-2012) from class folders, decoded per batch (:class:`LazyImages`).

    Reads ``root`` (default ``default_data_root() / "imagenet"``) laid out as ``train/<wnid>/*.JPEG``
    and ``val/<wnid>/*.JPEG`` (the validation images sorted into class folders, as most ImageNet
    training code expects). Nothing is ever downloaded: ImageNet needs a registration at
    image-net.org. Classes are the sorted ``train`` folder names (1000 for ILSVRC-2012); ``val`` must
    have the same folders. Training images get RandomResizedCrop(size) + flip, validation images
    Resize(size / 0.875) + CenterCrop(size); normalisation with the usual ImageNet mean and std.

    Args:
        root: the folder holding ``train/`` and ``val/``.
        size: the crop size (224 in the paper).
        workers: decoding threads (default :func:`default_decode_workers`: ``$DKL_DECODE_WORKERS``,
            else the machine's CPUs shared among its torchrun processes, at most 16).
        seed: fixes the training crops and flips.
        device: where decoded batches go (default CPU).

    Raises:
        DatasetNotFoundError: a folder is missing or empty; the message says what to put where.
    """
    root = Path(root).expanduser() if root is not None else default_data_root() / "imagenet"
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")
    layout = (f"expected {root}/train/<class>/<image>.JPEG and {root}/val/<class>/<image>.JPEG (ILSVRC-2012 "
              "from image-net.org, with the validation images sorted into the class folders of train/; another "
              "folder: pass root=... or set DKL_DATA_DIR, which holds imagenet/). ImageNet is never downloaded "
              "automatically.")
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir() or not val_dir.is_dir():
        raise DatasetNotFoundError(f"ImageNet was not found under {root}: {layout}")
    if workers is not None:
        workers = check_int("workers", workers, 1)
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    missing = [c for c in classes if not (val_dir / c).is_dir()]
    if len(classes) < 2 or missing:
        raise DatasetNotFoundError(f"ImageNet under {root} is incomplete ({len(classes)} class folders in train/"
                                   + (f"; val/ lacks {missing[:3]}" if missing else "") + f"): {layout}")
    extra = sorted(set(e.name for e in os.scandir(val_dir) if e.is_dir()) - set(classes))
    if extra:  # their images would be left out of the evaluation without a word
        raise DatasetNotFoundError(f"ImageNet under {root}: val/ has class folders that train/ lacks ({len(extra)}: "
                                   f"{extra[:3]}); the classes are train/'s folders: {layout}")
    train_files, train_labels = _image_files(train_dir, classes)
    val_files, val_labels = _image_files(val_dir, classes)
    if not train_files or not val_files:
        raise DatasetNotFoundError(f"ImageNet under {root} has no images ({layout})")
    empty = [c for c, n in zip(classes, torch.bincount(torch.tensor(train_labels), minlength=len(classes)).tolist())
             if n == 0]
    if empty:  # a class no training image teaches, yet one of the logits and maybe of the validation labels
        raise DatasetNotFoundError(f"ImageNet under {root}: train/ class folders without images ({len(empty)}: "
                                   f"{empty[:3]}; images end in {', '.join(_IMAGE_SUFFIXES)}): {layout}")
    device = _resolve_device(device)
    mean, std = IMAGENET_STATS
    return FolderData(
        x_train=LazyImages(train_files, size=size, train=True, seed=seed, workers=workers, device=device),
        y_train=torch.tensor(train_labels, dtype=torch.int64, device=device),
        x_test=LazyImages(val_files, size=size, train=False, workers=workers, device=device),
        y_test=torch.tensor(val_labels, dtype=torch.int64, device=device),
        num_classes=len(classes), name="imagenet", mean=mean, std=std, augment=None,
        info={"source": "image folders (train/, val/)", "root_classes": len(classes), "size": size,
              "seed": int(seed)},
    )


# --------------------------------------------------------------------------------------- synthetic
def synthetic(*, n_train: int = 64, n_test: int = 32, num_classes: int = 4,
              image_shape: Sequence[int] = (1, 8, 8), noise: float = 0.3, seed: int = 0,
              augment: Optional[dict] = None, device=None,
              dtype: torch.dtype = torch.float32) -> TensorData:
    """Tiny random but learnable images for tests: one random prototype per class plus noise.

    x = clamp(prototype[y] + noise * N(0, 1), 0, 1), labels cycling through the classes (so every
    class is present), then shuffled; everything fixed by ``seed``.

    Returns:
        :class:`TensorData` named "synthetic", mean 0.5 and std 0.25 per channel.
    """
    n_train = check_int("n_train", n_train, 1)
    n_test = check_int("n_test", n_test, 1)
    num_classes = check_int("num_classes", num_classes, 2)
    if isinstance(image_shape, (str, bytes)) or not isinstance(image_shape, Sequence) or len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {image_shape!r}")
    shape = tuple(check_int("image_shape entries", s, 1) for s in image_shape)
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    seed = _seed(seed)
    _check_float_dtype(dtype)
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand((num_classes, *shape), generator=g)

    def make(n):
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        x = (prototypes[y] + noise * torch.randn((n, *shape), generator=g)).clamp_(0.0, 1.0)
        return x, y

    x_train, y_train = make(n_train)
    x_test, y_test = make(n_test)
    device = _resolve_device(device)
    channels = shape[0]
    return TensorData(
        x_train=x_train.to(device, dtype), y_train=y_train.to(device),
        x_test=x_test.to(device, dtype), y_test=y_test.to(device), num_classes=num_classes,
        name="synthetic", mean=(0.5,) * channels, std=(0.25,) * channels, augment=augment,
        info={"seed": seed, "noise": float(noise)},
    )


# ---------------------------------------------------------------------------------------- batching
def batch_indices(n: int, *, batch_size: int, shuffle: bool = False,
                  generator: Optional[torch.Generator] = None, drop_last: bool = False,
                  device=None) -> Iterator[torch.Tensor]:
    """Index tensors (int64, on ``device``) that cover range(n) in batches of ``batch_size``.

    With ``shuffle`` the order is a permutation drawn from ``generator`` (a CPU generator, so the
    same seed gives the same order on every device). ``drop_last`` drops a final short batch.
    """
    batch_size = check_int("batch_size", batch_size, 1)  # numpy integers too, as the trainers take them
    n = check_int("n", n, 0)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if device is not None:
        order = order.to(device)
    stop = (n // batch_size) * batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def batches(x: torch.Tensor, y: torch.Tensor, *, batch_size: int, shuffle: bool = False,
            generator: Optional[torch.Generator] = None,
            drop_last: bool = False) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(x_batch, y_batch) pairs over two tensors with the same first dimension (see
    :func:`batch_indices`); batches stay on the tensors' device."""
    _check_tensor("x", x)
    _check_tensor("y", y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y differ in length: {x.shape[0]} and {y.shape[0]}")
    if x.device != y.device:
        raise ValueError(f"x and y are on different devices ({x.device} and {y.device})")
    for idx in batch_indices(x.shape[0], batch_size=batch_size, shuffle=shuffle,
                             generator=generator, drop_last=drop_last, device=x.device):
        yield x[idx], y[idx]


def augment_crop_flip(x: torch.Tensor, *, padding: int = 4, flip: bool = True,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random crop after zero padding plus random horizontal flip, on x's device, batched.

    Each image of the batch x (B, C, H, W) is padded with ``padding`` zeros on every side, cut
    back to H x W at a random offset in [0, 2 * padding]², and mirrored left-right with
    probability 1/2 when ``flip``. The random draws come from ``generator`` (CPU) and are moved to
    x's device, so a seed gives the same augmentation on CPU and GPU. The output has x's shape,
    dtype and device, and its values are pixels of x or 0 (so [0, 1] stays [0, 1]).
    """
    _check_tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (on the CPU) or None, got {type(generator).__name__}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative integer, got {padding!r}")
    batch, _, height, width = x.shape
    if batch == 0 or (padding == 0 and not flip):
        return x
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator)
    mirror = (torch.rand(batch, generator=generator) < 0.5) if flip else torch.zeros(batch, dtype=torch.bool)
    offsets, mirror = offsets.to(x.device), mirror.to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    rows = offsets[0, :, None] + torch.arange(height, device=x.device)  # (B, H)
    cols = torch.arange(width, device=x.device).expand(batch, width)
    cols = torch.where(mirror[:, None], cols.flip(1), cols) + offsets[1, :, None]  # (B, W)
    b = torch.arange(batch, device=x.device)[:, None, None]
    # advanced indexing on dims 0, 2, 3 puts the broadcast (B, H, W) first: result (B, H, W, C)
    out = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous(memory_format=_memory_format(x))


def _memory_format(x: torch.Tensor):
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
