"""run_all end to end on the embedded suite (tiny schedule): records, skipping (also across
runtime settings), SIGKILL recovery, the released checkpoint format as published, schema-1
results folders, several checkpoints and labels, --datasets files, and one clear error per
bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import load_fixture_module
from evaluations import records

lc = load_fixture_module("legacy_checkpoints.py", "legacy_checkpoints_fixture")

REPO = Path(__file__).resolve().parent.parent
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
pytestmark = pytest.mark.skipif(not FMNIST.exists(),
                                reason="apt-get install dataset-fashion-mnist")

TINY_SUITE = """
name = "tiny"
random_baseline = {random}
[datasets]
imagenet = "embedded"
places = "embedded"
[embedded]
n_train_per_class = 4
n_val_per_class = 2
[resources]
cpus_per_task = 1
mem_gb = 2
timeout_min = 10
[runtime]
workers = 0
[[cell]]
task = "linear"
datasets = ["imagenet", "places"]
seeds = [0, 1]
[cell.config]
epochs = 1
batch_size = 16
input_size = 32
resize_size = 36
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A checkpoint as the authors released theirs (legacy serialization, Python 2 strings,
    features.module.*, no optimizer, no num_batches_tracked), suites and a cache."""
    root = tmp_path_factory.mktemp("runall")
    ckpt = root / "released.pth"
    lc.write_released_checkpoint(ckpt, "alexnet", fc_dim=64, k=7, seed=0)
    (root / "tiny.toml").write_text(TINY_SUITE.format(random="false"))
    (root / "tiny_random.toml").write_text(TINY_SUITE.format(random="true"))
    return {"root": root, "ckpt": ckpt, "cache": root / "cache"}


def run_all(env, *args, results=None, extra_env=None, timeout=600):
    cmd = [sys.executable, "-m", "evaluations.run_all", "--ckpt", str(env["ckpt"]),
           "--cache", str(env["cache"]), "--results", str(results or env["root"] / "results"),
           *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(extra_env or {})})


def cell_files(results: Path) -> list[Path]:
    return [p for p in records.iter_results_files(results) if not p.name.endswith(".failed.json")]


def test_records_then_second_run_skips_everything(env, tmp_path):
    results = tmp_path / "res"
    first = run_all(env, "--suite", str(env["root"] / "tiny.toml"), "--executor", "debug",
                    results=results)
    assert first.returncode == 0, first.stderr[-3000:]
    files = cell_files(results)
    assert len(files) == 4  # 2 datasets x 2 seeds
    recs = [r for f in files for r in records.read_results_file(f).records]
    # 5 layers x (best, last) x (10crop, center) per cell
    assert len(recs) == 4 * 20
    r = recs[0]
    assert r.checkpoint["sha256"] and r.checkpoint["arch"] == "alexnet"
    assert r.checkpoint["epoch"] == 500 and r.checkpoint["k"] == 7
    assert r.protocol == "dc2018" and r.table == "table1"
    assert {x.column for x in recs} == {f"{d}/conv{i}" for d in ("imagenet", "places")
                                        for i in range(1, 6)}
    assert {x.dataset_name for x in recs} == {"embedded/fashion-mnist", "embedded/sklearn-digits"}
    assert {x.selection for x in recs} == {"best_epoch", "last_epoch"}
    assert all(0.0 <= x.value <= 100.0 for x in recs)
    assert r.config["epochs"] == 1 and r.config_hash
    assert "workers" not in r.config and "device" not in r.config  # the recipe only
    assert r.env["torch"] == torch.__version__ and r.env["runtime"]["workers"] == 0
    assert r.details["data"]["classes"] == 10 and r.details["head_info"]["dims"] > 0

    mtimes = {f: f.stat().st_mtime_ns for f in files}
    # other runtime settings (workers, device) are not the protocol: nothing is submitted
    for runtime in ([], ["--workers", "3"], ["--workers", "1", "--device", "cpu"]):
        again = run_all(env, "--suite", str(env["root"] / "tiny.toml"), "--executor", "local",
                        *runtime, results=results)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "0 done, 4 skipped" in again.stdout, (runtime, again.stdout)
        assert {f: f.stat().st_mtime_ns for f in cell_files(results)} == mtimes
        assert not (results / "_logs").exists()  # nothing was submitted
    # a recipe change is a new cell
    changed = env["root"] / "tiny_epochs2.toml"
    changed.write_text((env["root"] / "tiny.toml").read_text().replace("epochs = 1", "epochs = 2"))
    dry = run_all(env, "--suite", str(changed), "--dry-run", "--executor", "local",
                  results=results)
    assert "4 cell(s) to run, 0 already done" in dry.stdout


def test_sigkill_midway_then_rerun_finishes_only_missing(env, tmp_path):
    results = tmp_path / "res"
    cmd = [sys.executable, "-m", "evaluations.run_all", "--ckpt", str(env["ckpt"]), "--cache",
           str(env["cache"]), "--results", str(results), "--suite",
           str(env["root"] / "tiny_random.toml"), "--executor", "debug"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(cell_files(results)) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = cell_files(results)
    assert 2 <= len(finished) < 8, "the kill should land mid-way"
    for f in finished:  # every record file that exists is whole
        records.read_results_file(f)
    rerun = run_all(env, "--suite", str(env["root"] / "tiny_random.toml"), "--executor", "debug",
                    results=results)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{8 - len(finished)} done, {len(finished)} skipped" in rerun.stdout
    assert len(cell_files(results)) == 8
    assert not list(results.glob("*/.*.tmp"))


@pytest.mark.parametrize("case", ["missing_root", "wrong_layout", "unknown_task", "truncated",
                                  "foreign", "no_sbatch", "bad_suite"])
def test_bad_inputs_one_clear_error(env, tmp_path, case):
    results = tmp_path / "res"
    args = ["--suite", "paper", "--executor", "debug"]
    extra_env = None
    expect = None
    ckpt = env["ckpt"]
    if case == "missing_root":
        args += ["--data-root", f"imagenet={tmp_path / 'nope'}", "--data-root",
                 f"places={tmp_path / 'nope'}"]
        expect = str(tmp_path / "nope")
    elif case == "wrong_layout":
        (tmp_path / "empty").mkdir()
        args += ["--data-root", f"imagenet={tmp_path / 'empty'}", "--data-root",
                 f"places={tmp_path / 'empty'}"]
        expect = str(tmp_path / "empty")
    elif case == "unknown_task":
        args += ["--tasks", "segmentation_typo"]
        expect = "unknown task"
    elif case == "truncated":
        ckpt = tmp_path / "trunc.pth"
        ckpt.write_bytes(env["ckpt"].read_bytes()[:5000])
        expect = str(ckpt)
    elif case == "foreign":
        ckpt = tmp_path / "foreign.pth"
        torch.save({"state_dict": {"encoder.weight": torch.zeros(3, 3)}}, ckpt)
        expect = str(ckpt)
    elif case == "no_sbatch":
        args = ["--suite", str(env["root"] / "tiny.toml"), "--executor", "slurm"]
        extra_env = {"PATH": str(Path(sys.executable).parent)}
        expect = "sbatch"
    elif case == "bad_suite":
        args = ["--suite", str(tmp_path / "nosuch.toml")]
        expect = "nosuch.toml"
    cmd = [sys.executable, "-m", "evaluations.run_all", "--ckpt", str(ckpt), "--cache",
           str(env["cache"]), "--results", str(results), *args]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, **(extra_env or {})})
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-2000:])
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, p.stderr
    assert expect in p.stderr
    assert "Traceback" not in p.stderr
    assert not (results.exists() and cell_files(results))


def test_dry_run_prints_matrix_and_resources(env, tmp_path):
    p = run_all(env, "--suite", str(env["root"] / "tiny.toml"), "--dry-run", "--executor",
                "local", results=tmp_path / "res")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "4 cell(s) to run" in p.stdout and "cpus=1 mem=2G time=10min" in p.stdout
    assert not cell_files(tmp_path / "res")


def test_every_task_estimates_its_paper_cells_on_every_role():
    from evaluations.tasks import TASKS, estimate_gpu_hours

    for task in TASKS.values():
        assert set(task.gpu_hours) == set(task.roles), task.name
        for role in task.roles:
            hours = estimate_gpu_hours(task, task.config_cls(), role)
            assert hours == task.gpu_hours[role] and 0.1 < hours < task.resources.timeout_min / 60


GPU_HOURS_SUITE = """
name = "gpu-hours"
[datasets]
imagenet = "embedded"
places = "embedded"
voc07 = "embedded"
[embedded]
n_train_per_class = 4
n_val_per_class = 2
voc_trainval = 24
voc_test = 12
[[cell]]
task = "linear"
datasets = ["places"]
seeds = [0, 1]
[cell.config]
epochs = 45
[[cell]]
task = "fc_retrain"
datasets = ["imagenet"]
[cell.config]
epochs = 45
[[cell]]
task = "voc_classification"
datasets = ["voc07"]
[cell.config]
iterations = 75000
"""


def test_dry_run_estimates_gpu_hours_per_cell_array_and_total(env, tmp_path):
    """Per cell, per array and in all, from the paper's throughput (500 DeepCluster epochs of
    ImageNet's 1,281,167 images in 12 days on a P100, a third of it k-means: two AlexNet
    passes per image) and each recipe's images; and nothing is submitted or written."""
    per_million = 12 * 24 * 2 / 3 / 500 / (2 * 1.281167)  # GPU-h per million 224-px images
    places = 45 * (2.448873 + 10 * 0.0205) * per_million  # half of 90 epochs: 17.90
    imagenet = 45 * (1.281167 + 10 * 0.05) * per_million  # 12.01
    # half the paper cell's 150,000 x 16 crops + 10 x 4,952 test crops (a cell scales whole)
    voc = (150_000 * 16 + 10 * 4952) / 2 / 1e6 * per_million  # 0.18
    assert (round(places, 1), round(imagenet, 1), round(voc, 2)) == (17.9, 12.0, 0.18)
    suite = tmp_path / "hours.toml"
    suite.write_text(GPU_HOURS_SUITE)
    results = tmp_path / "res"
    p = run_all(env, "--suite", str(suite), "--dry-run", "--executor", "local", results=results)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    arrays = [line for line in lines if line.startswith("array of")]
    assert arrays[0].startswith("array of 3 task(s): gpus=1 cpus=10 mem=64G time=4320min")
    assert arrays[0].endswith(f"; ~{2 * places + imagenet:.1f} GPU-h")  # ~47.8
    assert arrays[1].startswith("array of 1 task(s): gpus=1 cpus=10 mem=32G time=1440min")
    assert arrays[1].endswith("; ~0.18 GPU-h")
    cells = [line.split() for line in lines if line.startswith("  ") and "seed=" in line]
    assert [(c[1], c[2], " ".join(c[-2:])) for c in cells] == [
        ("linear", "places", "~17.9 GPU-h"), ("linear", "places", "~17.9 GPU-h"),
        ("fc_retrain", "imagenet", "~12.0 GPU-h"), ("voc_classification", "voc07", "~0.18 GPU-h")]
    assert f"total: ~{2 * places + imagenet + voc:.1f} GPU-h for 4 cell(s) in 2 array(s)" \
        in p.stdout  # ~48.0
    assert "4 of them read embedded data" in p.stdout
    assert not results.exists()  # no _logs, no claims, no records: nothing submitted


