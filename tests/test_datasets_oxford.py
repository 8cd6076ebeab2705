"""Oxford5k / Paris6k readers (DATA_FORMATS.md B.4 + B.5 "Fixture (minimal)") on hand-written
fixtures in the official formats.

Original Oxford: 12 tiny JPEGs (two with .JPG / .jpeg), 2 queries (``all_souls_1`` with the
``oxc1_`` prefix, ``ashmolean_2`` without), one empty ok file, one blank-line-only file, one
good name repeated and one ok name absent from jpg/. Original Paris: nested and flat images,
the corrupted ``paris_louvre_000136`` present (as garbage bytes: it must never be opened) and
``paris_louvre_000146`` absent, both in the gt. Revisited: a gnd pickle whose imlist is not
sorted, written with several protocols, with numpy arrays, and as a hand-made Python-2 pickle.
"""
from __future__ import annotations

import collections
import copy
import datetime
import os
import pickle
import struct
from dataclasses import FrozenInstanceError
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcbench.core import UserError
from evaluations.datasets import oxford
from evaluations.datasets.oxford import (GND_FILES, ORIGINAL_ROLES, PARIS_CORRUPT,
                                         RETRIEVAL_ROLES, REVISITED_ROLES, WHITENING_ROLE,
                                         find_images, load_gnd, read_retrieval)

W, H = 40, 30
OXFORD_NAMES = sorted([f"all_souls_{i:06d}" for i in range(6)]
                      + [f"ashmolean_{i:06d}" for i in range(3)]
                      + ["balliol_000000", "balliol_000001", "bodleian_000000"])


def jpeg(path: Path, size: tuple[int, int] = (W, H)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path, "JPEG")
    return path


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def oxford_jpg(jpg: Path) -> None:
    for name in OXFORD_NAMES:
        ext = {"balliol_000000": ".JPG", "balliol_000001": ".jpeg"}.get(name, ".jpg")
        jpeg(jpg / f"{name}{ext}", (50, 60) if name == "ashmolean_000000" else (W, H))


@pytest.fixture
def oxford_root(tmp_path: Path) -> Path:
    root = tmp_path / "oxford5k"
    oxford_jpg(root / "jpg")
    lab = root / "lab"
    write(lab / "ashmolean_2_query.txt", "ashmolean_000000 0 0 50 60\n")
    write(lab / "ashmolean_2_good.txt", "ashmolean_000002\nashmolean_000000\n")
    write(lab / "ashmolean_2_ok.txt", "\n\n")
    write(lab / "ashmolean_2_junk.txt", "balliol_000000\r\n")
    write(lab / "all_souls_1_query.txt", "oxc1_all_souls_000001 1.5 2.25 39.5 29.75\n")
    write(lab / "all_souls_1_good.txt", "all_souls_000001\nall_souls_000003\nall_souls_000001\n")
    write(lab / "all_souls_1_ok.txt", "all_souls_000004\nall_souls_000999\n")
    write(lab / "all_souls_1_junk.txt", "")
    return root


@pytest.fixture
def paris_root(tmp_path: Path) -> Path:
    root = tmp_path / "paris6k"
    jpg = root / "jpg"
    for name in ("paris_defense_000000", "paris_defense_000001"):
        jpeg(jpg / "paris" / "defense" / f"{name}.jpg")
    jpeg(jpg / "paris" / "louvre" / "paris_louvre_000000.jpg")
    write(jpg / "paris" / "louvre" / "paris_louvre_000136.jpg", b"corrupted, not a JPEG")
    jpeg(jpg / "paris_eiffel_000000.jpg")
    lab = root / "lab"
    write(lab / "defense_1_query.txt", "paris_defense_000000 2 3 30 20\n")
    write(lab / "defense_1_good.txt",
          "paris_defense_000001\nparis_louvre_000136\nparis_louvre_000146\n")
    write(lab / "defense_1_ok.txt", "paris_defense_000000\n")
    write(lab / "defense_1_junk.txt", "paris_louvre_000000\n")
    return root


