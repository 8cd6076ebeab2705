"""Semantic Boundaries Dataset (SBD, Hariharan et al. 2011) reader, for the VOC2012
segmentation "train_aug" set.

Official layout (``benchmark.tgz`` -> ``benchmark_RELEASE/dataset/``)::

    img/<id>.jpg      cls/<id>.mat      inst/<id>.mat
    train.txt (8,498 ids)    val.txt (2,857 ids)        ids look like ``2008_000002``

Each ``cls/<id>.mat`` is a MATLAB v5 file holding a 1x1 struct ``GTcls`` with fields
``Segmentation`` (uint8 [H, W]: 0 background, 1..20 the VOC classes in
:data:`~.voc.VOC_CLASSES` order), ``Boundaries`` (cell of sparse per-class boundary maps) and
``CategoriesPresent``. Only ``Segmentation`` is read (``inst/`` is not used).

SBD masks have **no 255 void**: the pixels on object outlines, which VOC's
``SegmentationClass`` marks 255 (ignored by the loss and the metric), carry a class in SBD
and count like any other pixel.

"train_aug" (:func:`train_aug_ids`) = (SBD train ∪ SBD val ∪ VOC2012 seg train) minus VOC2012
seg val, sorted: 10,582 images on the real data, the set DeepLab / FCN follow-ups train on.
:class:`SegmentationUnion` serves it with VOC masks where VOC has one and SBD masks elsewhere.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import scipy.io

from dcbench.core import UserError
from pretrain.data import load_rgb, require_dir

from .common import raise_if_missing, read_lines, require_file
from .voc import NUM_CLASSES, VocSegmentation, image_ids, voc_root

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
DOWNLOAD_FIX = ("Download benchmark.tgz from the SBD page "
                "(http://home.bharathh.info/pubs/codes/SBD/download.html) and extract it; give "
                "the folder holding benchmark_RELEASE/ (or benchmark_RELEASE/ or its dataset/ "
                "folder itself)")
LAYOUT = "a dataset/ folder holding img/, cls/ and train.txt (benchmark_RELEASE/dataset/)"


# --------------------------------------------------------------------------- layout


def _missing_parts(folder: Path) -> list[str]:
    parts = [name for name in ("img", "cls") if not (folder / name).is_dir()]
    return parts + (["train.txt"] if not (folder / "train.txt").is_file() else [])


def sbd_root(root: str | Path) -> Path:
    """The SBD ``dataset`` folder: ``root`` itself, ``root/dataset`` or
    ``root/benchmark_RELEASE/dataset`` -- the first holding ``img/``, ``cls/`` and
    ``train.txt``."""
    root = require_dir(root, "SBD root", f"{LAYOUT}. {DOWNLOAD_FIX}")
    candidates = (root, root / "dataset", root / "benchmark_RELEASE" / "dataset")
    for c in candidates:
        if not _missing_parts(c):
            return c
    partial = next((c for c in candidates if c.is_dir() and len(_missing_parts(c)) < 3), None)
    lacks = (f" {partial} lacks {', '.join(_missing_parts(partial))}."
             if partial is not None else "")
    raise UserError(f"no SBD dataset folder under {root}: looked for img/, cls/ and train.txt in "
                    f"{', '.join(str(c) for c in candidates)}.{lacks} {DOWNLOAD_FIX}.")


def sbd_ids(root: str | Path, split: str) -> list[str]:
    """Ids listed in ``<dataset>/<split>.txt`` (``split``: train / val), in file order."""
    if split not in SPLITS:
        raise UserError(f"unknown SBD split {split!r}; use one of {SPLITS}.")
    folder = sbd_root(root)
    path = require_file(folder / f"{split}.txt", "SBD split file",
                        f"Re-extract benchmark.tgz so that {folder} holds {split}.txt.")
    ids: list[str] = []
    seen: set[str] = set()
    for lineno, s in read_lines(path, "SBD split file"):
        parts = s.split()
        if len(parts) != 1:
            raise UserError(f"{path}:{lineno}: expected one image id per line (e.g. "
                            f"2008_000002), got {s!r}.")
        if parts[0] in seen:
            raise UserError(f"{path} lists image id {parts[0]} twice. Re-extract benchmark.tgz.")
        seen.add(parts[0])
        ids.append(parts[0])
    if not ids:
        raise UserError(f"SBD split file {path} is empty. Re-extract benchmark.tgz.")
    return ids


def train_aug_ids(sbd_root: str | Path, voc_train_ids: Iterable[str],
                  voc_val_ids: Iterable[str]) -> list[str]:
    """The VOC2012 "train_aug" ids: (SBD train ∪ SBD val ∪ VOC2012 seg train) minus VOC2012
    seg val, sorted (10,582 on the real data).

    SBD's own splits contain VOC2012 seg val images, so they are removed to keep the
    evaluation split unseen.
    """
    ids = set(sbd_ids(sbd_root, "train")) | set(sbd_ids(sbd_root, "val")) | set(voc_train_ids)
    return sorted(ids - set(voc_val_ids))


# --------------------------------------------------------------------------- masks


def read_sbd_mask(path: str | Path) -> np.ndarray:
    """``GTcls.Segmentation`` of one ``cls/<id>.mat`` as uint8 [H, W] (0..20, no void); any
    problem is one UserError naming the file."""
    path = Path(path)
    fix = "Re-extract cls/ from benchmark.tgz (SBD's official MATLAB v5 files)."
    try:
        with open(path, "rb") as f:
            data = scipy.io.loadmat(f, squeeze_me=True, struct_as_record=False)
    except FileNotFoundError:
        raise UserError(f"SBD mask not found: {path}. {fix}") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure on a user file (corrupt, v7.3)
        raise UserError(f"cannot read SBD mask {path} as a MATLAB file "
                        f"({type(e).__name__}: {e}). {fix}") from None
    if "GTcls" not in data:
        names = sorted(k for k in data if not k.startswith("__"))
        hint = " (an instance file of inst/; masks are read from cls/)" if "GTinst" in data else ""
        raise UserError(f"SBD mask {path} holds no GTcls variable (it holds: "
                        f"{', '.join(names) or 'nothing'}){hint}. {fix}")
    seg = getattr(data["GTcls"], "Segmentation", None)
    if seg is None:
        raise UserError(f"SBD mask {path}: GTcls is not a 1x1 struct with a Segmentation "
                        f"field. {fix}")
    seg = np.asarray(seg)
    if seg.ndim != 2 or seg.size == 0:
        raise UserError(f"SBD mask {path}: GTcls.Segmentation has shape {seg.shape}; expected "
                        f"a non-empty 2-D H x W array. {fix}")
    if seg.dtype.kind not in "uibf" or (seg.dtype.kind == "f"
                                        and not np.all(np.isfinite(seg) & (seg == np.round(seg)))):
        raise UserError(f"SBD mask {path}: GTcls.Segmentation is {seg.dtype}, not integer class "
                        f"indices. {fix}")
    bad = (seg < 0) | (seg > NUM_CLASSES)
    if bad.any():
        raise UserError(f"SBD mask {path} holds value {seg[bad][0]:g} ({int(bad.sum())} pixels); "
                        f"SBD class masks hold 0..{NUM_CLASSES} only (no 255 void). {fix}")
    return seg.astype(np.uint8)


# --------------------------------------------------------------------------- datasets


class SbdSegmentation:
    """SBD semantic segmentation: items ``(image, mask, index)``; ``mask`` uint8 [H, W] numpy
    (0 background, 1..20 classes, no void). ``transforms(image, mask)`` jointly.

    ``ids``, if given, replaces the split's list; each must be listed in train.txt or val.txt.
    """

    def __init__(self, root: str | Path, split: str = "train",
                 transforms: Callable | None = None, ids: Sequence[str] | None = None) -> None:
        self.root = sbd_root(root)
        self.split = split if ids is None else "custom"
        self.transforms = transforms
        if ids is None:
            self.ids = sbd_ids(self.root, split)
            listed = {i: self.root / f"{split}.txt" for i in self.ids}
        else:
            listed = {}
            for s in reversed(SPLITS):  # an id in both files is reported as from train.txt
                listed.update({i: self.root / f"{s}.txt" for i in sbd_ids(self.root, s)})
            self.ids = list(ids)
            unknown = next((i for i in self.ids if i not in listed), None)
            if unknown is not None:
                raise UserError(f"image id {unknown} is in neither {self.root / 'train.txt'} "
                                f"nor {self.root / 'val.txt'}; SBD has no mask for it.")
        self.paths = [self.root / "img" / f"{i}.jpg" for i in self.ids]
        self.mask_paths = [self.root / "cls" / f"{i}.mat" for i in self.ids]
        for list_file in dict.fromkeys(listed[i] for i in self.ids):
            rows = [k for k, i in enumerate(self.ids) if listed[i] == list_file]
            raise_if_missing([self.paths[k] for k in rows], list_file)
            raise_if_missing([self.mask_paths[k] for k in rows], list_file,
                             f"Masks are read from {self.root / 'cls'}. ")
        log.info("SBD segmentation %s: %d images (root %s)", self.split, len(self.ids),
                 self.root)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        img, mask = load_rgb(self.paths[i]), read_sbd_mask(self.mask_paths[i])
        if mask.shape != (img.height, img.width):
            raise UserError(f"SBD mask {self.mask_paths[i]} is {mask.shape[1]}x{mask.shape[0]} "
                            f"but its image {self.paths[i]} is {img.width}x{img.height}. "
                            "Re-extract both from benchmark.tgz.")
        if self.transforms:
            img, mask = self.transforms(img, mask)
        return img, mask, i


class SegmentationUnion:
    """VOC + SBD segmentation items ``(image, mask, index)`` over ``ids`` (default: the
    sorted union). An id in both parts is read from ``voc`` (its masks keep 255 void).

    Each part applies its own transforms (if any), then ``transforms(image, mask)``.
    ``sources[i]`` is ``"voc"`` or ``"sbd"``; ``paths`` / ``mask_paths`` as in the parts.
    """

    def __init__(self, voc: VocSegmentation, sbd: SbdSegmentation,
                 ids: Sequence[str] | None = None, transforms: Callable | None = None) -> None:
        self.voc, self.sbd, self.transforms = voc, sbd, transforms
        voc_index = {i: k for k, i in enumerate(voc.ids)}
        sbd_index = {i: k for k, i in enumerate(sbd.ids)}
        self.ids = sorted(voc_index.keys() | sbd_index.keys()) if ids is None else list(ids)
        self._items: list[tuple[object, int]] = []
        self.sources: list[str] = []
        for i in self.ids:
            if i in voc_index:
                self._items.append((voc, voc_index[i]))
                self.sources.append("voc")
            elif i in sbd_index:
                self._items.append((sbd, sbd_index[i]))
                self.sources.append("sbd")
            else:
                raise UserError(f"image id {i} is in neither the VOC{voc.year} {voc.split} "
                                f"segmentation set ({voc.root}) nor the SBD set ({sbd.root}).")
        self.paths = [part.paths[k] for part, k in self._items]
        self.mask_paths = [part.mask_paths[k] for part, k in self._items]

    @classmethod
    def train_aug(cls, voc: str | Path, sbd: str | Path,
                  transforms: Callable | None = None) -> SegmentationUnion:
        """The VOC2012 "train_aug" set (:func:`train_aug_ids`): VOC2012 seg train with VOC
        masks, the other ids from SBD. ``voc``: a VOC2012 root (as for :func:`~.voc.voc_root`);
        ``sbd``: as for :func:`sbd_root`."""
        voc_train = VocSegmentation(voc, "train", 2012)
        voc_val = image_ids(voc_root(voc, 2012), "val", "Segmentation")
        ids = train_aug_ids(sbd, voc_train.ids, voc_val)
        in_voc = set(voc_train.ids)
        sbd_part = SbdSegmentation(sbd, ids=[i for i in ids if i not in in_voc])
        out = cls(voc_train, sbd_part, ids, transforms)
        log.info("VOC2012 train_aug: %d images (%d VOC masks, %d SBD masks)", len(out.ids),
                 len(voc_train.ids), len(sbd_part.ids))
        return out

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        part, k = self._items[i]
        img, mask, _ = part[k]
        if self.transforms:
            img, mask = self.transforms(img, mask)
        return img, mask, i
