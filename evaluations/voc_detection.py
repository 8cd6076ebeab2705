"""Pascal VOC2007 detection, fc6-8 or all layers (paper Table 2; PROTOCOLS.md §4,
``dc2018-reimpl``: the paper used Caffe Fast R-CNN with settings never published).

A two-stage detector made of torchvision's components (``FasterRCNN``: its image transform,
anchor generator, RPN, RoI heads, box coder and NMS) on the checkpoint's network:

* backbone: Sobel (if any) + the conv trunk up to conv5 with the last max-pool dropped
  (stride 16), ImageNet normalisation in the detector's transform;
* RoI features: ``MultiScaleRoIAlign`` to the grid fc6 was trained on (6x6 AlexNet, 7x7
  VGG16), so the box head IS the checkpoint's fc6 and fc7 (with their dropout);
* a new 21-way classifier and box regressor (fc8), N(0, 0.01) / N(0, 0.001) as Fast R-CNN.

``fc6-8``: the conv layers (and their BatchNorm) frozen; fc6, fc7, fc8, the RPN trained.
``all``: everything but the Sobel filter trained. BatchNorm always uses its running
statistics. Defaults follow py-faster-rcnn's VOC2007 end-to-end recipe (600 px shorter side,
at most 1000; 2 images per batch; 256 anchors and 128 RoIs per image, 25 % foreground;
anchors 128/256/512 x ratios 0.5/1/2; SGD lr 0.001, x0.1 at 50k of 70k iterations, momentum
0.9, weight decay 5e-4; horizontal flips; difficult objects not trained on; test: NMS 0.3,
score > 0.05, at most 100 detections per image). Metric: VOC07 11-point AP per class at IoU
>= 0.5 (+1 pixel widths, difficult neither TP nor FP, duplicates FP), mAP over 20.

Boxes: the reader's 0-based inclusive ``[x1, y1, x2, y2]`` become torchvision's continuous
``[x1, y1, x2 + 1, y2 + 1]`` for training; detections go back by ``- 1`` on ``x2, y2`` for the
metric, so widths are the devkit's ``x2 - x1 + 1`` on both sides.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.transforms import functional as TF
from tqdm import tqdm

from dcbench.core import IMAGENET_MEAN, IMAGENET_STD, UserError, derive_seed
from pretrain.data import loader_batches
from pretrain.models import TapNet

from .backbone import load_cell_checkpoint
from .context import TaskContext
from .datasets import VOC_YEARS
from .datasets.voc import NUM_CLASSES, VOC_CLASSES, VocDetection
from .finetune import (Subset, check_frozen, check_recipe, check_test_images, fc_layers,
                       first_images, freeze_batchnorm, frozen_fingerprint, set_trainable,
                       train_iterations, trunk_channels)
from .metrics import detection_map
from .records import Measurement

log = logging.getLogger(__name__)
MODES = ("fc6-8", "all")


@dataclass(frozen=True)
class VocDetectionConfig:
    """The recipe; defaults: py-faster-rcnn's VOC2007 end-to-end schedule (module docstring)."""

    mode: str = "fc6-8"  # fc6-8 | all
    iterations: int = 70_000
    batch_size: int = 2  # images per iteration
    lr: float = 0.001
    lr_step: int = 50_000
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    min_size: int = 600  # shorter image side after resizing
    max_size: int = 1000  # longer side at most
    hflip: bool = True
    anchor_sizes: tuple[int, ...] = (128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_train: int = 12_000
    rpn_post_nms_train: int = 2_000
    rpn_pre_nms_test: int = 6_000
    rpn_post_nms_test: int = 300
    rpn_nms: float = 0.7
    rpn_batch: int = 256  # anchors sampled per image
    roi_batch: int = 128  # RoIs sampled per image
    roi_fg_fraction: float = 0.25
    test_nms: float = 0.3
    test_score: float = 0.05
    detections_per_image: int = 100
    train_difficult: bool = False  # py-faster-rcnn leaves difficult objects out of training
    train_split: str = "trainval"
    test_split: str = "test"
    test_images: int | None = None  # the first N test images (listed order); None: all

    def __post_init__(self):
        where = "voc_detection"
        check_recipe(where, self, MODES, ints=(
            "iterations", "batch_size", "lr_step", "min_size", "max_size", "rpn_pre_nms_train",
            "rpn_post_nms_train", "rpn_pre_nms_test", "rpn_post_nms_test", "rpn_batch",
            "roi_batch", "detections_per_image"), numbers=(
            ("lr", {"above": 0, "maximum": 10}), ("momentum", {"minimum": 0, "below": 1}),
            ("weight_decay", {"minimum": 0, "maximum": 1}),
            ("lr_gamma", {"above": 0, "maximum": 1}), ("rpn_nms", {"above": 0, "maximum": 1}),
            ("roi_fg_fraction", {"above": 0, "maximum": 1}),
            ("test_nms", {"above": 0, "maximum": 1}),
            ("test_score", {"minimum": 0, "below": 1})),
            splits=("train", "val", "trainval", "test"))
        check_test_images(where, self.test_images)
        if self.max_size < self.min_size:
            raise UserError(f"{where}: max_size must be >= min_size.")
        if not self.anchor_sizes or any(not isinstance(s, int) or s < 1
                                        for s in self.anchor_sizes):
            raise UserError(f"{where}: anchor_sizes must be positive integers (pixels).")
        if not self.aspect_ratios or any(not r > 0 for r in self.aspect_ratios):
            raise UserError(f"{where}: aspect_ratios must be positive numbers.")

    def lr_at(self, iteration: int) -> float:
        return self.lr * self.lr_gamma ** (iteration // self.lr_step)


# --------------------------------------------------------------------------- the network


class _Trunk(nn.Module):
    """Sobel + conv layers up to conv5 (last max-pool dropped): stride 16."""

    def __init__(self, trunk: TapNet) -> None:
        super().__init__()
        self.sobel = trunk.sobel
        pools = [i for i, m in enumerate(trunk.features) if isinstance(m, nn.MaxPool2d)]
        self.features = trunk.features[:pools[-1]]
        self.out_channels = trunk_channels(trunk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.sobel(x) if self.sobel is not None else x)


class _BoxHead(nn.Module):
    """Pooled RoI features, flattened as fc6 expects, through the checkpoint's fc6 and fc7."""

    def __init__(self, classifier: nn.Sequential) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(x, 1))


class Detector(nn.Module):
    """torchvision's ``FasterRCNN`` on the checkpoint's network (see the module docstring)."""

    def __init__(self, trunk: TapNet, cfg: VocDetectionConfig, seed: int) -> None:
        super().__init__()
        fc6, _ = fc_layers(trunk, "voc_detection")
        channels = trunk_channels(trunk)
        grid = math.isqrt(fc6.in_features // channels)
        if grid * grid * channels != fc6.in_features:
            raise UserError(f"voc_detection: fc6 takes {fc6.in_features} inputs, not a square "
                            f"grid of {channels}-channel conv5 features.")
        trunk.top_layer = None
        self.grid = grid
        backbone = _Trunk(trunk)
        with torch.random.fork_rng(devices=[]):  # the RPN head's init draws from torch's RNG
            torch.manual_seed(derive_seed(seed, "det-init"))
            anchors = AnchorGenerator((tuple(cfg.anchor_sizes),), (tuple(cfg.aspect_ratios),))
            predictor = FastRCNNPredictor(trunk.spec.fc_dim, NUM_CLASSES + 1)
            nn.init.normal_(predictor.cls_score.weight, std=0.01)
            nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
            nn.init.zeros_(predictor.cls_score.bias)
            nn.init.zeros_(predictor.bbox_pred.bias)
            self.model = FasterRCNN(
                backbone, min_size=cfg.min_size, max_size=cfg.max_size,
                image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
                rpn_anchor_generator=anchors,
                rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_train,
                rpn_post_nms_top_n_train=cfg.rpn_post_nms_train,
                rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_test,
                rpn_post_nms_top_n_test=cfg.rpn_post_nms_test, rpn_nms_thresh=cfg.rpn_nms,
                rpn_batch_size_per_image=cfg.rpn_batch,
                box_roi_pool=MultiScaleRoIAlign(["0"], output_size=grid, sampling_ratio=2),
                box_head=_BoxHead(trunk.classifier), box_predictor=predictor,
                box_score_thresh=cfg.test_score, box_nms_thresh=cfg.test_nms,
                box_detections_per_img=cfg.detections_per_image,
                box_batch_size_per_image=cfg.roi_batch,
                box_positive_fraction=cfg.roi_fg_fraction)
        set_trainable(self, self.trained_parameters(cfg))

    def trained_parameters(self, cfg: VocDetectionConfig) -> list[nn.Parameter]:
        if cfg.mode == "all":
            sobel = self.model.backbone.sobel
            frozen = set() if sobel is None else set(sobel.parameters())
            return [p for p in self.parameters() if p not in frozen]
        m = self.model
        return [*m.rpn.parameters(), *m.roi_heads.box_head.parameters(),
                *m.roi_heads.box_predictor.parameters()]

    def train(self, mode: bool = True) -> "Detector":
        """Dropout follows ``mode``; BatchNorm always uses its running statistics."""
        super().train(mode)
        freeze_batchnorm(self)
        return self

    def forward(self, images, targets=None):
        return self.model(images, targets)


# --------------------------------------------------------------------------- data


class DetectionTransform:
    """PIL image + reader target -> (float image [3, H, W] in [0, 1], torchvision target:
    continuous boxes, labels 1..20), flipped with probability 0.5 when ``hflip`` (the draw
    from torch's RNG, which :class:`~dcbench.core.SeededDraws` seeds per item)."""

    def __init__(self, hflip: bool) -> None:
        self.hflip = hflip

    def __call__(self, img, target: dict):
        x = TF.to_tensor(img)
        boxes = target["boxes"].clone()
        boxes[:, 2:] += 1.0  # inclusive pixel indices -> continuous coordinates
        if self.hflip and torch.rand(1).item() < 0.5:
            x = x.flip(-1)
            width = x.shape[-1]
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0],
                                 boxes[:, 3]], dim=1)
        return x, {"boxes": boxes, "labels": target["labels"] + 1}


