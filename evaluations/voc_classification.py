"""Pascal VOC2007 classification, fc6-8 or all layers (paper Table 2; PROTOCOLS.md §3).

The network is the checkpoint's own (Sobel, conv trunk, fc6, fc7) with fc6 and fc7
re-initialised and a new 20-way fc8. ``fc6-8``: the conv layers AND their BatchNorm affine
parameters frozen (the authors' erratum; ``bn_affine_trainable`` is the variant behind the
paper's 72.0); ``all``: everything but the Sobel filter trained. BatchNorm always uses its
running statistics; dropout is active while training. Multi-label BCE on the present (1) and
absent (0) labels, the difficult-only entries ignored, summed and divided by the batch size;
SGD with momentum, weight decay, gradient-norm clipping and a step schedule, counted in
iterations. Test: ten random crops drawn like the training ones, logits summed; AP per class
as the authors computed it (scikit-learn AP on the non-ignored entries), mAP over 20.

Training checkpoints its own state (trained tensors, optimizer, iteration, RNG) every
``runtime.save_every`` iterations in the cell's state folder, so a killed or requeued cell
resumes there and ends with the same numbers. After training, every frozen parameter and every
BatchNorm buffer must be bit-identical to the checkpoint's (MoCo's sanity check): the cell
fails loudly otherwise.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms as T
from tqdm import tqdm

from dcbench.core import (IMAGENET_MEAN, IMAGENET_STD, SeededDraws, UserError, check_finite_loss,
                          check_number, derive_seed)
from pretrain.checkpoint import atomic_torch_save
from pretrain.data import loader_batches
from pretrain.models import TapNet

from .backbone import load_cell_checkpoint
from .context import TaskContext
from .datasets import VOC_YEARS
from .datasets.voc import NUM_CLASSES, VOC_CLASSES, VocClassification
from .metrics import classification_map
from .records import Measurement

log = logging.getLogger(__name__)
MODES = ("fc6-8", "all")
PAPER_LR = {"fc6-8": 0.003, "all": 0.001}
PAPER_LR_STEP = {"fc6-8": 5_000, "all": 20_000}
STATE_FILE = "train_state.pth"


@dataclass(frozen=True)
class VocClassificationConfig:
    """The recipe; defaults: the paper's protocol (Caffe schedule, 150,000 iterations; the
    authors' PyTorch port used 80,000)."""

    mode: str = "fc6-8"  # fc6-8 | all
    bn_affine_trainable: bool = False  # fc6-8 only: BN scales/shifts trained (the paper's 72.0)
    iterations: int = 150_000
    batch_size: int = 16
    lr: float | None = None  # None: 0.003 (fc6-8) / 0.001 (all)
    lr_step: int | None = None  # None: every 5,000 (fc6-8) / 20,000 (all) iterations
    lr_gamma: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 1e-6
    grad_clip: float = 10.0
    input_size: int = 224
    crop_scale: tuple[float, float] = (0.1, 0.5)  # RandomResizedCrop area, aspect ratio 1
    test_crops: int = 10
    train_split: str = "trainval"  # trainval -> test (the table); train -> val (tuning)
    test_split: str = "test"
    ap: str = "sklearn"  # sklearn (the authors') | voc07 (11-point) | voc10 (area)
    init_std: float = 0.01  # fc6, fc7, fc8: weights N(0, init_std), biases init_bias
    init_bias: float = 0.1

    def __post_init__(self):
        where = "voc_classification"
        if self.mode not in MODES:
            raise UserError(f"{where}: mode must be one of {MODES} (got {self.mode!r}).")
        if self.bn_affine_trainable and self.mode != "fc6-8":
            raise UserError(f"{where}: bn_affine_trainable applies to mode fc6-8 only.")
        for name in ("iterations", "batch_size", "input_size", "test_crops"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"{where}: {name} must be an integer >= 1.")
        for name, kw in (("lr", {"above": 0, "maximum": 10}), ("momentum", {"minimum": 0,
                                                                             "below": 1}),
                         ("weight_decay", {"minimum": 0, "maximum": 1}),
                         ("grad_clip", {"above": 0}), ("lr_gamma", {"above": 0, "maximum": 1}),
                         ("init_std", {"above": 0}), ("init_bias", {})):
            if getattr(self, name) is not None:
                check_number(where, name, getattr(self, name), **kw)
        if self.lr_step is not None and (not isinstance(self.lr_step, int) or self.lr_step < 1):
            raise UserError(f"{where}: lr_step must be an integer >= 1.")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise UserError(f"{where}: crop_scale must satisfy 0 < min <= max <= 1.")
        if self.ap not in ("sklearn", "voc07", "voc10"):
            raise UserError(f"{where}: ap must be sklearn, voc07 or voc10 (got {self.ap!r}).")
        splits = ("train", "val", "trainval", "test")
        if self.train_split not in splits or self.test_split not in splits:
            raise UserError(f"{where}: splits must be among {splits}.")

    @property
    def base_lr(self) -> float:
        return PAPER_LR[self.mode] if self.lr is None else self.lr

    @property
    def step(self) -> int:
        return PAPER_LR_STEP[self.mode] if self.lr_step is None else self.lr_step

    def lr_at(self, iteration: int) -> float:
        return self.base_lr * self.lr_gamma ** (iteration // self.step)


# --------------------------------------------------------------------------- the network


class VocNet(nn.Module):
    """The checkpoint's network up to fc7 (re-initialised fc6, fc7) and a new 20-way fc8."""

    def __init__(self, trunk: TapNet, cfg: VocClassificationConfig, seed: int) -> None:
        super().__init__()
        if trunk.spec.arch not in ("alexnet", "vgg16"):
            raise UserError(f"voc_classification needs a network with fc6/fc7 (AlexNet or "
                            f"VGG16); the checkpoint holds a {trunk.spec.arch}.")
        trunk.top_layer = None
        self.trunk = trunk
        self.fc8 = nn.Linear(trunk.spec.fc_dim, NUM_CLASSES)
        gen = torch.Generator().manual_seed(derive_seed(seed, "voc-init"))
        with torch.no_grad():
            for m in [*(m for m in trunk.classifier if isinstance(m, nn.Linear)), self.fc8]:
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * cfg.init_std)
                m.bias.fill_(cfg.init_bias)
        for p in self.parameters():
            p.requires_grad = False
        for p in self.trained_parameters(cfg):
            p.requires_grad = True

    def trained_parameters(self, cfg: VocClassificationConfig) -> list[nn.Parameter]:
        if cfg.mode == "all":
            sobel = set() if self.trunk.sobel is None else set(self.trunk.sobel.parameters())
            return [p for p in self.parameters() if p not in sobel]
        params = [*self.trunk.classifier.parameters(), *self.fc8.parameters()]
        if cfg.bn_affine_trainable:
            params += [p for m in self.trunk.modules() if isinstance(m, nn.BatchNorm2d)
                       for p in m.parameters()]
        return params

    def train(self, mode: bool = True) -> "VocNet":
        """Dropout follows ``mode``; BatchNorm always uses its running statistics."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc8(self.trunk.forward_taps(x, ["fc7"])["fc7"])


def frozen_fingerprint(net: VocNet) -> str:
    """sha256 of every tensor that must not change: the untrained parameters and every
    BatchNorm buffer (running mean/var, counts)."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict(keep_vars=True).items()):
        frozen = not (isinstance(t, nn.Parameter) and t.requires_grad)
        if frozen:
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- data


