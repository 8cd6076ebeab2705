"""ImageNet ILSVRC2012 reader: three on-disk layouts, auto-detected (DATA_FORMATS.md B.1).

(a) ``imagefolder``: ``root/train/<wnid>/*.JPEG`` and a re-foldered ``root/val/<wnid>/*``
    (what DeepCluster's ``eval_linear.py`` reads).
(b) ``kaggle-loc``: ``root/LOC_synset_mapping.txt``, ``root/LOC_val_solution.csv`` and
    ``root/ILSVRC/Data/CLS-LOC/{train/<wnid>/, val/<flat>}``; a val label is the first token
    of ``PredictionString``.
(c) ``devkit``: ``root/train/<wnid>/``, a flat ``root/val/ILSVRC2012_val_*.JPEG`` and
    ``root/ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt`` (one
    ILSVRC2012_ID per line, line *i* = ``ILSVRC2012_val_<i:08d>``), mapped ID -> wnid by
    ``data/id_to_wnid.txt`` (``<id> <wnid>`` per line; preferred when present, since the
    official archive never has it) or else ``data/meta.mat`` (leaf ``synsets``).

Class index = position of the wnid in the sorted train wnid folders (n01440764 -> 0), in every
layout. When the train folder is absent, the sorted wnids of the layout's own mapping (or of
the val folders in (a)) are used instead. An ILSVRC2012_ID is never a class index.
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np

from pretrain.data import is_image_file, require_dir, scan_image_folder
from dcbench.core import UserError

from .common import (Split, check_split, raise_if_missing, read_lines, remap_classes,
                     require_file)

log = logging.getLogger(__name__)

KAGGLE_DATA = Path("ILSVRC/Data/CLS-LOC")
KAGGLE_SYNSETS = "LOC_synset_mapping.txt"
KAGGLE_VAL_CSV = "LOC_val_solution.csv"
DEVKIT_DATA = Path("ILSVRC2012_devkit_t12/data")
DEVKIT_GT = DEVKIT_DATA / "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = DEVKIT_DATA / "meta.mat"
DEVKIT_ID_TO_WNID = DEVKIT_DATA / "id_to_wnid.txt"
VAL_STEM = "ILSVRC2012_val_{:08d}"

LAYOUTS_HELP = (
    "one of three layouts:\n"
    "  (a) ImageFolder: <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG\n"
    f"  (b) Kaggle LOC: <root>/{KAGGLE_SYNSETS}, <root>/{KAGGLE_VAL_CSV}, "
    f"<root>/{KAGGLE_DATA}/train/<wnid>/*.JPEG and <root>/{KAGGLE_DATA}/val/*.JPEG\n"
    "  (c) devkit: <root>/train/<wnid>/*.JPEG, flat <root>/val/ILSVRC2012_val_*.JPEG and "
    f"<root>/{DEVKIT_GT} with <root>/{DEVKIT_META} or <root>/{DEVKIT_ID_TO_WNID}")


def imagenet_split(root: str | Path, split: str) -> Split:
    """Samples of ImageNet ``split`` (``train`` | ``val``) under ``root``, layout auto-detected."""
    check_split(split, "ImageNet")
    root = require_dir(root, "ImageNet root", LAYOUTS_HELP)
    layout = detect_layout(root)
    read = {"imagefolder": _read_imagefolder, "kaggle-loc": _read_kaggle,
            "devkit": _read_devkit}[layout]
    samples, classes = read(root, split)
    log.info("ImageNet %s: %d images, %d classes (layout %s, root %s)",
             split, len(samples), len(classes), layout, root)
    return Split(samples, classes, root, f"imagenet/{split}", layout)


def detect_layout(root: Path) -> str:
    """``imagefolder`` | ``kaggle-loc`` | ``devkit``; one UserError listing all three otherwise."""
    if (root / KAGGLE_DATA).is_dir() and (root / KAGGLE_SYNSETS).is_file():
        return "kaggle-loc"
    val = root / "val"
    if val.is_dir() and (root / DEVKIT_GT).is_file() and not _has_subdirs(val):
        return "devkit"
    if (root / "train").is_dir() or val.is_dir():
        return "imagefolder"
    raise UserError(f"ImageNet root {root} matches no known layout. Expected {LAYOUTS_HELP}")


# --- layouts --------------------------------------------------------------------------------

def _read_imagefolder(root: Path, split: str) -> tuple[list[tuple[Path, int]], list[str]]:
    if split == "train":
        return _scan_train(root / "train")
    if (root / "val").is_dir() and not _has_subdirs(root / "val"):
        raise UserError(f"ImageNet val folder {root / 'val'} is flat (no <wnid>/ folders) and "
                        f"the devkit ground truth {root / DEVKIT_GT} that labels it is missing. "
                        f"Extract ILSVRC2012_devkit_t12.tar.gz into {root}, or re-folder val. "
                        f"Expected {LAYOUTS_HELP}")
    train_classes = _train_classes(root / "train")
    samples, val_classes = scan_image_folder(root / "val", "ImageNet val folder")
    classes = train_classes if train_classes is not None else val_classes
    return remap_classes(samples, val_classes, classes, root / "val", root / "train",
                         LAYOUTS_HELP), classes


def _read_kaggle(root: Path, split: str) -> tuple[list[tuple[Path, int]], list[str]]:
    data = root / KAGGLE_DATA
    if split == "train":
        return _scan_train(data / "train")
    classes = _train_classes(data / "train")
    if classes is None:
        path = root / KAGGLE_SYNSETS
        classes = sorted(_parse_synset_line(path, i, s)[0] for i, s in read_lines(path, "synsets"))
    csv_path = require_file(root / KAGGLE_VAL_CSV, "Kaggle val labels",
                            f"Expected {LAYOUTS_HELP}")
    labels = _parse_loc_csv(csv_path)
    return _flat_val(data / "val", labels, classes, csv_path), classes


def _read_devkit(root: Path, split: str) -> tuple[list[tuple[Path, int]], list[str]]:
    if split == "train":
        return _scan_train(root / "train")
    id_to_wnid = _devkit_id_to_wnid(root)
    classes = _train_classes(root / "train")
    if classes is None:
        classes = sorted(set(id_to_wnid.values()))
    gt = root / DEVKIT_GT
    labels = {}
    for lineno, s in read_lines(gt, "devkit ground truth"):
        try:
            wnid = id_to_wnid[int(s)]
        except (ValueError, KeyError):
            raise UserError(f"{gt}:{lineno}: expected an ILSVRC2012_ID present in the devkit "
                            f"mapping (1..1000), got {s!r}. Re-extract the devkit.") from None
        labels[VAL_STEM.format(lineno)] = wnid
    return _flat_val(root / "val", labels, classes, gt), classes


# --- helpers --------------------------------------------------------------------------------

def _has_subdirs(path: Path) -> bool:
    with os.scandir(path) as it:  # d_type: no stat per entry of a flat 50k-image folder
        return any(e.is_dir() and not e.name.startswith(".") for e in it)


def _train_classes(train: Path) -> list[str] | None:
    """Sorted wnid folders of ``train`` (the class order), or None if there is no train folder."""
    if not train.is_dir():
        return None
    return sorted(d.name for d in train.iterdir() if d.is_dir() and not d.name.startswith("."))


def _scan_train(train: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    samples, classes = scan_image_folder(train, "ImageNet train folder")
    if not classes:
        raise UserError(f"ImageNet train folder {train} holds images but no <wnid>/ class "
                        f"folders. Expected {LAYOUTS_HELP}")
    return samples, classes


def _flat_val(val: Path, labels: dict[str, str], classes: list[str],
              listed_in: Path) -> list[tuple[Path, int]]:
    """Samples of a flat val folder given image stem -> wnid; sorted by image id."""
    val = require_dir(val, "ImageNet val folder", LAYOUTS_HELP)
    with os.scandir(val) as it:
        files = sorted(Path(e.path) for e in it if e.is_file() and is_image_file(Path(e.name)))
    by_stem: dict[str, Path] = {}
    for p in files:
        by_stem.setdefault(p.stem, p)
    missing = [val / f"{stem}.JPEG" for stem in sorted(labels) if stem not in by_stem]
    raise_if_missing(missing, listed_in)
    index = {c: i for i, c in enumerate(classes)}
    bad = sorted({w for w in labels.values() if w not in index})
    if bad:
        raise UserError(f"{listed_in} labels val images with wnid {bad[0]} ({len(bad)} such "
                        "wnids), which is not a train class folder. Use the train folder and "
                        "labels from the same ILSVRC2012 release.")
    extra = len(by_stem) - len(labels)
    if extra > 0:
        log.warning("%d images in %s have no label in %s; ignored", extra, val, listed_in)
    return [(by_stem[s], index[labels[s]]) for s in sorted(labels)]


def _parse_synset_line(path: Path, lineno: int, line: str) -> tuple[str, str]:
    wnid, _, name = line.partition(" ")
    if not (wnid.startswith("n") and wnid[1:].isdigit()):
        raise UserError(f"{path}:{lineno}: expected '<wnid> <name>' (e.g. 'n01440764 tench'), "
                        f"got {line!r}.")
    return wnid, name.strip()


def _parse_loc_csv(path: Path) -> dict[str, str]:
    """ImageId -> wnid (first token of PredictionString) of ``LOC_val_solution.csv``."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {path} ({e}). Re-download LOC_val_solution.csv.") from None
    if not rows or [c.strip() for c in rows[0]] != ["ImageId", "PredictionString"]:
        raise UserError(f"{path}:1: expected the header 'ImageId,PredictionString', got "
                        f"{','.join(rows[0]) if rows else 'an empty file'!r}.")
    labels = {}
    for lineno, row in enumerate(rows[1:], 2):
        if not row or not any(c.strip() for c in row):
            continue
        tokens = row[1].split() if len(row) == 2 else []
        if not row[0].strip() or not tokens:
            raise UserError(f"{path}:{lineno}: expected 'ILSVRC2012_val_<id>,<wnid> x1 y1 x2 y2 "
                            f"...', got {','.join(row)!r}.")
        labels[row[0].strip()] = tokens[0]
    return labels


