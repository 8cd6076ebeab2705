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
    [runtime]                        # optional: how cells run (workers, device, val_cache_gb)
    workers = 8
    [[cell]]
    task = "linear"
    datasets = ["imagenet", "places"]
    seeds = [0]
    [cell.config]                    # optional overrides of the task's paper recipe
    epochs = 90
    [cell.runtime]                   # optional runtime overrides for this cell

A cell's key hashes what can change its numbers -- (task, dataset role, data root, protocol,
recipe, checkpoint sha256, seed) -- and never how it runs (workers, device, caches): change
the former and the cell is new; change only the latter and a rerun skips it.
"""
from __future__ import annotations

import logging
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources as ir
from pathlib import Path
from typing import Any

from dcbench.core import UserError
from slurm.launch import Resources, check_sbatch_value

from .context import Runtime
from .records import CheckpointInfo, stable_hash
from .tasks import get_task, resolve_config

log = logging.getLogger(__name__)
BUILTIN = ("demo", "paper", "k_ablation", "k_ablation_demo")
RUNTIME_KEYS = frozenset(f.name for f in fields(Runtime))


@dataclass(frozen=True)
class CellSpec:
    """One entry of a suite (before checkpoints and data roots are known)."""

    task: str
    datasets: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    config: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    name: str
    cells: tuple[CellSpec, ...]
    datasets: dict = field(default_factory=dict)  # role -> root or "embedded"
    embedded: dict = field(default_factory=dict)
    resources: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)
    random_baseline: bool = False
    source: str = ""


@dataclass(frozen=True)
class Cell:
    """One unit of work: one task on one dataset with one seed for one checkpoint.

    Travels to the worker as it is (pickled by submitit). Only ``key`` decides whether it is
    done; ``runtime``, ``resources`` and ``results`` say how and where it runs.
    """

    key: str
    task: str
    table: str
    dataset: str
    data_root: str
    dataset_name: str
    protocol: str
    seed: int
    config: Any  # the task's recipe dataclass
    checkpoint: CheckpointInfo
    resources: Resources
    runtime: Runtime
    results: str
    columns: tuple[str, ...] = ()
    extra_roots: tuple[tuple[str, str], ...] = ()  # (role, root) of other datasets it reads

    @property
    def recipe(self) -> dict:
        return asdict(self.config)


def cell_key(task: str, role: str, root: str, protocol: str, recipe: dict, sha256: str,
             seed: int, extra_roots: tuple[tuple[str, str], ...] = ()) -> str:
    """``<task>-<role>-s<seed>-<hash>`` of everything that can change the cell's numbers."""
    ident = {"task": task, "dataset": role, "root": root, "protocol": protocol,
             "config": recipe, "checkpoint": sha256, "seed": seed}
    if extra_roots:  # only then: the keys of every other cell stay what they were
        ident["extra_roots"] = [list(r) for r in extra_roots]
    return f"{task}-{role}-s{seed}-{stable_hash(ident)}"


def legacy_key(cell: Cell, runtime: dict) -> str:
    """The key schema-1 run_all gave ``cell`` when its config also held ``runtime``
    (``workers``, ``device``): how results written before the recipe/runtime split are found."""
    return cell_key(cell.task, cell.dataset, cell.data_root, cell.protocol,
                    {**cell.recipe, **runtime}, cell.checkpoint.sha256, cell.seed)


def load_suite(name_or_path: str) -> Suite:
    """A built-in suite by name (:data:`BUILTIN`) or a user's TOML file."""
    if name_or_path in BUILTIN:
        text = ir.files("evaluations").joinpath(f"suites/{name_or_path}.toml").read_text()
        source = f"builtin:{name_or_path}"
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise UserError(f"unknown suite {name_or_path!r}: not one of {', '.join(BUILTIN)} and "
                            f"no file {path} exists. Pass --suite NAME (one of those) or FILE.toml.")
        text, source = path.read_text(), str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"suite {source} is not valid TOML ({e}).") from None
    return parse_suite(data, source)


