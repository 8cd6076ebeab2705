"""Train several heads on one frozen backbone: ONE backbone forward per batch feeds them all.

Used by the conv1..conv5 linear probes (Table 1) and the fc6-8 retraining (supplementary
table). Each head has its own SGD with Bottou's decay lr_t = lr0 / sqrt(1 + lr0*wd*t) per
iteration and its own seeded init, so a head trained alongside others gets exactly the
numbers it gets alone (same seed, same data order).

With a state file, the training state (head weights, optimizers, iteration count, scores so
far, the data-order generator and the RNG) is saved after every epoch; a killed, stopped or
requeued cell resumes at its last finished epoch and ends with the same numbers.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from tqdm import tqdm

from dcbench.core import (EnumeratedSampler, SeededDraws, check_finite_loss, derive_seed,
                          probe_test_transform, probe_train_prefix, probe_train_suffix, sgd)
from pretrain.checkpoint import atomic_torch_save
from pretrain.data import loader_batches
from pretrain.models import TapNet

from .backbone import state_fingerprint
from .context import TaskContext
from .datasets import READERS
from .metrics import tencrop_probs, topk_correct

log = logging.getLogger(__name__)
CENTRE_OF_TENCROP = 4  # torchvision TenCrop: tl, tr, bl, br, centre, then the flipped five
HEADS_STATE = "heads_state.pth"  # in the cell's state folder


@dataclass(frozen=True)
class ProbeData:
    """The train and val sets of a classification probe, and what records say about them."""

    train: object
    val: object
    num_classes: int
    details: dict


def probe_data(ctx: TaskContext, resize_size: int, input_size: int) -> ProbeData:
    """Train (random crops) and val (ten crops) sets of the cell's dataset role. With no
    DataLoader workers, the train images' deterministic prefix (decode, resize, normalise) is
    kept in memory when every image's fits in ``runtime.val_cache_gb``: each epoch then only
    crops and flips (the same pixels and RNG draws as decoding again)."""
    reader = READERS[ctx.dataset]
    train, val = reader(ctx.data_root, "train"), reader(ctx.data_root, "val")
    need = len(train) * 3 * resize_size * resize_size * 4
    budget = ctx.runtime.val_cache_gb * 2**30 if ctx.runtime.workers == 0 else 0
    return ProbeData(MemoPrefix(train.dataset(probe_train_prefix(resize_size)),
                                probe_train_suffix(input_size), memo=need <= budget),
                     val.dataset(probe_test_transform(resize_size, input_size)),
                     train.num_classes,
                     {"train": len(train), "val": len(val), "classes": train.num_classes,
                      "train_layout": train.layout, "val_layout": val.layout})


class MemoPrefix:
    """``dataset`` (built with a deterministic transform) followed by the random ``suffix``
    on its image; with ``memo``, each item of ``dataset`` is computed once and kept."""

    def __init__(self, dataset, suffix, memo: bool) -> None:
        self.dataset, self.suffix, self.memo = dataset, suffix, memo
        self._items: dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self._items.get(i)
        if item is None:
            item = self.dataset[i]
            if self.memo:
                self._items[i] = item
        return (self.suffix(item[0]), *item[1:])


def head_seed(seed: int, name: str) -> int:
    """Per-head init seed: independent of which other heads train alongside."""
    return derive_seed(seed, "head", name)


@dataclass
class Head:
    """A trainable head reading tap ``tap`` of the backbone."""

    name: str
    tap: str
    module: nn.Module
    lr: float | None = None  # initial learning rate; None = the config's
    # Parameter-free transform of the tap (e.g. the probe's AvgPool), computed once per batch
    # for all heads with the same (tap, pre_key); the val cache keeps its output.
    pre: nn.Module | None = None
    pre_key: str = ""

    @property
    def input_key(self) -> tuple[str, str]:
        return (self.tap, self.pre_key)


def head_inputs(heads: list[Head], feats: dict[str, torch.Tensor]) -> dict:
    """Each distinct head input, computed once from the backbone's taps, in NCHW order (a
    channels_last input would be copied by every head's Flatten, on every batch)."""
    out = {}
    for h in heads:
        if h.input_key not in out:
            x = feats[h.tap] if h.pre is None else h.pre(feats[h.tap])
            out[h.input_key] = x.contiguous()
    return out


