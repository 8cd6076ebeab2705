"""The embedded retrieval suite (Oxford5k / Paris6k formats from real photos): the written files
are parsed here independently (plain text and ``pickle.load``), the ground truth is recomputed
from the recorded geometry, builds are deterministic, the roles share one folder, and a colour
histogram retrieves clearly better than a random ranking."""
from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcbench.core import UserError
from evaluations.datasets import embedded
from evaluations.datasets import embedded_retrieval as er
from evaluations.datasets.embedded import MARKER, BuildParams, build_role

pytest.importorskip("skimage")

OXFORD_NAMES = {"all_souls", "ashmolean", "balliol", "bodleian", "christ_church", "cornmarket",
                "hertford", "keble", "magdalen", "pitt_rivers", "radcliffe_camera"}
PARIS_NAMES = {"defense", "eiffel", "invalides", "louvre", "moulinrouge", "museedorsay",
               "notredame", "pantheon", "pompidou", "sacrecoeur", "triomphe"}
CORRUPT = {"paris_louvre_000136", "paris_pantheon_000284"}
BLACKLIST_NUMBERS = {  # DATA_FORMATS.md B.4
    "louvre": {136, 146}, "moulinrouge": {422}, "museedorsay": {1059}, "notredame": {188},
    "pantheon": {284, 960, 974}, "pompidou": {195, 196, 201, 467, 640},
    "sacrecoeur": {299, 330, 353}, "triomphe": {662, 833, 863, 867}}
GROUPS = ("good", "ok", "junk")
ASPECTS = {(4, 3), (3, 4), (1, 1), (3, 2), (2, 3)}
DEFAULT_MAX_SIDE = 384


# --------------------------------------------------------------------------- independent parsing


def images_of(root: Path) -> dict[str, Path]:
    return {p.stem: p for p in (root / "jpg").rglob("*.jpg")}


def original_gt(root: Path) -> dict[str, dict]:
    """{qid: {"image", "box", "prefixed", "good", "ok", "junk"}} from lab/."""
    out = {}
    for q in sorted((root / "lab").glob("*_query.txt")):
        qid = q.name[: -len("_query.txt")]
        lines = q.read_text().splitlines()
        assert len(lines) == 1, q
        tokens = lines[0].split()
        assert len(tokens) == 5, q
        entry = {"image": tokens[0].removeprefix("oxc1_"),
                 "prefixed": tokens[0].startswith("oxc1_"),
                 "box": tuple(float(t) for t in tokens[1:])}
        for g in GROUPS:
            entry[g] = [ln for ln in (root / "lab" / f"{qid}_{g}.txt").read_text().splitlines()]
        out[qid] = entry
    return out


def builtin_only(obj) -> bool:
    if type(obj) is dict:
        return all(type(k) is str and builtin_only(v) for k, v in obj.items())
    if type(obj) is list:
        return all(builtin_only(v) for v in obj)
    return type(obj) in (str, float, int)


def visible_fraction(rec: dict) -> tuple[float, float]:
    """Recomputed from the recorded geometry: the object box's 48 x 48 cell centres mapped into
    the view with the inverse of the affine map."""
    a, b, c, d, e, f = rec["affine"]
    inv = np.linalg.inv(np.array([[a, b], [d, e]]))
    x0, y0, x1, y1 = rec["object"]
    t = (np.arange(48) + 0.5) / 48
    gx, gy = np.meshgrid(x0 + t * (x1 - x0), y0 + t * (y1 - y0))
    uv = inv @ np.stack([gx.ravel() - c, gy.ravel() - f])
    w, h = rec["size"]
    inside = (uv[0] >= 0) & (uv[0] < w) & (uv[1] >= 0) & (uv[1] < h)
    under = np.zeros_like(inside)
    for ox1, oy1, ox2, oy2 in rec["occluders"]:
        under |= (uv[0] >= ox1) & (uv[0] < ox2) & (uv[1] >= oy1) & (uv[1] < oy2)
    return float((inside & ~under).mean()), float((inside & under).mean())


