"""An embedded instance-retrieval suite in the Oxford5k / Paris6k formats, built from real photos
only (DATA_FORMATS.md B.4 and B.5).

The photos are the ones that install with the project's dependencies, read directly from the
installed packages with PIL: scikit-image's ``skimage/data`` files (colour: astronaut, chelsea,
coffee, hubble_deep_field, ihc, motorcycle_left / motorcycle_right, retina, rocket; grey: camera,
coins, moon, page, text, brick, grass, gravel, clock_motion, cell) and scikit-learn's
``load_sample_images`` files (china.jpg, flower.jpg). A *unit* is a region of one photo (a whole
photo, or one of two non-overlapping parts of a large one); a *landmark* is a unit with an
*object* box in it (:data:`OXFORD_UNITS`, :data:`PARIS_UNITS`). No photo is a landmark of both
datasets. The motorcycle stereo pair is one landmark (Paris ``defense``): every third of its
views is cut from the right photo, whose object box is the left one shifted by the pair's median
disparity in it (50 px, from ``motorcycle_disp.npz``), a real second view of the same object.

Every image is a *view* of a unit: a window of the unit (never crossing its border), rotated
(mostly by at most 3 degrees, at most 14), rescaled to a long side ``L`` (a multiple of 12 in
``[0.6 max_side, max_side]``) and one aspect ratio of :data:`ASPECTS` (so images batch by size
after resizing), maybe mirrored, maybe (30 % of landmark views) with 1-2 occluder patches (pieces
of distractor photos pasted over the object), then photometric changes (gamma, saturation,
brightness, per-channel colour gains, contrast, Gaussian blur) and saved as JPEG (quality
85-95). Its geometry is one affine map (``affine``: output pixel ``(u, v)`` -> photo pixel
``(a u + b v + c, d u + e v + f)``, continuous coordinates with pixel edges at integers). A
landmark view's window is drawn in one of five ways: the whole object at a moderate (40 %) or a
small (10 %) scale, shifted so part of the object falls outside (20 %), zoomed in on a detail
(15 %), or *context* (15 %): the part of the unit farthest from the object, which often misses
it (such a view is then in no ground-truth list, like the Oxford images of a landmark's
surroundings).

Ground truth, from each landmark view's geometry (recorded in ``embedded_retrieval.json``):

* ``visible`` = the fraction of the object box that lands inside the view and is not under an
  occluder, ``occluded`` = the fraction inside the view but under an occluder; both measured on
  a :data:`VISIBILITY_GRID` x :data:`VISIBILITY_GRID` grid of cell centres of the object box.
* strength levels (0 mild, 1 strong, 2 severe; ``strength`` = their max): rotation: ``|angle|``
  <= 3 / 8 degrees; mirrored: 1; scale: the object box's long side in the view (``s * max(w,
  h)``, ``s`` = output pixels per photo pixel) over the view's long side >= 0.4 / 0.25;
  photometric: each of brightness, contrast, gamma and the three colour gains within a factor
  1.15 / 1.4 of 1 and the blur radius (per 384 px of long side) <= 0.8 / 1.6 (saturation and
  JPEG quality do not count).
* original: nothing if ``visible == 0``; else ``junk`` if ``visible < 0.25`` or ``occluded >
  0.5``; else ``ok`` if ``visible < 0.6`` or ``strength == 2``; else ``good``.
* revisited: ``easy`` = good with strength 0, ``hard`` = good with strength 1 and all ok,
  ``junk`` = the original junk.

Every query is a landmark view with the object well visible (``visible >= 0.9``, strength 0,
no occluder): a good, easy view. Its box is the object box mapped into the query image (the
bounding box of its four corners, clipped to the image, rounded inwards to 0.1 px). The ground
truth is the same for all queries of one landmark. In the original protocol the query images
are database images and good positives of every query of their landmark, their own included
(as in Oxford). The revisited pickle reuses the same query images as ``qimlist`` and leaves
them out of ``imlist`` (as ROxford / RParis do), so they are positives of no revisited query;
a landmark whose easy views are all queries has queries with an empty ``easy`` list (their
Easy-protocol AP is NaN and skipped, as revisitop does); nothing forces or prevents that.

Distractors are views of the units that are not landmarks of the dataset: the other dataset's
11 landmark units and the texture photos (text, brick, grass, gravel), so the other dataset's
landmark photos are distractors here.

What :func:`build_retrieval` writes under an empty ``root``:

* ``oxford5k``: ``jpg/<landmark>_<6 digits>.jpg`` (landmarks: the first ``n_landmarks`` of
  Oxford's 11 names, alphabetical), distractors ``jpg/oxford_<6 digits>.jpg``; ``lab/<landmark>_
  <i>_query.txt`` (``oxc1_<image> x1 y1 x2 y2``) and ``_good/_ok/_junk.txt``;
  ``gnd_roxford5k.pkl``.
* ``paris6k``: ``jpg/paris/<landmark>/paris_<landmark>_<6 digits>.jpg`` (landmarks: the first
  ``n_landmarks`` of :data:`PARIS_LANDMARKS`, which start with louvre and pantheon),
  distractors in ``jpg/paris/general/``; query lines without ``oxc1_``; ``gnd_rparis6k.pkl``.
  Two of Paris' official corrupted images, ``paris_louvre_000136`` and ``paris_pantheon_000284``
  (:data:`PARIS_CORRUPT`), are written as the first 200 bytes of a good view's JPEG: they are in
  their landmark's good list (the original protocol drops them from the database but counts
  them as positives) and not in the revisited ``imlist``. No other image has a name of Paris'
  20-name blacklist.
* ``embedded_retrieval.json``: the settings, the landmarks, and per image its photo, object box,
  size, affine map, occluders, photometric settings, levels, visibility and classes.

The gnd pickle (protocol 4, only builtin list / dict / str / float / int): ``imlist`` = every
readable non-query image sorted by name, ``qimlist`` = the query images in the order of the
sorted query ids of ``lab/``, ``gnd[i]`` = ``{'bbx', 'easy', 'hard', 'junk'}`` (sorted 0-based
indices into ``imlist``). Every image is a function of ``(seed, dataset, landmark or
distractor, kind, index)`` through :func:`dcbench.core.derive_seed`; two builds with the same
arguments are byte-identical.
"""
from __future__ import annotations

