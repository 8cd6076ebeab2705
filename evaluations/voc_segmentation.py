"""Pascal VOC2012 semantic segmentation, fc6-8 or all layers (paper Table 2; PROTOCOLS.md §5,
``dc2018-reimpl``: the paper used Caffe FCN with settings never published).

FCN-32s on the checkpoint's network: Sobel (if any) and the conv trunk with its last max-pool
(stride 32); fc6 as a convolution over the grid it was trained on (6x6 AlexNet, 7x7 VGG16)
whose weights are the checkpoint's fc6 reshaped from its ``C * s * s`` inputs (the map is
padded by ``s - 1`` so the output keeps the pool5 size); fc7 as a 1x1 convolution with the
checkpoint's fc7 weights; dropout after both as in the checkpoint; a 21-way 1x1 score layer
(zero-initialised, as FCN); bilinear upsampling of the scores to the input size.

``fc6-8``: the conv layers (and their BatchNorm) frozen, fc6, fc7 and the score layer
trained. ``all``: everything but the Sobel filter trained. BatchNorm always uses its running
statistics. Training: VOC2012 ``train`` (or "train_aug" = train + SBD when ``sbd``, an
explicit recorded option that reads SBD's official ``.mat`` files from the ``sbd`` dataset
role), random rescaling, crops padded with void, flips; per-pixel cross-entropy over the
non-void pixels; SGD with a polynomial ("poly") lr decay. Test on ``val``: whole images,
scores upsampled to the mask's size, one 21x21 confusion matrix over every pixel whose label
is not 255, IoU per class and mIoU over 21 (background included; a class absent from both
ground truth and prediction is left out of the mean, see :func:`~.metrics.miou`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torchvision.transforms import functional as TF
from tqdm import tqdm

from dcbench.core import IMAGENET_MEAN, IMAGENET_STD, UserError
from pretrain.models import TapNet

from .backbone import load_cell_checkpoint
from .context import TaskContext
from .datasets import VOC_YEARS
from .datasets.voc import SEG_CLASSES, VOID, VocSegmentation
from .finetune import (check_frozen, check_recipe, check_test_images, fc_layers, first_images,
                       freeze_batchnorm, frozen_fingerprint, set_trainable, train_iterations,
                       trunk_channels)
from .metrics import confusion_matrix, miou
from .records import Measurement

log = logging.getLogger(__name__)
MODES = ("fc6-8", "all")
NUM_SEG_CLASSES = len(SEG_CLASSES)


@dataclass(frozen=True)
class VocSegmentationConfig:
    """The recipe (a re-implementation: FCN-32s trained with today's usual augmentation)."""

    mode: str = "fc6-8"  # fc6-8 | all
    iterations: int = 30_000
    batch_size: int = 8
    lr: float = 0.01
    lr_power: float = 0.9  # lr = lr * (1 - it / iterations) ** lr_power
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop_size: int = 320  # training crops (padded with void where the image is smaller)
    scale_range: tuple[float, float] = (0.5, 2.0)  # random rescaling before the crop
    hflip: bool = True
    image_scale: float = 1.0  # every image is resized by this first (train and test)
    sbd: bool = False  # train on "train_aug" (VOC2012 train + SBD; needs the sbd role)
    train_split: str = "train"
    test_split: str = "val"
    test_images: int | None = None  # the first N test images (listed order); None: all

    def __post_init__(self):
        where = "voc_segmentation"
        check_recipe(where, self, MODES, ints=("iterations", "batch_size", "crop_size"),
                     numbers=(("lr", {"above": 0, "maximum": 10}),
                              ("lr_power", {"minimum": 0, "maximum": 10}),
                              ("momentum", {"minimum": 0, "below": 1}),
                              ("weight_decay", {"minimum": 0, "maximum": 1}),
                              ("image_scale", {"above": 0, "maximum": 16})),
                     splits=("train", "val", "trainval"))
        check_test_images(where, self.test_images)
        lo, hi = self.scale_range
        if not 0 < lo <= hi <= 16:
            raise UserError(f"{where}: scale_range must satisfy 0 < min <= max <= 16.")
        if self.sbd and self.train_split != "train":
            raise UserError(f"{where}: sbd (train_aug) extends the train split; set "
                            "train_split = 'train'.")

    def lr_at(self, iteration: int) -> float:
        return self.lr * max(0.0, 1.0 - iteration / self.iterations) ** self.lr_power


def extra_roles(cfg: VocSegmentationConfig, role: str) -> tuple[str, ...]:
    """Dataset roles the cell reads besides its own: SBD's root for train_aug."""
    return ("sbd",) if cfg.sbd else ()


# --------------------------------------------------------------------------- the network


class FCN32s(nn.Module):
    """FCN-32s on the checkpoint's network (see the module docstring)."""

    def __init__(self, trunk: TapNet, cfg: VocSegmentationConfig, seed: int) -> None:
        super().__init__()
        fc6, fc7 = fc_layers(trunk, "voc_segmentation")
        channels, fc_dim = trunk_channels(trunk), trunk.spec.fc_dim
        grid = math.isqrt(fc6.in_features // channels)
        if grid * grid * channels != fc6.in_features:
            raise UserError(f"voc_segmentation: fc6 takes {fc6.in_features} inputs, not a "
                            f"square grid of {channels}-channel pool5 features.")
        self.sobel, self.features = trunk.sobel, trunk.features
        self.pad = ((grid - 1) // 2, grid - 1 - (grid - 1) // 2)  # left/top, right/bottom
        self.fc6 = nn.Conv2d(channels, fc_dim, grid)
        self.fc7 = nn.Conv2d(fc_dim, fc_dim, 1)
        dropouts = [m.p for m in trunk.classifier if isinstance(m, nn.Dropout)]
        self.drop6, self.drop7 = nn.Dropout(dropouts[0]), nn.Dropout(dropouts[-1])
        self.score = nn.Conv2d(fc_dim, NUM_SEG_CLASSES, 1)
        with torch.no_grad():
            self.fc6.weight.copy_(fc6.weight.view(fc_dim, channels, grid, grid))
            self.fc6.bias.copy_(fc6.bias)
            self.fc7.weight.copy_(fc7.weight.view(fc_dim, fc_dim, 1, 1))
            self.fc7.bias.copy_(fc7.bias)
            self.score.weight.zero_()
            self.score.bias.zero_()
        self.grid = grid
        set_trainable(self, self.trained_parameters(cfg))

    def trained_parameters(self, cfg: VocSegmentationConfig) -> list[nn.Parameter]:
        if cfg.mode == "all":
            frozen = set() if self.sobel is None else set(self.sobel.parameters())
            return [p for p in self.parameters() if p not in frozen]
        return [*self.fc6.parameters(), *self.fc7.parameters(), *self.score.parameters()]

    def train(self, mode: bool = True) -> "FCN32s":
        """Dropout follows ``mode``; BatchNorm always uses its running statistics."""
        super().train(mode)
        freeze_batchnorm(self)
        return self

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Scores [B, 21, H, W] at ``size`` (default: the input's)."""
        out_size = tuple(x.shape[-2:]) if size is None else size
        h = self.features(self.sobel(x) if self.sobel is not None else x)
        a, b = self.pad
        h = self.drop6(F.relu(self.fc6(F.pad(h, (a, b, a, b)))))
        h = self.drop7(F.relu(self.fc7(h)))
        return F.interpolate(self.score(h), size=out_size, mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- data


def _resize(img: Image.Image, mask: np.ndarray, scale: float) -> tuple[Image.Image, Image.Image]:
    w, h = img.size
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return (img.resize(size, Image.Resampling.BILINEAR),
            Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))


def _normalise(img: Image.Image) -> torch.Tensor:
    return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


class TrainTransform:
    """Rescale by ``image_scale`` x U(scale_range), pad to the crop with the mean (0 after
    normalisation) and void, take a random crop, flip with probability 0.5. Every draw comes
    from torch's RNG, which :class:`~dcbench.core.SeededDraws` seeds per item."""

    def __init__(self, cfg: VocSegmentationConfig) -> None:
        self.cfg = cfg

    def __call__(self, img: Image.Image, mask: np.ndarray):
        cfg = self.cfg
        lo, hi = cfg.scale_range
        scale = cfg.image_scale * (lo + (hi - lo) * torch.rand(1).item())
        img, m = _resize(img, mask, scale)
        x, y = _normalise(img), torch.from_numpy(np.array(m, dtype=np.int64))
        c = cfg.crop_size
        ph, pw = max(0, c - x.shape[1]), max(0, c - x.shape[2])
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), value=0.0)
            y = F.pad(y, (0, pw, 0, ph), value=VOID)
        top = int(torch.randint(x.shape[1] - c + 1, (1,)))
        left = int(torch.randint(x.shape[2] - c + 1, (1,)))
        x, y = x[:, top:top + c, left:left + c], y[top:top + c, left:left + c]
        if cfg.hflip and torch.rand(1).item() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x.contiguous(), y.contiguous()


class TestTransform:
    """The image resized by ``image_scale`` and normalised; the mask as it is (scored at its
    own size)."""

    def __init__(self, cfg: VocSegmentationConfig) -> None:
        self.scale = cfg.image_scale

    def __call__(self, img: Image.Image, mask: np.ndarray):
        if self.scale != 1.0:
            img, _ = _resize(img, mask, self.scale)
        return _normalise(img), torch.from_numpy(mask.astype(np.int64))


def training_set(cfg: VocSegmentationConfig, ctx: TaskContext):
    year = VOC_YEARS[ctx.dataset]
    if not cfg.sbd:
        return VocSegmentation(ctx.data_root, cfg.train_split, year, TrainTransform(cfg))
    from .datasets.sbd import SegmentationUnion

    if "sbd" not in ctx.extra_roots:
        raise UserError("voc_segmentation with sbd = true needs the SBD root: give the "
                        "dataset role sbd (--data-root sbd=PATH or in --datasets FILE).")
    return SegmentationUnion.train_aug(ctx.data_root, ctx.extra_roots["sbd"],
                                       TrainTransform(cfg))


def _batch_loss(net: FCN32s, batch) -> torch.Tensor:
    x, y, _ = batch
    device = next(net.parameters()).device
    return F.cross_entropy(net(x.to(device, non_blocking=True)), y.to(device),
                           ignore_index=VOID)


@torch.no_grad()
def confusion(net: FCN32s, data: VocSegmentation, ctx: TaskContext,
              batch: int = 8) -> np.ndarray:
    """The dataset-level 21x21 confusion matrix of ``net``'s predictions. Consecutive images
    of one size go through the network together (up to ``batch``); each is scored at its
    mask's own size."""
    net.eval()
    conf = np.zeros((NUM_SEG_CLASSES, NUM_SEG_CLASSES), dtype=np.int64)
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def flush() -> None:
        x = torch.stack([p[0] for p in pending]).to(ctx.device)
        pred = net(x, size=tuple(pending[0][1].shape)).argmax(1).cpu()
        for (_, y), p in zip(pending, pred):
            conf[:] += confusion_matrix(y, p, NUM_SEG_CLASSES, VOID)
        pending.clear()

    for i in tqdm(range(len(data)), desc="seg test", leave=False, mininterval=2):
        x, y, _ = data[i]
        if pending and (x.shape != pending[0][0].shape or y.shape != pending[0][1].shape
                        or len(pending) == batch):
            flush()
        pending.append((x, y))
    if pending:
        flush()
    return conf


def run(cfg: VocSegmentationConfig, ctx: TaskContext) -> list[Measurement]:
    """Train and test one mode; one ``mIoU`` measurement with the per-class IoUs, the
    confusion matrix's size and the data sizes in its details."""
    net = FCN32s(load_cell_checkpoint(ctx), cfg, ctx.seed).to(ctx.device)
    before = frozen_fingerprint(net)
    train = training_set(cfg, ctx)
    info = train_iterations(net, train, cfg, ctx, loss_of=_batch_loss,
                            lr_at=cfg.lr_at, tag="seg")
    check_frozen(net, before, "VOC segmentation")
    test = first_images(VocSegmentation(ctx.data_root, cfg.test_split, VOC_YEARS[ctx.dataset],
                                        TestTransform(cfg)), cfg.test_images)
    conf = confusion(net, test, ctx)
    mean_iou, ious = miou(conf)
    ctx.clear_state()
    per_class = {c: (None if math.isnan(v) else round(100 * float(v), 3))
                 for c, v in zip(SEG_CLASSES, ious)}
    details = {**info, "per_class_iou": per_class, "fc6_grid": net.grid,
               "pixels": int(conf.sum()), "sbd": cfg.sbd,
               "data": {"train": len(train), "test": len(test),
                        "train_split": "train_aug" if cfg.sbd else cfg.train_split,
                        "test_split": cfg.test_split}}
    return [Measurement(f"segmentation/{cfg.mode}", "mIoU", round(100 * float(mean_iou), 4),
                        "final", "single-scale", details)]

