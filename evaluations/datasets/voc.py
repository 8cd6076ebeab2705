"""Pascal VOC 2007 / 2012 readers and datasets (DATA_FORMATS.md B.3).

Tree of one year (``<year root>`` = ``.../VOCdevkit/VOC2007``)::

    JPEGImages/<id>.jpg          Annotations/<id>.xml
    ImageSets/Main/{train,val,trainval,test}.txt and <cls>_<split>.txt
    ImageSets/Segmentation/{train,val,trainval[,test]}.txt
    SegmentationClass/<id>.png   SegmentationObject/<id>.png   (palette PNGs, 255 = void)

:func:`voc_root` finds the year root; every other reader takes that year root.

Encodings (one place to look them up):

* per-class files and :func:`classification_labels`: int8, ``1`` present, ``0`` present only
  as difficult, ``-1`` absent (the file's own encoding; :mod:`evaluations.metrics` ``ap_*``
  take it as ``gt``).
* :class:`VocClassification` training targets: float32 ``1`` positive, ``0`` negative,
  ``-1`` ignore (difficult only) -- :func:`classification_targets`; a loss uses
  ``target.clamp(min=0)`` weighted by ``target >= 0``.
* :class:`VocDetection` boxes: float32 ``[x1, y1, x2, y2]`` = file box minus 1 on all four
  coordinates: 0-based *inclusive* pixel indices (the py-faster-rcnn convention), so a box's
  width is ``x2 - x1 + 1`` as in :func:`evaluations.metrics.detection_ap`. Labels int64 0..19
  in :data:`VOC_CLASSES` order (no background index); ``difficult`` bool.
* segmentation masks: uint8 class indices, 0 = background, 1..20 = :data:`VOC_CLASSES`,
  255 = void.
"""
from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dcbench.core import UserError
from pretrain.data import load_rgb, require_dir

from .common import raise_if_missing, read_lines, require_file

log = logging.getLogger(__name__)

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")
NUM_CLASSES = len(VOC_CLASSES)
SEG_CLASSES = ("background", *VOC_CLASSES)  # segmentation index i names SEG_CLASSES[i]
VOID = 255
YEARS = (2007, 2012)
TASKS = ("Main", "Segmentation")
SPLITS = ("train", "val", "trainval", "test")
POSITIVE, DIFFICULT_ONLY, NEGATIVE = 1, 0, -1  # per-class file labels
TARGET_POS, TARGET_NEG, TARGET_IGNORE = 1.0, 0.0, -1.0  # VocClassification targets

LAYOUT_HELP = ("<root>/VOCdevkit/VOC{year}/ (or <root>/VOC{year}/, or the VOC{year} folder "
               "itself) holding JPEGImages/, Annotations/, ImageSets/Main/ and, for "
               "segmentation, ImageSets/Segmentation/ + SegmentationClass/; extract "
               "VOCtrainval_*.tar (and for 2007 VOCtest_06-Nov-2007.tar) into <root>")


@dataclass(frozen=True)
class VocObject:
    """One annotated object: ``box`` = (xmin, ymin, xmax, ymax) as in the file (1-based,
    inclusive)."""

    name: str
    box: tuple[int, int, int, int]
    difficult: bool = False
    truncated: bool = False

    @property
    def label(self) -> int:
        return VOC_CLASSES.index(self.name)


@dataclass(frozen=True)
class Annotation:
    """The parsed ``Annotations/<id>.xml`` (id = the file's stem)."""

    image_id: str
    width: int
    height: int
    objects: tuple[VocObject, ...]


# --------------------------------------------------------------------------- layout


def voc_root(root: str | Path, year: int) -> Path:
    """The ``VOC<year>`` folder under ``root``: ``root`` itself, ``root/VOC<year>`` or
    ``root/VOCdevkit/VOC<year>``."""
    if year not in YEARS:
        raise UserError(f"unknown Pascal VOC year {year!r}; use one of {YEARS}.")
    expected = LAYOUT_HELP.format(year=year)
    root = require_dir(root, f"Pascal VOC{year} root", expected)
    name = f"VOC{year}"
    other_year = re.fullmatch(r"VOC\d{4}", root.name) and root.name != name
    if root.name == name or ((root / "ImageSets").is_dir() and not other_year):
        return root
    for candidate in (root / name, root / "VOCdevkit" / name):
        if candidate.is_dir():
            return candidate
    raise UserError(f"no Pascal {name} folder under {root}: looked for {root / name} and "
                    f"{root / 'VOCdevkit' / name}. Expected {expected}.")


