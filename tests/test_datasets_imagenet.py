"""ImageNet reader on tiny fixtures in each official layout (DATA_FORMATS.md B.1).

Three fake wnids n00000001..3, two train JPEGs each, one val image each. The devkit's
ILSVRC2012_ID order is deliberately NOT the sorted-wnid order (the val-order trap).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from evaluations.datasets.imagenet import detect_layout, imagenet_split, read_meta_mat
from dcbench.core import UserError

WNIDS = ("n00000001", "n00000002", "n00000003")
# val image i (1-based) -> wnid; sorted-wnid class index written out by hand below.
VAL_WNID = {1: "n00000002", 2: "n00000003", 3: "n00000001"}
EXPECTED_VAL = [("ILSVRC2012_val_00000001.JPEG", 1), ("ILSVRC2012_val_00000002.JPEG", 2),
                ("ILSVRC2012_val_00000003.JPEG", 0)]
EXPECTED_TRAIN = [(f"{w}_{j}.JPEG", c) for c, w in enumerate(WNIDS) for j in range(2)]
# Devkit ILSVRC2012_IDs in non-sorted order: ID 1 -> n00000003, 2 -> n00000001, 3 -> n00000002.
ID_TO_WNID = {1: "n00000003", 2: "n00000001", 3: "n00000002"}
WNID_TO_ID = {w: i for i, w in ID_TO_WNID.items()}
RED, GREEN = (255, 0, 0), (0, 255, 0)


def colour(wnid: str, j: int) -> tuple[int, int, int]:
    return (40 * int(wnid[-1]), 60 + 50 * j, 200)


def write_jpeg(path: Path, rgb: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), rgb).save(path, format="JPEG", quality=95)


def write_train(train: Path) -> None:
    for w in WNIDS:
        for j in range(2):
            write_jpeg(train / w / f"{w}_{j}.JPEG", colour(w, j))
    # Real ImageNet train holds a PNG named .JPEG and CMYK JPEGs.
    Image.new("RGB", (12, 10), RED).save(train / "n00000001" / "n00000001_1.JPEG", format="PNG")
    Image.new("CMYK", (12, 10), (0, 255, 255, 0)).save(
        train / "n00000002" / "n00000002_1.JPEG", format="JPEG", quality=95)


def write_flat_val(val: Path) -> None:
    for i, w in VAL_WNID.items():
        write_jpeg(val / f"ILSVRC2012_val_{i:08d}.JPEG", colour(w, 0))


def imagefolder_root(base: Path) -> Path:
    root = base / "imagefolder"
    write_train(root / "train")
    for i, w in VAL_WNID.items():
        write_jpeg(root / "val" / w / f"ILSVRC2012_val_{i:08d}.JPEG", colour(w, 0))
    return root


def kaggle_root(base: Path) -> Path:
    root = base / "kaggle"
    data = root / "ILSVRC" / "Data" / "CLS-LOC"
    write_train(data / "train")
    write_flat_val(data / "val")
    (root / "LOC_synset_mapping.txt").write_text(
        "n00000001 thing one, first\nn00000002 thing two\nn00000003 thing three\n")
    rows = ["ImageId,PredictionString"]
    for i in (3, 1, 2):  # not in file order
        w = VAL_WNID[i]
        rows.append(f"ILSVRC2012_val_{i:08d},{w} 1 2 10 9 {w} 0 0 5 5 ")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return root


def write_meta_mat(path: Path) -> None:
    """A tiny devkit meta.mat shaped like the real one: synsets is an (N, 1) struct array."""
    dt = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"),
          ("num_children", "O"), ("children", "O"), ("wordnet_height", "O"),
          ("num_train_images", "O")]
    rows = [(i, ID_TO_WNID[i], f"word {i}", "gloss", 0, np.zeros((1, 0)), 0, 2) for i in (1, 2, 3)]
    rows.append((4, "n09999999", "an inner node", "gloss", 3, np.array([[1, 2, 3]]), 1, 0))
    synsets = np.zeros((len(rows), 1), dtype=dt)
    for k, r in enumerate(rows):
        synsets[k, 0] = r
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"synsets": synsets})


def devkit_root(base: Path, mapping: str) -> Path:
    root = base / f"devkit-{mapping}"
    write_train(root / "train")
    write_flat_val(root / "val")
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{WNID_TO_ID[VAL_WNID[i]]}\n" for i in (1, 2, 3)))
    if mapping == "mat":
        write_meta_mat(data / "meta.mat")
    else:
        (data / "id_to_wnid.txt").write_text("".join(f"{i} {w}\n" for i, w in
                                                     sorted(ID_TO_WNID.items())))
    return root


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("imagenet")
    return {"imagefolder": imagefolder_root(base), "kaggle-loc": kaggle_root(base),
            "devkit-mat": devkit_root(base, "mat"), "devkit-txt": devkit_root(base, "txt")}


def pairs(split) -> list[tuple[str, int]]:
    return sorted((p.name, c) for p, c in split.samples)


@pytest.mark.parametrize("variant", ["imagefolder", "kaggle-loc", "devkit-mat", "devkit-txt"])
def test_every_layout_gives_the_same_labels(roots, variant):
    root = roots[variant]
    assert detect_layout(root) == {"devkit-mat": "devkit", "devkit-txt": "devkit"}.get(variant,
                                                                                     variant)
    val = imagenet_split(root, "val")
    train = imagenet_split(root, "train")
    assert val.classes == train.classes == list(WNIDS)
    assert pairs(val) == EXPECTED_VAL
    assert pairs(train) == sorted(EXPECTED_TRAIN)
    assert val.name == "imagenet/val" and val.root == root
    assert all(p.is_file() for p, _ in val.samples + train.samples)


def test_val_image_pixels_match_their_class(roots):
    """The file behind each (path, class) is the one written for that class."""
    for variant, root in roots.items():
        val = imagenet_split(root, "val")
        for (img, label, _), (path, _) in zip(val.dataset(), val.samples):
            r, g, b = np.asarray(img)[5, 6].astype(int)
            assert abs(r - 40 * (label + 1)) <= 4 and abs(g - 60) <= 4, (variant, path)


def test_meta_mat_has_the_real_structure(roots):
    path = roots["devkit-mat"] / "ILSVRC2012_devkit_t12" / "data" / "meta.mat"
    synsets = scipy.io.loadmat(path)["synsets"]
    assert synsets.shape == (4, 1)
    assert {"ILSVRC2012_ID", "WNID", "num_children"} <= set(synsets.dtype.names)
    assert str(synsets[0, 0]["WNID"][0]) == "n00000003"
    assert read_meta_mat(path) == ID_TO_WNID  # inner node (num_children 3) dropped


def test_png_named_jpeg_and_cmyk_load_as_rgb(roots):
    train = imagenet_split(roots["imagefolder"], "train")
    ds = train.dataset()
    by_name = {p.name: i for i, (p, _) in enumerate(train.samples)}
    png, label, _ = ds[by_name["n00000001_1.JPEG"]]
    cmyk, _, _ = ds[by_name["n00000002_1.JPEG"]]
    assert png.mode == cmyk.mode == "RGB" and label == 0
    assert tuple(np.asarray(png)[3, 3]) == RED
    assert np.abs(np.asarray(cmyk)[3, 3].astype(int) - RED).max() <= 6
    assert (train.labels == np.array([c for _, c in train.samples])).all()


def test_corrupt_image_names_the_file(tmp_path):
    root = imagefolder_root(tmp_path)
    bad = root / "train" / "n00000003" / "n00000003_0.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    truncated = root / "train" / "n00000003" / "n00000003_1.JPEG"
    truncated.write_bytes(truncated.read_bytes()[:40])
    train = imagenet_split(root, "train")
    ds = train.dataset()
    for path in (bad, truncated):
        i = [p for p, _ in train.samples].index(path)
        with pytest.raises(UserError, match=path.name):
            ds[i]


def test_val_subset_keeps_train_class_indices(tmp_path):
    root = imagefolder_root(tmp_path)
    for w in ("n00000001", "n00000002"):
        for f in (root / "val" / w).iterdir():
            f.unlink()
        (root / "val" / w).rmdir()
    assert pairs(imagenet_split(root, "val")) == [("ILSVRC2012_val_00000002.JPEG", 2)]


def test_val_class_unknown_to_train(tmp_path):
    root = imagefolder_root(tmp_path)
    write_jpeg(root / "val" / "n00000009" / "x.JPEG", RED)
    with pytest.raises(UserError, match="n00000009"):
        imagenet_split(root, "val")


@pytest.mark.parametrize("variant", ["kaggle", "devkit"])
def test_missing_val_image_names_the_file(tmp_path, variant):
    if variant == "kaggle":
        root = kaggle_root(tmp_path)
        val, listed = root / "ILSVRC" / "Data" / "CLS-LOC" / "val", "LOC_val_solution.csv"
    else:
        root = devkit_root(tmp_path, "txt")
        val, listed = root / "val", "ILSVRC2012_validation_ground_truth.txt"
    (val / "ILSVRC2012_val_00000002.JPEG").unlink()
    with pytest.raises(UserError, match=f"ILSVRC2012_val_00000002.*{listed}"):
        imagenet_split(root, "val")
    imagenet_split(root, "train")  # train does not need val


def test_malformed_ground_truth_line(tmp_path):
    root = devkit_root(tmp_path, "txt")
    gt = root / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("1\n7\n2\n")
    with pytest.raises(UserError, match=r"ILSVRC2012_validation_ground_truth.txt:2"):
        imagenet_split(root, "val")


def test_malformed_kaggle_csv(tmp_path):
    root = kaggle_root(tmp_path)
    with (root / "LOC_val_solution.csv").open("a") as f:
        f.write("ILSVRC2012_val_00000004,\n")
    with pytest.raises(UserError, match=r"LOC_val_solution.csv:5"):
        imagenet_split(root, "val")


def test_devkit_without_train_uses_sorted_mapping_wnids(tmp_path):
    root = devkit_root(tmp_path, "mat")
    for f in sorted((root / "train").rglob("*"), reverse=True):
        f.rmdir() if f.is_dir() else f.unlink()
    (root / "train").rmdir()
    val = imagenet_split(root, "val")
    assert val.classes == list(WNIDS) and pairs(val) == EXPECTED_VAL


def test_wrong_layout_lists_the_three_layouts(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError) as e:
        imagenet_split(tmp_path, "train")
    msg = str(e.value)
    assert str(tmp_path) in msg
    assert "(a) ImageFolder" in msg and "(b) Kaggle LOC" in msg and "(c) devkit" in msg


def test_flat_val_without_devkit(tmp_path):
    write_train(tmp_path / "train")
    write_flat_val(tmp_path / "val")
    with pytest.raises(UserError, match="ILSVRC2012_validation_ground_truth.txt"):
        imagenet_split(tmp_path, "val")
    assert len(imagenet_split(tmp_path, "train")) == 6  # train alone still readable


def test_missing_root_and_bad_split(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        imagenet_split(tmp_path / "nope", "train")
    with pytest.raises(UserError, match="'test'"):
        imagenet_split(tmp_path, "test")
