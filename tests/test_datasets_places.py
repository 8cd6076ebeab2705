"""Places205 reader on tiny fixtures in the official split-file layout and as ImageFolder.

Three categories, one with a sub-level path; labels deliberately NOT in directory-listing
order (abbey=2, bakery=0, church/outdoor=1), so a reader that derives labels from the path
or from sorted folders fails.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluations.datasets.places205 import category_name, places205_split
from dcbench.core import UserError

CATEGORIES = {"a/abbey": 2, "b/bakery": 0, "c/church/outdoor": 1}
IMAGES = Path("data/vision/torralba/deeplearning/images256")


def grey(label: int, j: int) -> int:
    return 30 + 60 * label + 20 * j


def write_image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (value, value, value)).save(path, format="JPEG", quality=95)


def official_root(base: Path, images: Path = IMAGES, leading_slash: bool = False) -> Path:
    """Split files (space-separated, '.csv') + images; j=0,1 train, j=2 val per category."""
    root = base / "places205"
    lines = {"train": [], "val": []}
    for cat, label in CATEGORIES.items():
        for j in range(3):
            rel = f"{cat}/gsun_{label:030d}{j:02d}.jpg"
            write_image(root / images / rel, grey(label, j))
            lines["train" if j < 2 else "val"].append(("/" if leading_slash else "") +
                                                      f"{rel} {label}")
    split_dir = root / "trainvalsplit_places205"
    split_dir.mkdir(parents=True)
    for split, ls in lines.items():
        (split_dir / f"{split}_places205.csv").write_text("\n".join(ls) + "\n")
    return root


def imagefolder_root(base: Path) -> Path:
    root = base / "places-folders"
    for cat, label in CATEGORIES.items():
        name = category_name(cat + "/x.jpg").replace("/", "_")
        for j in range(3):
            split = "train" if j < 2 else "val"
            write_image(root / split / name / f"gsun_{j}.jpg", grey(label, j))
    return root


def check_labels_from_file(split) -> None:
    """Every sample's label is the one its category carries in the split file, and its pixels
    are the ones written for that (label, j)."""
    for path, label in split.samples:
        cat = next(c for c in CATEGORIES if f"/{c}/" in path.as_posix())
        assert label == CATEGORIES[cat]
    for img, label, i in split.dataset():
        j = int(split.samples[i][0].stem[-2:])
        assert img.mode == "RGB"
        assert abs(int(np.asarray(img)[8, 8, 0]) - grey(label, j)) <= 3


def test_official_split_files(tmp_path):
    root = official_root(tmp_path)
    train, val = places205_split(root, "train"), places205_split(root, "val")
    assert train.layout == val.layout == "split-files"
    assert len(train) == 6 and len(val) == 3
    assert train.classes == val.classes == ["bakery", "church/outdoor", "abbey"]
    assert sorted(val.labels.tolist()) == [0, 1, 2]
    assert sorted(train.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert [p.parent.relative_to(root / IMAGES).as_posix() for p, _ in val.samples] == \
        list(CATEGORIES)  # file order kept
    check_labels_from_file(train)
    check_labels_from_file(val)


def test_label_comes_from_the_file_not_the_path(tmp_path):
    root = official_root(tmp_path)
    f = root / "trainvalsplit_places205" / "val_places205.csv"
    f.write_text(f.read_text().replace(" 2\n", " 7\n"))  # abbey's val image relabelled
    val = places205_split(root, "val")
    abbey = [lab for p, lab in val.samples if "/abbey/" in p.as_posix()]
    assert abbey == [7]
    # the union of both files names the classes: label 7 is abbey (first seen in val)
    assert len(val.classes) == 8 and val.classes[7] == "abbey" and val.classes[3] == "label_3"


@pytest.mark.parametrize("images", [Path("images256"), Path(".")])
def test_other_image_roots(tmp_path, images):
    root = official_root(tmp_path, images=images, leading_slash=True)
    val = places205_split(root, "val")
    assert len(val) == 3 and all(p.is_file() for p, _ in val.samples)
    check_labels_from_file(val)


def test_missing_image_names_it(tmp_path):
    root = official_root(tmp_path)
    gone = root / IMAGES / "c/church/outdoor" / f"gsun_{1:030d}01.jpg"
    gone.unlink()
    with pytest.raises(UserError, match=rf"{gone.name}.*train_places205.csv"):
        places205_split(root, "train")
    assert len(places205_split(root, "val")) == 3


def test_malformed_line_gives_file_and_line(tmp_path):
    root = official_root(tmp_path)
    f = root / "trainvalsplit_places205" / "train_places205.csv"
    f.write_text(f.read_text() + "a/abbey/gsun_x.jpg,2\n")
    with pytest.raises(UserError, match=r"train_places205.csv:7"):
        places205_split(root, "train")


def test_missing_split_file(tmp_path):
    root = official_root(tmp_path)
    (root / "trainvalsplit_places205" / "val_places205.csv").unlink()
    with pytest.raises(UserError, match="val_places205.csv"):
        places205_split(root, "val")
    assert places205_split(root, "train").classes == ["bakery", "church/outdoor", "abbey"]


def test_imagefolder_layout(tmp_path):
    root = imagefolder_root(tmp_path)
    train, val = places205_split(root, "train"), places205_split(root, "val")
    assert train.layout == "imagefolder"
    assert train.classes == val.classes == ["abbey", "bakery", "church_outdoor"]
    assert sorted((p.parent.name, lab) for p, lab in val.samples) == \
        [("abbey", 0), ("bakery", 1), ("church_outdoor", 2)]
    assert len(train) == 6


def test_imagefolder_val_subset_keeps_train_indices(tmp_path):
    root = imagefolder_root(tmp_path)
    for cat in ("abbey", "bakery"):
        for f in (root / "val" / cat).iterdir():
            f.unlink()
        (root / "val" / cat).rmdir()
    val = places205_split(root, "val")
    assert [lab for _, lab in val.samples] == [2] and len(val.classes) == 3


def test_wrong_layout(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError) as e:
        places205_split(tmp_path, "val")
    assert str(tmp_path) in str(e.value) and "trainvalsplit_places205" in str(e.value)
    assert "ImageFolder" in str(e.value)


def test_category_name():
    assert category_name("c/church/outdoor/gsun_x.jpg") == "church/outdoor"
    assert category_name("a/abbey/gsun_x.jpg") == "abbey"
    assert category_name("gsun_x.jpg") == ""