def _split_file(root: Path, split: str, task: str) -> Path:
    if task not in TASKS:
        raise UserError(f"unknown VOC image-set task {task!r}; use one of {TASKS}.")
    if split not in SPLITS:
        raise UserError(f"unknown VOC split {split!r}; use one of {SPLITS}.")
    fix = (f"Extract the VOC archives so that {root} holds ImageSets/{task}/{split}.txt"
           + (" (the 2007 test split is in VOCtest_06-Nov-2007.tar)." if split == "test"
              else "."))
    return require_file(root / "ImageSets" / task / f"{split}.txt", f"VOC {task} split file",
                        fix)


def image_ids(root: Path, split: str, task: str = "Main") -> list[str]:
    """Ids listed in ``ImageSets/<task>/<split>.txt`` of a year root, in file order."""
    path = _split_file(Path(root), split, task)
    ids = []
    for lineno, s in read_lines(path, "VOC split file"):
        parts = s.split()
        if len(parts) != 1:
            raise UserError(f"{path}:{lineno}: expected one image id per line, got {s!r}.")
        ids.append(parts[0])
    if not ids:
        raise UserError(f"VOC split file {path} is empty. Re-extract the VOC archive.")
    dup = _first_duplicate(ids)
    if dup is not None:
        raise UserError(f"{path} lists image id {dup} twice. Re-extract the VOC archive.")
    return ids


def _first_duplicate(ids: Sequence[str]) -> str | None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    return None


# --------------------------------------------------------------------------- labels


def read_class_file(path: Path) -> dict[str, int]:
    """``{id: label}`` of one ``<cls>_<split>.txt`` (labels ``-1``/``0``/``1``, ``%2d``)."""
    out: dict[str, int] = {}
    for lineno, s in read_lines(path, "VOC per-class file"):
        parts = s.split()
        if len(parts) != 2 or parts[1] not in ("-1", "0", "1"):
            raise UserError(f"{path}:{lineno}: expected '<image id> <label>' with label -1, 0 "
                            f"or 1 (e.g. '000007  1'), got {s!r}.")
        if parts[0] in out:
            raise UserError(f"{path}:{lineno}: image id {parts[0]} is listed twice.")
        out[parts[0]] = int(parts[1])
    return out


def classification_labels(root: Path, split: str) -> tuple[list[str], np.ndarray]:
    """(ids of ``Main/<split>.txt``, labels int8 [N, 20]) from the 20 per-class files.

    Classes in sorted file-name order (= :data:`VOC_CLASSES`); labels 1 / 0 (difficult only)
    / -1 as in the files. Each per-class file must list exactly the split's ids.
    """
    root = Path(root)
    ids = image_ids(root, split, "Main")
    labels = np.empty((len(ids), NUM_CLASSES), dtype=np.int8)
    for c, cls in enumerate(sorted(VOC_CLASSES)):
        path = require_file(root / "ImageSets" / "Main" / f"{cls}_{split}.txt",
                            "VOC per-class file", f"Extract the VOC archive so that {root} "
                            f"holds ImageSets/Main/<class>_{split}.txt for all 20 classes.")
        table = read_class_file(path)
        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        missing = next((i for i in ids if i not in table), None)
        if missing is not None or len(table) != len(ids):
            id_set = set(ids)
            what = (f"lacks image id {missing}, which is listed in {split_file}"
                    if missing is not None else
                    f"lists image id {next(i for i in table if i not in id_set)}, which is not "
                    f"in {split_file}")
            raise UserError(f"{path} {what}. Every per-class file must list exactly the "
                            "split's ids; re-extract the VOC archive.")
        labels[:, c] = [table[i] for i in ids]
    return ids, labels


def labels_from_annotation(ann: Annotation) -> np.ndarray:
    """int8 [20]: 1 if a non-difficult instance is present, 0 if only difficult ones, else -1."""
    out = np.full(NUM_CLASSES, NEGATIVE, dtype=np.int8)
    for o in ann.objects:
        c = o.label
        if not o.difficult:
            out[c] = POSITIVE
        elif out[c] == NEGATIVE:
            out[c] = DIFFICULT_ONLY
    return out


