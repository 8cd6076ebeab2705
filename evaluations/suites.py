"""Suites (small TOML files) -> cells: task x dataset x seed x checkpoint, each with its key.

A suite file::

    name = "mine"
    random_baseline = false          # also evaluate a never-trained net of the same arch
    [datasets]                       # optional roles -> roots ("embedded" = build the demo data)
    imagenet = "/data/ILSVRC2012"
    [embedded]                       # sizes of the embedded data, when a role is "embedded"
    n_train_per_class = 120
    n_val_per_class = 50
    [resources]                      # optional overrides of every task's SLURM resources
    timeout_min = 600
    [[cell]]
    task = "linear"
    datasets = ["imagenet", "places"]
    seeds = [0]
    [cell.config]                    # optional overrides of the task's paper config
    epochs = 90

A cell's key hashes (task, dataset, data root, protocol, resolved config, checkpoint sha256,
seed): change any of them and the cell is new; rerun with the same and it is skipped.
"""
from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, replace
from importlib import resources as ir
from pathlib import Path
from typing import Any

from pretrain.errors import UserError
from slurm.launch import Resources

from .backbone import CheckpointInfo
from .records import stable_hash
from .tasks import get_task, resolve_config

BUILTIN = ("demo", "paper")


@dataclass(frozen=True)
class CellSpec:
    """One entry of a suite (before checkpoints and data roots are known)."""

    task: str
    datasets: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    config: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    name: str
    cells: tuple[CellSpec, ...]
    datasets: dict = field(default_factory=dict)  # role -> root or "embedded"
    embedded: dict = field(default_factory=dict)
    resources: dict = field(default_factory=dict)
    random_baseline: bool = False
    source: str = ""


@dataclass(frozen=True)
class Cell:
    """One unit of work: one task on one dataset with one seed for one checkpoint."""

    key: str
    task: str
    table: str
    dataset: str
    data_root: str
    dataset_name: str
    protocol: str
    seed: int
    config: dict
    checkpoint: dict
    resources: Resources
    columns: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["resources"] = asdict(self.resources)
        return d


def load_suite(name_or_path: str) -> Suite:
    """A built-in suite by name (demo, paper) or a user's TOML file."""
    if name_or_path in BUILTIN:
        text = ir.files("evaluations").joinpath(f"suites/{name_or_path}.toml").read_text()
        source = f"builtin:{name_or_path}"
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise UserError(f"unknown suite {name_or_path!r}: not one of {', '.join(BUILTIN)} and "
                            f"no file {path} exists. Pass --suite demo|paper|FILE.toml.")
        text, source = path.read_text(), str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"suite {source} is not valid TOML ({e}).") from None
    return parse_suite(data, source)


def parse_suite(data: dict, source: str) -> Suite:
    raw_cells = data.get("cell")
    if not isinstance(raw_cells, list) or not raw_cells:
        raise UserError(f"suite {source} has no [[cell]] entries; add at least one, e.g.\n"
                        '[[cell]]\ntask = "linear"\ndatasets = ["imagenet"]')
    cells = []
    for i, c in enumerate(raw_cells):
        if "task" not in c or "datasets" not in c:
            raise UserError(f"suite {source}: [[cell]] #{i + 1} needs 'task' and 'datasets'.")
        task = get_task(c["task"])
        bad = [d for d in c["datasets"] if d not in task.roles]
        if bad:
            raise UserError(f"suite {source}: task {task.name} does not take dataset(s) {bad}; "
                            f"it takes {', '.join(task.roles)}.")
        resolve_config(task, c.get("config"))  # validate keys early
        cells.append(CellSpec(task.name, tuple(c["datasets"]), tuple(c.get("seeds", [0])),
                              dict(c.get("config", {}))))
    known_res = set(Resources.__dataclass_fields__)
    res = dict(data.get("resources", {}))
    if set(res) - known_res:
        raise UserError(f"suite {source}: unknown [resources] keys {sorted(set(res) - known_res)};"
                        f" known: {', '.join(sorted(known_res))}.")
    return Suite(name=str(data.get("name", Path(source).stem)), cells=tuple(cells),
                 datasets=dict(data.get("datasets", {})), embedded=dict(data.get("embedded", {})),
                 resources=res, random_baseline=bool(data.get("random_baseline", False)),
                 source=source)


def filter_tasks(suite: Suite, tasks: list[str] | None) -> Suite:
    if not tasks:
        return suite
    for t in tasks:
        get_task(t)
    kept = tuple(c for c in suite.cells if c.task in tasks)
    if not kept:
        raise UserError(f"--tasks {','.join(tasks)} selects no cell of suite {suite.name} "
                        f"(it has {', '.join(sorted({c.task for c in suite.cells}))}).")
    return replace(suite, cells=kept)


def build_cells(suite: Suite, checkpoints: list[CheckpointInfo], roots: dict[str, Path],
                names: dict[str, str], resource_overrides: dict[str, Any]) -> list[Cell]:
    """Every (checkpoint x cell spec x dataset x seed) of the suite, keyed."""
    cells = []
    for ck in checkpoints:
        for spec in suite.cells:
            task = get_task(spec.task)
            cfg_obj = resolve_config(task, spec.config)
            cfg = asdict(cfg_obj)
            res = replace(task.resources, **{**suite.resources, **resource_overrides})
            for role in spec.datasets:
                root = str(Path(roots[role]).resolve())
                for seed in spec.seeds:
                    ident = {"task": task.name, "dataset": role, "root": root,
                             "protocol": task.protocol, "config": cfg,
                             "checkpoint": ck.sha256, "seed": seed}
                    key = f"{task.name}-{role}-s{seed}-{stable_hash(ident)}"
                    cells.append(Cell(key=key, task=task.name, table=task.table, dataset=role,
                                      data_root=root, dataset_name=names[role],
                                      protocol=task.protocol, seed=seed, config=cfg,
                                      checkpoint=ck.to_dict(), resources=res,
                                      columns=tuple(task.columns(cfg_obj, role))))
    return cells


def needed_roles(suite: Suite) -> list[str]:
    return sorted({r for c in suite.cells for r in c.datasets})
