"""Time each phase of one DeepCluster epoch on JPEGs and project it to ImageNet (issue 13).

    python benchmarks/epoch.py --n 512 --out epoch.json [--device auto|cpu|cuda]
    python benchmarks/epoch.py --smoke --out tmp/report.json --folder tmp/data   # CI, ~20 s

Builds (once, atomically, reused after) a synthetic ImageNet-layout folder
``<folder>/train/n000000xx/*.JPEG`` of ImageNet-like sizes (~500x375) and file sizes (~110 KB
at quality 90: multi-scale smooth noise plus grain), then runs the pipeline's own code on it:

* ``decode``   -- pretraining's dataset + ``train_transform`` through a DataLoader (read, PIL
  decode, RandomResizedCrop, flip, normalise, collate), img/s;
* ``gpu_loader`` -- ``pretrain.gpu_data``'s training batches (read by its thread, decoded and
  cropped on the device: nvJPEG on a GPU, torchvision's decoders on CPU), img/s; the first
  batch untimed;
* ``dali``     -- where NVIDIA DALI is installed: :class:`pretrain.gpu_data.DaliCrops`' training
  crops of the same files (decode of the crop region, resize, flip, normalise), img/s;
* ``extract``  -- ``pretrain.train.extract_features`` on the eval dataset (decode included),
  img/s; ``forward``: the model's eval forward on an in-memory batch (its limit here);
* ``pca``      -- ``fit_pca_whitening`` + ``transform`` of those features where the pipeline
  runs it (numpy features: CPU); ``pca_full_width``: the same on a synthetic
  ``max(n, d + 1) x d`` matrix (d = the feature width, 4096 in the paper), and ``eigh``: the
  d x d float64 eigendecomposition alone, the part that does not grow with N;
* ``kmeans``   -- ``pretrain.clustering.kmeans`` (k clipped to n / 2, 20 iterations, the
  pipeline's backend choice) on the whitened features, seconds; ``kmeans_imagenet_shape``:
  the same on ``--kmeans-rows`` synthetic L2-normalised rows (default: all 1,281,167 on a
  GPU, 50,000 on CPU) with ImageNet's points per cluster (k = rows / (N / k)): a few hundred
  points are all launch and thread overhead, which would not scale with N k;
* ``train``    -- ``pretrain.train._train_epoch`` (forward, backward, both SGD steps, loss
  check) over a shuffled DataLoader of the training dataset with random pseudo-labels, img/s;
  ``train_step``: forward + backward + SGD steps on an in-memory batch (the model's limit).

Each model phase follows an untimed warm-up; the GPU is synchronised around every timing; the
files are in the page cache (read once before timing): disk reads are not measured.

Projection to N = 1,281,167 images (printed and in the report's ``projection``)::

    extract = N / extract.img_per_s            train = N / train.img_per_s
    pca     = eigh.seconds + max(pca_full_width.seconds - eigh.seconds, 0) / pca_full_width.rows * N
    kmeans  = km.seconds * (N / km.rows) * (k / km.k)   # km = kmeans_imagenet_shape; ~ N k d
    epoch   = extract + pca + kmeans + train

(the PCA's scatter and transform grow with N, its eigendecomposition does not; ``decode`` is
not added: extraction and training read their images themselves). Ratios are reported
against the model's own in-memory throughput measured in the same run and against the
limits measured on one H200 (ENVIRONMENT.md), and the epoch against the 180 s target and the
paper's P100 epoch (12 days / 500 epochs). Nothing is asserted about speed.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcbench.core import (UserError, atomic_write_json, eval_transform,  # noqa: E402
                          resolve_device, train_transform)
from pretrain import clustering  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.gpu_data import DaliCrops, GpuInputs, dali_available, images_of  # noqa: E402
from pretrain.models import ModelSpec, build_model, embed_dim, make_top_layer  # noqa: E402
from pretrain.train import (FEATURE_BATCH, PseudoLabelled, Speed, _train_epoch,  # noqa: E402
                            extract_features, load_pretrain_data)

log = logging.getLogger("epoch")
IMAGENET_TRAIN = 1_281_167
IMAGENET_PER_CLASS = 1_281  # ImageNet's mean class size: one class folder per this many images
P100_EPOCH_S = 12 * 86_400 / 500  # "12 days on a Pascal P100" for 500 epochs
# one H200 (ENVIRONMENT.md): AlexNet-BN-Sobel, 10k head, batch 256, bf16 + channels_last
H200 = {"train_img_per_s": 20_002, "extract_img_per_s": 47_474,
        "decode_img_per_s": 16_439, "decode_in_memory_img_per_s": 24_703,
        "pca_s": 0.53, "kmeans_s": 1.77, "pil_decode_img_per_s_per_core": 265}
TARGETS = {"train_img_per_s": 15_000, "extract_img_per_s": 14_000, "clustering_s": 5.0,
           "epoch_s": 180.0}
MANIFEST = "manifest.json"
FOLDER_FORMAT = "dcbench-synthetic-imagenet/1"
# (width, height) of the synthetic images and their shares: ImageNet's common shapes
SHAPES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (400, 300), (640, 480))
SHAPE_P = (0.42, 0.14, 0.20, 0.06, 0.06, 0.06, 0.06)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Settings:
    """What one run measures. Model, data and clustering defaults: the paper's
    (``PretrainConfig``); ``workers``: every usable core; ``n``: images in the folder."""

    n: int = 256
    arch: str = PretrainConfig.arch
    sobel: bool = PretrainConfig.sobel
    fc_dim: int = PretrainConfig.fc_dim
    batch_size: int = PretrainConfig.batch_size
    input_size: int = PretrainConfig.input_size
    resize_size: int = PretrainConfig.resize_size
    k: int = PretrainConfig.k
    pca_dim: int = PretrainConfig.pca_dim
    kmeans_iters: int = PretrainConfig.kmeans_iters
    kmeans_backend: str = PretrainConfig.kmeans_backend
    kmeans_rows: int = 0  # rows of kmeans_imagenet_shape; 0: ImageNet's on a GPU, 50,000 on CPU
    precision: str = PretrainConfig.precision
    channels_last: bool = PretrainConfig.channels_last
    workers: int = usable_cores()
    device: str = "auto"
    quality: int = 90  # JPEG quality of the synthetic images
    seed: int = 0
    min_seconds: float = 1.0  # each in-memory throughput: timed repeats for at least this long


SMOKE = dict(n=64, input_size=64, resize_size=72, fc_dim=128, k=8, pca_dim=16, batch_size=32,
             workers=0, min_seconds=0.2, kmeans_rows=1024)
CPU_KMEANS_ROWS = 50_000


def pretrain_config(s: Settings, folder: Path) -> PretrainConfig:
    """The pretraining config these settings stand for (validated: the same errors as
    ``python -m pretrain``), with k clipped to n / 2 (with k = n, k-means has nothing to
    iterate: the centroids are the points)."""
    return PretrainConfig(data=str(folder), arch=s.arch, sobel=s.sobel, fc_dim=s.fc_dim,
                          k=max(2, min(s.k, s.n // 2)), pca_dim=s.pca_dim,
                          kmeans_iters=s.kmeans_iters, kmeans_backend=s.kmeans_backend,
                          batch_size=s.batch_size, input_size=s.input_size,
                          resize_size=s.resize_size, workers=s.workers, device=s.device,
                          precision=s.precision, channels_last=s.channels_last).validate()


# --------------------------------------------------------------------------- synthetic folder


def image_shape(seed: int, i: int) -> tuple[int, int]:
    """(width, height) of synthetic image ``i``."""
    rng = np.random.default_rng([seed, i, 0])
    return SHAPES[int(rng.choice(len(SHAPES), p=SHAPE_P))]


def synthetic_image(seed: int, i: int) -> Image.Image:
    """Image ``i``: five octaves of bicubic-upsampled colour noise (smooth regions, edges and
    texture) plus grain, which gives JPEG files of ImageNet's size (~110 KB at quality 90)."""
    w, h = image_shape(seed, i)
    rng = np.random.default_rng([seed, i, 1])
    acc = np.full((h, w, 3), 128.0, np.float32)
    for cells, amp in ((3, 60.0), (8, 35.0), (24, 22.0), (72, 14.0), (200, 10.0)):
        grid = rng.normal(0, 1, (max(2, cells * h // w), cells, 3)).astype(np.float32)
        acc += amp * np.stack([np.asarray(Image.fromarray(grid[..., c], "F").resize(
            (w, h), Image.BICUBIC)) for c in range(3)], -1)
    acc += rng.normal(0, 20.0, (h, w, 1)).astype(np.float32)
    acc += rng.normal(0, 20.0 / 3, (h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8))


def image_relpath(i: int, classes: int) -> str:
    c = i % classes
    return f"train/n{c:08d}/n{c:08d}_{i}.JPEG"


def write_image(root: Path, seed: int, i: int, classes: int, quality: int) -> list:
    """Write synthetic image ``i`` under ``root``; its manifest row [path, width, height,
    bytes]."""
    rel = image_relpath(i, classes)
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    img = synthetic_image(seed, i)
    img.save(root / rel, "JPEG", quality=quality)
    return [rel, img.width, img.height, (root / rel).stat().st_size]


def folder_spec(s: Settings) -> dict:
    return {"format": FOLDER_FORMAT, "n": s.n, "seed": s.seed, "quality": s.quality}


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def build_folder(folder: Path, s: Settings) -> dict:
    """The synthetic folder's manifest; the folder is built in a temp folder and renamed into
    place, or reused when its manifest matches. A folder of another synthetic set is replaced;
    any other existing folder is left alone (an error)."""
    spec = folder_spec(s)
    found = read_manifest(folder)
    if found is not None and found.get("spec") == spec:
        return found
    ours = found is not None and found.get("spec", {}).get("format") == FOLDER_FORMAT
    if folder.exists() and not ours and not (folder.is_dir() and not any(folder.iterdir())):
        raise UserError(f"--folder {folder} exists and is not a synthetic folder of this "
                        "benchmark (no manifest.json): pass a new or empty path.")
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    classes = math.ceil(s.n / IMAGENET_PER_CLASS)
    log.info("building %d synthetic JPEGs in %s", s.n, folder)
    jobs = [(tmp, s.seed, i, classes, s.quality) for i in range(s.n)]
    if usable_cores() > 1 and s.n >= 256:  # ~40 ms an image: one process per core
        with ProcessPoolExecutor(usable_cores()) as pool:
            files = list(pool.map(write_image, *zip(*jobs), chunksize=32))
    else:
        files = [write_image(*job) for job in jobs]
    manifest = {"spec": spec, "classes": classes, "files": files}
    atomic_write_json(tmp / MANIFEST, manifest)
    if folder.exists():  # an older synthetic set, or an empty folder: swap, then delete it
        old = folder.parent / f".{folder.name}.old-{os.getpid()}"
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, folder)
    return manifest


def folder_summary(folder: Path, manifest: dict) -> dict:
    files = manifest["files"]
    return {"path": str(folder), "images": len(files), "classes": manifest["classes"],
            "mean_bytes": float(np.mean([f[3] for f in files])),
            "mean_width": float(np.mean([f[1] for f in files])),
            "mean_height": float(np.mean([f[2] for f in files])),
            "quality": manifest["spec"]["quality"]}


def warm_page_cache(folder: Path, manifest: dict) -> None:
    for rel, *_ in manifest["files"]:
        (folder / rel).read_bytes()


# --------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(fn(), its wall seconds), the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def throughput(step: Callable[[], Any], images: int, device: torch.device,
               min_seconds: float) -> dict:
    """img/s of ``step`` (one batch of ``images``) after one untimed call: repeated until
    ``min_seconds`` have passed, at least twice."""
    step()
    sync(device)
    t0, reps = time.perf_counter(), 0
    while reps < 2 or time.perf_counter() - t0 < min_seconds:
        step()
        sync(device)
        reps += 1
    seconds = time.perf_counter() - t0
    return {"images": images * reps, "seconds": seconds, "img_per_s": images * reps / seconds}


def rate(images: int, seconds: float) -> dict:
    return {"images": images, "seconds": seconds, "img_per_s": images / seconds}


# --------------------------------------------------------------------------- phases


def time_decode(dataset, cfg: PretrainConfig, device: torch.device) -> dict:
    """One pass of a DataLoader over ``dataset`` (worker start-up included: every epoch
    pays it), after an untimed pass over its first batch."""
    def load(ds):
        loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=False,
                            num_workers=cfg.workers)
        return sum(len(x) for x, *_ in loader)

    load(torch.utils.data.Subset(dataset, range(min(len(dataset), cfg.batch_size))))
    images, seconds = timed(lambda: load(dataset), device)
    return rate(images, seconds)


