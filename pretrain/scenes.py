"""Real items composed into scenes: the composition shared by the embedded data.

A photo scene's background is a random square window of one of scikit-learn's bundled photos
(``load_sample_images``: ``china.jpg``, ``flower.jpg``), rescaled, slightly blurred, lowered in
contrast and maybe mirrored; an item (a Fashion-MNIST garment or a scikit-learn digit) is
resized, placed where its foreground is free, and painted with a random pale tint shaded by
its own grey levels.

Used by the embedded VOC scenes (:mod:`evaluations.datasets.embedded_voc`: 1-3 items of 20
classes) and by the composed Fashion-MNIST sets of :func:`fashion_scenes`, 72 px, pretraining
data (``python -m pretrain --dataset``) and ImageNet role (``[embedded] imagenet_source``):

* ``fashion-clutter`` (the demo's): the labelled item whole and bright on black among 2-4
  smaller, dimmer items of any class. On plain Fashion-MNIST a never-trained network's linear
  probes reach 78-82 %, leaving DeepCluster 1-3 points to show; here they reach 49-54 %.
* ``fashion-scenes``: the item on a crop of scikit-learn's two sample photos. Tried for the
  demo and not kept (README, "Harder data"): DeepCluster's clusters followed the backgrounds,
  and those photos are landmarks of the embedded Paris-format retrieval set.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

from dcbench.core import UserError, derive_seed

from .data import fashion_mnist

FMNIST_THRESHOLD, DIGITS_THRESHOLD = 24, 64  # foreground grey level (0..255)
SCENE_SIZE = 72  # fashion-scenes: image side (the demo's probe resize; crops of 64)


@dataclass(frozen=True)
class SceneStyle:
    """The knobs of scene composition (sizes are fractions of the image side)."""

    max_objects: int = 3
    obj_min: float = 26 / 128
    obj_max: float = 70 / 128
    truncate_p: float = 0.15  # chance an object is placed across an edge of the image
    bg_contrast: float = 0.6  # background pixels pulled toward their mean by 1 - this
    bg_blur: float = 1.5  # Gaussian blur radius of the background, in pixels at 128 px
    tint_min: float = 0.7  # item tint channels drawn in [tint_min, 1], then max-normalised


# fashion-scenes: one whole item of 32-60 px on a 72-px crop
FASHION_SCENE_STYLE = SceneStyle(max_objects=1, obj_min=32 / SCENE_SIZE, obj_max=60 / SCENE_SIZE,
                                 truncate_p=0.0)
# fashion-clutter: the labelled item whole at 32-56 px, then 2-4 other items at 16-30 px (half
# of them cut by the border), their tints dimmed by a factor in CLUTTER_DIM
CLUTTER_MAIN_STYLE = SceneStyle(max_objects=1, obj_min=32 / SCENE_SIZE, obj_max=56 / SCENE_SIZE,
                                truncate_p=0.0)
CLUTTER_STYLE = SceneStyle(obj_min=16 / SCENE_SIZE, obj_max=30 / SCENE_SIZE, truncate_p=0.5,
                           tint_min=0.5)
CLUTTER_ITEMS = (2, 4)
CLUTTER_DIM = (0.35, 0.6)


def background_photos() -> tuple[np.ndarray, ...]:
    """scikit-learn's bundled photos, uint8 [H, W, 3]."""
    from sklearn.datasets import load_sample_images

    return tuple(np.asarray(im, dtype=np.uint8) for im in load_sample_images().images)


def photo_background(rng: np.random.Generator, size: int, photos: Sequence[np.ndarray],
                     style: SceneStyle) -> np.ndarray:
    """A random square window of a photo, rescaled to ``size``, maybe mirrored; float32."""
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    side = int(rng.integers(min(size, h), min(h, w) + 1))
    y, x = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    crop = Image.fromarray(photo[y:y + side, x:x + side]).resize(
        (size, size), Image.Resampling.BILINEAR)
    if style.bg_blur > 0:
        crop = crop.filter(ImageFilter.GaussianBlur(style.bg_blur * size / 128))
    out = np.asarray(crop, dtype=np.float32)
    out = out.mean(axis=(0, 1)) + style.bg_contrast * (out - out.mean(axis=(0, 1)))
    return np.ascontiguousarray(out[:, ::-1]) if rng.random() < 0.5 else out


