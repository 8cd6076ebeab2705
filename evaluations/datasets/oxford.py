"""Oxford5k / Paris6k retrieval readers: the original and the revisited protocols
(DATA_FORMATS.md B.4 and B.5; PROTOCOLS.md section 6).

Original protocol (roles ``oxford5k``, ``paris6k``; what DeepCluster evaluated)::

    <root>/jpg/**/<name>.jpg       every image, flat (Oxford) or in sub-folders (Paris:
                                   jpg/paris/defense/paris_defense_000605.jpg)
    <root>/lab/<q>_query.txt       one line "<image> x1 y1 x2 y2" (floats, original pixels);
                                   Oxford writes the image as "oxc1_<image>", Paris without prefix
    <root>/lab/<q>_good.txt        image names (no extension), one a line; also _ok and _junk

The database is every image under ``jpg/`` sorted by name (the query images included), except
for ``paris6k`` the 20 corrupted images of :data:`PARIS_CORRUPT`, which stay in the
ground-truth sets (positives that can never be retrieved). Queries are sorted by ``<q>``.
A ground-truth name absent from ``jpg/`` is kept: it counts in the number of positives.

Revisited protocol (roles ``roxford5k``, ``rparis6k``; revisitop / cirtorch)::

    <root>/jpg/**/<name>.jpg
    <root>/gnd_roxford5k.pkl       (or gnd_rparis6k.pkl) a pickled dict
        {'imlist': [names], 'qimlist': [names],
         'gnd': [{'bbx': [x1, y1, x2, y2], 'easy': [i], 'hard': [i], 'junk': [i]}, ...]}

The database is ``imlist`` in file order, the queries ``qimlist`` in file order (not in the
database); indices are 0-based into ``imlist``. The pickle is read by a restricted unpickler
(:func:`load_gnd`) that builds only containers, numbers, strings and numpy arrays.

Image names are file stems; ``.jpg`` / ``.jpeg`` in any case; files starting with ``.`` (such
as macOS ``._x.jpg`` forks) are ignored. Only the query images are opened, header only, to
check their box against the image size; database images are never opened here.
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from PIL import Image

from dcbench.core import UserError
from pretrain.data import require_dir

from .common import read_lines, require_file

log = logging.getLogger(__name__)

ORIGINAL_ROLES = ("oxford5k", "paris6k")
REVISITED_ROLES = ("roxford5k", "rparis6k")
RETRIEVAL_ROLES = ORIGINAL_ROLES + REVISITED_ROLES
# PCA-whitening is learned on the other dataset (Oxford <-> Paris).
WHITENING_ROLE = MappingProxyType({"oxford5k": "paris6k", "paris6k": "oxford5k",
                                   "roxford5k": "rparis6k", "rparis6k": "roxford5k"})
GND_FILES = MappingProxyType({"roxford5k": "gnd_roxford5k.pkl", "rparis6k": "gnd_rparis6k.pkl"})
GND_URLS = MappingProxyType({
    role: f"http://cmp.felk.cvut.cz/revisitop/data/datasets/{role}/{name}"
    for role, name in GND_FILES.items()})
PARIS_CORRUPT = frozenset({
    "paris_louvre_000136", "paris_louvre_000146", "paris_moulinrouge_000422",
    "paris_museedorsay_001059", "paris_notredame_000188", "paris_pantheon_000284",
    "paris_pantheon_000960", "paris_pantheon_000974", "paris_pompidou_000195",
    "paris_pompidou_000196", "paris_pompidou_000201", "paris_pompidou_000467",
    "paris_pompidou_000640", "paris_sacrecoeur_000299", "paris_sacrecoeur_000330",
    "paris_sacrecoeur_000353", "paris_triomphe_000662", "paris_triomphe_000833",
    "paris_triomphe_000863", "paris_triomphe_000867"})

IMAGE_SUFFIXES = (".jpg", ".jpeg")
OXFORD_PREFIX = "oxc1_"
QUERY_SUFFIX = "_query.txt"
ORIGINAL_GROUPS = ("good", "ok", "junk")
REVISITED_GROUPS = ("easy", "hard", "junk")
GND_KEYS = ("imlist", "qimlist", "gnd")
BOX_TOLERANCE = 1.0  # pixels a query box may pass the image border (Oxford: 648.5 on 649 px)
ORIGINAL_ARCHIVES = MappingProxyType({
    "oxford5k": "extract oxbuild_images.tgz into <root>/jpg/ and gt_files_170407.tgz into "
                "<root>/lab/",
    "paris6k": "extract paris_1.tgz and paris_2.tgz into <root>/jpg/ (sub-folders are fine) "
               "and paris_120310.tgz into <root>/lab/"})
REVISITED_LAYOUT = ("<root>/jpg/<name>.jpg (the Oxford5k or Paris6k images) and "
                    "<root>/{gnd} (from {url})")
# Globals a gnd pickle may name: numpy arrays, dtypes and scalars, as numpy 1.x (numpy.core) and
# 2.x (numpy._core) write them; _frombuffer is what protocol-5 array pickles call.
NUMPY_GLOBALS = frozenset({
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.ndarray", "numpy.dtype",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.core.numeric._frombuffer", "numpy._core.numeric._frombuffer"})
# Protocol 0-2 pickles from Python 3 write bytes (a numpy array's data) as
# _codecs.encode(text, 'latin1'), and empty bytes (an empty array's) as bytes(); both are served
# by stand-ins that accept only those calls.
CODECS_ENCODE = "_codecs.encode"
EMPTY_BYTES = frozenset({"__builtin__.bytes", "builtins.bytes"})

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Query:
    """One retrieval query.

    ``name``: the query id (original: ``all_souls_1``; revisited: the query image name);
    ``image`` / ``path``: its image name (no extension, no ``oxc1_``) and file; ``box``:
    ``(x1, y1, x2, y2)`` in original pixels; ``groups``: original ``{"good", "ok", "junk"}`` ->
    sorted tuples of names (duplicates collapsed); revisited ``{"easy", "hard", "junk"}`` ->
    tuples of indices into :attr:`RetrievalSet.images`, in file order.
    """

    name: str
    image: str
    path: Path
    box: Box
    groups: Mapping[str, tuple]


@dataclass(frozen=True)
class RetrievalSet:
    """A retrieval dataset: the database (``images`` / ``paths``, aligned, in database order),
    the queries, and for ``paris6k`` the corrupted images found in ``jpg/`` and left out
    (``excluded``, sorted; empty for the other roles)."""

    role: str
    root: Path
    protocol: str  # "original" | "revisited"
    images: tuple[str, ...]
    paths: tuple[Path, ...]
    queries: tuple[Query, ...]
    excluded: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)


# --------------------------------------------------------------------------- entry point


def read_retrieval(root: str | Path, role: str) -> RetrievalSet:
    """Read the dataset of ``role`` (one of :data:`RETRIEVAL_ROLES`) under ``root``."""
    if role in ORIGINAL_ROLES:
        return _read_original(Path(root).expanduser(), role)
    if role in REVISITED_ROLES:
        return _read_revisited(Path(root).expanduser(), role)
    raise UserError(f"unknown retrieval dataset role {role!r} (root {root}); use one of "
                    f"{', '.join(RETRIEVAL_ROLES)}.")


def find_images(jpg_dir: Path) -> dict[str, Path]:
    """``{name: path}`` of every ``.jpg`` / ``.jpeg`` (any case) under ``jpg_dir``, recursively,
    sorted by name; hidden files are skipped. Two files with the same stem are an error."""
    jpg_dir = require_dir(jpg_dir, "image folder", "a folder of <name>.jpg images")
    found: dict[str, Path] = {}
    seen = {os.path.realpath(jpg_dir)}
    for dirpath, dirnames, filenames in os.walk(jpg_dir, onerror=_walk_error, followlinks=True):
        dirnames[:] = _unseen_dirs(dirpath, dirnames, seen)
        for f in filenames:
            stem, suffix = os.path.splitext(f)
            if f.startswith(".") or suffix.lower() not in IMAGE_SUFFIXES:
                continue
            path = Path(dirpath) / f
            if stem in found:
                raise UserError(f"two image files named {stem!r} under {jpg_dir}: {found[stem]} "
                                f"and {path}. Remove one of them (each image name must be "
                                "unique: the ground truth refers to images by name).")
            found[stem] = path
    return dict(sorted(found.items()))


def _unseen_dirs(dirpath: str, dirnames: list[str], seen: set[str]) -> list[str]:
    """The hidden-free sub-folders not visited yet (a symlink loop is walked once)."""
    keep = []
    for d in sorted(dirnames):
        real = os.path.realpath(os.path.join(dirpath, d))
        if not d.startswith(".") and real not in seen:
            seen.add(real)
            keep.append(d)
    return keep


def _walk_error(e: OSError) -> None:
    raise UserError(f"cannot list image folder {e.filename} ({e.strerror}). Check its "
                    "permissions.")


def _database_images(root: Path, role: str, expected: str) -> dict[str, Path]:
    """The images under ``<root>/jpg/``: one UserError if the folder is missing or empty."""
    jpg = root / "jpg"
    if not jpg.is_dir():
        raise UserError(f"{role} image folder {jpg} does not exist{_layout_hint(root, role)}. "
                        f"Expected {expected}.")
    images = find_images(jpg)
    if not images:
        raise UserError(f"{role} image folder {jpg} holds no .jpg images. Expected {expected}.")
    return images


def _layout_hint(root: Path, role: str) -> str:
    """A clause saying what ``root`` looks like instead, or ``""``."""
    if (root / role).is_dir():
        return f" (but {root / role} exists: point the {role} root there)"
    others = [r for r, f in GND_FILES.items() if r != role and (root / f).is_file()]
    if others:
        return f" (it holds {GND_FILES[others[0]]}: the {others[0]} role's layout)"
    if role in REVISITED_ROLES and (root / "lab").is_dir():
        return " (it holds lab/: the original protocol's layout, roles oxford5k / paris6k)"
    return ""


# --------------------------------------------------------------------------- original


def _read_original(root: Path, role: str) -> RetrievalSet:
    expected = ("<root>/jpg/<name>.jpg and <root>/lab/<q>_{query,good,ok,junk}.txt: "
                + ORIGINAL_ARCHIVES[role])
    root = require_dir(root, f"{role} root", expected)
    found = _database_images(root, role, expected)
    lab = root / "lab"
    if not lab.is_dir():
        raise UserError(f"{role} ground-truth folder {lab} does not exist"
                        f"{_layout_hint(root, role)}. Expected {expected}.")
    ids = _query_ids(lab)
    if not ids:
        raise UserError(f"{role} ground-truth folder {lab} holds no <q>{QUERY_SUFFIX} files. "
                        f"Expected {expected}.")
    queries = tuple(_original_query(lab, q, found) for q in ids)
    blacklist = PARIS_CORRUPT if role == "paris6k" else frozenset()
    names = tuple(n for n in found if n not in blacklist)
    excluded = tuple(n for n in found if n in blacklist)
    log.info("%s %s: %d database images (%d corrupted left out), %d queries", role, root,
             len(names), len(excluded), len(queries))
    return RetrievalSet(role, root, "original", names, tuple(found[n] for n in names), queries,
                        excluded)


def _query_ids(lab: Path) -> list[str]:
    """The sorted query ids ``<q>`` of the ``<q>_query.txt`` files in ``lab``."""
    return sorted(p.name[: -len(QUERY_SUFFIX)] for p in lab.iterdir()
                  if p.name.endswith(QUERY_SUFFIX) and not p.name.startswith(".")
                  and len(p.name) > len(QUERY_SUFFIX))


def _original_query(lab: Path, qid: str, found: Mapping[str, Path]) -> Query:
    source = lab / f"{qid}{QUERY_SUFFIX}"
    image, box = _read_query_file(source)
    groups = {g: _read_gt_file(require_file(
        lab / f"{qid}_{g}.txt", f"ground-truth file of query {qid}:",
        f"Each <q>{QUERY_SUFFIX} in {lab} needs <q>_good.txt, <q>_ok.txt and <q>_junk.txt "
        "(an empty file is fine); extract the whole ground-truth archive.")) for g in
        ORIGINAL_GROUPS}
    path = _query_image(found, image, lab.parent / "jpg", f"query {qid} ({source})")
    _check_box_inside(box, path, f"query {qid} ({source})")
    return Query(qid, image, path, box, MappingProxyType(groups))


def _read_query_file(path: Path) -> tuple[str, Box]:
    """``(image name without oxc1_, (x1, y1, x2, y2))`` of a ``<q>_query.txt`` file."""
    lines = read_lines(path, "query file")
    form = "one line '<image> x1 y1 x2 y2' (e.g. 'oxc1_all_souls_000013 136.5 34.1 648.5 955.7')"
    if len(lines) != 1:
        raise UserError(f"query file {path} has {len(lines)} non-blank lines; expected {form}. "
                        "Re-extract the ground-truth archive.")
    lineno, line = lines[0]
    tokens = line.split()
    if len(tokens) != 5:
        raise UserError(f"query file {path} line {lineno}: {len(tokens)} tokens in {line!r}; "
                        f"expected {form}.")
    box = _parse_box(tokens[1:])
    if box is None:
        raise UserError(f"query file {path} line {lineno}: the box in {line!r} is not 4 finite "
                        f"numbers; expected {form}.")
    _check_box_order(box, f"query file {path}")
    name = tokens[0]
    return (name[len(OXFORD_PREFIX):] if name.startswith(OXFORD_PREFIX) else name), box


def _read_gt_file(path: Path) -> tuple[str, ...]:
    """The sorted, de-duplicated image names of a ``<q>_{good,ok,junk}.txt`` file."""
    names = set()
    for lineno, line in read_lines(path, "ground-truth file"):
        if len(line.split()) != 1:
            raise UserError(f"ground-truth file {path} line {lineno}: {line!r} is not one image "
                            "name; expected one name (no extension) a line.")
        names.add(line)
    return tuple(sorted(names))


def _parse_box(tokens: list[str]) -> Box | None:
    try:
        box = tuple(float(t) for t in tokens)
    except ValueError:
        return None
    return box if all(math.isfinite(v) for v in box) else None  # type: ignore[return-value]


# --------------------------------------------------------------------------- revisited


def _read_revisited(root: Path, role: str) -> RetrievalSet:
    gnd_name, url = GND_FILES[role], GND_URLS[role]
    expected = REVISITED_LAYOUT.format(gnd=gnd_name, url=url)
    root = require_dir(root, f"{role} root", expected)
    gnd_path = root / gnd_name
    if not gnd_path.is_file():
        raise UserError(f"{role} ground-truth file {gnd_path} does not exist"
                        f"{_layout_hint(root, role)}. Download it from {url} (revisitop / "
                        f"cirtorch's {gnd_name}) into {root}.")
    gnd = load_gnd(gnd_path)
    found = _database_images(root, role, expected)
    missing = [n for n in gnd["imlist"] if n not in found]
    if missing:
        raise UserError(f"{len(missing)} database image(s) of {gnd_path} are not under "
                        f"{root / 'jpg'}, e.g. {missing[0]!r}. Extract all the "
                        f"{'Oxford5k' if 'oxford' in role else 'Paris6k'} images there.")
    queries = tuple(
        _revisited_query(gnd_path, i, name, entry, found)
        for i, (name, entry) in enumerate(zip(gnd["qimlist"], gnd["gnd"])))
    names = tuple(gnd["imlist"])
    log.info("%s %s: %d database images, %d queries", role, root, len(names), len(queries))
    return RetrievalSet(role, root, "revisited", names, tuple(found[n] for n in names), queries,
                        ())


def _revisited_query(gnd_path: Path, i: int, name: str, entry: Mapping[str, Any],
                     found: Mapping[str, Path]) -> Query:
    what = f"query {i} {name!r} of {gnd_path}"
    path = _query_image(found, name, gnd_path.parent / "jpg", what)
    box: Box = tuple(float(v) for v in entry["bbx"])  # type: ignore[assignment]
    _check_box_inside(box, path, what)
    groups = {g: tuple(entry[g]) for g in REVISITED_GROUPS}
    return Query(name, name, path, box, MappingProxyType(groups))


# --------------------------------------------------------------------------- query images


def _query_image(found: Mapping[str, Path], image: str, jpg: Path, what: str) -> Path:
    if image not in found:
        raise UserError(f"the image {image!r} of {what} is not under {jpg} (no {image}.jpg). "
                        "Extract all the dataset's images there.")
    return found[image]


def _check_box_order(box: Box, what: str) -> None:
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1):
        raise UserError(f"{what}: degenerate box (x1, y1, x2, y2) = {box}; need x2 > x1 and "
                        "y2 > y1. Re-download the ground truth.")


def _check_box_inside(box: Box, path: Path, what: str) -> None:
    """The box lies in the image (within :data:`BOX_TOLERANCE`); reads the header only."""
    _check_box_order(box, what)
    width, height = image_size(path)
    x1, y1, x2, y2 = box
    t = BOX_TOLERANCE
    if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
        raise UserError(f"{what}: box (x1, y1, x2, y2) = {box} lies outside its image {path} "
                        f"({width}x{height}). Boxes are in original pixels: use the original, "
                        "full-size images (not resized copies).")


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the image header (nothing decoded)."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise UserError(f"image file not found: {path}. Check the dataset root.") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot open image {path} ({e}). The file is corrupt or not an "
                        "image: re-extract it from the dataset archive.") from None


# --------------------------------------------------------------------------- gnd pickles


class _Refused(pickle.UnpicklingError):
    """A pickle names a global that a gnd file never needs."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _GndUnpickler(pickle.Unpickler):
    """Builds containers, numbers and strings (no global needed) and numpy arrays / scalars;
    any other global is refused before anything is called."""

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in NUMPY_GLOBALS:
            return _numpy_global(module, name)
        if full == CODECS_ENCODE:
            return _latin1_encode
        if full in EMPTY_BYTES:
            return _empty_bytes
        raise _Refused(full)


