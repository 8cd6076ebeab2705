"""Figures: NMI curves from pretraining logs, per-layer accuracy, k ablation (PNG + PDF)."""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest

from dcbench.core import UserError
from tables import figures
from tables.collate import collate_table, load_results
from tables.render import main
from tables.specs import SPECS

FIXTURES = Path(__file__).parent / "fixtures" / "tables"
_spec = importlib.util.spec_from_file_location("tables_fixture_records", FIXTURES / "records.py")
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)

PNG = b"\x89PNG\r\n\x1a\n"


def _write_log(run: Path, epochs: int = 4) -> Path:
    run.mkdir(parents=True)
    lines = [json.dumps({"epoch": e, "nmi_prev": None if e == 0 else 0.5 + 0.05 * e,
                         "nmi_labels": 0.1 * (e + 1), "kmeans_loss": 1.0 / (e + 1),
                         "train_loss": 2.0}) for e in range(epochs)]
    lines.insert(2, "{not json")
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")
    return run


def _is_figure(path: Path) -> bool:
    head = path.read_bytes()[:8]
    return head == PNG if path.suffix == ".png" else head.startswith(b"%PDF")


def test_read_log_skips_bad_lines(tmp_path, caplog):
    run = _write_log(tmp_path / "run1")
    with caplog.at_level(logging.WARNING):
        df = figures.read_pretrain_log(run)
    assert "line 3" in caplog.text and str(run / "log.jsonl") in caplog.text
    assert df["epoch"].tolist() == [0, 1, 2, 3]
    assert df["nmi_prev"].isna().tolist() == [True, False, False, False]
    assert df["nmi_prev"].iloc[3] == pytest.approx(0.65)


