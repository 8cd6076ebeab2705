"""An embedded Pascal-VOC-format suite built from real images only (DATA_FORMATS.md B.3).

Each scene is a crop of one of scikit-learn's bundled photos (``load_sample_images``:
``china.jpg``, ``flower.jpg``; random window, rescaled, maybe mirrored, slightly blurred and
lowered in contrast) with 1-3 real items pasted on it: Fashion-MNIST items (Debian
``dataset-fashion-mnist``) and scikit-learn digits (``load_digits``), each resized to 26-70 px
(at 128 px images; sizes scale with ``image_size``) and tinted with a random pale colour shaded
by the item's own grey levels (:mod:`pretrain.scenes`; the knobs: :class:`SceneStyle`). The 20
VOC class names stand for the 10 Fashion-MNIST classes then the 10 digits, in
:data:`~.voc.VOC_CLASSES` order (``aeroplane`` = T-shirt/top, ..., ``diningtable`` = Ankle
boot, ``dog`` = digit 0, ..., ``tvmonitor`` = digit 9), written to ``class_sources.txt``.

An object's shape is the item's own foreground (grey level above a threshold, holes filled);
objects never overlap. Its box is the tight box of its visible pixels (1-based inclusive).
``truncated`` = cut by the image border; ``difficult`` = small (visible box's long side below
22 px at 128 px) or less than half visible. Segmentation masks (``SegmentationClass``: class
index 1..20, ``SegmentationObject``: instance 1..K) carry a void (255) band around each object,
from 1 px inside to 2 px outside its outline (scaled with ``image_size``), like VOC.

What :func:`build_voc` writes under an empty ``root``: ``VOCdevkit/VOC<year>/`` with
``JPEGImages/*.jpg`` (quality 90), ``Annotations/*.xml``, ``ImageSets/Main/{train,val,
trainval[,test]}.txt`` + ``<cls>_<split>.txt`` (``%2d`` labels), ``ImageSets/Segmentation/``
(same splits: every image is segmented), ``SegmentationClass/*.png``,
``SegmentationObject/*.png`` (palette PNGs) and ``class_sources.txt``.

* VOC2007: ids ``000001``..; ``n_test`` of them (a seeded random subset) form ``test``, the
  rest ``trainval``, split at random into ``train`` (the larger half) and ``val``.
* VOC2012: ids ``2008_000001``..; ``trainval`` only (``n_test`` must be 0), split into
  ``train`` / ``val`` as above.

The evaluation split (2007 ``test``, 2012 ``val``) draws its items from held-out sources
(Fashion-MNIST t10k, digits with index % 3 == 0); the other splits from the rest (Fashion-MNIST
train, the other digits). Everything is a function of ``(seed, year, image index)`` through
:func:`dcbench.core.derive_seed`.
"""
from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from dcbench.core import UserError, derive_seed
from pretrain.data import FASHION_MNIST_CLASSES, fashion_mnist
from pretrain.scenes import (DIGITS_THRESHOLD, FMNIST_THRESHOLD, SceneStyle, background_photos,
                             paint_item, photo_background, place_item, to_uint8)

from .voc import NUM_CLASSES, VOC_CLASSES, VOID, YEARS, voc_colormap, write_mask

log = logging.getLogger(__name__)

SOURCE_NAMES = (*(f"fashion-mnist {i} {n}" for i, n in enumerate(FASHION_MNIST_CLASSES)),
                *(f"sklearn-digits {d}" for d in range(10)))
