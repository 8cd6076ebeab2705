"""Records -> tidy DataFrame -> one pivot per paper table -> rows to render.

* :func:`load_results` reads every cell/failure file under a results folder into two tidy
  DataFrames (one row per record, one row per failed column). Corrupt files are reported
  with a warning naming the file and skipped, never averaged.
* :func:`collate_table` filters the records of one table (selection rule, test variant),
  groups them by (checkpoint label, protocol, selection, variant) and pivots the columns:
  mean, std and n over seeds; a column without a record shows ``failed`` (failure file) or
  ``missing``.
* :func:`build_view` joins the paper's published rows, our rows and the Δ rows into the
  display strings that :mod:`tables.render` writes out. Δ is against the paper's DeepCluster
  for rows computed on the real datasets, and against the Random row of the same architecture
  for rows computed on the embedded data (the paper's own comparison; Δ against published
  numbers of other datasets would mean nothing).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from evaluations.records import (
    CellFile,
    CorruptRecord,
    Failure,
    is_random_baseline,
    iter_results_files,
    read_labels,
    read_results_file,
)
from dcbench.core import UserError
from tables import paper
from tables.specs import SPECS, TableSpec

log = logging.getLogger(__name__)

RUN_ALL_HINT = "run `python -m evaluations.run_all --ckpt ...` first, or pass --results DIR"
RECORD_COLUMNS = ("table", "column", "protocol", "selection", "variant", "seed", "metric",
                  "value", "dataset_name", "ckpt_label", "ckpt_id", "ckpt_k", "ckpt_arch",
                  "ckpt_random", "file")
FAILURE_COLUMNS = ("table", "column", "protocol", "ckpt_label", "ckpt_id", "error", "file")
GROUP_KEYS = ["ckpt_label", "protocol", "selection", "variant"]

SELECTION_TEXT = {
    "best_epoch": "best_epoch (best epoch on the evaluation split, the paper's rule)",
    "last_epoch": "last_epoch (last training epoch)",
    "final": "final (end of training)",
}
EMBEDDED_PREFIX = "embedded/"
DEFAULT = "default"  # selection / variant: the table spec's default


@dataclass
class Results:
    """Everything read from one results folder."""

    root: Path
    records: pd.DataFrame
    failures: pd.DataFrame
    corrupt: list[str] = field(default_factory=list)


def _ckpt_fields(ckpt: object, path: Path) -> tuple[str, str, int | None]:
    """(label, id, k) of a record's checkpoint; the folder name stands in for a lost id."""
    c = ckpt if isinstance(ckpt, dict) else {}
    cid = str(c.get("id") or path.parent.name)
    label = str(c.get("label") or cid)
    k = c.get("k")
    return label, cid, int(k) if isinstance(k, (int, float)) and not isinstance(k, bool) else None


def _ckpt_kind(ckpt: object) -> tuple[str, bool]:
    """(architecture, whether it is run_all's never-trained baseline) of a record's checkpoint."""
    c = ckpt if isinstance(ckpt, dict) else {}
    return str(c.get("arch") or ""), is_random_baseline(str(c.get("path") or ""))


def _record_rows(cell: CellFile, path: Path, labels: dict[str, str]) -> list[dict]:
    rows = []
    for i, r in enumerate(cell.records):
        value = float(r.value)
        if not math.isfinite(value):
            log.warning("skipped record %d of %s: value %r is not finite", i, path, r.value)
            continue
        label, cid, k = _ckpt_fields(r.checkpoint, path)
        label = labels.get(cid, label)
        arch, random_init = _ckpt_kind(r.checkpoint)
        rows.append({
            "table": str(r.table), "column": str(r.column),
            "protocol": str(r.protocol), "selection": str(r.selection or ""),
            "variant": str(r.variant or ""), "seed": r.seed, "metric": str(r.metric),
            "value": value, "dataset_name": str(r.dataset_name or ""),
            "ckpt_label": label, "ckpt_id": cid, "ckpt_k": k, "ckpt_arch": arch,
            "ckpt_random": random_init, "file": str(path),
        })
    return rows


def _failure_rows(f: Failure, path: Path, labels: dict[str, str]) -> list[dict]:
    if f.table not in SPECS:
        log.warning("skipped failure file %s: table %r is not a paper table (%s)", path, f.table,
                    ", ".join(SPECS))
        return []
    label, cid, _ = _ckpt_fields(f.checkpoint, path)
    label = labels.get(cid, label)
    error = f.error.strip().splitlines()
    return [{"table": f.table, "column": col, "protocol": f.protocol, "ckpt_label": label,
             "ckpt_id": cid, "error": error[-1] if error else "", "file": str(path)}
            for col in f.columns]


