"""Silent data problems and one-line errors outside the pipelines' core: images deeper than
8 bits, directory symlinks that loop, labels matplotlib or LaTeX would misread, unwritable
output folders for run_all and render, and an unreadable checkpoint."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_fixture_module
from dcbench.core import UserError
from pretrain.data import load_rgb, scan_image_folder

REPO = Path(__file__).resolve().parent.parent
fx = load_fixture_module("tables/records.py", "tables_fixture_records")


def test_16bit_png_is_scaled_not_saturated(tmp_path):
    a = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63,000 of 65,535
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = np.asarray(load_rgb(tmp_path / "g16.png"))
    expected = np.rint(a.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert rgb.shape == (8, 8, 3) and (rgb[..., 0] == expected).all() and (rgb[..., 2] == expected).all()
    assert len(np.unique(rgb)) > 50  # PIL's own convert('RGB') gives 0 and 255 only


def test_float_tiff_in_unit_range_is_scaled_not_black(tmp_path):
    f = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(f).save(tmp_path / "f.tif")
    rgb = np.asarray(load_rgb(tmp_path / "f.tif"))[..., 0]
    assert rgb.max() == 255 and rgb.min() == 0
    assert (rgb == np.rint(f * 255).astype(np.uint8)).all()


def test_8bit_images_are_unchanged(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "c.png")
    assert (np.asarray(load_rgb(tmp_path / "c.png")) == a).all()


def test_directory_symlinks_that_loop_or_duplicate_are_not_read_twice(tmp_path, caplog):
    root = tmp_path / "data"
    for c in ("n01", "n02"):
        (root / c / "sub").mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / c / "sub" / "a.png")
    (root / "n01" / "loop").symlink_to(root)  # loops back to the data folder
    (root / "n03").symlink_to(root / "n02")  # a class linked under another name
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(outside / "b.png")
    (root / "n02" / "more").symlink_to(outside)  # data kept elsewhere: followed
    samples, classes = scan_image_folder(root)
    assert classes == ["n01", "n02"]
    got = sorted((str(p.relative_to(root)), c) for p, c in samples)
    assert got == [("n01/sub/a.png", 0), ("n02/more/b.png", 1), ("n02/sub/a.png", 1)]
    assert "loop" in caplog.text and "n03" in caplog.text


def test_figure_labels_with_mathtext_characters_are_shown_as_written(tmp_path):
    from tables import figures
    from tables.collate import collate_table, load_results
    from tables.specs import SPECS

    res = tmp_path / "results"
    label = "run_$1^2$_a"
    ckpt = {**fx.DEMO, "label": label}
    fx.write(res, "a", [fx.make_record("table1", "imagenet/conv1", 10.0, ckpt=ckpt)])
    fig = figures.per_layer_plot(collate_table(SPECS["table1"], load_results(res)))
    # what matplotlib will draw for each legend entry, and whether it parses it as math
    drawn = [t._preprocess_math(t.get_text()) for t in fig.axes[0].get_legend().get_texts()]
    ours = [(text, ismath) for text, ismath in drawn if text.startswith("run_")]
    assert ours == [(f"{label} · dc2018 · best_epoch · 10crop", False)], drawn
    out = figures.per_layer_figure(collate_table(SPECS["table1"], load_results(res)), tmp_path)
    assert all(p.stat().st_size > 0 for p in out)  # drawing did not trip on the label


@pytest.mark.skipif(not __import__("shutil").which("pdflatex"), reason="no pdflatex installed")
def test_latex_with_accented_labels_compiles_and_other_scripts_are_flagged(tmp_path, caplog):
    from tables.render import render

    res = tmp_path / "results"
    fx.write(res, "a", [fx.make_record("table1", "imagenet/conv1", 10.0,
                                       ckpt={**fx.DEMO, "label": "Réseau à l'été (ours)"})])
    render(res, tmp_path / "t1", "latex", ["table1"], figures=False)
    body = (tmp_path / "t1" / "table1.tex").read_text(encoding="utf-8")
    doc = ("\\documentclass{article}\n\\usepackage[T1]{fontenc}\n\\usepackage{booktabs}\n"
           f"\\begin{{document}}\n{body}\n\\end{{document}}\n")
    (tmp_path / "d.tex").write_text(doc, encoding="utf-8")
    run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "d.tex"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout[-2000:]
    fx.write(res, "b", [fx.make_record("table1", "imagenet/conv2", 10.0,
                                       ckpt={**fx.RANDOM, "label": "深度聚类"})])
    render(res, tmp_path / "t2", "latex", ["table1"], figures=False)
    body = (tmp_path / "t2" / "table1.tex").read_text(encoding="utf-8")
    assert body.startswith("% labels of table table1 hold characters pdflatex cannot typeset")
    assert "xelatex or lualatex" in caplog.text


def _readonly_dir(tmp_path: Path) -> Path:
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)],
                          capture_output=True).returncode != 0:
            pytest.skip("this machine does not allow mounting a tmpfs")
    else:
        ro.chmod(0o555)
    return ro


def _release(ro: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["umount", "-l", str(ro)])


def test_unwritable_render_output_is_one_line(tmp_path):
    res = fx.golden_results(tmp_path / "results")
    ro = _readonly_dir(tmp_path)
    try:
        p = subprocess.run([sys.executable, "tables/render.py", "--results", str(res), "--out",
                            str(ro / "tables")], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    finally:
        _release(ro)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(ro / "tables") in errors[0]


def test_unwritable_results_folder_is_one_line(tmp_path):
    lc = load_fixture_module("legacy_checkpoints.py", "legacy_checkpoints_fixture")
    ckpt = tmp_path / "c.pth"
    lc.write_released_checkpoint(ckpt, "alexnet", fc_dim=32, k=None)
    ro = _readonly_dir(tmp_path)
    try:
        p = subprocess.run([sys.executable, "-m", "evaluations.run_all", "--ckpt", str(ckpt),
                            "--suite", "paper", "--results", str(ro / "results")], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    finally:
        _release(ro)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(ro / "results") in errors[0], errors
    assert "read-only" in errors[0] or "permission denied" in errors[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file: no permission error")
def test_unreadable_checkpoint_says_permission_not_corrupt(tmp_path):
    from pretrain.checkpoint import load_checkpoint

    path = tmp_path / "c.pth"
    path.write_bytes(b"x" * 100)
    path.chmod(0)
    with pytest.raises(UserError, match="permission denied"):
        load_checkpoint(path)