def place_item(rng: np.random.Generator, size: int, grey: np.ndarray, threshold: int,
               fill_holes: bool, occupied: np.ndarray, style: SceneStyle, tries: int = 20):
    """Resize an item and find a free spot: (its grey levels placed in the image frame, float
    [H, W]; its visible mask; its pixel count), or None."""
    side = int(rng.integers(round(style.obj_min * size), round(style.obj_max * size) + 1))
    item = np.asarray(Image.fromarray(grey).resize((side, side), Image.Resampling.BICUBIC),
                      dtype=np.float32)
    shape = item > threshold
    if fill_holes:  # dark patches inside a garment; a digit's loops stay background
        shape = ndimage.binary_fill_holes(shape)
    if shape.sum() < 16:
        return None
    ys, xs = np.nonzero(shape)
    truncate = rng.random() < style.truncate_p
    for _ in range(tries):
        x0 = int(rng.integers(-xs.min(), size - xs.max()))  # inside the image
        y0 = int(rng.integers(-ys.min(), size - ys.max()))
        if truncate:  # pushed across one edge by 10-70 % of its extent
            edge, cut = int(rng.integers(4)), rng.uniform(0.1, 0.7)
            dx, dy = int(cut * (xs.max() - xs.min() + 1)), int(cut * (ys.max() - ys.min() + 1))
            x0 = (-xs.min() - dx, size - 1 - xs.max() + dx, x0, x0)[edge]
            y0 = (y0, y0, -ys.min() - dy, size - 1 - ys.max() + dy)[edge]
        full = np.zeros((size + 2 * side, size + 2 * side), dtype=bool)
        frame = np.zeros(full.shape, dtype=np.float32)
        full[y0 + side:y0 + 2 * side, x0 + side:x0 + 2 * side] = shape
        frame[y0 + side:y0 + 2 * side, x0 + side:x0 + 2 * side] = item
        visible = full[side:side + size, side:side + size]
        if visible.sum() < 16 or (visible & occupied).any():
            continue
        ys_v, xs_v = np.nonzero(visible)
        if ys_v.max() == ys_v.min() or xs_v.max() == xs_v.min():
            continue
        return frame[side:side + size, side:side + size], visible, int(shape.sum())
    return None


def paint_item(rng: np.random.Generator, canvas: np.ndarray, item: np.ndarray,
               visible: np.ndarray, style: SceneStyle) -> None:
    """Paint a placed item on ``canvas`` (float [H, W, 3]) in a random pale tint shaded by its
    grey levels (0.25 to 1 of the tint)."""
    tint = rng.uniform(style.tint_min, 1.0, 3).astype(np.float32)
    tint /= tint.max()
    canvas[visible] = 255.0 * tint[None, :] * (0.25 + 0.75 * item[visible][:, None] / 255.0)