def strength(rec: dict) -> int:
    """The strongest level (0, 1, 2) of the recorded transforms (the module's docstring rules)."""
    a, _, _, d, _, _ = rec["affine"]
    s = 1 / math.hypot(a, d)
    x0, y0, x1, y1 = rec["object"]
    apparent = s * max(x1 - x0, y1 - y0) / max(rec["size"])
    p = rec["photometric"]
    factor = max(max(v, 1 / v) for v in (p["brightness"], p["contrast"], p["gamma"],
                                        *p["colour"]))

    def level(x, lo, hi):
        return 0 if x <= lo else 1 if x <= hi else 2
    return max(level(abs(rec["rotation"]), 3, 8), int(rec["flip"]),
               0 if apparent >= 0.4 else 1 if apparent >= 0.25 else 2,
               level(factor, 1.15, 1.4), level(p["blur"], 0.8, 1.6))


def classes(visible: float, occluded: float, strong: int) -> tuple[str, str]:
    if visible <= 0:
        return "none", "none"
    if visible < 0.25 or occluded > 0.5:
        return "junk", "junk"
    if visible < 0.6 or strong == 2:
        return "ok", "hard"
    return "good", ("easy" if strong == 0 else "hard")


def compute_ap(ranked: list[str], pos: set[str], amb: set[str]) -> float:
    """Oxford's compute_ap.cpp (DATA_FORMATS.md B.4)."""
    old_recall, old_precision, ap, hits, j = 0.0, 1.0, 0.0, 0, 0
    for name in ranked:
        if name in amb:
            continue
        hits += name in pos
        recall, precision = hits / len(pos), hits / (j + 1)
        ap += (recall - old_recall) * (old_precision + precision) / 2
        old_recall, old_precision = recall, precision
        j += 1
    return ap


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MARKER}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("emb-retrieval")


@pytest.fixture(scope="module")
def roots(cache) -> dict[str, Path]:
    return {ds: build_role(cache, BuildParams(ds)) for ds in ("oxford5k", "paris6k")}


@pytest.fixture(scope="module")
def metadata(roots) -> dict[str, dict]:
    return {ds: json.loads((r / er.METADATA).read_text()) for ds, r in roots.items()}


# --------------------------------------------------------------------------- tests


def test_units_are_real_photo_regions():
    photos = {}
    for ds, units in (("oxford5k", er.OXFORD_UNITS), ("paris6k", er.PARIS_UNITS)):
        assert len(units) == 11
        photos[ds] = {u.photo for u in units} | {u.alt[0] for u in units if u.alt}
    assert not photos["oxford5k"] & photos["paris6k"]  # no photo is a landmark of both
    by_photo: dict[str, list] = {}
    for u in (*er.OXFORD_UNITS, *er.PARIS_UNITS, *er.TEXTURE_UNITS):
        w, h = er.load_photo(u.photo).size
        x0, y0, x1, y1 = u.region
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, u.name
        if u.obj:
            assert x0 <= u.obj[0] < u.obj[2] <= x1 and y0 <= u.obj[1] < u.obj[3] <= y1, u.name
        for other in by_photo.get(u.photo, []):  # parts of one photo do not overlap
            assert (min(x1, other[2]) <= max(x0, other[0])
                    or min(y1, other[3]) <= max(y0, other[1])), u.name
        by_photo.setdefault(u.photo, []).append(u.region)
    moto = er.PARIS_UNITS[2]
    left = np.asarray(er.load_photo(moto.photo).convert("L"), dtype=float)
    right = np.asarray(er.load_photo(moto.alt[0]).convert("L"), dtype=float)
    crop = lambda im, b: im[b[1]:b[3], b[0]:b[2]]  # noqa: E731
    same = np.abs(crop(left, moto.obj) - crop(right, moto.alt[2])).mean()
    unshifted = np.abs(crop(left, moto.obj) - crop(right, moto.obj)).mean()
    assert same < 0.5 * unshifted  # the shifted box shows the same object in the right photo


def test_oxford_files(roots):
    root = roots["oxford5k"]
    found = images_of(root)
    assert all(p.parent == root / "jpg" for p in found.values())  # flat
    gt = original_gt(root)
    assert len(gt) == 8 * 3 and len(found) == 8 * 15 + 60
    landmarks = {qid.rsplit("_", 1)[0] for qid in gt}
    assert landmarks == set(sorted(OXFORD_NAMES)[:8])
    for name in found:
        m = re.fullmatch(r"(.+)_(\d{6})", name)
        assert m and (m[1] in landmarks or m[1] == "oxford"), name
    for qid, q in gt.items():
        lm = qid.rsplit("_", 1)[0]
        assert q["prefixed"] and q["image"].startswith(lm + "_")
        assert q["image"] in q["good"]  # the query image is a good positive of its own query
        for g in GROUPS:
            assert all(n in found and n.startswith(lm + "_") for n in q[g])
        assert not (set(q["good"]) & set(q["ok"]) or set(q["good"]) & set(q["junk"])
                    or set(q["ok"]) & set(q["junk"]))
    check_images_and_boxes(root, gt, found)