def load_results(root: Path | str) -> Results:
    """Read every cell and failure file under ``root`` (``<root>/<ckpt-id>/*.json``). A
    checkpoint's rows carry its current label (``.checkpoint.json``, written by run_all) when
    there is one, else the label stored in its records.

    Raises :class:`UserError` when the folder is missing, holds no result files, or holds
    only corrupt ones.
    """
    root = Path(root)
    if not root.exists():
        raise UserError(f"results folder {root} does not exist: {RUN_ALL_HINT}")
    if not root.is_dir():
        raise UserError(f"results folder {root} is not a folder: pass --results the folder "
                        "that evaluations.run_all wrote")
    files = iter_results_files(root)
    if not files and any(root.glob("*.json")):
        raise UserError(f"results folder {root} looks like one checkpoint's folder: pass "
                        f"--results its parent ({root.parent}), which holds <ckpt-id>/ folders")
    if not files:
        raise UserError(f"results folder {root} holds no result files "
                        f"(<ckpt-id>/<cell-key>.json): {RUN_ALL_HINT}")
    records: list[dict] = []
    failures: list[dict] = []
    corrupt: list[str] = []
    labels = read_labels(root)  # the current label of each checkpoint (run_all writes it)
    for path in files:
        try:
            obj = read_results_file(path)
        except CorruptRecord as e:
            log.warning("skipped corrupt results file %s", e)
            corrupt.append(str(path))
            continue
        if isinstance(obj, CellFile):
            records.extend(_record_rows(obj, path, labels))
        else:
            failures.extend(_failure_rows(obj, path, labels))
    if not records and not failures:
        raise UserError(f"results folder {root} holds no readable records ({len(corrupt)} "
                        f"corrupt file(s) skipped, see the warnings above): {RUN_ALL_HINT}")
    rec = pd.DataFrame.from_records(records, columns=list(RECORD_COLUMNS))
    rec["value"] = rec["value"].astype(float)
    fail = pd.DataFrame.from_records(failures, columns=list(FAILURE_COLUMNS))
    _warn_unknown_tables(rec, fail)
    log.info("read %d records and %d failed columns from %d files in %s (%d corrupt)",
             len(rec), len(fail), len(files), root, len(corrupt))
    return Results(root, rec, fail, corrupt)


def _warn_unknown_tables(rec: pd.DataFrame, fail: pd.DataFrame) -> None:
    for name, df in (("records", rec), ("failures", fail)):
        unknown = df[~df["table"].isin(list(SPECS))]
        for table, files in unknown.groupby("table")["file"]:
            log.warning("%d %s name table %r, which is not a paper table (%s); not shown: "
                        "e.g. %s", len(files), name, table, ", ".join(SPECS), files.iloc[0])


# --------------------------------------------------------------------------- collation


@dataclass(frozen=True)
class CellStat:
    """One of our cells: mean, sample std and count over seeds, or its state."""

    mean: float | None
    std: float | None
    n: int
    state: str  # "ok" | "missing" | "failed"

    @property
    def text(self) -> str:
        if self.state != "ok" or self.mean is None:
            return self.state
        if self.n == 1:
            return f"{self.mean:.1f}"
        return f"{self.mean:.1f} ± {self.std:.1f} ({self.n})"


@dataclass(frozen=True)
class OurRow:
    """One evaluated (checkpoint label, protocol, selection, variant) and its cells."""

    ckpt_label: str
    protocol: str
    selection: str
    variant: str
    cells: dict[str, CellStat]
    arch: str = ""
    random_init: bool = False  # run_all's never-trained baseline
    embedded: bool = False  # every record of the row is on the embedded demo data

    @property
    def label(self) -> str:
        parts = [self.ckpt_label, self.protocol, self.selection, self.variant]
        return " · ".join(p for p in parts if p)


@dataclass
class Collated:
    """One paper table's records after filtering, grouping and pivoting."""

    spec: TableSpec
    rows: list[OurRow]
    mean: pd.DataFrame  # index: GROUP_KEYS, columns: the spec's column keys
    selection: str | None
    variant: str | None
    selections_seen: list[str]
    variants_seen: list[str]
    unknown_protocols: list[str]
    embedded_datasets: list[str]


