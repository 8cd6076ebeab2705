"""The embedded real-image suite, written to disk in the official formats so the real readers run.

Roles and what is written (``<cache_dir>/<role>-<hash12>/``, hash = build parameters):

* ``imagenet``: Fashion-MNIST (Debian ``dataset-fashion-mnist``) in ImageNet layout (a):
  ``train/<wnid>/<wnid>_<index>.png`` from the first ``n_train_per_class`` images of each class
  of the Fashion-MNIST train split (file order) and ``val/<wnid>/fmnist_t10k_<index>.png`` from
  the test split; fake wnids ``n00000000``..``n00000009`` (= the Fashion-MNIST labels 0..9, so
  sorted wnid order = label order) with names in ``synset_words.txt`` (``<wnid> <name>``, the
  format of ``LOC_synset_mapping.txt``). Lossless grey PNGs, 28x28 unless ``size`` is given
  (then BICUBIC-resized). ``<index>`` is the image's index in the source split. With
  ``imagenet_source = "fashion-clutter"`` (the demo suite) or ``"fashion-scenes"`` each item
  is composed at 72 px (RGB PNGs, :func:`pretrain.scenes.compose`): train image
  ``<index>`` is the very image ``python -m pretrain --dataset <source>`` trains on.
* ``places``: scikit-learn's ``load_digits`` (8x8, 17 grey levels scaled to 0..255) in the
  official Places205 split-file layout: ``trainvalsplit_places205/{train,val}_places205.csv``
  and ``data/vision/torralba/deeplearning/images256/d/digit_<name>[/outdoor]/gsun_<32hex>.jpg``
  (quality-95 grey JPEGs, NEAREST-upsampled to 32x32 unless ``size`` is given; ``digit_seven``
  has the sub-level ``outdoor``). Label = digit value; per class the first
  ``n_train_per_class`` images in file order go to train, the next ``n_val_per_class`` to val
  (the rarest digit has 174 images, so their sum must be <= 174). ``<32hex>`` = md5 of
  ``sklearn-digits-<index>``.
* ``voc07`` / ``voc12``: the VOC-format scenes of :mod:`.embedded_voc`.
* ``oxford5k`` / ``paris6k`` (original protocol: ``jpg/`` + ``lab/``) and ``roxford5k`` /
  ``rparis6k`` (revisited: the gnd pickle): views of real photos bundled with scikit-image and
  scikit-learn, from :mod:`.embedded_retrieval` (default sizes: 8 landmarks x (3 queries + 12
  views) + 60 distractors; long sides up to ``retrieval_max_side``). One folder holds both
  protocols of a dataset (``jpg/``, ``lab/``, ``gnd_r*.pkl``), so ``roxford5k`` resolves to the
  ``oxford5k`` folder and ``rparis6k`` to the ``paris6k`` one (:data:`SHARED_BUILD`).

Construction is idempotent and atomic: a role is built in ``<cache_dir>/.tmp.<name>.<pid>.
<uuid>.<host>``, a marker ``.embedded-complete.json`` holding the parameters and their hash is
written last, and the folder is renamed into place. Only a folder with a matching marker counts
as built; a leftover temp folder of a dead process on this host (or older than a day) is
deleted, any other is ignored.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image
from tqdm import tqdm

from pretrain.data import FASHION_MNIST_CLASSES, fashion_mnist
from pretrain.config import EMBEDDED_DATASETS
from pretrain.scenes import compose
from dcbench.core import UserError, atomic_write, pid_alive

from .common import write_datasets_file
from .oxford import RETRIEVAL_ROLES

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER = ".embedded-complete.json"
TMP_PREFIX = ".tmp."
STALE_AFTER_S = 24 * 3600
ROLES = ("imagenet", "places", "voc07", "voc12", *RETRIEVAL_ROLES)
DATASET_NAMES = MappingProxyType({"imagenet": "embedded/fashion-mnist",
                                  "places": "embedded/sklearn-digits",
                                  "voc07": "embedded/voc2007", "voc12": "embedded/voc2012",
                                  "oxford5k": "embedded/oxford5k-format",
                                  "paris6k": "embedded/paris6k-format",
                                  "roxford5k": "embedded/roxford5k-format",
                                  "rparis6k": "embedded/rparis6k-format"})
# roles read from another role's built folder (the revisited gnd pickle sits next to jpg/, lab/)
SHARED_BUILD = MappingProxyType({"roxford5k": "oxford5k", "rparis6k": "paris6k"})
# the build parameters each role depends on (its folder's key hashes these only)
ROLE_PARAMS = MappingProxyType({
    "imagenet": ("n_train_per_class", "n_val_per_class", "imagenet_val_per_class", "size",
                 "imagenet_source"),
    "places": ("n_train_per_class", "n_val_per_class", "size"),
    "voc07": ("voc_trainval", "voc_test", "voc_size"),
    "voc12": ("voc_trainval", "voc_size"),
    **{role: ("retrieval_max_side",) for role in RETRIEVAL_ROLES}})
# added later: in a key only when set to something else than these (the bytes of before)
OPTIONAL_PARAMS = MappingProxyType({"imagenet_val_per_class": (None,),
                                    "imagenet_source": (None, "fashion-mnist")})
FMNIST_WNIDS = tuple(f"n{i:08d}" for i in range(10))
DIGIT_CATEGORIES = tuple(
    f"d/digit_{n}" + ("/outdoor" if n == "seven" else "")
    for n in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))
PLACES_IMAGES = Path("data/vision/torralba/deeplearning/images256")
DIGITS_SIZE = 32
FMNIST_TEST_PER_CLASS = 1000
DIGITS_MIN_PER_CLASS = 174  # images of digit 8, the rarest class of load_digits


@dataclass(frozen=True)
class BuildParams:
    """Everything that determines the bytes of one built role (each role reads the fields
    :data:`ROLE_PARAMS` names; VOC sizes: images per split, and the image side)."""

    role: str
    n_train_per_class: int = 100
    n_val_per_class: int = 50
    size: int | None = None
    # the ImageNet role's val images per class, when more than n_val_per_class (the
    # Fashion-MNIST test split has 1,000 per class; the digits of 'places' cap that role)
    imagenet_val_per_class: int | None = None
    # the ImageNet role's images: "fashion-mnist" (None: the 28-px grey items) or
    # "fashion-scenes" (each item on a 72-px photo crop, :mod:`pretrain.scenes`: the images
    # ``python -m pretrain --dataset fashion-scenes`` trains on)
    imagenet_source: str | None = None
    voc_trainval: int = 800  # VOC2007 trainval / VOC2012 train+val images
    voc_test: int = 400  # VOC2007 test images
    voc_size: int = 128
    retrieval_max_side: int = 384  # longest image side of the retrieval roles
    version: int = FORMAT_VERSION

    @property
    def composed(self) -> bool:
        """The ImageNet role's images are composed scenes (``imagenet_source``), not items."""
        return self.imagenet_source not in (None, "fashion-mnist")

    def key(self) -> str:
        """The hash of what the role's bytes depend on; an optional setting left unset
        (:data:`OPTIONAL_PARAMS`) is left out, so folders built before it existed keep their key."""
        relevant = {k: getattr(self, k) for k in ("role", *ROLE_PARAMS.get(self.role, ()),
                                                  "version")
                    if getattr(self, k) not in OPTIONAL_PARAMS.get(k, ())}
        relevant["role"] = SHARED_BUILD.get(self.role, self.role)
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def build_embedded(cache_dir: Path, n_train_per_class: int = 100, n_val_per_class: int = 50,
                   size: int | None = None, roles: tuple[str, ...] = ("imagenet", "places"),
                   **voc: int) -> dict[str, Path]:
    """Build (once) the ``roles`` of the embedded suite under ``cache_dir``; roots by role.
    ``voc``: ``voc_trainval``, ``voc_test``, ``voc_size`` for the VOC roles,
    ``retrieval_max_side`` for the retrieval roles."""
    unknown = sorted(set(voc) - {"voc_trainval", "voc_test", "voc_size", "retrieval_max_side",
                                 "imagenet_val_per_class", "imagenet_source"})
    if unknown:
        raise UserError(f"embedded suite: unknown setting(s) {unknown}; known: "
                        "n_train_per_class, n_val_per_class, imagenet_val_per_class, "
                        "imagenet_source, size, voc_trainval, voc_test, voc_size, "
                        "retrieval_max_side.")
    params = [BuildParams(role, n_train_per_class, n_val_per_class, size, **voc)
              for role in roles]
    for p in params:  # all parameter errors before anything is built
        _validate(p)
    return {p.role: build_role(cache_dir, p) for p in params}