import functools
import importlib.resources
import io
import json
import logging
import math
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from dcbench.core import UserError, derive_seed

from .oxford import GND_FILES as REVISITED_GND
from .oxford import PARIS_CORRUPT as PARIS_BLACKLIST  # Paris' 20 corrupted images: no
# readable image gets one of these names, since a reader drops them from the database

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]

DATASETS = ("oxford5k", "paris6k")
GND_FILES = {d: REVISITED_GND[f"r{d}"] for d in DATASETS}  # gnd_roxford5k.pkl, ...
METADATA = "embedded_retrieval.json"
TAG = "embedded-retrieval"
OXFORD_LANDMARKS = ("all_souls", "ashmolean", "balliol", "bodleian", "christ_church",
                    "cornmarket", "hertford", "keble", "magdalen", "pitt_rivers",
                    "radcliffe_camera")
# Paris' 11 landmarks ("general" holds the distractors), in the order n_landmarks picks them:
# louvre and pantheon first, the landmarks of the two corrupted images.
PARIS_LANDMARKS = ("louvre", "pantheon", "defense", "eiffel", "invalides", "moulinrouge",
                   "museedorsay", "notredame", "pompidou", "sacrecoeur", "triomphe")
PARIS_DISTRACTOR_FOLDER = "general"
PARIS_CORRUPT = ("paris_louvre_000136", "paris_pantheon_000284")  # of PARIS_BLACKLIST
CORRUPT_BYTES = 200
ASPECTS = ((4, 3), (3, 4), (1, 1), (3, 2), (2, 3))  # width : height
SIZE_STEP = 12  # long sides are multiples of this, so every aspect gives integer sides
MIN_SIDE_FRACTION = 0.6
JPEG_QUALITY = (85, 95)
VISIBILITY_GRID = 48
GOOD_VISIBLE, OK_VISIBLE, JUNK_OCCLUDED = 0.6, 0.25, 0.5
QUERY_VISIBLE = 0.9
ROTATION_LEVELS = (3.0, 8.0)  # |degrees| up to these: level 0, 1; above: 2
SCALE_LEVELS = (0.4, 0.25)  # object long side / view long side at least this: level 0, 1
FACTOR_LEVELS = (1.15, 1.4)  # brightness / contrast / gamma within this factor of 1: 0, 1
BLUR_LEVELS = (0.8, 1.6)  # blur radius per 384 px of long side up to these: 0, 1
DEFAULTS = {"n_landmarks": 8, "queries_per_landmark": 3, "views_per_landmark": 12,
            "n_distractors": 60, "max_side": 384}


@dataclass(frozen=True)
class Unit:
    """A region ``(x0, y0, x1, y1)`` of one photo (``package:file``) that views are cut from;
    for a landmark also its object box (same pixels) and maybe a second photo of the object
    (``alt``: photo, its unit region, the object box there)."""

    name: str
    photo: str
    region: Box
    obj: Box | None = None
    alt: tuple[str, Box, Box] | None = None


MOTORCYCLE_DISPARITY = 50  # median disparity in the object box (motorcycle_disp.npz)
OXFORD_UNITS = (  # in OXFORD_LANDMARKS order
    Unit("astronaut_face", "skimage:astronaut.png", (0, 0, 330, 512), (140, 10, 305, 195)),
    Unit("coffee_cup", "skimage:coffee.png", (0, 0, 600, 400), (170, 15, 410, 300)),
    Unit("rocket", "skimage:rocket.jpg", (0, 0, 640, 427), (280, 110, 350, 415)),
    Unit("hubble_left", "skimage:hubble_deep_field.jpg", (0, 0, 500, 872), (50, 340, 250, 540)),
    Unit("camera_man", "skimage:camera.png", (0, 0, 300, 512), (145, 60, 290, 215)),
    Unit("ihc_bottom", "skimage:ihc.png", (0, 256, 512, 512), (250, 290, 385, 490)),
    Unit("moon_craters", "skimage:moon.png", (0, 0, 512, 512), (80, 40, 380, 200)),
    Unit("astronaut_shuttle", "skimage:astronaut.png", (330, 0, 512, 512), (345, 0, 475, 285)),
    Unit("hubble_right", "skimage:hubble_deep_field.jpg", (500, 0, 1000, 872),
         (650, 400, 850, 620)),
    Unit("camera_campus", "skimage:camera.png", (300, 0, 512, 512), (340, 110, 512, 240)),
    Unit("ihc_top", "skimage:ihc.png", (0, 0, 512, 256), (285, 5, 460, 250)))
