"""Pascal VOC readers on a hand-written minimal fixture (DATA_FORMATS.md B.3 "Fixture (minimal)")
and the embedded VOC builder at tiny sizes.

Fixture: 4 images. 1: a single object without <difficult>/<truncated> tags; 2: two objects
with float coordinates, one carrying a <part> box; 3: a difficult-only object; 4: a cat plus a
difficult cat (-> 1) and a difficult-only bottle (-> 0). The per-class files are written from
the hand-written EXPECTED labels, not from the XMLs.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcbench.core import UserError
from evaluations.datasets.voc import (VOC_CLASSES, VocClassification, VocDetection,
                                      VocSegmentation, check_labels_match_annotations,
                                      classification_labels, image_ids, read_annotation,
                                      read_mask, voc_colormap, voc_root)
from pretrain.data import FASHION_MNIST_DIR

W, H = 40, 30

XML_SINGLE = """<annotation>
  <folder>VOC2007</folder><filename>{id}.jpg</filename>
  <size><width>40</width><height>30</height><depth>3</depth></size>
  <segmented>1</segmented>
  <object>
    <name>dog</name><pose>Left</pose>
    <bndbox><xmin>5</xmin><ymin>6</ymin><xmax>20</xmax><ymax>25</ymax></bndbox>
  </object>
</annotation>
"""
XML_TWO = """<annotation>
  <folder>VOC2012</folder><filename>{id}.jpg</filename>
  <size><width>40</width><height>30</height><depth>3</depth></size>
  <segmented>1</segmented>
  <object>
    <name>person</name><pose>Frontal</pose><truncated>1</truncated><difficult>0</difficult>
    <bndbox><xmin>10.7</xmin><ymin>2.0</ymin><xmax>30.2</xmax><ymax>29</ymax></bndbox>
    <part><name>head</name>
      <bndbox><xmin>15</xmin><ymin>3</ymin><xmax>22</xmax><ymax>9</ymax></bndbox></part>
  </object>
  <object>
    <name>dog</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>
    <bndbox><xmin>1</xmin><ymin>10</ymin><xmax>9</xmax><ymax>30</ymax></bndbox>
  </object>
</annotation>
"""
XML_DIFFICULT = """<annotation>
  <filename>{id}.jpg</filename>
  <size><width>40</width><height>30</height><depth>3</depth></size>
  <object>
    <name>cat</name><truncated>0</truncated><difficult>1</difficult>
    <bndbox><xmin>3</xmin><ymin>3</ymin><xmax>8</xmax><ymax>8</ymax></bndbox>
  </object>
</annotation>
"""
XML_MIXED = """<annotation>
  <filename>{id}.jpg</filename>
  <size><width>40</width><height>30</height><depth>3</depth></size>
  <object><name>cat</name><truncated>0</truncated><difficult>0</difficult>
    <bndbox><xmin>2</xmin><ymin>2</ymin><xmax>20</xmax><ymax>20</ymax></bndbox></object>
  <object><name>cat</name><truncated>0</truncated><difficult>1</difficult>
    <bndbox><xmin>25</xmin><ymin>2</ymin><xmax>30</xmax><ymax>8</ymax></bndbox></object>
  <object><name>bottle</name><truncated>0</truncated><difficult>1</difficult>
    <bndbox><xmin>30</xmin><ymin>10</ymin><xmax>38</xmax><ymax>28</ymax></bndbox></object>
