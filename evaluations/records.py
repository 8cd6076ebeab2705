"""Result records: one JSON object per number, grouped in one file per cell.

Torch-free on purpose: ``tables`` reads records through this module.

On disk (``<results>/<ckpt-id>/``):

* ``<cell-key>.json``         a finished cell: ``{"schema": CELL_SCHEMA, "cell_key", "task",
                              "records": [record, ...]}``. A cell is done iff this file exists.
* ``<cell-key>.failed.json``  the last failure of a cell: ``{"schema": FAILURE_SCHEMA,
                              "cell_key", "task", "table", "columns", "checkpoint", "protocol",
                              "error", "log", "job_id", "time"}``; removed when the cell succeeds.

A record (``schema == RECORD_SCHEMA``) has these keys:

=============  =============================================================================
table          paper table id: ``table1`` | ``supp_fc`` | ``voc`` | ``retrieval``
column         e.g. ``imagenet/conv3``, ``places/conv1``, ``imagenet/acc1``,
               ``classification/fc6-8``, ``detection/all``, ``oxford5k``
task           evaluation module name, e.g. ``linear``
dataset        the dataset's role (``imagenet``, ``places``); ``dataset_name`` the actual data
               (``ILSVRC2012``, ``embedded/fashion-mnist``)
protocol       ``dc2018`` (the paper's) | ``dc2018-reimpl`` | a user's name
metric         ``top1`` | ``mAP`` | ``mIoU`` ...; ``value`` in percent (0-100)
selection      ``best_epoch`` (the paper's rule: best epoch on the evaluation split) |
               ``last_epoch`` | ``final``
variant        test-time variant (``10crop`` | ``center``) or null
seed           int
checkpoint     {id, label, path, sha256, arch, sobel, fc_dim, epoch, k}
config         the resolved config (dict) and ``config_hash``
cell_key       the cell this record belongs to
code           {version, git_sha, dirty}; env {python, torch, torchvision, faiss, numpy,
               platform, device}; job_id; started / ended (ISO 8601 UTC); seconds
=============  =============================================================================
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

RECORD_SCHEMA = "dcbench.record/1"
CELL_SCHEMA = "dcbench.cell/1"
FAILURE_SCHEMA = "dcbench.failure/1"

RECORD_KEYS = (
    "schema", "table", "column", "task", "dataset", "dataset_name", "protocol", "metric",
    "value", "selection", "variant", "seed", "checkpoint", "config", "config_hash",
    "cell_key", "code", "env", "job_id", "started", "ended", "seconds",
)


def stable_hash(obj: Any, n: int = 12) -> str:
    """Short sha256 of the canonical JSON of ``obj`` (sorted keys, no whitespace)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def cell_path(results: Path, ckpt_id: str, cell_key: str) -> Path:
    return Path(results) / ckpt_id / f"{cell_key}.json"


def failure_path(results: Path, ckpt_id: str, cell_key: str) -> Path:
    return Path(results) / ckpt_id / f"{cell_key}.failed.json"


def write_cell(results: Path, ckpt_id: str, cell_key: str, task: str,
               records: Iterable[dict]) -> Path:
    """Write a finished cell atomically and clear any earlier failure file."""
    records = list(records)
    for r in records:
        missing = [k for k in RECORD_KEYS if k not in r]
        if missing:
            raise ValueError(f"record for {cell_key} lacks keys {missing}")
    path = cell_path(results, ckpt_id, cell_key)
    atomic_write_json(path, {"schema": CELL_SCHEMA, "cell_key": cell_key, "task": task,
                             "records": records})
    failure_path(results, ckpt_id, cell_key).unlink(missing_ok=True)
    return path


def write_failure(results: Path, ckpt_id: str, cell_key: str, info: dict) -> Path:
    path = failure_path(results, ckpt_id, cell_key)
    atomic_write_json(path, {"schema": FAILURE_SCHEMA, "cell_key": cell_key, **info})
    return path


def is_done(results: Path, ckpt_id: str, cell_key: str) -> bool:
    return cell_path(results, ckpt_id, cell_key).is_file()


class CorruptRecord(Exception):
    """A results file that is not a valid cell or failure file."""


def read_results_file(path: Path) -> dict:
    """Parse and validate one cell or failure file; raise :class:`CorruptRecord` if invalid."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptRecord(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict) or obj.get("schema") not in (CELL_SCHEMA, FAILURE_SCHEMA):
        raise CorruptRecord(f"{path}: not a dcbench cell/failure file (schema "
                            f"{obj.get('schema') if isinstance(obj, dict) else None!r})")
    if obj["schema"] == CELL_SCHEMA:
        recs = obj.get("records")
        if not isinstance(recs, list):
            raise CorruptRecord(f"{path}: 'records' is not a list")
        for i, r in enumerate(recs):
            if not isinstance(r, dict) or r.get("schema") != RECORD_SCHEMA:
                raise CorruptRecord(f"{path}: record {i} has no schema {RECORD_SCHEMA!r}")
            missing = [k for k in RECORD_KEYS if k not in r]
            if missing:
                raise CorruptRecord(f"{path}: record {i} lacks keys {missing}")
            if not isinstance(r["value"], (int, float)) or isinstance(r["value"], bool):
                raise CorruptRecord(f"{path}: record {i} value {r['value']!r} is not a number")
    return obj


def iter_results_files(results: Path) -> list[Path]:
    """Every cell/failure file under ``results`` (temp files excluded), sorted."""
    return sorted(p for p in Path(results).glob("*/*.json") if not p.name.startswith("."))