def to_uint8(canvas: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def _place_whole(rng: np.random.Generator, size: int, grey: np.ndarray, occupied: np.ndarray,
                 style: SceneStyle):
    """:func:`place_item` of a Fashion-MNIST item, redrawn until it fits."""
    for _ in range(100):  # a draw too small to place (< 16 px of foreground) is redrawn
        placed = place_item(rng, size, grey, FMNIST_THRESHOLD, True, occupied, style)
        if placed is not None:
            return placed
    raise UserError("fashion scenes: a Fashion-MNIST item has under 16 foreground pixels at "
                    "every size tried; the dataset file is damaged (reinstall "
                    "dataset-fashion-mnist).")


def photo_scene(images: np.ndarray, i: int, seed: int, photos: Sequence[np.ndarray],
                size: int = SCENE_SIZE) -> np.ndarray:
    """fashion-scenes: item ``i`` of ``images`` (uint8 [N, 28, 28]) whole on a photo crop;
    uint8 [size, size, 3], a function of ``seed`` alone."""
    rng = np.random.default_rng(seed)
    canvas = photo_background(rng, size, photos, FASHION_SCENE_STYLE)
    item, visible, _ = _place_whole(rng, size, images[i], np.zeros((size, size), dtype=bool),
                                    FASHION_SCENE_STYLE)
    paint_item(rng, canvas, item, visible, FASHION_SCENE_STYLE)
    return to_uint8(canvas)


def clutter_scene(images: np.ndarray, i: int, seed: int, photos=None,
                  size: int = SCENE_SIZE) -> np.ndarray:
    """fashion-clutter: item ``i`` of ``images`` whole and bright (32-56 px) on black, with
    2-4 smaller (16-30 px), dimmer (x 0.35-0.6) items of any class from the same split around
    it, maybe cut by the border, none touching another; uint8 [size, size, 3]."""
    rng = np.random.default_rng(seed)
    canvas = np.zeros((size, size, 3), dtype=np.float32)
    occupied = np.zeros((size, size), dtype=bool)
    item, visible, _ = _place_whole(rng, size, images[i], occupied, CLUTTER_MAIN_STYLE)
    paint_item(rng, canvas, item, visible, CLUTTER_MAIN_STYLE)
    occupied |= ndimage.binary_dilation(visible, iterations=2)
    for _ in range(int(rng.integers(CLUTTER_ITEMS[0], CLUTTER_ITEMS[1] + 1))):
        other = images[int(rng.integers(len(images)))]
        placed = place_item(rng, size, other, FMNIST_THRESHOLD, True, occupied, CLUTTER_STYLE)
        if placed is None:  # no free spot: fewer items
            continue
        item, visible, _ = placed
        layer = np.zeros_like(canvas)
        paint_item(rng, layer, item, visible, CLUTTER_STYLE)
        canvas[visible] = layer[visible] * rng.uniform(*CLUTTER_DIM)
        occupied |= ndimage.binary_dilation(visible, iterations=2)
    return to_uint8(canvas)


COMPOSERS = {"fashion-clutter": clutter_scene, "fashion-scenes": photo_scene}


def compose(images: np.ndarray, split: str, indices: Sequence[int] | np.ndarray,
            kind: str = "fashion-clutter", seed: int = 0) -> np.ndarray:
    """uint8 [N, 72, 72, 3]: items ``indices`` of ``images`` (the Fashion-MNIST ``split``,
    uint8 [60000 or 10000, 28, 28]) each composed as ``kind`` (:data:`COMPOSERS`). Image ``i``
    of a split is the same whatever else is asked for: its draws come from
    ``derive_seed(seed, kind, split, i)``."""
    if kind not in COMPOSERS:
        raise UserError(f"unknown composed Fashion-MNIST set {kind!r}; use one of "
                        f"{', '.join(COMPOSERS)}.")
    idx = np.asarray(indices, dtype=np.int64)
    photos = background_photos() if kind == "fashion-scenes" else None
    out = np.empty((len(idx), SCENE_SIZE, SCENE_SIZE, 3), dtype=np.uint8)
    for n, i in enumerate(idx):
        out[n] = COMPOSERS[kind](images, int(i), derive_seed(seed, kind, split, int(i)), photos)
    return out


def fashion_scenes(split: str, indices: Sequence[int] | np.ndarray,
                   kind: str = "fashion-clutter", seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(:func:`compose` of the Fashion-MNIST ``split``'s items ``indices``, their labels)."""
    images, labels = fashion_mnist(split)
    return compose(images, split, indices, kind, seed), labels[np.asarray(indices, np.int64)]