def filter_records(spec: TableSpec, records: pd.DataFrame, selection: str | None,
                   variant: str | None, *, quiet: bool = False) -> pd.DataFrame:
    """The records of ``spec``'s table that fit its columns, metric, selection and variant.

    Records of an unknown column or of another metric are dropped with a warning; records
    of another selection rule or variant are dropped with an info line (debug if ``quiet``).
    """
    warn = log.debug if quiet else log.warning
    info = log.debug if quiet else log.info
    df = records[records["table"] == spec.id]
    bad_col = ~df["column"].isin(list(spec.column_keys))
    if bad_col.any():
        cols = sorted(df.loc[bad_col, "column"].unique())
        warn("%s: %d records with unknown column(s) %s not shown (columns are %s); e.g. %s",
             spec.id, int(bad_col.sum()), cols, ", ".join(spec.column_keys),
             df.loc[bad_col, "file"].iloc[0])
        df = df[~bad_col]
    ok_metric = [spec.column(c).metric == m for c, m in zip(df["column"], df["metric"])]
    bad_metric = ~pd.Series(ok_metric, index=df.index, dtype=bool)
    if bad_metric.any():
        warn("%s: %d records with metric(s) %s not shown (this table reports %s); e.g. %s",
             spec.id, int(bad_metric.sum()), sorted(df.loc[bad_metric, "metric"].unique()),
             sorted({c.metric for c in spec.columns}), df.loc[bad_metric, "file"].iloc[0])
        df = df[~bad_metric]
    for key, want in (("selection", selection), ("variant", variant)):
        if want is None:
            continue
        other = df[key] != want
        if other.any():
            info("%s: %d records with %s %s not shown (use --%s any to show them)",
                 spec.id, int(other.sum()), key, sorted(df.loc[other, key].unique()), key)
            df = df[~other]
    return df


def merge_column_protocols(spec: TableSpec, df: pd.DataFrame) -> pd.DataFrame:
    """In a table whose columns come from different protocols (and test variants), a record
    made with its column's own protocol and variant gets protocol/variant "" so that one
    checkpoint's columns share one row; any other record keeps its own row, labelled."""
    if not spec.mixed_protocols or df.empty:
        return df
    df = df.copy()
    cols = [spec.column(c) for c in df["column"]]
    own = pd.Series([p == c.protocol for p, c in zip(df["protocol"], cols)], index=df.index)
    df.loc[own, "protocol"] = ""
    if "variant" in df:
        same = pd.Series([c.variant is None or v == c.variant
                          for v, c in zip(df["variant"], cols)], index=df.index)
        df.loc[own & same, "variant"] = ""
    return df


def _warn_mixed_k(spec: TableSpec, df: pd.DataFrame) -> None:
    """Checkpoints of different k under one label would be averaged as if they were seeds."""
    ks = df.dropna(subset=["ckpt_k"]).groupby(GROUP_KEYS)["ckpt_k"].unique()
    for key, values in ks.items():
        if len(values) > 1:
            log.warning("%s: row %r averages checkpoints with different k %s as if they were "
                        "seeds: give each checkpoint its own label", spec.id,
                        " · ".join(p for p in key if p), sorted(int(v) for v in values))


def _row_keys(keys: list[tuple], fail: pd.DataFrame, selection: str | None,
              variant: str | None) -> list[tuple]:
    """Our row keys: those with records, plus (label, protocol) pairs that only failed."""
    have = {(k[0], k[1]) for k in keys}
    extra = [(lbl, proto, selection or "", variant or "")
             for lbl, proto in set(zip(fail["ckpt_label"], fail["protocol"]))
             if (lbl, proto) not in have]
    return sorted([*keys, *extra])


def _cells(spec: TableSpec, key: tuple, lookup: dict, failed: set[tuple]) -> dict[str, CellStat]:
    """One row's cells: statistics where records exist, else ``failed`` or ``missing``."""
    cells = {}
    for col in spec.column_keys:
        s = lookup.get((*key, col))
        if s is not None:
            std = float(s["std"]) if s["count"] > 1 else None
            cells[col] = CellStat(float(s["mean"]), std, int(s["count"]), "ok")
        elif (key[0], key[1], col) in failed:
            cells[col] = CellStat(None, None, 0, "failed")
        else:
            cells[col] = CellStat(None, None, 0, "missing")
    return cells


def _row_kinds(df: pd.DataFrame) -> dict[tuple, dict]:
    """Per row key: its architecture, whether it is a Random baseline, whether its records
    are all on the embedded data."""
    out = {}
    for key, g in df.groupby(GROUP_KEYS, sort=False):
        out[tuple(key)] = {
            "arch": str(g["ckpt_arch"].iloc[0]), "random_init": bool(g["ckpt_random"].all()),
            "embedded": bool(g["dataset_name"].str.startswith(EMBEDDED_PREFIX).all())}
    return out


