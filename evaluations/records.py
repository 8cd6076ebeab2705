"""Result records: one typed :class:`Record` per number, grouped in one file per cell.

Torch-free on purpose: ``tables`` reads records through this module.

On disk (``<results>/<ckpt-id>/``):

* ``<cell-key>.json``         a finished cell (:class:`CellFile`): ``{"schema": CELL_SCHEMA,
                              "cell_key", "task", "records": [record, ...]}``. A cell is done
                              iff this file parses and validates.
* ``<cell-key>.failed.json``  the last failure of a cell (:class:`Failure`); removed when the
                              cell succeeds.
* ``<cell-key>.claim``        held while the cell is queued or runs (:mod:`evaluations.claims`).
* ``.checkpoint.json``        the checkpoint's :class:`CheckpointInfo` as last given to run_all:
                              its label is the one the tables show.
* ``<name>.corrupt``          a cell file that did not validate, moved aside (see ``is_done``).

Schema 1 files (written before the recipe/runtime split) hold the same record keys, but their
``config`` also holds runtime settings (``workers``, ``device``) and their cell key hashed them:
``evaluations.run_all`` migrates such a file to the current key the first time it meets its
cell (see :func:`evaluations.suites.legacy_key`); the tables read both schemas.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dcbench.core import atomic_write_json

log = logging.getLogger(__name__)
RECORD_SCHEMA = "dcbench.record/2"
CORRUPT_SUFFIX = ".corrupt"
CHECKPOINT_INFO = ".checkpoint.json"
CELL_SCHEMA = "dcbench.cell/2"
FAILURE_SCHEMA = "dcbench.failure/2"
LEGACY_SCHEMAS = {"record": "dcbench.record/1", "cell": "dcbench.cell/1",
                  "failure": "dcbench.failure/1"}


def stable_hash(obj: Any, n: int = 12) -> str:
    """Short sha256 of the canonical JSON of ``obj`` (sorted keys, no whitespace)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


RANDOM_DIR = "_random"  # <results>/_random/: the never-trained baselines run_all writes


def is_random_baseline(checkpoint_path: str) -> bool:
    """Whether a record's checkpoint is one of run_all's never-trained baselines."""
    return Path(checkpoint_path).parent.name == RANDOM_DIR


@dataclass(frozen=True)
class CheckpointInfo:
    """What a record says about the checkpoint it evaluated."""

    id: str  # <stem>-<sha256[:10]>: the results sub-folder
    label: str  # row label in the tables (presentation only)
    path: str
    sha256: str
    arch: str
    sobel: bool
    fc_dim: int
    epoch: int | None
    k: int | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Measurement:
    """One number a task computed; the worker turns it into a :class:`Record`."""

    column: str
    metric: str
    value: float
    selection: str
    variant: str | None = None
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Record:
    """One number and its provenance (a JSON object with these keys plus ``schema``).

    =============  =============================================================================
    table          paper table id: ``table1`` | ``supp_fc`` | ``voc`` | ``retrieval``
    column         e.g. ``imagenet/conv3``, ``places/conv1``, ``imagenet/acc1``,
                   ``classification/fc6-8``, ``detection/all``, ``oxford5k``, ``roxford5k/H``
    task           the evaluation's registry name, e.g. ``linear``
    dataset        the dataset's role (``imagenet``, ``places``); ``dataset_name``: the data
                   actually read (the root's name, or ``embedded/fashion-mnist``)
    protocol       ``dc2018`` (the paper's settings) | ``dc2018-reimpl`` (a documented
                   re-implementation where the paper's settings were never published)
    metric         ``top1`` | ``mAP`` | ``mIoU``; ``value`` in percent (0-100)
    selection      ``best_epoch`` (the paper's rule: best epoch on the evaluation split) |
                   ``last_epoch`` | ``final``
    variant        test-time variant (``10crop`` | ``center``) or None
    seed           the cell's seed
    checkpoint     :class:`CheckpointInfo` as a dict
    config         the task's recipe: every setting that can change the number (hashed into
                   the cell key, ``config_hash`` = its short hash)
    cell_key       the cell this record belongs to
    code           {version, git_sha, dirty}
    env            {python, torch, torchvision, faiss, numpy, platform, device, host,
                   runtime: the runtime settings (workers, device, caches), never hashed}
    job_id         ``<array id>_<index>`` under SLURM, the local job id, or None
    started/ended  ISO 8601 UTC; ``seconds`` the cell's wall time
    details        task-specific, documented by each task's ``run``: e.g. the selected epoch
                   and head, top-5, the probe's pooling, per-class APs; ``data`` the sizes of
                   the splits read
    =============  =============================================================================
    """

    table: str
    column: str
    task: str
    dataset: str
    dataset_name: str
    protocol: str
    metric: str
    value: float
    selection: str
    variant: str | None
    seed: int
    checkpoint: dict
    config: dict
    config_hash: str
    cell_key: str
    code: dict
    env: dict
    job_id: str | None
    started: str
    ended: str
    seconds: float
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"schema": RECORD_SCHEMA, **asdict(self)}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "Record":
        """Validate a record read from disk (schema 1 or 2); :class:`CorruptRecord` if not."""
        if not isinstance(obj, dict) or obj.get("schema") not in (RECORD_SCHEMA,
                                                                   LEGACY_SCHEMAS["record"]):
            raise CorruptRecord(f"{where}: not a record of schema {RECORD_SCHEMA!r}")
        missing = [f.name for f in fields(cls) if f.name not in obj and f.name != "details"]
        if missing:
            raise CorruptRecord(f"{where}: lacks keys {missing}")
        value = obj["value"]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise CorruptRecord(f"{where}: value {value!r} is not a number")
        for name in ("checkpoint", "config", "code", "env"):
            if not isinstance(obj[name], dict):
                raise CorruptRecord(f"{where}: {name!r} is not an object")
        return cls(**{f.name: obj.get(f.name, {}) if f.name == "details" else obj[f.name]
                      for f in fields(cls)})


