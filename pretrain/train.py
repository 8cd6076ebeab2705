"""The DeepCluster training loop (PROTOCOLS.md §1, steps 1-8).

Per epoch: fc7 pre-ReLU features (eval mode, centre crops) -> PCA-whiten-L2 -> k-means ->
pseudo-labels -> uniform-over-clusters sampler -> one pass with a fresh head and its own
momentum-free SGD; the body's SGD keeps its state across epochs.

Every random draw of epoch ``e`` comes from generators seeded by ``(seed, e)``, so a run
resumed from the checkpoint of epoch ``e`` is bit-identical (on CPU) to an uninterrupted one.
Files in ``out``: ``checkpoint.pth`` (atomic, every epoch), ``log.jsonl`` (one line per epoch),
``assignments.bin`` (int32, one row of N per epoch, appended) and ``config.json``.
Data-parallel runs (several ranks of one job, :mod:`pretrain.distributed`) share the loop:
features are extracted per shard and clustered once on rank 0; rank 0 writes every file.
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from dcbench.core import (EnumeratedSampler, SeededDraws, UserError, atomic_write,
                          atomic_write_json, check_finite_loss, derive_seed, eval_transform,
                          remove_stale_temps, resolve_device, take, train_transform,
                          sgd, write_error)

from . import clustering
from .checkpoint import FORMAT, atomic_torch_save, read_checkpoint_file, to_released_keys
from .config import EMBEDDED_DATASETS, PretrainConfig
from .data import (ArrayImageDataset, ImageListDataset, fashion_mnist, loader_batches,
                   scan_image_folder)
from .distributed import Dist, gather_rows, on_main, rank_batches, shard, sum_all
from .gpu_data import GpuInputs, images_of
from .models import ModelSpec, TapNet, build_model, embed_dim, make_top_layer
from .sampler import make_sampler
from .scenes import compose

log = logging.getLogger(__name__)
FEATURE_BATCH = 256  # eval-mode extraction: per-image results, so only speed depends on it
LOCK = ".lock"  # held by the process training in a run folder
# Collapse warning: eigenvalue --pca-dim of the features' spectrum fell below this share of the
# largest (benchmarks/bench_collapse.py, demo preset: runs that went on training stayed above
# 5e-6; a run that collapsed at epoch 4 was at 2.6e-6 at epoch 2; the PCA fails near 1e-13)
COLLAPSE_WARNING_TAIL = 3e-6


def load_pretrain_data(cfg: PretrainConfig):
    """(dataset factory taking a transform, labels or None, a description)."""
    if cfg.dataset in EMBEDDED_DATASETS:
        images, labels = fashion_mnist("train")
        n = min(cfg.subset or len(images), len(images))
        # composed at 72 px: image i from item i, its clutter drawn from the whole split
        images = (images[:n] if cfg.dataset == "fashion-mnist"
                  else compose(images, "train", np.arange(n), cfg.dataset))
        labels = labels[:n]
        return (lambda tf: ArrayImageDataset(images, labels, tf)), labels, f"{cfg.dataset}[:{n}]"
    root = Path(cfg.data).expanduser()
    if (root / "train").is_dir():
        root = root / "train"
    samples, classes = scan_image_folder(root, "pretraining data folder")
    samples = samples[: cfg.subset] if cfg.subset else samples
    labels = np.array([c for _, c in samples]) if classes else None
    return (lambda tf: ImageListDataset(samples, tf)), labels, str(root)


class PseudoLabelled(Dataset):
    """The original dataset with cluster ids as targets (indexed by ORIGINAL ids)."""

    def __init__(self, base, assign: np.ndarray):
        self.base, self.assign = base, assign

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, _, _ = self.base[i]
        return img, int(self.assign[i])


@dataclass(frozen=True)
class Speed:
    """How forward passes run (recorded options; the defaults are plain fp32 NCHW)."""

    bf16: bool = False
    channels_last: bool = False

    @classmethod
    def of(cls, cfg: PretrainConfig) -> "Speed":
        return cls(cfg.precision == "bf16", cfg.channels_last)

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def inputs(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        x = x.to(device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def resolve_loader(cfg: PretrainConfig, device: torch.device) -> str:
    """``cfg.loader`` for this run: auto is gpu on CUDA with an image folder, else cpu."""
    if cfg.loader == "gpu" and device.type != "cuda":
        raise UserError(f"--loader gpu decodes and crops images on a CUDA GPU, but this run's "
                        f"device is {device} (--device {cfg.device}); use --loader cpu.")
    if cfg.loader == "auto":
        return "gpu" if device.type == "cuda" and cfg.data is not None else "cpu"
    return cfg.loader


@torch.no_grad()
def extract_features(model: TapNet, dataset, batch_size: int, workers: int,
                     device: torch.device, desc: str = "features",
                     dist: Dist = Dist(), speed: Speed = Speed(),
                     gpu: GpuInputs | None = None) -> np.ndarray | None:
    """fc7 before its ReLU for every image, in order, in eval mode (each rank extracts its
    shard; rank 0 gets all rows, the other ranks None). ``gpu``: the batches of the GPU
    input pipeline instead of a DataLoader over ``dataset``."""
    model.eval()
    n = len(dataset)
    if gpu is None:
        part = dataset if not dist.grouped else Subset(dataset, shard(n, dist).tolist())
        loader = DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=workers)
        inputs = (x for x, _, _ in loader_batches(loader))
    else:
        loader = inputs = gpu.extraction(range(n) if not dist.grouped else shard(n, dist),
                                         batch_size)
    out = [torch.zeros(0, embed_dim(model))]
    for x in tqdm(inputs, total=len(loader), desc=desc, leave=False,
                  mininterval=2, disable=not dist.is_main):
        with speed.autocast(device):
            out.append(model.embed(speed.inputs(x, device)).float().cpu())
    return gather_rows(torch.cat(out), n, dist, device)


@dataclass
class ResumeState:
    epoch: int = 0
    prev_assign: np.ndarray | None = None


class Assignments:
    """Append-only int32 file of per-epoch cluster assignments (one row of N per epoch)."""

    def __init__(self, path: Path, n: int):
        self.path, self.n = path, n

    def truncate(self, epochs: int) -> None:
        if self.path.exists():
            with open(self.path, "r+b") as f:
                f.truncate(epochs * self.n * 4)

    def append(self, assign: np.ndarray) -> None:
        with open(self.path, "ab") as f:
            f.write(np.ascontiguousarray(assign, dtype=np.int32).tobytes())


def _truncate_log(path: Path, epochs: int) -> None:
    """Keep only the log lines of epochs < ``epochs`` (a crash may have left one more)."""
    if not path.exists():
        return
    kept = []
    for ln in path.read_text().splitlines():
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:  # blank, or a line cut short by a crash
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int) and row["epoch"] < epochs:
            kept.append(ln)
    atomic_write(path, "".join(ln + "\n" for ln in kept))


def _resume(cfg: PretrainConfig, out: Path, model: TapNet, opt: torch.optim.Optimizer
            ) -> ResumeState:
    ckpt_path = out / "checkpoint.pth"
    if not ckpt_path.exists():
        raise UserError(f"--resume: no checkpoint at {ckpt_path}. Start without --resume, or "
                        "point --out at the folder of the run to continue.")
    ck = read_checkpoint_file(ckpt_path)
    if ck.get("format") != FORMAT or "optimizer" not in ck:
        raise UserError(f"--resume: {ckpt_path} is not a training checkpoint of this suite "
                        "(no optimizer state); it can be evaluated but not resumed.")
    saved = ck.get("config", {})
    changed = {f: (saved.get(f), getattr(cfg, f)) for f in PretrainConfig.SHAPE_FIELDS
               if saved.get(f) != getattr(cfg, f)}
    if changed:
        raise UserError(f"--resume: these settings differ from the run in {out}: "
                        + ", ".join(f"{k} (run {a!r}, now {b!r})" for k, (a, b) in changed.items())
                        + ". Use the same flags, or a new --out.")
    sd = {k.replace("features.module.", "features."): v for k, v in ck["state_dict"].items()
          if not k.startswith("top_layer.")}
    model.load_state_dict(sd, strict=True)
    opt.load_state_dict(ck["optimizer"])
    # load_state_dict restores the saved hyper-parameters too: the flags of this call win
    # (e.g. --resume --lr 0.01 after a divergence), the momentum buffers are kept
    for group in opt.param_groups:
        group.update(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    prev = ck.get("assign")
    return ResumeState(epoch=int(ck["epoch"]),
                       prev_assign=prev.numpy().astype(np.int64) if prev is not None else None)


def _train_epoch(model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer,
                 head_opt: torch.optim.Optimizer, device: torch.device, epoch: int,
                 dist: Dist = Dist(), speed: Speed = Speed()) -> float:
    """One pass; ``model`` may be DistributedDataParallel (then the loss checked and logged
    is the global batch's: every rank stops together on a NaN)."""
    model.train()
    crit = nn.CrossEntropyLoss()
    total, count = 0.0, 0
    bar = tqdm(loader_batches(loader), total=len(loader), desc=f"train {epoch}", leave=False,
               mininterval=2, disable=not dist.is_main)
    for it, (x, y) in enumerate(bar):
        x, y = speed.inputs(x, device), y.to(device, non_blocking=True)
        with speed.autocast(device):
            loss = crit(model(x).float(), y)
        lr = opt.param_groups[0]["lr"]
        step_sum, step_count = sum_all([loss.item() * len(y), float(len(y))], dist, device)
        check_finite_loss(step_sum / step_count, f"epoch {epoch}, iteration {it}",
                          f"rerun with a lower --lr (now {lr}): no epoch had finished"
                          if epoch == 0 else f"lower --lr (now {lr}) and continue from the "
                          f"intact checkpoint of epoch {epoch} with --resume")
        opt.zero_grad(set_to_none=True)
        head_opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        head_opt.step()
        total += step_sum
        count += step_count
    return total / max(count, 1)


def run(cfg: PretrainConfig, out: str | Path, resume: bool = False, dist: Dist = Dist()
        ) -> Path:
    """Pretrain DeepCluster as ``cfg`` says; return the checkpoint path. ``dist``: this
    process's rank in a data-parallel job (every rank calls ``run``)."""
    cfg = cfg.validate()
    out = Path(out).expanduser()
    device = resolve_device(cfg.device)
    resolve_loader(cfg, device)  # --loader gpu without a GPU: before any work
    if cfg.sync_bn and dist.world_size > 1 and device.type != "cuda":
        raise UserError("--sync-bn needs GPUs (torch's SyncBatchNorm runs on CUDA only); "
                        "drop it on CPU.")
    if cfg.batch_size % dist.world_size:
        raise UserError(f"--batch-size {cfg.batch_size} does not split over {dist.world_size} "
                        "processes; use a multiple of the number of processes.")
    make_ds, labels, desc = load_pretrain_data(cfg)
    data = (make_ds(train_transform(cfg.input_size)),
            make_ds(eval_transform(cfg.resize_size, cfg.input_size)), labels)
    n = len(data[1])
    if cfg.k > n:
        raise UserError(f"--k {cfg.k} is larger than the number of images N={n} in {desc}; "
                        "lower --k (the paper uses k = 10,000 for 1.28M images).")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the run (it is created "
                        "if missing).")
    with ExitStack() as stack:
        def checks() -> None:  # rank 0 holds the lock and writes every file
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise write_error(out, e) from None
            stack.enter_context(run_lock(out))
            remove_stale_temps(out)
            if not resume and (out / "checkpoint.pth").exists():
                raise UserError(f"{out} already holds a run (checkpoint.pth). Pass --resume "
                                "to continue it, or choose another --out.")

        on_main(dist, checks)  # the other ranks wait for it, and stop with its error
        if dist.is_main:
            log.info("DeepCluster on %s (N=%d), %s sobel=%s k=%d, lr %g (%s), device %s%s",
                     desc, n, cfg.arch, cfg.sobel, cfg.k, cfg.lr, cfg.lr_rule, device,
                     f", {dist.world_size} processes ({dist.backend})" if dist.grouped else "")
        return _train(cfg, out, resume, data, device, dist)


@contextmanager
def run_lock(out: Path):
    """Hold ``out/.lock`` (pid, host, SLURM job) for the run: a second process on the same
    folder is one clear error; a lock left by a dead process of this host, or by an earlier run
    of this very SLURM job (a requeue: SLURM ended it first), is reported and taken over."""
    path = out / LOCK
    job = os.environ.get("SLURM_JOB_ID")
    owner = take(path, job)
    if owner is not None and (owner.alive() is False or (job and owner.job == job)):
        log.warning("removing the stale lock %s of %s (that process no longer runs)", path,
                    owner.describe())
        path.unlink(missing_ok=True)
        owner = take(path, job)
    if owner is not None:
        raise UserError(f"run folder {out} is in use by {owner.describe()} (lock {path}). Wait "
                        "for that run to end or use another --out; if no such process runs "
                        f"any more (its machine went down), delete {path}.")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def feature_health(feats: np.ndarray, pca: clustering.PCAWhitening) -> dict:
    """Per-epoch signs of a collapsing representation: feature norms and the effective rank
    of the feature spectrum (both fall sharply before the PCA can no longer be fitted)."""
    norms = np.linalg.norm(feats, axis=1)
    ev = pca.eigenvalues
    return {"norm_mean": round(float(norms.mean()), 4), "norm_std": round(float(norms.std()), 4),
            "effective_rank": round(pca.effective_rank, 2),
            "tail_ratio": float(f"{float(ev[-1] / ev[0]):.3g}")}


def _collapse_advice(cfg: PretrainConfig, epoch: int, out: Path) -> str:
    return (f"at epoch {epoch} (features of the network trained for {epoch} epoch(s)): lower "
            f"--lr (now {cfg.lr}: {cfg.lr_rule}; e.g. --lr {cfg.lr / 4:g}) and start a new run "
            f"in another --out: the weights saved in {out} already produce these features")


def _nonfinite(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Names of parameters, buffers and momentum buffers holding NaN or inf."""
    bad = [k for k, v in model.state_dict().items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    for group in opt.state.values():
        bad += [f"optimizer.{k}" for k, v in group.items()
                if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    return bad


@dataclass
class Clustering:
    """What rank 0's clustering of one epoch gives every rank (and the log)."""

    assign: np.ndarray
    kmeans_loss: float
    empty_splits: int
    health: dict
    seconds: dict


def _cluster(cfg: PretrainConfig, feats: np.ndarray, epoch: int, out: Path, backend: str,
             device: torch.device) -> Clustering:
    """PCA-whitening + L2 + k-means of one epoch's features (rank 0)."""
    t0 = time.perf_counter()
    try:
        pca = clustering.fit_pca_whitening(feats, cfg.pca_dim, device=device)  # GPU: fp64 there
    except clustering.FeatureCollapse as e:
        raise UserError(f"{e}: {_collapse_advice(cfg, epoch, out)}.") from None
    health = feature_health(feats, pca)
    if health["tail_ratio"] < COLLAPSE_WARNING_TAIL:
        log.warning("epoch %d: eigenvalue %d of the features is only %.2g of the largest "
                    "(effective rank %.1f): the representation may be collapsing; if the "
                    "next epochs fail, %s", epoch, cfg.pca_dim, health["tail_ratio"],
                    health["effective_rank"], _collapse_advice(cfg, epoch, out))
    x = pca.transform(torch.from_numpy(feats)).numpy()
    t1 = time.perf_counter()
    km = clustering.kmeans(x, cfg.k, niter=cfg.kmeans_iters,
                           seed=derive_seed(cfg.seed, epoch, 1) % (2**31), backend=backend,
                           device=device)
    return Clustering(np.asarray(km.assign, dtype=np.int64), float(km.loss),
                      int(km.empty_splits), health,
                      {"pca": t1 - t0, "kmeans": time.perf_counter() - t1})


def _train(cfg: PretrainConfig, out: Path, resume: bool, data, device,
           dist: Dist = Dist()) -> Path:
    ds_train, ds_eval, labels = data
    n = len(ds_eval)
    backend = cfg.kmeans_backend
    if backend == "auto":
        backend = "faiss" if "faiss" in clustering.available_backends() else "torch"
    torch.manual_seed(cfg.seed)
    model = build_model(ModelSpec(cfg.arch, cfg.sobel, cfg.fc_dim, None)).to(device)
    speed = Speed.of(cfg)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and dist.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = sgd(model.trainable_parameters(), lr=cfg.lr, momentum=cfg.momentum,
              weight_decay=cfg.weight_decay)
    state = _resume(cfg, out, model, opt) if resume else ResumeState()
    assignments = Assignments(out / "assignments.bin", n)
    if dist.is_main:
        assignments.truncate(state.epoch)
        _truncate_log(out / "log.jsonl", state.epoch)
        atomic_write_json(out / "config.json", cfg.to_dict())
    prev = state.prev_assign
    gpu = (GpuInputs(images_of(ds_eval), cfg.input_size, cfg.resize_size, device)
           if resolve_loader(cfg, device) == "gpu" else None)
    if gpu is not None and dist.is_main:
        log.info("GPU input pipeline: decoding and cropping on %s", device)
    for epoch in range(state.epoch, cfg.epochs):
        torch.manual_seed(derive_seed(cfg.seed, epoch))
        t = {"start": time.perf_counter()}
        feats = extract_features(model, ds_eval, max(cfg.batch_size, FEATURE_BATCH), cfg.workers,
                                 device, desc=f"features {epoch}", dist=dist, speed=speed,
                                 gpu=gpu)
        t["features"] = time.perf_counter()
        cl = on_main(dist, partial(_cluster, cfg, feats, epoch, out, backend, device))
        feats = None  # freed before training
        t["pca"] = t["features"] + cl.seconds["pca"]
        t["kmeans"] = time.perf_counter()
        assign = cl.assign
        if dist.is_main:
            assignments.append(assign)

        sampler = make_sampler(cfg.sampler, assign, cfg.reassign, derive_seed(cfg.seed, epoch, 2))
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, 3))
        draws = SeededDraws(PseudoLabelled(ds_train, assign), derive_seed(cfg.seed, "crops"))
        draws.set_epoch(epoch)  # crops: a function of (seed, epoch, draw), whatever --workers
        # the same global batches on any number of ranks, each rank one slice of each
        batches = rank_batches(list(EnumeratedSampler(sampler)), cfg.batch_size, dist)
        loader = DataLoader(draws, batch_sampler=batches, num_workers=cfg.workers,
                            generator=gen)
        if gpu is not None:  # the same (draw, index) batches and boxes, made on the GPU
            loader = gpu.training(batches, assign, draws.seed, epoch)
        model.top_layer = make_top_layer(embed_dim(model), cfg.k).to(device)
        head_opt = sgd(model.top_layer.parameters(), lr=cfg.head_lr,
                       weight_decay=cfg.head_weight_decay)
        net: nn.Module = model
        if dist.grouped:  # rebuilt every epoch: the head is new (rank 0's copy is broadcast)
            net = DistributedDataParallel(model, device_ids=[torch.cuda.current_device()]
                                          if device.type == "cuda" else None)
            if dist.world_size > 1:  # dropout masks differ across ranks
                torch.manual_seed(derive_seed(cfg.seed, epoch, 4, dist.rank))
        train_loss = _train_epoch(net, loader, opt, head_opt, device, epoch, dist=dist,
                                  speed=speed)
        t["train"] = time.perf_counter()
        bad = _nonfinite(model, opt)
        if bad:  # never let a broken state replace the last good checkpoint
            kept = (f"the checkpoint of epoch {epoch} in {out} is intact: continue it with "
                    f"--resume and a lower --lr" if epoch > 0 else
                    "no checkpoint was written: rerun with a lower --lr")
            raise UserError(f"after the last step of epoch {epoch} the network holds NaN/inf "
                            f"({len(bad)} tensors, e.g. {bad[0]}): training diverged (--lr "
                            f"{cfg.lr}, --momentum {cfg.momentum}); {kept} (now {cfg.lr}).")
        if dist.is_main:
            _save_epoch(cfg, out, model, opt, epoch, assign, prev, labels, cl, train_loss, t,
                        len(sampler), n, dist)
        prev = assign
    return out / "checkpoint.pth"


