"""run_all end to end on the embedded suite (tiny schedule): records, skipping, SIGKILL
recovery, the released checkpoint format, and one clear error per bad input."""
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

from evaluations import records
from pretrain.checkpoint import atomic_torch_save, released_payload
from pretrain.models import AlexNet

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
[[cell]]
task = "linear"
datasets = ["imagenet", "places"]
seeds = [0, 1]
[cell.config]
epochs = 1
batch_size = 16
input_size = 32
resize_size = 36
workers = 0
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A released-format checkpoint (features.module.*, no optimizer), suites and a cache."""
    root = tmp_path_factory.mktemp("runall")
    torch.manual_seed(0)
    net = AlexNet(sobel=True, fc_dim=64, k=7)
    payload = released_payload(net, epoch=3)
    assert "optimizer" not in payload and "features.module.0.weight" in payload["state_dict"]
    ckpt = root / "released.pth"
    atomic_torch_save(payload, ckpt)
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
    return sorted(p for p in results.glob("*/*.json") if not p.name.endswith(".failed.json"))


def test_records_then_second_run_skips_everything(env, tmp_path):
    results = tmp_path / "res"
    first = run_all(env, "--suite", str(env["root"] / "tiny.toml"), "--executor", "debug",
                    results=results)
    assert first.returncode == 0, first.stderr[-3000:]
    files = cell_files(results)
    assert len(files) == 4  # 2 datasets x 2 seeds
    recs = [r for f in files for r in records.read_results_file(f)["records"]]
    # 5 layers x (best, last) x (10crop, center) per cell
    assert len(recs) == 4 * 20
    r = recs[0]
    assert r["checkpoint"]["sha256"] and r["checkpoint"]["arch"] == "alexnet"
    assert r["checkpoint"]["epoch"] == 3 and r["checkpoint"]["k"] == 7
    assert r["protocol"] == "dc2018" and r["table"] == "table1"
    assert {x["column"] for x in recs} == {f"{d}/conv{i}" for d in ("imagenet", "places")
                                           for i in range(1, 6)}
    assert {x["dataset_name"] for x in recs} == {"embedded/fashion-mnist", "embedded/sklearn-digits"}
    assert {x["selection"] for x in recs} == {"best_epoch", "last_epoch"}
    assert all(0.0 <= x["value"] <= 100.0 for x in recs)
    assert r["config"]["epochs"] == 1 and r["config_hash"]
    assert r["env"]["torch"] == torch.__version__

    mtimes = {f: f.stat().st_mtime_ns for f in files}
    t0 = time.perf_counter()
    second = run_all(env, "--suite", str(env["root"] / "tiny.toml"), "--executor", "local",
                     results=results)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "0 done, 4 skipped" in second.stdout
    assert {f: f.stat().st_mtime_ns for f in cell_files(results)} == mtimes
    assert not (results / "_logs").exists()  # nothing was submitted
    assert time.perf_counter() - t0 < 120  # generous: "seconds", never a tight timing


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
    assert not cell_files(results) if results.exists() else True


def test_dry_run_prints_matrix_and_resources(env, tmp_path):
    p = run_all(env, "--suite", str(env["root"] / "tiny.toml"), "--dry-run", "--executor",
                "local", results=tmp_path / "res")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "4 cell(s) to run" in p.stdout and "cpus=1 mem=2G time=10min" in p.stdout
    assert not cell_files(tmp_path / "res")


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
    assert len(cell_files(results)) == 2  # the places cells
