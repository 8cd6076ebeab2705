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

from pretrain.models import CONV_TAPS, TapNet

from .heads import Head, HeadHistory, HeadTrainConfig, train_heads

# (kernel, stride, pad) of AvgPool2d at 224 input, and the pooled grid it gives (AlexNet).
PAPER_POOL = {"conv1": (6, 6, 3), "conv2": (4, 4, 0), "conv3": (3, 3, 1), "conv4": (3, 3, 1),
              "conv5": (2, 2, 0)}
PAPER_MAP = {"conv1": 55, "conv2": 27, "conv3": 13, "conv4": 13, "conv5": 13}
PAPER_GRID = {"conv1": 10, "conv2": 6, "conv3": 5, "conv4": 5, "conv5": 6}


@dataclass(frozen=True)
class LinearProbeConfig:
    """Defaults: the paper's protocol (the authors' eval_linear settings)."""

    layers: tuple[str, ...] = CONV_TAPS
    epochs: int = 90
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-7
    input_size: int = 224
    resize_size: int = 256
    workers: int = 8
    device: str = "auto"


def pool_for(layer: str, map_size: int) -> tuple[nn.Module, str]:
    """The paper's AvgPool where the map has its 224-input size; otherwise adaptive pooling
    to the paper's grid (capped at the map size), which keeps the dims comparable."""
    if PAPER_MAP.get(layer) == map_size:
        k, s, p = PAPER_POOL[layer]
        return nn.AvgPool2d(k, stride=s, padding=p, count_include_pad=True), f"avg{k}s{s}p{p}"
    grid = min(PAPER_GRID.get(layer, 6), map_size)
    return nn.AdaptiveAvgPool2d(grid), f"adaptive{grid}"


class PooledLinear(nn.Module):
    """AvgPool -> flatten -> Linear (weights N(0, 0.01), bias 0), no BN, no normalisation."""

    def __init__(self, pool: nn.Module, in_dim: int, n_classes: int, generator: torch.Generator):
        super().__init__()
        self.pool = pool
        self.linear = nn.Linear(in_dim, n_classes)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(self.linear.weight.shape, generator=generator) * 0.01)
            self.linear.bias.zero_()

    def forward(self, x):
        return self.linear(torch.flatten(self.pool(x), 1))


def head_seed(seed: int, name: str) -> int:
    """Per-head init seed: independent of which other heads train alongside."""
    return (seed * 1_000_003 + sum(ord(c) * 31 ** i for i, c in enumerate(name))) % (2**63)


@torch.no_grad()
def conv_heads(backbone: TapNet, layers, input_size: int, n_classes: int, seed: int,
               device: torch.device) -> tuple[list[Head], dict[str, dict]]:
    """One PooledLinear per layer, sized by a dry forward; also each head's pooling/dims."""
    probe = torch.zeros(1, 3, input_size, input_size, device=device)
    feats = backbone.forward_taps(probe, layers)
    heads, info = [], {}
    for layer in layers:
        c, h, _ = feats[layer].shape[1:]
        pool, pool_name = pool_for(layer, h)
        dims = torch.flatten(pool(feats[layer].cpu()), 1).shape[1]
        gen = torch.Generator().manual_seed(head_seed(seed, layer))
        heads.append(Head(layer, layer, PooledLinear(pool, dims, n_classes, gen).to(device)))
        info[layer] = {"map": [c, h, h], "pool": pool_name, "dims": int(dims)}
    return heads, info


def measurements(history: HeadHistory, column: str, extra: dict) -> list[dict]:
    """best/last epoch x 10crop/center numbers of one head."""
    out = []
    for selection, ep in (("best_epoch", history.best()), ("last_epoch", history.last())):
        for variant, value in (("10crop", ep.top1_10crop), ("center", ep.top1_center)):
            out.append({"column": column, "metric": "top1", "value": round(value, 4),
                        "selection": selection, "variant": variant,
                        "extra": {"epoch": ep.epoch, "top5_10crop": ep.top5_10crop, **extra}})
    return out


def run(cfg: LinearProbeConfig, backbone: TapNet, train_ds, val_ds, n_classes: int,
        dataset_role: str, seed: int, device: torch.device, workers: int | None = None
        ) -> list[dict]:
    """Train the conv probes; return measurement dicts (column, metric, value, selection, ...)."""
    heads, info = conv_heads(backbone, cfg.layers, cfg.input_size, n_classes, seed, device)
    hcfg = HeadTrainConfig(cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay,
                           workers if workers is not None else cfg.workers, seed)
    hist = train_heads(backbone, heads, train_ds, val_ds, hcfg, device, desc=f"linear {dataset_role}")
    out = []
    for layer in cfg.layers:
        out += measurements(hist[layer], f"{dataset_role}/{layer}", {"head": info[layer]})
    return out