def time_gpu_loader(dataset, cfg: PretrainConfig, device: torch.device, seed: int) -> dict:
    """One pass of the GPU input pipeline's training batches over ``dataset`` (draws in
    order, pseudo-labels 0) after an untimed first batch."""
    inputs = GpuInputs(images_of(dataset), cfg.input_size, cfg.resize_size, device)
    draws = list(enumerate(range(len(dataset))))
    batches = [draws[i:i + cfg.batch_size] for i in range(0, len(draws), cfg.batch_size)]
    labels = np.zeros(len(dataset), dtype=np.int64)
    next(iter(inputs.training(batches[:1], labels, seed, 0)))
    images, seconds = timed(lambda: sum(len(y) for _, y in inputs.training(
        batches, labels, seed, 0)), device)
    return {**rate(images, seconds), "device": str(device)}


def time_dali(dataset, cfg: PretrainConfig, device: torch.device, seed: int) -> dict:
    """NVIDIA DALI's training crops (decode of the crop region + resize + flip + normalise;
    mixed nvJPEG on a GPU, its CPU backend otherwise) over ``dataset``'s files, after an
    untimed first batch; the file reads are included."""
    files = [Path(p) for p in images_of(dataset)]
    crops = DaliCrops("train", cfg.input_size, cfg.batch_size, seed=seed,
                      device_id=(device.index or 0) if device.type == "cuda" else None)
    batches = [files[i:i + cfg.batch_size] for i in range(0, len(files), cfg.batch_size)]
    crops([p.read_bytes() for p in batches[0]])
    images, seconds = timed(lambda: sum(len(crops([p.read_bytes() for p in b])[0])
                                        for b in batches), device)
    return {**rate(images, seconds), "device": str(device)}


