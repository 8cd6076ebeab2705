"""run_all through a REAL single-node SLURM: cells become one array; records carry job ids."""
from __future__ import annotations

import json
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


def run_all_command(cluster, tmp: Path, ckpt: Path, results: Path) -> tuple[dict, list]:
    """The environment (this checkout importable by the jobs) and run_all's command line."""
    env = {**os.environ, **cluster.env,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return env, [sys.executable, "-m", "evaluations.run_all", "--ckpt", str(ckpt), "--suite",
                 str(tmp / "suite.toml"), "--executor", "slurm", "--results", str(results),
                 "--cache", str(tmp / "cache")]


def released_and_suite(tmp_path_factory, name: str, suite: str) -> tuple[Path, Path]:
    """A folder holding an authors'-format AlexNet checkpoint and ``suite.toml``."""
    tmp = tmp_path_factory.mktemp(name)
    ckpt = tmp / "released.pth"
    load_fixture_module("legacy_checkpoints.py", "legacy_checkpoints_fixture"
                        ).write_released_checkpoint(ckpt, "alexnet", fc_dim=64, k=None)
    (tmp / "suite.toml").write_text(suite)
    return tmp, ckpt


def test_run_all_submits_an_array_to_slurm(tmp_path_factory):
    tmp, ckpt = released_and_suite(tmp_path_factory, "runall_slurm", SUITE.format(gpus=0))
    (tmp / "gpu.toml").write_text(SUITE.format(gpus=1))
    results = tmp / "results"
    with LocalSlurm(tmp_path_factory.mktemp("slurm"), first_job_id=700000) as cluster:
        env, cmd = run_all_command(cluster, tmp, ckpt, results)
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


def test_arrays_outlive_run_all_and_a_rerun_neither_resubmits_nor_waits(tmp_path_factory):
    """SIGTERM run_all once its array is queued: the jobs go on. A rerun at once sees the cells
    claimed by live SLURM jobs and returns (exit 3) without submitting; once the jobs ended, a
    rerun finds every record."""
    import json
    import signal
    import time

    # 150 epochs (~1 min): the jobs outlast a rerun started on a loaded machine (40 did not
    # under pytest-xdist)
    tmp, ckpt = released_and_suite(tmp_path_factory, "outlive", SUITE.format(gpus=0).replace(
        "epochs = 1", "epochs = 150"))
    results = tmp / "results"
    with LocalSlurm(tmp_path_factory.mktemp("slurm2"), first_job_id=800000) as cluster:
        env, cmd = run_all_command(cluster, tmp, ckpt, results)
        first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)

        def claimed_jobs():
            out = []
            for p in results.glob("*/*.claim"):
                try:
                    out.append(json.loads(p.read_text()).get("job"))
                except (OSError, ValueError):
                    return []
            return [j for j in out if j]

        deadline = time.time() + 300
        while len(claimed_jobs()) < 2 and time.time() < deadline:
            time.sleep(0.2)
        jobs = set(claimed_jobs())
        assert len(jobs) == 2, "the array's job ids should be in the claims"
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
        assert first.returncode == 143, err[-2000:]
        assert "go on as SLURM jobs" in out and "Traceback" not in err
        logs_before = sorted(p.name for p in (results / "_logs").iterdir())
        again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=300)
        # 150 epochs outlast the rerun: the cells are left to their live jobs
        assert again.returncode == 3, again.stdout[-2000:] + again.stderr[-2000:]
        assert "SLURM job" in again.stdout and "0 done" in again.stdout, again.stdout
        assert sorted(p.name for p in (results / "_logs").iterdir()) == logs_before  # no resubmit
        deadline = time.time() + 600
        while subprocess.run(["squeue", "-h"], env=env, capture_output=True,
                             text=True).stdout.strip() and time.time() < deadline:
            time.sleep(1)
        last = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
    assert last.returncode == 0 and "0 done, 2 skipped" in last.stdout, last.stdout
    job_ids = {r.job_id for f in results.glob("*/linear-*.json")
               for r in records.read_results_file(f).records}
    assert {j.split("_")[0] for j in job_ids} == {j.split("_")[0] for j in jobs}
    assert not list(results.glob("*/*.claim"))


REQUEUE_SUITE = """
name = "requeue"
[datasets]
places = "embedded"
[embedded]
n_train_per_class = 40   # 400 images x 60 epochs: ~70 s on one core, past the 45 s signal
n_val_per_class = 2
[resources]
gpus_per_node = 0
cpus_per_task = 1
mem_gb = 1
timeout_min = 1
[runtime]
workers = 0
[[cell]]
task = "linear"
datasets = ["places"]
[cell.config]
epochs = 60
batch_size = 8
input_size = 64
resize_size = 72
layers = ["conv1", "conv5"]
"""


