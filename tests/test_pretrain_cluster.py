"""Pretraining as a cluster job: the cluster file, submitting through submitit (local and a
REAL SLURM), and a run given a time limit shorter than it needs, requeued by SLURM and
continued from its last epoch, ending with the weights of an uninterrupted run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dcbench.core import UserError
from pretrain import cluster
from pretrain.config import preset_config
from slurm.local_cluster import INSTALL_HINT, LocalSlurm

REPO = Path(__file__).resolve().parent.parent
FMNIST = Path("/usr/share/datasets/fashion-mnist")
TINY = ["--preset", "demo", "--subset", "600", "--k", "12", "--fc-dim", "64", "--pca-dim", "16",
        "--input-size", "64", "--resize-size", "72"]


def test_cluster_file_then_command_line_override_the_paper_resources(tmp_path):
    f = tmp_path / "cluster.toml"
    f.write_text('[slurm]\npartition = "gpu"\ntimeout_min = 600\nmem_gb = 32\n')
    res = cluster.resources(str(f), {"timeout_min": 30, "partition": None})
    assert (res.partition, res.timeout_min, res.mem_gb) == ("gpu", 30, 32)
    assert (res.gpus_per_node, res.cpus_per_task) == (1, 10)  # the paper's defaults
    assert cluster.resources(None, {}) == cluster.PAPER_RESOURCES


@pytest.mark.parametrize("text,needle", [
    ('[slurm]\nqueue = "gpu"\n', "unknown key(s) ['queue']"),
    ('partition = "gpu"\n', "one [slurm] table"),
    ("[slurm\n", "cannot read"),
])
def test_bad_cluster_files_are_one_clear_error(tmp_path, text, needle):
    f = tmp_path / "cluster.toml"
    f.write_text(text)
    with pytest.raises(UserError, match=None) as e:
        cluster.resources(str(f), {})
    assert needle in str(e.value) and str(f) in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        cluster.resources(str(tmp_path / "none.toml"), {})


def test_submit_refuses_an_existing_run_before_submitting(tmp_path):
    (tmp_path / "checkpoint.pth").write_bytes(b"x")
    cfg = preset_config("demo", subset=100, k=5)
    with pytest.raises(UserError, match="already holds a run"):
        cluster.submit(cfg, tmp_path, "local", cluster.PAPER_RESOURCES, resume=False)
    assert not (tmp_path / "_logs").exists()


def sacct_history(job: str, env: dict, timeout_s: float = 120) -> list[str]:
    """Every state SLURM's accounting recorded for ``job`` (``-D``: one per run), once the
    last one is final (the accounting lags the job)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", job],
                                env=env, capture_output=True, text=True).stdout.split()
        if (states and states[-1] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")) \
                or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # torch's threads in a 1-CPU job


def _pretrain(out: Path, *extra: str, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "pretrain", *TINY, "--out", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def _weights(out: Path) -> dict:
    return torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)["state_dict"]


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.exists(), reason="apt-get install dataset-fashion-mnist")
def test_local_executor_job_equals_the_in_process_run(tmp_path):
    """A job of one task trains through a one-rank gloo group (the data-parallel path):
    bit-identical to the in-process run."""
    # the job runs torch on its one CPU (launch.use_cpus): so does the in-process run
    a = _pretrain(tmp_path / "inproc", "--epochs", "2", env=ONE_THREAD)
    assert a.returncode == 0, a.stderr[-2000:]
    b = _pretrain(tmp_path / "job", "--epochs", "2", "--executor", "local",
                  "--cpus-per-task", "1", "--gpus-per-node", "0", "--mem-gb", "2",
                  "--timeout-min", "20")
    assert b.returncode == 0, b.stderr[-2000:]
    assert "submitted pretraining as job" in b.stdout
    assert b.stdout.strip().splitlines()[-1] == str((tmp_path / "job" / "checkpoint.pth"))
    _same_weights(tmp_path / "inproc", tmp_path / "job")