IMLIST = ["all_souls_000005", "all_souls_000000", "ashmolean_000001", "all_souls_000003",
          "balliol_000000", "bodleian_000000"]
QIMLIST = ["all_souls_000001", "ashmolean_000000"]


def gnd_data() -> dict:
    return {"imlist": list(IMLIST), "qimlist": list(QIMLIST),
            "gnd": [{"bbx": [1.5, 2.0, 38.25, 29.0], "easy": [3, 1], "hard": [], "junk": [0]},
                    {"bbx": [0, 0, 50, 60], "easy": [2], "hard": [5, 4], "junk": []}]}


def dump(path: Path, obj, protocol: int = pickle.DEFAULT_PROTOCOL) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


@pytest.fixture
def roxford_root(tmp_path: Path) -> Path:
    root = tmp_path / "roxford5k"
    oxford_jpg(root / "jpg")
    dump(root / "gnd_roxford5k.pkl", gnd_data())
    return root


def raises(match_path: Path, fn, *args) -> str:
    with pytest.raises(UserError) as e:
        fn(*args)
    msg = str(e.value)
    assert str(match_path) in msg, msg
    return msg


# --------------------------------------------------------------------------- constants


def test_roles_whitening_and_blacklist():
    assert RETRIEVAL_ROLES == ORIGINAL_ROLES + REVISITED_ROLES
    assert all(WHITENING_ROLE[WHITENING_ROLE[r]] == r != WHITENING_ROLE[r]
               for r in RETRIEVAL_ROLES)
    assert WHITENING_ROLE["oxford5k"] == "paris6k" and WHITENING_ROLE["roxford5k"] == "rparis6k"
    assert dict(GND_FILES) == {"roxford5k": "gnd_roxford5k.pkl", "rparis6k": "gnd_rparis6k.pkl"}
    assert len(PARIS_CORRUPT) == 20 and all(n.startswith("paris_") for n in PARIS_CORRUPT)
    assert {"paris_louvre_000146", "paris_museedorsay_001059",
            "paris_triomphe_000867"} <= PARIS_CORRUPT


# --------------------------------------------------------------------------- find_images


def test_find_images_recursive_any_case_skips_others(tmp_path: Path):
    jpg = tmp_path / "jpg"
    a = jpeg(jpg / "b" / "deep" / "x_2.JPEG")
    b = jpeg(jpg / "x_1.Jpg")
    write(jpg / "._x_3.jpg", b"macOS fork")
    write(jpg / ".hidden" / "x_4.jpg", b"hidden folder")
    write(jpg / "notes.txt", "not an image")
    jpeg(jpg / "x_5.png")
    assert find_images(jpg) == {"x_1": b, "x_2": a}
    assert list(find_images(jpg)) == ["x_1", "x_2"]


def test_find_images_duplicate_stem_names_both(tmp_path: Path):
    jpg = tmp_path / "jpg"
    first = jpeg(jpg / "paris" / "a" / "same.jpg")
    second = jpeg(jpg / "same.jpeg")
    msg = raises(first, find_images, jpg)
    assert str(second) in msg


def test_find_images_missing_folder(tmp_path: Path):
    raises(tmp_path / "nope", find_images, tmp_path / "nope")


# --------------------------------------------------------------------------- original protocol


def test_oxford_database_is_every_image_sorted(oxford_root: Path):
    ds = read_retrieval(oxford_root, "oxford5k")
    assert (ds.role, ds.root, ds.protocol, ds.excluded) == ("oxford5k", oxford_root,
                                                            "original", ())
    assert ds.images == tuple(OXFORD_NAMES) and len(ds) == 12
    assert [p.stem for p in ds.paths] == list(ds.images)
    assert ds.paths[ds.images.index("balliol_000000")].name == "balliol_000000.JPG"
    assert all(p.is_file() and p.parent == oxford_root / "jpg" for p in ds.paths)