def _runtime_of(table: Any, where: str) -> dict:
    if not isinstance(table, dict):
        raise UserError(f"{where} must be a table of settings.")
    Runtime.from_mapping(table, where)  # validate names and values now
    return dict(table)


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
        config = dict(c.get("config", {}))
        runtime = _runtime_of(c.get("runtime", {}), f"suite {source}: [cell.runtime] #{i + 1}")
        moved = sorted(RUNTIME_KEYS & set(config))
        if moved:  # suites written before the split: runtime settings are not the recipe
            log.warning("suite %s: %s in [cell.config] #%d are runtime settings; read as "
                        "[cell.runtime] (move them there)", source, ", ".join(moved), i + 1)
            runtime = {**{k: config.pop(k) for k in moved}, **runtime}
            _runtime_of(runtime, f"suite {source}: [cell.runtime] #{i + 1}")
        resolve_config(task, config)  # validate keys and values early
        cells.append(CellSpec(task.name, tuple(c["datasets"]), tuple(c.get("seeds", [0])),
                              config, runtime))
    name = str(data.get("name", Path(source).stem))
    check_sbatch_value("job name", f"dc-{name}")  # the suite's jobs are named after it
    known_res = set(Resources.__dataclass_fields__)
    res = dict(data.get("resources", {}))
    if set(res) - known_res:
        raise UserError(f"suite {source}: unknown [resources] keys {sorted(set(res) - known_res)};"
                        f" known: {', '.join(sorted(known_res))}.")
    return Suite(name=name, cells=tuple(cells),
                 datasets=dict(data.get("datasets", {})), embedded=dict(data.get("embedded", {})),
                 resources=res, runtime=_runtime_of(data.get("runtime", {}),
                                                    f"suite {source}: [runtime]"),
                 random_baseline=bool(data.get("random_baseline", False)), source=source)


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
                names: dict[str, str], resource_overrides: dict[str, Any],
                runtime_overrides: dict[str, Any], results: Path) -> list[Cell]:
    """Every (checkpoint x cell spec x dataset x seed) of the suite, keyed."""
    cells = []
    for ck in checkpoints:
        for spec in suite.cells:
            task = get_task(spec.task)
            cfg = resolve_config(task, spec.config)
            res = replace(task.resources, **{**suite.resources, **resource_overrides})
            runtime = Runtime(**{**suite.runtime, **spec.runtime, **runtime_overrides})
            if ck.arch not in task.archs:
                raise UserError(f"task {task.name} needs a network with fc6/fc7 "
                                f"({' or '.join(task.archs)}), but checkpoint {ck.path} holds a "
                                f"{ck.arch}. Leave the task out (--tasks) or evaluate an "
                                f"{' or '.join(task.archs)} checkpoint.")
            for role in spec.datasets:
                root = str(Path(roots[role]).resolve())
                extra = tuple((r, str(Path(roots[r]).resolve()))
                              for r in task.extra_roles(cfg, role))
                for seed in spec.seeds:
                    key = cell_key(task.name, role, root, task.protocol, asdict(cfg),
                                   ck.sha256, seed, extra)
                    cells.append(Cell(key=key, task=task.name, table=task.table, dataset=role,
                                      data_root=root, dataset_name=names[role],
                                      protocol=task.protocol, seed=seed, config=cfg,
                                      checkpoint=ck, resources=res, runtime=runtime,
                                      results=str(results),
                                      columns=tuple(task.columns(cfg, role)),
                                      extra_roots=extra))
    return cells


def needed_roles(suite: Suite) -> list[str]:
    """The dataset roles the suite's cells read: their own and others (SBD for train_aug,
    the other retrieval dataset for whitening)."""
    roles = set()
    for c in suite.cells:
        task = get_task(c.task)
        cfg = resolve_config(task, c.config)
        roles.update(c.datasets)
        for role in c.datasets:
            roles.update(task.extra_roles(cfg, role))
    return sorted(roles)
