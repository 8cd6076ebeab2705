"""The task registry: what each evaluation is, which table it feeds, what it needs.

A task is a frozen config dataclass -- its *recipe*, whose defaults ARE the paper protocol --
and a pure ``run(config, ctx: TaskContext) -> list[Measurement]``; cluster code never enters
it. Adding VOC classification/detection/segmentation or retrieval = one module + one entry.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
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


TASKS: MappingProxyType[str, TaskDef] = MappingProxyType({
    "linear": TaskDef(
        "linear", "table1", linear.LinearProbeConfig, linear.run, ("imagenet", "places"),
        "dc2018", Resources(gpus_per_node=1, cpus_per_task=10, mem_gb=64, timeout_min=72 * 60),
        "Table 1: linear probes on conv1..conv5 (AvgPool ~9k dims, 90 epochs, 10-crop)",
        lambda cfg, role: [f"{role}/{layer}" for layer in cfg.layers]),
    "fc_retrain": TaskDef(
        "fc_retrain", "supp_fc", fc_retrain.FcRetrainConfig, fc_retrain.run, ("imagenet",),
        "dc2018-reimpl", Resources(gpus_per_node=1, cpus_per_task=10, mem_gb=64,
                                   timeout_min=72 * 60),
        "Supplementary table: fc6-8 retrained on frozen conv layers (ImageNet Acc@1)",
        lambda cfg, role: [f"{role}/acc1"]),
    "voc_classification": TaskDef(
        "voc_classification", "voc", voc_classification.VocClassificationConfig,
        voc_classification.run, ("voc07",), "dc2018",
        Resources(gpus_per_node=1, cpus_per_task=10, mem_gb=32, timeout_min=24 * 60),
        "Table 2: Pascal VOC07 classification, fc6-8 or all (sklearn AP, 10 random crops)",
        lambda cfg, role: [f"classification/{cfg.mode}"], FC_ARCHS),
    "voc_detection": TaskDef(
        "voc_detection", "voc", voc_detection.VocDetectionConfig, voc_detection.run,
        ("voc07",), "dc2018-reimpl",
        Resources(gpus_per_node=1, cpus_per_task=10, mem_gb=32, timeout_min=24 * 60),
        "Table 2: Pascal VOC07 detection, fc6-8 or all (torchvision two-stage detector with "
        "the checkpoint's fc6/fc7 as box head; VOC07 11-point AP)",
        lambda cfg, role: [f"detection/{cfg.mode}"], FC_ARCHS),
    "voc_segmentation": TaskDef(
        "voc_segmentation", "voc", voc_segmentation.VocSegmentationConfig, voc_segmentation.run,
        ("voc12",), "dc2018-reimpl",
        Resources(gpus_per_node=1, cpus_per_task=10, mem_gb=32, timeout_min=24 * 60),
        "Table 2: Pascal VOC12 segmentation, fc6-8 or all (FCN-32s from fc6/fc7; mIoU)",
        lambda cfg, role: [f"segmentation/{cfg.mode}"], FC_ARCHS,
        voc_segmentation.extra_roles),
    "retrieval": TaskDef(
        "retrieval", "retrieval", retrieval.RetrievalConfig, retrieval.run, ORIGINAL_ROLES,
        "dc2018", Resources(gpus_per_node=1, cpus_per_task=10, mem_gb=32, timeout_min=6 * 60),
        "Instance retrieval, Oxford5k / Paris6k: R-MAC (L=3) on the last conv layer, "
        "whitening learned on the other dataset, Oxford compute_ap mAP",
        lambda cfg, role: [role], extra_roles=retrieval.extra_roles),
    "retrieval_revisited": TaskDef(
        "retrieval_revisited", "retrieval", retrieval.RetrievalConfig, retrieval.run,
        REVISITED_ROLES, "dc2018-reimpl",
        Resources(gpus_per_node=1, cpus_per_task=10, mem_gb=32, timeout_min=6 * 60),
        "Instance retrieval, Revisited Oxford / Paris (not in the paper): the same R-MAC, "
        "mAP Easy / Medium / Hard and mP@1,5,10 (revisitop compute_map)",
        lambda cfg, role: [f"{role}/{s}" for s in ("E", "M", "H")],
        extra_roles=retrieval.extra_roles),
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