def crop_transform(cfg: VocClassificationConfig) -> T.Compose:
    """RandomResizedCrop (area ``crop_scale``, aspect 1) + flip + ImageNet normalisation."""
    return T.Compose([T.RandomResizedCrop(cfg.input_size, scale=cfg.crop_scale, ratio=(1, 1)),
                      T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class _RandomCrops:
    """``n`` crops of one image drawn like the training crops, stacked (picklable)."""

    def __init__(self, crop: T.Compose, n: int) -> None:
        self.crop, self.n = crop, n

    def __call__(self, img) -> torch.Tensor:
        return torch.stack([self.crop(img) for _ in range(self.n)])


class IterationSampler:
    """``(draw, index)`` for draws ``start * batch .. iterations * batch - 1``: passes over the
    data in an order fixed by ``(seed, pass)``, so any iteration can be resumed exactly."""

    def __init__(self, n: int, batch: int, iterations: int, start: int, seed: int) -> None:
        self.n, self.batch, self.seed = n, batch, seed
        self.first, self.last = start * batch, iterations * batch
        self._order: tuple[int, np.ndarray] | None = None

    def _index(self, draw: int) -> int:
        epoch, pos = divmod(draw, self.n)
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng(derive_seed(self.seed, "voc-order", epoch))
            self._order = (epoch, rng.permutation(self.n))
        return int(self._order[1][pos])

    def __iter__(self):
        return ((d, self._index(d)) for d in range(self.first, self.last))

    def __len__(self) -> int:
        return self.last - self.first


# --------------------------------------------------------------------------- training


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE on the non-ignored entries (target 1 / 0; -1 ignored), summed / batch size."""
    keep = (target >= 0).to(logits.dtype)
    per = nn.functional.binary_cross_entropy_with_logits(logits, target.clamp(min=0),
                                                         reduction="none")
    return (per * keep).sum() / logits.shape[0]


def _save_state(path: Path, it: int, net: VocNet, opt: torch.optim.Optimizer,
                cfg: VocClassificationConfig) -> None:
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    atomic_torch_save({"iteration": it, "recipe": repr(cfg), "rng": torch.get_rng_state(),
                       "params": {n: t for n, t in net.state_dict().items() if n in trained},
                       "optimizer": opt.state_dict()}, path)


def _load_state(path: Path, net: VocNet, opt: torch.optim.Optimizer,
                cfg: VocClassificationConfig) -> int:
    if not path.is_file():
        return 0
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a state file cut short: start over
        log.warning("ignored the unreadable training state %s (%s); starting over", path, e)
        return 0
    if st.get("recipe") != repr(cfg):
        log.warning("ignored the training state %s of another recipe; starting over", path)
        return 0
    net.load_state_dict(st["params"], strict=False)
    opt.load_state_dict(st["optimizer"])
    torch.set_rng_state(st["rng"])
    log.info("resuming %s at iteration %d", path.parent.name, st["iteration"])
    return int(st["iteration"])


def train(net: VocNet, data: VocClassification, cfg: VocClassificationConfig,
          ctx: TaskContext) -> dict:
    """Train ``net`` on ``data`` to ``cfg.iterations``, resuming from the state folder."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.base_lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    state = ctx.state_dir / STATE_FILE
    torch.manual_seed(derive_seed(ctx.seed, "voc-dropout"))
    start = _load_state(state, net, opt, cfg)
    draws = SeededDraws(data, derive_seed(ctx.seed, "voc-crops"))
    # its own generator: creating the loader must not draw from the RNG the dropout uses
    loader = DataLoader(draws, batch_size=cfg.batch_size, num_workers=ctx.runtime.workers,
                        sampler=IterationSampler(len(data), cfg.batch_size, cfg.iterations,
                                                 start, ctx.seed),
                        generator=torch.Generator().manual_seed(ctx.seed))
    net.train()
    t0, it, seen = time.perf_counter(), start, 0
    for x, y, _ in tqdm(loader_batches(loader), total=len(loader), desc="voc train",
                        leave=False, mininterval=2):
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(it)
        loss = _loss(net(x.to(ctx.device, non_blocking=True)), y.to(ctx.device))
        check_finite_loss(loss.item(), f"VOC classification iteration {it}",
                          f"lower the lr (now {cfg.lr_at(it):g}) in the suite's [cell.config]")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        it += 1
        seen += len(y)
        if it % ctx.runtime.save_every == 0 and it < cfg.iterations:
            _save_state(state, it, net, opt, cfg)
    seconds = time.perf_counter() - t0
    return {"iterations": it, "resumed_from": start, "train_seconds": round(seconds, 2),
            "train_img_per_s": round(seen / max(seconds, 1e-9), 1)}


@torch.no_grad()
def test_scores(net: VocNet, data: VocClassification, cfg: VocClassificationConfig,
                ctx: TaskContext) -> np.ndarray:
    """Summed logits of ``cfg.test_crops`` random crops per image, [N, 20]."""
    net.eval()
    draws = SeededDraws(data, derive_seed(ctx.seed, "voc-test-crops"))
    pairs = [(i, i) for i in range(len(data))]  # draw = image index: its crops are fixed
    loader = DataLoader(draws, batch_size=max(1, 64 // cfg.test_crops), sampler=pairs,
                        num_workers=ctx.runtime.workers,
                        generator=torch.Generator().manual_seed(ctx.seed))
    out = []
    for x, _, _ in tqdm(loader_batches(loader), total=len(loader), desc="voc test",
                        leave=False, mininterval=2):
        b, n = x.shape[:2]
        logits = net(x.flatten(0, 1).to(ctx.device)).float().view(b, n, -1).sum(dim=1)
        out.append(logits.cpu())
    return torch.cat(out).numpy()


def run(cfg: VocClassificationConfig, ctx: TaskContext) -> list[Measurement]:
    """Train and test one mode; one ``mAP`` measurement with the per-class APs, the resolved
    schedule and the data sizes in its details."""
    net = VocNet(load_cell_checkpoint(ctx), cfg, ctx.seed).to(ctx.device)
    before = frozen_fingerprint(net)
    year = VOC_YEARS[ctx.dataset]
    crop = crop_transform(cfg)
    train_data = VocClassification(ctx.data_root, cfg.train_split, year, crop)
    test_data = VocClassification(ctx.data_root, cfg.test_split, year,
                                  _RandomCrops(crop, cfg.test_crops))
    info = train(net, train_data, cfg, ctx)
    if frozen_fingerprint(net) != before:
        raise RuntimeError("a frozen parameter or a BatchNorm buffer changed during VOC "
                           "classification training: the numbers are invalid (a bug in the "
                           "evaluation, or a network whose BatchNorm left eval mode)")
    scores = test_scores(net, test_data, cfg, ctx)
    mean_ap, aps = classification_map(test_data.labels, scores, cfg.ap)
    (ctx.state_dir / STATE_FILE).unlink(missing_ok=True)
    if ctx.state_dir.is_dir() and not any(ctx.state_dir.iterdir()):
        ctx.state_dir.rmdir()
    per_class = {c: (None if math.isnan(a) else round(100 * float(a), 3))
                 for c, a in zip(VOC_CLASSES, aps)}
    details = {**info, "per_class_ap": per_class, "lr": cfg.base_lr, "lr_step": cfg.step,
               "ap": cfg.ap, "data": {"train": len(train_data), "test": len(test_data),
                                      "train_split": cfg.train_split,
                                      "test_split": cfg.test_split}}
    return [Measurement(f"classification/{cfg.mode}", "mAP", round(100 * float(mean_ap), 4),
                        "final", f"{cfg.test_crops}crops", details)]
