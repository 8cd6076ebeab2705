"""run_all through a REAL single-node SLURM: cells become one array; records carry job ids."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_fixture_module
from evaluations import records
from slurm.local_cluster import INSTALL_HINT, LocalSlurm

REPO = Path(__file__).resolve().parent.parent
SUITE = """
name = "tiny-slurm"
[datasets]
places = "embedded"
[embedded]
n_train_per_class = 3
n_val_per_class = 1
[resources]
gpus_per_node = {gpus}
cpus_per_task = 1
mem_gb = 1
timeout_min = 10
[runtime]
workers = 0
[[cell]]
task = "linear"
datasets = ["places"]
seeds = [0, 1]
[cell.config]
epochs = 1
batch_size = 16
input_size = 64
resize_size = 72
"""

pytestmark = [pytest.mark.slurm, pytest.mark.skipif(
    not LocalSlurm.available() or not Path("/usr/share/datasets/fashion-mnist").exists(),
    reason=f"needs {INSTALL_HINT} and dataset-fashion-mnist")]


def test_run_all_submits_an_array_to_slurm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runall_slurm")
    ckpt = tmp / "released.pth"
    load_fixture_module("legacy_checkpoints.py", "legacy_checkpoints_fixture"
                        ).write_released_checkpoint(ckpt, "alexnet", fc_dim=64, k=None)
    (tmp / "suite.toml").write_text(SUITE.format(gpus=0))
    (tmp / "gpu.toml").write_text(SUITE.format(gpus=1))
    results = tmp / "results"
    with LocalSlurm(tmp_path_factory.mktemp("slurm"), first_job_id=700000) as cluster:
        env = {**os.environ, **cluster.env,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "evaluations.run_all", "--ckpt", str(ckpt), "--suite",
               str(tmp / "suite.toml"), "--executor", "slurm", "--results", str(results),
               "--cache", str(tmp / "cache")]
        dry = subprocess.run(cmd + ["--dry-run"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
        assert dry.returncode == 0, dry.stderr[-2000:]
        assert "array of 2 task(s)" in dry.stdout
        # the tasks' paper resources ask for a GPU, which this node does not have:
        # one clear error, no traceback
        gpu = subprocess.run(cmd + ["--suite", str(tmp / "gpu.toml")], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
        assert gpu.returncode == 2 and "Traceback" not in gpu.stderr, gpu.stderr[-2000:]
        assert "scheduler refused the array of 2 cell(s) (gpus=1" in gpu.stderr
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    assert "2 done, 0 skipped" in p.stdout
    files = sorted(results.glob("*/linear-*.json"))
    assert len(files) == 2
    job_ids = {r.job_id for f in files for r in records.read_results_file(f).records}
    # one array: job ids <array>_<index> with a common array id
    assert len(job_ids) == 2 and len({j.split("_")[0] for j in job_ids}) == 1
    assert all(j.split("_")[0].isdigit() and int(j.split("_")[0]) >= 700000 for j in job_ids)