@pytest.mark.slurm
@pytest.mark.skipif(not LocalSlurm.available() or not FMNIST.exists(),
                    reason=f"needs {INSTALL_HINT} and dataset-fashion-mnist")
def test_a_time_limited_pretraining_job_is_requeued_by_slurm_and_continues(tmp_path,
                                                                            tmp_path_factory):
    # A 2-min limit: SLURM signals USR2 24 s before it, checking every 30 s, so between 66 and
    # 96 s after each start (a 1-min limit let it come 15 s after a start: under load, before
    # the job had installed its handler). 70 epochs: ~4 min of work on one shared core here
    # (one requeue at least on a machine twice as fast).
    epochs = "70"
    # the uninterrupted run to compare with, meanwhile on the other core
    whole_log = tmp_path / "whole.log"  # a file, not a pipe: 70 epochs of progress bars
    with whole_log.open("w") as f:
        whole = subprocess.Popen([sys.executable, "-m", "pretrain", *TINY, "--out",
                                  str(tmp_path / "whole"), "--epochs", epochs], cwd=REPO,
                                 env=ONE_THREAD, stdout=f, stderr=subprocess.STDOUT)
    try:
        # a short folder: its socket paths must stay under 108 characters (xdist nests)
        with LocalSlurm(tmp_path_factory.mktemp("slurm"), first_job_id=950000) as slurm:
            env = {**os.environ, **slurm.env, "PYTHONPATH": os.pathsep.join(
                filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
            p = _pretrain(tmp_path / "job", "--epochs", epochs, "--executor", "slurm",
                          "--timeout-min", "2", "--cpus-per-task", "1", "--gpus-per-node",
                          "0", "--mem-gb", "2", env=env)
            if p.returncode != 0:
                pytest.fail(_failure_report(p, tmp_path / "job" / "_logs"), pytrace=False)
            job = p.stdout.split("as job ")[1].split()[0]
            history = sacct_history(job, env)
    except BaseException:
        whole.kill()
        whole.wait()
        raise
    assert "REQUEUED" in history, history  # the job's result came back: it completed
    log = [json.loads(line) for line in (tmp_path / "job" / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == list(range(int(epochs)))  # each epoch logged once
    assert whole.wait(timeout=900) == 0, whole_log.read_text()[-2000:]
    _same_weights(tmp_path / "whole", tmp_path / "job")


def _failure_report(p: subprocess.CompletedProcess, logs: Path) -> str:
    """Everything needed to tell why a submitted run failed, in full (a tuple assert message
    is cut short by pytest): the submitter's output and the tail of each job log."""
    parts = [f"exit status {p.returncode}", "--- stdout", p.stdout[-3000:],
             "--- stderr", p.stderr[-3000:]]
    for f in sorted(logs.rglob("*_log.*")):
        parts += [f"--- {f}", f.read_text(errors="replace")[-4000:]]
    return "\n".join(parts)


@pytest.mark.parametrize("kind", ["local", "slurm"])
def test_the_paper_run_may_requeue_as_often_as_its_time_limit_needs(tmp_path, kind, monkeypatch):
    """12 days (PROTOCOLS.md: 500 epochs on one P100) on the paper preset's 72-hour limit, or
    on a 4-hour partition: more requeues than submitit's default of 3."""
    import math

    from slurm import launch

    monkeypatch.setattr(launch.shutil, "which", lambda name: "/usr/bin/" + name)
    for timeout_min in (cluster.PAPER_RESOURCES.timeout_min, 4 * 60):
        res = cluster.resources(None, {"timeout_min": timeout_min})
        ex = launch.make_executor(kind, tmp_path / "logs", res, "dc-pretrain")
        needed = math.ceil(12 * 24 * 60 / timeout_min) - 1
        assert ex._executor.max_num_timeout >= needed > (3 if timeout_min == 240 else 0)