def collate_lists(batch):
    """Detection batches are lists (images differ in size)."""
    return tuple(zip(*batch))


def trainable(data: VocDetection) -> list[int]:
    """Indices of the images holding at least one object to train on."""
    return [i for i in range(len(data)) if len(data.target(i)["labels"])]


def _batch_loss(net: Detector, batch) -> torch.Tensor:
    images, targets, _ = batch
    device = next(net.parameters()).device
    losses = net([x.to(device) for x in images],
                 [{k: v.to(device) for k, v in t.items()} for t in targets])
    return sum(losses.values())


@torch.no_grad()
def detect(net: Detector, data: VocDetection, ctx: TaskContext,
           batch: int = 4) -> list[dict[str, np.ndarray]]:
    """Detections per test image: boxes (0-based inclusive, as the reader's), scores, labels
    0..19."""
    net.eval()
    loader = DataLoader(data, batch_size=batch, num_workers=ctx.runtime.workers,
                        collate_fn=collate_lists)
    out = []
    for images, _, _ in tqdm(loader_batches(loader), total=len(loader), desc="det test",
                             leave=False, mininterval=2):
        for d in net([x.to(ctx.device) for x in images]):
            boxes = d["boxes"].float().cpu().numpy()
            boxes[:, 2:] -= 1.0
            out.append({"boxes": boxes, "scores": d["scores"].float().cpu().numpy(),
                        "labels": d["labels"].cpu().numpy() - 1})
    return out