@dataclass(frozen=True)
class HeadTrainConfig:
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    seed: int = 0
    workers: int = 4  # runtime: crops are seeded per draw, so workers change no number
    # The backbone is frozen and the test crops are deterministic, so the val taps are the
    # same every epoch: keep them when they fit (same batches, bit-identical numbers).
    val_cache_gb: float = 2.0


@dataclass
class EpochScores:
    epoch: int
    train_loss: float
    top1_10crop: float
    top1_center: float
    top5_10crop: float


@dataclass
class HeadHistory:
    name: str
    epochs: list[EpochScores] = field(default_factory=list)
    resumed_at: int = 0  # the epoch a resumed run started at (0: from scratch)

    def best(self, key: str = "top1_10crop") -> EpochScores:
        """The paper's selection: the epoch with the best accuracy on the evaluation split."""
        return max(self.epochs, key=lambda e: (getattr(e, key), -e.epoch))

    def last(self) -> EpochScores:
        return self.epochs[-1]


VAL_CROPS = 256  # crops per validation forward, at least


def bottou_lr(lr0: float, wd: float, t: int) -> float:
    return lr0 / math.sqrt(1.0 + lr0 * wd * t)


def _unwrap(batch):
    """Datasets return (image, label, index) or (image, label)."""
    return batch[0], batch[1]


@torch.no_grad()
def val_features(backbone: TapNet, heads: list[Head], loader: DataLoader, device: torch.device):
    """Yield (head inputs of all crops, labels, images, crops) per val batch."""
    taps = {h.tap for h in heads}
    for batch in loader_batches(loader):
        x, y = _unwrap(batch)
        b, ncrops = x.shape[:2]
        feats = backbone.forward_taps(x.flatten(0, 1).to(device), taps)
        yield head_inputs(heads, feats), y.to(device), b, ncrops


def val_cache_bytes(backbone: TapNet, heads: list[Head], val_ds, device: torch.device) -> int:
    """Bytes the head inputs of every val crop would take (from a dry forward of one crop)."""
    crops = val_ds[0][0]
    with torch.no_grad():
        feats = backbone.forward_taps(crops[:1].to(device), {h.tap for h in heads})
        inputs = head_inputs(heads, feats)
    return len(val_ds) * crops.shape[0] * sum(f.numel() for f in inputs.values()) * 4


def _linear_stacks(heads: list[Head]) -> dict[tuple[str, str], tuple[dict[str, int],
                                                                     torch.Tensor, torch.Tensor]]:
    """Per input shared by several Flatten -> Linear heads (the probe's lrs): their names and
    outputs, and their stacked weights and biases, so one matmul reads the input once for all
    of them (a 10-output matmul per head is memory-bound: 3x slower on a CPU)."""
    groups: dict[tuple[str, str], list[Head]] = {}
    for h in heads:
        m = h.module
        if (isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[0], nn.Flatten)
                and isinstance(m[1], nn.Linear) and m[1].bias is not None):
            groups.setdefault(h.input_key, []).append(h)
    return {key: ({h.name: h.module[1].out_features for h in hs},
                  torch.cat([h.module[1].weight for h in hs]),
                  torch.cat([h.module[1].bias for h in hs]))
            for key, hs in groups.items() if len(hs) > 1}