PARIS_UNITS = (  # in PARIS_LANDMARKS order
    Unit("china_pagoda", "sklearn:china.jpg", (0, 0, 640, 427), (55, 20, 340, 390)),
    Unit("flower_dahlia", "sklearn:flower.jpg", (0, 0, 640, 427), (160, 80, 420, 345)),
    Unit("motorcycle", "skimage:motorcycle_left.png", (0, 0, 741, 500), (330, 160, 560, 390),
         alt=("skimage:motorcycle_right.png", (0, 0, 741, 500),
              (330 - MOTORCYCLE_DISPARITY, 160, 560 - MOTORCYCLE_DISPARITY, 390))),
    Unit("chelsea_face", "skimage:chelsea.png", (0, 0, 451, 300), (120, 70, 350, 275)),
    Unit("retina_disc", "skimage:retina.jpg", (0, 0, 705, 1411), (80, 470, 340, 760)),
    Unit("coins_left", "skimage:coins.png", (0, 0, 192, 303), (15, 95, 180, 215)),
    Unit("clock", "skimage:clock_motion.png", (0, 0, 400, 300), (140, 85, 290, 220)),
    Unit("cell", "skimage:cell.png", (0, 0, 550, 660), (340, 290, 510, 455)),
    Unit("retina_notch", "skimage:retina.jpg", (705, 0, 1411, 1411), (980, 60, 1300, 400)),
    Unit("coins_right", "skimage:coins.png", (192, 0, 384, 303), (250, 0, 384, 150)),
    Unit("page_title", "skimage:page.png", (0, 0, 384, 191), (5, 5, 310, 75)))
TEXTURE_UNITS = (  # distractors (and occluders) of both datasets, never landmarks
    Unit("text", "skimage:text.png", (0, 0, 448, 172)),
    Unit("brick", "skimage:brick.png", (0, 0, 512, 512)),
    Unit("grass", "skimage:grass.png", (0, 0, 512, 512)),
    Unit("gravel", "skimage:gravel.png", (0, 0, 512, 512)))
LANDMARKS = {"oxford5k": OXFORD_LANDMARKS, "paris6k": PARIS_LANDMARKS}
UNITS = {"oxford5k": OXFORD_UNITS, "paris6k": PARIS_UNITS}


@dataclass
class View:
    """One generated image: its geometry, settings and (for a landmark view) ground truth."""

    size: tuple[int, int]  # (W, H)
    affine: tuple[float, ...]  # output (u, v) -> photo (a u + b v + c, d u + e v + f)
    photo: str
    unit: str
    rotation: float  # degrees
    flip: bool
    photometric: dict
    occluders: list = field(default_factory=list)  # [x1, y1, x2, y2] in view pixels
    occluder_units: list = field(default_factory=list)
    obj: Box | None = None  # the object box in ``photo`` (landmark views)
    visible: float = 0.0
    occluded: float = 0.0
    levels: dict = field(default_factory=dict)

    @property
    def strength(self) -> int:
        return max(self.levels.values()) if self.levels else 0

    @property
    def original(self) -> str:
        """``good`` / ``ok`` / ``junk`` / ``none`` (not listed; also every distractor)."""
        if self.obj is None or self.visible <= 0:
            return "none"
        if self.visible < OK_VISIBLE or self.occluded > JUNK_OCCLUDED:
            return "junk"
        if self.visible < GOOD_VISIBLE or self.strength >= 2:
            return "ok"
        return "good"

    @property
    def revisited(self) -> str:
        """``easy`` / ``hard`` / ``junk`` / ``none``."""
        c = self.original
        if c == "good":
            return "easy" if self.strength == 0 else "hard"
        return {"ok": "hard"}.get(c, c)


# --------------------------------------------------------------------------- public