def run(cfg: VocDetectionConfig, ctx: TaskContext) -> list[Measurement]:
    """Train and test one mode; one ``mAP`` measurement with the per-class APs, the resolved
    schedule and the data sizes in its details."""
    net = Detector(load_cell_checkpoint(ctx), cfg, ctx.seed).to(ctx.device)
    before = frozen_fingerprint(net)
    year = VOC_YEARS[ctx.dataset]
    train_all = VocDetection(ctx.data_root, cfg.train_split, year,
                             DetectionTransform(cfg.hflip), keep_difficult=cfg.train_difficult)
    keep = trainable(train_all)
    if not keep:
        raise UserError(f"VOC{year} {cfg.train_split} ({train_all.root}) has no object to "
                        "train a detector on.")
    info = train_iterations(net, Subset(train_all, keep), cfg, ctx, loss_of=_batch_loss,
                            lr_at=cfg.lr_at, tag="det", collate_fn=collate_lists)
    check_frozen(net, before, "VOC detection")
    test = first_images(VocDetection(ctx.data_root, cfg.test_split, year,
                                     lambda img, t: (TF.to_tensor(img), t)), cfg.test_images)
    detections = detect(net, test, ctx)
    mean_ap, aps = detection_map(detections, [test.target(i) for i in range(len(test))],
                                 NUM_CLASSES, 0.5, use_07_metric=True)
    ctx.clear_state()
    per_class = {c: (None if math.isnan(a) else round(100 * float(a), 3))
                 for c, a in zip(VOC_CLASSES, aps)}
    details = {**info, "per_class_ap": per_class, "roi_grid": net.grid,
               "roi_op": "RoIAlign(sampling_ratio=2)", "ap": "voc07 11-point, IoU >= 0.5",
               "data": {"train": len(keep), "train_skipped_no_object": len(train_all) - len(keep),
                        "test": len(test), "train_split": cfg.train_split,
                        "test_split": cfg.test_split}}
    return [Measurement(f"detection/{cfg.mode}", "mAP", round(100 * float(mean_ap), 4),
                        "final", "single-scale", details)]

