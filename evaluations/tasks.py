"""The task registry: what each evaluation is, which table it feeds, what it needs.

A task is a config dataclass whose defaults ARE the paper protocol plus a pure ``run``
function returning measurement dicts; cluster code never enters it. Adding VOC
classification/detection/segmentation or retrieval = one module + one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, Callable

from pretrain.errors import UserError
from slurm.launch import Resources

from . import fc_retrain, linear
from .datasets.imagenet import imagenet_split
from .datasets.places205 import places205_split


@dataclass(frozen=True)
class TaskDef:
    name: str
    table: str  # paper table id (records.py)
    config_cls: type
    run: Callable[..., list[dict]]
    roles: tuple[str, ...]  # dataset roles the task accepts
    protocol: str  # dc2018 = the paper's; dc2018-reimpl = settings never published
    resources: Resources  # at paper scale (one array task)
    description: str
    columns: Callable[[Any, str], list[str]]  # (config, dataset role) -> table columns it fills


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
})

# role -> reader(root, split) -> Split
READERS: MappingProxyType[str, Callable] = MappingProxyType({
    "imagenet": imagenet_split,
    "places": places205_split,
})


def get_task(name: str) -> TaskDef:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}.")
    return TASKS[name]


def resolve_config(task: TaskDef, overrides: dict[str, Any] | None) -> Any:
    """The task's paper config with ``overrides`` applied; unknown keys are an error."""
    overrides = dict(overrides or {})
    known = {f.name: f for f in fields(task.config_cls)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise UserError(f"task {task.name}: unknown config key(s) {unknown}; known: "
                        f"{', '.join(known)}.")
    for k, v in overrides.items():
        if isinstance(v, list):
            overrides[k] = tuple(v)
    return task.config_cls(**overrides)
