"""Collation semantics (seeds, states, selection, deltas) and the bad inputs a user can give:
missing or empty results folder, corrupt files, unknown protocol / table / metric; CLI."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from dcbench.core import UserError
from tables.collate import build_view, collate_table, load_results
from tables.render import main
from tables.specs import SPECS

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "tables"
_spec = importlib.util.spec_from_file_location("tables_fixture_records", FIXTURES / "records.py")
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)

T1 = SPECS["table1"]
OURS = ("DeepCluster (ours, demo)", "dc2018", "best_epoch", "10crop")


def _row(col, key):
    rows = [r for r in col.rows if (r.ckpt_label, r.protocol, r.selection, r.variant) == key]
    assert len(rows) == 1, [r.label for r in col.rows]
    return rows[0]


@pytest.fixture
def golden(tmp_path) -> Path:
    return fx.golden_results(tmp_path / "results")


def test_seeds_give_mean_std_n(golden):
    col = collate_table(T1, load_results(golden))
    c = _row(col, OURS).cells["imagenet/conv3"]
    assert c.n == 2 and c.state == "ok"
    assert c.mean == pytest.approx(statistics.mean([41.2, 42.0]))
    assert c.std == pytest.approx(statistics.stdev([41.2, 42.0]))
    assert c.text == "41.6 ± 0.6 (2)"
    one = _row(col, OURS).cells["places/conv1"]
    assert (one.n, one.std, one.text) == (1, None, "18.0")


def test_missing_and_failed_cells_stay_visible(golden):
    cells = _row(collate_table(T1, load_results(golden)), OURS).cells
    assert cells["places/conv4"].state == "missing" and cells["places/conv4"].text == "missing"
    assert cells["places/conv5"].state == "failed" and cells["places/conv5"].text == "failed"


def test_failure_without_any_record_gets_its_own_row(tmp_path):
    res = tmp_path / "results"
    fx.write(res, "ok", [fx.make_record("table1", "imagenet/conv1", 10.0, ckpt=fx.RANDOM)])
    fx.fail(res, "boom", "table1", ["imagenet/conv1", "imagenet/conv2"])
    col = collate_table(T1, load_results(res))
    row = _row(col, OURS)
    assert [row.cells[f"imagenet/conv{i}"].state for i in (1, 2, 3)] == \
        ["failed", "failed", "missing"]


def test_selection_and_variant_filters(golden):
    res = load_results(golden)
    default = collate_table(T1, res)
    assert {(r.selection, r.variant) for r in default.rows} == {("best_epoch", "10crop")}
    last = collate_table(T1, res, selection="last_epoch")
    assert _row(last, (OURS[0], "dc2018", "last_epoch", "10crop")).cells[
        "imagenet/conv1"].text == "1.0"
    anything = collate_table(T1, res, selection=None, variant=None)
    assert {(r.selection, r.variant) for r in anything.rows if r.protocol == "dc2018"
            and r.ckpt_label == OURS[0]} == {("best_epoch", "10crop"),
                                             ("last_epoch", "10crop"),
                                             ("best_epoch", "center")}


def test_delta_uses_displayed_value_and_never_prints_minus_zero(tmp_path):
    res = tmp_path / "results"
    fx.write(res, "a", [fx.make_record("table1", c, v, dataset_name="ImageNet")
                        for c, v in (("imagenet/conv3", 40.96), ("imagenet/conv4", 39.64),
                                     ("imagenet/conv5", 40.0))])
    view = build_view(collate_table(T1, load_results(res)))
    delta = next(r for r in view.rows if r.kind == "delta")
    texts = dict(zip(T1.column_keys, delta.texts))
    assert texts["imagenet/conv3"] == "+0.0"  # 41.0 - 41.0
    assert texts["imagenet/conv4"] == "+0.0"  # 39.6 - 39.6
    assert texts["imagenet/conv5"] == "+1.8"  # 40.0 - 38.2
    assert texts["imagenet/conv1"] == ""      # missing


def test_corrupt_file_is_reported_and_skipped(golden, caplog):
    bad = golden / "dc-demo" / "zz-corrupt.json"
    bad.write_text('{"schema": "dcbench.cell/1", "records": [')
    wrong = golden / "dc-demo" / "zz-wrong-schema.json"
    wrong.write_text('{"schema": "something/else"}')
    with caplog.at_level(logging.WARNING):
        res = load_results(golden)
    text = caplog.text
    assert str(bad) in text and str(wrong) in text
    assert sorted(res.corrupt) == sorted([str(bad), str(wrong)])
    # nothing from the corrupt files is averaged in
    assert _row(collate_table(T1, res), OURS).cells["imagenet/conv1"].n == 2


def test_non_finite_value_is_reported_and_skipped(tmp_path, caplog):
    res = tmp_path / "results"
    path = fx.write(res, "nan", [fx.make_record("table1", "imagenet/conv1", float("nan")),
                                 fx.make_record("table1", "imagenet/conv1", 12.0, seed=1)])
    with caplog.at_level(logging.WARNING):
        cells = _row(collate_table(T1, load_results(res)), OURS).cells
    assert str(path) in caplog.text and "not finite" in caplog.text
    assert (cells["imagenet/conv1"].n, cells["imagenet/conv1"].text) == (1, "12.0")


def test_unknown_protocol_is_shown_with_a_warning(golden, caplog):
    with caplog.at_level(logging.WARNING):
        col = collate_table(T1, load_results(golden))
    assert "my-probe" in caplog.text and "unknown protocol" in caplog.text
    assert col.unknown_protocols == ["my-probe"]
    assert _row(col, (OURS[0], "my-probe", "best_epoch", "10crop")).cells[
        "imagenet/conv3"].text == "40.0"
    assert "Unknown protocol(s) my-probe" in build_view(col).caption


def test_unknown_table_column_and_metric_are_not_averaged(tmp_path, caplog):
    res = tmp_path / "results"
    fx.write(res, "t", [fx.make_record("table9", "imagenet/conv1", 1.0),
                        fx.make_record("table1", "imagenet/conv9", 2.0),
                        fx.make_record("table1", "imagenet/conv1", 99.0, metric="top5"),
                        fx.make_record("table1", "imagenet/conv1", 11.0, metric="acc1"),
                        fx.make_record("table1", "imagenet/conv1", 12.0)])
    with caplog.at_level(logging.WARNING):
        col = collate_table(T1, load_results(res))
    assert "'table9'" in caplog.text
    assert "imagenet/conv9" in caplog.text
    assert "top5" in caplog.text and "acc1" in caplog.text  # no aliases: only top1 counts
    assert _row(col, OURS).cells["imagenet/conv1"].text == "12.0"


def test_embedded_suite_note(golden):
    res = load_results(golden)
    caption = build_view(collate_table(T1, res)).caption
    assert "embedded demo suite (embedded/fashion-mnist, embedded/second-domain)" in caption
    assert "embedded" not in build_view(collate_table(SPECS["retrieval"], res)).caption


def test_table_without_records_shows_missing_row(tmp_path):
    res = tmp_path / "results"
    fx.write(res, "a", [fx.make_record("table1", "imagenet/conv1", 10.0)])
    view = build_view(collate_table(SPECS["retrieval"], load_results(res)))
    ours = [r for r in view.rows if r.kind == "ours"]
    assert [r.texts for r in ours] == [("missing",) * 8]  # Oxford, Paris, 2 x E / M / H
    assert not [r for r in view.rows if r.kind == "delta"]


# ----------------------------------------------------------------------------- bad folders


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"does not exist.*evaluations\.run_all --ckpt"):
        load_results(tmp_path / "nope")


def test_empty_folder_is_a_user_error(tmp_path):
    (tmp_path / "results" / "ckpt").mkdir(parents=True)
    with pytest.raises(UserError, match=r"holds no result files.*evaluations\.run_all"):
        load_results(tmp_path / "results")


def test_only_corrupt_files_is_a_user_error(tmp_path):
    (tmp_path / "results" / "ckpt").mkdir(parents=True)
    (tmp_path / "results" / "ckpt" / "a.json").write_text("not json")
    with pytest.raises(UserError, match=r"no readable records \(1 corrupt"):
        load_results(tmp_path / "results")


def test_results_file_or_checkpoint_folder_is_a_user_error(golden, tmp_path):
    f = tmp_path / "results.json"
    f.write_text("{}")
    with pytest.raises(UserError, match="is not a folder"):
        load_results(f)
    with pytest.raises(UserError, match=r"one checkpoint's folder: pass --results its parent"):
        load_results(golden / "dc-demo")


def test_out_is_a_file_exit_2(golden, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("")
    assert main(["--results", str(golden), "--out", str(out), "--no-figures", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot create the output folder {out}")


# ----------------------------------------------------------------------------- CLI


def _cli(*args: str, module: bool = False, cwd: Path = REPO) -> subprocess.CompletedProcess:
    entry = ["-m", "tables.render"] if module else [str(REPO / "tables" / "render.py")]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, *entry, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", [False, True], ids=["script", "module"])
def test_cli_renders(golden, tmp_path, module):
    """Both entry points; the script also from a folder outside the repository."""
    out = tmp_path / "out"
    run = _cli("--results", str(golden), "--out", str(out), "--format", "md",
               "--tables", "table1", "voc", "--no-figures", module=module,
               cwd=REPO if module else tmp_path)
    assert run.returncode == 0, run.stderr
    assert "| DeepCluster " in run.stdout and "### Pascal VOC" in run.stdout
    assert sorted(p.name for p in out.iterdir()) == ["table1.md", "tables.md", "voc.md"]
    assert "my-probe" in run.stderr  # the unknown-protocol warning


def test_cli_missing_folder_one_line_exit_2(tmp_path):
    res = tmp_path / "results"
    run = _cli("--results", str(res), "--out", str(tmp_path / "o"), "--no-figures")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert str(res) in lines[0] and "python -m evaluations.run_all --ckpt" in lines[0]
    assert "Traceback" not in run.stderr and run.stdout == ""


def test_main_empty_folder_exit_2(tmp_path, capsys):
    res = tmp_path / "results"
    res.mkdir()
    assert main(["--results", str(res), "--out", str(tmp_path / "o"), "--no-figures"]) == 2
    err = capsys.readouterr()
    assert err.out == ""
    assert err.err.startswith(f"error: results folder {res} holds no result files")
    assert "python -m evaluations.run_all --ckpt" in err.err and err.err.count("\n") == 1


def test_main_latex_to_stdout_and_corrupt_file_warning(golden, tmp_path, capsys, caplog):
    bad = golden / "dc-demo" / "broken.json"
    bad.write_text("{")
    with caplog.at_level(logging.WARNING):
        rc = main(["--results", str(golden), "--out", str(tmp_path / "o"), "--format",
                   "latex", "--tables", "retrieval", "--no-figures"])
    assert rc == 0
    assert capsys.readouterr().out.startswith(r"\begin{table}")
    assert f"skipped corrupt results file {bad}" in caplog.text


def test_main_missing_log_exit_2(golden, tmp_path, capsys):
    rc = main(["--results", str(golden), "--out", str(tmp_path / "o"),
               "--logs", str(tmp_path / "no-run")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: pretraining log")
    assert str(tmp_path / "no-run") in err and "log.jsonl" in err


def test_label_mixing_several_k_warns(tmp_path, caplog):
    res = tmp_path / "results"
    for k in (100, 1000):
        ckpt = {**fx.DEMO, "id": f"k{k}", "k": k}
        fx.write(res, f"k{k}", [fx.make_record("table1", "imagenet/conv1", 10.0, ckpt=ckpt)])
    with caplog.at_level(logging.WARNING):
        collate_table(T1, load_results(res))
    assert "different k [100, 1000]" in caplog.text and "own label" in caplog.text


def test_tables_does_not_import_torch():
    code = ("import sys, tables.render, tables.collate, tables.figures; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_failure_file_without_columns_is_skipped_with_a_warning(tmp_path, caplog):
    """Every failure file names its columns; one that does not is not guessed at."""
    res = tmp_path / "results"
    fx.write(res, "in", [fx.make_record("table1", c, 30.0) for c in fx.IMAGENET])
    bad = fx.fail(res, "linear-places-s0-abc", "table1", ["places/conv1"])
    obj = json.loads(bad.read_text())
    del obj["columns"]
    bad.write_text(json.dumps(obj))
    with caplog.at_level(logging.WARNING):
        cells = _row(collate_table(T1, load_results(res)), OURS).cells
    assert str(bad) in caplog.text and "columns" in caplog.text
    assert [cells[f"places/conv{i}"].state for i in range(1, 6)] == ["missing"] * 5
    assert [cells[c].state for c in fx.IMAGENET] == ["ok"] * 5

def test_voc_columns_of_their_own_protocols_share_one_row_others_keep_theirs(tmp_path):
    """The VOC table's columns come from two protocols and two test variants: a checkpoint's
    records made as their columns specify are one row; a record of another protocol or test
    variant is a row of its own, labelled with them (never averaged with the others)."""
    res = tmp_path / "results"
    voc = SPECS["voc"]
    rec = lambda col, v, **kw: fx.make_record("voc", col, v, selection="final", metric=(  # noqa: E731
        "mIoU" if col.startswith("seg") else "mAP"), **kw)
    fx.write(res, "cls", [rec("classification/fc6-8", 20.0, variant="10crops")])
    fx.write(res, "det", [rec("detection/all", 30.0, protocol="dc2018-reimpl",
                              variant="single-scale")])
    fx.write(res, "seg", [rec("segmentation/all", 40.0, protocol="dc2018-reimpl",
                              variant="single-scale")])
    fx.write(res, "cls1", [rec("classification/all", 50.0, variant="1crop")])
    fx.write(res, "det2", [rec("detection/fc6-8", 60.0, protocol="my-det",
                               variant="single-scale")])
    col = collate_table(voc, load_results(res))
    by = {r.label: r for r in col.rows}
    assert set(by) == {"DeepCluster (ours, demo) · final",
                       "DeepCluster (ours, demo) · final · 1crop",
                       "DeepCluster (ours, demo) · my-det · final · single-scale"}, set(by)
    main_row = by["DeepCluster (ours, demo) · final"].cells
    assert [main_row[c].text for c in voc.column_keys] == \
        ["20.0", "missing", "missing", "30.0", "missing", "40.0"]
    assert by["DeepCluster (ours, demo) · final · 1crop"].cells[
        "classification/all"].text == "50.0"


def test_delta_on_embedded_data_is_against_random_of_the_same_architecture(tmp_path):
    res = tmp_path / "results"
    vgg_random = {**fx.RANDOM, "id": "random-vgg", "arch": "vgg16", "label": "Random (vgg16)",
                  "path": "results/_random/random-vgg16-sobel-fc4096.pth"}
    fx.write(res, "a", [fx.make_record("table1", "imagenet/conv3", 40.96)])
    fx.write(res, "r", [fx.make_record("table1", "imagenet/conv3", 30.04, ckpt=fx.RANDOM)])
    fx.write(res, "v", [fx.make_record("table1", "imagenet/conv3", 99.0, ckpt=vgg_random)])
    view = build_view(collate_table(T1, load_results(res)))
    deltas = {r.label: dict(zip(T1.column_keys, r.texts)) for r in view.rows
              if r.kind == "delta"}
    ours = "DeepCluster (ours, demo) · dc2018 · best_epoch · 10crop"
    assert list(deltas) == [f"Δ vs Random ({ours})"]  # the Random rows get none
    assert deltas[f"Δ vs Random ({ours})"]["imagenet/conv3"] == "+11.0"  # 41.0 - 30.0
    assert "Δ vs Random = ours − the never-trained network" in view.caption
    assert "Δ vs paper" not in view.caption


def test_embedded_row_without_a_random_row_gets_no_delta(tmp_path):
    res = tmp_path / "results"
    fx.write(res, "a", [fx.make_record("table1", "imagenet/conv3", 40.96)])
    view = build_view(collate_table(T1, load_results(res)))
    assert [r for r in view.rows if r.kind == "delta"] == []