def test_oxford_queries_sorted_prefix_stripped_boxes_floats(oxford_root: Path):
    q1, q2 = read_retrieval(str(oxford_root), "oxford5k").queries
    assert (q1.name, q1.image, q1.path) == ("all_souls_1", "all_souls_000001",
                                            oxford_root / "jpg" / "all_souls_000001.jpg")
    assert q1.box == (1.5, 2.25, 39.5, 29.75)
    assert (q2.name, q2.image, q2.box) == ("ashmolean_2", "ashmolean_000000", (0.0, 0.0, 50.0,
                                                                               60.0))
    assert all(type(v) is float for v in q2.box)


def test_oxford_groups_sorted_deduplicated_missing_names_kept(oxford_root: Path):
    q1, q2 = read_retrieval(oxford_root, "oxford5k").queries
    assert dict(q1.groups) == {"good": ("all_souls_000001", "all_souls_000003"),
                               "ok": ("all_souls_000004", "all_souls_000999"), "junk": ()}
    assert dict(q2.groups) == {"good": ("ashmolean_000000", "ashmolean_000002"), "ok": (),
                               "junk": ("balliol_000000",)}


def test_query_ids_sorted_as_strings(oxford_root: Path):
    lab = oxford_root / "lab"
    for qid in ("b_1", "a_10", "a_2"):
        write(lab / f"{qid}_query.txt", "all_souls_000000 1 1 5 5\n")
        for g in ("good", "ok", "junk"):
            write(lab / f"{qid}_{g}.txt", "")
    names = [q.name for q in read_retrieval(oxford_root, "oxford5k").queries]
    assert names == ["a_10", "a_2", "all_souls_1", "ashmolean_2", "b_1"]


def test_paris_nested_and_corrupted_left_out_but_kept_in_gt(paris_root: Path):
    ds = read_retrieval(paris_root, "paris6k")
    assert ds.images == ("paris_defense_000000", "paris_defense_000001", "paris_eiffel_000000",
                         "paris_louvre_000000")
    assert ds.paths[0] == paris_root / "jpg" / "paris" / "defense" / "paris_defense_000000.jpg"
    assert ds.paths[2] == paris_root / "jpg" / "paris_eiffel_000000.jpg"
    assert ds.excluded == ("paris_louvre_000136",)
    (q,) = ds.queries
    assert (q.name, q.image, q.box) == ("defense_1", "paris_defense_000000", (2.0, 3.0, 30.0,
                                                                            20.0))
    assert q.groups["good"] == ("paris_defense_000001", "paris_louvre_000136",
                                "paris_louvre_000146")


def test_blacklist_applies_to_paris6k_only(paris_root: Path):
    ds = read_retrieval(paris_root, "oxford5k")
    assert "paris_louvre_000136" in ds.images and ds.excluded == ()


def test_only_query_headers_are_opened(oxford_root: Path, monkeypatch):
    write(oxford_root / "jpg" / "bodleian_000007.jpg", b"garbage, never opened")
    opened = []
    real = Image.open
    monkeypatch.setattr(oxford.Image, "open", lambda p, *a, **k: opened.append(Path(p))
                        or real(p, *a, **k))
    ds = read_retrieval(oxford_root, "oxford5k")
    assert sorted(opened) == sorted(q.path for q in ds.queries)
    assert "bodleian_000007" in ds.images


def test_box_within_one_pixel_of_border_is_accepted(oxford_root: Path):
    write(oxford_root / "lab" / "all_souls_1_query.txt",
          f"oxc1_all_souls_000001 -0.9 -1 {W + 0.5} {H + 1}\n")
    q = read_retrieval(oxford_root, "oxford5k").queries[0]
    assert q.box == (-0.9, -1.0, W + 0.5, H + 1.0)


@pytest.mark.parametrize("box", ["-1.5 0 10 10", "0 -2 10 10", f"0 0 {W + 1.5} 10",
                                 f"0 0 10 {H + 2}"])