def embedded_datasets(cache_dir: Path, n_train_per_class: int = 100, n_val_per_class: int = 50,
                      size: int | None = None, datasets_file: Path | None = None
                      ) -> dict[str, Path]:
    """Build the embedded suite and write its datasets file (default
    ``<cache_dir>/datasets.toml``, read by :func:`~.common.read_datasets_file`); roots by role."""
    roots = build_embedded(cache_dir, n_train_per_class, n_val_per_class, size)
    write_datasets_file(Path(datasets_file or Path(cache_dir) / "datasets.toml"), roots)
    return roots


def build_role(cache_dir: Path, params: BuildParams) -> Path:
    """The finished root of one role, building it atomically if no matching build exists
    (``roxford5k`` / ``rparis6k``: the ``oxford5k`` / ``paris6k`` root, :data:`SHARED_BUILD`)."""
    _validate(params)
    params = replace(params, role=SHARED_BUILD.get(params.role, params.role))
    cache_dir = Path(cache_dir).expanduser()
    final = cache_dir / f"{params.role}-{params.key()[:12]}"
    if is_complete(final, params):
        log.debug("embedded %s already built at %s", params.role, final)
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(cache_dir)
    if is_complete(final, params):  # a concurrent builder finished meanwhile
        return final
    if final.exists():  # no or foreign marker: never trust it, move it aside and delete it
        log.warning("%s is not a finished build (no matching %s); rebuilding", final, MARKER)
        trash = _tmp_path(cache_dir, final.name)
        final.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    tmp = _tmp_path(cache_dir, final.name)
    try:
        tmp.mkdir()
        log.info("building embedded %s (%s) in %s", params.role, dataset_name(params), final)
        _BUILDERS[params.role](tmp, params)
        atomic_write(tmp / MARKER, json.dumps(
            {"params": asdict(params), "key": params.key(),
             "dataset_name": dataset_name(params)}, indent=1, sort_keys=True))
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_complete(final, params):  # not a lost race with a concurrent builder
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def dataset_name(params: BuildParams) -> str:
    """What records say a role's data was: ``embedded/<name>``."""
    if params.role == "imagenet" and params.imagenet_source is not None:
        return f"embedded/{params.imagenet_source}"
    return DATASET_NAMES[params.role]


