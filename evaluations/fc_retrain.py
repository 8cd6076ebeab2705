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

from dcbench.core import UserError, check_number

from .backbone import frozen_backbone
from .context import TaskContext
from .heads import HEADS_STATE, Head, head_seed, probe_data, train_heads
from .linear import head_config, measurements
from .records import Measurement


@dataclass(frozen=True)
class FcRetrainConfig:
    """The recipe (dc2018-reimpl: the linear-probe recipe, the network's own fc shape)."""

    epochs: int = 90
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-7
    dropout: float = 0.5
    input_size: int = 224
    resize_size: int = 256

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError("fc_retrain: epochs and batch_size must be >= 1.")
        check_number("fc_retrain", "lr", self.lr, above=0, maximum=10)
        check_number("fc_retrain", "momentum", self.momentum, minimum=0, below=1)
        check_number("fc_retrain", "weight_decay", self.weight_decay, minimum=0, maximum=1)
        if not 0 <= self.dropout < 1:
            raise UserError(f"fc_retrain: dropout must be in [0, 1) (got {self.dropout}).")


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


def run(cfg: FcRetrainConfig, ctx: TaskContext) -> list[Measurement]:
    """Retrain fc6-8 on the frozen ``pool5``; the records of :func:`linear.measurements`
    with ``in_dim`` and ``data`` (split sizes) in their details."""
    backbone = frozen_backbone(ctx)
    data = probe_data(ctx, cfg.resize_size, cfg.input_size)
    with torch.no_grad():
        pooled = backbone.forward_taps(torch.zeros(1, 3, cfg.input_size, cfg.input_size,
                                                   device=ctx.device), ["pool5"])["pool5"]
    in_dim = int(pooled[0].numel())
    gen = torch.Generator().manual_seed(head_seed(ctx.seed, "fc6-8"))
    head = Head("fc6-8", "pool5", fc_head(in_dim, backbone.spec.fc_dim, data.num_classes,
                                          cfg.dropout, gen).to(ctx.device))
    hist = train_heads(backbone, [head], data.train, data.val, head_config(cfg, ctx, cfg.lr),
                       ctx.device, desc="fc6-8", state=ctx.state_dir / HEADS_STATE)
    ctx.clear_state()
    return measurements(hist, f"{ctx.dataset}/acc1", {"in_dim": in_dim, "data": data.details})