def build_retrieval(root: Path, dataset: str, seed: int = 0,
                    n_landmarks: int = DEFAULTS["n_landmarks"],
                    queries_per_landmark: int = DEFAULTS["queries_per_landmark"],
                    views_per_landmark: int = DEFAULTS["views_per_landmark"],
                    n_distractors: int = DEFAULTS["n_distractors"],
                    max_side: int = DEFAULTS["max_side"]) -> None:
    """Write the embedded ``dataset`` (``oxford5k`` or ``paris6k``: original ``jpg/`` +
    ``lab/`` and the revisited gnd pickle) into the empty (or absent) folder ``root``.

    Per landmark: ``queries_per_landmark`` query images and ``views_per_landmark`` other
    views (plus, for Paris' louvre and pantheon, one corrupted file each); then
    ``n_distractors`` distractor images; long sides in ``[0.6 max_side, max_side]``."""
    _validate(dataset, seed, n_landmarks, queries_per_landmark, views_per_landmark,
              n_distractors, max_side)
    root = Path(root).expanduser()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserError(f"embedded retrieval: {root} is not an empty folder; build into a new "
                        "or empty folder.")
    t0 = time.perf_counter()
    paris = dataset == "paris6k"
    landmarks = LANDMARKS[dataset][:n_landmarks]
    units = dict(zip(landmarks, UNITS[dataset]))
    pool = (*UNITS["oxford5k" if paris else "paris6k"], *TEXTURE_UNITS)
    sides = _long_sides(max_side)
    images: dict[str, tuple[View, str, str | None]] = {}  # name -> (view, kind, landmark)
    queries: dict[str, list[str]] = {}
    corrupt: dict[str, View] = {}
    for lm in landmarks:
        unit = units[lm]
        kinds = ["query"] * queries_per_landmark + ["view"] * views_per_landmark
        names = _landmark_names(seed, dataset, lm, len(kinds))
        queries[lm] = []
        counters = {"query": 0, "view": 0}
        for kind, name in zip(kinds, names):
            i = counters[kind]
            counters[kind] += 1
            rng = np.random.default_rng(derive_seed(seed, TAG, dataset, lm, kind, i))
            if kind == "query":
                view = _query_view(rng, unit.photo, unit.region, unit.obj, sides)
                queries[lm].append(name)
            else:
                photo, region, obj = ((unit.photo, unit.region, unit.obj)
                                      if unit.alt is None or i % 3 else unit.alt)
                view = _landmark_view(rng, photo, region, obj, sides, pool)
            view.unit = unit.name
            images[name] = (view, kind, lm)
        for c in (PARIS_CORRUPT if paris else ()):
            if c.split("_")[1] == lm:
                rng = np.random.default_rng(derive_seed(seed, TAG, dataset, lm, "corrupt", 0))
                view = _query_view(rng, unit.photo, unit.region, unit.obj, sides)
                view.unit = unit.name
                corrupt[c] = view
    for j, name in enumerate(_distractor_names(seed, dataset, n_distractors)):
        rng = np.random.default_rng(derive_seed(seed, TAG, dataset, "distractor", j))
        images[name] = (_distractor_view(rng, pool, sides), "distractor", None)

    jpg = root / "jpg"
    lab = root / "lab"
    lab.mkdir(parents=True)
    for name, (view, kind, lm) in images.items():
        path = jpg / _relative(dataset, name, lm)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(render(view, pool))
    for name, view in corrupt.items():
        lm = name.split("_")[1]
        path = jpg / _relative(dataset, name, lm)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(render(view, pool)[:CORRUPT_BYTES])

    # ground truth: one list per landmark, shared by its queries
    members = {**{n: (v, lm) for n, (v, _, lm) in images.items() if lm is not None},
               **{n: (v, n.split("_")[1]) for n, v in corrupt.items()}}
    original = {lm: {g: sorted(n for n, (v, m) in members.items()
                               if m == lm and v.original == g) for g in ("good", "ok", "junk")}
                for lm in landmarks}
    qids = sorted((f"{lm}_{k + 1}", lm, q) for lm in landmarks
                  for k, q in enumerate(queries[lm]))
    boxes = {q: query_box(images[q][0]) for _, _, q in qids}
    for qid, lm, q in qids:
        prefix = "" if paris else "oxc1_"
        x1, y1, x2, y2 = boxes[q]
        _write(lab / f"{qid}_query.txt", f"{prefix}{q} {x1:.1f} {y1:.1f} {x2:.1f} {y2:.1f}\n")
        for g, names in original[lm].items():
            _write(lab / f"{qid}_{g}.txt", "".join(f"{n}\n" for n in names))
    query_names = {q for _, _, q in qids}
    imlist = sorted(n for n in images if n not in query_names)
    index = {n: i for i, n in enumerate(imlist)}
    gnd = []
    for _, lm, q in qids:
        entry: dict = {"bbx": [float(v) for v in boxes[q]]}
        for g in ("easy", "hard", "junk"):
            entry[g] = sorted(index[n] for n, (v, m) in members.items()
                              if m == lm and n in index and v.revisited == g)
        gnd.append(entry)
    with (root / GND_FILES[dataset]).open("wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": [q for _, _, q in qids], "gnd": gnd}, f,
                    protocol=4)
    settings = {"dataset": dataset, "seed": seed, "n_landmarks": n_landmarks,
                "queries_per_landmark": queries_per_landmark,
                "views_per_landmark": views_per_landmark, "n_distractors": n_distractors,
                "max_side": max_side}
    _write(root / METADATA, metadata_json(dataset, settings, landmarks, units, images, corrupt,
                                          queries))
    _photo.cache_clear()  # the decoded photos (tens of MB) are not kept after a build
    log.info("embedded %s: %d images (%d queries, %d distractors%s) in %s, %.1f s", dataset,
             len(images) + len(corrupt), len(qids), n_distractors,
             f", {len(corrupt)} corrupted" if corrupt else "", root, time.perf_counter() - t0)


