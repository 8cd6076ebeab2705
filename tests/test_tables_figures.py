"""Figures: NMI curves from pretraining logs, per-layer accuracy, k ablation (PNG + PDF)."""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest

from pretrain.errors import UserError
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


def test_nmi_figure(tmp_path):
    a = _write_log(tmp_path / "runA")
    b = _write_log(tmp_path / "runB", epochs=2)
    paths = figures.nmi_figure([a, b / "log.jsonl"], tmp_path / "fig")
    assert [p.name for p in paths] == ["nmi.png", "nmi.pdf"]
    assert all(_is_figure(p) for p in paths)


def test_per_layer_figure(tmp_path):
    res = load_results(fx.golden_results(tmp_path / "results"))
    paths = figures.per_layer_figure(collate_table(SPECS["table1"], res), tmp_path / "fig")
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
