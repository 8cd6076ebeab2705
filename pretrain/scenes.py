"""Real items pasted on real photos: the composition shared by the embedded data.

A scene's background is a random square window of one of scikit-learn's bundled photos
(``load_sample_images``: ``china.jpg``, ``flower.jpg``), rescaled, slightly blurred, lowered in
contrast and maybe mirrored; an item (a Fashion-MNIST garment or a scikit-learn digit) is
resized, placed where its foreground is free, and painted with a random pale tint shaded by
its own grey levels.

Used by the embedded VOC scenes (:mod:`evaluations.datasets.embedded_voc`: 1-3 items of 20
classes) and by ``fashion-scenes`` (:func:`fashion_scenes`: one Fashion-MNIST item per 72-px
photo crop), an opt-in harder ImageNet role (``[embedded] imagenet_source``) and pretraining
set (``python -m pretrain --dataset fashion-scenes``). On plain Fashion-MNIST a never-trained
network's linear probes reach 78-82 %; on the scenes 37-49 %. It was tried as the demo's data
and not kept (README, "Harder data"): DeepCluster's clusters followed the two backgrounds, and
those photos are also landmarks of the embedded Paris-format retrieval set.
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


def fashion_scene(grey: np.ndarray, seed: int, photos: Sequence[np.ndarray],
                  style: SceneStyle = FASHION_SCENE_STYLE, size: int = SCENE_SIZE) -> np.ndarray:
    """One Fashion-MNIST item (uint8 [28, 28]) wholly inside a photo crop: uint8 [size, size, 3],
    a function of ``seed`` alone."""
    rng = np.random.default_rng(seed)
    canvas = photo_background(rng, size, photos, style)
    free = np.zeros((size, size), dtype=bool)
    for _ in range(100):  # a draw too small to place (< 16 px of foreground) is redrawn
        placed = place_item(rng, size, grey, FMNIST_THRESHOLD, True, free, style)
        if placed is not None:
            item, visible, _ = placed
            paint_item(rng, canvas, item, visible, style)
            return to_uint8(canvas)
    raise UserError("fashion-scenes: a Fashion-MNIST item has under 16 foreground pixels at "
                    "every size tried; the dataset file is damaged (reinstall "
                    "dataset-fashion-mnist).")


def fashion_scenes(split: str, indices: Sequence[int] | np.ndarray, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 72, 72, 3], labels int64 [N]) of the Fashion-MNIST ``split`` images
    ``indices``, each composed on a photo crop. Image ``i`` of a split is the same whatever
    else is asked for: its draws come from ``derive_seed(seed, "fashion-scenes", split, i)``."""
    images, labels = fashion_mnist(split)
    idx = np.asarray(indices, dtype=np.int64)
    photos = background_photos()
    out = np.empty((len(idx), SCENE_SIZE, SCENE_SIZE, 3), dtype=np.uint8)
    for n, i in enumerate(idx):
        out[n] = fashion_scene(images[i], derive_seed(seed, "fashion-scenes", split, int(i)),
                               photos)
    return out, labels[idx]