DEFAULT_IMAGE_SIZE = 128
DEFAULT_SIZES = {2007: (800, 400), 2012: (600, 0)}  # (n_trainval, n_test)
DIFFICULT_SIDE = 22 / 128  # visible box's long side below this (fraction) -> difficult
DIFFICULT_VISIBLE = 0.5  # visible fraction of the item's pixels below this -> difficult
VOID_OUT, VOID_IN = 2 / 128, 1 / 128  # void band widths outside / inside the outline
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Sources:
    """Grey items (uint8 [N, h, w]) and their class (0..19) for one source partition."""

    fmnist: np.ndarray
    fmnist_labels: np.ndarray
    digits: np.ndarray
    digit_labels: np.ndarray

    def by_class(self) -> list[np.ndarray]:
        """Indices into fmnist (classes 0-9) or digits (10-19), per class."""
        return ([np.flatnonzero(self.fmnist_labels == c) for c in range(10)]
                + [np.flatnonzero(self.digit_labels == d) for d in range(10)])

    def item(self, cls: int, index: int) -> tuple[np.ndarray, int]:
        """(grey item, foreground threshold) of class ``cls``."""
        if cls < 10:
            return self.fmnist[index], FMNIST_THRESHOLD
        return self.digits[index], DIGITS_THRESHOLD