def load_photo(photo: str) -> Image.Image:
    """One bundled photo (``skimage:<file>`` or ``sklearn:<file>``) as RGB, read with PIL."""
    return _photo(photo, 1)


def visibility(affine: tuple[float, ...], size: tuple[int, int], obj: Box,
               occluders=()) -> tuple[float, float]:
    """``(visible, occluded)`` fractions of the object box ``obj`` (photo pixels) in a view:
    inside the view and not / under an occluder, on a grid of cell centres."""
    n = VISIBILITY_GRID
    t = (np.arange(n) + 0.5) / n
    x0, y0, x1, y1 = obj
    px, py = np.meshgrid(x0 + t * (x1 - x0), y0 + t * (y1 - y0))
    u, v = _to_view(affine, px.ravel(), py.ravel())
    w, h = size
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    under = np.zeros_like(inside)
    for ox1, oy1, ox2, oy2 in occluders:
        under |= (u >= ox1) & (u < ox2) & (v >= oy1) & (v < oy2)
    return float((inside & ~under).mean()), float((inside & under).mean())


def query_box(view: View) -> Box:
    """The object box mapped into the view (bounding box of its corners), clipped to the
    image, rounded to 0.1 px."""
    x0, y0, x1, y1 = view.obj
    u, v = _to_view(view.affine, np.array([x0, x1, x1, x0]), np.array([y0, y0, y1, y1]))
    w, h = view.size
    box = (max(0.0, u.min()), max(0.0, v.min()), min(float(w), u.max()), min(float(h), v.max()))
    lo = [math.ceil(b * 10) / 10 for b in box[:2]]  # rounded inwards: stays in the image
    hi = [math.floor(b * 10) / 10 for b in box[2:]]
    return (lo[0], lo[1], hi[0], hi[1])


def render(view: View, pool) -> bytes:
    """The view's JPEG bytes."""
    w, h = view.size
    a, b, c, d, e, f = view.affine
    scale = math.hypot(a, d)  # photo pixels per output pixel
    k = max(1, min(8, int(scale)))
    src = _photo(view.photo, k)
    full = _photo(view.photo, 1)
    sx, sy = src.size[0] / full.size[0], src.size[1] / full.size[1]
    img = src.transform((w, h), Image.Transform.AFFINE,
                        (a * sx, b * sx, c * sx, d * sy, e * sy, f * sy),
                        resample=Image.Resampling.BILINEAR)
    units = {u.name: u for u in pool}
    for (x1, y1, x2, y2), (uname, crop) in zip(view.occluders, view.occluder_units):
        patch = _photo(units[uname].photo, 1).crop(tuple(crop)).resize(
            (x2 - x1, y2 - y1), Image.Resampling.BILINEAR)
        img.paste(patch, (x1, y1))
    p = view.photometric
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = x ** p["gamma"]
    grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = grey[..., None] + p["saturation"] * (x - grey[..., None])
    x = x * (p["brightness"] * np.array(p["colour"], dtype=np.float32))
    x = x.mean() + p["contrast"] * (x - x.mean())
    img = Image.fromarray(np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8))
    if p["blur"] > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(p["blur"] * max(w, h) / 384))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=p["quality"])
    return out.getvalue()


def metadata_json(dataset, settings, landmarks, units, images, corrupt, queries) -> str:
    """``embedded_retrieval.json``: everything the ground truth was computed from."""
    def record(view: View, kind: str, lm: str | None, relative: str) -> dict:
        return {"path": f"jpg/{relative}", "kind": kind, "landmark": lm, "unit": view.unit,
                "photo": view.photo, "object": list(view.obj) if view.obj else None,
                "size": list(view.size), "affine": list(view.affine),
                "rotation": view.rotation, "flip": view.flip,
                "photometric": view.photometric, "occluders": view.occluders,
                "occluder_sources": [[u, list(c)] for u, c in view.occluder_units],
                "visible": view.visible, "occluded": view.occluded, "levels": view.levels,
                "strength": view.strength if view.obj else None,
                "original": view.original, "revisited": view.revisited}
    out = {n: record(v, k, lm, _relative(dataset, n, lm)) for n, (v, k, lm) in images.items()}
    for n, v in corrupt.items():
        lm = n.split("_")[1]
        out[n] = {**record(v, "corrupt", lm, _relative(dataset, n, lm)),
                  "revisited": "none (not in imlist)"}
    doc = {"format": "dcbench embedded retrieval (see evaluations/datasets/embedded_retrieval"
                     ".py)", "settings": settings,
           "thresholds": {"good_visible": GOOD_VISIBLE, "ok_visible": OK_VISIBLE,
                          "junk_occluded": JUNK_OCCLUDED, "visibility_grid": VISIBILITY_GRID,
                          "rotation_levels": ROTATION_LEVELS, "scale_levels": SCALE_LEVELS,
                          "factor_levels": FACTOR_LEVELS, "blur_levels": BLUR_LEVELS},
           "landmarks": {lm: {"unit": units[lm].name, "photo": units[lm].photo,
                              "region": list(units[lm].region), "object": list(units[lm].obj),
                              "second_photo": list(units[lm].alt) if units[lm].alt else None,
                              "queries": queries[lm]} for lm in landmarks},
           "images": dict(sorted(out.items()))}
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