def test_paris_files(roots):
    root = roots["paris6k"]
    found = images_of(root)
    gt = original_gt(root)
    assert len(gt) == 8 * 3 and len(found) == 8 * 15 + 60 + 2
    landmarks = {qid.rsplit("_", 1)[0] for qid in gt}
    assert landmarks <= PARIS_NAMES and {"louvre", "pantheon"} <= landmarks
    for name, path in found.items():
        m = re.fullmatch(r"paris_([a-z]+)_(\d{6})", name)
        assert m and path.relative_to(root / "jpg").parts == ("paris", m[1], f"{name}.jpg")
        assert m[1] in landmarks or m[1] == "general", name
        if name not in CORRUPT:  # no readable image carries a blacklisted name
            assert int(m[2]) not in BLACKLIST_NUMBERS.get(m[1], set()), name
    assert CORRUPT <= set(found)
    for name in CORRUPT:
        assert found[name].stat().st_size == 200
        with pytest.raises(OSError):
            with Image.open(found[name]) as im:
                im.load()
    for qid, q in gt.items():
        lm = qid.rsplit("_", 1)[0]
        assert not q["prefixed"] and q["image"].startswith(f"paris_{lm}_")
        listed = set(q["good"]) | set(q["ok"])
        for name in CORRUPT:  # counted as positives of their landmark, nowhere else
            assert (name in listed) == (name.split("_")[1] == lm)
        for g in GROUPS:
            assert all(n in found and n.startswith(f"paris_{lm}_") for n in q[g])
        assert not (set(q["good"]) & set(q["ok"]) or set(q["good"]) & set(q["junk"])
                    or set(q["ok"]) & set(q["junk"]))
    check_images_and_boxes(root, gt, found)