@dataclass(frozen=True)
class PlacedObject:
    cls: int
    visible: np.ndarray  # bool [H, W]
    difficult: bool
    truncated: bool

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Tight box of the visible pixels, 1-based inclusive (VOC file convention)."""
        ys, xs = np.nonzero(self.visible)
        return int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # uint8 [H, W, 3]
    objects: tuple[PlacedObject, ...]


# --------------------------------------------------------------------------- public


def build_voc(root: Path, year: int, n_trainval: int | None = None, n_test: int | None = None,
              image_size: int = DEFAULT_IMAGE_SIZE, seed: int = 0,
              style: SceneStyle = SceneStyle()) -> Path:
    """Write one year's VOC tree into the empty (or absent) folder ``root``; return the year
    root ``root/VOCdevkit/VOC<year>``. ``None`` sizes take :data:`DEFAULT_SIZES`."""
    if year not in YEARS:
        raise UserError(f"embedded VOC: unknown year {year!r}; use one of {YEARS}.")
    d_trainval, d_test = DEFAULT_SIZES[year]
    n_trainval = d_trainval if n_trainval is None else n_trainval
    n_test = d_test if n_test is None else n_test
    _validate(year, n_trainval, n_test, image_size)
    root = Path(root).expanduser()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserError(f"embedded VOC: {root} is not an empty folder; build into a new or "
                        "empty folder.")
    t0 = time.perf_counter()
    year_root = root / "VOCdevkit" / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main", "ImageSets/Segmentation",
                "SegmentationClass", "SegmentationObject"):
        (year_root / sub).mkdir(parents=True)
    ids, splits, evaluation = _assign_splits(year, n_trainval, n_test, seed)
    heldout = set(splits[evaluation])
    pools = {False: load_sources(False), True: load_sources(True)}
    pool_classes = {k: v.by_class() for k, v in pools.items()}
    backgrounds = background_photos()
    palette = voc_colormap()
    labels = {}
    for n, image_id in enumerate(ids):
        held = image_id in heldout
        rng = np.random.default_rng(derive_seed(seed, year, "embedded-voc", n))
        scene = compose_scene(rng, image_size, pools[held], pool_classes[held], backgrounds,
                              style)
        _write_image(year_root, year, image_id, scene, palette)
        labels[image_id] = _file_labels(scene.objects)
    for split, members in splits.items():
        for task in ("Main", "Segmentation"):
            _write(year_root / "ImageSets" / task / f"{split}.txt",
                   "".join(f"{i}\n" for i in members))
        for c, cls in enumerate(VOC_CLASSES):
            _write(year_root / "ImageSets" / "Main" / f"{cls}_{split}.txt",
                   "".join(f"{i} {labels[i][c]:2d}\n" for i in members))
    _write(year_root / "class_sources.txt", class_sources_text())
    log.info("embedded VOC%d: %d images (%s) in %s, %.1f s", year, len(ids),
             ", ".join(f"{s} {len(m)}" for s, m in splits.items()), year_root,
             time.perf_counter() - t0)
    return year_root


def class_sources_text() -> str:
    """``<VOC class> <real source class>`` per line."""
    head = "# VOC class name -> the real class it stands for in the embedded VOC suite\n"
    return head + "".join(f"{v}\t{s}\n" for v, s in zip(VOC_CLASSES, SOURCE_NAMES))


def load_sources(heldout: bool) -> Sources:
    """Fashion-MNIST train (t10k if ``heldout``) and the digits with index % 3 != 0
    (== 0 if ``heldout``), grey uint8 0..255."""
    from sklearn.datasets import load_digits

    fm, fm_labels = fashion_mnist("test" if heldout else "train")
    digits = load_digits()
    pick = (np.arange(len(digits.target)) % 3 == 0) == heldout
    grey = np.rint(digits.images[pick] * (255.0 / 16.0)).astype(np.uint8)
    return Sources(fm, fm_labels, grey, np.asarray(digits.target[pick], dtype=np.int64))


def compose_scene(rng: np.random.Generator, size: int, sources: Sources,
                  by_class: Sequence[np.ndarray], backgrounds: Sequence[np.ndarray],
                  style: SceneStyle = SceneStyle()) -> Scene:
    """One scene: a photo crop with 1..max_objects non-overlapping items."""
    canvas = photo_background(rng, size, backgrounds, style)
    occupied = np.zeros((size, size), dtype=bool)
    objects: list[PlacedObject] = []
    out_r = max(1, round(VOID_OUT * size))
    wanted = int(rng.integers(1, style.max_objects + 1))
    for _ in range(4 * wanted):  # an item that finds no free spot is redrawn
        if len(objects) == wanted:
            break
        cls = int(rng.integers(NUM_CLASSES))
        grey, threshold = sources.item(cls, int(rng.choice(by_class[cls])))
        placed = place_item(rng, size, grey, threshold, cls < 10, occupied, style)
        if placed is None:
            continue
        item, visible, total = placed
        paint_item(rng, canvas, item, visible, style)
        occupied |= ndimage.binary_dilation(visible, iterations=out_r)
        ys, xs = np.nonzero(visible)
        long_side = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
        frac = visible.sum() / total
        objects.append(PlacedObject(cls, visible, bool(long_side < DIFFICULT_SIDE * size
                                                       or frac < DIFFICULT_VISIBLE),
                                    bool(frac < 1.0)))
    return Scene(to_uint8(canvas), tuple(objects))


def masks(scene: Scene, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(SegmentationClass, SegmentationObject) uint8 masks with the void band."""
    cls_mask = np.zeros((size, size), dtype=np.uint8)
    obj_mask = np.zeros((size, size), dtype=np.uint8)
    band = np.zeros((size, size), dtype=bool)
    out_r, in_r = max(1, round(VOID_OUT * size)), max(1, round(VOID_IN * size))
    for k, o in enumerate(scene.objects, 1):
        cls_mask[o.visible] = o.cls + 1
        obj_mask[o.visible] = k
        band |= (ndimage.binary_dilation(o.visible, iterations=out_r)
                 & ~ndimage.binary_erosion(o.visible, iterations=in_r, border_value=1))
    cls_mask[band] = VOID
    obj_mask[band] = VOID
    return cls_mask, obj_mask


# --------------------------------------------------------------------------- helpers


def _validate(year: int, n_trainval: int, n_test: int, image_size: int) -> None:
    if not isinstance(n_trainval, int) or n_trainval < 2:
        raise UserError(f"embedded VOC: n_trainval must be an integer >= 2 (train and val), "
                        f"got {n_trainval!r}.")
    if year == 2007 and (not isinstance(n_test, int) or n_test < 1):
        raise UserError(f"embedded VOC2007: n_test must be an integer >= 1, got {n_test!r}.")
    if year == 2012 and n_test != 0:
        raise UserError(f"embedded VOC2012: n_test must be 0 (VOC2012 has no public test "
                        f"split; evaluate on val), got {n_test!r}.")
    if not isinstance(image_size, int) or image_size < 64:
        raise UserError(f"embedded VOC: image_size must be an integer >= 64, got "
                        f"{image_size!r}.")