</annotation>
"""
XMLS = (XML_SINGLE, XML_TWO, XML_DIFFICULT, XML_MIXED)
EXPECTED = ({"dog": 1}, {"person": 1, "dog": 1}, {"cat": 0}, {"cat": 1, "bottle": 0})
IDS_2007 = ("000001", "000002", "000003", "000004")
IDS_2012 = ("2008_000002", "2008_000003", "2008_000007", "2008_000008")
MAIN_SPLITS = {"train": (0, 1), "val": (2,), "trainval": (0, 1, 2), "test": (3,)}
SEG_SPLITS = {"train": (0,), "val": (1,), "trainval": (0, 1)}
SEG_CLASS = {0: VOC_CLASSES.index("dog") + 1, 1: VOC_CLASSES.index("person") + 1}


def expected_labels(indices) -> np.ndarray:
    out = np.full((len(indices), 20), -1, dtype=np.int8)
    for r, k in enumerate(indices):
        for cls, v in EXPECTED[k].items():
            out[r, VOC_CLASSES.index(cls)] = v
    return out


def bordered_mask(value: int) -> np.ndarray:
    """Background 0, a 255 border around a filled block of ``value``."""
    m = np.zeros((H, W), dtype=np.uint8)
    m[5:25, 5:20] = 255
    m[7:23, 7:18] = value
    return m


def save_palette_png(path: Path, mask: np.ndarray) -> None:
    im = Image.fromarray(mask, mode="P")
    im.putpalette(voc_colormap().flatten().tolist())
    im.save(path)


def make_voc(base: Path, year: int = 2007) -> Path:
    """The fixture tree at ``base/VOCdevkit/VOC<year>``; returns ``base``."""
    ids = IDS_2007 if year == 2007 else IDS_2012
    root = base / "VOCdevkit" / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main", "ImageSets/Segmentation",
                "SegmentationClass", "SegmentationObject"):
        (root / sub).mkdir(parents=True)
    for k, (image_id, xml) in enumerate(zip(ids, XMLS)):
        Image.new("RGB", (W, H), (40 * k, 90, 200)).save(root / "JPEGImages" / f"{image_id}.jpg")
        (root / "Annotations" / f"{image_id}.xml").write_text(xml.format(id=image_id))
    for split, members in MAIN_SPLITS.items():
        (root / "ImageSets/Main" / f"{split}.txt").write_text(
            "".join(f"{ids[k]}\n" for k in members))
        labels = expected_labels(members)
        for c, cls in enumerate(VOC_CLASSES):
            (root / "ImageSets/Main" / f"{cls}_{split}.txt").write_text(
                "".join("%s %2d\n" % (ids[k], labels[r, c]) for r, k in enumerate(members)))
    for split, members in SEG_SPLITS.items():
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text(
            "".join(f"{ids[k]}\n" for k in members))
    for k, value in SEG_CLASS.items():
        save_palette_png(root / "SegmentationClass" / f"{ids[k]}.png", bordered_mask(value))
        save_palette_png(root / "SegmentationObject" / f"{ids[k]}.png", bordered_mask(1))
    return base


@pytest.fixture
def voc07(tmp_path) -> Path:
    return make_voc(tmp_path / "data", 2007)


# --------------------------------------------------------------------------- layout


def test_voc_root_accepts_three_layouts(voc07):
    year = voc07 / "VOCdevkit" / "VOC2007"
    assert voc_root(voc07, 2007) == year
    assert voc_root(voc07 / "VOCdevkit", 2007) == year
    assert voc_root(year, 2007) == year


def test_voc_root_missing_root_or_year(voc07, tmp_path):
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "nope"))) as e:
        voc_root(tmp_path / "nope", 2007)
    assert "VOCdevkit/VOC2007" in str(e.value)
    with pytest.raises(UserError, match="VOC2012") as e:
        voc_root(voc07, 2012)
    assert str(voc07 / "VOCdevkit" / "VOC2012") in str(e.value)
    with pytest.raises(UserError, match="VOC2012"):  # the 2007 folder given for 2012
        voc_root(voc07 / "VOCdevkit" / "VOC2007", 2012)


# --------------------------------------------------------------------------- annotations


def test_read_annotation_edge_cases(voc07):
    ann_dir = voc07 / "VOCdevkit/VOC2007/Annotations"
    single = read_annotation(ann_dir / "000001.xml")
    assert (single.image_id, single.width, single.height) == ("000001", 40, 30)
    assert len(single.objects) == 1  # one <object> is still a tuple of one
    o = single.objects[0]
    assert (o.name, o.box, o.difficult, o.truncated) == ("dog", (5, 6, 20, 25), False, False)
    two = read_annotation(ann_dir / "000002.xml")
    assert [x.name for x in two.objects] == ["person", "dog"]  # the <part> is not an object
    assert two.objects[0].box == (10, 2, 30, 29)  # int(float(text)); not the head's box
    assert two.objects[0].truncated and not two.objects[0].difficult
    assert read_annotation(ann_dir / "000003.xml").objects[0].difficult


@pytest.mark.parametrize("box, match", [
    ("<xmin>20</xmin><ymin>6</ymin><xmax>5</xmax><ymax>25</ymax>", "xmax < xmin"),
    ("<xmin>5</xmin><ymin>26</ymin><xmax>20</xmax><ymax>25</ymax>", "malformed box"),
    ("<xmin>5</xmin><ymin>six</ymin><xmax>20</xmax><ymax>25</ymax>", "not a number"),
    ("<xmin>5</xmin><ymin>6</ymin><xmax>20</xmax>", "lacks one of"),
])
def test_malformed_box_names_the_file(tmp_path, box, match):
    path = tmp_path / "bad.xml"
    path.write_text(XML_SINGLE.replace(
        "<xmin>5</xmin><ymin>6</ymin><xmax>20</xmax><ymax>25</ymax>", box).format(id="bad"))
    with pytest.raises(UserError, match=match) as e:
        read_annotation(path)
    assert str(path) in str(e.value)


def test_unknown_class_and_broken_xml(tmp_path):
    path = tmp_path / "x.xml"
    path.write_text(XML_SINGLE.replace("<name>dog</name>", "<name>dragon</name>").format(id=1))
    with pytest.raises(UserError, match="unknown class 'dragon'") as e:
        read_annotation(path)
    assert str(path) in str(e.value)
    path.write_text("<annotation><size>")
    with pytest.raises(UserError, match="cannot parse") as e:
        read_annotation(path)
    assert str(path) in str(e.value)


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize("year", [2007, 2012])
def test_labels_from_files_equal_labels_from_xml(tmp_path, year):
    root = voc_root(make_voc(tmp_path, year), year)
    ids = IDS_2007 if year == 2007 else IDS_2012
    for split, members in MAIN_SPLITS.items():
        got_ids, labels = check_labels_match_annotations(root, split)
        assert got_ids == [ids[k] for k in members]
        assert labels.dtype == np.int8 and np.array_equal(labels, expected_labels(members))
    text = (root / "ImageSets/Main/dog_train.txt").read_text()
    assert f"{ids[0]}  1\n" in text and f"{ids[0]} -1\n" not in text  # positives: two spaces
    assert image_ids(root, "val", "Segmentation") == [ids[1]]


def test_class_order_is_the_sorted_file_name_order():
    assert len(VOC_CLASSES) == 20 and tuple(sorted(VOC_CLASSES)) == VOC_CLASSES
    assert (VOC_CLASSES[0], VOC_CLASSES[14], VOC_CLASSES[-1]) == ("aeroplane", "person",
                                                                   "tvmonitor")


def test_per_class_file_disagreeing_with_xml(voc07):
    root = voc07 / "VOCdevkit/VOC2007"
    cat = root / "ImageSets/Main/cat_val.txt"
    cat.write_text("000003  1\n")  # the XML has only a difficult cat -> 0
    with pytest.raises(UserError, match="image 000003, class cat") as e:
        check_labels_match_annotations(root, "val")
    assert str(cat) in str(e.value) and "000003.xml" in str(e.value)


def test_per_class_file_listing_other_ids(voc07):
    root = voc07 / "VOCdevkit/VOC2007"
    f = root / "ImageSets/Main/bus_train.txt"
    f.write_text("000001 -1\n")
    with pytest.raises(UserError, match="lacks image id 000002") as e:
        classification_labels(root, "train")
    assert str(f) in str(e.value)
    f.write_text("000001 -1\n000002 -1\n000009 -1\n")
    with pytest.raises(UserError, match="lists image id 000009"):
        classification_labels(root, "train")
    f.write_text("000001 -1\n000002 2\n")
    with pytest.raises(UserError, match=re.escape(f"{f}:2")):
        classification_labels(root, "train")


# --------------------------------------------------------------------------- masks


def test_palette_values_and_mask_reading(voc07):
    cmap = voc_colormap()
    assert cmap.shape == (256, 3) and cmap.dtype == np.uint8
    checked = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128),
               15: (192, 128, 128), 255: (224, 224, 192)}
    for i, rgb in checked.items():
        assert tuple(cmap[i]) == rgb
    path = voc07 / "VOCdevkit/VOC2007/SegmentationClass/000002.png"
    with Image.open(path) as im:
        assert im.mode == "P" and tuple(im.getpalette()[255 * 3:256 * 3]) == (224, 224, 192)
    mask = read_mask(path)
    assert mask.dtype == np.uint8 and mask.shape == (H, W)
    assert set(np.unique(mask)) == {0, 15, 255}  # indices, not colours


def test_mask_value_21_names_the_file(tmp_path):
    path = tmp_path / "bad.png"
    save_palette_png(path, bordered_mask(21))
    with pytest.raises(UserError, match="value 21") as e:
        read_mask(path)
    assert str(path) in str(e.value)
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(UserError, match="palette"):
        read_mask(tmp_path / "rgb.png")


# --------------------------------------------------------------------------- datasets


def test_classification_dataset(voc07):
    import torch

    ds = VocClassification(voc07, "trainval", 2007)
    assert len(ds) == 3
    img, target, i = ds[2]
    assert img.size == (W, H) and i == 2 and target.dtype == np.float32
    cat = VOC_CLASSES.index("cat")
    assert target[cat] == -1 and (np.delete(target, cat) == 0).all()  # difficult -> ignore
    _, t0, _ = ds[0]
    assert t0[VOC_CLASSES.index("dog")] == 1
    loader = torch.utils.data.DataLoader(
        VocClassification(voc07, "train", 2007, transform=lambda im: torch.zeros(3, 4, 4)),
        batch_size=2)
    x, t, idx = next(iter(loader))
    assert x.shape == (2, 3, 4, 4) and t.shape == (2, 20) and idx.tolist() == [0, 1]


def test_detection_dataset_boxes_are_zero_based(voc07):
    ds = VocDetection(voc07, "test", 2007)
    _, target, _ = ds[0]  # 000004: cat, difficult cat, difficult bottle
    assert target["boxes"].tolist() == [[1, 1, 19, 19], [24, 1, 29, 7], [29, 9, 37, 27]]
    assert target["labels"].tolist() == [VOC_CLASSES.index("cat")] * 2 + [
        VOC_CLASSES.index("bottle")]
    assert target["difficult"].tolist() == [False, True, True]
    easy = VocDetection(voc07, "test", 2007, keep_difficult=False)
    assert easy.target(0)["boxes"].shape == (1, 4)


def test_segmentation_dataset(voc07):
    ds = VocSegmentation(voc07, "trainval", 2007)
    img, mask, _ = ds[0]
    assert img.size == (W, H) and mask.dtype == np.uint8 and mask.shape == (H, W)
    assert set(np.unique(mask)) == {0, VOC_CLASSES.index("dog") + 1, 255}


def test_listed_but_missing_image(voc07):
    jpg = voc07 / "VOCdevkit/VOC2007/JPEGImages/000003.jpg"
    jpg.unlink()
    for make in (lambda: VocClassification(voc07, "val", 2007),
                 lambda: VocDetection(voc07, "val", 2007)):
        with pytest.raises(UserError, match=re.escape(str(jpg))) as e:
            make()
        assert "val.txt" in str(e.value)


def test_missing_split_file(voc07):
    with pytest.raises(UserError, match="Segmentation/test.txt"):
        VocSegmentation(voc07, "test", 2007)


# --------------------------------------------------------------------------- embedded builder

needs_fmnist = pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                                  reason="apt-get install dataset-fashion-mnist")


@needs_fmnist
@pytest.mark.parametrize("year, n_test", [(2007, 6), (2012, 0)])
def test_embedded_voc_tree_reads_back(tmp_path, year, n_test):
    from evaluations.datasets.embedded_voc import build_voc

    root = build_voc(tmp_path / "voc", year, n_trainval=24, n_test=n_test, image_size=64, seed=3)
    assert root == tmp_path / "voc" / "VOCdevkit" / f"VOC{year}"
    assert voc_root(tmp_path / "voc", year) == root
    splits = ("train", "val", "trainval") + (("test",) if year == 2007 else ())
    objects = []
    for split in splits:
        ids, labels = check_labels_match_annotations(root, split)
        det = VocDetection(root, split, year)
        objects += [o for a in det.annotations for o in a.objects]
        seg = VocSegmentation(root, split, year)
        assert seg.ids == ids
        for k in range(len(seg)):
            img, mask, _ = seg[k]
            assert img.size == (64, 64)
            assert set(np.unique(mask)) <= set(range(21)) | {255}
            assert (mask == 255).any()  # the void band
            inst = read_mask(root / "SegmentationObject" / f"{ids[k]}.png", max_value=255)
            assert np.array_equal(inst == 255, mask == 255)
        cls = VocClassification(root, split, year)
        assert len(cls) == len(ids) and np.array_equal(cls.labels, labels)
    assert any(o.difficult for o in objects) and any(o.truncated for o in objects)
    trainval = set(image_ids(root, "trainval"))
    assert trainval == set(image_ids(root, "train")) | set(image_ids(root, "val"))
    if year == 2007:
        assert not trainval & set(image_ids(root, "test"))
        assert len(image_ids(root, "test")) == n_test
    else:
        assert all(re.fullmatch(r"\d{4}_\d{6}", i) for i in trainval)
    lines = [s for s in (root / "class_sources.txt").read_text().splitlines()
             if s and not s.startswith("#")]
    assert [s.split()[0] for s in lines] == list(VOC_CLASSES)


@needs_fmnist
def test_embedded_voc_is_deterministic_and_needs_an_empty_folder(tmp_path):
    from evaluations.datasets.embedded_voc import build_voc

    a = build_voc(tmp_path / "a", 2007, 4, 2, 64, seed=1)
    b = build_voc(tmp_path / "b", 2007, 4, 2, 64, seed=1)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    with pytest.raises(UserError, match="not an empty folder"):
        build_voc(tmp_path / "a", 2007, 4, 2, 64)
    with pytest.raises(UserError, match="n_test must be 0"):
        build_voc(tmp_path / "c", 2012, 4, 2, 64)
