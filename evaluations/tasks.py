"""The task registry: what each evaluation is, which table it feeds, what it needs.

A task is a frozen config dataclass -- its *recipe*, whose defaults ARE the paper protocol --
and a pure ``run(config, ctx: TaskContext) -> list[Measurement]``; cluster code never enters
it. Adding VOC classification/detection/segmentation or retrieval = one module + one entry.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Callable

from dcbench.core import UserError
from slurm.launch import Resources

from . import (fc_retrain, linear, retrieval, voc_classification, voc_detection,
               voc_segmentation)
from .datasets.oxford import ORIGINAL_ROLES, REVISITED_ROLES
from .finetune import FC_ARCHS


@dataclass(frozen=True)
class TaskDef:
    name: str
    table: str  # paper table id (records.py)
    config_cls: type  # the recipe dataclass
    run: Callable[..., list]  # run(config, ctx) -> list[Measurement]
    roles: tuple[str, ...]  # dataset roles the task accepts
    protocol: str  # dc2018 = the paper's; dc2018-reimpl = settings never published
    resources: Resources  # at paper scale (one array task)
    description: str
    columns: Callable[[Any, str], list[str]]  # (config, dataset role) -> table columns it fills
    archs: tuple[str, ...] = ("alexnet", "vgg16", "resnet50")  # networks it can evaluate
    # (config, dataset role) -> other roles the cell reads (SBD; the whitening dataset)
    extra_roles: Callable[[Any, str], tuple[str, ...]] = lambda cfg, role: ()
    # GPU-hours of one cell at paper scale, by dataset role (see PAPER_IMAGES below)
    gpu_hours: Mapping[str, float] = field(kw_only=True)
    # config -> the recipe's work relative to the paper recipe's (1.0 for the defaults)
    work: Callable[[Any], float] = field(kw_only=True)


# ------------------------------------------------------------------ GPU-hours at paper scale
# One cell's GPU-hours: the task's default recipe (the paper's) on the role's full dataset,
# with the table's network in the paper (AlexNet; VGG16 for retrieval), on one P100-class GPU.
# The unit is the paper's own throughput (PROTOCOLS.md section 1): 500 epochs of DeepCluster on
# ImageNet's 1,281,167 images took 12 days on one P100, a third of it k-means; the rest is two
# passes of every image through AlexNet (features, then training; forward-only and
# forward-backward alike, as the paper does not split them): 0.15 GPU-h per million 224-px
# images. Larger inputs count as their pixels / 224^2 images, heavier heads by their
# multiply-adds next to AlexNet's trunk. The VOC tasks' small batches (2-16 images) run below
# this throughput: their estimates are floors. The probes dominate anyway: 84 of the paper
# suite's 87 GPU-h per checkpoint.
GPU_H_PER_MILLION = 12 * 24 * (2 / 3) / 500 / (2 * 1.281167)
PX224 = 224 * 224
ALEXNET_GMAC = 1.04  # Sobel + conv1..conv5 at 224 px (layer shapes of PROTOCOLS.md section 1)
FC67_GMAC = (9216 * 4096 + 4096 * 4096) / 1e9  # fc6 + fc7 on one input: 0.055
VGG16_GMAC = 15.3  # VGG16's convolutions at 224 px: 15x AlexNet's
DET_PX = 600 * 800  # a VOC image (500 x 375) with its shorter side at 600
ROI_HEAD = 1 + 128 * FC67_GMAC / (ALEXNET_GMAC * DET_PX / PX224)  # fc6/fc7 on 128 RoIs: x1.7
SEG_PX = 320 * 320  # a training crop
FCN_HEAD = 1 + 100 * FC67_GMAC / (ALEXNET_GMAC * SEG_PX / PX224)  # fc6/7 at 10x10 spots: x3.6
RMAC = 1024 * 768 / PX224 * VGG16_GMAC / ALEXNET_GMAC  # one image at 1024 px through VGG16
# millions of 224-px AlexNet images per cell of the paper's recipe, by task and role
PAPER_IMAGES: Mapping[str, Mapping[str, float]] = MappingProxyType({
    # 90 epochs x (train + 10 crops x val): ImageNet 1,281,167 + 50,000 (24 GPU-h);
    # Places205 2,448,873 + 20,500 (36 GPU-h)
    "linear": {"imagenet": 90 * (1.281167 + 10 * 0.05), "places": 90 * (2.448873 + 10 * 0.0205)},
    # the linear probe's recipe; fc6-8 add 6 % to AlexNet's multiply-adds
    "fc_retrain": {"imagenet": 90 * (1.281167 + 10 * 0.05)},
    # 150,000 iterations x 16 crops + 10 crops x 4,952 test images (0.37 GPU-h)
    "voc_classification": {"voc07": 0.15 * 16 + 10 * 0.004952},
    # 70,000 iterations x 2 images + 4,952 test images at 600 x 800, with the box head (0.35)
    "voc_detection": {"voc07": (0.14 + 0.004952) * DET_PX / PX224 * ROI_HEAD},
    # 30,000 iterations x 8 crops + 1,449 val images of 500 x 375, with the FCN head (0.27)
    "voc_segmentation": {"voc12": (0.24 * SEG_PX + 0.001449 * 500 * 375) / PX224 * FCN_HEAD},
    # both databases (the cell's, and the other's for the whitening: Oxford 5,063 + Paris
    # 6,392 images) and 55 queries (0.40)
    "retrieval": dict.fromkeys(ORIGINAL_ROLES, (0.005063 + 0.006392 + 0.000055) * RMAC),
    # ROxford 4,993 + RParis 6,322 images and 70 queries (0.39)
    "retrieval_revisited": dict.fromkeys(REVISITED_ROLES, (0.004993 + 0.006322 + 0.00007) * RMAC),
})


def paper_gpu_hours(task: str) -> Mapping[str, float]:
    return MappingProxyType({role: m * GPU_H_PER_MILLION for role, m in PAPER_IMAGES[task].items()})


def relative(cfg: Any, *names: str) -> float:
    """The product of ``cfg``'s values of ``names`` over the paper recipe's (its defaults)."""
    paper = type(cfg)()
    ratio = 1.0
    for name in names:
        ratio *= getattr(cfg, name) / getattr(paper, name)
    return ratio


def epochs_work(cfg: Any) -> float:
    return relative(cfg, "epochs") * relative(cfg, "input_size") ** 2


def iterations_work(cfg: Any, side: str) -> float:
    return relative(cfg, "iterations", "batch_size") * relative(cfg, side) ** 2


def detection_work(cfg: Any) -> float:
    """Images x pixels; a 4:3 VOC image has its shorter side at ``min_size``, its longer at
    most at ``max_size``."""
    def pixels(c: Any) -> float:
        return min(4 / 3 * c.min_size, c.max_size) ** 2

    return relative(cfg, "iterations", "batch_size") * pixels(cfg) / pixels(type(cfg)())


def retrieval_work(cfg: Any) -> float:
    return relative(cfg, "max_size") ** 2 * sum(s * s for s in cfg.scales)


def estimate_gpu_hours(task: TaskDef, config: Any, role: str) -> float:
    """GPU-hours of one cell: the paper-scale estimate of its role times its recipe's work
    relative to the paper's (epochs or iterations x batch, x input pixels). It assumes the
    paper's datasets (their full image counts), the paper's network and one P100-class GPU."""
    return task.gpu_hours[role] * task.work(config)


TASKS: MappingProxyType[str, TaskDef] = MappingProxyType({
    "linear": TaskDef(
        "linear", "table1", linear.LinearProbeConfig, linear.run, ("imagenet", "places"),
        "dc2018", Resources(gpus_per_node=1, cpus_per_task=10, mem_gb=64, timeout_min=72 * 60),
        "Table 1: linear probes on conv1..conv5 (AvgPool ~9k dims, 90 epochs, 10-crop)",
        lambda cfg, role: [f"{role}/{layer}" for layer in cfg.layers],
        gpu_hours=paper_gpu_hours("linear"), work=epochs_work),
    "fc_retrain": TaskDef(
        "fc_retrain", "supp_fc", fc_retrain.FcRetrainConfig, fc_retrain.run, ("imagenet",),
        "dc2018-reimpl", Resources(gpus_per_node=1, cpus_per_task=10, mem_gb=64,
                                   timeout_min=72 * 60),
        "Supplementary table: fc6-8 retrained on frozen conv layers (ImageNet Acc@1)",
        lambda cfg, role: [f"{role}/acc1"],
        gpu_hours=paper_gpu_hours("fc_retrain"), work=epochs_work),
    "voc_classification": TaskDef(
        "voc_classification", "voc", voc_classification.VocClassificationConfig,
        voc_classification.run, ("voc07",), "dc2018",
        Resources(gpus_per_node=1, cpus_per_task=10, mem_gb=32, timeout_min=24 * 60),
        "Table 2: Pascal VOC07 classification, fc6-8 or all (sklearn AP, 10 random crops)",
        lambda cfg, role: [f"classification/{cfg.mode}"], FC_ARCHS,
        gpu_hours=paper_gpu_hours("voc_classification"),
        work=lambda cfg: iterations_work(cfg, "input_size")),
    "voc_detection": TaskDef(
        "voc_detection", "voc", voc_detection.VocDetectionConfig, voc_detection.run,
        ("voc07",), "dc2018-reimpl",
        Resources(gpus_per_node=1, cpus_per_task=10, mem_gb=32, timeout_min=24 * 60),
        "Table 2: Pascal VOC07 detection, fc6-8 or all (torchvision two-stage detector with "
        "the checkpoint's fc6/fc7 as box head; VOC07 11-point AP)",
        lambda cfg, role: [f"detection/{cfg.mode}"], FC_ARCHS,
        gpu_hours=paper_gpu_hours("voc_detection"), work=detection_work),
    "voc_segmentation": TaskDef(
        "voc_segmentation", "voc", voc_segmentation.VocSegmentationConfig, voc_segmentation.run,
        ("voc12",), "dc2018-reimpl",
        Resources(gpus_per_node=1, cpus_per_task=10, mem_gb=32, timeout_min=24 * 60),
        "Table 2: Pascal VOC12 segmentation, fc6-8 or all (FCN-32s from fc6/fc7; mIoU)",
        lambda cfg, role: [f"segmentation/{cfg.mode}"], FC_ARCHS,
        voc_segmentation.extra_roles, gpu_hours=paper_gpu_hours("voc_segmentation"),
        work=lambda cfg: iterations_work(cfg, "crop_size")),
    "retrieval": TaskDef(
        "retrieval", "retrieval", retrieval.RetrievalConfig, retrieval.run, ORIGINAL_ROLES,
        "dc2018", Resources(gpus_per_node=1, cpus_per_task=10, mem_gb=32, timeout_min=6 * 60),
        "Instance retrieval, Oxford5k / Paris6k: R-MAC (L=3) on the last conv layer, "
        "whitening learned on the other dataset, Oxford compute_ap mAP",
        lambda cfg, role: [role], extra_roles=retrieval.extra_roles,
        gpu_hours=paper_gpu_hours("retrieval"), work=retrieval_work),
    "retrieval_revisited": TaskDef(
        "retrieval_revisited", "retrieval", retrieval.RetrievalConfig, retrieval.run,
        REVISITED_ROLES, "dc2018-reimpl",
        Resources(gpus_per_node=1, cpus_per_task=10, mem_gb=32, timeout_min=6 * 60),
        "Instance retrieval, Revisited Oxford / Paris (not in the paper): the same R-MAC, "
        "mAP Easy / Medium / Hard and mP@1,5,10 (revisitop compute_map)",
        lambda cfg, role: [f"{role}/{s}" for s in ("E", "M", "H")],
        extra_roles=retrieval.extra_roles, gpu_hours=paper_gpu_hours("retrieval_revisited"),
        work=retrieval_work),
})


def get_task(name: str) -> TaskDef:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}.")
    return TASKS[name]


def resolve_config(task: TaskDef, overrides: dict[str, Any] | None) -> Any:
    """The task's paper recipe with ``overrides`` applied; unknown keys are an error."""
    overrides = dict(overrides or {})
    known = {f.name for f in fields(task.config_cls)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise UserError(f"task {task.name}: unknown config key(s) {unknown}; known: "
                        f"{', '.join(known)}.")
    for k, v in overrides.items():
        if isinstance(v, list):
            overrides[k] = tuple(v)
    try:
        return task.config_cls(**overrides)
    except TypeError as e:
        raise UserError(f"task {task.name}: bad config ({e}).") from None
