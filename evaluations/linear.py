"""Table 1: linear probes on conv1..conv5 (PROTOCOLS.md §2), ImageNet and Places205.

Frozen backbone in eval mode; feature = ReLU output after conv c, average-pooled to ~9k dims,
then one Linear. All five heads train from one backbone forward per batch.
Records: per layer x selection (best_epoch = the paper's rule, last_epoch) x variant
(10crop = the paper's test, center).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dcbench.core import UserError, check_number
from pretrain.models import CONV_TAPS, TapNet

from .backbone import frozen_backbone
from .context import TaskContext
from .heads import (HEADS_STATE, Head, HeadHistory, HeadTrainConfig, head_seed, probe_data,
                    train_heads)
from .records import Measurement

# (kernel, stride, pad) of AvgPool2d at 224 input, and the pooled grid it gives (AlexNet).
PAPER_POOL = {"conv1": (6, 6, 3), "conv2": (4, 4, 0), "conv3": (3, 3, 1), "conv4": (3, 3, 1),
              "conv5": (2, 2, 0)}
PAPER_MAP = {"conv1": 55, "conv2": 27, "conv3": 13, "conv4": 13, "conv5": 13}
PAPER_GRID = {"conv1": 10, "conv2": 6, "conv3": 5, "conv4": 5, "conv5": 6}


@dataclass(frozen=True)
class LinearProbeConfig:
    """The recipe; defaults: the paper's protocol (the authors' eval_linear settings)."""

    layers: tuple[str, ...] = CONV_TAPS
    epochs: int = 90
    batch_size: int = 256
    # One head per (layer, lr). The paper: lr 0.01 for every layer. With several values the
    # best (lr, epoch) on the evaluation split is reported, for every checkpoint alike.
    lrs: tuple[float, ...] = (0.01,)
    momentum: float = 0.9
    weight_decay: float = 1e-7
    input_size: int = 224
    resize_size: int = 256

    def __post_init__(self):
        bad = [layer for layer in self.layers if layer not in CONV_TAPS]
        if not self.layers or bad:
            raise UserError(f"linear probe: layers must be a non-empty subset of "
                            f"{', '.join(CONV_TAPS)} (got {list(self.layers)}).")
        if not self.lrs:
            raise UserError("linear probe: lrs must list one or more positive learning rates "
                            "(got []).")
        for lr in self.lrs:
            check_number("linear probe", "each of lrs", lr, above=0, maximum=10)
        check_number("linear probe", "momentum", self.momentum, minimum=0, below=1)
        check_number("linear probe", "weight_decay", self.weight_decay, minimum=0, maximum=1)
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError("linear probe: epochs and batch_size must be >= 1.")


def pool_for(layer: str, map_size: int) -> tuple[nn.Module, str]:
    """The paper's AvgPool where the map has its 224-input size; otherwise adaptive pooling
    to the paper's grid (capped at the map size), which keeps the dims comparable."""
    if PAPER_MAP.get(layer) == map_size:
        k, s, p = PAPER_POOL[layer]
        return nn.AvgPool2d(k, stride=s, padding=p, count_include_pad=True), f"avg{k}s{s}p{p}"
    grid = min(PAPER_GRID.get(layer, 6), map_size)
    return nn.AdaptiveAvgPool2d(grid), f"adaptive{grid}"


def linear_head(in_dim: int, n_classes: int, generator: torch.Generator) -> nn.Sequential:
    """flatten -> Linear (weights N(0, 0.01), bias 0), no BN, no normalisation."""
    head = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, n_classes))
    with torch.no_grad():
        head[1].weight.copy_(torch.randn(head[1].weight.shape, generator=generator) * 0.01)
        head[1].bias.zero_()
    return head


def head_name(layer: str, lr: float, lrs) -> str:
    return layer if len(lrs) == 1 else f"{layer}@lr{lr:g}"