def role_dataset_name(role: str, **settings) -> str:
    """:func:`dataset_name` of ``role`` built with a suite's ``[embedded]`` ``settings``."""
    known = {f.name for f in fields(BuildParams)}
    return dataset_name(BuildParams(role, **{k: v for k, v in settings.items() if k in known}))


def is_complete(root: Path, params: BuildParams) -> bool:
    """True iff ``root`` holds a marker written for exactly ``params``."""
    try:
        return json.loads((root / MARKER).read_text(encoding="utf-8"))["key"] == params.key()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def clean_stale_temps(cache_dir: Path) -> list[Path]:
    """Delete temp build folders of dead processes on this host, or older than a day."""
    removed = []
    for p in cache_dir.glob(f"{TMP_PREFIX}*"):
        parts = p.name[len(TMP_PREFIX):].split(".", 3)  # name, pid, uuid, host
        try:
            old = time.time() - p.stat().st_mtime > STALE_AFTER_S
        except OSError:
            continue
        dead = (len(parts) == 4 and parts[3] == socket.gethostname() and parts[1].isdigit()
                and not pid_alive(int(parts[1])))
        if dead or old:
            log.info("removing stale temporary build %s", p)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# --- builders -------------------------------------------------------------------------------

def _build_imagenet(root: Path, params: BuildParams) -> None:
    (root / "synset_words.txt").write_text(
        "".join(f"{w} {c}\n" for w, c in zip(FMNIST_WNIDS, FASHION_MNIST_CLASSES)))
    n_val = params.imagenet_val_per_class or params.n_val_per_class
    for split, source, n in (("train", "train", params.n_train_per_class),
                             ("val", "test", n_val)):
        images, labels = fashion_mnist(source)
        idx = first_per_class(labels, 10, n, f"Fashion-MNIST {source}")
        if params.composed:  # image i = pretraining's image i
            images = dict(zip(idx.tolist(), compose(images, source, idx,
                                                    params.imagenet_source)))
        for w in FMNIST_WNIDS:
            (root / split / w).mkdir(parents=True)
        for i in _progress(idx, f"fashion-mnist {split}"):
            wnid = FMNIST_WNIDS[labels[i]]
            name = f"{wnid}_{i:05d}.png" if split == "train" else f"fmnist_t10k_{i:05d}.png"
            img = _resize(Image.fromarray(images[i]), params.size, Image.Resampling.BICUBIC)
            img.save(root / split / wnid / name, format="PNG")