@dataclass(frozen=True)
class CellFile:
    """A finished cell as stored: its key, task and records."""

    cell_key: str
    task: str
    records: tuple[Record, ...]
    schema: str = CELL_SCHEMA

    def to_json(self) -> dict:
        return {"schema": self.schema, "cell_key": self.cell_key, "task": self.task,
                "records": [r.to_json() for r in self.records]}


@dataclass(frozen=True)
class Failure:
    """Why a cell failed, for the summary and the tables (``failed`` cells)."""

    cell_key: str
    task: str
    table: str
    columns: tuple[str, ...]
    checkpoint: dict
    protocol: str
    dataset: str
    error: str  # one line: what went wrong
    log: str | None  # the job's log file, where there is one
    job_id: str | None
    time: str | None
    traceback: str = ""

    def to_json(self) -> dict:
        return {"schema": FAILURE_SCHEMA, **asdict(self)}

    @classmethod
    def from_json(cls, obj: dict, where: str) -> "Failure":
        if not isinstance(obj.get("columns"), list) or not isinstance(obj.get("table"), str):
            raise CorruptRecord(f"{where}: a failure file needs 'table' and a 'columns' list")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in obj.items() if k in known}
        kw.setdefault("traceback", "")
        try:
            return cls(**{**kw, "columns": tuple(str(c) for c in obj["columns"])})
        except TypeError as e:
            raise CorruptRecord(f"{where}: {e}") from None


def cell_path(results: Path, ckpt_id: str, cell_key: str) -> Path:
    return Path(results) / ckpt_id / f"{cell_key}.json"


def failure_path(results: Path, ckpt_id: str, cell_key: str) -> Path:
    return Path(results) / ckpt_id / f"{cell_key}.failed.json"


def write_cell(results: Path, ckpt_id: str, cell: CellFile) -> Path:
    """Write a finished cell atomically and clear any earlier failure file."""
    path = atomic_write_json(cell_path(results, ckpt_id, cell.cell_key), cell.to_json())
    failure_path(results, ckpt_id, cell.cell_key).unlink(missing_ok=True)
    return path


def write_failure(results: Path, ckpt_id: str, failure: Failure) -> Path:
    return atomic_write_json(failure_path(results, ckpt_id, failure.cell_key), failure.to_json())


def is_done(results: Path, ckpt_id: str, cell_key: str, repair: bool = True) -> bool:
    """True iff the cell's file parses and validates as this cell's records. Anything else
    under its name (cut short by a full disk, edited, foreign) is moved aside to
    ``<name>.corrupt`` with a warning (unless ``repair`` is False), so the cell is computed
    again."""
    path = cell_path(results, ckpt_id, cell_key)
    if not path.is_file():
        return False
    try:
        cell = read_results_file(path)
        if isinstance(cell, CellFile) and cell.cell_key == cell_key and cell.records:
            return True
        reason = "it is not a finished cell of this key"
    except CorruptRecord as e:
        reason = str(e)
    if not repair:
        log.warning("%s is not a valid cell file (%s): the cell would be computed again",
                    path.name, reason)
        return False
    aside = path.with_name(path.name + CORRUPT_SUFFIX)
    path.replace(aside)
    log.warning("moved %s aside to %s and will compute the cell again: %s", path.name,
                aside.name, reason)
    return False


def write_checkpoint_info(results: Path, info: CheckpointInfo) -> Path:
    """``<results>/<ckpt-id>/.checkpoint.json``: the checkpoint as last given to run_all. Its
    ``label`` is what the tables show (labels are presentation: relabelling recomputes
    nothing)."""
    return atomic_write_json(Path(results) / info.id / CHECKPOINT_INFO, info.to_dict())


def read_labels(results: Path) -> dict[str, str]:
    """ckpt-id -> current label, from each folder's ``.checkpoint.json``."""
    out = {}
    for p in Path(results).glob(f"*/{CHECKPOINT_INFO}"):
        try:
            out[p.parent.name] = str(json.loads(p.read_text())["label"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignored %s: not a checkpoint info file", p)
    return out


class CorruptRecord(Exception):
    """A results file that is not a valid cell or failure file."""


def read_results_file(path: Path) -> CellFile | Failure:
    """Parse and validate one cell or failure file; raise :class:`CorruptRecord` if invalid."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptRecord(f"{path}: not valid JSON ({e})") from None
    schema = obj.get("schema") if isinstance(obj, dict) else None
    if schema in (FAILURE_SCHEMA, LEGACY_SCHEMAS["failure"]):
        return Failure.from_json(obj, str(path))
    if schema not in (CELL_SCHEMA, LEGACY_SCHEMAS["cell"]):
        raise CorruptRecord(f"{path}: not a dcbench cell/failure file (schema {schema!r})")
    recs = obj.get("records")
    if not isinstance(recs, list):
        raise CorruptRecord(f"{path}: 'records' is not a list")
    records = tuple(Record.from_json(r, f"{path}: record {i}") for i, r in enumerate(recs))
    return CellFile(str(obj.get("cell_key")), str(obj.get("task")), records, schema)


def iter_results_files(results: Path) -> list[Path]:
    """Every cell/failure file under ``results`` (temp files excluded), sorted."""
    return sorted(p for p in Path(results).glob("*/*.json") if not p.name.startswith("."))
