"""The composed Fashion-MNIST sets (fashion-clutter, the demo's; fashion-scenes): pretraining
data and ImageNet role. Image i is a function of (split, i) alone; the embedded role's files
are the very images pretraining trains on; each labelled item is placed whole. Labels and
files are read back here independently (gzip IDX, PIL)."""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcbench.core import UserError
from evaluations.datasets.embedded import (MARKER, BuildParams, build_embedded,
                                           role_dataset_name)
from pretrain.config import preset_config
from pretrain.scenes import (CLUTTER_MAIN_STYLE, FASHION_SCENE_STYLE, FMNIST_THRESHOLD,
                             SCENE_SIZE, fashion_scenes, paint_item, place_item)

KINDS = ("fashion-clutter", "fashion-scenes")
from pretrain.train import load_pretrain_data

FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not FMNIST.is_dir(), reason=f"{FMNIST} not installed")


def idx_labels(split: str) -> np.ndarray:
    prefix = "train" if split == "train" else "t10k"
    data = gzip.decompress((FMNIST / f"{prefix}-labels-idx1-ubyte.gz").read_bytes())
    return np.frombuffer(data, np.uint8, offset=8).astype(np.int64)


def idx_image(split: str, i: int) -> np.ndarray:
    prefix = "train" if split == "train" else "t10k"
    data = gzip.decompress((FMNIST / f"{prefix}-images-idx3-ubyte.gz").read_bytes())
    return np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)[i]


def png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.size == (SCENE_SIZE, SCENE_SIZE)
        return np.asarray(im)


@pytest.mark.parametrize("kind", KINDS)
def test_image_i_is_the_same_whatever_else_is_composed(kind):
    many, labels = fashion_scenes("train", [3, 7, 11], kind)
    one, _ = fashion_scenes("train", [11], kind)
    assert many.shape == (3, SCENE_SIZE, SCENE_SIZE, 3) and many.dtype == np.uint8
    assert np.array_equal(many[2], one[0])
    assert labels.tolist() == idx_labels("train")[[3, 7, 11]].tolist()
    assert not np.array_equal(one[0], fashion_scenes("test", [11], kind)[0][0])  # split drawn on
    assert len({m.tobytes() for m in many}) == 3
    lit = (many.max(axis=3) > 0).mean()
    if kind == "fashion-scenes":  # a photo crop in colour everywhere
        assert (many.max(axis=3) - many.min(axis=3)).mean() > 5 and lit > 0.95
    else:  # items on black: the labelled one (32-56 px) and 2-4 smaller ones
        assert 0.15 < lit < 0.8
    with pytest.raises(UserError, match="fashion-clutter, fashion-scenes"):
        fashion_scenes("train", [0], "cifar")


@pytest.mark.parametrize("style, top", [(FASHION_SCENE_STYLE, 60), (CLUTTER_MAIN_STYLE, 56)])
def test_the_labelled_item_is_placed_whole_at_32_px_up_in_a_pale_shaded_tint(style, top):
    grey = idx_image("train", 0)  # an ankle boot
    shape28 = grey > FMNIST_THRESHOLD
    for seed in range(40):
        rng = np.random.default_rng(seed)
        placed = place_item(rng, SCENE_SIZE, grey, FMNIST_THRESHOLD, True,
                            np.zeros((SCENE_SIZE, SCENE_SIZE), bool), style)
        assert placed is not None
        item, visible, total = placed
        assert visible.sum() == total  # nothing cut by the border
        ys, xs = np.nonzero(visible)
        long_side = max(np.ptp(ys), np.ptp(xs)) + 1
        # the 28-px item's extent scaled to a side of 32..top px (resampling slack)
        extent = max(np.ptp(np.nonzero(shape28)[0]), np.ptp(np.nonzero(shape28)[1])) + 1
        assert 32 * extent / 28 - 2 <= long_side <= top * extent / 28 + 2
    # painted: a pale colour (channels within 0.7 of the brightest) whose brightness follows
    # the item's grey level from a quarter to all of it
    canvas = np.zeros((SCENE_SIZE, SCENE_SIZE, 3), np.float32)
    paint_item(rng, canvas, item, visible, style)
    px, g = canvas[visible], item[visible]
    assert (canvas[~visible] == 0).all()
    assert (px.min(axis=1) >= 0.7 * px.max(axis=1) - 1e-3).all()
    np.testing.assert_allclose(px.max(axis=1), 255 * (0.25 + 0.75 * g / 255), rtol=1e-5)



