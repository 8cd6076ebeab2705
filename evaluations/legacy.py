"""Results written before the recipe/runtime split (schema 1), found and migrated once.

Schema 1 keyed a cell by its whole config, runtime settings included (``workers``,
``device``), and stored that config in every record. A cell that has no file under its current
key may therefore have one under its schema-1 key: a ``<task>-<role>-s<seed>-*.json`` file of
schema 1 whose key, recomputed by the old rule from the current cell and the runtime values
stored in its own records, is its file name. Such a file is rewritten under the current key
(recipe-only ``config``, the runtime moved to ``env.runtime``, ``details.migrated_from`` = the
old key) and the old file removed: its numbers are kept, not recomputed.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from . import records
from .records import LEGACY_SCHEMAS, CellFile, CorruptRecord, stable_hash
from .suites import Cell, legacy_key

log = logging.getLogger(__name__)
LEGACY_RUNTIME_KEYS = ("workers", "device")  # runtime fields schema-1 configs held


def _legacy_file(cell: Cell) -> tuple[Path, CellFile] | None:
    folder = Path(cell.results) / cell.checkpoint.id
    for path in sorted(folder.glob(f"{cell.task}-{cell.dataset}-s{cell.seed}-*.json")):
        if path.name.endswith(".failed.json"):
            continue
        try:
            if json.loads(path.read_text()).get("schema") != LEGACY_SCHEMAS["cell"]:
                continue
            old = records.read_results_file(path)
        except (OSError, ValueError, AttributeError, CorruptRecord):
            continue
        if not isinstance(old, CellFile) or not old.records:
            continue
        runtime = {k: old.records[0].config[k] for k in LEGACY_RUNTIME_KEYS
                   if k in old.records[0].config}
        if legacy_key(cell, runtime) == path.stem == old.cell_key:
            return path, old
    return None


def migrate(cell: Cell) -> bool:
    """If ``cell`` was computed under its schema-1 key, move that file to the current key."""
    found = _legacy_file(cell)
    if found is None:
        return False
    path, old = found
    recipe = cell.recipe
    new = tuple(replace(
        r, config=recipe, config_hash=stable_hash(recipe), cell_key=cell.key,
        env={**r.env, "runtime": {k: r.config[k] for k in LEGACY_RUNTIME_KEYS if k in r.config}},
        details={**r.details, "migrated_from": old.cell_key}) for r in old.records)
    records.write_cell(Path(cell.results), cell.checkpoint.id, CellFile(cell.key, cell.task, new))
    path.unlink(missing_ok=True)
    log.info("migrated %s (schema 1) to %s", path.name, cell.key)
    return True