def collate_table(spec: TableSpec, results: Results, selection: str | None = DEFAULT,
                  variant: str | None = DEFAULT) -> Collated:
    """Pivot one table: one row per (checkpoint label, protocol, selection, variant).

    ``selection`` / ``variant``: a value to keep, ``None`` for any, or ``DEFAULT`` for the
    spec's default (``best_epoch`` / ``10crop`` for table1).
    """
    selection = spec.selection if selection == DEFAULT else selection
    variant = spec.variant if variant == DEFAULT else variant
    df = filter_records(spec, results.records, selection, variant)
    fail = results.failures[results.failures["table"] == spec.id]
    fail = fail[fail["column"].isin(list(spec.column_keys))]

    known = set(spec.protocols)
    unknown = sorted((set(df["protocol"]) | set(fail["protocol"])) - known)
    df, fail = merge_column_protocols(spec, df), merge_column_protocols(spec, fail)
    if unknown:
        log.warning("%s: records of unknown protocol(s) %s are shown but are not the paper's "
                    "protocols (%s)", spec.id, unknown, ", ".join(spec.protocols))

    _warn_mixed_k(spec, df)
    stats = (df.groupby(GROUP_KEYS + ["column"], sort=True)["value"]
             .agg(["mean", "std", "count"]))
    mean = stats["mean"].unstack("column") if len(stats) else pd.DataFrame(
        index=pd.MultiIndex.from_tuples([], names=GROUP_KEYS))
    mean = mean.reindex(columns=list(spec.column_keys))

    lookup = stats.to_dict("index")
    failed = set(zip(fail["ckpt_label"], fail["protocol"], fail["column"]))
    kinds = _row_kinds(df)
    rows = [OurRow(*key, cells=_cells(spec, key, lookup, failed),
                   **kinds.get(key, {}))
            for key in _row_keys(list(mean.index), fail, selection, variant)]

    embedded = sorted({d for d in df["dataset_name"] if d.startswith(EMBEDDED_PREFIX)})
    return Collated(spec, rows, mean, selection, variant,
                    sorted(set(df["selection"])), sorted(set(df["variant"])),
                    unknown, embedded)


# --------------------------------------------------------------------------- view


@dataclass(frozen=True)
class ViewRow:
    """One rendered row: ``kind`` is ``paper``, ``ours`` or ``delta``."""

    kind: str
    label: str
    attrs: tuple[str, ...]
    texts: tuple[str, ...]
    values: tuple[float | None, ...]
    supervised: bool = False


@dataclass(frozen=True)
class TableView:
    """A table ready to render: title, caption line, rows and notes."""

    spec: TableSpec
    title: str
    caption: str
    rows: tuple[ViewRow, ...]
    notes: tuple[str, ...]

    @property
    def headers(self) -> list[str]:
        return ["Method", *self.spec.row_attrs, *(c.label for c in self.spec.columns)]

    def best(self) -> list[set[int]]:
        """Per column, the row indices holding the best unsupervised value (ties kept)."""
        out = []
        for j in range(len(self.spec.columns)):
            vals = {i: round(r.values[j], 1) for i, r in enumerate(self.rows)
                    if r.kind in ("paper", "ours") and not r.supervised
                    and r.values[j] is not None}
            top = max(vals.values(), default=None)
            out.append({i for i, v in vals.items() if v == top})
        return out


def _paper_text(c: paper.PaperCell | None) -> str:
    if c is None:
        return ""
    if c.value is None:
        return "—"
    return f"{c.value:.1f}" + (f" {c.marker}" if c.marker else "")


def paper_rows(spec: TableSpec) -> list[ViewRow]:
    """The paper's published rows of ``spec``, in the paper's order."""
    by_row: dict[tuple, dict[str, paper.PaperCell]] = {}
    for c in paper.cells_for(spec.id):
        by_row.setdefault(c.row_key, {})[c.column] = c
    rows = []
    for (name, attrs), cells in by_row.items():
        got = [cells.get(k) for k in spec.column_keys]
        amap = dict(attrs)
        rows.append(ViewRow("paper", name, tuple(amap.get(a, "") for a in spec.row_attrs),
                            tuple(_paper_text(c) for c in got),
                            tuple(c.value if c else None for c in got),
                            supervised=name in paper.SUPERVISED_ROWS))
    return rows