def _numpy_global(module: str, name: str) -> Any:
    """The numpy object of an allowed global, from ``numpy._core`` or ``numpy.core``
    (whichever this numpy has; ``numpy._core`` first: ``numpy.core`` warns in numpy 2)."""
    if module == "numpy":
        return getattr(importlib.import_module("numpy"), name)
    tail = module.split(".", 2)[2]  # multiarray | numeric
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{tail}"), name)
        except (ImportError, AttributeError):
            continue
    raise _Refused(f"{module}.{name}")


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Stand-in for ``_codecs.encode`` serving only what pickle writes (``'latin1'``)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _Refused(f"{CODECS_ENCODE}(..., {encoding!r})")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """Stand-in for ``bytes`` serving only ``bytes()``, as pickle writes an empty bytes."""
    if args:
        raise _Refused(f"bytes{args!r}")
    return b""


def load_gnd(path: Path) -> dict:
    """Load and validate a revisited ``gnd_*.pkl``: ``{'imlist', 'qimlist', 'gnd'}`` as plain
    Python (numpy arrays and scalars converted to lists and numbers; each gnd entry holds
    ``bbx`` as 4 floats and ``easy`` / ``hard`` / ``junk`` as lists of int)."""
    path = Path(path)
    source = _gnd_source(path)
    require_file(path, "gnd file", f"Download it from {source}.")
    try:
        with path.open("rb") as f:
            data = _GndUnpickler(f, encoding="latin1").load()
    except _Refused as e:
        raise UserError(f"{path} holds a pickled {e.name} object; a gnd file holds only lists, "
                        "dicts, numbers and strings (and numpy arrays). Refusing to load it "
                        f"(loading would run code from the file). Re-download it from {source}."
                        ) from None
    except OSError as e:
        raise UserError(f"cannot read gnd file {path} ({e}). Check the file and its "
                        "permissions.") from None
    except Exception as e:  # a corrupt pickle raises almost anything
        raise UserError(f"gnd file {path} is not a readable pickle ({type(e).__name__}: {e}); "
                        f"it is truncated or corrupt. Re-download it from {source}.") from None
    return _check_gnd(_to_plain(data), path)


