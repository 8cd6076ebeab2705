"""The benchmark runner works end to end at small sizes and reports consistent numbers
(never asserted on time: only on what the numbers must satisfy whatever the machine)."""
from __future__ import annotations

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
    tab = res["bench_tables"]
    assert tab["records"] == 500 and tab["files"] == 100  # 5 records per cell file
    assert tab["records_per_s"] == pytest.approx(
        500 / (tab["load_s"] + tab["collate_s"] + tab["render_s"]), rel=1e-6)
