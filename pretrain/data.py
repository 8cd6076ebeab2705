"""Image data for pretraining: an ImageNet-layout reader and the embedded Fashion-MNIST.

Images always go through :func:`load_rgb` (``convert('RGB')``): real ImageNet holds CMYK
JPEGs and PNGs named ``.JPEG``. Grey Fashion-MNIST is replicated to 3 channels.
"""
from __future__ import annotations

import gzip
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from dcbench.core import UserError

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS


def to_8bit(im: Image.Image) -> Image.Image:
    """Scale images deeper than 8 bits to 0..255 instead of letting PIL saturate them:
    16-bit integers (modes ``I;16*``, and ``I`` holding 0..65535) by 255/65535; float images
    (``F``) as [0, 1] when their maximum is <= 1, else as [0, 255]; both clipped."""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.float64) * (255.0 / 65535.0)
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a
    else:
        return im
    return Image.fromarray(np.rint(np.clip(np.nan_to_num(a), 0, 255)).astype(np.uint8), "L")


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image of any format/mode as RGB (:func:`to_8bit` first); a missing, unreadable
    or corrupt file is one clear UserError."""
    try:
        with Image.open(path) as im:
            return to_8bit(im).convert("RGB")
    except FileNotFoundError:
        raise UserError(f"image file not found: {path}. Check the dataset root and the "
                        "split/list files that name it.") from None
    except PermissionError:
        raise UserError(f"cannot read image {path}: permission denied. Fix its permissions "
                        "or ask its owner.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot decode image {path} ({e}). The file is corrupt or not an "
                        "image: re-extract it from the archive or delete it.") from None


def require_dir(path: str | Path, what: str, expected: str) -> Path:
    """Return ``path`` if it is a directory; otherwise one clear error naming the layout."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} not found: {p} does not exist. Expected {expected}.")
    if not p.is_dir():
        raise UserError(f"{what} must be a directory, but {p} is a file. Expected {expected}.")
    return p


def scan_image_folder(root: str | Path, what: str = "image folder"
                      ) -> tuple[list[tuple[Path, int]], list[str]]:
    """Samples of an ImageFolder tree ``root/<class>/*.<ext>`` or a flat folder of images.

    Classes are the sorted sub-folder names (ImageNet: sorted wnids, n01440764 -> 0). A flat
    folder (images directly in ``root``, no sub-folders) gives unlabeled samples (label -1).
    Extensions are matched case-insensitively. Symlinked folders are followed when they lead
    out of ``root`` (data kept elsewhere); one leading back into ``root`` (a loop, or a class
    linked under another) is skipped with a warning, so no image is read twice.
    """
    expected = "an ImageFolder tree <root>/<class>/<image>.JPEG (or a flat folder of images)"
    root = require_dir(root, what, expected)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    inside = [c for c in classes if (root / c).is_symlink()
              and _within((root / c).resolve(), root.resolve())]
    for c in inside:
        log.warning("skipped class folder %s: a symlink to %s inside %s", root / c,
                    (root / c).resolve(), root)
    classes = [c for c in classes if c not in inside]
    if classes:
        samples = [(p, ci) for ci, c in enumerate(classes)
                   for p in _image_files(root / c, root.resolve())]
    else:
        samples = [(p, -1) for p in sorted(root.iterdir()) if p.is_file() and is_image_file(p)]
    if not samples:
        raise UserError(f"{what} {root} contains no images (extensions {', '.join(IMG_EXTENSIONS)})."
                        f" Expected {expected}.")
    return samples, classes


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _image_files(folder: Path, root: Path) -> list[Path]:
    """Image files under ``folder``, sorted, following symlinked folders that lead out of
    ``root`` (each real folder once) and skipping those that lead back into it."""
    out, seen = [], {folder.resolve()}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            p = Path(dirpath) / d
            real = p.resolve()
            if real in seen or (p.is_symlink() and _within(real, root)):
                log.warning("skipped %s: a symlink to %s, already read (a loop or a duplicate)",
                            p, real)
                continue
            seen.add(real)
            keep.append(d)
        dirnames[:] = keep
        out += [Path(dirpath) / f for f in filenames if is_image_file(Path(f))]
    return sorted(out)


def read_idx(path: str | Path) -> np.ndarray:
    """Read a (gzipped) IDX file: big-endian magic 0x08 0x0D-style, uint32 dims, uint8 data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read IDX file {path} ({e}); reinstall the dataset package "
                        "(apt-get install --reinstall dataset-fashion-mnist)") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path} is not a uint8 IDX file (bad magic {data[:4].hex()}).")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: header says {dims}, found {arr.size} bytes of data.")
    return arr.reshape(dims)


def fashion_mnist(split: str = "train", root: str | Path = FASHION_MNIST_DIR
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,28,28], labels int64 [N]) of Fashion-MNIST ``train`` or ``test``."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise UserError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'.")
    root = Path(root)
    img, lab = (root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz")
    if not img.is_file() or not lab.is_file():
        raise UserError(f"Fashion-MNIST not found at {root} (missing {img.name}). Install it "
                        "with: apt-get install dataset-fashion-mnist")
    images, labels = read_idx(img), read_idx(lab).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise UserError(f"{img} and {lab} do not match: {images.shape} vs {labels.shape}.")
    return images, labels


@dataclass
class ImageListDataset:
    """Images from files: ``samples`` = [(path, label)]; returns (transform(img), label, index)."""

    samples: Sequence[tuple[Path, int]]
    transform: Callable | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        img = load_rgb(path)
        return (self.transform(img) if self.transform else img), label, i

    @property
    def labels(self) -> np.ndarray:
        return np.array([lab for _, lab in self.samples], dtype=np.int64)


@dataclass
class ArrayImageDataset:
    """Images from a uint8 array [N,H,W] (grey, replicated to RGB) or [N,H,W,3]."""

    images: np.ndarray
    targets: np.ndarray
    transform: Callable | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        a = self.images[i]
        img = Image.fromarray(a, mode="L").convert("RGB") if a.ndim == 2 else Image.fromarray(a)
        return (self.transform(img) if self.transform else img), int(self.targets[i]), i

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.targets, dtype=np.int64)


_WORKER_ERROR = f"\n{UserError.__module__}.{UserError.__qualname__}: "


def _unwrap_worker_error(e: UserError) -> UserError:
    """A UserError raised inside a DataLoader worker (a corrupt image with --workers > 0) comes
    back as 'Caught UserError in DataLoader worker process N. Original Traceback ...
    pretrain.errors.UserError: <message>': keep only <message>, as with --workers 0."""
    msg = str(e)
    if "Original Traceback" in msg and _WORKER_ERROR in msg:
        return UserError(msg.rsplit(_WORKER_ERROR, 1)[1].strip())
    return e


def loader_batches(loader):
    """Iterate ``loader``, turning worker-wrapped UserErrors back into plain ones."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except UserError as e:
            raise _unwrap_worker_error(e) from None
        yield batch