def check_labels_match_annotations(root: Path, split: str) -> tuple[list[str], np.ndarray]:
    """Check that the per-class files agree with the XMLs; return :func:`classification_labels`."""
    root = Path(root)
    ids, labels = classification_labels(root, split)
    for row, image_id in zip(labels, ids):
        derived = labels_from_annotation(read_annotation(root / "Annotations" /
                                                         f"{image_id}.xml"))
        bad = np.flatnonzero(derived != row)
        if bad.size:
            c = int(bad[0])
            cls = VOC_CLASSES[c]
            raise UserError(
                f"image {image_id}, class {cls}: {root / 'ImageSets/Main' / f'{cls}_{split}.txt'}"
                f" says {int(row[c])} but {root / 'Annotations' / f'{image_id}.xml'} gives "
                f"{int(derived[c])} (1 present, 0 only difficult, -1 absent). The per-class "
                "files and the annotations come from different releases: re-extract both.")
    return ids, labels


def classification_targets(labels: np.ndarray) -> np.ndarray:
    """File labels (1 / 0 / -1) -> training targets float32 (1 pos, -1 ignore, 0 neg)."""
    labels = np.asarray(labels)
    out = np.full(labels.shape, TARGET_NEG, dtype=np.float32)
    out[labels == POSITIVE] = TARGET_POS
    out[labels == DIFFICULT_ONLY] = TARGET_IGNORE
    return out


# --------------------------------------------------------------------------- annotations


def read_annotation(xml_path: str | Path) -> Annotation:
    """Parse one ``Annotations/<id>.xml``; any malformed content is one UserError naming it."""
    path = Path(xml_path)
    fix = "Re-extract the VOC archive or fix the file."
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise UserError(f"VOC annotation not found: {path}. {fix}") from None
    except (ET.ParseError, OSError) as e:
        raise UserError(f"cannot parse VOC annotation {path} ({e}). {fix}") from None
    top = tree.getroot()
    size = top.find("size")
    width = _int(path, size, "width") if size is not None else None
    height = _int(path, size, "height") if size is not None else None
    if width is None or height is None:
        raise UserError(f"VOC annotation {path} has no <size><width>/<height>. {fix}")
    objects = []
    for k, obj in enumerate(top.findall("object"), 1):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise UserError(f"VOC annotation {path}, object {k}: unknown class {name!r}; "
                            f"expected one of {', '.join(VOC_CLASSES)}.")
        bndbox = obj.find("bndbox")  # directly under <object>: never a <part>'s box
        if bndbox is None:
            raise UserError(f"VOC annotation {path}, object {k} ({name}) has no <bndbox>. {fix}")
        box = tuple(_int(path, bndbox, t, f"object {k} ({name})")
                    for t in ("xmin", "ymin", "xmax", "ymax"))
        if None in box:
            raise UserError(f"VOC annotation {path}, object {k} ({name}): <bndbox> lacks one of "
                            f"xmin/ymin/xmax/ymax. {fix}")
        x1, y1, x2, y2 = box
        if x2 < x1 or y2 < y1:
            raise UserError(f"VOC annotation {path}, object {k} ({name}): malformed box "
                            f"xmin={x1} ymin={y1} xmax={x2} ymax={y2} (xmax < xmin or ymax < "
                            f"ymin). {fix}")
        objects.append(VocObject(name, box, bool(_int(path, obj, "difficult", name) or 0),
                                 bool(_int(path, obj, "truncated", name) or 0)))
    return Annotation(path.stem, width, height, tuple(objects))


def check_detection_annotation(ann: Annotation, path: Path) -> None:
    """What a detector cannot train or be scored on: an image without any object, a box with
    no pixel inside the image. One UserError naming the file and the object."""
    fix = ("Fix the file, or leave the image out of the ImageSets/Main split files (and the "
           "per-class files).")
    if not ann.objects:
        raise UserError(f"VOC annotation {path} has no <object>: every Pascal VOC image holds "
                        f"at least one object, so a detector has nothing to learn or find "
                        f"there. {fix}")
    for k, o in enumerate(ann.objects, 1):
        x1, y1, x2, y2 = o.box
        if x1 > ann.width or y1 > ann.height or x2 < 1 or y2 < 1:
            raise UserError(f"VOC annotation {path}, object {k} ({o.name}): degenerate box "
                            f"xmin={x1} ymin={y1} xmax={x2} ymax={y2} lies outside the "
                            f"{ann.width}x{ann.height} image (coordinates are 1-based "
                            f"pixels). {fix}")