def test_a_probe_cell_past_its_time_limit_is_requeued_by_slurm_and_resumes(tmp_path_factory):
    """A 1-minute limit on a probe that needs longer: SLURM signals the job before the limit,
    submitit requeues it (SLURM's accounting shows REQUEUED), the requeued job resumes at the
    last finished epoch, and the numbers equal an uninterrupted local run's."""
    import json

    tmp, ckpt = released_and_suite(tmp_path_factory, "requeue", REQUEUE_SUITE)
    results = tmp / "results"
    with LocalSlurm(tmp_path_factory.mktemp("slurm3"), first_job_id=900000) as cluster:
        env, cmd = run_all_command(cluster, tmp, ckpt, results)
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
        (f,) = results.glob("*/linear-*.json")
        recs = json.loads(f.read_text())["records"]
        job = recs[0]["job_id"]
        history = load_fixture_module("../test_pretrain_cluster.py", "pretrain_cluster_tests"
                                      ).sacct_history(job, env)
    assert "REQUEUED" in history, history  # its record exists: the requeued run completed
    assert recs[0]["details"]["resumed_at_epoch"] >= 1
    local = tmp / "local"
    q = subprocess.run(cmd[:cmd.index("--executor")] + ["--executor", "local", "--results",
                                                          str(local), "--cache",
                                                          str(tmp / "cache")],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert q.returncode == 0, q.stderr[-3000:]
    (g,) = local.glob("*/linear-*.json")
    want = json.loads(g.read_text())["records"]
    assert [(r["cell_key"], r["column"], r["selection"], r["variant"], r["value"])
            for r in recs] == [(r["cell_key"], r["column"], r["selection"], r["variant"],
                                r["value"]) for r in want]


SCANCEL_SUITE = """
name = "scancel"
[datasets]
places = "embedded"
[embedded]
n_train_per_class = 60  # 600 images: epochs of seconds even on an idle machine
n_val_per_class = 2
[resources]
gpus_per_node = 0
cpus_per_task = 1
mem_gb = 1
timeout_min = 10
[runtime]
workers = 0
[[cell]]                # short: done long before the other is cancelled
task = "linear"
datasets = ["places"]
[cell.config]
epochs = 1
batch_size = 16
input_size = 64
resize_size = 72
layers = ["conv1"]
[[cell]]                # long: ~1 s per epoch idle, cancelled after its first epoch; it goes
task = "linear"       # on through the local cluster's KillWait (5 s: submitit ignores the
datasets = ["places"]  # SIGTERM), so 19 epochs are left to outlast it
[cell.config]
epochs = 20
batch_size = 8
input_size = 64
resize_size = 72
layers = ["conv1", "conv5"]
"""


def _running_long_cell(results: Path, env: dict, timeout_s: float = 180) -> tuple[str, str, Path]:
    """(job id, cell key, log) of the long cell once squeue shows it RUNNING and its log has
    finished an epoch (only the long cell has a conv5 head)."""
    import re
    import time

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for err in (results / "_logs").glob("*/*_log.err"):
            text = err.read_text(errors="replace")
            started = re.search(r"cell (\S+) on ", text)
            if started and re.search(r"epoch 0: conv1=\S+ conv5=", text):
                job = err.parent.name
                squeue = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j",
                                         job.split("_")[0]], env=env, capture_output=True,
                                        text=True).stdout
                if f"{job} RUNNING" in squeue:
                    return job, started.group(1), err
        time.sleep(0.3)
    raise AssertionError("the long cell never ran an epoch under SLURM")