@torch.no_grad()
def evaluate_heads(heads: list[Head], batches) -> dict[str, tuple[float, float, float]]:
    """(top-1 10-crop, top-1 centre, top-5 10-crop) per head, in percent, over ``batches``
    of (head inputs, labels, images, crops) from :func:`val_features` (or a cached list)."""
    for h in heads:
        h.module.eval()
    stacks = _linear_stacks(heads)
    hits = {h.name: [0, 0, 0] for h in heads}
    n = 0
    for feats, y, b, ncrops in batches:
        logits_of = {}
        for key, (outputs, weight, bias) in stacks.items():
            out = torch.addmm(bias, feats[key].flatten(1), weight.t())
            logits_of.update((name, part.contiguous()) for name, part in
                             zip(outputs, out.split(list(outputs.values()), dim=1)))
        for h in heads:
            logits = logits_of.get(h.name)
            logits = (h.module(feats[h.input_key]) if logits is None else logits).float()
            probs = tencrop_probs(logits, ncrops)
            centre = logits.view(b, ncrops, -1)[:, min(CENTRE_OF_TENCROP, ncrops - 1)]
            c = hits[h.name]
            c[0] += topk_correct(probs, y, 1)
            c[1] += topk_correct(centre, y, 1)
            c[2] += topk_correct(probs, y, 5)
        n += b
    return {k: tuple(100.0 * v / max(n, 1) for v in c) for k, c in hits.items()}


