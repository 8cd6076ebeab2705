"""Fine-tuning a checkpoint on a Pascal VOC task: what classification, detection and
segmentation share (PROTOCOLS.md §3-5).

* :class:`IterationSampler`: training counted in iterations, the data order a function of
  ``(seed, pass)``, so any iteration can be resumed exactly.
* :func:`train_iterations`: SGD with momentum and weight decay over those iterations, the lr
  from a schedule, optional gradient clipping, a finite-loss check, and the training state
  (trained tensors, optimizer, iteration, RNG) saved every ``runtime.save_every`` iterations in
  the cell's state folder: a killed or requeued cell resumes there and ends with the same
  numbers.
* :func:`frozen_fingerprint` / :func:`check_frozen`: every tensor that must not change (the
  untrained parameters, every BatchNorm buffer) is bit-identical after training (MoCo's
  sanity check), or the cell fails loudly.
* :func:`freeze_batchnorm`: BatchNorm always uses its running statistics (the batches of these
  tasks are a few images); dropout follows the train/eval mode.
* :func:`fc_layers`: the checkpoint's fc6 and fc7, which every VOC head starts from.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dcbench.core import (SeededDraws, UserError, check_finite_loss, check_number, derive_seed,
                          sgd)
from pretrain.checkpoint import atomic_torch_save
from pretrain.data import loader_batches
from pretrain.models import TapNet

from .context import TaskContext

log = logging.getLogger(__name__)
STATE_FILE = "train_state.pth"
FC_ARCHS = ("alexnet", "vgg16")  # networks with fc6/fc7


def fc_layers(trunk: TapNet, task: str) -> tuple[nn.Linear, nn.Linear]:
    """(fc6, fc7) of an AlexNet / VGG16; a network without them is a UserError."""
    if trunk.spec.arch not in FC_ARCHS:
        raise UserError(f"{task} needs a network with fc6/fc7 (AlexNet or VGG16); the "
                        f"checkpoint holds a {trunk.spec.arch}.")
    fc6, fc7 = [m for m in trunk.classifier if isinstance(m, nn.Linear)]
    return fc6, fc7


def check_recipe(where: str, cfg, modes: tuple[str, ...], ints: tuple[str, ...] = (),
                 numbers: tuple[tuple[str, dict], ...] = (),
                 splits: tuple[str, ...] = ()) -> None:
    """One UserError for the first bad value of a VOC recipe: ``mode`` among ``modes``; each
    of ``ints`` an integer >= 1; each of ``numbers`` (name, bounds for
    :func:`~dcbench.core.check_number`) finite and in range unless None; the train/test
    splits among ``splits``."""
    if cfg.mode not in modes:
        raise UserError(f"{where}: mode must be one of {modes} (got {cfg.mode!r}).")
    for name in ints:
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise UserError(f"{where}: {name} must be an integer >= 1.")
    for name, bounds in numbers:
        if getattr(cfg, name) is not None:
            check_number(where, name, getattr(cfg, name), **bounds)
    if splits and (cfg.train_split not in splits or cfg.test_split not in splits):
        raise UserError(f"{where}: splits must be among {splits}.")


def check_test_images(where: str, n) -> None:
    """``test_images``: None (the whole test split) or an integer >= 1."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise UserError(f"{where}: test_images must be an integer >= 1, or absent for the whole "
                        f"test split (got {n!r}).")


class Subset:
    """The items of ``data`` at ``indices`` (and their ``target`` where ``data`` has one)."""

    def __init__(self, data, indices) -> None:
        self.data, self.indices = data, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.data[self.indices[i]]

    def target(self, i: int):
        return self.data.target(self.indices[i])


def first_images(data, n: int | None):
    """The first ``n`` images of a test split in its listed order (all where ``n`` is None
    or not smaller): the demo's smaller test sets."""
    return data if n is None or n >= len(data) else Subset(data, range(n))


def set_trainable(net: nn.Module, trained: list[nn.Parameter]) -> None:
    """Freeze every parameter of ``net`` except ``trained``."""
    for p in net.parameters():
        p.requires_grad = False
    for p in trained:
        p.requires_grad = True