def _build_places(root: Path, params: BuildParams) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = np.asarray(digits.target, dtype=np.int64)
    n_train, n_val = params.n_train_per_class, params.n_val_per_class
    idx = first_per_class(labels, 10, n_train + n_val, "sklearn digits")
    rank = _rank_within_class(labels, idx)
    lines: dict[str, list[str]] = {"train": [], "val": []}
    for i in _progress(idx, "digits"):
        label = int(labels[i])
        digest = hashlib.md5(f"sklearn-digits-{i}".encode()).hexdigest()
        rel = f"{DIGIT_CATEGORIES[label]}/gsun_{digest}.jpg"
        path = root / PLACES_IMAGES / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img = _resize(Image.fromarray(images[i]), params.size or DIGITS_SIZE,
                      Image.Resampling.NEAREST)
        img.save(path, format="JPEG", quality=95)
        lines["train" if rank[i] < n_train else "val"].append(f"{rel} {label}")
    split_dir = root / "trainvalsplit_places205"
    split_dir.mkdir()
    for split, ls in lines.items():
        (split_dir / f"{split}_places205.csv").write_text("".join(f"{s}\n" for s in sorted(ls)))


def _build_voc(year: int) -> Callable[[Path, BuildParams], None]:
    def build(root: Path, params: BuildParams) -> None:
        from .embedded_voc import build_voc

        build_voc(root, year, params.voc_trainval, params.voc_test if year == 2007 else 0,
                  params.voc_size, seed=0)
    return build


def _build_retrieval(dataset: str) -> Callable[[Path, BuildParams], None]:
    def build(root: Path, params: BuildParams) -> None:
        from .embedded_retrieval import build_retrieval

        build_retrieval(root, dataset, seed=0, max_side=params.retrieval_max_side)
    return build


_BUILDERS: Mapping[str, Callable[[Path, BuildParams], None]] = MappingProxyType(
    {"imagenet": _build_imagenet, "places": _build_places, "voc07": _build_voc(2007),
     "voc12": _build_voc(2012),
     **{role: _build_retrieval(SHARED_BUILD.get(role, role)) for role in RETRIEVAL_ROLES}})


# --- helpers --------------------------------------------------------------------------------