def _gnd_source(path: Path) -> str:
    roles = [r for r, f in GND_FILES.items() if f == path.name]
    return GND_URLS[roles[0]] if roles else "http://cmp.felk.cvut.cz/revisitop/"


def _to_plain(obj: Any) -> Any:
    """Numpy arrays -> lists and numpy scalars -> Python numbers, recursively."""
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    tolist: Callable[[], Any] | None = getattr(obj, "tolist", None)
    if tolist is not None and type(obj).__module__ == "numpy":
        return _to_plain(tolist())  # ndarray -> nested lists, numpy scalar -> number
    return obj


def _check_gnd(data: Any, path: Path) -> dict:
    """``data`` if it has the gnd shape; otherwise one UserError saying what is wrong."""
    def bad(what: str) -> UserError:
        return UserError(f"gnd file {path}: {what}. Expected {{'imlist': [names], 'qimlist': "
                         "[names], 'gnd': [{'bbx': [x1, y1, x2, y2], 'easy': [indices], "
                         f"'hard': [...], 'junk': [...]}}, ...]}}; re-download it from "
                         f"{_gnd_source(path)}.")

    if not isinstance(data, dict):
        raise bad(f"the pickle holds a {type(data).__name__}, not a dict")
    absent = [k for k in GND_KEYS if k not in data]
    if absent:
        raise bad(f"missing key(s) {', '.join(map(repr, absent))} (keys present: "
                  f"{', '.join(map(repr, data)) or 'none'})")
    for key in ("imlist", "qimlist"):
        names = data[key]
        if not isinstance(names, list) or not names:
            raise bad(f"{key!r} is {_describe(names)}, not a non-empty list of image names")
        for i, n in enumerate(names):
            if not isinstance(n, str) or not n:
                raise bad(f"{key}[{i}] = {n!r} is not an image name (a non-empty str)")
    first: dict[str, int] = {}
    for i, n in enumerate(data["imlist"]):
        if first.setdefault(n, i) != i:
            raise bad(f"imlist[{i}] = {n!r} repeats imlist[{first[n]}]")
    entries = data["gnd"]
    if not isinstance(entries, list):
        raise bad(f"'gnd' is {_describe(entries)}, not a list")
    if len(entries) != len(data["qimlist"]):
        raise bad(f"'gnd' has {len(entries)} entries but 'qimlist' has "
                  f"{len(data['qimlist'])} queries; they must match")
    n_db = len(data["imlist"])
    gnd = [_check_entry(e, i, data["qimlist"][i], n_db, bad) for i, e in enumerate(entries)]
    return {"imlist": data["imlist"], "qimlist": data["qimlist"], "gnd": gnd}