@torch.no_grad()
def conv_heads(backbone: TapNet, layers, input_size: int, n_classes: int, seed: int,
               device: torch.device, lrs=(None,)) -> tuple[list[Head], dict[str, dict]]:
    """One AvgPool (shared by the layer's heads) + Linear per (layer, lr), sized by a dry
    forward; also each layer's pooling and dims."""
    probe = torch.zeros(1, 3, input_size, input_size, device=device)
    feats = backbone.forward_taps(probe, layers)
    heads, info = [], {}
    for layer in layers:
        c, h, _ = feats[layer].shape[1:]
        pool, pool_name = pool_for(layer, h)
        dims = torch.flatten(pool(feats[layer].cpu()), 1).shape[1]
        info[layer] = {"map": [c, h, h], "pool": pool_name, "dims": int(dims)}
        for lr in lrs:
            name = head_name(layer, lr, lrs)
            gen = torch.Generator().manual_seed(head_seed(seed, name))
            heads.append(Head(name, layer, linear_head(dims, n_classes, gen).to(device), lr,
                              pre=pool, pre_key=pool_name))
    return heads, info


def measurements(histories: dict[str, HeadHistory], column: str,
                 details: dict) -> list[Measurement]:
    """best/last epoch x 10crop/center numbers of one layer, over its heads (one per lr).

    best_epoch: the (head, epoch) with the best 10-crop top-1 (the paper's rule);
    last_epoch: the last epoch of the head whose last epoch is best. ``details`` of each:
    ``epoch`` and ``head`` chosen, ``top5_10crop``, ``resumed_at_epoch`` (0 unless a killed
    or requeued run resumed from its saved state), plus the caller's ``details``.
    """
    best = max(((n, h.best()) for n, h in histories.items()),
               key=lambda p: (p[1].top1_10crop, -p[1].epoch))
    last = max(((n, h.last()) for n, h in histories.items()), key=lambda p: p[1].top1_10crop)
    out = []
    for selection, (name, ep) in (("best_epoch", best), ("last_epoch", last)):
        for variant, value in (("10crop", ep.top1_10crop), ("center", ep.top1_center)):
            out.append(Measurement(column, "top1", round(value, 4), selection, variant,
                                   {"epoch": ep.epoch, "head": name,
                                    "top5_10crop": ep.top5_10crop,
                                    "resumed_at_epoch": histories[name].resumed_at,
                                    **details}))
    return out


def head_config(cfg, ctx: TaskContext, lr: float) -> HeadTrainConfig:
    """The multi-head trainer's settings from a probe recipe and the cell's runtime."""
    return HeadTrainConfig(cfg.epochs, cfg.batch_size, lr, cfg.momentum, cfg.weight_decay,
                           ctx.seed, ctx.runtime.workers, ctx.runtime.val_cache_gb)


def run(cfg: LinearProbeConfig, ctx: TaskContext) -> list[Measurement]:
    """Train the conv probes of ``cfg.layers`` on the cell's dataset; per layer, the records
    of :func:`measurements` with ``head_info`` (map, pooling, dims) and ``data`` (split
    sizes) in their details."""
    backbone = frozen_backbone(ctx)
    data = probe_data(ctx, cfg.resize_size, cfg.input_size)
    heads, info = conv_heads(backbone, cfg.layers, cfg.input_size, data.num_classes, ctx.seed,
                             ctx.device, cfg.lrs)
    hist = train_heads(backbone, heads, data.train, data.val, head_config(cfg, ctx, cfg.lrs[0]),
                       ctx.device, desc=f"linear {ctx.dataset}", state=ctx.state_dir / HEADS_STATE)
    ctx.clear_state()
    out = []
    for layer in cfg.layers:
        mine = {h.name: hist[h.name] for h in heads if h.tap == layer}
        out += measurements(mine, f"{ctx.dataset}/{layer}",
                            {"head_info": info[layer], "data": data.details})
    return out