def _int(path: Path, parent: ET.Element, tag: str, where: str = "") -> int | None:
    """``int(float(text))`` of ``parent/<tag>``; None when the tag is absent."""
    text = parent.findtext(tag)
    if text is None:
        return None
    try:
        return int(float(text.strip()))
    except (ValueError, OverflowError):
        raise UserError(f"VOC annotation {path}{', ' + where if where else ''}: <{tag}> is "
                        f"{text.strip()!r}, not a number. Re-extract the VOC archive or fix "
                        "the file.") from None


# --------------------------------------------------------------------------- masks


def voc_colormap(n: int = 256) -> np.ndarray:
    """The VOC ``labelcolormap`` palette, uint8 [n, 3]: index bits spread over 8 rounds."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def read_mask(path: str | Path, max_value: int = NUM_CLASSES) -> np.ndarray:
    """Palette (or grey) PNG -> uint8 [H, W] of indices; values > ``max_value`` other than
    255 are a UserError (``max_value``: 20 for SegmentationClass, larger for
    SegmentationObject instance numbers)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise UserError(f"VOC mask {path} has image mode {im.mode}; expected a palette "
                                "('P') PNG whose pixel values are class indices. Re-extract it "
                                "(a colour-rendered mask cannot be read as indices).")
            mask = np.array(im, dtype=np.uint8)  # indices, never convert('RGB')
    except FileNotFoundError:
        raise UserError(f"VOC mask not found: {path}. Extract SegmentationClass/ from the VOC "
                        "archive.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot decode VOC mask {path} ({e}). Re-extract it.") from None
    bad = (mask > max_value) & (mask != VOID)
    if bad.any():
        raise UserError(f"VOC mask {path} holds value {int(mask[bad][0])} ({int(bad.sum())} "
                        f"pixels); valid values are 0..{max_value} and {VOID} (void). Re-extract "
                        "it or fix the mask.")
    return mask


