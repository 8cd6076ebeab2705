"""The benchmark runner works end to end at small sizes and reports consistent numbers
(never asserted on time: only on what the numbers must satisfy whatever the machine)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists(),
                    reason="apt-get install dataset-fashion-mnist")
def test_benchmark_runner_quick(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    probe = res["bench_linear_probe"]
    assert probe["identical_numbers"] is True  # multi-head == five single-head runs
    assert probe["images"] == 100 and probe["input_size"] == 48  # --quick: 10 per class x 10
    assert probe["speedup"] == pytest.approx(probe["five_single_s"] / probe["multi_head_s"],
                                             rel=0.02)
    pre = res["bench_pretrain"]
    secs = pre["seconds"]
    assert set(secs) == {"features", "pca", "kmeans", "train", "total"}
    assert sum(secs[k] for k in ("features", "pca", "kmeans", "train")) == pytest.approx(
        secs["total"], abs=0.01)
    assert pre["n"] == 1000 and pre["img_per_s"]["features"] == pytest.approx(
        1000 / secs["features"], rel=0.05)
    agree = res["bench_clustering"]["agreement"]
    assert agree["pca_max_abs_diff_after_sign_alignment"] < 1e-3  # torch PCA == faiss PCA
    km = agree["kmeans torch-cpu vs faiss"]
    assert km["same_assignment_fraction"] > 0.95 and km["loss_rel_diff"] < 1e-3, km
    for mode in ("fc6-8", "all"):
        voc = res["bench_voc"][mode]
        assert voc["cell_vs_model"] == pytest.approx(
            voc["cell_img_per_s"] / voc["model_img_per_s"], rel=0.02)
    for task in ("detection", "segmentation"):
        for mode in ("fc6-8", "all"):
            d = res["bench_voc_dense"][f"{task}/{mode}"]
            assert d["model_vs_backbone"] == pytest.approx(
                d["model_img_per_s"] / d["backbone_img_per_s"], rel=0.02)
            assert d["cell_vs_model"] == pytest.approx(
                d["cell_img_per_s"] / d["model_img_per_s"], rel=0.02)
    ret = res["bench_retrieval"]
    for arch in ("alexnet", "vgg16"):
        e = ret[f"extract/{arch}"]
        assert e["max_abs_diff"] < 1e-5  # batching by size leaves descriptors unchanged
        assert e["batched_vs_single"] == pytest.approx(
            e["batched_img_per_s"] / e["single_img_per_s"], rel=0.02)
    share = ret["cell"]["share"]
    assert set(share) == {"extract", "whiten", "rank", "score"}
    assert sum(share.values()) == pytest.approx(1.0, abs=0.01)
    epoch = res["epoch"]  # benchmarks/epoch.py --smoke (test_epoch_benchmark_smoke checks it)
    assert epoch["settings"]["n"] == 64 and epoch["projection"]["images"] == 1_281_167
    tab = res["bench_tables"]
    assert tab["records"] == 500 and tab["files"] == 100  # 5 records per cell file
    assert tab["records_per_s"] == pytest.approx(
        500 / (tab["load_s"] + tab["collate_s"] + tab["render_s"]), rel=1e-6)


PHASES = {"decode": "img_per_s", "forward": "img_per_s", "extract": "img_per_s",
          "pca": "seconds", "pca_full_width": "seconds", "eigh": "seconds",
          "kmeans": "seconds", "kmeans_imagenet_shape": "seconds", "train_step": "img_per_s",
          "train": "img_per_s"}


@pytest.mark.slow
def test_epoch_benchmark_smoke(tmp_path):
    """benchmarks/epoch.py --smoke: an ImageNet-layout folder of real-size JPEGs, every phase
    measured, and the projection to ImageNet recomputed here from the reported phases."""
    import math

    from PIL import Image

    out, data = tmp_path / "report.json", tmp_path / "data"
    p = subprocess.run([sys.executable, "benchmarks/epoch.py", "--smoke", "--out", str(out),
                        "--folder", str(data)], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "projected epoch on 1,281,167 images" in p.stdout
    rep = json.loads(out.read_text())
    n = rep["settings"]["n"]
    assert n == 64 and rep["used"]["k"] == 8 and rep["used"]["device"] == "cpu"
    ph = rep["phases"]
    assert set(PHASES) <= set(ph)
    for name, key in PHASES.items():
        assert ph[name]["seconds"] > 0 and math.isfinite(ph[name]["seconds"]), name
        assert ph[name][key] > 0 and math.isfinite(ph[name][key]), name
    for name in ("decode", "extract", "train"):  # the whole folder, once
        assert ph[name]["images"] == n
        assert ph[name]["img_per_s"] == pytest.approx(n / ph[name]["seconds"], rel=1e-9)
    assert ph["pca_full_width"]["dim_in"] == ph["eigh"]["dim"] == rep["used"]["feature_dim"] == 128
    assert ph["pca_full_width"]["rows"] == 129  # max(n, d + 1): the d x d scatter path

    # the folder: <data>/train/<wnid>/*.JPEG, n files, sizes as the manifest says
    files = sorted((data / "train").glob("n*/*.JPEG"))
    assert len(files) == n
    manifest = json.loads((data / "manifest.json").read_text())
    sizes = {rel: (w, h, nbytes) for rel, w, h, nbytes in manifest["files"]}
    for f in files:
        w, h, nbytes = sizes[str(f.relative_to(data))]
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (w, h)
        assert 300 <= min(w, h) and max(w, h) <= 640  # ImageNet-like
        assert f.stat().st_size == nbytes
    mean_bytes = sum(f.stat().st_size for f in files) / n
    assert rep["folder"]["mean_bytes"] == pytest.approx(mean_bytes)
    assert 60_000 < mean_bytes < 200_000  # ImageNet's JPEGs average ~110 KB

    # the projection, recomputed from the reported phases
    N, k = 1_281_167, rep["settings"]["k"]
    km = ph["kmeans_imagenet_shape"]
    assert km["rows"] == 1024 and km["k"] == 2  # ImageNet's N / k points per cluster, >= 2
    pca_fixed = ph["eigh"]["seconds"]
    pca_row = max(ph["pca_full_width"]["seconds"] - pca_fixed, 0) / ph["pca_full_width"]["rows"]
    want = {"extract": N / ph["extract"]["img_per_s"], "pca": pca_fixed + pca_row * N,
            "kmeans": km["seconds"] * N / km["rows"] * k / km["k"],
            "train": N / ph["train"]["img_per_s"]}
    want["total"] = sum(want.values())
    proj = rep["projection"]
    assert proj["images"] == N and set(proj["seconds"]) == set(want)
    for key, value in want.items():
        assert proj["seconds"][key] == pytest.approx(value, rel=1e-9), key
    assert proj["vs_target_epoch"] == pytest.approx(want["total"] / 180, rel=1e-9)
    assert proj["vs_p100_epoch"] == pytest.approx(want["total"] / (12 * 86_400 / 500), rel=1e-9)
    r = rep["ratios"]
    assert r["vs_model"]["train_vs_train_step"] == pytest.approx(
        ph["train"]["img_per_s"] / ph["train_step"]["img_per_s"], rel=1e-9)
    assert r["vs_h200"]["train"] == pytest.approx(ph["train"]["img_per_s"] / 20_002, rel=1e-9)

    # a second build of the same settings reuses the folder untouched
    spec = importlib.util.spec_from_file_location("bench_epoch", REPO / "benchmarks/epoch.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_epoch"] = mod
    spec.loader.exec_module(mod)
    mtime = files[0].stat().st_mtime_ns
    settings = mod.replace(mod.Settings(), **mod.SMOKE)
    assert mod.build_folder(data, settings) == manifest
    assert files[0].stat().st_mtime_ns == mtime


def _load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _record(task, column, value, label, sha, selection="best_epoch", variant="10crop"):
    return {"task": task, "column": column, "value": value, "selection": selection,
            "variant": variant, "checkpoint": {"label": label, "sha256": sha}}


def test_demo_seeds_table_lists_every_seed_with_mean_std_and_random(tmp_path):
    """Hand-computed: conv3 of seeds 0/1/2 = 80/82/84 -> 82.0 +- 2.0 (sample std), Random 75
    -> +7.0; last-epoch and centre-crop records are not the paper's numbers and are ignored."""
    ds = _load_bench("demo_seeds")
    results = tmp_path / "results"
    for name, recs in {"a": [_record("linear", "imagenet/conv3", 80.0, "x", "s0"),
                             _record("linear", "imagenet/conv3", 99.0, "x", "s0",
                                     selection="last_epoch")],
                       "b": [_record("linear", "imagenet/conv3", 82.0, "y", "s1")],
                       "c": [_record("linear", "imagenet/conv3", 84.0, "z", "s2"),
                             _record("linear", "imagenet/conv3", 1.0, "z", "s2", variant="center")],
                       "r": [_record("linear", "imagenet/conv3", 75.0, "Random (alexnet)", "r"),
                             _record("retrieval", "oxford5k", 50.0, "Random (alexnet)", "r",
                                     selection="final", variant=None)]}.items():
        (results / name).mkdir(parents=True)
        (results / name / "cell.json").write_text(json.dumps({"records": recs}))
    md, summary = ds.table(ds.values(results), {0: "s0", 1: "s1", 2: "s2"})
    assert summary["mean"]["IN conv3"] == pytest.approx(82.0)
    assert summary["std"]["IN conv3"] == pytest.approx(2.0)
    assert summary["delta"]["IN conv3"] == pytest.approx(7.0)
    assert summary["random"]["Oxford5K"] == 50.0 and "Oxford5K" not in summary["mean"]
    rows = {line.split("|")[1].strip(): line for line in md.splitlines()[2:]}
    assert set(rows) == {"seed 0", "seed 1", "seed 2", "mean ± std", "Random", "mean − Random"}
    assert "82.0 ± 2.0" in rows["mean ± std"] and "+7.0" in rows["mean − Random"]


