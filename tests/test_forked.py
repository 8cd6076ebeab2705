"""The local executor's forked jobs (slurm/forked.py): what is inherited from the fork server,
and real kills (from this side, from outside, at the time limit) with their process trees."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from submitit.core.utils import UncompletedJobError

from slurm import _selftest as st
from slurm.forked import ForkedExecutor, ForkedJob
from slurm.launch import (CheckpointableJob, Resources, kill_local_jobs, make_executor,
                          submit_array, wait)

REPO = Path(__file__).resolve().parents[1]
ONE_CPU = Resources(cpus_per_task=1, timeout_min=5)


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def wait_for(path: Path, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return json.loads(path.read_text())


@pytest.fixture(autouse=True)
def importable_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))


def test_forked_jobs_inherit_the_preloaded_modules_and_fresh_ones_do_not(tmp_path: Path) -> None:
    forked = make_executor("local", tmp_path / "f", ONE_CPU, "t", preload=("torch",))
    fresh = make_executor("local", tmp_path / "s", ONE_CPU, "t")
    assert isinstance(forked, ForkedExecutor) and not isinstance(fresh, ForkedExecutor)
    (a,) = wait(submit_array(forked, st.modules_at_start, [(["torch"],)]), timeout_s=120)
    (b,) = wait(submit_array(fresh, st.modules_at_start, [(["torch"],)]), timeout_s=120)
    assert a.result == {"torch": True} and b.result == {"torch": False}
    assert isinstance(a.job, ForkedJob) and a.job.state == "COMPLETED"
    assert int(a.job.job_id) != os.getpid() and a.stderr.parent == tmp_path / "f" / a.job.job_id


def test_data_parallel_jobs_keep_submitits_interpreter(tmp_path: Path) -> None:
    """Several tasks per job (DDP ranks) need submitit's launcher: no fork server for them."""
    ranks = Resources(cpus_per_task=1, timeout_min=5, tasks_per_node=2)
    assert not isinstance(make_executor("local", tmp_path, ranks, "t", preload=("torch",)),
                          ForkedExecutor)


def test_killing_a_forked_job_kills_its_process_tree(tmp_path: Path) -> None:
    ex = make_executor("local", tmp_path / "logs", ONE_CPU, "t", preload=("torch",))
    (job,) = submit_array(ex, st.sleep_under_a_child, [(str(tmp_path), 300)])
    pids = wait_for(tmp_path / "pids.json")
    assert not gone(pids["job"]) and not gone(pids["child"])
    kill_local_jobs([job])
    deadline = time.monotonic() + 30
    while not (gone(pids["job"]) and gone(pids["child"])):
        assert time.monotonic() < deadline, f"still running: {pids}"
        time.sleep(0.05)
    (outcome,) = wait([job], timeout_s=60, result_grace_s=0.2)
    assert isinstance(outcome.error, UncompletedJobError)
    assert "state: CANCELLED" in str(outcome.error)
    assert not job.paths.result_pickle.exists()


def test_a_forked_job_killed_from_outside_is_reported_with_its_log(tmp_path: Path) -> None:
    ex = make_executor("local", tmp_path / "logs", ONE_CPU, "t", preload=("torch",))
    (job,) = submit_array(ex, st.sleep_under_a_child, [(str(tmp_path), 300)])
    pids = wait_for(tmp_path / "pids.json")
    os.kill(pids["job"], signal.SIGKILL)
    (outcome,) = wait([job], timeout_s=60, result_grace_s=0.2)
    assert isinstance(outcome.error, UncompletedJobError)
    assert "KILLED (signal 9)" in str(outcome.error)
    assert outcome.stderr == job.paths.stderr and outcome.stderr.exists()
    os.kill(pids["child"], signal.SIGKILL)  # the orphaned grandchild: not this test's subject


def test_a_forked_job_past_its_time_limit_is_killed_and_says_so(tmp_path: Path) -> None:
    tiny = SimpleNamespace(timeout_min=0.02, tasks_per_node=1, cpus_per_task=1)  # 1.2 s
    ex = ForkedExecutor(tmp_path / "logs", tiny, preload=("slurm.launch",))
    job = ex.submit(st.sleep_then_return, 300, 1)
    (outcome,) = wait([job], poll_s=0.1, timeout_s=60, result_grace_s=0.2)
    assert isinstance(outcome.error, UncompletedJobError)
    assert "out of time" in str(outcome.error) and job.state == "TIMEOUT"
    assert gone(job._process.pid)


def test_a_checkpointable_forked_job_past_its_limit_is_requeued_and_resumes(tmp_path: Path) -> None:
    """As submitit requeues: stopped at the limit, started again with the same id and logs,
    and it resumes from its own saved state until it completes."""
    tiny = SimpleNamespace(timeout_min=0.03, tasks_per_node=1, cpus_per_task=1)  # 1.8 s
    ex = ForkedExecutor(tmp_path / "logs", tiny, preload=("slurm.launch",), max_requeues=20)
    job = ex.submit(CheckpointableJob(st.resumable_count), str(tmp_path), 12, 0.4)
    (outcome,) = wait([job], poll_s=0.1, timeout_s=120, result_grace_s=0.2)
    assert outcome.error is None, outcome.error
    runs = outcome.result["steps_per_run"]
    assert outcome.result["done"] == 12 and len(runs) >= 2 and job.requeued == len(runs) - 1
    assert [s for run in runs for s in run] == list(range(1, 13))  # resumed, never repeated
    assert job.paths.stderr.read_text().count("started again (requeue") == job.requeued