def make_model(cfg: PretrainConfig, device: torch.device, speed: Speed):
    torch.manual_seed(cfg.seed)
    model = build_model(ModelSpec(cfg.arch, cfg.sobel, cfg.fc_dim, None)).to(device)
    return model.to(memory_format=torch.channels_last) if speed.channels_last else model


def synthetic_batch(batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def time_forward(model, cfg: PretrainConfig, batch: int, device: torch.device, speed: Speed,
                 min_seconds: float) -> dict:
    """The eval forward (fc7 pre-ReLU, as extraction) of an in-memory batch on the device."""
    x = speed.inputs(synthetic_batch(batch, cfg.input_size), device)
    model.eval()

    @torch.no_grad()
    def step():
        with speed.autocast(device):
            return model.embed(x)
    return throughput(step, batch, device, min_seconds)


def time_extract(model, dataset, cfg: PretrainConfig, batch: int, device: torch.device,
                 speed: Speed) -> tuple[np.ndarray, dict]:
    feats, seconds = timed(lambda: extract_features(model, dataset, batch, cfg.workers, device,
                                                    speed=speed), device)
    return feats, rate(len(feats), seconds)


def warm_linalg(device: torch.device) -> None:
    """Load the eigensolver (LAPACK / cuSOLVER) before a timing: its first call is slow."""
    torch.linalg.eigh(torch.eye(8, dtype=torch.float64, device=device))
    sync(device)


def time_pca(x: torch.Tensor, dim: int, device: torch.device) -> tuple[torch.Tensor, dict]:
    """PCA-whitening fitted on, and applied to, ``x`` where it lies (as the pipeline)."""
    warm_linalg(device)

    def fit_transform():
        return clustering.fit_pca_whitening(x, dim).transform(x)
    out, seconds = timed(fit_transform, device)
    return out, {"rows": x.shape[0], "dim_in": x.shape[1], "dim_out": dim,
                 "device": str(x.device), "seconds": seconds}


def synthetic_features(rows: int, d: int, seed: int) -> torch.Tensor:
    """Gaussian rows with a decaying spectrum (full rank: the PCA never collapses)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d, generator=g) * torch.linspace(2.0, 0.2, d)


def time_eigh(d: int, device: torch.device, seed: int) -> dict:
    """The fixed cost of the PCA: a d x d float64 symmetric eigendecomposition."""
    a = synthetic_features(d + 1, d, seed).to(device, torch.float64)
    scatter = a.T @ a
    warm_linalg(device)
    _, seconds = timed(lambda: torch.linalg.eigh(scatter), device)
    return {"dim": d, "device": str(device), "seconds": seconds}


def time_kmeans(x: np.ndarray, k: int, cfg: PretrainConfig, backend: str,
                device: torch.device, seed: int) -> dict:
    """``cfg.kmeans_iters`` iterations after an untimed one-iteration run (thread pools,
    kernels)."""
    def run(niter: int):
        return clustering.kmeans(x, k, niter=niter, seed=seed, backend=backend, device=device)
    run(1)
    km, seconds = timed(lambda: run(cfg.kmeans_iters), device)
    return {"rows": x.shape[0], "dim": x.shape[1], "k": k, "iters": cfg.kmeans_iters,
            "backend": km.backend, "device": km.device, "seconds": seconds}


def imagenet_shape_k(rows: int, k: int, n: int = IMAGENET_TRAIN) -> int:
    """k for ``rows`` points with ImageNet's points per cluster (n / k), at least 2."""
    return max(2, min(k, rows * k // n))


def unit_rows(rows: int, d: int, seed: int) -> np.ndarray:
    """L2-normalised Gaussian rows, float32: the shape of whitened features."""
    x = torch.randn(rows, d, generator=torch.Generator().manual_seed(seed))
    return (x / torch.linalg.vector_norm(x, dim=1, keepdim=True)).numpy()


def make_optimizers(model, cfg: PretrainConfig):
    opt = torch.optim.SGD(model.trainable_parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    head_opt = torch.optim.SGD(model.top_layer.parameters(), lr=cfg.head_lr,
                               weight_decay=cfg.head_weight_decay)
    return opt, head_opt


def time_train_step(model, cfg: PretrainConfig, device: torch.device, speed: Speed,
                    min_seconds: float) -> dict:
    """Forward + backward + both SGD steps on an in-memory batch (the model's limit)."""
    model.top_layer = make_top_layer(embed_dim(model), cfg.k).to(device)
    opt, head_opt = make_optimizers(model, cfg)
    x = speed.inputs(synthetic_batch(cfg.batch_size, cfg.input_size), device)
    y = torch.randint(0, cfg.k, (cfg.batch_size,), generator=torch.Generator().manual_seed(0))
    y = y.to(device)
    crit = torch.nn.CrossEntropyLoss()
    model.train()

    def step():
        with speed.autocast(device):
            loss = crit(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        head_opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        head_opt.step()
    return throughput(step, cfg.batch_size, device, min_seconds)


def time_train(model, dataset, cfg: PretrainConfig, device: torch.device, speed: Speed,
               seed: int) -> dict:
    """One pass of the pipeline's training loop over all images with random pseudo-labels
    (a fresh head and optimisers, as every epoch)."""
    assign = np.random.default_rng(seed).integers(0, cfg.k, len(dataset))
    loader = DataLoader(PseudoLabelled(dataset, assign), batch_size=cfg.batch_size,
                        shuffle=True, num_workers=cfg.workers,
                        generator=torch.Generator().manual_seed(seed))
    model.top_layer = make_top_layer(embed_dim(model), cfg.k).to(device)
    opt, head_opt = make_optimizers(model, cfg)
    _, seconds = timed(lambda: _train_epoch(model, loader, opt, head_opt, device, 0,
                                            speed=speed), device)
    return rate(len(dataset), seconds)


def run_phases(s: Settings, folder: Path) -> tuple[dict, dict]:
    """(phases, what the run actually used) on the synthetic folder."""
    cfg = pretrain_config(s, folder)
    device = resolve_device(cfg.device)
    speed = Speed.of(cfg)
    backend = cfg.kmeans_backend
    if backend == "auto":  # the pipeline's choice
        backend = "faiss" if "faiss" in clustering.available_backends() else "torch"
    make_ds, _, _ = load_pretrain_data(cfg)
    ds_train = make_ds(train_transform(cfg.input_size))
    ds_eval = make_ds(eval_transform(cfg.resize_size, cfg.input_size))
    feature_batch = max(cfg.batch_size, FEATURE_BATCH)
    ph: dict[str, dict] = {}
    log.info("decode: %d images, %d workers", len(ds_train), cfg.workers)
    ph["decode"] = time_decode(ds_train, cfg, device)
    log.info("gpu loader: %d images on %s", len(ds_train), device)
    ph["gpu_loader"] = time_gpu_loader(ds_train, cfg, device, s.seed)
    if dali_available():
        log.info("dali: %d images on %s", len(ds_train), device)
        ph["dali"] = time_dali(ds_train, cfg, device, s.seed)
    model = make_model(cfg, device, speed)
    d = embed_dim(model)
    log.info("forward, extraction")
    ph["forward"] = time_forward(model, cfg, feature_batch, device, speed, s.min_seconds)
    feats, ph["extract"] = time_extract(model, ds_eval, cfg, feature_batch, device, speed)
    pca_dim = min(cfg.pca_dim, len(feats) - 1)
    log.info("PCA")
    x, ph["pca"] = time_pca(torch.from_numpy(feats), pca_dim, torch.device("cpu"))
    synth = synthetic_features(max(len(feats), d + 1), d, s.seed)
    _, ph["pca_full_width"] = time_pca(synth, cfg.pca_dim, torch.device("cpu"))
    ph["eigh"] = time_eigh(d, torch.device("cpu"), s.seed)
    if device.type == "cuda":  # where the PCA could run: the same on the GPU
        _, ph["pca_full_width_on_device"] = time_pca(synth.to(device), cfg.pca_dim, device)
        ph["eigh_on_device"] = time_eigh(d, device, s.seed)
    del synth
    log.info("k-means (%s, k=%d)", backend, cfg.k)
    ph["kmeans"] = time_kmeans(x.numpy(), cfg.k, cfg, backend, device, s.seed)
    rows = s.kmeans_rows or (IMAGENET_TRAIN if device.type == "cuda" else CPU_KMEANS_ROWS)
    k_shape = imagenet_shape_k(rows, s.k)
    log.info("k-means (%s, %d x %d, k=%d)", backend, rows, cfg.pca_dim, k_shape)
    ph["kmeans_imagenet_shape"] = time_kmeans(unit_rows(rows, cfg.pca_dim, s.seed), k_shape,
                                              cfg, backend, device, s.seed)
    log.info("training step, training")
    ph["train_step"] = time_train_step(model, cfg, device, speed, s.min_seconds)
    ph["train"] = time_train(model, ds_train, cfg, device, speed, s.seed)
    used = {"k": cfg.k, "pca_dim": pca_dim, "feature_dim": d, "feature_batch": feature_batch,
            "kmeans_backend": backend, "device": str(device), "lr": cfg.lr}
    return ph, used


# --------------------------------------------------------------------------- report


def projection(ph: dict, k: int, n: int = IMAGENET_TRAIN) -> dict:
    """Seconds of one epoch on ``n`` images from the measured phases (module docstring)."""
    full, eigh = ph["pca_full_width"], ph["eigh"]["seconds"]
    km = ph["kmeans_imagenet_shape"]
    secs = {"extract": n / ph["extract"]["img_per_s"],
            "pca": eigh + max(full["seconds"] - eigh, 0.0) / full["rows"] * n,
            "kmeans": km["seconds"] * (n / km["rows"]) * (k / km["k"]),
            "train": n / ph["train"]["img_per_s"]}
    secs["total"] = sum(secs.values())
    extra = {}
    if "pca_full_width_on_device" in ph:  # the same projection with the PCA on the GPU
        dev_eigh = ph["eigh_on_device"]["seconds"]
        extra["pca_on_device_s"] = dev_eigh + max(
            ph["pca_full_width_on_device"]["seconds"] - dev_eigh, 0.0) / full["rows"] * n
    return {"images": n, "k": k, "seconds": secs, **extra,
            "clustering_s": secs["pca"] + secs["kmeans"],
            "vs_target_epoch": secs["total"] / TARGETS["epoch_s"],
            "vs_p100_epoch": secs["total"] / P100_EPOCH_S,
            "vs_target_clustering": (secs["pca"] + secs["kmeans"]) / TARGETS["clustering_s"]}


def ratios(ph: dict, proj: dict, workers: int) -> dict:
    """Each phase against the model's own in-memory throughput (this run) and the H200."""
    fwd, step = ph["forward"]["img_per_s"], ph["train_step"]["img_per_s"]
    dec, ext, tr = (ph[p]["img_per_s"] for p in ("decode", "extract", "train"))
    secs = proj["seconds"]
    return {
        "vs_model": {"decode_vs_train_step": dec / step, "extract_vs_forward": ext / fwd,
                     "train_vs_train_step": tr / step},
        "vs_h200": {"decode": dec / H200["decode_img_per_s"],
                    "decode_per_worker_vs_pil_core":
                        dec / max(workers, 1) / H200["pil_decode_img_per_s_per_core"],
                    "forward": fwd / H200["extract_img_per_s"],
                    "extract": ext / H200["extract_img_per_s"],
                    "train_step": step / H200["train_img_per_s"],
                    "train": tr / H200["train_img_per_s"],
                    "pca_projected_s": secs["pca"] / H200["pca_s"],
                    "kmeans_projected_s": secs["kmeans"] / H200["kmeans_s"]},
        "vs_target": {"extract": ext / TARGETS["extract_img_per_s"],
                      "train": tr / TARGETS["train_img_per_s"]},
    }


def machine(device: torch.device) -> dict:
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({usable_cores()} cores)")
    return {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_cores": usable_cores(), "python": sys.version.split()[0],
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def render(rep: dict) -> str:
    ph, r, proj = rep["phases"], rep["ratios"], rep["projection"]
    sm, sh = r["vs_model"], r["vs_h200"]
    m, s, f = rep["machine"], rep["settings"], rep["folder"]
    lines = [
        f"DeepCluster epoch phases on {m['device']} (torch {m['torch']}, {m['threads']} threads,"
        f" {s['workers']} workers), N={f['images']} JPEGs ~{f['mean_width']:.0f}x"
        f"{f['mean_height']:.0f}, mean {f['mean_bytes'] / 1e3:.0f} KB",
        f"{s['arch']} fc{s['fc_dim']} {s['input_size']}px batch {s['batch_size']} "
        f"{s['precision']}{' channels_last' if s['channels_last'] else ''}, k={rep['used']['k']}"
        f" (asked {s['k']}), PCA {rep['used']['feature_dim']}->{rep['used']['pca_dim']}, "
        f"k-means {rep['used']['kmeans_backend']}",
        f"(load average {m['load_average']:.1f} on {m['cpu_cores']} cores at the end)"
        if m.get("load_average") is not None else "",
        f"{'phase':<22}{'measured':>16}{'vs model':>10}{'vs H200':>10}",
        f"{'decode+augment':<22}{ph['decode']['img_per_s']:>10,.0f} img/s"
        f"{sm['decode_vs_train_step']:>10.3f}{sh['decode']:>10.4f}",
        f"{'gpu loader':<22}{ph['gpu_loader']['img_per_s']:>10,.0f} img/s"
        f"  (decode+crop on {ph['gpu_loader']['device']})",
        *([f"{'dali':<22}{ph['dali']['img_per_s']:>10,.0f} img/s"
           f"  (decode+crop on {ph['dali']['device']})"] if "dali" in ph else []),
        f"{'forward (in memory)':<22}{ph['forward']['img_per_s']:>10,.0f} img/s{'':>10}"
        f"{sh['forward']:>10.4f}",
        f"{'extraction':<22}{ph['extract']['img_per_s']:>10,.0f} img/s"
        f"{sm['extract_vs_forward']:>10.3f}{sh['extract']:>10.4f}",
        f"{'PCA (these features)':<22}{ph['pca']['seconds']:>14.3f} s",
        f"{'PCA {0}x{1}'.format(ph['pca_full_width']['rows'], ph['pca_full_width']['dim_in']):<22}"
        f"{ph['pca_full_width']['seconds']:>14.3f} s  (eigh {ph['eigh']['seconds']:.3f} s)",
    ]
    if "pca_full_width_on_device" in ph:
        lines.append(f"{'  same on the device':<22}"
                     f"{ph['pca_full_width_on_device']['seconds']:>14.3f} s  "
                     f"(eigh {ph['eigh_on_device']['seconds']:.3f} s)")
    lines += [
        f"{'k-means':<22}{ph['kmeans']['seconds']:>14.3f} s  ({ph['kmeans']['rows']} x "
        f"{ph['kmeans']['dim']}, k={ph['kmeans']['k']}, {ph['kmeans']['iters']} it)",
        f"{'k-means, ImageNet shape':<22}{ph['kmeans_imagenet_shape']['seconds']:>14.3f} s  "
        f"({ph['kmeans_imagenet_shape']['rows']:,} x {ph['kmeans_imagenet_shape']['dim']}, "
        f"k={ph['kmeans_imagenet_shape']['k']:,})",
        f"{'train step (in memory)':<22}{ph['train_step']['img_per_s']:>10,.0f} img/s{'':>10}"
        f"{sh['train_step']:>10.4f}",
        f"{'training':<22}{ph['train']['img_per_s']:>10,.0f} img/s"
        f"{sm['train_vs_train_step']:>10.3f}{sh['train']:>10.4f}",
        f"projected epoch on {proj['images']:,} images (k={proj['k']:,}):",
    ]
    limits = {"extract": "", "pca": f"  (H200 {H200['pca_s']} s: x{sh['pca_projected_s']:.3g})",
              "kmeans": f"  (H200 {H200['kmeans_s']} s: x{sh['kmeans_projected_s']:.3g})",
              "train": ""}
    for phase, sec in proj["seconds"].items():
        lines.append(f"  {phase:<20}{sec:>14,.1f} s{limits.get(phase, '')}")
        if phase == "pca" and "pca_on_device_s" in proj:
            lines.append(f"  {'  (PCA on device)':<20}{proj['pca_on_device_s']:>14,.1f} s "
                         "(not in the total: the pipeline runs the PCA on CPU)")
    lines.append(f"  = {proj['seconds']['total'] / 3600:.2f} h; x{proj['vs_target_epoch']:.3g} "
                 f"the 180 s target, x{proj['vs_p100_epoch']:.3g} the paper's P100 epoch "
                 f"({P100_EPOCH_S:,.0f} s); clustering {proj['clustering_s']:,.1f} s "
                 f"(target {TARGETS['clustering_s']:g} s)")
    return "\n".join(ln for ln in lines if ln)


def report(s: Settings, folder: Path) -> dict:
    manifest = build_folder(folder, s)
    warm_page_cache(folder, manifest)
    ph, used = run_phases(s, folder)
    proj = projection(ph, s.k)
    return {"settings": asdict(s), "used": used, "machine": machine(torch.device(used["device"])),
            "folder": folder_summary(folder, manifest), "phases": ph, "projection": proj,
            "ratios": ratios(ph, proj, s.workers), "limits_h200": H200, "targets": TARGETS,
            "p100_epoch_s": P100_EPOCH_S, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def parse_settings(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON report (written atomically)")
    ap.add_argument("--folder", help="synthetic ImageNet folder, built if missing "
                    "(default: <tmp>/dcbench-epoch-n<n>-s<seed>-q<quality>)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes for CI: "
                    + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    for f in fields(Settings):
        flag = f"--{f.name.replace('_', '-')}"
        if f.type in ("bool",):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            ap.add_argument(flag, type=kind, default=None, help=f"default {f.default}")
    args = ap.parse_args(argv)
    base = replace(Settings(), **SMOKE) if args.smoke else Settings()
    given = {f.name: getattr(args, f.name) for f in fields(Settings)
             if getattr(args, f.name) is not None}
    return replace(base, **given), args


def default_folder(s: Settings) -> Path:
    return Path(tempfile.gettempdir()) / f"dcbench-epoch-n{s.n}-s{s.seed}-q{s.quality}"


def run(quick: bool = False, settings: Settings | None = None,
        folder: Path | None = None) -> dict[str, Any]:
    """Measure, print the table, return the report (benchmarks/run.py: ``quick`` = --smoke)."""
    s = settings or (replace(Settings(), **SMOKE) if quick else Settings())
    if s.n < 4:
        raise UserError(f"--n must be >= 4 (got {s.n}).")
    rep = report(s, Path(folder or default_folder(s)).expanduser())
    print(render(rep))
    return rep


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("pretrain").setLevel(logging.WARNING)
    s, args = parse_settings(argv)
    rep = run(settings=s, folder=Path(args.folder) if args.folder else None)
    atomic_write_json(args.out, rep)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