def test_box_outside_image(oxford_root: Path, box: str):
    query = write(oxford_root / "lab" / "all_souls_1_query.txt", f"oxc1_all_souls_000001 {box}")
    msg = raises(query, read_retrieval, oxford_root, "oxford5k")
    assert "outside" in msg and f"{W}x{H}" in msg
    assert str(oxford_root / "jpg" / "all_souls_000001.jpg") in msg


@pytest.mark.parametrize("box", ["10 5 10 20", "10 5 9 20", "1 20 30 20", "1 20 30 19.5"])
def test_degenerate_box(oxford_root: Path, box: str):
    query = write(oxford_root / "lab" / "all_souls_1_query.txt", f"oxc1_all_souls_000001 {box}")
    assert "degenerate" in raises(query, read_retrieval, oxford_root, "oxford5k")


@pytest.mark.parametrize("text", ["oxc1_all_souls_000001 1 2 3\n",
                                  "oxc1_all_souls_000001 1 2 30 20 7\n",
                                  "oxc1_all_souls_000001 1 two 30 20\n",
                                  "oxc1_all_souls_000001 1 2 nan 20\n",
                                  "", "\n  \n",
                                  "oxc1_all_souls_000001 1 2 30 20\nall_souls_000002 1 2 3 4\n"])
def test_malformed_query_file(oxford_root: Path, text: str):
    query = write(oxford_root / "lab" / "all_souls_1_query.txt", text)
    raises(query, read_retrieval, oxford_root, "oxford5k")


@pytest.mark.parametrize("group", ["good", "ok", "junk"])
def test_missing_gt_file_is_named(oxford_root: Path, group: str):
    gt = oxford_root / "lab" / f"ashmolean_2_{group}.txt"
    gt.unlink()
    assert "does not exist" in raises(gt, read_retrieval, oxford_root, "oxford5k")


def test_gt_line_with_two_names(oxford_root: Path):
    gt = write(oxford_root / "lab" / "all_souls_1_ok.txt", "all_souls_000004 all_souls_000005\n")
    raises(gt, read_retrieval, oxford_root, "oxford5k")


def test_query_image_absent(oxford_root: Path):
    (oxford_root / "jpg" / "ashmolean_000000.jpg").unlink()
    msg = raises(oxford_root / "lab" / "ashmolean_2_query.txt", read_retrieval, oxford_root,
                 "oxford5k")
    assert "'ashmolean_000000'" in msg and str(oxford_root / "jpg") in msg


def test_query_image_corrupt(oxford_root: Path):
    bad = write(oxford_root / "jpg" / "ashmolean_000000.jpg", b"\xff\xd8 truncated nonsense")
    assert "cannot open" in raises(bad, read_retrieval, oxford_root, "oxford5k")


def test_original_layout_errors(tmp_path: Path, oxford_root: Path):
    raises(tmp_path / "absent", read_retrieval, tmp_path / "absent", "oxford5k")
    (oxford_root / "lab").rename(tmp_path / "lab_moved")
    msg = raises(oxford_root / "lab", read_retrieval, oxford_root, "oxford5k")
    assert "gt_files_170407.tgz" in msg
    (tmp_path / "lab_moved").rename(oxford_root / "lab")
    for p in (oxford_root / "lab").glob("*_query.txt"):
        p.unlink()
    assert "_query.txt" in raises(oxford_root / "lab", read_retrieval, oxford_root, "oxford5k")


def test_missing_or_empty_jpg(tmp_path: Path, paris_root: Path):
    jpg = paris_root / "jpg"
    jpg.rename(tmp_path / "jpg_moved")
    assert "paris_1.tgz" in raises(jpg, read_retrieval, paris_root, "paris6k")
    write(jpg / "README.txt", "no images here")
    assert "no .jpg" in raises(jpg, read_retrieval, paris_root, "paris6k")


def test_unknown_role(oxford_root: Path):
    msg = raises(oxford_root, read_retrieval, oxford_root, "holidays")
    assert "'holidays'" in msg and "roxford5k" in msg


