"""The paper's figures from pretraining logs and records (matplotlib, Agg canvas).

* ``nmi``: NMI(clusters, labels) and NMI(t-1, t) per epoch (paper Fig. 2a/b) from
  pretraining logs ``<run>/log.jsonl`` (one JSON object per epoch: ``epoch``, ``nmi_prev``,
  ``nmi_labels``, ...).
* ``per_layer``: linear-probe top-1 per conv layer, ours vs the paper's DeepCluster points.
* ``k_ablation``: a metric vs the number of clusters k (log scale; paper Fig. 2c), when
  records of checkpoints with several k exist: VOC classification if present, else the
  table1 conv columns.

Each figure is written as PNG and PDF. No pyplot: figures are built on an Agg canvas, so
no global backend state is touched.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dcbench.core import UserError, atomic_open
from tables import paper
from tables.collate import Collated, Results, filter_records
from tables.specs import SPECS

log = logging.getLogger(__name__)

LOG_NAME = "log.jsonl"


def read_pretrain_log(path: Path | str) -> pd.DataFrame:
    """One row per epoch from a run folder (``<run>/log.jsonl``) or a log file.

    Lines that are not JSON objects with an ``epoch`` are skipped with a warning naming
    the file and line; a missing or empty log is a :class:`UserError`.
    """
    path = Path(path)
    file = path / LOG_NAME if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"pretraining log {file} does not exist: pass --logs a pretraining "
                        f"run folder holding {LOG_NAME} (written by `python -m pretrain`) "
                        "or the log file itself")
    rows = []
    for n, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("epoch"), int):
            log.warning("skipped line %d of %s: not a JSON object with an integer 'epoch'",
                        n, file)
            continue
        rows.append(obj)
    if not rows:
        raise UserError(f"pretraining log {file} holds no epochs: let the run finish at "
                        "least one epoch, or pass another run")
    df = pd.DataFrame(rows)
    for k in ("nmi_prev", "nmi_labels"):
        df[k] = pd.to_numeric(df[k], errors="coerce") if k in df else float("nan")
    return df.sort_values("epoch").drop_duplicates("epoch", keep="last")


def _literal(label: str) -> str:
    """A label shown as written: ``$`` would start matplotlib mathtext (where ``_`` and ``^``
    are sub/superscripts); escaped, the text is plain."""
    return str(label).replace("$", r"\$")


def _run_name(path: Path) -> str:
    path = Path(path)
    return path.name if path.is_dir() else path.parent.name or path.stem


def _save(fig: Figure, out: Path, name: str) -> list[Path]:
    """PNG and PDF of ``fig``, each through the one atomic writer."""
    FigureCanvasAgg(fig)
    fig.tight_layout()
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    with atomic_open(paths[0]) as f:
        fig.savefig(f, format="png", dpi=150)
    with atomic_open(paths[1]) as f:
        fig.savefig(f, format="pdf", metadata={"CreationDate": None})
    return paths


def nmi_figure(logs: Sequence[Path], out: Path) -> list[Path]:
    """Paper Fig. 2a/b, written as ``nmi.png`` / ``nmi.pdf``."""
    return _save(nmi_plot(logs), out, "nmi")


def nmi_plot(logs: Sequence[Path]) -> Figure:
    """Paper Fig. 2a/b: NMI(clusters, labels) and NMI(t-1, t) against epochs."""
    fig = Figure(figsize=(9, 3.5))
    ax_a, ax_b = fig.subplots(1, 2)
    for p in logs:
        df = read_pretrain_log(p)
        name = _run_name(p)
        a = df.dropna(subset=["nmi_labels"])
        b = df.dropna(subset=["nmi_prev"])
        if len(a):
            ax_a.plot(a["epoch"], a["nmi_labels"], marker=".", label=_literal(name))
        if len(b):
            ax_b.plot(b["epoch"], b["nmi_prev"], marker=".", label=_literal(name))
    for ax, title in ((ax_a, "(a) NMI(clusters, labels)"), (ax_b, "(b) NMI(t-1, t)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel("NMI")
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no values in the logs", ha="center", transform=ax.transAxes)
    return fig


def per_layer_figure(col: Collated, out: Path) -> list[Path]:
    """Top-1 per conv layer, written as ``per_layer.png`` / ``.pdf``."""
    return _save(per_layer_plot(col), out, "per_layer")


def per_layer_plot(col: Collated) -> Figure:
    """Top-1 per conv layer (ImageNet, Places): our rows vs the paper's DeepCluster."""
    fig = Figure(figsize=(9, 3.5))
    axes = fig.subplots(1, 2, sharey=True)
    layers = [f"conv{i}" for i in range(1, 6)]
    x = list(range(1, 6))
    for ax, (dset, title) in zip(axes, (("imagenet", "ImageNet"), ("places", "Places"))):
        ref = [paper.lookup("table1", "DeepCluster", f"{dset}/{c}").value for c in layers]
        ax.plot(x, ref, "ko--", label="DeepCluster (paper)")
        for r in col.rows:
            cells = [r.cells[f"{dset}/{c}"] for c in layers]
            ys = [c.mean if c.mean is not None else float("nan") for c in cells]
            errs = [c.std or 0.0 for c in cells]
            ax.errorbar(x, ys, yerr=errs, marker="s", capsize=3, label=_literal(r.label))
        ax.set_xticks(x, layers)
        ax.set_title(f"{title} linear probes")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="x-small")
    return fig


