"""Run one cell (in a SLURM array task, a local subprocess, or in-process) and write its records.

The cell's record file appears atomically at the very end; a crash leaves no record, only a
``.failed.json`` with the error (written here when the cell raises, or by run_all when the
job dies without a word).
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

from pretrain.errors import UserError

from . import records
from .records import RECORD_SCHEMA, stable_hash

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent


def _now() -> str:
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


def environment(device) -> dict:
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
            "platform": platform.platform(), "device": dev, "host": platform.node()}


def job_id() -> str | None:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID")


def make_records(cell: dict, measurements: list[dict], started: str, t0: float,
                 device, dataset_sizes: dict) -> list[dict]:
    ended, seconds = _now(), round(time.perf_counter() - t0, 3)
    code, env = code_version(), environment(device)
    out = []
    for m in measurements:
        out.append({
            "schema": RECORD_SCHEMA, "table": cell["table"], "column": m["column"],
            "task": cell["task"], "dataset": cell["dataset"], "dataset_name": cell["dataset_name"],
            "protocol": cell["protocol"], "metric": m["metric"], "value": m["value"],
            "selection": m["selection"], "variant": m.get("variant"), "seed": cell["seed"],
            "checkpoint": cell["checkpoint"], "config": cell["config"],
            "config_hash": stable_hash(cell["config"]), "cell_key": cell["key"], "code": code,
            "env": env, "job_id": job_id(), "started": started, "ended": ended,
            "seconds": seconds, "details": {**m.get("extra", {}), "data": dataset_sizes},
        })
    return out


def _execute(cell: dict) -> list[dict]:
    import torch

    from pretrain.train import resolve_device

    from .backbone import file_sha256, frozen_backbone
    from .heads import probe_test_transform, probe_train_transform
    from .tasks import READERS, get_task, resolve_config

    started, t0 = _now(), time.perf_counter()
    task = get_task(cell["task"])
    cfg = resolve_config(task, cell["config"])
    ck = cell["checkpoint"]
    if file_sha256(ck["path"]) != ck["sha256"]:
        raise UserError(f"checkpoint {ck['path']} changed since the job was submitted (sha256 "
                        "differs); rerun run_all so the cell is keyed by the new file.")
    device = resolve_device(cfg.device)
    torch.manual_seed(cell["seed"])
    backbone = frozen_backbone(ck["path"], device)
    reader = READERS[cell["dataset"]]
    train, val = reader(cell["data_root"], "train"), reader(cell["data_root"], "val")
    train_ds = train.dataset(probe_train_transform(cfg.resize_size, cfg.input_size))
    val_ds = val.dataset(probe_test_transform(cfg.resize_size, cfg.input_size))
    ms = task.run(cfg, backbone, train_ds, val_ds, train.num_classes, cell["dataset"],
                  cell["seed"], device)
    sizes = {"train": len(train), "val": len(val), "classes": train.num_classes,
             "train_layout": train.layout, "val_layout": val.layout}
    return make_records(cell, ms, started, t0, device, sizes)


def run_cell(cell: dict) -> dict:
    """Evaluate ``cell`` (a :meth:`Cell.to_dict`), write its record file; return a summary."""
    results, ck_id, key = Path(cell["results"]), cell["checkpoint"]["id"], cell["key"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("cell %s on %s", key, cell["checkpoint"]["path"])
    try:
        recs = _execute(cell)
    except BaseException as e:
        msg = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        records.write_failure(results, ck_id, key, {
            "task": cell["task"], "table": cell["table"], "columns": list(cell["columns"]),
            "checkpoint": cell["checkpoint"], "protocol": cell["protocol"],
            "dataset": cell["dataset"], "error": msg,
            "traceback": traceback.format_exc(), "log": cell.get("log"), "job_id": job_id(),
            "time": _now()})
        raise
    path = records.write_cell(results, ck_id, key, cell["task"], recs)
    return {"key": key, "path": str(path), "n_records": len(recs)}
