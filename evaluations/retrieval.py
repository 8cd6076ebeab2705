"""Instance retrieval: Oxford5k / Paris6k (the paper's table) and Revisited Oxford / Paris
(PROTOCOLS.md §6, DATA_FORMATS.md B.4-B.5).

Descriptor (R-MAC, Tolias et al.): the image resized so its longest side is ``max_size``
(PIL bilinear), ImageNet-normalised, through the network (Sobel first when it has one) to its
last conv layer after ReLU (tap ``conv5``: conv5_3 of VGG16 with the last max-pool dropped,
conv5 of AlexNet before its pool, layer4 of ResNet-50); max-pooled over the square regions of
the Tolias grid with ``levels`` = L; each region L2-normalised, PCA-whitened, L2-normalised;
summed; L2-normalised. The whitening is learned on the regional descriptors of the OTHER
dataset's database (Paris for Oxford and back): centred scatter, eigenvectors, eigenvalues
floored at ``max * eig_floor``, the ``whiten_dim`` leading ones kept.

Queries: the paper's protocol resizes the whole query image and crops the query box, scaled
by the same ratio, from the resized image (x1, y1 floored, x2, y2 ceiled); the Revisited
protocol (revisitop / cirtorch) crops the box from the original image (PIL rounding) and
resizes the crop. A crop thinner than 32 px at the network's input (none at the paper's
1024 px) is widened about its centre to 32 px, inside the image, and counted in the record.
Similarity is the dot product: one matrix product ranks every query against the whole
database. AP: Oxford's ``compute_ap`` (paper; mAP over its queries) and the
Revisited ``compute_map`` (mAP Easy / Medium / Hard, mP@k) in :mod:`.metrics`.

Extraction is the expensive part and is shared through a per-checkpoint cache of regional
descriptors (one file per image folder and descriptor recipe, under ``ctx.shared_cache``), held
under a file lock while it is filled: the Oxford and Paris cells, which each need both
datasets, extract each image once, and a rerun extracts nothing. The file is written
atomically; an unreadable or truncated one is rebuilt. On a GPU, images are batched by their
size after resizing (no padding), which leaves every descriptor as it is one image at a time.

Options the paper did not use, recorded in the config, off by default: ``scales`` (multi-scale
R-MAC: the regions of each scale pooled together) and ``query_expansion`` (average query
expansion over the top-n database descriptors).
"""
from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from dcbench.core import IMAGENET_MEAN, IMAGENET_STD, UserError, check_number, file_lock
from pretrain.checkpoint import atomic_torch_save
from pretrain.data import load_rgb, loader_batches

from .backbone import frozen_backbone
from .context import TaskContext
from .datasets.oxford import WHITENING_ROLE, RetrievalSet, image_size, read_retrieval
from .metrics import REVISITED_SETUPS, ap_from_ranks, positive_ranks, revisited_map
from .records import Measurement, stable_hash

log = logging.getLogger(__name__)
CACHE_FORMAT = 1
MIN_SIDE = 32  # an input smaller than this leaves AlexNet no conv5 map
MAX_BATCH_PIXELS = 4 * 1024 * 768  # a GPU batch holds this many input pixels at most
OVERLAP, STEPS = 0.4, (2, 3, 4, 5, 6, 7)  # the Tolias grid's target overlap and grid sizes


