"""Shared pieces of the dataset readers: the :class:`Split` result and small file helpers.

A reader returns a :class:`Split`: a list of ``(image path, class index)`` plus the class
names, so the same :class:`pretrain.data.ImageListDataset` (which decodes every image through
``load_rgb``) serves every dataset. Readers check the layout and that every image named by a
list file exists; they never decode images up front.

The *datasets file* is a tiny TOML file mapping a dataset role to its root::

    [datasets]
    imagenet = "/data/ILSVRC2012"
    places = "places205"          # relative paths are relative to the file's folder
"""
from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pretrain.data import ImageListDataset
from dcbench.core import UserError, atomic_write

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


@dataclass(frozen=True)
class Split:
    """One split of a labelled image dataset.

    ``samples``: ``[(path, class index)]``; ``classes[i]`` names class ``i`` (ImageNet: sorted
    wnids; Places205: the category of label ``i``); ``root``: the dataset root it was read from;
    ``name``: ``<dataset>/<split>``; ``layout``: which on-disk layout was detected.
    """

    samples: list[tuple[Path, int]]
    classes: list[str]
    root: Path
    name: str
    layout: str = field(default="", compare=False)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> np.ndarray:
        return np.array([lab for _, lab in self.samples], dtype=np.int64)

    def dataset(self, transform: Callable | None = None) -> ImageListDataset:
        """A torch-style dataset returning ``(transform(rgb image), label, index)``."""
        return ImageListDataset(self.samples, transform)


def check_split(split: str, dataset: str) -> str:
    if split not in SPLITS:
        raise UserError(f"unknown {dataset} split {split!r}; use one of {', '.join(SPLITS)}.")
    return split


def require_file(path: Path, what: str, fix: str) -> Path:
    """Return ``path`` if it is a file; otherwise one clear error naming it and the fix."""
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"{what} {path} {state}. {fix}")
    return path


def read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """``[(1-based line number, stripped line)]`` of a text file, blank lines dropped."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what} {path} ({e}). Check the file and its permissions."
                        ) from None
    return [(i, s) for i, line in enumerate(text.splitlines(), 1) if (s := line.strip())]


def find_missing(paths: Iterable[Path]) -> list[Path]:
    """The paths that do not exist, checked with one directory listing per parent folder.

    Much cheaper than one ``stat`` per file on network file systems (Places205 train names
    2.4M files in ~200 folders).
    """
    listings: dict[Path, frozenset[str]] = {}
    missing = []
    for p in paths:
        names = listings.get(p.parent)
        if names is None:
            try:
                names = frozenset(os.listdir(p.parent))
            except (FileNotFoundError, NotADirectoryError):
                names = frozenset()
            listings[p.parent] = names
        if p.name not in names:
            missing.append(p)
    return missing


def raise_if_missing(paths: Iterable[Path], listed_in: Path, hint: str = "") -> None:
    """One UserError naming the first missing image (and how many) listed in ``listed_in``."""
    missing = find_missing(paths)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"image file not found: {missing[0]}{more}, named in {listed_in}. "
                        f"{hint}Extract the missing images, or point the dataset root at the "
                        "folder that holds them.")


def remap_classes(samples: list[tuple[Path, int]], own: list[str], classes: list[str],
                  folder: Path, train: Path, expected: str) -> list[tuple[Path, int]]:
    """Re-index ImageFolder labels of ``folder`` from its own sorted sub-folders (``own``) to
    ``classes`` (the train order), so a val folder missing a class keeps the right indices."""
    if not own:
        raise UserError(f"{folder} is a flat folder; expected <class>/ sub-folders. "
                        f"Expected {expected}")
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in own if c not in index]
    if unknown:
        raise UserError(f"class folder {folder / unknown[0]} has no counterpart in {train} "
                        f"({len(unknown)} such). Train and val must use the same class names.")
    table = [index[c] for c in own]
    return [(p, table[lab]) for p, lab in samples]


def write_datasets_file(path: str | Path, roots: Mapping[str, str | Path]) -> Path:
    """Write a datasets file (``[datasets] role = "root"``) atomically, unless it already says
    exactly that; returns its path."""
    path = Path(path)
    lines = ["# Dataset roots by role (read by evaluations.datasets.common.read_datasets_file).",
             "[datasets]"]
    for role, root in sorted(roots.items()):
        lines.append(f"{role} = {_toml_string(str(root))}")
    text = "\n".join(lines) + "\n"
    try:
        unchanged = path.read_text(encoding="utf-8") == text
    except (OSError, UnicodeDecodeError):
        unchanged = False
    if not unchanged:
        atomic_write(path, text)
    return path


def read_datasets_file(path: str | Path) -> dict[str, Path]:
    """Roles -> roots from a datasets file; relative roots are taken relative to its folder."""
    path = Path(path).expanduser()
    example = '[datasets]\nimagenet = "/data/ILSVRC2012"\nplaces = "/data/places205"'
    require_file(path, "datasets file", f"Write a TOML file like:\n{example}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"cannot parse datasets file {path} ({e}). Expected TOML like:\n"
                        f"{example}") from None
    table = data.get("datasets")
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise UserError(f"datasets file {path} needs a [datasets] table of role = \"path\" "
                        f"strings. Expected TOML like:\n{example}")
    return {role: (path.parent / Path(v).expanduser()) for role, v in table.items()}


def _toml_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
