"""Run one cell (in a SLURM array task, a local subprocess, or in-process) and write its records.

The cell's record file appears atomically at the very end; a crash leaves no record, only a
``.failed.json`` with the error and the job's log (written here when the cell raises, or by
run_all when the job dies without a word).
"""
from __future__ import annotations

import logging
import os
import platform
import subprocess
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from dcbench.core import UserError, resolve_device
from slurm.forked import JOB_ID_ENV, JOB_LOG_ENV

from . import claims, records
from .context import TaskContext
from .records import CellFile, Failure, Measurement, Record, stable_hash
from .suites import Cell

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def code_version() -> dict:
    """Package version and, when run from a git checkout, the commit and whether it is dirty."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("dcbench")
    except PackageNotFoundError:
        ver = None
    sha = dirty = None
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip() or None
        if sha:
            dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                         "--untracked-files=no"], capture_output=True, text=True,
                                        timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"version": ver, "git_sha": sha, "dirty": dirty}


def environment(device, runtime: dict) -> dict:
    import numpy
    import torch
    import torchvision

    try:
        import faiss

        faiss_ver = faiss.__version__
    except ImportError:
        faiss_ver = None
    dev = str(device)
    if getattr(device, "type", "") == "cuda":
        dev = f"cuda:{torch.cuda.get_device_name(device)}"
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "faiss": faiss_ver, "numpy": numpy.__version__,
            "platform": platform.platform(), "device": dev, "host": platform.node(),
            "runtime": runtime}


def job_id() -> str | None:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return (env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID")
            or env.get(JOB_ID_ENV))


def job_log() -> str | None:
    """This job's stderr log (SLURM or local executor), or None in-process."""
    if os.environ.get(JOB_LOG_ENV):  # a job forked by the local executor
        return os.environ[JOB_LOG_ENV]
    try:
        import submitit

        return str(submitit.JobEnvironment().paths.stderr)
    except RuntimeError:  # not inside a submitit job
        return None


def make_records(cell: Cell, measurements: list[Measurement], started: str, t0: float,
                 device) -> list[Record]:
    ended, seconds = now(), round(time.perf_counter() - t0, 3)
    code, env = code_version(), environment(device, cell.runtime.to_dict())
    recipe = cell.recipe
    return [Record(table=cell.table, column=m.column, task=cell.task, dataset=cell.dataset,
                   dataset_name=cell.dataset_name, protocol=cell.protocol, metric=m.metric,
                   value=m.value, selection=m.selection, variant=m.variant, seed=cell.seed,
                   checkpoint=cell.checkpoint.to_dict(), config=recipe,
                   config_hash=stable_hash(recipe), cell_key=cell.key, code=code, env=env,
                   job_id=job_id(), started=started, ended=ended, seconds=seconds,
                   details=m.details)
            for m in measurements]


def state_dir(cell: Cell) -> Path:
    """Where a cell's task keeps its own training state between a kill and a rerun."""
    return Path(cell.results) / cell.checkpoint.id / ".state" / cell.key


def _execute(cell: Cell) -> list[Record]:
    import torch

    from .tasks import get_task

    started, t0 = now(), time.perf_counter()
    task = get_task(cell.task)
    device = resolve_device(cell.runtime.device)
    torch.manual_seed(cell.seed)
    ctx = TaskContext(checkpoint=cell.checkpoint, dataset=cell.dataset,
                      data_root=Path(cell.data_root), seed=cell.seed, runtime=cell.runtime,
                      device=device, state_dir=state_dir(cell),
                      extra_roots={r: Path(p) for r, p in cell.extra_roots},
                      cache_dir=Path(cell.results) / cell.checkpoint.id / ".cache")
    return make_records(cell, task.run(cell.config, ctx), started, t0, device)


def failure_of(cell: Cell, error: str, log_path: str | None, trace: str = "") -> Failure:
    return Failure(cell_key=cell.key, task=cell.task, table=cell.table, columns=cell.columns,
                   checkpoint=cell.checkpoint.to_dict(), protocol=cell.protocol,
                   dataset=cell.dataset, error=error, log=log_path, job_id=job_id(),
                   time=now(), traceback=trace)


def run_cell(cell: Cell) -> dict:
    """Evaluate ``cell``, write its record file (or its failure file); return a summary.

    The job takes the cell's claim while it runs. A stop (SIGINT, SystemExit) is not a
    failure: it leaves neither a record nor a failure file, and the cell runs again later.
    """
    results, ck_id = Path(cell.results), cell.checkpoint.id
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("cell %s on %s", cell.key, cell.checkpoint.path)
    claim = claims.claim_path(results, ck_id, cell.key)
    claims.hand_over(claim, job_id() if os.environ.get("SLURM_JOB_ID") else None)
    try:
        recs = _execute(cell)
        path = records.write_cell(results, ck_id, CellFile(cell.key, cell.task, tuple(recs)))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        msg = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        records.write_failure(results, ck_id, failure_of(cell, msg, job_log(),
                                                         traceback.format_exc()))
        raise
    finally:
        claims.release(claim)  # after the record: no moment with neither
    return {"key": cell.key, "path": str(path), "n_records": len(recs)}