# --------------------------------------------------------------------------- views


def _query_view(rng, photo, region, obj, sides) -> View:
    """A landmark view with the object well visible and mild settings (good, easy)."""
    for attempt in range(60):
        calm = attempt >= 30  # fall back to an upright, centred, unchanged view
        w, h = _output_size(rng, sides, obj if calm else None)
        theta = 0.0 if calm else float(rng.uniform(-1.5, 1.5))
        fh = _min_height(obj, w / h) * (1.15 if calm else float(rng.uniform(1.12, 1.9)))
        cx, cy = _centre_containing(rng, obj, fh * w / h, fh, jitter=not calm)
        view = _make_view(rng, photo, region, obj, (w, h), cx, cy, fh, theta, flip=False,
                          photometric=_photometric(rng, 0))
        if view.visible >= QUERY_VISIBLE and view.strength == 0:
            return view
    raise AssertionError(f"no query view fits {photo} {region} {obj}")  # units are fixed


def _landmark_view(rng, photo, region, obj, sides, pool) -> View:
    w, h = _output_size(rng, sides)
    aspect = w / h
    theta = _rotation(rng)
    fmin = _min_height(obj, aspect)
    mode = rng.choice(5, p=[0.4, 0.1, 0.2, 0.15, 0.15])
    ow, oh = obj[2] - obj[0], obj[3] - obj[1]
    ocx, ocy = (obj[0] + obj[2]) / 2, (obj[1] + obj[3]) / 2
    if mode <= 1:  # whole object, at a moderate (0) or small (1) scale
        fh = fmin * float(rng.uniform(1.05, 2.2) if mode == 0 else rng.uniform(2.2, 4.0))
        cx, cy = _centre_containing(rng, obj, fh * aspect, fh, jitter=True)
    elif mode == 2:  # shifted: part of the object outside
        fh = fmin * float(rng.uniform(0.7, 1.8))
        phi, t = rng.uniform(0, 2 * math.pi), rng.uniform(0.25, 0.95)
        cx = ocx + t * math.cos(phi) * (fh * aspect + ow) / 2
        cy = ocy + t * math.sin(phi) * (fh + oh) / 2
    elif mode == 3:  # zoomed in on a detail
        fh = fmin * float(rng.uniform(0.4, 0.85))
        cx, cy = float(rng.uniform(obj[0], obj[2])), float(rng.uniform(obj[1], obj[3]))
    else:  # context: the part of the photo farthest from the object of 8 random windows
        fh = fmin * float(rng.uniform(0.5, 1.2))
        xs, ys = rng.uniform(region[0], region[2], 8), rng.uniform(region[1], region[3], 8)
        far = int(np.argmax(np.maximum(np.abs(xs - ocx) / (fh * aspect + ow),
                                       np.abs(ys - ocy) / (fh + oh))))
        cx, cy = float(xs[far]), float(ys[far])
    view = _make_view(rng, photo, region, obj, (w, h), cx, cy, fh, theta,
                      flip=bool(rng.random() < 0.1), photometric=_photometric(rng))
    if rng.random() < 0.3:
        _occlude(rng, view, pool)
    return view


def _distractor_view(rng, pool, sides) -> View:
    unit = pool[int(rng.integers(len(pool)))]
    w, h = _output_size(rng, sides)
    x0, y0, x1, y1 = unit.region
    fh = min(y1 - y0, (x1 - x0) * h / w) * float(rng.uniform(0.35, 1.0))
    cx, cy = float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))
    view = _make_view(rng, unit.photo, unit.region, None, (w, h), cx, cy, fh, _rotation(rng),
                      flip=bool(rng.random() < 0.1), photometric=_photometric(rng))
    view.unit = unit.name
    return view


def _make_view(rng, photo, region, obj, size, cx, cy, fh, theta, flip, photometric) -> View:
    """Fit the window (centre, height ``fh``, angle ``theta``) into ``region`` (shrunk, then
    moved), build its affine map and measure the object."""
    w, h = size
    fw = fh * w / h
    x0, y0, x1, y1 = (region[0] + 1, region[1] + 1, region[2] - 1, region[3] - 1)
    rad = math.radians(theta)
    cos, sin = abs(math.cos(rad)), abs(math.sin(rad))
    ex, ey = (cos * fw + sin * fh) / 2, (sin * fw + cos * fh) / 2  # half extents
    k = min(1.0, (x1 - x0) / (2 * ex), (y1 - y0) / (2 * ey)) * (1 - 1e-9)
    fw, fh, ex, ey = fw * k, fh * k, ex * k, ey * k
    cx = min(max(cx, x0 + ex), x1 - ex)
    cy = min(max(cy, y0 + ey), y1 - ey)
    s = w / fw  # output pixels per photo pixel
    sign = -1.0 if flip else 1.0
    a, b = sign * math.cos(rad) / s, -math.sin(rad) / s
    d, e = sign * math.sin(rad) / s, math.cos(rad) / s
    affine = (a, b, cx - a * w / 2 - b * h / 2, d, e, cy - d * w / 2 - e * h / 2)
    view = View(size=(w, h), affine=tuple(float(v) for v in affine), photo=photo, unit="",
                rotation=float(theta), flip=flip, photometric=photometric,
                obj=tuple(float(v) for v in obj) if obj is not None else None)
    _measure(view)
    return view