@dataclass(frozen=True)
class RetrievalConfig:
    """The recipe; defaults: the paper's protocol (R-MAC L = 3 on the last conv layer,
    longest side 1024, whitening on the other dataset, one scale, no query expansion)."""

    max_size: int = 1024  # longest side of every image (queries: of the crop's source/crop)
    levels: int = 3  # R-MAC L
    tap: str = "conv5"  # the last conv layer, after ReLU
    whiten_dim: int = 512  # whitened dimensions kept (at most the channels)
    eig_floor: float = 1e-5  # eigenvalues floored at max * eig_floor
    scales: tuple[float, ...] = (1.0,)  # multi-scale R-MAC: max_size times each
    query_expansion: int = 0  # average query expansion over the top-n; 0: off
    kappas: tuple[int, ...] = (1, 5, 10)  # Revisited mP@k

    def __post_init__(self):
        where = "retrieval"
        for name, low in (("max_size", MIN_SIDE), ("levels", 1), ("whiten_dim", 1),
                          ("query_expansion", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise UserError(f"{where}: {name} must be an integer >= {low} (got {v!r}).")
        check_number(where, "eig_floor", self.eig_floor, minimum=0, maximum=1)
        if not self.scales or any(not isinstance(s, (int, float)) or not 0 < s <= 4
                                  for s in self.scales):
            raise UserError(f"{where}: scales must be a non-empty list of numbers in (0, 4] "
                            f"(got {self.scales!r}).")
        if not self.kappas or any(not isinstance(k, int) or k < 1 for k in self.kappas):
            raise UserError(f"{where}: kappas must be integers >= 1 (got {self.kappas!r}).")

    def descriptor_ident(self) -> dict:
        """What the regional descriptors depend on (the extraction cache's recipe)."""
        return {"max_size": self.max_size, "levels": self.levels, "tap": self.tap,
                "scales": list(self.scales), "resample": "bilinear", "format": CACHE_FORMAT}


def extra_roles(cfg: RetrievalConfig, role: str) -> tuple[str, ...]:
    """The dataset whose regional descriptors learn this role's whitening."""
    return (WHITENING_ROLE[role],)


# --------------------------------------------------------------------------- R-MAC


def rmac_regions(h: int, w: int, levels: int) -> list[tuple[int, int, int]]:
    """Square regions ``(x, y, side)`` of an ``h x w`` map (Tolias et al.'s grid).

    Level l has regions of side ``floor(2 * min(h, w) / (l + 1))``: l of them along the short
    side and l + extra along the long one, the extra (0 for a square map) chosen among grids
    of 2..7 so neighbours overlap by about 40 %; evenly spaced, rounded, shifted inside.
    """
    short = min(h, w)
    extra_w = extra_h = 0
    if h != w:
        b = (max(h, w) - short) / (np.asarray(STEPS, dtype=np.float64) - 1)
        extra = int(np.argmin(np.abs((short ** 2 - short * b) / short ** 2 - OVERLAP))) + 1
        extra_w, extra_h = (extra, 0) if w > h else (0, extra)
    regions = []
    for level in range(1, levels + 1):
        side = math.floor(2 * short / (level + 1))
        if side == 0:
            continue
        half = math.floor(side / 2 - 1)
        starts = []
        for size, n in ((w, level + extra_w), (h, level + extra_h)):
            step = (size - side) / (n - 1) if n > 1 else 0.0
            starts.append([math.floor(half + step * i) - half for i in range(n)])
        for y in starts[1]:
            for x in starts[0]:
                x, y = int(round(x)), int(round(y))
                regions.append((x - max(0, x + side - w), y - max(0, y + side - h), side))
    return regions


def regional_max(fmap: torch.Tensor, regions: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """[B, C, h, w] -> [B, R, C]: the max of each channel over each region."""
    return torch.stack([fmap[:, :, y:y + s, x:x + s].amax(dim=(2, 3)) for x, y, s in regions],
                       dim=1)


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageItem:
    """One image to describe: a database image, or a query cropped to its box."""

    key: str  # the cache key
    path: Path
    box: tuple[float, float, float, float] | None = None
    crop: str = "none"  # none | after_resize (paper) | before_resize (Revisited)


@dataclass(frozen=True)
class Plan:
    """How one item becomes the network's input, known from the image header alone."""

    pre_crop: tuple[int, int, int, int] | None  # PIL crop of the original image
    resize: tuple[int, int]  # (width, height)
    post_crop: tuple[int, int, int, int] | None  # crop of the resized image
    grown: bool = False  # a query box widened to the smallest input the network takes

    @property
    def shape(self) -> tuple[int, int]:
        if self.post_crop is not None:
            x1, y1, x2, y2 = self.post_crop
            return y2 - y1, x2 - x1
        return self.resize[1], self.resize[0]


def _fit(w: int, h: int, longest: int) -> tuple[int, int]:
    r = longest / max(w, h)
    return max(1, round(w * r)), max(1, round(h * r))


def _grow(lo: int, hi: int, need: int, limit: int) -> tuple[int, int]:
    """``[lo, hi)`` widened about its centre to ``need`` pixels, kept inside ``[0, limit)``."""
    if hi - lo >= need:
        return lo, hi
    need = min(need, limit)
    lo = min(max(0, math.floor((lo + hi - need) / 2)), limit - need)
    return lo, lo + need


def _grow_box(box: tuple[int, int, int, int], need: tuple[int, int], w: int, h: int
              ) -> tuple[int, int, int, int]:
    x1, x2 = _grow(box[0], box[2], need[0], w)
    y1, y2 = _grow(box[1], box[3], need[1], h)
    return x1, y1, x2, y2


def plan_item(item: ImageItem, size: tuple[int, int], longest: int) -> Plan:
    """The resize and crops of ``item`` (original ``size`` = (w, h)) at ``longest`` px.

    A query crop narrower than :data:`MIN_SIDE` px at the network's input (a thin box: no
    conv5 map would be left) is widened about its centre to that size, inside the image.
    """
    w, h = size
    if item.crop == "before_resize":
        x1, y1, x2, y2 = (int(round(v)) for v in item.box)  # PIL's crop rounds the same way
        box = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
        long_side = max(box[2] - box[0], box[3] - box[1], 1)
        need = math.ceil(MIN_SIDE * long_side / longest)
        grown = _grow_box(box, (need, need), w, h)
        plan = Plan(grown, _fit(grown[2] - grown[0], grown[3] - grown[1], longest), None,
                    grown != box)
    elif item.crop == "after_resize":
        rw, rh = _fit(w, h, longest)
        r = rw / w
        x1, y1, x2, y2 = item.box
        box = (max(0, math.floor(x1 * r)), max(0, math.floor(y1 * r)),
               min(rw, math.ceil(x2 * r)), min(rh, math.ceil(y2 * r)))
        grown = _grow_box(box, (MIN_SIDE, MIN_SIDE), rw, rh)
        plan = Plan(None, (rw, rh), grown, grown != box)
    else:
        plan = Plan(None, _fit(w, h, longest), None)
    if min(plan.shape) < MIN_SIDE:
        raise UserError(f"image {item.path} is {plan.shape[1]}x{plan.shape[0]} px at longest "
                        f"side {longest}, below the {MIN_SIDE} px the network needs. Raise "
                        "max_size, or leave the image out.")
    return plan


class _Inputs:
    """Dataset of (path, plan) -> normalised [3, H, W] tensor (picklable for workers)."""

    def __init__(self, jobs: Sequence[tuple[Path, Plan]]) -> None:
        self.jobs = list(jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> torch.Tensor:
        path, plan = self.jobs[i]
        img = load_rgb(path)
        if plan.pre_crop is not None:
            img = img.crop(plan.pre_crop)
        if img.size != plan.resize:
            img = img.resize(plan.resize, Image.BILINEAR)
        if plan.post_crop is not None:
            img = img.crop(plan.post_crop)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        return (x - mean) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def size_batches(shapes: Sequence[tuple[int, int]], max_pixels: int) -> list[list[int]]:
    """Indices grouped by equal input shape, each group cut to at most ``max_pixels``."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, s in enumerate(shapes):
        groups[s].append(i)
    batches = []
    for (h, w), idx in sorted(groups.items()):
        n = max(1, max_pixels // (h * w))
        batches += [idx[k:k + n] for k in range(0, len(idx), n)]
    return batches


@torch.no_grad()
def extract_regions(model, items: Sequence[ImageItem], cfg: RetrievalConfig, device,
                    workers: int = 0, max_pixels: int | None = None) -> list[torch.Tensor]:
    """L2-normalised regional descriptors [R_i, C] of each item (all scales), on the CPU.

    Images of equal input size are batched up to ``max_pixels`` input pixels (default:
    :data:`MAX_BATCH_PIXELS` on a GPU; one image at a time on a CPU, where batches of 1024-px
    images measured 0.80-0.93x as fast, ``benchmarks/bench_retrieval.py``).
    """
    if max_pixels is None:
        max_pixels = MAX_BATCH_PIXELS if torch.device(device).type == "cuda" else 1
    jobs, owner = [], []
    for i, item in enumerate(items):
        size = image_size(item.path)
        for s in cfg.scales:
            jobs.append((item.path, plan_item(item, size, round(cfg.max_size * s))))
            owner.append(i)
    batches = size_batches([p.shape for _, p in jobs], max_pixels)
    loader = DataLoader(_Inputs(jobs), batch_sampler=batches, num_workers=workers)
    parts: list[list[torch.Tensor]] = [[] for _ in items]
    for idx, x in zip(batches, loader_batches(loader)):
        fmap = model.forward_taps(x.to(device), [cfg.tap])[cfg.tap].float()
        desc = F.normalize(regional_max(fmap, rmac_regions(*fmap.shape[2:], cfg.levels)), dim=-1)
        for j, d in zip(idx, desc.cpu()):
            parts[owner[j]].append(d)
    return [torch.cat(p) for p in parts]


# --------------------------------------------------------------------------- the cache


class DescriptorCache:
    """Regional descriptors by item key for one (checkpoint, image folder, descriptor
    recipe), in one ``torch.save`` file written atomically. A file that cannot be read, or
    that was written for another recipe, is set aside and rebuilt."""

    def __init__(self, path: Path, ident: dict) -> None:
        self.path, self.ident = Path(path), ident
        self.entries: dict[str, torch.Tensor] = {}

    def load(self) -> None:
        if not self.path.exists():
            return
        try:
            data = torch.load(self.path, map_location="cpu", weights_only=True)
            keys, offsets, regions = data["keys"], data["offsets"], data["regions"]
            if data["ident"] != self.ident or len(offsets) != len(keys) + 1 \
                    or int(offsets[-1]) != regions.shape[0]:
                raise ValueError("its contents do not match its recipe")
        except Exception as e:  # noqa: BLE001 -- any unreadable cache is rebuilt
            log.warning("descriptor cache %s is unreadable (%s: %s); rebuilding it", self.path,
                        type(e).__name__, e)
            self.entries = {}
            return
        self.entries = {k: regions[int(offsets[i]):int(offsets[i + 1])]
                        for i, k in enumerate(keys)}

    def save(self) -> None:
        keys = sorted(self.entries)
        sizes = [self.entries[k].shape[0] for k in keys]
        offsets = torch.tensor([0, *np.cumsum(sizes).tolist()], dtype=torch.int64)
        regions = torch.cat([self.entries[k] for k in keys]) if keys else torch.zeros(0)
        atomic_torch_save({"ident": self.ident, "keys": keys, "offsets": offsets,
                           "regions": regions.contiguous()}, self.path)


def cached_regions(model, items: Sequence[ImageItem], cfg: RetrievalConfig, ctx: TaskContext,
                   folder: Path) -> tuple[list[torch.Tensor], int]:
    """Regional descriptors of ``items`` (images under ``folder``) through the cache; returns
    them and how many items were extracted now."""
    ident = {"checkpoint": ctx.checkpoint.sha256, "folder": str(Path(folder).resolve()),
             **cfg.descriptor_ident()}
    path = ctx.shared_cache / "retrieval" / f"{stable_hash(ident)}.pt"
    with file_lock(path.with_suffix(".lock")):
        cache = DescriptorCache(path, ident)
        cache.load()
        todo = list({it.key: it for it in items if it.key not in cache.entries}.values())
        if todo:
            log.info("extracting %d image(s) of %s (%d cached)", len(todo), folder,
                     len(items) - len(todo))
            for it, r in zip(todo, extract_regions(model, todo, cfg, ctx.device,
                                                   ctx.runtime.workers)):
                cache.entries[it.key] = r
            cache.save()
        return [cache.entries[it.key] for it in items], len(todo)


def database_items(data: RetrievalSet) -> list[ImageItem]:
    return [ImageItem(name, path) for name, path in zip(data.images, data.paths)]


def query_items(data: RetrievalSet) -> list[ImageItem]:
    crop = "after_resize" if data.protocol == "original" else "before_resize"
    return [ImageItem(f"{q.image}|{crop}|{','.join(f'{v:g}' for v in q.box)}", q.path, q.box,
                      crop) for q in data.queries]


# --------------------------------------------------------------------------- whitening


@dataclass(frozen=True)
class Whitening:
    mean: torch.Tensor  # [C]
    projection: torch.Tensor  # [d, C]


def learn_whitening(regions: torch.Tensor, dim: int, eig_floor: float) -> Whitening:
    """PCA-whitening of row vectors ``regions`` [N, C] (float64 internally)."""
    x = regions.double()
    mean = x.mean(dim=0)
    xc = x - mean
    evals, evecs = torch.linalg.eigh(xc.T @ xc)
    evals, evecs = evals.flip(0), evecs.flip(1)  # descending
    evals = evals.clamp(min=float(evals[0]) * eig_floor if evals[0] > 0 else 1e-12)
    d = min(dim, x.shape[1])
    proj = evecs[:, :d] / evals[:d].sqrt()
    return Whitening(mean.float(), proj.T.contiguous().float())


def aggregate(regions: Sequence[torch.Tensor], w: Whitening) -> torch.Tensor:
    """R-MAC global descriptors [n, d]: whiten each region, L2, sum per image, L2."""
    counts = torch.tensor([r.shape[0] for r in regions])
    z = F.normalize((torch.cat(list(regions)) - w.mean) @ w.projection.T, dim=1)
    owner = torch.repeat_interleave(torch.arange(len(regions)), counts)
    out = torch.zeros(len(regions), z.shape[1]).index_add_(0, owner, z)
    return F.normalize(out, dim=1)


# --------------------------------------------------------------------------- ranking


def rank(queries: torch.Tensor, database: torch.Tensor, expansion: int = 0) -> np.ndarray:
    """[n_queries, n_db] database indices by decreasing dot product (one matrix product;
    ties keep database order). ``expansion`` > 0: average query expansion over the top-n."""
    order = torch.argsort(queries @ database.T, dim=1, descending=True, stable=True)
    if expansion:
        top = database[order[:, :expansion]].sum(dim=1)
        order = torch.argsort(F.normalize(queries + top, dim=1) @ database.T, dim=1,
                              descending=True, stable=True)
    return order.numpy()


def original_aps(order: np.ndarray, data: RetrievalSet) -> np.ndarray:
    """Oxford ``compute_ap`` of each query: positives good ∪ ok (counted even when absent from
    the database, like Paris' corrupted images), junk skipped."""
    index = {n: i for i, n in enumerate(data.images)}
    aps = []
    for row, q in zip(order, data.queries):
        positives = set(q.groups["good"]) | set(q.groups["ok"])
        pos = [index[n] for n in positives if n in index]
        junk = [index[n] for n in q.groups["junk"] if n in index]
        aps.append(ap_from_ranks(positive_ranks(row, pos, junk), len(positives)))
    return np.asarray(aps, dtype=np.float64)


# --------------------------------------------------------------------------- the task


def describe(model, data: RetrievalSet, cfg: RetrievalConfig, ctx: TaskContext,
             with_queries: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """(database regions, query regions, images extracted now) of ``data``."""
    folder = data.root / "jpg"
    db, n_db = cached_regions(model, database_items(data), cfg, ctx, folder)
    if not with_queries:
        return db, [], n_db
    qs, n_q = cached_regions(model, query_items(data), cfg, ctx, folder)
    return db, qs, n_db + n_q


def _pct(x: float) -> float | None:
    return None if math.isnan(x) else round(100 * x, 4)


def run(cfg: RetrievalConfig, ctx: TaskContext) -> list[Measurement]:
    """Rank the role's queries against its database; the paper protocol gives one mAP
    (column = the role), the Revisited one mAP for each of E / M / H (``<role>/E`` ...)."""
    t0 = time.perf_counter()
    data = read_retrieval(ctx.data_root, ctx.dataset)
    other_role = WHITENING_ROLE[ctx.dataset]
    if other_role not in ctx.extra_roots:
        raise UserError(f"retrieval on {ctx.dataset} learns its whitening on {other_role}, "
                        f"but no {other_role} root was given: pass --data-root "
                        f"{other_role}=PATH.")
    other = read_retrieval(ctx.extra_roots[other_role], other_role)
    model = frozen_backbone(ctx)
    if cfg.tap not in model.tap_names:
        raise UserError(f"retrieval: tap {cfg.tap!r} is not a layer of {model.spec.arch} "
                        f"(available: {', '.join(model.tap_names)}).")
    db, qs, extracted = describe(model, data, cfg, ctx, with_queries=True)
    wdb, _, extracted_other = describe(model, other, cfg, ctx, with_queries=False)
    t1 = time.perf_counter()
    whitening = learn_whitening(torch.cat(wdb), cfg.whiten_dim, cfg.eig_floor)
    db_desc, q_desc = aggregate(db, whitening), aggregate(qs, whitening)
    t2 = time.perf_counter()
    order = rank(q_desc, db_desc, cfg.query_expansion)
    t3 = time.perf_counter()
    details = {"n_database": len(data), "n_queries": len(data.queries),
               "excluded": list(data.excluded), "whitening": {
                   "learned_on": other_role, "n_images": len(other),
                   "n_regions": int(sum(r.shape[0] for r in wdb)),
                   "dim": int(whitening.projection.shape[0])},
               "regions_per_image": round(float(np.mean([r.shape[0] for r in db])), 2),
               "extracted": {ctx.dataset: extracted, other_role: extracted_other},
               "query_crop": query_items(data)[0].crop if data.queries else None,
               "queries_widened": sum(plan_item(q, image_size(q.path), cfg.max_size).grown
                                      for q in query_items(data))}
    if data.protocol == "original":
        aps = original_aps(order, data)
        t4 = time.perf_counter()
        details["seconds"] = _seconds(t0, t1, t2, t3, t4)
        details["per_query_ap"] = {q.name: _pct(a) for q, a in zip(data.queries, aps)}
        valid = ~np.isnan(aps)
        if not valid.any():
            raise UserError(f"retrieval on {ctx.dataset}: no query of {data.root / 'lab'} has "
                            "a positive (good or ok) image; check the ground-truth files.")
        details["n_empty"] = int((~valid).sum())
        return [Measurement(ctx.dataset, "mAP", _pct(float(aps[valid].mean())), "final",
                            None, details)]
    groups = [q.groups for q in data.queries]
    results = {s: revisited_map(order, groups, s, cfg.kappas) for s in REVISITED_SETUPS}
    details["seconds"] = _seconds(t0, t1, t2, t3, time.perf_counter())
    out = []
    for s, r in results.items():
        if math.isnan(r["map"]):
            raise UserError(f"retrieval on {ctx.dataset}: no query has a positive under the "
                            f"{s} setup; check {data.root}.")
        per = {"mP@k": {k: _pct(v) for k, v in r["mpk"].items()}, "n_empty": r["n_empty"],
               "per_query_ap": {q.name: _pct(a) for q, a in zip(data.queries, r["aps"])}}
        out.append(Measurement(f"{ctx.dataset}/{s}", "mAP", _pct(r["map"]), "final", None,
                               {**details, **per}))
    return out


def _seconds(t0: float, t1: float, t2: float, t3: float, t4: float) -> dict:
    """Where the cell's time went: reading + extraction, whitening, ranking, scoring."""
    return {"extract": round(t1 - t0, 3), "whiten": round(t2 - t1, 3),
            "rank": round(t3 - t2, 3), "score": round(t4 - t3, 3)}