def trunk_channels(trunk: TapNet) -> int:
    """Channels of the last conv layer (conv5): 256 for AlexNet, 512 for VGG16."""
    return [m for m in trunk.features if isinstance(m, nn.Conv2d)][-1].out_channels


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm of ``module`` in eval mode (running statistics, no updates)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def frozen_fingerprint(net: nn.Module) -> str:
    """sha256 of every tensor that must not change: the untrained parameters and every
    buffer (BatchNorm running mean/var, counts)."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict(keep_vars=True).items()):
        if not (isinstance(t, nn.Parameter) and t.requires_grad):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_frozen(net: nn.Module, before: str, task: str) -> None:
    if frozen_fingerprint(net) != before:
        raise RuntimeError(f"a frozen parameter or a BatchNorm buffer changed during {task} "
                           "training: the numbers are invalid (a bug in the evaluation, or a "
                           "network whose BatchNorm left eval mode)")


class IterationSampler:
    """``(draw, index)`` for draws ``start * batch .. iterations * batch - 1``: passes over the
    data in an order fixed by ``(seed, pass)``, so any iteration can be resumed exactly."""

    def __init__(self, n: int, batch: int, iterations: int, start: int, seed: int,
                 tag: str = "voc") -> None:
        self.n, self.batch, self.seed, self.tag = n, batch, seed, tag
        self.first, self.last = start * batch, iterations * batch
        self._order: tuple[int, np.ndarray] | None = None

    def _index(self, draw: int) -> int:
        epoch, pos = divmod(draw, self.n)
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng(derive_seed(self.seed, f"{self.tag}-order", epoch))
            self._order = (epoch, rng.permutation(self.n))
        return int(self._order[1][pos])

    def __iter__(self):
        return ((d, self._index(d)) for d in range(self.first, self.last))

    def __len__(self) -> int:
        return self.last - self.first


def _save_state(path: Path, it: int, net: nn.Module, opt: torch.optim.Optimizer,
                recipe: str) -> None:
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    atomic_torch_save({"iteration": it, "recipe": recipe, "rng": torch.get_rng_state(),
                       "params": {n: t for n, t in net.state_dict().items() if n in trained},
                       "optimizer": opt.state_dict()}, path)


def _load_state(path: Path, net: nn.Module, opt: torch.optim.Optimizer, recipe: str) -> int:
    if not path.is_file():
        return 0
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a state file cut short: start over
        log.warning("ignored the unreadable training state %s (%s); starting over", path, e)
        return 0
    if st.get("recipe") != recipe:
        log.warning("ignored the training state %s of another recipe; starting over", path)
        return 0
    net.load_state_dict(st["params"], strict=False)
    opt.load_state_dict(st["optimizer"])
    torch.set_rng_state(st["rng"])
    log.info("resuming %s at iteration %d", path.parent.name, st["iteration"])
    return int(st["iteration"])


def train_iterations(net: nn.Module, data, cfg, ctx: TaskContext, *,
                     loss_of: Callable[[nn.Module, tuple], torch.Tensor],
                     lr_at: Callable[[int], float], tag: str, grad_clip: float | None = None,
                     collate_fn: Callable | None = None) -> dict:
    """Train ``net``'s parameters that require grad on ``data`` for ``cfg.iterations``
    iterations of ``cfg.batch_size`` items (SGD, ``cfg.momentum``, ``cfg.weight_decay``),
    resuming from the cell's state folder. ``loss_of(net, batch)`` gives the loss of one
    batch; ``tag`` names the task in the seeds (data order, augmentations, dropout)."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt = sgd(params, lr=lr_at(0), momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    state, recipe = ctx.state_dir / STATE_FILE, repr(cfg)
    torch.manual_seed(derive_seed(ctx.seed, f"{tag}-dropout"))
    start = _load_state(state, net, opt, recipe)
    draws = SeededDraws(data, derive_seed(ctx.seed, f"{tag}-crops"))
    # its own generator: creating the loader must not draw from the RNG the dropout uses
    loader = DataLoader(draws, batch_size=cfg.batch_size, num_workers=ctx.runtime.workers,
                        sampler=IterationSampler(len(data), cfg.batch_size, cfg.iterations,
                                                 start, ctx.seed, tag),
                        collate_fn=collate_fn, generator=torch.Generator().manual_seed(ctx.seed))
    net.train()
    t0, it, seen = time.perf_counter(), start, 0
    for batch in tqdm(loader_batches(loader), total=len(loader), desc=f"{tag} train",
                      leave=False, mininterval=2):
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        loss = loss_of(net, batch)
        check_finite_loss(loss.item(), f"{tag} iteration {it}",
                          f"lower the lr (now {lr_at(it):g}) in the suite's [cell.config]")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        it += 1
        seen += cfg.batch_size
        if it % ctx.runtime.save_every == 0 and it < cfg.iterations:
            _save_state(state, it, net, opt, recipe)
    seconds = time.perf_counter() - t0
    return {"iterations": it, "resumed_from": start, "train_seconds": round(seconds, 2),
            "train_img_per_s": round(seen / max(seconds, 1e-9), 1)}