def test_results_are_immutable(oxford_root: Path):
    ds = read_retrieval(oxford_root, "oxford5k")
    with pytest.raises(FrozenInstanceError):
        ds.images = ()
    with pytest.raises(FrozenInstanceError):
        ds.queries[0].box = (0, 0, 1, 1)
    with pytest.raises(TypeError):
        ds.queries[0].groups["good"] = ()


# --------------------------------------------------------------------------- revisited protocol


def test_revisited_values_and_order(roxford_root: Path):
    ds = read_retrieval(roxford_root, "roxford5k")
    assert (ds.protocol, ds.excluded, len(ds)) == ("revisited", (), 6)
    assert ds.images == tuple(IMLIST)  # file order, not sorted
    assert [p.stem for p in ds.paths] == IMLIST
    assert ds.paths[IMLIST.index("balliol_000000")].name == "balliol_000000.JPG"
    q1, q2 = ds.queries
    assert (q1.name, q1.image, q1.path) == ("all_souls_000001", "all_souls_000001",
                                            roxford_root / "jpg" / "all_souls_000001.jpg")
    assert q1.box == (1.5, 2.0, 38.25, 29.0)
    assert dict(q1.groups) == {"easy": (3, 1), "hard": (), "junk": (0,)}
    assert q2.box == (0.0, 0.0, 50.0, 60.0) and all(type(v) is float for v in q2.box)
    assert dict(q2.groups) == {"easy": (2,), "hard": (5, 4), "junk": ()}
    assert ds.images[q2.groups["hard"][0]] == "bodleian_000000"


@pytest.mark.parametrize("protocol", [0, 2, 3, 5])
def test_gnd_any_protocol(tmp_path: Path, protocol: int):
    path = dump(tmp_path / "gnd_roxford5k.pkl", gnd_data(), protocol)
    expected = gnd_data()
    expected["gnd"][1]["bbx"] = [0.0, 0.0, 50.0, 60.0]
    assert load_gnd(path) == expected


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_gnd_numpy_arrays_and_scalars_become_python(tmp_path: Path, protocol: int):
    data = gnd_data()
    data["imlist"] = np.array(IMLIST, dtype=object)
    for e in data["gnd"]:
        e["bbx"] = np.array(e["bbx"], dtype=np.float32)
        for g in ("easy", "hard", "junk"):
            e[g] = np.array(e[g], dtype=np.int64)
    data["gnd"][0]["junk"] = [np.int64(0)]
    gnd = load_gnd(dump(tmp_path / "gnd.pkl", data, protocol))
    assert gnd["imlist"] == IMLIST and type(gnd["imlist"]) is list
    assert gnd["gnd"][1]["hard"] == [5, 4] and gnd["gnd"][0]["junk"] == [0]
    assert gnd["gnd"][0]["bbx"] == [1.5, 2.0, 38.25, 29.0]
    values = [v for e in gnd["gnd"] for g in ("easy", "hard", "junk") for v in e[g]]
    assert {type(v) for v in values} == {int}
    assert {type(v) for e in gnd["gnd"] for v in e["bbx"]} == {float}


def _py2_str(s: str | bytes) -> bytes:
    b = s.encode("latin1") if isinstance(s, str) else s
    return b"U" + bytes([len(b)]) + b  # SHORT_BINSTRING: a Python 2 str


def _py2_int64_array(values: list[int]) -> bytes:
    """A numpy int64 array as Python 2 numpy pickled it (protocol 2, data as a str)."""
    raw = struct.pack(f"<{len(values)}q", *values)
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str("b")
            + b"\x87R(K\x01K" + bytes([len(values)]) + b"\x85cnumpy\ndtype\n" + _py2_str("i8")
            + b"K\x00K\x01\x87R(K\x03" + _py2_str("<")
            + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89" + _py2_str(raw) + b"tb")


def _py2_list(items: list[bytes]) -> bytes:
    return b"]" + (b"(" + b"".join(items) + b"e" if items else b"")