def _devkit_id_to_wnid(root: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid from ``id_to_wnid.txt`` if present, else ``meta.mat`` leaves."""
    text = root / DEVKIT_ID_TO_WNID
    if text.is_file():
        table = {}
        for lineno, s in read_lines(text, "ID-to-wnid mapping"):
            parts = s.split()
            if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) in table:
                raise UserError(f"{text}:{lineno}: expected a unique '<ILSVRC2012_ID> <wnid>' "
                                f"(e.g. '1 n02119789'), got {s!r}.")
            table[int(parts[0])] = parts[1]
        return table
    meta = require_file(root / DEVKIT_META, "devkit meta.mat",
                        f"Extract ILSVRC2012_devkit_t12.tar.gz into {root}, or write "
                        f"{text} with '<ILSVRC2012_ID> <wnid>' lines.")
    return read_meta_mat(meta)


def read_meta_mat(path: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid of the leaf synsets (``num_children == 0``) of a devkit meta.mat."""
    import scipy.io

    try:
        synsets = scipy.io.loadmat(path, squeeze_me=True)["synsets"]
        ids = np.atleast_1d(synsets["ILSVRC2012_ID"])
        wnids = np.atleast_1d(synsets["WNID"])
        children = np.atleast_1d(synsets["num_children"])
    except Exception as e:  # scipy raises many types on a bad file
        raise UserError(f"cannot read the synsets table of {path} ({type(e).__name__}: {e}). "
                        "Expected the devkit's meta.mat (struct array 'synsets' with fields "
                        "ILSVRC2012_ID, WNID, num_children); re-extract the devkit.") from None
    return {int(i): str(w) for i, w, n in zip(ids, wnids, children) if int(n) == 0}