def test_read_log_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        figures.read_pretrain_log(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.jsonl").write_text("")
    with pytest.raises(UserError, match="holds no epochs"):
        figures.read_pretrain_log(tmp_path / "empty")


def _lines(ax) -> dict[str, list[float]]:
    """legend label -> the plotted points of that line of ``ax``, flattened x0, y0, x1, ..."""
    out = {ln.get_label(): ln.get_xydata() for ln in ax.lines
           if not ln.get_label().startswith("_")}
    out |= {c.get_label(): c.lines[0].get_xydata() for c in ax.containers}  # errorbars
    return {k: [float(v) for v in xy.ravel()] for k, xy in out.items()}


def _pts(xs, ys) -> list[float]:
    return [float(v) for xy in zip(xs, ys) for v in xy]


def test_nmi_figure(tmp_path):
    a = _write_log(tmp_path / "runA")
    b = _write_log(tmp_path / "runB", epochs=2)
    fig = figures.nmi_plot([a, b / "log.jsonl"])
    labels, prev = (_lines(ax) for ax in fig.axes)
    # the logs: nmi_labels = 0.1 (e + 1); nmi_prev = 0.5 + 0.05 e, none at epoch 0
    assert labels["runA"] == pytest.approx(_pts([0, 1, 2, 3], [0.1, 0.2, 0.3, 0.4]))
    assert labels["runB"] == pytest.approx(_pts([0, 1], [0.1, 0.2]))
    assert prev["runA"] == pytest.approx(_pts([1, 2, 3], [0.55, 0.6, 0.65]))
    assert prev["runB"] == pytest.approx(_pts([1], [0.55]))
    paths = figures.nmi_figure([a, b / "log.jsonl"], tmp_path / "fig")
    assert [p.name for p in paths] == ["nmi.png", "nmi.pdf"]
    assert all(_is_figure(p) for p in paths)


def test_per_layer_figure(tmp_path):
    res = load_results(fx.golden_results(tmp_path / "results"))
    col = collate_table(SPECS["table1"], res)
    imagenet, places = (_lines(ax) for ax in figures.per_layer_plot(col).axes)
    x = [1, 2, 3, 4, 5]
    # the paper's DeepCluster row of Table 1 (the seed), and our golden means over 2 seeds
    assert imagenet["DeepCluster (paper)"] == pytest.approx(
        _pts(x, [13.4, 32.3, 41.0, 39.6, 38.2]))
    assert places["DeepCluster (paper)"] == pytest.approx(_pts(x, [19.6, 33.2, 39.2, 39.8, 34.7]))
    ours = imagenet["DeepCluster (ours, demo) · dc2018 · best_epoch · 10crop"]
    assert ours == pytest.approx(_pts(x, [12.5, 30.5, 41.6, 38.0, 36.0]))
    assert imagenet["Random init (ours) · dc2018 · best_epoch · 10crop"] == pytest.approx(_pts(x, [11.0, 16.0, 15.0, 14.0, 12.0]))
    # places: conv1..3 from seed 0, conv4 missing and conv5 failed are gaps (NaN)
    pl = places["DeepCluster (ours, demo) · dc2018 · best_epoch · 10crop"]
    assert pl[:6] == pytest.approx(_pts([1, 2, 3], [18.0, 31.5, 37.3]))
    assert pl[7] != pl[7] and pl[9] != pl[9]
    paths = figures.per_layer_figure(col, tmp_path / "fig")
    assert [p.name for p in paths] == ["per_layer.png", "per_layer.pdf"]
    assert all(_is_figure(p) for p in paths)


def _k_records(res: Path, table: str, column: str, metric: str) -> None:
    for k, v in ((1000, 60.0), (10000, 64.0), (100000, 62.0)):
        ckpt = {**fx.DEMO, "id": f"k{k}", "k": k, "sha256": f"{k:064d}"}
        kw = {"selection": "final", "variant": None} if table == "voc" else {}
        fx.write(res, f"{table}-k{k}", [fx.make_record(table, column, v, ckpt=ckpt,
                                                       metric=metric, **kw)])


def test_k_ablation_prefers_voc_classification(tmp_path):
    res = tmp_path / "results"
    _k_records(res, "voc", "classification/fc6-8", "mAP")
    _k_records(res, "table1", "imagenet/conv3", "top1")
    label, stats = figures.k_ablation_data(load_results(res))
    assert "VOC07" in label
    assert stats["ckpt_k"].tolist() == [1000, 10000, 100000]
    assert stats["mean"].tolist() == [60.0, 64.0, 62.0]
    ax, = figures.k_ablation_plot(label, stats).axes
    assert _lines(ax)["classification/fc6-8"] == _pts([1000, 10000, 100000], [60.0, 64.0, 62.0])
    assert ax.get_xscale() == "log"
    paths = figures.k_ablation_figure(load_results(res), tmp_path / "fig")
    assert all(_is_figure(p) for p in paths) and len(paths) == 2


def test_k_ablation_falls_back_to_table1_and_needs_two_k(tmp_path):
    res = tmp_path / "results"
    _k_records(res, "table1", "imagenet/conv3", "top1")
    label, stats = figures.k_ablation_data(load_results(res))
    assert "top-1" in label and set(stats["column"]) == {"imagenet/conv3"}
    one = tmp_path / "one"
    fx.write(one, "a", [fx.make_record("voc", "classification/fc6-8", 60.0, metric="mAP",
                                       selection="final", variant=None)])
    assert figures.k_ablation_data(load_results(one)) is None
    assert figures.k_ablation_figure(load_results(one), tmp_path / "fig1") == []


def test_cli_writes_figures(tmp_path):
    res = fx.golden_results(tmp_path / "results")
    _k_records(res, "voc", "classification/fc6-8", "mAP")
    run = _write_log(tmp_path / "run")
    out = tmp_path / "out"
    assert main(["--results", str(res), "--out", str(out), "--format", "md", "-q",
                 "--logs", str(run)]) == 0
    names = sorted(p.name for p in (out / "figures").iterdir())
    assert names == ["k_ablation.pdf", "k_ablation.png", "nmi.pdf", "nmi.png",
                     "per_layer.pdf", "per_layer.png"]