def _measure(view: View) -> None:
    if view.obj is None:
        return
    view.visible, view.occluded = visibility(view.affine, view.size, view.obj, view.occluders)
    view.levels = levels(view)


def levels(view: View) -> dict:
    """Strength levels (0 mild, 1 strong, 2 severe) of a landmark view's transforms."""
    a, _, _, d, _, _ = view.affine
    s = 1.0 / math.hypot(a, d)
    x0, y0, x1, y1 = view.obj
    apparent = s * max(x1 - x0, y1 - y0) / max(view.size)
    p = view.photometric
    factor = max(abs(math.log(v)) for v in (p["brightness"], p["contrast"], p["gamma"],
                                            *p["colour"]))
    return {"rotation": _level(abs(view.rotation), ROTATION_LEVELS),
            "flip": int(view.flip),
            "scale": 0 if apparent >= SCALE_LEVELS[0] else 1 if apparent >= SCALE_LEVELS[1]
            else 2,
            "photometric": max(_level(factor, tuple(math.log(f) for f in FACTOR_LEVELS)),
                               _level(p["blur"], BLUR_LEVELS))}


def _level(x: float, bounds: tuple[float, float]) -> int:
    return 0 if x <= bounds[0] else 1 if x <= bounds[1] else 2


def _occlude(rng, view: View, pool) -> None:
    """1-2 patches of distractor photos pasted over the object's box in the view."""
    x0, y0, x1, y1 = view.obj
    u, v = _to_view(view.affine, np.array([x0, x1, x1, x0]), np.array([y0, y0, y1, y1]))
    w, h = view.size
    bx0, by0 = max(0.0, u.min()), max(0.0, v.min())
    bx1, by1 = min(float(w), u.max()), min(float(h), v.max())
    if bx1 - bx0 < 8 or by1 - by0 < 8:
        return
    for _ in range(int(rng.integers(1, 3))):
        ow = max(4, int((bx1 - bx0) * rng.uniform(0.3, 0.75)))
        oh = max(4, int((by1 - by0) * rng.uniform(0.3, 0.75)))
        ox = int(rng.uniform(bx0, max(bx0, bx1 - ow)))
        oy = int(rng.uniform(by0, max(by0, by1 - oh)))
        ox, oy = min(ox, w - ow), min(oy, h - oh)
        unit = pool[int(rng.integers(len(pool)))]
        rx0, ry0, rx1, ry1 = unit.region
        side = float(rng.uniform(0.3, 0.8))
        cw = max(4, min(rx1 - rx0, (ry1 - ry0) * ow / oh) * side)
        ch = cw * oh / ow
        cx0 = int(rng.uniform(rx0, rx1 - cw))
        cy0 = int(rng.uniform(ry0, ry1 - ch))
        view.occluders.append([ox, oy, ox + ow, oy + oh])
        view.occluder_units.append((unit.name, (cx0, cy0, cx0 + int(cw), cy0 + int(ch))))
    _measure(view)


def _rotation(rng) -> float:
    level = rng.choice(3, p=[0.7, 0.22, 0.08])
    return float(rng.uniform(-1, 1) * (ROTATION_LEVELS[0], ROTATION_LEVELS[1], 14.0)[level])


def _photometric(rng, level: int | None = None) -> dict:
    """Photometric settings drawn up to ``level`` (0 mild, 1 strong, 2 severe; None: drawn)."""
    if level is None:
        level = int(rng.choice(3, p=[0.6, 0.28, 0.12]))
    span = math.log((*FACTOR_LEVELS, 1.8)[level])
    draw = {k: round(math.exp(float(rng.uniform(-span, span))), 4)
            for k in ("brightness", "contrast", "gamma")}
    draw["colour"] = [round(math.exp(float(rng.uniform(-span, span))), 4) for _ in range(3)]
    return {**draw, "saturation": round(math.exp(float(rng.uniform(-1, 1)) * math.log(1.25)), 4),
            "blur": round(float(rng.uniform(0, (*BLUR_LEVELS, 2.5)[level])), 4),
            "quality": int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))}