def test_gnd_python2_pickle_read_as_latin1(tmp_path: Path):
    entry = (b"}(" + _py2_str("bbx") + _py2_list([b"G" + struct.pack(">d", v)
                                                  for v in (1.5, 2.0, 38.25, 29.0)])
             + _py2_str("easy") + _py2_int64_array([200, 3])  # 200: a byte > 127 in the data
             + _py2_str("hard") + _py2_list([]) + _py2_str("junk") + _py2_list([b"K\x01"]) + b"u")
    names = [f"img_{i:03d}" for i in range(201)]
    blob = (b"\x80\x02}(" + _py2_str("imlist") + _py2_list([_py2_str(n) for n in names])
            + _py2_str("qimlist") + _py2_list([_py2_str("query_caf\xe9")])
            + _py2_str("gnd") + _py2_list([entry]) + b"u.")
    with pytest.raises(UnicodeDecodeError):  # the plain default (ASCII) cannot read it
        pickle.loads(blob)
    gnd = load_gnd(write(tmp_path / "gnd_rparis6k.pkl", blob))
    assert gnd["qimlist"] == ["query_caf\xe9"] and gnd["imlist"] == names
    assert gnd["gnd"] == [{"bbx": [1.5, 2.0, 38.25, 29.0], "easy": [200, 3], "hard": [],
                           "junk": [1]}]


class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_gnd_refuses_code_without_running_it(tmp_path: Path):
    marker = tmp_path / "pwned"
    data = gnd_data()
    data["gnd"][0]["junk"] = [_RunsShell(marker)]
    path = dump(tmp_path / "gnd_roxford5k.pkl", data)
    msg = raises(path, load_gnd, path)
    assert "system" in msg and "Refusing" in msg and oxford.GND_URLS["roxford5k"] in msg
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the payload is live: a plain load runs it
    assert marker.exists()


@pytest.mark.parametrize("value, name", [
    (collections.OrderedDict(a=1), "collections.OrderedDict"),
    (datetime.datetime(2020, 1, 2), "datetime.datetime"),
    (np.random.default_rng(0), "numpy.random"),
])
def test_gnd_refuses_other_globals(tmp_path: Path, value, name: str):
    data = gnd_data()
    data["extra"] = value
    path = dump(tmp_path / "gnd.pkl", data, 2)
    assert name in raises(path, load_gnd, path)


def test_gnd_codecs_only_latin1(tmp_path: Path):
    # protocol-2 bytes are _codecs.encode(text, 'latin1'); any other codec is refused
    blob = pickle.dumps({"imlist": b"xx"}, protocol=2).replace(b"latin1", b"rot_13")
    path = write(tmp_path / "gnd.pkl", blob)
    assert "rot_13" in raises(path, load_gnd, path)


@pytest.mark.parametrize("blob", [b"", b"not a pickle at all", "truncate"])
def test_gnd_corrupt_pickle(tmp_path: Path, blob):
    if blob == "truncate":
        blob = pickle.dumps(gnd_data())[:-20]
    path = write(tmp_path / "gnd_rparis6k.pkl", blob)
    msg = raises(path, load_gnd, path)
    assert "corrupt" in msg and oxford.GND_URLS["rparis6k"] in msg


def _mutate(fn):
    data = gnd_data()
    fn(data)
    return data