def _check_entry(entry: Any, i: int, query: str, n_db: int,
                 bad: Callable[[str], UserError]) -> dict:
    if not isinstance(entry, dict):
        raise bad(f"gnd[{i}] is {_describe(entry)}, not a dict")
    if "ok" in entry and not all(g in entry for g in ("easy", "hard")):
        raise bad(f"gnd[{i}] has 'ok' instead of 'easy'/'hard': this is an old-protocol "
                  "gnd_oxford5k.pkl / gnd_paris6k.pkl; use the oxford5k / paris6k role with "
                  "lab/ (the original ground truth) instead")
    for g in REVISITED_GROUPS:
        if g not in entry:
            raise bad(f"gnd[{i}] (query {query!r}) has no {g!r} list")
        if not isinstance(entry[g], list):
            raise bad(f"gnd[{i}][{g!r}] is {_describe(entry[g])}, not a list of indices")
        for j, v in enumerate(entry[g]):
            if not isinstance(v, int) or isinstance(v, bool):
                raise bad(f"gnd[{i}][{g!r}][{j}] = {v!r} is not an integer index")
            if not 0 <= v < n_db:
                raise bad(f"gnd[{i}][{g!r}][{j}] = {v} is outside imlist ({n_db} images)")
    box = entry.get("bbx")
    if box is None:
        raise bad(f"gnd[{i}] (query {query!r}) has no 'bbx' box; the protocol crops each "
                  "query to its box")
    if (not isinstance(box, list) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       and math.isfinite(v) for v in box)):
        raise bad(f"gnd[{i}]['bbx'] = {box!r} (query {query!r}) is not 4 finite numbers")
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1):
        raise bad(f"gnd[{i}]['bbx'] = {box!r} (query {query!r}) is degenerate; need x2 > x1 "
                  "and y2 > y1")
    return {"bbx": [float(v) for v in box], **{g: list(entry[g]) for g in REVISITED_GROUPS}}


def _describe(obj: Any) -> str:
    """``None``, ``an empty list``, ``a dict``, ``an int``: for error messages."""
    if obj is None:
        return "None"
    name = type(obj).__name__
    empty = "empty " if isinstance(obj, (list, dict, str)) and not obj else ""
    return f"{'an' if (empty or name)[0] in 'aeiou' else 'a'} {empty}{name}"
