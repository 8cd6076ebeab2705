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

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms as T
from tqdm import tqdm

from dcbench.core import IMAGENET_MEAN, IMAGENET_STD, SeededDraws, UserError, derive_seed
from pretrain.data import loader_batches
from pretrain.models import TapNet

from .backbone import load_cell_checkpoint
from .context import TaskContext
from .datasets import VOC_YEARS
from .datasets.voc import NUM_CLASSES, VOC_CLASSES, VocClassification
from .finetune import (check_frozen, check_recipe, fc_layers,
                       freeze_batchnorm, frozen_fingerprint, set_trainable, train_iterations)
from .metrics import classification_map
from .records import Measurement

log = logging.getLogger(__name__)
MODES = ("fc6-8", "all")
PAPER_LR = {"fc6-8": 0.003, "all": 0.001}
PAPER_LR_STEP = {"fc6-8": 5_000, "all": 20_000}


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
        check_recipe(where, self, MODES, ints=("iterations", "batch_size", "input_size",
                                               "test_crops"),
                     numbers=(("lr", {"above": 0, "maximum": 10}),
                              ("momentum", {"minimum": 0, "below": 1}),
                              ("weight_decay", {"minimum": 0, "maximum": 1}),
                              ("grad_clip", {"above": 0}),
                              ("lr_gamma", {"above": 0, "maximum": 1}),
                              ("init_std", {"above": 0}), ("init_bias", {})),
                     splits=("train", "val", "trainval", "test"))
        if self.bn_affine_trainable and self.mode != "fc6-8":
            raise UserError(f"{where}: bn_affine_trainable applies to mode fc6-8 only.")
        if self.lr_step is not None and (not isinstance(self.lr_step, int) or self.lr_step < 1):
            raise UserError(f"{where}: lr_step must be an integer >= 1.")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise UserError(f"{where}: crop_scale must satisfy 0 < min <= max <= 1.")
        if self.ap not in ("sklearn", "voc07", "voc10"):
            raise UserError(f"{where}: ap must be sklearn, voc07 or voc10 (got {self.ap!r}).")

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
        fc_layers(trunk, "voc_classification")
        trunk.top_layer = None
        self.trunk = trunk
        self.fc8 = nn.Linear(trunk.spec.fc_dim, NUM_CLASSES)
        gen = torch.Generator().manual_seed(derive_seed(seed, "voc-init"))
        with torch.no_grad():
            for m in [*(m for m in trunk.classifier if isinstance(m, nn.Linear)), self.fc8]:
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * cfg.init_std)
                m.bias.fill_(cfg.init_bias)
        set_trainable(self, self.trained_parameters(cfg))

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
        freeze_batchnorm(self)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc8(self.trunk.forward_taps(x, ["fc7"])["fc7"])


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


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE on the non-ignored entries (target 1 / 0; -1 ignored), summed / batch size."""
    keep = (target >= 0).to(logits.dtype)
    per = nn.functional.binary_cross_entropy_with_logits(logits, target.clamp(min=0),
                                                         reduction="none")
    return (per * keep).sum() / logits.shape[0]


def _batch_loss(net: "VocNet", batch) -> torch.Tensor:
    x, y, _ = batch
    device = next(net.parameters()).device
    return _loss(net(x.to(device, non_blocking=True)), y.to(device))


def train(net: VocNet, data: VocClassification, cfg: VocClassificationConfig,
          ctx: TaskContext) -> dict:
    """Train ``net`` on ``data`` to ``cfg.iterations``, resuming from the state folder."""
    return train_iterations(net, data, cfg, ctx, loss_of=_batch_loss, lr_at=cfg.lr_at,
                            tag="voc", grad_clip=cfg.grad_clip)


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
    check_frozen(net, before, "VOC classification")
    scores = test_scores(net, test_data, cfg, ctx)
    mean_ap, aps = classification_map(test_data.labels, scores, cfg.ap)
    ctx.clear_state()
    per_class = {c: (None if math.isnan(a) else round(100 * float(a), 3))
                 for c, a in zip(VOC_CLASSES, aps)}
    details = {**info, "per_class_ap": per_class, "lr": cfg.base_lr, "lr_step": cfg.step,
               "ap": cfg.ap, "data": {"train": len(train_data), "test": len(test_data),
                                      "train_split": cfg.train_split,
                                      "test_split": cfg.test_split}}
    return [Measurement(f"classification/{cfg.mode}", "mAP", round(100 * float(mean_ap), 4),
                        "final", f"{cfg.test_crops}crops", details)]