def _assign_splits(year: int, n_trainval: int, n_test: int, seed: int
                   ) -> tuple[list[str], dict[str, list[str]], str]:
    """(all ids, {split: sorted ids}, the evaluation split)."""
    n = n_trainval + n_test
    ids = [f"{k:06d}" if year == 2007 else f"2008_{k:06d}" for k in range(1, n + 1)]
    perm = np.random.default_rng(derive_seed(seed, year, "embedded-voc-splits")).permutation(n)
    test = sorted(ids[i] for i in perm[:n_test])
    trainval = [ids[i] for i in perm[n_test:]]
    n_train = (len(trainval) + 1) // 2
    splits = {"train": sorted(trainval[:n_train]), "val": sorted(trainval[n_train:]),
              "trainval": sorted(trainval)}
    if year == 2007:
        splits["test"] = test
    return ids, splits, "test" if year == 2007 else "val"


def _file_labels(objects: Sequence[PlacedObject]) -> list[int]:
    """Per-class file labels: 1 present (non-difficult), 0 difficult only, -1 absent."""
    out = [-1] * NUM_CLASSES
    for o in objects:
        out[o.cls] = 1 if not o.difficult else max(out[o.cls], 0)
    return out


def annotation_xml(year: int, image_id: str, size: int, objects: Sequence[PlacedObject]) -> str:
    """The official annotation schema for one scene."""
    top = ET.Element("annotation")
    ET.SubElement(top, "folder").text = f"VOC{year}"
    ET.SubElement(top, "filename").text = f"{image_id}.jpg"
    source = ET.SubElement(top, "source")
    for tag, text in (("database", f"The VOC{year} Database (embedded dcbench suite)"),
                      ("annotation", f"PASCAL VOC{year}"),
                      ("image", "sklearn sample photos + Fashion-MNIST + sklearn digits")):
        ET.SubElement(source, tag).text = text
    owner = ET.SubElement(top, "owner")
    ET.SubElement(owner, "name").text = "dcbench embedded VOC"
    sz = ET.SubElement(top, "size")
    for tag, v in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(sz, tag).text = str(v)
    ET.SubElement(top, "segmented").text = "1"
    for o in objects:
        obj = ET.SubElement(top, "object")
        ET.SubElement(obj, "name").text = VOC_CLASSES[o.cls]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(o.truncated))
        ET.SubElement(obj, "difficult").text = str(int(o.difficult))
        box = ET.SubElement(obj, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), o.box):
            ET.SubElement(box, tag).text = str(v)
    ET.indent(top, space="\t")
    return ET.tostring(top, encoding="unicode") + "\n"


def _write_image(year_root: Path, year: int, image_id: str, scene: Scene,
                 palette: np.ndarray) -> None:
    size = scene.image.shape[0]
    Image.fromarray(scene.image).save(year_root / "JPEGImages" / f"{image_id}.jpg",
                                      format="JPEG", quality=JPEG_QUALITY)
    _write(year_root / "Annotations" / f"{image_id}.xml",
           annotation_xml(year, image_id, size, scene.objects))
    cls_mask, obj_mask = masks(scene, size)
    write_mask(year_root / "SegmentationClass" / f"{image_id}.png", cls_mask, palette)
    write_mask(year_root / "SegmentationObject" / f"{image_id}.png", obj_mask, palette)


def _write(path: Path, text: str) -> None:
    """Plain writes: the whole tree is built in a temp folder that its caller renames into
    place at the end (``embedded.build_role``), so no single file needs its own atomicity."""
    path.write_text(text, encoding="utf-8")