def _save_epoch(cfg: PretrainConfig, out: Path, model: TapNet, opt, epoch: int,
                assign: np.ndarray, prev, labels, cl: Clustering, train_loss: float, t: dict,
                draws: int, n: int, dist: Dist) -> None:
    """Rank 0: the epoch's log line, then its checkpoint."""
    sizes = np.bincount(assign, minlength=cfg.k)
    row = {
        "epoch": epoch,
        "nmi_prev": None if prev is None else clustering.nmi(prev, assign),
        "nmi_labels": None if labels is None or (labels < 0).any()
        else clustering.nmi(labels, assign),
        "kmeans_loss": cl.kmeans_loss, "train_loss": train_loss,
        "empty_clusters": int((sizes == 0).sum()), "empty_splits": cl.empty_splits,
        "cluster_size": {"min": int(sizes.min()), "median": float(np.median(sizes)),
                         "max": int(sizes.max())},
        "features": cl.health,
        "seconds": {k: round(t[k] - t[p], 3) for p, k in
                    zip(["start", "features", "pca", "kmeans"],
                        ["features", "pca", "kmeans", "train"])}
        | {"total": round(t["train"] - t["start"], 3)},
        "img_per_s": {"features": round(n / max(t["features"] - t["start"], 1e-9), 1),
                      "train": round(draws / max(t["train"] - t["kmeans"], 1e-9), 1)},
        "world_size": dist.world_size,
    }
    # log first, checkpoint last: a crash in between is undone by _truncate_log on resume
    try:
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        raise write_error(out / "log.jsonl", e) from None
    atomic_torch_save({
        "format": FORMAT, "epoch": epoch + 1, "arch": cfg.arch,
        "state_dict": to_released_keys(model.state_dict()), "optimizer": opt.state_dict(),
        "config": cfg.to_dict(), "k": cfg.k, "sobel": cfg.sobel, "fc_dim": cfg.fc_dim,
        "assign": torch.from_numpy(assign.astype(np.int32)),
        "world_size": dist.world_size,
    }, out / "checkpoint.pth")
    log.info("epoch %d: nmi_prev %s nmi_labels %s kmeans %.4g loss %.4f empty %d eff.rank "
             "%.1f (%.1fs)", epoch, _fmt(row["nmi_prev"]), _fmt(row["nmi_labels"]),
             row["kmeans_loss"], train_loss, row["empty_clusters"],
             cl.health["effective_rank"], row["seconds"]["total"])


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"