def k_ablation_data(results: Results) -> tuple[str, pd.DataFrame] | None:
    """(metric label, mean/std per k and column) if records of >= 2 values of k exist."""
    candidates = (("voc", ["classification/fc6-8"], "VOC07 classification mAP (fc6-8)"),
                  ("table1", list(SPECS["table1"].column_keys), "linear probe top-1 (%)"))
    for tid, cols, ylabel in candidates:
        spec = SPECS[tid]
        df = filter_records(spec, results.records, spec.selection, spec.variant, quiet=True)
        df = df[df["column"].isin(cols) & df["ckpt_k"].notna()]
        if df["ckpt_k"].nunique() >= 2:
            stats = df.groupby(["column", "ckpt_k"])["value"].agg(["mean", "std"]).reset_index()
            return ylabel, stats
    return None


def k_ablation_figure(results: Results, out: Path) -> list[Path]:
    """Paper Fig. 2c as ``k_ablation.png`` / ``.pdf``; nothing when < 2 values of k."""
    data = k_ablation_data(results)
    if data is None:
        log.info("k ablation figure skipped: no records for two or more values of k")
        return []
    return _save(k_ablation_plot(*data), out, "k_ablation")


PAPER_BEST_K = 10_000  # PROTOCOLS.md section 7: Fig. 2c peaks at k = 10,000


def k_ablation_plot(ylabel: str, stats: pd.DataFrame) -> Figure:
    """Paper Fig. 2c: a metric against k (log scale), one line per column."""
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for column, g in stats.groupby("column", sort=True):
        ax.errorbar(g["ckpt_k"], g["mean"], yerr=g["std"].fillna(0.0), marker="o",
                    capsize=3, label=_literal(column))
    lo, hi = float(stats["ckpt_k"].min()), float(stats["ckpt_k"].max())
    if lo <= PAPER_BEST_K <= hi:  # the paper's curve is published as a figure only
        ax.axvline(PAPER_BEST_K, ls="--", color="grey", label="paper's best k (ImageNet)")
    ax.set_xscale("log")
    ax.set_xlabel("number of clusters k")
    ax.set_ylabel(ylabel)
    ax.set_title("k ablation (cf. paper Fig. 2c)")
    fig.text(0.01, 0.01, f"paper (ImageNet): best k = {PAPER_BEST_K:,} of 1k-100k "
             "(published as a plot only)", fontsize="x-small", color="grey")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="x-small")
    return fig


def write_figures(out: Path, results: Results, collated: dict[str, Collated],
                  logs: Sequence[Path] = ()) -> list[Path]:
    """Every figure the inputs allow; returns the files written."""
    paths: list[Path] = []
    if logs:
        paths += nmi_figure(logs, out)
    t1 = collated.get("table1")
    if t1 is not None and t1.rows:
        paths += per_layer_figure(t1, out)
    paths += k_ablation_figure(results, out)
    for p in paths:
        log.info("wrote %s", p)
    return paths