BAD_GND = {
    "top-level list": ([1, 2], "not a dict"),
    "missing gnd": (_mutate(lambda d: d.pop("gnd")), "'gnd'"),
    "name not str": (_mutate(lambda d: d["imlist"].__setitem__(2, 7)), "imlist[2] = 7"),
    "empty qimlist": (_mutate(lambda d: d.update(qimlist=[], gnd=[])), "'qimlist'"),
    "repeated name": (_mutate(lambda d: d["imlist"].append("all_souls_000000")), "repeats"),
    "length mismatch": (_mutate(lambda d: d["gnd"].pop()), "1 entries but 'qimlist' has 2"),
    "index too big": (_mutate(lambda d: d["gnd"][1]["hard"].__setitem__(0, 6)),
                      "gnd[1]['hard'][0] = 6 is outside imlist (6 images)"),
    "negative index": (_mutate(lambda d: d["gnd"][0]["junk"].__setitem__(0, -1)),
                       "gnd[0]['junk'][0] = -1 is outside"),
    "float index": (_mutate(lambda d: d["gnd"][0]["easy"].__setitem__(0, 1.0)),
                    "gnd[0]['easy'][0] = 1.0 is not an integer"),
    "group not list": (_mutate(lambda d: d["gnd"][0].__setitem__("easy", 3)), "not a list"),
    "group missing": (_mutate(lambda d: d["gnd"][1].pop("junk")), "no 'junk'"),
    "bbx None": (_mutate(lambda d: d["gnd"][1].__setitem__("bbx", None)),
                 "query 'ashmolean_000000') has no 'bbx'"),
    "bbx missing": (_mutate(lambda d: d["gnd"][0].pop("bbx")), "'all_souls_000001'"),
    "bbx 3 numbers": (_mutate(lambda d: d["gnd"][0].__setitem__("bbx", [1, 2, 3])),
                      "not 4 finite numbers"),
    "bbx inf": (_mutate(lambda d: d["gnd"][0]["bbx"].__setitem__(2, float("inf"))),
                "not 4 finite numbers"),
    "bbx degenerate": (_mutate(lambda d: d["gnd"][0].__setitem__("bbx", [5, 1, 5, 9])),
                       "degenerate"),
    "old protocol": (_mutate(lambda d: [e.update(ok=e.pop("easy") + e.pop("hard"))
                                        for e in d["gnd"]]), "old-protocol"),
}


@pytest.mark.parametrize("case", list(BAD_GND))
def test_gnd_shape_errors(tmp_path: Path, case: str):
    data, expected = BAD_GND[case]
    path = dump(tmp_path / "gnd_roxford5k.pkl", copy.deepcopy(data))
    assert expected in raises(path, load_gnd, path)


def test_revisited_layout_errors(tmp_path: Path, roxford_root: Path, oxford_root: Path):
    gnd = roxford_root / "gnd_roxford5k.pkl"
    msg = raises(roxford_root / "gnd_rparis6k.pkl", read_retrieval, roxford_root, "rparis6k")
    assert GND_FILES["rparis6k"] in msg and oxford.GND_URLS["rparis6k"] in msg
    assert "gnd_roxford5k.pkl" in msg  # says what the folder looks like instead
    assert "lab/" in raises(oxford_root, read_retrieval, oxford_root, "roxford5k")
    msg = raises(roxford_root / "lab", read_retrieval, roxford_root, "oxford5k")
    assert "the roxford5k role's layout" in msg
    msg = raises(roxford_root, read_retrieval, tmp_path, "roxford5k")  # cirtorch's parent folder
    assert "point the roxford5k root there" in msg
    (roxford_root / "jpg").rename(tmp_path / "jpg_moved")
    assert gnd.is_file()
    raises(roxford_root / "jpg", read_retrieval, roxford_root, "roxford5k")


def test_revisited_database_image_absent(roxford_root: Path):
    (roxford_root / "jpg" / "bodleian_000000.jpg").unlink()
    msg = raises(roxford_root / "gnd_roxford5k.pkl", read_retrieval, roxford_root, "roxford5k")
    assert "'bodleian_000000'" in msg


def test_revisited_query_image_absent_or_box_outside(roxford_root: Path):
    data = gnd_data()
    data["gnd"][0]["bbx"] = [1, 2, W + 3, H]
    dump(roxford_root / "gnd_roxford5k.pkl", data)
    msg = raises(roxford_root / "gnd_roxford5k.pkl", read_retrieval, roxford_root, "roxford5k")
    assert "outside" in msg and "'all_souls_000001'" in msg
    (roxford_root / "jpg" / "ashmolean_000000.jpg").unlink()
    dump(roxford_root / "gnd_roxford5k.pkl", gnd_data())
    msg = raises(roxford_root / "gnd_roxford5k.pkl", read_retrieval, roxford_root, "roxford5k")
    assert "'ashmolean_000000'" in msg and "query 1" in msg
