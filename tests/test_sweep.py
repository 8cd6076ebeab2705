"""The k ablation as one command (``python -m pretrain.sweep``): a real sweep on the embedded
data (pretraining array, VOC07 fc6-8 cells, Fig. 2c), a rerun that submits nothing, inputs
refused before anything is submitted, and what is reused or continued in a sweep folder."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from dcbench.core import UserError
from pretrain import sweep
from pretrain.checkpoint import FORMAT
from pretrain.config import PretrainConfig, preset_config

REPO = Path(__file__).resolve().parent.parent
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(),
                                  reason="apt-get install dataset-fashion-mnist")

# the demo suite's VOC07 fc6-8 cell, scaled down: 80 embedded trainval images (40 train,
# 40 val: the larger half of trainval is train), 40 iterations, 2 test crops
TINY_SUITE = """
name = "k_ablation_tiny"
random_baseline = false
[datasets]
voc07 = "embedded"
[embedded]
voc_trainval = 80
voc_test = 2
voc_size = 96
[runtime]
workers = 0
[resources]
gpus_per_node = 0
cpus_per_task = 2
mem_gb = 4
timeout_min = 30
[[cell]]
task = "voc_classification"
datasets = ["voc07"]
[cell.config]
mode = "fc6-8"
iterations = 40
batch_size = 8
lr = 0.01
lr_step = 20
test_crops = 2
input_size = 64
train_split = "train"
test_split = "val"
"""
TINY_RUN = ["--preset", "demo", "--subset", "300", "--epochs", "1", "--fc-dim", "64",
            "--pca-dim", "16"]


def _sweep(tmp_path: Path, *ks: int) -> subprocess.CompletedProcess:
    suite = tmp_path / "suite.toml"
    suite.write_text(TINY_SUITE)
    cmd = [sys.executable, "-m", "pretrain.sweep", "--k", *map(str, ks), *TINY_RUN,
           "--out", str(tmp_path / "sweep"), "--suite", str(suite),
           "--cache", str(tmp_path / "cache")]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


def _job_folders(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.isdigit()} if folder.is_dir() else set()


@pytest.mark.slow
@needs_fmnist
def test_a_sweep_pretrains_evaluates_and_plots_every_k_and_a_rerun_submits_nothing(tmp_path):
    from tables.collate import load_results
    from tables.figures import k_ablation_data

    p = _sweep(tmp_path, 20, 5)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    out = tmp_path / "sweep"
    for k in (5, 20):  # one finished run per k, in its own folder, trained with that k
        ck = torch.load(out / f"k{k}" / "checkpoint.pth", map_location="cpu", weights_only=True)
        assert (ck["epoch"], ck["k"], ck["config"]["subset"]) == (1, k, 300)
        assert ck["state_dict"]["top_layer.weight"].shape[0] == k  # the k-way head of that k
    assert len(_job_folders(out / "_logs")) == 2  # one pretraining job per k
    records = [json.loads(f.read_text())["records"]
               for f in (out / "results").glob("*/voc_classification-*.json")]
    assert len(records) == 2 and all(len(r) == 1 for r in records)  # one cell per k
    by_k = {}
    for (r,) in records:
        folder_k = int(Path(r["checkpoint"]["path"]).parent.name[1:])  # .../k<K>/checkpoint.pth
        assert r["checkpoint"]["k"] == folder_k
        assert r["checkpoint"]["label"] == f"DeepCluster k={folder_k}"
        assert (r["table"], r["column"], r["metric"]) == ("voc", "classification/fc6-8", "mAP")
        assert r["details"]["data"] == {"train": 40, "test": 40, "train_split": "train",
                                        "test_split": "val"}
        by_k[folder_k] = r["value"]
    assert sorted(by_k) == [5, 20] and all(0 < v <= 100 for v in by_k.values())
    figures = out / "tables" / "figures"
    for name in ("k_ablation.png", "k_ablation.pdf"):
        assert (figures / name).stat().st_size > 1000
    assert (figures / "k_ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ylabel, stats = k_ablation_data(load_results(out / "results"))  # what the figure plots
    assert "VOC07" in ylabel and set(stats["column"]) == {"classification/fc6-8"}
    assert sorted(stats["ckpt_k"]) == [5, 20]
    assert dict(zip(stats["ckpt_k"], stats["mean"])) == pytest.approx(by_k)
    assert all(f"| {k} | {v:.1f} |" in p.stdout for k, v in by_k.items())
    assert str(figures / "k_ablation.png") in p.stdout

    jobs = _job_folders(out / "_logs"), _job_folders(out / "results" / "_logs")
    again = _sweep(tmp_path, 5, 20)
    assert again.returncode == 0, (again.stdout[-3000:], again.stderr[-3000:])
    assert (_job_folders(out / "_logs"), _job_folders(out / "results" / "_logs")) == jobs
    assert "nothing to submit" in again.stdout
    assert "0 done, 2 skipped (record exists)" in again.stdout


# ------------------------------------------------------------------ refused before submitting


@needs_fmnist
def test_k_larger_than_the_number_of_images_is_refused_before_anything_is_submitted(
        tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = sweep.main(["--k", "5", "301", "1000", "--preset", "demo", "--subset", "300",
                     "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "--k 301, 1000" in err and "N=300" in err and "--subset" in err
    assert not out.exists()  # no run folder, no job folder


@pytest.mark.parametrize("ks,needle", [
    (["0", "10"], "every k must be >= 2"),
    (["1"], "every k must be >= 2"),
    (["10", "30", "10"], "k = 10 more than once"),
])
def test_a_bad_k_list_is_one_clear_error(tmp_path, capsys, ks, needle):
    out = tmp_path / "sweep"
    rc = sweep.main(["--k", *ks, "--preset", "demo", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and needle in err
    assert f"--k {' '.join(ks)}" in err
    assert not out.exists()


def test_the_paper_suite_without_a_voc07_root_is_refused_before_pretraining(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = sweep.main(["--k", "10", "30", "--preset", "demo", "--suite", "k_ablation",
                     "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "'voc07'" in err and "--data-root voc07=PATH" in err
    assert not out.exists()


# ------------------------------------------------------------------ configs and the sweep folder


def test_per_k_configs_differ_only_in_k_and_take_every_flag(tmp_path):
    args = sweep.build_parser().parse_args(
        ["--k", "10", "30", "100", "--preset", "demo", "--out", str(tmp_path), "--epochs", "4",
         "--subset", "5000", "--seed", "7", "--no-sobel"])
    cfgs = sweep.k_configs("demo", sweep.check_ks(args.k), sweep.pretrain_overrides(args))
    assert list(cfgs) == [10, 30, 100] and [c.k for c in cfgs.values()] == [10, 30, 100]
    names = [f.name for f in fields(PretrainConfig)]
    for a in cfgs.values():
        for b in cfgs.values():
            assert {n for n in names if getattr(a, n) != getattr(b, n)} <= {"k"}
    for c in cfgs.values():  # the flags, then the demo preset (README), the same for every k
        assert (c.epochs, c.subset, c.seed, c.sobel) == (4, 5000, 7, False)
        assert (c.dataset, c.fc_dim, c.pca_dim, c.batch_size, c.input_size) == \
            ("fashion-clutter", 1024, 64, 64, 64)
        assert c.lr == c.head_lr == pytest.approx(0.05 * 64 / 256)  # the paper's rule
    assert sweep.default_suite("demo") == "k_ablation_demo"
    assert sweep.default_suite("paper") == "k_ablation"


def test_the_builtin_k_ablation_suites_are_voc07_fc6_8_train_to_val():
    from evaluations.suites import load_suite
    from evaluations.tasks import get_task, resolve_config

    for name in ("k_ablation", "k_ablation_demo"):
        suite = load_suite(name)
        (cell,) = suite.cells
        cfg = resolve_config(get_task(cell.task), cell.config)
        assert (cell.task, cell.datasets, cfg.mode) == ("voc_classification", ("voc07",), "fc6-8")
        assert (cfg.train_split, cfg.test_split) == ("train", "val")
        assert not suite.random_baseline
    paper = resolve_config(get_task("voc_classification"), load_suite("k_ablation").cells[0].config)
    assert (paper.iterations, paper.batch_size, paper.base_lr) == (150_000, 16, 0.003)
    demo = resolve_config(get_task("voc_classification"),
                          load_suite("k_ablation_demo").cells[0].config)
    assert (demo.iterations, demo.step, demo.input_size) == (500, 200, 64)  # the demo's cell
    assert load_suite("k_ablation_demo").datasets == {"voc07": "embedded"}


def _fake_run(folder: Path, cfg: PretrainConfig, epoch: int) -> None:
    folder.mkdir(parents=True)
    torch.save({"format": FORMAT, "epoch": epoch, "config": cfg.to_dict(), "k": cfg.k,
                "state_dict": {"x": torch.zeros(1)}}, folder / "checkpoint.pth")


def test_finished_runs_are_kept_partial_ones_continue_foreign_ones_are_refused(tmp_path):
    cfgs = sweep.k_configs("demo", [10, 30, 100], {"epochs": 4, "subset": 500})
    _fake_run(tmp_path / "k10", cfgs[10], 2)
    _fake_run(tmp_path / "k30", cfgs[30], 4)
    runs = sweep.plan(cfgs, tmp_path)
    assert [(r.k, r.out.name, r.trained, r.finished) for r in runs] == \
        [(10, "k10", 2, False), (30, "k30", 4, True), (100, "k100", 0, False)]
    assert "continues from epoch 2 of 4" in runs[0].describe()
    # more epochs asked for: the finished run continues too
    longer = sweep.k_configs("demo", [10, 30, 100], {"epochs": 6, "subset": 500})
    assert [r.finished for r in sweep.plan(longer, tmp_path)] == [False, False, False]
    # the same run folders with other settings, or fewer epochs than a run holds: refused
    other = sweep.k_configs("demo", [10, 30, 100], {"epochs": 4, "subset": 600})
    with pytest.raises(UserError, match=r"k10 holds a run of k=10 with other settings: "
                                        r"subset \(run 500, now 600\)"):
        sweep.plan(other, tmp_path)
    shorter = sweep.k_configs("demo", [30], {"epochs": 3, "subset": 500})
    with pytest.raises(UserError, match="holds a run of 4 epochs, more than --epochs 3"):
        sweep.plan(shorter, tmp_path)
    (tmp_path / "k100").mkdir()
    torch.save({"state_dict": {"x": torch.zeros(1)}}, tmp_path / "k100" / "checkpoint.pth")
    with pytest.raises(UserError, match="not a pretraining run of this suite"):
        sweep.plan(cfgs, tmp_path)


def test_run_all_gets_every_checkpoint_with_its_label_and_the_pass_through_flags(tmp_path):
    cfgs = sweep.k_configs("demo", [10, 30], {})
    runs = sweep.plan(cfgs, tmp_path)
    ev = sweep.EvalPlan("k_ablation", "slurm", tmp_path / "r", ("voc07=/data/voc",),
                        "d.toml", None, "gpu", 4)
    assert sweep.run_all_argv(runs, ev) == [
        "--suite", "k_ablation", "--executor", "slurm", "--results", str(tmp_path / "r"),
        "--no-random-baseline",
        "--ckpt", str(tmp_path / "k10" / "checkpoint.pth"), "--label", "DeepCluster k=10",
        "--ckpt", str(tmp_path / "k30" / "checkpoint.pth"), "--label", "DeepCluster k=30",
        "--data-root", "voc07=/data/voc", "--datasets", "d.toml", "--partition", "gpu",
        "--array-parallelism", "4"]


def test_a_setting_newer_than_a_run_counts_as_its_default():
    cfg = preset_config("demo", k=10)
    saved = {k: v for k, v in cfg.to_dict().items() if k != "sampler"}  # as if written before
    assert sweep.setting_differences(saved, cfg) == {}  # sampler's default: the demo's uniform
    assert sweep.setting_differences(saved, preset_config("demo", k=10, sampler="released")) \
        == {"sampler": ("uniform", "released")}
