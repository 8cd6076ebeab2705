"""Pretraining as a cluster job: ``python -m pretrain ... --executor slurm|local``.

The run is submitted through submitit as a :class:`slurm.launch.CheckpointableJob`: on SLURM's
time-limit or preemption signal the job requeues itself, and the requeued job continues the
run from its last finished epoch (the same ``--resume`` path a user takes after a crash:
bit-identical on CPU). Mid-epoch state is not saved: a requeue repeats the epoch it cut.

Resources come from the paper's needs (one GPU), a cluster file and the command line, in
that order of precedence (last wins). The cluster file is a small TOML file of one table::

    [slurm]                 # every key optional
    partition = "gpu"
    constraint = "a100"
    timeout_min = 4320
    cpus_per_task = 10
    mem_gb = 64
    gpus_per_node = 1
    nodes = 1
    tasks_per_node = 1      # default: one process per GPU (gpus_per_node), else 1

Data parallelism: the job runs ``nodes x tasks_per_node`` processes (one per GPU; on CPU,
gloo processes), joined by :mod:`pretrain.distributed`. One process is the same code with a
one-rank group (bit-identical to the in-process run on CPU). The global batch stays
``--batch-size`` (split over the processes), so the learning rate does not change.
"""
from __future__ import annotations

import logging
import tomllib
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from dcbench.core import UserError
from slurm.launch import CheckpointableJob, Resources, make_executor, submit_array, wait

from .config import PretrainConfig

log = logging.getLogger(__name__)
PAPER_RESOURCES = Resources(gpus_per_node=1, cpus_per_task=10, mem_gb=64,
                            timeout_min=72 * 60, array_parallelism=1)
CLUSTER_KEYS = ("partition", "constraint", "timeout_min", "cpus_per_task", "mem_gb",
                "gpus_per_node", "nodes", "tasks_per_node")


def read_cluster_file(path: str | Path) -> dict[str, Any]:
    """The ``[slurm]`` table of a cluster file (unknown keys are an error naming them)."""
    path = Path(path).expanduser()
    example = '[slurm]\npartition = "gpu"\ntimeout_min = 4320'
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--cluster-config {path} does not exist. Write a TOML file like:\n"
                        f"{example}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"cannot read --cluster-config {path} ({e}). Expected TOML like:\n"
                        f"{example}") from None
    table = data.get("slurm")
    if not isinstance(table, dict) or set(data) - {"slurm"}:
        raise UserError(f"--cluster-config {path} must hold one [slurm] table, like:\n{example}")
    unknown = sorted(set(table) - set(CLUSTER_KEYS))
    if unknown:
        raise UserError(f"--cluster-config {path}: unknown key(s) {unknown}; known: "
                        f"{', '.join(CLUSTER_KEYS)}.")
    return table


def resources(cluster_file: str | None, overrides: dict[str, Any]) -> Resources:
    """The job's resources: the paper's, then the cluster file's, then the command line's."""
    values = read_cluster_file(cluster_file) if cluster_file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "tasks_per_node" not in values and values.get("gpus_per_node", 1) > 1:
        values["tasks_per_node"] = values["gpus_per_node"]  # one process per GPU
    known = {f.name for f in fields(Resources)}
    return replace(PAPER_RESOURCES, **{k: v for k, v in values.items() if k in known})


def pretrain_job(cfg: PretrainConfig, out: str) -> str:
    """The job: train, continuing the run in ``out`` when it has a checkpoint (a requeue)."""
    from . import distributed
    from .train import run

    # decided before joining the group: rank 0 cannot write a checkpoint before all joined
    resume = (Path(out) / "checkpoint.pth").exists()
    dist = distributed.from_job_environment(use_cuda=cfg.device != "cpu")
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s rank{dist.rank} %(name)s: "
                        "%(message)s")
    if resume and dist.is_main:
        log.info("continuing the run in %s from its last checkpoint", out)
    try:
        return str(run(cfg, out, resume=resume, dist=dist))
    finally:
        distributed.leave(dist)


def check_processes(cfg: PretrainConfig, kind: str, res: Resources) -> None:
    """Refuse, before submitting, a layout of processes the run cannot use."""
    world = res.nodes * res.tasks_per_node
    if kind == "local" and res.nodes > 1:
        raise UserError(f"--nodes {res.nodes} needs --executor slurm (the local executor runs "
                        "on this machine only); use --tasks-per-node for several processes.")
    if res.gpus_per_node and res.tasks_per_node > res.gpus_per_node:
        raise UserError(f"--tasks-per-node {res.tasks_per_node} exceeds --gpus-per-node "
                        f"{res.gpus_per_node}: one process per GPU.")
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} does not split over {world} processes "
                        f"(--nodes {res.nodes} x --tasks-per-node {res.tasks_per_node}); use a "
                        "multiple of the number of processes (it is the global batch).")
    if cfg.sync_bn and not res.gpus_per_node and world > 1:
        raise UserError("--sync-bn needs GPUs (torch's SyncBatchNorm runs on CUDA only); drop "
                        "it, or ask for --gpus-per-node.")


def submit(cfg: PretrainConfig, out: Path, kind: str, res: Resources, resume: bool) -> str:
    """Submit the run, wait for it, return the checkpoint path (the job's logs on failure).

    Before anything is submitted: the settings are validated, and ``out`` must not hold a run
    unless ``resume`` (the same rule as in-process).
    """
    cfg = cfg.validate()
    out = Path(out).expanduser().resolve()
    if not resume and (out / "checkpoint.pth").exists():
        raise UserError(f"{out} already holds a run (checkpoint.pth). Pass --resume to "
                        "continue it, or choose another --out.")
    if resume and not (out / "checkpoint.pth").exists():
        raise UserError(f"--resume: no checkpoint at {out / 'checkpoint.pth'}. Start without "
                        "--resume, or point --out at the run folder.")
    check_processes(cfg, kind, res)
    executor = make_executor(kind, out / "_logs", res, f"dc-pretrain-{out.name}"[:60])
    (job,) = submit_array(executor, CheckpointableJob(pretrain_job), [(cfg, str(out))])
    print(f"submitted pretraining as job {job.job_id} ({kind}: {res.nodes} node(s) x "
          f"{res.tasks_per_node} process(es), {res.gpus_per_node} GPU and "
          f"{res.cpus_per_task} CPUs per process, {res.mem_gb:g} GB, {res.timeout_min} min per "
          f"run, requeued at the limit); logs in {out / '_logs'}", flush=True)
    try:
        (outcome,) = wait([job])
    except KeyboardInterrupt:
        if kind == "slurm":
            print(f"stopped waiting; job {job.job_id} goes on under SLURM (scancel "
                  f"{job.job_id} to stop it)", flush=True)
        else:
            job.cancel()
        raise
    if not outcome.ok:
        raise UserError(f"pretraining job {job.job_id} failed: "
                        f"{str(outcome.error).strip().splitlines()[-1]} (log: "
                        f"{outcome.stderr}). Fix the cause and rerun with --resume.")
    return outcome.result