def test_demo_seeds_refuses_a_results_folder_with_two_recipes_of_one_cell(tmp_path):
    """A suite whose probe recipe changed leaves the old cell's file beside the new one: the
    table must not take whichever file sorts last; one error names both files."""
    ds = _load_bench("demo_seeds")
    results = tmp_path / "results"
    for cell, value in (("linear-imagenet-s0-aaaa", 80.0), ("linear-imagenet-s0-bbbb", 83.0)):
        (results / "ck").mkdir(parents=True, exist_ok=True)
        (results / "ck" / f"{cell}.json").write_text(
            json.dumps({"records": [_record("linear", "imagenet/conv3", value, "x", "s0")]}))
    with pytest.raises(ds.UserError, match="linear-imagenet-s0-aaaa.json.*"
                                           "linear-imagenet-s0-bbbb.json.*fresh --out"):
        ds.values(results)
    (results / "ck" / "linear-imagenet-s0-aaaa.json").unlink()
    assert ds.values(results) == {"s0": {"IN conv3": 83.0}}


def test_demo_profile_sums_what_the_demo_logged(tmp_path):
    """Per-phase seconds summed over epochs, cell seconds per kind, the evaluation's wall span
    from the records' own start / end times (two cells that overlapped: 100 s, not 150)."""
    dp = _load_bench("demo_profile")
    (tmp_path / "pretrain").mkdir()
    rows = [{"epoch": e, "seconds": {"features": 10.0, "train": 30.0 + e},
             "img_per_s": {"features": 1000.0, "train": 300.0 + 100 * e}} for e in (0, 1)]
    (tmp_path / "pretrain" / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for name, mode, start, end, secs in (("a", "all", "00:00:00", "00:01:00", 60.0),
                                         ("b", None, "00:00:10", "00:01:40", 90.0)):
        rec = {"task": "voc_classification", "config": {"mode": mode} if mode else {},
               "seconds": secs, "started": f"2026-01-01T{start}+00:00",
               "ended": f"2026-01-01T{end}+00:00"}
        (tmp_path / "results" / name).mkdir(parents=True)
        (tmp_path / "results" / name / "c.json").write_text(json.dumps({"records": [rec]}))
    pre = dp.pretraining(tmp_path / "pretrain" / "log.jsonl")
    assert pre["epochs"] == 2 and pre["seconds"] == {"features": 20.0, "train": 61.0}
    assert pre["img_per_s"] == {"features": 1000.0, "train": 350.0}
    ev = dp.cells(tmp_path / "results")
    assert ev["by_kind"] == {"voc_classification": {"cells": 1, "seconds": 90.0},
                             "voc_classification/all": {"cells": 1, "seconds": 60.0}}
    assert ev["cell_seconds"] == 150.0 and ev["wall_seconds"] == 100.0
    assert dp.main(["--demo", str(tmp_path), "--no-measure", "--out", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["evaluation"]["wall_seconds"] == 100.0
    assert dp.main(["--demo", str(tmp_path / "missing"), "--no-measure"]) == 2
