"""Supplementary table: fc6-fc8 re-initialised and trained on frozen conv layers (ImageNet Acc@1).

The paper's supplementary material gives no optimisation settings, so this is
``dc2018-reimpl``: the linear-probe recipe (SGD, Bottou decay, 90 epochs, the same crops and
10-crop test) with the network's own classifier shape (Dropout fc6 ReLU Dropout fc7 ReLU fc8)
re-initialised N(0, 0.01), bias 0, on the conv5 max-pooled map (``pool5``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pretrain.errors import UserError
from pretrain.models import TapNet

from .heads import Head, HeadTrainConfig, train_heads
from .linear import head_seed, measurements


@dataclass(frozen=True)
class FcRetrainConfig:
    epochs: int = 90
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-7
    dropout: float = 0.5
    input_size: int = 224
    resize_size: int = 256
    workers: int = 8
    device: str = "auto"

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise UserError("fc_retrain: epochs and batch_size must be >= 1 and lr > 0.")


def fc_head(in_dim: int, fc_dim: int, n_classes: int, dropout: float,
            generator: torch.Generator) -> nn.Sequential:
    """Flatten -> Dropout fc6 ReLU Dropout fc7 ReLU fc8, N(0, 0.01) weights, zero biases."""
    head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(in_dim, fc_dim), nn.ReLU(),
                         nn.Dropout(dropout), nn.Linear(fc_dim, fc_dim), nn.ReLU(),
                         nn.Linear(fc_dim, n_classes))
    with torch.no_grad():
        for m in head:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * 0.01)
                m.bias.zero_()
    return head


def run(cfg: FcRetrainConfig, backbone: TapNet, train_ds, val_ds, n_classes: int,
        dataset_role: str, seed: int, device: torch.device) -> list[dict]:
    with torch.no_grad():
        pooled = backbone.forward_taps(torch.zeros(1, 3, cfg.input_size, cfg.input_size,
                                                   device=device), ["pool5"])["pool5"]
    in_dim = int(pooled[0].numel())
    gen = torch.Generator().manual_seed(head_seed(seed, "fc6-8"))
    head = Head("fc6-8", "pool5", fc_head(in_dim, backbone.spec.fc_dim, n_classes, cfg.dropout,
                                          gen).to(device))
    hcfg = HeadTrainConfig(cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay,
                           cfg.workers, seed)
    hist = train_heads(backbone, [head], train_ds, val_ds, hcfg, device, desc="fc6-8")
    return measurements(hist, f"{dataset_role}/acc1", {"in_dim": in_dim})