def first_per_class(labels: np.ndarray, num_classes: int, n: int, what: str) -> np.ndarray:
    """Indices of the first ``n`` samples of each class in file order, sorted."""
    counts = np.bincount(labels, minlength=num_classes)[:num_classes]
    if counts.min() < n:
        raise UserError(f"{what} has only {counts.min()} images of class {counts.argmin()}, but "
                        f"{n} per class were asked for the embedded suite; ask for at most "
                        f"{counts.min()} per class (for digits: train + val).")
    picks = [np.flatnonzero(labels == c)[:n] for c in range(num_classes)]
    return np.sort(np.concatenate(picks))


def _rank_within_class(labels: np.ndarray, idx: np.ndarray) -> dict[int, int]:
    seen: dict[int, int] = {}
    rank = {}
    for i in idx:
        c = int(labels[i])
        rank[int(i)] = seen.get(c, 0)
        seen[c] = rank[int(i)] + 1
    return rank


def _resize(img: Image.Image, size: int | None, resample: int) -> Image.Image:
    return img if size is None or img.size == (size, size) else img.resize((size, size), resample)


def _progress(idx: np.ndarray, desc: str):
    return tqdm(idx.tolist(), desc=f"writing {desc}", unit="img", disable=len(idx) < 5000,
                leave=False)


def _validate(p: BuildParams) -> None:
    if p.role not in _BUILDERS:
        raise UserError(f"unknown embedded dataset role {p.role!r}; use one of {ROLES}.")
    if p.role.startswith("voc"):
        for name in ("voc_trainval", "voc_test", "voc_size"):
            v = getattr(p, name)
            if not isinstance(v, int) or v < (1 if name != "voc_test" else 0):
                raise UserError(f"embedded suite: {name} must be a positive integer, got {v!r}.")
        return
    if p.role in RETRIEVAL_ROLES:
        v = p.retrieval_max_side
        if not isinstance(v, int) or isinstance(v, bool) or not 64 <= v <= 4096:
            raise UserError(f"embedded suite: retrieval_max_side must be an integer in [64, "
                            f"4096], got {v!r}.")
        return
    for name in ("n_train_per_class", "n_val_per_class"):
        v = getattr(p, name)
        if not isinstance(v, int) or v < 1:
            raise UserError(f"embedded suite: {name} must be an integer >= 1, got {v!r}.")
    v = p.imagenet_val_per_class
    if v is not None and (not isinstance(v, int) or isinstance(v, bool)
                          or not 1 <= v <= FMNIST_TEST_PER_CLASS):
        raise UserError(f"embedded suite: imagenet_val_per_class must be an integer in [1, "
                        f"{FMNIST_TEST_PER_CLASS}] (the Fashion-MNIST test split), got {v!r}.")
    if p.role == "places" and p.n_train_per_class + p.n_val_per_class > DIGITS_MIN_PER_CLASS:
        raise UserError(f"embedded suite: the 'places' role (sklearn digits) has only "
                        f"{DIGITS_MIN_PER_CLASS} images of its rarest class, but n_train_per_class"
                        f" + n_val_per_class = {p.n_train_per_class + p.n_val_per_class}; ask for"
                        " fewer, or build the roles separately with build_role.")
    if p.size is not None and (not isinstance(p.size, int) or p.size < 8):
        raise UserError(f"embedded suite: size must be None or an integer >= 8, got {p.size!r}.")
    if p.role == "imagenet" and p.imagenet_source not in (None, *EMBEDDED_DATASETS):
        raise UserError(f"embedded suite: imagenet_source must be one of "
                        f"{', '.join(EMBEDDED_DATASETS)}, got {p.imagenet_source!r}.")
    if p.role == "imagenet" and p.composed and p.size is not None:
        raise UserError(f"embedded suite: size resizes the 28-px Fashion-MNIST items; the "
                        f"{p.imagenet_source} images are 72 px, the size pretraining uses: drop "
                        f"size (got {p.size!r}) or use imagenet_source = \"fashion-mnist\".")


def _tmp_path(cache_dir: Path, name: str) -> Path:
    tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}.{socket.gethostname()}"
    return cache_dir / f"{TMP_PREFIX}{name}.{tag}"