def check_images_and_boxes(root: Path, gt: dict, found: dict[str, Path]) -> None:
    low = math.ceil(0.6 * DEFAULT_MAX_SIDE)
    for name, path in found.items():
        if name in CORRUPT:
            continue
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            w, h = im.size
        assert low <= max(w, h) <= DEFAULT_MAX_SIDE, name
        g = math.gcd(w, h)
        assert (w // g, h // g) in ASPECTS, (name, w, h)
    for qid, q in gt.items():
        with Image.open(found[q["image"]]) as im:
            w, h = im.size
        x1, y1, x2, y2 = q["box"]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, qid
        assert max(x2 - x1, y2 - y1) > 0.35 * max(w, h)  # the object is well visible


@pytest.mark.parametrize("dataset", ["oxford5k", "paris6k"])
def test_revisited_pickle(roots, dataset):
    root = roots[dataset]
    path = root / er.GND_FILES[dataset]
    raw = path.read_bytes()
    assert raw[:2] == b"\x80\x04"  # protocol 4
    gnd = pickle.loads(raw)
    assert builtin_only(gnd) and set(gnd) == {"imlist", "qimlist", "gnd"}
    found = images_of(root)
    gt = original_gt(root)
    qids = sorted(gt)
    queries = [gt[q]["image"] for q in qids]
    assert gnd["qimlist"] == queries  # in the order of the sorted lab/ query ids
    assert len(gnd["gnd"]) == len(gnd["qimlist"])
    assert all(n in found for n in gnd["qimlist"])
    assert not set(gnd["qimlist"]) & set(gnd["imlist"])
    assert set(gnd["imlist"]) == set(found) - set(queries) - CORRUPT
    assert len(set(gnd["imlist"])) == len(gnd["imlist"])
    n = len(gnd["imlist"])
    for qid, entry in zip(qids, gnd["gnd"]):
        assert set(entry) == {"bbx", "easy", "hard", "junk"}
        assert entry["bbx"] == list(gt[qid]["box"]) and all(type(v) is float
                                                            for v in entry["bbx"])
        sets = {g: set(entry[g]) for g in ("easy", "hard", "junk")}
        assert all(0 <= i < n for s in sets.values() for i in s)
        assert not (sets["easy"] & sets["hard"] or sets["easy"] & sets["junk"]
                    or sets["hard"] & sets["junk"])
        names = {g: {gnd["imlist"][i] for i in s} for g, s in sets.items()}
        gone = set(queries) | CORRUPT
        pos = set(gt[qid]["good"]) | set(gt[qid]["ok"])
        assert names["easy"] | names["hard"] == pos - gone  # same positives, re-split
        assert names["junk"] == set(gt[qid]["junk"]) - gone
        assert set(gt[qid]["ok"]) - gone <= names["hard"]


@pytest.mark.parametrize("dataset", ["oxford5k", "paris6k"])
def test_ground_truth_recomputed_from_geometry(roots, metadata, dataset):
    root, meta = roots[dataset], metadata[dataset]
    gt = original_gt(root)
    gnd = pickle.loads((root / er.GND_FILES[dataset]).read_bytes())
    listed = {lm: {g: set(gt[f"{lm}_1"][g]) for g in GROUPS} for lm in meta["landmarks"]}
    revisited = {g: {gnd["imlist"][i] for i in gnd["gnd"][0][g]} for g in ("easy", "hard",
                                                                           "junk")}
    first_lm = sorted(gt)[0].rsplit("_", 1)[0]
    counts: dict[str, int] = {}
    for name, rec in meta["images"].items():
        assert (root / rec["path"]).is_file()
        if rec["kind"] == "distractor":
            assert rec["landmark"] is None and rec["original"] == "none"
            assert rec["unit"] not in {meta["landmarks"][lm]["unit"] for lm in meta["landmarks"]}
            continue
        visible, occluded = visible_fraction(rec)
        assert abs(visible - rec["visible"]) <= 2 / 48 ** 2
        assert abs(occluded - rec["occluded"]) <= 2 / 48 ** 2
        near = any(abs(visible - t) < 0.01 for t in (0.25, 0.6)) or abs(occluded - 0.5) < 0.01
        original, rev = classes(visible, occluded, strength(rec))
        if not near:
            assert (original, strength(rec)) == (rec["original"], rec["strength"]), name
        lm = rec["landmark"]
        for g in GROUPS:  # the lab files hold exactly the recorded classes
            assert (name in listed[lm][g]) == (rec["original"] == g), name
        if rec["kind"] == "view" and not near:
            assert rev == rec["revisited"], name
        if lm == first_lm and rec["kind"] == "view":
            assert (name in revisited.get(rec["revisited"], ())) == (rec["revisited"] != "none")
        if rec["kind"] in ("query", "corrupt"):
            assert rec["original"] == "good" and rec["strength"] == 0
            assert rec["visible"] >= 0.9 and not rec["occluders"]
        counts[rec["original"]] = counts.get(rec["original"], 0) + 1
    assert all(counts.get(c, 0) > 0 for c in ("good", "ok", "junk"))
    if dataset == "paris6k":  # the stereo pair's right photo gives real second views
        defense = [r for r in meta["images"].values() if r["landmark"] == "defense"]
        assert any(r["photo"].endswith("motorcycle_right.png") and r["original"] != "none"
                   for r in defense)


def test_builds_are_deterministic(roots, tmp_path):
    for dataset, root in roots.items():  # the role's build = a direct build with defaults
        er.build_retrieval(tmp_path / dataset, dataset)
        assert tree_bytes(tmp_path / dataset) == tree_bytes(root)
    other = tmp_path / "other-seed"
    er.build_retrieval(other, "paris6k", seed=1, n_landmarks=2, views_per_landmark=3,
                       n_distractors=4)
    small = tree_bytes(other)
    assert small != tree_bytes(roots["paris6k"])
    assert len([k for k in small if k.startswith("lab/") and k.endswith("_query.txt")]) == 6


def test_roles_share_one_folder_built_once(cache, roots):
    for original, revisited in (("oxford5k", "roxford5k"), ("paris6k", "rparis6k")):
        before = {p: p.stat().st_mtime_ns for p in roots[original].rglob("*")}
        again = build_role(cache, BuildParams(revisited))
        assert again == roots[original] and again.name.startswith(f"{original}-")
        assert build_role(cache, BuildParams(original)) == again
        assert {p: p.stat().st_mtime_ns for p in again.rglob("*")} == before  # not rebuilt
        assert embedded.DATASET_NAMES[revisited] == f"embedded/{revisited}-format"
        marker = json.loads((again / MARKER).read_text())
        assert marker["params"]["role"] == original
    assert not list(cache.glob(".tmp.*"))
    smaller = build_role(cache, BuildParams("roxford5k", retrieval_max_side=96))
    assert smaller != roots["oxford5k"]
    with Image.open(next((smaller / "jpg").glob("*.jpg"))) as im:
        assert max(im.size) <= 96


def test_other_roles_keep_their_folder_keys():
    """The retrieval fields must not change the keys of the roles built before them."""
    for role, fields in (("imagenet", ("n_train_per_class", "n_val_per_class", "size")),
                         ("places", ("n_train_per_class", "n_val_per_class", "size")),
                         ("voc07", ("voc_trainval", "voc_test", "voc_size")),
                         ("voc12", ("voc_trainval", "voc_size"))):
        p = BuildParams(role)
        old = {"role": role, **{k: getattr(p, k) for k in fields}, "version": 1}
        assert p.key() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("dataset", ["oxford5k", "paris6k"])
def test_pixel_descriptor_beats_random(roots, dataset):
    """A colour histogram of the query crop retrieves far better than a random ranking."""
    root = roots[dataset]
    found = {n: p for n, p in images_of(root).items() if n not in CORRUPT}
    names = sorted(found)

    def hist(im: Image.Image) -> np.ndarray:
        a = np.asarray(im.convert("RGB").resize((48, 48)), dtype=np.int64) // 32
        h = np.bincount((a[..., 0] * 64 + a[..., 1] * 8 + a[..., 2]).ravel(), minlength=512)
        return np.sqrt(h / h.sum())

    db = np.stack([hist(Image.open(found[n])) for n in names])
    rng = np.random.default_rng(0)
    aps, random_aps = [], []
    for q in original_gt(root).values():
        scores = db @ hist(Image.open(found[q["image"]]).crop(q["box"]))
        pos, amb = set(q["good"]) | set(q["ok"]), set(q["junk"])
        aps.append(compute_ap([names[i] for i in np.argsort(-scores, kind="stable")], pos, amb))
        random_aps.append(compute_ap([names[i] for i in rng.permutation(len(names))], pos, amb))
    assert np.mean(aps) > 3 * np.mean(random_aps) and np.mean(aps) > np.mean(random_aps) + 0.25
    assert np.mean(aps) < 0.9  # not trivial either


def test_official_reader_accepts_the_build(roots):
    from evaluations.datasets.oxford import read_retrieval

    for role, dataset in (("oxford5k", "oxford5k"), ("roxford5k", "oxford5k"),
                          ("paris6k", "paris6k"), ("rparis6k", "paris6k")):
        s = read_retrieval(roots[dataset], role)
        assert len(s.queries) == 24
        extra = 2 if dataset == "paris6k" else 0
        assert len(s) == (8 * 15 + 60 if role == dataset else 8 * 12 + 60)
        assert len(s.excluded) == (extra if role == "paris6k" else 0)


@pytest.mark.parametrize("kwargs, match", [
    ({"dataset": "holidays"}, "holidays"),
    ({"n_landmarks": 1}, "n_landmarks.*1"),
    ({"n_landmarks": 12}, "n_landmarks.*12"),
    ({"queries_per_landmark": 0}, "queries_per_landmark.*0"),
    ({"views_per_landmark": True}, "views_per_landmark.*True"),
    ({"n_distractors": -1}, "n_distractors.*-1"),
    ({"max_side": 32}, "max_side.*32"),
    ({"seed": 1.5}, "seed.*1.5"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    args = {"dataset": "oxford5k", **kwargs}
    with pytest.raises(UserError, match=match):
        er.build_retrieval(tmp_path / "x", **args)
    assert not (tmp_path / "x").exists()


def test_bad_root_and_role_settings(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(UserError, match="not an empty folder"):
        er.build_retrieval(tmp_path / "full", "paris6k")
    with pytest.raises(UserError, match="retrieval_max_side.*10"):
        build_role(tmp_path, BuildParams("rparis6k", retrieval_max_side=10))
    with pytest.raises(UserError, match="retrieval_max_sid"):
        embedded.build_embedded(tmp_path, roles=("oxford5k",), retrieval_max_sid=100)
