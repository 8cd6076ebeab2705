"""Places205 reader: the official split files or an ImageFolder copy (DATA_FORMATS.md B.2).

(a) ``split-files`` (official): ``root/trainvalsplit_places205/{train,val}_places205.csv``,
    each line ``<relative path> <label>`` separated by a space (despite ``.csv``); a path may
    carry a sub-level (``c/church/outdoor/gsun_<32hex>.jpg``) and a leading ``/`` is ignored.
    Images are looked up under the first of these folders that holds the first listed image:
    ``root/data/vision/torralba/deeplearning/images256/`` (the official archive),
    ``root/images256/``, ``root/`` itself.
    The class index is the label in the file, never derived from the path. ``classes[i]`` is a
    name derived from the first path seen with label ``i`` (train file first, then val; the
    leading letter folder dropped: ``church/outdoor``), so both splits share one class list.
(b) ``imagefolder`` (what DeepCluster's ``eval_linear.py`` consumed): ``root/train/<cat>/``,
    ``root/val/<cat>/``; class index = position in the sorted train category folders.
"""
from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath

from pretrain.data import require_dir, scan_image_folder
from dcbench.core import UserError

from .common import Split, check_split, raise_if_missing, read_lines, remap_classes, require_file

log = logging.getLogger(__name__)

SPLIT_DIR = "trainvalsplit_places205"
SPLIT_FILE = "{}_places205.csv"
IMAGE_DIRS = (Path("data/vision/torralba/deeplearning/images256"), Path("images256"), Path("."))

LAYOUTS_HELP = (
    "one of two layouts:\n"
    f"  (a) split files: <root>/{SPLIT_DIR}/{{train,val}}_places205.csv ('<relative path> "
    f"<label>' per line) with images under <root>/{IMAGE_DIRS[0]}/, <root>/images256/ or "
    "<root>/\n"
    "  (b) ImageFolder: <root>/train/<category>/*.jpg and <root>/val/<category>/*.jpg")


def places205_split(root: str | Path, split: str) -> Split:
    """Samples of Places205 ``split`` (``train`` | ``val``) under ``root``, layout auto-detected."""
    check_split(split, "Places205")
    root = require_dir(root, "Places205 root", LAYOUTS_HELP)
    if (root / SPLIT_DIR).is_dir():
        layout, (samples, classes) = "split-files", _read_split_files(root, split)
    elif (root / "train").is_dir() or (root / "val").is_dir():
        layout, (samples, classes) = "imagefolder", _read_imagefolder(root, split)
    else:
        raise UserError(f"Places205 root {root} matches no known layout. Expected {LAYOUTS_HELP}")
    log.info("Places205 %s: %d images, %d classes (layout %s, root %s)",
             split, len(samples), len(classes), layout, root)
    return Split(samples, classes, root, f"places205/{split}", layout)


def parse_split_file(path: Path) -> list[tuple[str, int]]:
    """``[(relative path, label)]`` of an official split file, in file order."""
    entries = []
    for lineno, s in read_lines(path, "Places205 split file"):
        parts = s.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit() or not parts[0].lstrip("/"):
            raise UserError(f"{path}:{lineno}: expected '<relative path> <integer label>' "
                            f"(e.g. 'a/abbey/gsun_0003586c3eedd97457b2d729ebfe18b5.jpg 0'), "
                            f"got {s!r}.")
        entries.append((parts[0].lstrip("/"), int(parts[1])))
    if not entries:
        raise UserError(f"Places205 split file {path} is empty. Re-extract "
                        "trainvalsplit_places205.tar.gz.")
    return entries


def category_name(rel: str) -> str:
    """``c/church/outdoor/gsun_x.jpg`` -> ``church/outdoor`` (the letter folder dropped)."""
    parts = PurePosixPath(rel).parts[:-1]
    if len(parts) >= 2 and len(parts[0]) == 1:
        parts = parts[1:]
    return "/".join(parts)


def _read_split_files(root: Path, split: str) -> tuple[list[tuple[Path, int]], list[str]]:
    files = {s: root / SPLIT_DIR / SPLIT_FILE.format(s) for s in ("train", "val")}
    path = require_file(files[split], f"Places205 {split} split file",
                        f"Extract trainvalsplit_places205.tar.gz into {root}. Expected "
                        f"{LAYOUTS_HELP}")
    entries = parse_split_file(path)
    others = [parse_split_file(f) for s, f in files.items() if s != split and f.is_file()]
    ordered = [entries, *others] if split == "train" else [*others, entries]
    classes = _class_names([e for es in ordered for e in es])
    images = _image_root(root, entries[0][0])
    samples = [(images / rel, label) for rel, label in entries]
    raise_if_missing((p for p, _ in samples), path,
                     f"Images are looked up under {images} (searched "
                     f"{', '.join(str(root / d) for d in IMAGE_DIRS)}). ")
    return samples, classes


def _image_root(root: Path, first: str) -> Path:
    """The first candidate image folder holding ``first``; else the first existing one."""
    candidates = [root / d for d in IMAGE_DIRS]
    for c in candidates:
        if (c / first).is_file():
            return c
    return next((c for c in candidates[:-1] if c.is_dir()), root)


def _class_names(entries: list[tuple[str, int]]) -> list[str]:
    """Name of label i = category of the first path seen with it; gaps get ``label_<i>``."""
    names: dict[int, str] = {}
    for rel, label in entries:
        names.setdefault(label, category_name(rel) or f"label_{label}")
    n = max(names) + 1
    if len(names) != n:
        log.warning("Places205 labels are not contiguous: %d of 0..%d are used", len(names), n - 1)
    return [names.get(i, f"label_{i}") for i in range(n)]


def _read_imagefolder(root: Path, split: str) -> tuple[list[tuple[Path, int]], list[str]]:
    train = root / "train"
    samples, own = scan_image_folder(root / split, f"Places205 {split} folder")
    if split == "train" or not train.is_dir():
        if not own:
            raise UserError(f"Places205 {split} folder {root / split} has no <category>/ "
                            f"sub-folders. Expected {LAYOUTS_HELP}")
        return samples, own
    classes = sorted(d.name for d in train.iterdir() if d.is_dir() and not d.name.startswith("."))
    return remap_classes(samples, own, classes, root / split, train, LAYOUTS_HELP), classes
