"""The embedded suite: built once, atomically, in the official formats, and read back by the
real readers with pixels and labels equal to the source arrays (read here independently)."""
from __future__ import annotations

import gzip
import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from evaluations.datasets import embedded
from evaluations.datasets.common import read_datasets_file
from evaluations.datasets.embedded import (MARKER, BuildParams, build_embedded, build_role,
                                           embedded_datasets)
from evaluations.datasets.imagenet import imagenet_split
from evaluations.datasets.places205 import places205_split
from dcbench.core import UserError

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not FMNIST.is_dir(), reason=f"{FMNIST} not installed")
N_TRAIN, N_VAL = 5, 3


def idx_file(name: str) -> np.ndarray:
    """Independent IDX reader (uint8; 16-byte image header, 8-byte label header)."""
    data = gzip.decompress((FMNIST / name).read_bytes())
    return np.frombuffer(data, np.uint8, offset=16 if "images" in name else 8)


def first_n(labels: np.ndarray, n: int) -> set[int]:
    out: dict[int, list[int]] = {}
    for i, c in enumerate(labels.tolist()):
        if len(out.setdefault(c, [])) < n:
            out[c].append(i)
    return {i for v in out.values() for i in v}


def tree_state(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


@pytest.fixture(scope="module")
def places_root(tmp_path_factory) -> Path:
    return build_role(tmp_path_factory.mktemp("emb-places"), BuildParams("places", N_TRAIN, N_VAL,
                                                                         None))


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    if not FMNIST.is_dir():
        pytest.skip(f"{FMNIST} not installed")
    cache = tmp_path_factory.mktemp("emb-suite")
    return cache, build_embedded(cache, N_TRAIN, N_VAL)


@needs_fmnist
def test_imagenet_role_reads_back_fashion_mnist(suite):
    _, roots = suite
    root = roots["imagenet"]
    for split, prefix, n in (("train", "train", N_TRAIN), ("val", "t10k", N_VAL)):
        images = idx_file(f"{prefix}-images-idx3-ubyte.gz").reshape(-1, 28, 28)
        labels = idx_file(f"{prefix}-labels-idx1-ubyte.gz")
        s = imagenet_split(root, split)
        assert s.layout == "imagefolder"
        assert s.classes == [f"n{i:08d}" for i in range(10)]
        assert len(s) == 10 * n and np.bincount(s.labels).tolist() == [n] * 10
        source = {int(p.stem.rsplit("_", 1)[1]): lab for p, lab in s.samples}
        assert set(source) == first_n(labels, n)  # first n per class in file order
        assert all(labels[i] == lab for i, lab in source.items())
        ds = s.dataset()
        for k in (0, 7, len(s) - 1):
            img, lab, _ = ds[k]
            i = int(s.samples[k][0].stem.rsplit("_", 1)[1])
            a = np.asarray(img)
            assert img.mode == "RGB" and a.shape == (28, 28, 3)
            assert (a[:, :, 0] == images[i]).all() and lab == labels[i]  # lossless PNG
    names = dict(ln.split(" ", 1) for ln in (root / "synset_words.txt").read_text().splitlines())
    assert names["n00000009"] == "Ankle boot" and names["n00000000"] == "T-shirt/top"


def test_places_role_reads_back_digits(places_root):
    digits = load_digits()
    ref = np.rint(digits.images * 255 / 16)
    by_name = {f"gsun_{hashlib.md5(f'sklearn-digits-{i}'.encode()).hexdigest()}": i
               for i in range(len(digits.target))}
    train, val = places205_split(places_root, "train"), places205_split(places_root, "val")
    assert train.layout == "split-files" and len(train) == 10 * N_TRAIN and len(val) == 10 * N_VAL
    assert train.classes[7] == "digit_seven/outdoor" and train.classes[0] == "digit_zero"
    assert np.bincount(val.labels).tolist() == [N_VAL] * 10
    src_train = {by_name[p.stem] for p, _ in train.samples}
    src_val = {by_name[p.stem] for p, _ in val.samples}
    assert src_train | src_val == first_n(digits.target, N_TRAIN + N_VAL)
    assert not src_train & src_val
    for s in (train, val):
        assert all(digits.target[by_name[p.stem]] == lab for p, lab in s.samples)
        ds = s.dataset()
        for k in range(0, len(s), 7):
            img, lab, _ = ds[k]
            a = np.asarray(img)[:, :, 0].astype(float)
            assert a.shape == (32, 32)
            blocks = a.reshape(8, 4, 8, 4).mean(axis=(1, 3))
            assert np.abs(blocks - ref[by_name[s.samples[k][0].stem]]).max() <= 4  # JPEG q95
    assert any("/digit_seven/outdoor/" in p.as_posix() for p, _ in train.samples)


@needs_fmnist
def test_second_build_rewrites_nothing(suite):
    cache, roots = suite
    before = {role: tree_state(r) for role, r in roots.items()}
    again = build_embedded(cache, N_TRAIN, N_VAL)
    assert again == roots
    assert {role: tree_state(r) for role, r in again.items()} == before
    assert not list(cache.glob(".tmp.*"))


def test_datasets_file(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "ROLES", ("places",))
    roots = embedded_datasets(tmp_path, 2, 1)
    f = tmp_path / "datasets.toml"
    assert read_datasets_file(f) == roots
    mtime = f.stat().st_mtime_ns
    assert embedded_datasets(tmp_path, 2, 1) == roots and f.stat().st_mtime_ns == mtime


def test_other_parameters_get_their_own_root(places_root):
    cache = places_root.parent
    other = build_role(cache, BuildParams("places", 2, 1, 16))
    assert other != places_root and len(places205_split(other, "val")) == 10
    img, _, _ = places205_split(other, "train").dataset()[0]
    assert img.size == (16, 16)


def test_stale_temp_and_half_built_dirs_are_not_trusted(tmp_path):
    params = BuildParams("places", 2, 1, None)
    final = tmp_path / f"places-{params.key()[:12]}"
    host = socket.gethostname()
    crashed = tmp_path / f".tmp.{final.name}.{dead_pid()}.deadbeef.{host}"
    (crashed / "trainvalsplit_places205").mkdir(parents=True)
    (crashed / "trainvalsplit_places205" / "train_places205.csv").write_text("d/x.jpg 0\n")
    foreign = tmp_path / f".tmp.{final.name}.1.cafecafe.some-other-host.example"
    foreign.mkdir()
    # A half-built final folder (e.g. copied by hand): no marker, so never taken as finished.
    (final / "trainvalsplit_places205").mkdir(parents=True)
    (final / "junk").write_text("half")
    root = build_role(tmp_path, params)
    assert root == final and (root / MARKER).is_file() and not (root / "junk").exists()
    assert not crashed.exists()
    assert foreign.exists()  # another host's build may be alive: left alone
    assert len(places205_split(root, "train")) == 20


def test_crash_during_build_leaves_nothing(tmp_path, monkeypatch):
    def explode(root: Path, params: BuildParams) -> None:
        (root / "partial.jpg").write_bytes(b"x")
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(embedded, "_BUILDERS", {"places": explode, "imagenet": explode})
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_role(tmp_path, BuildParams("places", 2, 1, None))
    assert os.listdir(tmp_path) == []


@needs_fmnist
def test_imagenet_role_can_take_a_larger_val_split(tmp_path):
    """imagenet_val_per_class: the first n test images of each class (file order), only for
    the ImageNet role; its own folder; 1..1000 (the test split's size per class)."""
    roots = build_embedded(tmp_path, 2, 1, imagenet_val_per_class=4,
                           roles=("imagenet", "places"))
    labels = idx_file("t10k-labels-idx1-ubyte.gz")
    val = {int(p.stem.rsplit("_", 1)[1]) for p in (roots["imagenet"] / "val").rglob("*.png")}
    assert val == first_n(labels, 4) and len(val) == 40
    assert len(places205_split(roots["places"], "val")) == 10  # n_val_per_class, unchanged
    assert roots["imagenet"] != build_embedded(tmp_path, 2, 1, roles=("imagenet",))["imagenet"]
    for bad in (0, 1001, 2.5, True):
        with pytest.raises(UserError, match="imagenet_val_per_class"):
            build_embedded(tmp_path, 2, 1, imagenet_val_per_class=bad, roles=("imagenet",))


def test_bad_parameters(tmp_path):
    with pytest.raises(UserError, match="174"):
        build_role(tmp_path, BuildParams("places", 170, 10, None))
    with pytest.raises(UserError, match="174"):  # checked before the imagenet role is built
        build_embedded(tmp_path, 1000, 10)
    assert embedded.first_per_class(np.array([0, 1, 0, 1, 1]), 2, 2, "x").tolist() == [0, 1, 2, 3]
    with pytest.raises(UserError, match="only 2 images of class 0"):
        embedded.first_per_class(np.array([0, 1, 0, 1, 1]), 2, 3, "x")
    with pytest.raises(UserError, match="n_val_per_class"):
        build_role(tmp_path, BuildParams("places", 2, 0, None))
    with pytest.raises(UserError, match="role"):
        build_role(tmp_path, BuildParams("voc", 2, 1, None))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("places")]