def _output_size(rng, sides: list[int], fit: Box | None = None) -> tuple[int, int]:
    """A random long side and aspect; the aspect closest to the box ``fit``'s if given."""
    long_side = sides[int(rng.integers(len(sides)))]
    if fit is None:
        p, q = ASPECTS[int(rng.integers(len(ASPECTS)))]
    else:
        target = math.log((fit[2] - fit[0]) / (fit[3] - fit[1]))
        p, q = min(ASPECTS, key=lambda pq: abs(math.log(pq[0] / pq[1]) - target))
    return (long_side, long_side * q // p) if p >= q else (long_side * p // q, long_side)


def _long_sides(max_side: int) -> list[int]:
    lo = math.ceil(MIN_SIDE_FRACTION * max_side / SIZE_STEP)
    return [SIZE_STEP * k for k in range(lo, max_side // SIZE_STEP + 1)]


def _min_height(obj: Box, aspect: float) -> float:
    """The window height that just holds the object box at this aspect (width / height)."""
    return max(obj[3] - obj[1], (obj[2] - obj[0]) / aspect)


def _centre_containing(rng, obj: Box, fw: float, fh: float, jitter: bool) -> tuple[float, float]:
    """A window centre keeping the object box inside a ``fw`` x ``fh`` window (if it fits)."""
    ocx, ocy = (obj[0] + obj[2]) / 2, (obj[1] + obj[3]) / 2
    if not jitter:
        return ocx, ocy
    mx, my = max(0.0, (fw - (obj[2] - obj[0])) / 2), max(0.0, (fh - (obj[3] - obj[1])) / 2)
    return ocx + float(rng.uniform(-mx, mx)), ocy + float(rng.uniform(-my, my))


def _to_view(affine, px, py):
    """Photo pixels -> view pixels (the inverse affine map)."""
    a, b, c, d, e, f = affine
    det = a * e - b * d
    x, y = px - c, py - f
    return (e * x - b * y) / det, (-d * x + a * y) / det


# --------------------------------------------------------------------------- names, files


def _landmark_names(seed: int, dataset: str, lm: str, n: int) -> list[str]:
    """``n`` distinct names of the landmark in a seeded order (so the sorted names say nothing
    about which are queries); blacklisted Paris names are never drawn."""
    prefix = f"paris_{lm}_" if dataset == "paris6k" else f"{lm}_"
    taken = {int(b[len(prefix):]) for b in PARIS_BLACKLIST if b.startswith(prefix)}
    candidates = np.array([k for k in range(1, 1000 + 10 * n) if k not in taken])
    rng = np.random.default_rng(derive_seed(seed, TAG, dataset, lm, "names"))
    return [f"{prefix}{int(k):06d}" for k in rng.choice(candidates, n, replace=False)]


def _distractor_names(seed: int, dataset: str, n: int) -> list[str]:
    prefix = "paris_general_" if dataset == "paris6k" else "oxford_"
    rng = np.random.default_rng(derive_seed(seed, TAG, dataset, "distractor-names"))
    return [f"{prefix}{int(k):06d}" for k in rng.choice(np.arange(1, 2000 + 10 * n), n,
                                                        replace=False)]


def _relative(dataset: str, name: str, lm: str | None) -> str:
    if dataset == "paris6k":
        return f"paris/{lm or PARIS_DISTRACTOR_FOLDER}/{name}.jpg"
    return f"{name}.jpg"


@functools.lru_cache(maxsize=64)
def _photo(photo: str, k: int) -> Image.Image:
    """The photo as RGB, reduced ``k`` times (box filter) when ``k > 1``."""
    if k > 1:
        full = _photo(photo, 1)
        return full.resize((max(1, round(full.size[0] / k)), max(1, round(full.size[1] / k))),
                           Image.Resampling.BOX)
    package, name = photo.split(":", 1)
    try:
        if package == "skimage":
            path = importlib.resources.files("skimage") / "data" / name
        else:
            path = importlib.resources.files("sklearn") / "datasets" / "images" / name
        with path.open("rb") as f, Image.open(f) as im:
            return im.convert("RGB")
    except ModuleNotFoundError:
        pip = "scikit-image" if package == "skimage" else "scikit-learn"
        raise UserError(f"embedded retrieval needs the photos bundled with {pip}; install it "
                        f"(pip install {pip}).") from None
    except OSError as e:
        raise UserError(f"embedded retrieval: cannot read the bundled photo {photo} ({e}); "
                        f"reinstall the package that ships it.") from None


def _write(path: Path, text: str) -> None:
    """Plain writes: ``embedded.build_role`` builds in a temp folder renamed at the end."""
    path.write_text(text, encoding="utf-8")


def _validate(dataset, seed, n_landmarks, queries_per_landmark, views_per_landmark,
              n_distractors, max_side) -> None:
    if dataset not in DATASETS:
        raise UserError(f"embedded retrieval: unknown dataset {dataset!r}; use one of "
                        f"{', '.join(DATASETS)}.")
    for name, value, lo, hi in (("seed", seed, 0, 2 ** 63 - 1),
                                ("n_landmarks", n_landmarks, 2, 11),
                                ("queries_per_landmark", queries_per_landmark, 1, 50),
                                ("views_per_landmark", views_per_landmark, 1, 1000),
                                ("n_distractors", n_distractors, 0, 100000),
                                ("max_side", max_side, 64, 4096)):
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise UserError(f"embedded retrieval: {name} must be an integer in [{lo}, {hi}], "
                            f"got {value!r}.")