def train_heads(backbone: TapNet, heads: list[Head], train_ds, val_ds, cfg: HeadTrainConfig,
                device: torch.device, desc: str = "heads", state: Path | None = None
                ) -> dict[str, HeadHistory]:
    """Train ``heads`` on frozen ``backbone``; evaluate every epoch on ``val_ds``.

    The data order comes from a generator seeded by ``cfg.seed``; the random crops of draw
    ``j`` of epoch ``e`` from ``derive_seed(seed, e, j)``, whichever process makes them; the
    heads' dropout from torch's RNG, seeded here and restored afterwards. ``state``: a file
    where the training state is saved after each epoch and resumed from.
    Raises RuntimeError if the backbone's weights or BN buffers changed (they must not).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "dropout"))
        return _train_heads(backbone, heads, train_ds, val_ds, cfg, device, desc, state)


def _recipe(heads: list[Head], cfg: HeadTrainConfig) -> str:
    """What a saved state must have been made for (never the runtime: workers, caches)."""
    return repr(((cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay,
                  cfg.seed), [(h.name, h.tap, h.lr, h.pre_key) for h in heads]))


def _save_epoch(path: Path, recipe: str, epoch: int, t: int, heads: list[Head], opts: dict,
                history: dict[str, HeadHistory], gen: torch.Generator) -> None:
    atomic_torch_save({"recipe": recipe, "epochs_done": epoch + 1, "iteration": t,
                       "heads": {h.name: h.module.state_dict() for h in heads},
                       "optimizers": {n: o.state_dict() for n, o in opts.items()},
                       "history": {n: [asdict(e) for e in h.epochs] for n, h in history.items()},
                       "order": gen.get_state(), "rng": torch.get_rng_state(),
                       "cuda_rng": (torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                                    else [])}, path)


def _resume(path: Path | None, recipe: str, heads: list[Head], opts: dict,
            history: dict[str, HeadHistory], gen: torch.Generator) -> tuple[int, int]:
    """Load a saved state into the heads, optimizers, history, generator and RNG; returns
    (first epoch to run, iteration count), (0, 0) without a usable state."""
    if path is None or not path.is_file():
        return 0, 0
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
        names = {h.name for h in heads}
        if st["recipe"] != recipe or not names <= set(st["heads"]) & set(st["optimizers"]) \
                & set(st["history"]):
            log.warning("ignored the training state %s of another recipe; starting over", path)
            return 0, 0
    except Exception as e:  # noqa: BLE001 -- a state file cut short: start over
        log.warning("ignored the unreadable training state %s (%s); starting over", path, e)
        return 0, 0
    for h in heads:
        h.module.load_state_dict(st["heads"][h.name])
        opts[h.name].load_state_dict(st["optimizers"][h.name])
        history[h.name].epochs = [EpochScores(**e) for e in st["history"][h.name]]
        history[h.name].resumed_at = int(st["epochs_done"])
    gen.set_state(st["order"])
    torch.set_rng_state(st["rng"])
    if st["cuda_rng"] and torch.cuda.is_available():  # dropout of heads on a GPU
        torch.cuda.set_rng_state_all(st["cuda_rng"])
    log.info("resuming %s at epoch %d", path.parent.name, st["epochs_done"])
    return int(st["epochs_done"]), int(st["iteration"])


def _train_heads(backbone, heads, train_ds, val_ds, cfg, device, desc, state):
    before = state_fingerprint(backbone)
    backbone.eval()
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "order"))
    draws = SeededDraws(train_ds, derive_seed(cfg.seed, "crops"))
    train_loader = DataLoader(draws, batch_size=cfg.batch_size,
                              sampler=EnumeratedSampler(RandomSampler(train_ds, generator=gen)),
                              num_workers=cfg.workers, drop_last=False)
    # ten crops per image: one forward of ~max(batch_size, VAL_CROPS) crops (a small training
    # batch, the demo's 32, would otherwise evaluate 3 images per call: all call overhead)
    val_loader = DataLoader(val_ds, batch_size=max(1, max(cfg.batch_size, VAL_CROPS) // 10),
                            shuffle=False,
                            num_workers=cfg.workers)
    lr0 = {h.name: cfg.lr if h.lr is None else h.lr for h in heads}
    opts = {h.name: sgd(h.module.parameters(), lr=lr0[h.name], momentum=cfg.momentum,
                        weight_decay=cfg.weight_decay) for h in heads}
    crit = nn.CrossEntropyLoss()
    taps = {h.tap for h in heads}
    history = {h.name: HeadHistory(h.name) for h in heads}
    cache = None
    if val_cache_bytes(backbone, heads, val_ds, device) <= cfg.val_cache_gb * 2**30:
        cache = list(val_features(backbone, heads, val_loader, device))
    recipe = _recipe(heads, cfg)
    start, t = _resume(state, recipe, heads, opts, history, gen)
    for epoch in range(start, cfg.epochs):
        draws.set_epoch(epoch)
        for h in heads:
            h.module.train()
        losses = {h.name: 0.0 for h in heads}
        seen = 0
        for batch in tqdm(loader_batches(train_loader), total=len(train_loader),
                          desc=f"{desc} epoch {epoch}", leave=False, mininterval=2):
            x, y = _unwrap(batch)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.no_grad():
                inputs = head_inputs(heads, backbone.forward_taps(x, taps))
            for h in heads:
                opt = opts[h.name]
                for g in opt.param_groups:
                    g["lr"] = bottou_lr(lr0[h.name], cfg.weight_decay, t)
                loss = crit(h.module(inputs[h.input_key]), y)
                check_finite_loss(loss.item(), f"{desc} head {h.name}, epoch {epoch}",
                                  f"lower its learning rate (now {lr0[h.name]:g}) in the "
                                  "suite's [cell.config]")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses[h.name] += loss.item() * len(y)
            seen += len(y)
            t += 1
        if cache is None:
            scores = evaluate_heads(heads, val_features(backbone, heads, val_loader, device))
        else:
            scores = evaluate_heads(heads, cache)
        for h in heads:
            top1, centre, top5 = scores[h.name]
            history[h.name].epochs.append(EpochScores(epoch, losses[h.name] / max(seen, 1),
                                                      top1, centre, top5))
        log.info("%s epoch %d: %s", desc, epoch,
                 " ".join(f"{k}={v[0]:.1f}" for k, v in scores.items()))
        if state is not None and epoch + 1 < cfg.epochs:
            _save_epoch(state, recipe, epoch, t, heads, opts, history, gen)
    if state_fingerprint(backbone) != before:
        raise RuntimeError("the frozen backbone changed during head training (weights or BN "
                           "buffers): this is a bug in the evaluation, its numbers are invalid")
    return history