def write_mask(path: str | Path, mask: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Save a uint8 index mask as a VOC palette PNG (``palette``: :func:`voc_colormap`'s,
    computed if not given)."""
    im = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    im.putpalette((voc_colormap() if palette is None else palette).flatten().tolist())
    im.save(path, format="PNG")


# --------------------------------------------------------------------------- datasets


def _image_paths(root: Path, ids: Sequence[str], listed_in: Path) -> list[Path]:
    paths = [root / "JPEGImages" / f"{i}.jpg" for i in ids]
    raise_if_missing(paths, listed_in)
    return paths


class VocClassification:
    """VOC multi-label classification: items ``(transform(RGB image), target, index)``.

    ``target``: float32 [20], 1 positive, 0 negative, -1 ignore (only difficult instances);
    ``labels``: the file labels int8 [N, 20] (1 / 0 / -1) for ``evaluations.metrics.ap_*``.
    """

    def __init__(self, root: str | Path, split: str, year: int = 2007,
                 transform: Callable | None = None) -> None:
        self.root = voc_root(root, year)
        self.split, self.year, self.transform = split, year, transform
        self.ids, self.labels = classification_labels(self.root, split)
        self.targets = classification_targets(self.labels)
        self.paths = _image_paths(self.root, self.ids,
                                  self.root / "ImageSets" / "Main" / f"{split}.txt")
        log.info("VOC%d classification %s: %d images (root %s)", year, split, len(self.ids),
                 self.root)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        img = load_rgb(self.paths[i])
        return (self.transform(img) if self.transform else img), self.targets[i].copy(), i


class VocDetection:
    """VOC detection: items ``(image, target, index)``.

    ``target`` = dict of torch tensors: ``boxes`` float32 [M, 4] 0-based inclusive
    ``x1, y1, x2, y2`` (file box - 1), ``labels`` int64 [M] 0..19, ``difficult`` bool [M].
    ``transforms(image, target) -> (image, target)`` is applied jointly, if given.
    All annotations are parsed at construction (malformed XML fails early).
    """

    def __init__(self, root: str | Path, split: str, year: int = 2007,
                 transforms: Callable | None = None, keep_difficult: bool = True) -> None:
        self.root = voc_root(root, year)
        self.split, self.year, self.transforms = split, year, transforms
        self.ids = image_ids(self.root, split, "Main")
        listed_in = self.root / "ImageSets" / "Main" / f"{split}.txt"
        xmls = [self.root / "Annotations" / f"{i}.xml" for i in self.ids]
        raise_if_missing(xmls, listed_in,
                         f"Annotations are read from {self.root / 'Annotations'}. ")
        self.annotations = tuple(read_annotation(p) for p in xmls)
        for ann, xml in zip(self.annotations, xmls):
            check_detection_annotation(ann, xml)
        self.keep_difficult = keep_difficult
        self.paths = _image_paths(self.root, self.ids, listed_in)
        log.info("VOC%d detection %s: %d images, %d objects (root %s)", year, split,
                 len(self.ids), sum(len(a.objects) for a in self.annotations), self.root)

    def __len__(self) -> int:
        return len(self.ids)

    def target(self, i: int) -> dict:
        """The target of item ``i`` without decoding its image."""
        import torch

        objs = [o for o in self.annotations[i].objects if self.keep_difficult or not o.difficult]
        boxes = np.array([o.box for o in objs], dtype=np.float32).reshape(-1, 4) - 1.0
        return {"boxes": torch.from_numpy(boxes),
                "labels": torch.tensor([o.label for o in objs], dtype=torch.int64),
                "difficult": torch.tensor([o.difficult for o in objs], dtype=torch.bool)}

    def __getitem__(self, i: int):
        img, target = load_rgb(self.paths[i]), self.target(i)
        if self.transforms:
            img, target = self.transforms(img, target)
        return img, target, i


class VocSegmentation:
    """VOC semantic segmentation: items ``(image, mask, index)``; ``mask`` uint8 [H, W]
    numpy (0 background, 1..20 classes, 255 void). ``transforms(image, mask)`` jointly."""

    def __init__(self, root: str | Path, split: str, year: int = 2012,
                 transforms: Callable | None = None) -> None:
        self.root = voc_root(root, year)
        self.split, self.year, self.transforms = split, year, transforms
        self.ids = image_ids(self.root, split, "Segmentation")
        listed_in = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        self.paths = _image_paths(self.root, self.ids, listed_in)
        self.mask_paths = [self.root / "SegmentationClass" / f"{i}.png" for i in self.ids]
        raise_if_missing(self.mask_paths, listed_in,
                         f"Masks are read from {self.root / 'SegmentationClass'}. ")
        log.info("VOC%d segmentation %s: %d images (root %s)", year, split, len(self.ids),
                 self.root)

    def __len__(self) -> int:
        return len(self.ids)

    def _check_size(self, i: int, image: tuple[int, int], mask: tuple[int, int]) -> None:
        """``image`` and ``mask`` as (width, height)."""
        if image != mask:
            raise UserError(f"VOC mask {self.mask_paths[i]} is {mask[0]}x{mask[1]} but its "
                            f"image {self.paths[i]} is {image[0]}x{image[1]}. Re-extract both "
                            "from the same archive.")

    def check_sizes(self) -> None:
        """Every mask has its image's size (read from the file headers only)."""
        for i in range(len(self.ids)):
            try:
                with Image.open(self.paths[i]) as im, Image.open(self.mask_paths[i]) as m:
                    image, mask = im.size, m.size
            except (UnidentifiedImageError, OSError) as e:
                raise UserError(f"cannot read {self.paths[i]} or its mask {self.mask_paths[i]} "
                                f"({e}). Re-extract both from the VOC archive.") from None
            self._check_size(i, image, mask)

    def __getitem__(self, i: int):
        img, mask = load_rgb(self.paths[i]), read_mask(self.mask_paths[i])
        self._check_size(i, img.size, (mask.shape[1], mask.shape[0]))
        if self.transforms:
            img, mask = self.transforms(img, mask)
        return img, mask, i
