"""Data-parallel pretraining: one process per GPU (or per CPU task), ranks of one job.

A submitit job of ``nodes x tasks_per_node`` tasks calls :func:`from_job_environment` in every
task: it exports ``MASTER_ADDR/PORT, RANK, WORLD_SIZE`` from submitit's job environment and
joins the process group (NCCL on GPUs, gloo on CPU). The training loop then

* extracts features on its shard of the images (contiguous blocks, in order) and gathers
  them on rank 0, which runs PCA + k-means once and broadcasts the assignments;
* splits every global batch of the epoch's draw sequence into ``world_size`` slices, one per
  rank: the same images with the same crops as one process sees, the gradient averaged over
  the global batch by DistributedDataParallel;
* writes checkpoints, logs and assignments on rank 0 only.

:class:`Dist` with ``world_size == 1`` and no process group is the in-process run; a job of
one task runs the same code through a one-rank group and gives bit-identical results on CPU.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as tdist

from dcbench.core import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")
TIMEOUT = datetime.timedelta(minutes=30)  # a collective that waits longer fails the job


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group (the in-process run)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        return self.backend is not None


def from_job_environment(use_cuda: bool) -> Dist:
    """Join the process group of this submitit job's tasks (env:// rendezvous)."""
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment()
    if env._job_env.num_nodes == 1:  # one node: the loopback, whatever its name resolves to
        env.master_addr = "127.0.0.1"
    # not CUDA_VISIBLE_DEVICES: CUDA may be initialised already (it is read once, at init)
    env.export(set_cuda_visible_devices=False, overwrite=True)
    backend = "nccl" if use_cuda and torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # "cuda" means this task's GPU from here on
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    elif env.local_world_size > 1:  # CPU processes of one node share its cores
        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or max(
            1, len(os.sched_getaffinity(0)) // env.local_world_size)
        torch.set_num_threads(cpus)
    tdist.init_process_group(backend, init_method="env://", rank=env.rank,
                             world_size=env.world_size, timeout=TIMEOUT)
    log.info("rank %d of %d (%s, master %s:%s)", env.rank, env.world_size, backend,
             env.master_addr, env.master_port)
    return Dist(env.rank, env.world_size, env.local_rank, backend)


def leave(dist: Dist) -> None:
    if dist.grouped and tdist.is_initialized():
        tdist.destroy_process_group()


def shard(n: int, dist: Dist) -> np.ndarray:
    """This rank's contiguous block of ``range(n)`` (blocks in rank order cover it once)."""
    return np.array_split(np.arange(n), dist.world_size)[dist.rank]


def rank_batches(draws: list[tuple[int, int]], batch_size: int, dist: Dist
                 ) -> list[list[tuple[int, int]]]:
    """This rank's slice of every global batch of ``draws`` ((draw, index) pairs).

    Global batch ``b`` is ``draws[b*B:(b+1)*B]``; rank ``r`` takes its ``r``-th slice of
    ``ceil(len/W)`` items. A last batch too small to give every rank an item is dropped
    (fewer than ``world_size`` draws of the epoch; never with one rank).
    """
    out = []
    for start in range(0, len(draws), batch_size):
        batch = draws[start:start + batch_size]
        if len(batch) < dist.world_size:
            break
        step = -(-len(batch) // dist.world_size)
        out.append(batch[dist.rank * step:(dist.rank + 1) * step])
    return out


def gather_rows(part: torch.Tensor, n: int, dist: Dist, device: torch.device
                ) -> np.ndarray | None:
    """Rank 0: the rows of every rank's block, in rank order (``n`` rows); others: None."""
    if not dist.grouped:
        return part.numpy()
    sizes = [len(s) for s in np.array_split(np.arange(n), dist.world_size)]
    width = part.shape[1]
    pad = torch.zeros(max(sizes), width, dtype=part.dtype)
    pad[:len(part)] = part
    pad = pad.to(_comm_device(dist, device))
    chunks = [torch.empty_like(pad) for _ in sizes] if dist.is_main else None
    tdist.gather(pad, chunks, dst=0)
    if not dist.is_main:
        return None
    return torch.cat([c[:s].cpu() for c, s in zip(chunks, sizes)]).numpy()


def on_main(dist: Dist, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and give its result to every rank; a UserError raised there is
    raised on every rank (so no rank waits for a collective that never comes)."""
    if not dist.grouped:
        return fn()
    box: list[Any] = [None]
    failure: BaseException | None = None
    if dist.is_main:
        try:
            box[0] = ("ok", fn())
        except UserError as e:
            box[0] = ("error", str(e))
        except BaseException as e:  # noqa: BLE001 - told to the others, then raised here
            box[0], failure = ("crash", f"{type(e).__name__}: {e}"), e
    tdist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if failure is not None:
        raise failure
    if status == "error":
        raise UserError(value)
    if status == "crash":
        raise RuntimeError(f"rank 0 failed ({value}); see its log")
    return value


def sum_all(values: list[float], dist: Dist, device: torch.device) -> list[float]:
    """Element-wise sum over ranks (float64), e.g. (loss x count, count) of one step."""
    if not dist.grouped:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(dist, device))
    tdist.all_reduce(t)
    return t.cpu().tolist()


def _comm_device(dist: Dist, device: torch.device) -> torch.device:
    return device if dist.backend == "nccl" else torch.device("cpu")
