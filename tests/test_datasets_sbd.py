"""SBD reader (evaluations.datasets.sbd) on hand-built fixtures in the official format.

Fixture files are written here independently of the reader: ``cls/<id>.mat`` with
``scipy.io.savemat`` of a ``GTcls`` dict (= a 1x1 MATLAB v5 struct, like the MATLAB-written
originals; checked below), images as real JPEGs with PIL. The VOC side comes from
``embedded_voc.build_voc`` (a real VOC2012 tree whose masks carry 255 void).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse
from PIL import Image

from dcbench.core import UserError
from evaluations.datasets.sbd import (SbdSegmentation, SegmentationUnion, read_sbd_mask,
                                      sbd_ids, sbd_root, train_aug_ids)
from evaluations.datasets.voc import VocSegmentation, image_ids, read_mask

W, H = 12, 8
TRAIN = ("2008_000010", "2008_000003", "2008_000002")
VAL = ("2008_000015", "2008_000021")


def all_values_mask(h: int = H, w: int = W, shift: int = 0) -> np.ndarray:
    """uint8 [h, w] holding every class 0..20 (for h * w >= 21)."""
    return ((np.arange(h * w) + shift) % 21).reshape(h, w).astype(np.uint8)


def gtcls(mask: np.ndarray) -> dict:
    """The ``GTcls`` struct of an official ``cls/<id>.mat`` as a savemat dict."""
    bounds = np.empty((20, 1), dtype=object)
    for k in range(20):
        bounds[k, 0] = scipy.sparse.csc_matrix(np.asarray(mask) == k + 1, dtype=np.float64)
    present = np.unique(np.asarray(mask))
    return {"Segmentation": mask, "Boundaries": bounds,
            "CategoriesPresent": present[present > 0].astype(np.uint8)}


def write_mat(path: Path, variables: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, variables)
    return path


def write_jpeg(path: Path, w: int = W, h: int = H, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, w * h, dtype=np.float64).reshape(h, w, 1)
    arr = np.clip(ramp + rng.integers(0, 50, (h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path, format="JPEG", quality=90)
    return path


def make_sbd(base: Path, train=TRAIN, val=VAL, masks: dict | None = None,
             sizes: dict | None = None) -> Path:
    """``base/benchmark_RELEASE/dataset`` with img/, cls/, inst/, train.txt, val.txt; returns
    the dataset folder. ``masks[id]`` overrides the default mask, ``sizes[id]`` the image
    (w, h)."""
    masks, sizes = masks or {}, sizes or {}
    ds = base / "benchmark_RELEASE" / "dataset"
    (ds / "inst").mkdir(parents=True)
    for n, i in enumerate(dict.fromkeys((*train, *val))):
        mask = masks.get(i, all_values_mask(shift=n))
        w, h = sizes.get(i, (mask.shape[1], mask.shape[0]))
        write_jpeg(ds / "img" / f"{i}.jpg", w, h, seed=n)
        write_mat(ds / "cls" / f"{i}.mat", {"GTcls": gtcls(mask)})
    (ds / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (ds / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return ds


def single_user_error(excinfo, *names) -> str:
    """The message of a UserError raised alone (no chained cause), checking it names
    ``names``."""
    e = excinfo.value
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)
    msg = str(e)
    for name in names:
        assert str(name) in msg, msg
    return msg


# --------------------------------------------------------------------------- fixture format


def test_fixture_has_the_official_struct_shape(tmp_path):
    mask = all_values_mask()
    path = write_mat(tmp_path / "x.mat", {"GTcls": gtcls(mask)})
    assert scipy.io.whosmat(path) == [("GTcls", (1, 1), "struct")]
    g = scipy.io.loadmat(path)["GTcls"]  # MATLAB's own view: a 1x1 struct array
    assert g.shape == (1, 1)
    assert g.dtype.names == ("Segmentation", "Boundaries", "CategoriesPresent")
    seg = g["Segmentation"][0, 0]
    assert seg.dtype == np.uint8 and seg.shape == (H, W)
    assert g["Boundaries"][0, 0].shape == (20, 1)
    assert scipy.sparse.issparse(g["Boundaries"][0, 0][0, 0])


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("given", ["parent", "benchmark_RELEASE", "dataset"])
def test_sbd_root_layouts(tmp_path, given):
    ds = make_sbd(tmp_path / "sbd")
    root = {"parent": tmp_path / "sbd", "benchmark_RELEASE": ds.parent, "dataset": ds}[given]
    assert sbd_root(root) == ds
    assert sbd_root(str(root)) == ds


def test_sbd_root_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as e:
        sbd_root(tmp_path / "empty")
    msg = single_user_error(e, tmp_path / "empty" / "benchmark_RELEASE" / "dataset", "img/",
                            "cls/", "train.txt", "benchmark.tgz", "benchmark_RELEASE/")
    assert "extract" in msg
    ds = make_sbd(tmp_path / "sbd")
    shutil.rmtree(ds / "cls")
    with pytest.raises(UserError) as e:
        sbd_root(tmp_path / "sbd")
    assert "lacks cls" in single_user_error(e, ds, "benchmark.tgz")
    with pytest.raises(UserError) as e:
        sbd_root(tmp_path / "nowhere")
    single_user_error(e, tmp_path / "nowhere", "benchmark.tgz")


def test_sbd_ids(tmp_path):
    ds = make_sbd(tmp_path)
    assert sbd_ids(tmp_path, "train") == list(TRAIN)  # file order, any root layout
    assert sbd_ids(ds, "val") == list(VAL)
    (ds / "val.txt").write_text("\n2008_000015 \n\n2008_000021\n")
    assert sbd_ids(ds, "val") == list(VAL)
    with pytest.raises(UserError, match="unknown SBD split"):
        sbd_ids(ds, "trainval")
    for text, why in (("2008_000015\n2008_000015\n", "twice"), ("a b\n", "one image id"),
                      ("\n\n", "empty")):
        (ds / "val.txt").write_text(text)
        with pytest.raises(UserError) as e:
            sbd_ids(ds, "val")
        assert why in single_user_error(e, ds / "val.txt")
    (ds / "val.txt").unlink()
    with pytest.raises(UserError) as e:
        sbd_ids(ds, "val")
    single_user_error(e, ds / "val.txt")


def test_train_aug_rule_hand_example(tmp_path):
    # SBD train/val each hold one VOC val image; 2008_000002 is in SBD train and VOC train;
    # 2008_000030 only in VOC train; 2008_000040 only in VOC val.
    make_sbd(tmp_path, train=("2008_000010", "2008_000003", "2008_000020", "2008_000002"),
             val=("2008_000015", "2008_000021"))
    voc_train = ["2008_000002", "2008_000030"]
    voc_val = ["2008_000020", "2008_000021", "2008_000040"]
    assert train_aug_ids(tmp_path, voc_train, voc_val) == [
        "2008_000002", "2008_000003", "2008_000010", "2008_000015", "2008_000030"]


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("shape", [(H, W), (21, 1 + 1), (5, 9)])
def test_read_sbd_mask_round_trip(tmp_path, shape):
    mask = all_values_mask(*shape, shift=3)
    path = write_mat(tmp_path / "cls" / "2008_000002.mat", {"GTcls": gtcls(mask)})
    out = read_sbd_mask(path)
    assert out.dtype == np.uint8 and out.shape == shape
    np.testing.assert_array_equal(out, mask)
    assert set(np.unique(out).tolist()) <= set(range(21))


def test_read_sbd_mask_single_class_file(tmp_path):
    mask = np.zeros((H, W), np.uint8)
    mask[2:5, 3:9] = 15  # CategoriesPresent squeezes to a scalar
    np.testing.assert_array_equal(read_sbd_mask(write_mat(tmp_path / "a.mat",
                                                          {"GTcls": gtcls(mask)})), mask)


def _bad_mat(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "cls" / "2008_000002.mat"
    path.parent.mkdir(parents=True, exist_ok=True)
    good = gtcls(all_values_mask())
    if kind == "garbage":
        path.write_bytes(b"this is not a MAT file\n" * 20)
    elif kind == "truncated":
        write_mat(path, {"GTcls": good})
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "png":
        Image.fromarray(all_values_mask()).save(path, format="PNG")
    elif kind == "missing":
        pass
    elif kind == "directory":
        path.mkdir()
    elif kind == "no_gtcls":
        write_mat(path, {"GTinst": good})
    elif kind == "no_segmentation":
        write_mat(path, {"GTcls": {k: v for k, v in good.items() if k != "Segmentation"}})
    elif kind == "3d":
        write_mat(path, {"GTcls": {**good, "Segmentation": np.zeros((H, W, 3), np.uint8)}})
    elif kind == "fractional":
        write_mat(path, {"GTcls": {**good, "Segmentation": np.full((H, W), 1.5)}})
    elif kind == "negative":
        write_mat(path, {"GTcls": {**good, "Segmentation": np.full((H, W), -1, np.int16)}})
    return path


@pytest.mark.parametrize("kind", ["garbage", "truncated", "png", "missing", "directory",
                                  "no_gtcls", "no_segmentation", "3d", "fractional",
                                  "negative"])
def test_bad_mask_file_is_one_user_error(tmp_path, kind):
    path = _bad_mat(tmp_path, kind)
    with pytest.raises(UserError) as e:
        read_sbd_mask(path)
    single_user_error(e, path, "benchmark.tgz")


@pytest.mark.parametrize("value", [21, 100, 254, 255])
def test_mask_values_above_20_are_one_user_error(tmp_path, value):
    mask = all_values_mask()
    mask[1, 2:5] = value
    path = write_mat(tmp_path / "cls" / "2008_000002.mat", {"GTcls": gtcls(mask)})
    with pytest.raises(UserError) as e:
        read_sbd_mask(path)
    msg = single_user_error(e, path, f"value {value}", "(3 pixels)", "benchmark.tgz")
    assert "no 255 void" in msg


# --------------------------------------------------------------------------- datasets


def test_sbd_segmentation_items(tmp_path):
    ds = make_sbd(tmp_path, sizes={"2008_000003": (W, H)})
    data = SbdSegmentation(tmp_path, "train")
    assert data.ids == list(TRAIN) and len(data) == 3
    assert data.paths == [ds / "img" / f"{i}.jpg" for i in TRAIN]
    assert data.mask_paths == [ds / "cls" / f"{i}.mat" for i in TRAIN]
    for k in range(len(data)):
        img, mask, index = data[k]
        assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (W, H)
        assert index == k and mask.dtype == np.uint8
        np.testing.assert_array_equal(mask, all_values_mask(shift=k))
    flip = SbdSegmentation(ds, "val", transforms=lambda im, m: (im.transpose(
        Image.Transpose.FLIP_LEFT_RIGHT), m[:, ::-1]))
    img, mask, index = flip[1]
    np.testing.assert_array_equal(mask, all_values_mask(shift=4)[:, ::-1])
    plain = np.asarray(Image.open(ds / "img" / f"{VAL[1]}.jpg").convert("RGB"))
    np.testing.assert_array_equal(np.asarray(img), plain[:, ::-1])
    sub = SbdSegmentation(ds, ids=["2008_000021", "2008_000002"])
    assert sub.ids == ["2008_000021", "2008_000002"]
    np.testing.assert_array_equal(sub[1][1], all_values_mask(shift=2))
    with pytest.raises(UserError) as e:
        SbdSegmentation(ds, ids=["2008_000002", "2007_000001"])
    single_user_error(e, "2007_000001", ds / "train.txt", ds / "val.txt")


def test_mask_size_mismatch_is_one_user_error(tmp_path):
    ds = make_sbd(tmp_path, sizes={"2008_000003": (W + 4, H)})
    data = SbdSegmentation(ds, "train")
    data[0]
    with pytest.raises(UserError) as e:
        data[1]
    single_user_error(e, ds / "cls" / "2008_000003.mat", ds / "img" / "2008_000003.jpg",
                      f"{W}x{H}", f"{W + 4}x{H}")


@pytest.mark.parametrize("folder,ext,split", [("img", "jpg", "train"), ("cls", "mat", "val")])
def test_listed_id_without_file_is_one_user_error(tmp_path, folder, ext, split):
    ds = make_sbd(tmp_path)
    victim = (TRAIN if split == "train" else VAL)[1]
    (ds / folder / f"{victim}.{ext}").unlink()
    with pytest.raises(UserError) as e:
        SbdSegmentation(tmp_path, split)
    single_user_error(e, ds / folder / f"{victim}.{ext}", ds / f"{split}.txt")
    with pytest.raises(UserError) as e:  # custom ids: named with the file that lists the id
        SbdSegmentation(tmp_path, ids=[TRAIN[0], VAL[0], victim])
    single_user_error(e, ds / folder / f"{victim}.{ext}", ds / f"{split}.txt")


@pytest.fixture(scope="module")
def voc2012(tmp_path_factory) -> Path:
    from evaluations.datasets.embedded_voc import build_voc

    return build_voc(tmp_path_factory.mktemp("sbd-voc") / "voc", 2012, n_trainval=6, n_test=0,
                     image_size=64)


def _sbd_beside_voc(base: Path, voc: Path) -> tuple[Path, list[str], list[str]]:
    """SBD holding a VOC train id and a VOC val id (same JPEG, SBD mask without void) plus two
    SBD-only ids; returns (dataset folder, VOC train ids, VOC val ids)."""
    vt, vv = image_ids(voc, "train", "Segmentation"), image_ids(voc, "val", "Segmentation")
    train, val = (vt[0], vv[0], "2009_000001"), (vt[1], "2009_000002")
    masks = {i: np.full((64, 64), 7, np.uint8) for i in (vt[0], vt[1], vv[0])}
    masks.update({i: all_values_mask(64, 64, shift=n)
                  for n, i in enumerate(("2009_000001", "2009_000002"))})
    ds = make_sbd(base, train, val, masks)
    for i in (vt[0], vt[1], vv[0]):
        shutil.copyfile(voc / "JPEGImages" / f"{i}.jpg", ds / "img" / f"{i}.jpg")
    return ds, vt, vv


def test_train_aug_union_prefers_voc_masks(tmp_path, voc2012):
    ds, vt, vv = _sbd_beside_voc(tmp_path / "sbd", voc2012)
    expected = sorted({*vt, "2009_000001", "2009_000002"})  # vv[0] (VOC val) is dropped
    union = SegmentationUnion.train_aug(voc2012.parent.parent, tmp_path / "sbd")
    assert union.ids == expected == train_aug_ids(ds, vt, vv) and len(union) == len(expected)
    assert vv[0] not in union.ids
    voids = 0
    for k, i in enumerate(union.ids):
        img, mask, index = union[k]
        assert index == k and img.mode == "RGB" and mask.shape == (img.height, img.width)
        if i in vt:  # VOC mask preferred, even where SBD also has one (vt[0], vt[1])
            assert union.sources[k] == "voc"
            assert union.paths[k] == voc2012 / "JPEGImages" / f"{i}.jpg"
            np.testing.assert_array_equal(mask, read_mask(voc2012 / "SegmentationClass"
                                                          / f"{i}.png"))
            voids += int((mask == 255).any())
        else:
            assert union.sources[k] == "sbd"
            assert union.mask_paths[k] == ds / "cls" / f"{i}.mat"
            np.testing.assert_array_equal(
                mask, all_values_mask(64, 64, shift=["2009_000001", "2009_000002"].index(i)))
            assert not (mask == 255).any()
    assert voids == len(vt)  # the VOC masks do carry 255 void


def test_union_constructor_overlap_order_and_errors(tmp_path, voc2012):
    ds, vt, _ = _sbd_beside_voc(tmp_path / "sbd", voc2012)
    voc = VocSegmentation(voc2012, "train", 2012)
    sbd = SbdSegmentation(ds, "train")  # holds vt[0] too
    union = SegmentationUnion(voc, sbd, transforms=lambda im, m: (im, m.astype(np.int64)))
    assert union.ids == sorted(set(vt) | set(sbd.ids))
    k = union.ids.index(vt[0])
    assert union.sources[k] == "voc" and (union[k][1] == 255).any()
    assert union[k][1].dtype == np.int64
    order = ["2009_000001", vt[0]]
    assert SegmentationUnion(voc, sbd, ids=order).ids == order
    with pytest.raises(UserError) as e:
        SegmentationUnion(voc, sbd, ids=[vt[0], "2010_000001"])
    single_user_error(e, "2010_000001", voc2012, ds)