def _delta_text(ours: float | None, ref: float | None) -> str:
    """Signed difference of the displayed (one-decimal) value and the published one."""
    if ours is None or ref is None:
        return ""
    d = round(float(f"{ours:.1f}") - ref, 1) + 0.0  # + 0.0: no "-0.0"
    return f"{d:+.1f}"


def _selection_text(col: Collated) -> str:
    if col.selection is not None:
        sel = SELECTION_TEXT.get(col.selection, col.selection)
    else:
        seen = [s for s in col.selections_seen if s]
        sel = "as recorded" + (f" ({', '.join(seen)})" if seen else "")
    if col.variant is not None:
        var = col.variant
    else:
        seen = [v for v in col.variants_seen if v]
        var = "as recorded" + (f" ({', '.join(seen)})" if seen else "")
    return f"Selection: {sel}; test variant: {var}."


def _reference(spec: TableSpec) -> tuple[str, dict[str, float | None]]:
    """The Δ rows' paper row: its display name and its published value per column."""
    name, attrs = spec.reference
    values = {c.column: c.value for c in paper.cells_for(spec.id) if c.row_key == (name, attrs)}
    return name + "".join(f", {v}" for _, v in attrs), values


def _caption(col: Collated, ref_label: str) -> str:
    """Protocol, selection rule, cell format; warnings that change how to read the rows."""
    spec = col.spec
    deltas = []
    if any(not r.embedded for r in col.rows) or not col.rows:
        deltas.append(f"Δ vs paper = ours − paper {ref_label}")
    if any(r.embedded for r in col.rows):
        deltas.append("on the embedded data, Δ vs Random = ours − the never-trained network of "
                      "the same architecture in the same suite (the paper's comparison)")
    parts = [f"Protocol: {spec.protocol_note}.", _selection_text(col),
             f"Our cells: mean ± std (n) over seeds; {'; '.join(deltas)}."]
    if col.embedded_datasets:
        parts.append("Our numbers come from the embedded demo suite ("
                     f"{', '.join(col.embedded_datasets)}), not the paper's datasets: they "
                     "are not comparable to the published numbers, and their schedule is "
                     "scaled (each record's config holds it).")
    if col.unknown_protocols:
        parts.append(f"Unknown protocol(s) {', '.join(col.unknown_protocols)}: not the "
                     f"paper's protocols ({', '.join(spec.protocols)}).")
    return " ".join(parts)


def _notes(spec: TableSpec) -> tuple[str, ...]:
    notes = [f"Published rows: {paper.SOURCES[spec.id]}."]
    if any(c.source == paper.ERRATUM_SOURCE for c in paper.cells_for(spec.id)):
        notes.append(f"{paper.ERRATUM_ROW}: {paper.ERRATUM_SOURCE}, {paper.ERRATUM_NOTE}.")
    return tuple(notes)


def _random_of(row: OurRow, rows: list[OurRow]) -> OurRow | None:
    """The embedded Random row of ``row``'s architecture, protocol, selection and variant."""
    for b in rows:
        if (b.random_init and b.embedded and b.arch == row.arch
                and (b.protocol, b.selection, b.variant)
                == (row.protocol, row.selection, row.variant)):
            return b
    return None


def _shown(value: float | None) -> float | None:
    """A value as the table displays it (one decimal)."""
    return None if value is None else float(f"{value:.1f}")


def build_view(col: Collated) -> TableView:
    """Paper rows, then our rows, then one Δ row per our row."""
    spec = col.spec
    keys = spec.column_keys
    ref_label, ref = _reference(spec)
    blank = tuple("" for _ in spec.row_attrs)
    rows = paper_rows(spec)
    ours = col.rows or [OurRow("(no records for this table)", "", "", "",
                               {k: CellStat(None, None, 0, "missing") for k in keys})]
    for r in ours:
        cells = [r.cells[k] for k in keys]
        rows.append(ViewRow("ours", r.label, blank, tuple(c.text for c in cells),
                            tuple(c.mean for c in cells)))
    for r in col.rows:
        if not r.embedded:
            rows.append(ViewRow("delta", f"Δ vs paper {ref_label} ({r.label})", blank,
                                tuple(_delta_text(r.cells[k].mean, ref.get(k)) for k in keys),
                                tuple(None for _ in keys)))
            continue
        base = _random_of(r, col.rows)
        if base is not None and base is not r:
            rows.append(ViewRow("delta", f"Δ vs Random ({r.label})", blank,
                                tuple(_delta_text(r.cells[k].mean, _shown(base.cells[k].mean))
                                      for k in keys), tuple(None for _ in keys)))
    return TableView(spec, spec.title, _caption(col, ref_label), tuple(rows), _notes(spec))