def test_failing_cell_is_reported_and_recorded(env, tmp_path):
    """A corrupt image met inside a job: the cell fails, the others still run, the summary names
    the failure and its log, exit code 1, and a .failed.json (never a record) is left."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "imnet"
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1)):
        for c in ("n00000001", "n00000002"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                    root / split / c / f"{c}_{i}.JPEG", format="PNG")
    (root / "val" / "n00000002" / "broken.JPEG").write_bytes(b"not an image at all")
    suite = tmp_path / "s.toml"
    suite.write_text(TINY_SUITE.format(random="false").replace(
        'imagenet = "embedded"', f'imagenet = "{root}"'))
    results = tmp_path / "res"
    p = run_all(env, "--suite", str(suite), "--executor", "local", results=results)
    assert p.returncode == 1, (p.stdout[-2000:], p.stderr[-2000:])
    assert "2 done, 0 skipped" in p.stdout and "2 failed" in p.stdout
    assert "FAILED linear-imagenet" in p.stdout and "broken.JPEG" in p.stdout
    failed = sorted(results.glob("*/*.failed.json"))
    assert len(failed) == 2 and all("imagenet" in f.name for f in failed)
    info = json.loads(failed[0].read_text())
    assert "broken.JPEG" in info["error"] and info["columns"][0] == "imagenet/conv1"
    # the failure names the job's own log, which holds the traceback
    assert info["log"] and Path(info["log"]).is_file(), info["log"]
    assert "broken.JPEG" in Path(info["log"]).read_text()
    assert len(cell_files(results)) == 2  # the places cells


IMAGENET_ONLY = """
name = "one"
[resources]
cpus_per_task = 1
mem_gb = 2
timeout_min = 10
[[cell]]
task = "linear"
datasets = ["imagenet"]
seeds = [0]
[cell.config]
epochs = 2
batch_size = 4
layers = ["conv1", "conv5"]
input_size = 64
resize_size = 72
"""


def tiny_imagenet(root: Path, n_train: int = 3, n_val: int = 2) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in ("n00000001", "n00000002"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(
                    root / split / c / f"{c}_{i}.JPEG", format="JPEG")
    return root


def values(results: Path) -> dict:
    return {(r.checkpoint["label"], r.column, r.selection, r.variant): r.value
            for f in cell_files(results) for r in records.read_results_file(f).records}


def test_workers_change_no_number_and_datasets_file(env, tmp_path):
    """Crops are seeded per draw, so 0 and 2 DataLoader workers give the same numbers; the
    data root comes from a --datasets file (relative to the file's folder)."""
    data = tiny_imagenet(tmp_path / "data" / "imnet")
    (tmp_path / "data" / "roots.toml").write_text('[datasets]\nimagenet = "imnet"\n')
    suite = tmp_path / "one.toml"
    suite.write_text(IMAGENET_ONLY)
    out = {}
    for workers in (0, 2):
        res = tmp_path / f"res{workers}"
        p = run_all(env, "--suite", str(suite), "--datasets", str(tmp_path / "data" / "roots.toml"),
                    "--executor", "debug", "--workers", str(workers), results=res)
        assert p.returncode == 0, p.stderr[-3000:]
        out[workers] = values(res)
        rec = records.read_results_file(cell_files(res)[0]).records[0]
        assert rec.env["runtime"]["workers"] == workers
        assert rec.details["data"] == {"train": 6, "val": 4, "classes": 2,
                                       "train_layout": "imagefolder", "val_layout": "imagefolder"}
    assert len(out[0]) == 8 and out[0] == out[2]
    assert [p.name for p in cell_files(tmp_path / "res0")] == [
        p.name for p in cell_files(tmp_path / "res2")]  # one key whatever the workers
    assert data.is_dir()


def test_several_checkpoints_with_labels(env, tmp_path):
    other = tmp_path / "other.pth"
    lc.write_released_checkpoint(other, "alexnet", fc_dim=64, k=7, seed=5)
    data = tiny_imagenet(tmp_path / "imnet")
    suite = tmp_path / "one.toml"
    suite.write_text(IMAGENET_ONLY)
    res = tmp_path / "res"
    cmd = [sys.executable, "-m", "evaluations.run_all", "--ckpt", str(env["ckpt"]), "--ckpt",
           str(other), "--label", "released A", "--label", "B (seed 5)", "--suite", str(suite),
           "--data-root", f"imagenet={data}", "--executor", "debug", "--results", str(res),
           "--cache", str(env["cache"]), "--workers", "0"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    by_label = {}
    for f in cell_files(res):
        for r in records.read_results_file(f).records:
            by_label.setdefault(r.checkpoint["label"], set()).add(r.checkpoint["path"])
    assert by_label == {"released A": {str(env["ckpt"])}, "B (seed 5)": {str(other)}}
    assert len({f.parent.name for f in cell_files(res)}) == 2  # one folder per checkpoint


def test_checkpoint_replaced_after_submission_fails_the_cell(env, tmp_path):
    """The worker checks the file's sha256 against the one the cell was keyed by."""
    from evaluations.backbone import describe_checkpoint
    from evaluations.suites import build_cells, parse_suite
    from evaluations.worker import run_cell
    import tomllib

    ckpt = tmp_path / "moving.pth"
    lc.write_released_checkpoint(ckpt, "alexnet", fc_dim=64, k=7, seed=3)
    data = tiny_imagenet(tmp_path / "imnet")
    suite = parse_suite(tomllib.loads(IMAGENET_ONLY), "one.toml")
    cell, = build_cells(suite, [describe_checkpoint(ckpt)], {"imagenet": data},
                        {"imagenet": "imagenet"}, {}, {"workers": 0}, tmp_path / "res")
    lc.write_released_checkpoint(ckpt, "alexnet", fc_dim=64, k=7, seed=4)  # replaced
    with pytest.raises(Exception, match="changed since the job was submitted"):
        run_cell(cell)
    failure = records.read_results_file(records.failure_path(tmp_path / "res",
                                                             cell.checkpoint.id, cell.key))
    assert "changed since the job was submitted" in failure.error
    assert failure.columns == ("imagenet/conv1", "imagenet/conv5")
    assert not cell_files(tmp_path / "res")


def test_old_style_suite_runtime_in_config_is_moved_with_a_warning(caplog):
    import logging
    import tomllib

    from evaluations.suites import parse_suite

    old = tomllib.loads(IMAGENET_ONLY.replace("epochs = 2", "epochs = 2\nworkers = 4"))
    with caplog.at_level(logging.WARNING):
        suite = parse_suite(old, "old.toml")
    assert "workers" in caplog.text and "[cell.runtime]" in caplog.text
    assert suite.cells[0].runtime == {"workers": 4} and "workers" not in suite.cells[0].config


LEGACY = load_fixture_module("legacy_results/inputs.py", "legacy_results_inputs")


def test_results_written_before_the_split_are_found_not_recomputed(env, tmp_path):
    """results_v1/ was written by run_all at commit e78a969 (schema 1: workers and device in
    the config and the key). Rerun with today's suite style and other runtime settings: its
    cells are migrated, nothing is submitted, the numbers are kept and render."""
    import shutil

    data, ckpt = LEGACY.build_inputs()
    v1 = LEGACY.HERE / "results_v1"
    old_files = sorted(p.relative_to(v1) for p in v1.rglob("*.json"))
    sha = old_files[0].parts[0].rsplit("-", 1)[1]
    assert records.read_results_file(v1 / old_files[0]).records[0].checkpoint[
        "sha256"].startswith(sha)
    from dcbench.core import file_sha256
    assert file_sha256(ckpt).startswith(sha), "the fixture checkpoint's bytes changed"
    res = tmp_path / "results"
    shutil.copytree(v1, res)
    old_values = values(res)
    suite = tmp_path / "today.toml"
    suite.write_text((LEGACY.HERE / "suite_v1.toml").read_text().replace("workers = 0\n", "")
                     + "\n[runtime]\nworkers = 2\n")
    p = subprocess.run([sys.executable, "-m", "evaluations.run_all", "--ckpt", str(ckpt),
                        "--label", "released (fixture)", "--suite", str(suite), "--data-root",
                        f"imagenet={data}", "--executor", "debug", "--results", str(res),
                        "--cache", str(env["cache"])],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "0 done, 2 skipped" in p.stdout, p.stdout
    new_files = cell_files(res)
    assert len(new_files) == 2 and not {f.name for f in new_files} & {f.name for f in old_files}
    assert values(res) == old_values
    for f in new_files:
        cell = records.read_results_file(f)
        assert cell.schema == records.CELL_SCHEMA and cell.cell_key == f.stem
        for r in cell.records:
            assert "workers" not in r.config and r.env["runtime"] == {"workers": 0,
                                                                      "device": "auto"}
            assert r.details["migrated_from"] in {x.stem for x in old_files}
    again = subprocess.run([sys.executable, "-m", "evaluations.run_all", "--ckpt", str(ckpt),
                            "--suite", str(suite), "--data-root", f"imagenet={data}",
                            "--executor", "debug", "--results", str(res), "--dry-run"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert "0 cell(s) to run, 2 already done" in again.stdout
    out = tmp_path / "tables"
    r = subprocess.run([sys.executable, "tables/render.py", "--results", str(res), "--out",
                        str(out), "--format", "md", "--no-figures", "-q"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_demo_suite_on_a_released_checkpoint_as_published(env, tmp_path):
    """`run_all --suite demo` on an AlexNet file as the authors released theirs."""
    res = tmp_path / "res"
    p = run_all(env, "--suite", "demo", "--executor", "local", "--no-random-baseline",
                results=res, timeout=1500)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "13 done, 0 skipped" in p.stdout
    cols = {r.column for f in cell_files(res) for r in records.read_results_file(f).records}
    assert cols == {*(f"{d}/conv{i}" for d in ("imagenet", "places") for i in range(1, 6)),
                    "imagenet/acc1", *(f"{t}/{m}" for t in ("classification", "detection",
                                                            "segmentation")
                                       for m in ("fc6-8", "all")),
                    "oxford5k", "paris6k",
                    *(f"{d}/{s}" for d in ("roxford5k", "rparis6k") for s in "EMH")}