def test_a_scancelled_cell_is_reported_failed_and_a_rerun_completes_it(tmp_path_factory):
    """scancel of a running array task: run_all (waiting) reports that cell FAILED with its
    log within a bounded time, records nothing for it and leaves no claim; a rerun of the
    same command computes that cell only (resuming from its last finished epoch)."""
    import time

    tmp, ckpt = released_and_suite(tmp_path_factory, "scancel", SCANCEL_SUITE)
    results = tmp / "results"
    with LocalSlurm(tmp_path_factory.mktemp("slurm4"), first_job_id=910000) as cluster:
        env, cmd = run_all_command(cluster, tmp, ckpt, results)
        first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            job, key, log = _running_long_cell(results, env)
            subprocess.run(["scancel", job], env=env, check=True)
            cancelled_at = time.monotonic()
            out, err = first.communicate(timeout=300)
        finally:
            first.kill()
        waited = time.monotonic() - cancelled_at
        sacct = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", job],
                               env=env, capture_output=True, text=True).stdout
        ckpt_dir = next(p for p in results.iterdir() if p.name.startswith("released-"))
        assert first.returncode == 1, out[-2000:] + err[-2000:]
        assert waited < 120, f"run_all took {waited:.0f} s to see the scancel"
        assert f"{job}|CANCELLED" in sacct, sacct
        assert "1 done, 0 skipped (record exists), 1 failed" in out, out
        assert f"FAILED {key}: Job {job} ended without a result: cancelled" in out, out
        assert f"log: {log}\n" in out and log.exists()
        assert not (ckpt_dir / f"{key}.json").exists()  # no record, only the failure
        assert json.loads((ckpt_dir / f"{key}.failed.json").read_text())["log"] == str(log)
        assert not list(results.glob("*/*.claim"))
        again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "1 done, 1 skipped (record exists), 0 failed" in again.stdout, again.stdout
    (rec, *_) = records.read_results_file(ckpt_dir / f"{key}.json").records
    assert rec.details["resumed_at_epoch"] >= 1  # it went on from the cancelled job's state
    assert not (ckpt_dir / f"{key}.failed.json").exists()
    assert not list(results.glob("*/*.claim"))


SAME_SUITE = """
name = "same"
[datasets]
places = "embedded"
voc07 = "embedded"
[embedded]
n_train_per_class = 4
n_val_per_class = 2
voc_trainval = 24
voc_test = 12
[resources]
gpus_per_node = 0
cpus_per_task = 1
mem_gb = 2
timeout_min = 10
[runtime]
workers = 0
[[cell]]
task = "linear"
datasets = ["places"]
[cell.config]
epochs = 2
batch_size = 16
input_size = 64
resize_size = 72
[[cell]]
task = "voc_classification"
datasets = ["voc07"]
[cell.config]
mode = "fc6-8"
iterations = 10
lr_step = 5
batch_size = 8
input_size = 64
[[cell]]
task = "voc_classification"
datasets = ["voc07"]
[cell.config]
mode = "all"
iterations = 10
lr_step = 5
batch_size = 8
input_size = 64
"""


def _records(results: Path) -> list:
    return [r for f in records.iter_results_files(results) if not f.name.endswith(".failed.json")
            for r in records.read_results_file(f).records]


def _numbers(results: Path) -> dict:
    """{(cell key, column, metric, selection, variant): value} of every record under results."""
    return {(r.cell_key, r.column, r.metric, r.selection, r.variant): r.value
            for r in _records(results)}


def test_slurm_and_local_executors_give_the_same_records(tmp_path_factory):
    """The same suite (a linear probe and VOC07 classification in both modes) run with
    --executor local and --executor slurm: the same cells and the same numbers; SLURM ran them
    as one array with exactly one task per cell."""
    tmp, ckpt = released_and_suite(tmp_path_factory, "same", SAME_SUITE)
    with LocalSlurm(tmp_path_factory.mktemp("slurm5"), first_job_id=920000) as cluster:
        env, cmd = run_all_command(cluster, tmp, ckpt, tmp / "slurm")
        local_cmd = cmd[:cmd.index("--executor")] + ["--executor", "local", "--results",
                                                     str(tmp / "local"), "--cache",
                                                     str(tmp / "cache")]
        local = subprocess.run(local_cmd, cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=600)
        assert local.returncode == 0, local.stdout[-2000:] + local.stderr[-3000:]
        slurm = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=600)
        assert slurm.returncode == 0, slurm.stdout[-2000:] + slurm.stderr[-3000:]
        job_ids = {r.job_id for r in _records(tmp / "slurm")}
        (array,) = {j.split("_")[0] for j in job_ids}
        sacct = subprocess.run(["sacct", "-n", "-P", "-o", "JobID", "-j", array], env=env,
                               capture_output=True, text=True).stdout.split()
    want, got = _numbers(tmp / "local"), _numbers(tmp / "slurm")
    # linear: 5 layers x best/last epoch x 10-crop/centre; VOC: one mAP per mode
    assert len({key[0] for key in want}) == 3 and len(want) == 5 * 2 * 2 + 2
    assert sorted(got) == sorted(want)  # the same cells, columns, metrics, selection rules
    assert got == want  # bit-identical numbers
    tasks = sorted(job for job in sacct if "." not in job)  # not the .batch / .0 steps
    assert tasks == [f"{array}_{i}" for i in range(3)], sacct  # one array task per cell
    assert job_ids == set(tasks)  # each record names the array task that computed it