def test_in_clutter_only_the_labelled_item_is_bright():
    """The other items' tints are dimmed to <= 0.6 of full, so channels above 0.61 x 255 can
    only be the labelled item's: one whole object of at most 56 px (+ resampling), where the
    dim ones are around it."""
    scenes, labels = fashion_scenes("test", range(40), "fashion-clutter")
    assert labels.tolist() == idx_labels("test")[:40].tolist()
    with_clutter = 0
    for s in scenes:
        peak = s.max(axis=2).astype(int)
        bright = peak > 0.61 * 255
        assert bright.any()
        ys, xs = np.nonzero(bright)
        assert max(np.ptp(ys), np.ptp(xs)) + 1 <= 58
        with_clutter += bool(((peak > 0) & (peak <= 0.61 * 255) & ~_near(bright, 3)).any())
    assert with_clutter >= 36  # 2-4 others each, unless no free spot was found


def _near(mask: np.ndarray, r: int) -> np.ndarray:
    """``mask`` grown by ``r`` px (a square neighbourhood), written out with numpy."""
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out

@pytest.mark.parametrize("kind", KINDS)
def test_the_embedded_role_holds_the_images_pretraining_trains_on(tmp_path, kind):
    root = build_embedded(tmp_path, 2, 1, imagenet_source=kind, roles=("imagenet",))["imagenet"]
    train = sorted((root / "train").rglob("*.png"))
    index = {p: int(p.stem.rsplit("_", 1)[1]) for p in train}
    assert len(train) == 20
    labels = idx_labels("train")
    # as python -m pretrain --preset demo [--dataset fashion-scenes] loads it
    cfg = preset_config("demo", subset=max(index.values()) + 1,
                        dataset=None if kind == "fashion-clutter" else kind).validate()
    assert cfg.dataset == kind
    make, pre_labels, desc = load_pretrain_data(cfg)
    data = make(None)
    for p, i in index.items():
        assert p.parent.name == f"n{labels[i]:08d}" and pre_labels[i] == labels[i]
        assert np.array_equal(png(p), np.asarray(data[i][0])), p
    val = sorted((root / "val").rglob("*.png"))
    assert len(val) == 10
    for p in val:
        i = int(p.stem.rsplit("_", 1)[1])
        assert p.parent.name == f"n{idx_labels('test')[i]:08d}"
        assert np.array_equal(png(p), fashion_scenes("test", [i], kind)[0][0])
    marker = json.loads((root / MARKER).read_text())
    assert marker["dataset_name"] == f"embedded/{kind}"
    assert role_dataset_name("imagenet", imagenet_source=kind,
                             n_train_per_class=2) == f"embedded/{kind}"
    assert role_dataset_name("imagenet") == "embedded/fashion-mnist"


def test_the_plain_role_keeps_its_key_and_bad_sources_are_refused(tmp_path):
    # the key folders built before imagenet_source existed have, written out by hand
    before = hashlib.sha256(json.dumps(
        {"role": "imagenet", "n_train_per_class": 100, "n_val_per_class": 50, "size": None,
         "version": 1}, sort_keys=True).encode()).hexdigest()
    assert BuildParams("imagenet").key() == before
    assert BuildParams("imagenet", imagenet_source="fashion-mnist").key() == before
    assert len({BuildParams("imagenet", imagenet_source=k).key() for k in KINDS} - {before}) == 2
    with pytest.raises(UserError, match="imagenet_source must be one of fashion-clutter, "
                                        "fashion-mnist, fashion-scenes, got 'cifar'"):
        build_embedded(tmp_path, 2, 1, imagenet_source="cifar", roles=("imagenet",))
    with pytest.raises(UserError, match="drop size"):
        build_embedded(tmp_path, 2, 1, size=32, imagenet_source="fashion-clutter",
                       roles=("imagenet",))
    with pytest.raises(UserError, match="fashion-clutter, fashion-mnist, fashion-scenes"):
        preset_config("demo", dataset="cifar").validate()
    assert list(tmp_path.iterdir()) == []
