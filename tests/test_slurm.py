"""Tests of ``slurm/``: a real single-node SLURM cluster, submitit executors, arrays, requeue.

Tests marked ``slurm`` start real daemons (munge, MariaDB, slurmdbd, slurmctld, slurmd) in a
temporary folder; they are skipped only when the binaries are not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from submitit.core.utils import DelayedSubmission, UncompletedJobError

from dcbench.core import UserError
from slurm import _selftest as st
from slurm.launch import (
    CheckpointableJob,
    JobOutcome,
    QueuedJob,
    Resources,
    error_summary,
    make_executor,
    submit_array,
    wait,
)
from slurm.local_cluster import INSTALL_HINT, LocalSlurm, LocalSlurmError

REPO = Path(__file__).resolve().parents[1]
SMALL = Resources(cpus_per_task=1, mem_gb=0.5, timeout_min=5)

needs_slurm = pytest.mark.skipif(
    not LocalSlurm.available(),
    reason=f"needs SLURM, munge, MariaDB and slurmdbd installed: {INSTALL_HINT}",
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    """A running local SLURM for this module; clients see it through SLURM_CONF."""
    if not LocalSlurm.available():
        pytest.skip(f"needs SLURM, munge, MariaDB and slurmdbd installed: {INSTALL_HINT}")
    local = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    with pytest.MonkeyPatch.context() as patch:
        for name, value in local.env.items():
            patch.setenv(name, value)
        # jobs run `python -m submitit...` and must import slurm._selftest from this checkout
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        with local:
            yield local


def _clients_env(cluster: LocalSlurm) -> dict[str, str]:
    return {**os.environ, **cluster.env}


# ----------------------------------------------------------------------------- cluster
@pytest.mark.slurm
@needs_slurm
def test_sbatch_array_writes_one_file_per_task(cluster: LocalSlurm, tmp_path: Path) -> None:
    command = 'echo "task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_JOB_ID" > out_$SLURM_ARRAY_TASK_ID.txt'
    subprocess.run(
        ["sbatch", "--wait", "--array=0-3", "-c", "1", "--mem=100M", "-o", "/dev/null", "--wrap", command],
        cwd=tmp_path,
        env=_clients_env(cluster),
        check=True,
        capture_output=True,
        timeout=120,
    )
    files = sorted(tmp_path.glob("out_*.txt"))
    assert [f.name for f in files] == [f"out_{i}.txt" for i in range(4)]
    texts = [f.read_text().split() for f in files]
    assert [t[1] for t in texts] == ["0", "1", "2", "3"]
    assert len({t[3] for t in texts}) == 1  # one array job


@pytest.mark.slurm
@needs_slurm
def test_start_is_idempotent_and_cli_reports_status(cluster: LocalSlurm) -> None:
    conf_before = cluster.layout.slurm_conf.read_text()
    pids_before = {name: cluster.layout.pid_file(name).read_text() for name in cluster.daemons}
    cluster.start()
    assert cluster.layout.slurm_conf.read_text() == conf_before
    assert {name: cluster.layout.pid_file(name).read_text() for name in cluster.daemons} == pids_before
    status = subprocess.run(
        [sys.executable, "-m", "slurm.local_cluster", "status", "--dir", str(cluster.layout.root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert f"export SLURM_CONF={cluster.layout.slurm_conf}" in status.stdout
    assert all(f"{name:10s} running" in status.stdout for name in cluster.daemons)
    sinfo = subprocess.run(
        ["sinfo", "-h", "-o", "%T %c"], env=_clients_env(cluster), capture_output=True, text=True
    )
    state, cpus = sinfo.stdout.split()
    assert state in ("idle", "mixed", "allocated") and int(cpus) <= (os.cpu_count() or 1)


def test_too_deep_folder_is_refused_before_anything_starts(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 90)
    if not LocalSlurm.available():
        pytest.skip(f"needs SLURM installed: {INSTALL_HINT}")
    with pytest.raises(LocalSlurmError, match="too deep"):
        LocalSlurm(deep).start()
    assert not deep.exists()


@pytest.mark.slurm
@needs_slurm
def test_failed_start_names_the_reason_shows_logs_and_cleans_up(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    doomed = LocalSlurm(tmp_path_factory.mktemp("doomed"), start_timeout_s=0)
    with pytest.raises(LocalSlurmError) as info:
        doomed.start()
    message = str(info.value)
    assert "did not start: timed out after 0 s waiting for munged" in message
    assert f"--- {doomed.layout.logs / 'munged.out'}" in message and str(doomed.layout.logs) in message
    assert not any(doomed.running().values())
    assert not any(doomed.layout.pid_file(name).exists() for name in doomed.daemons)


def test_missing_binaries_give_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH; sbin folders hold only daemons
    assert LocalSlurm.available() is False
    with pytest.raises(LocalSlurmError, match="apt-get install -y slurm-wlm slurmdbd mariadb-server munge"):
        LocalSlurm(tmp_path / "cluster").start()
    assert not (tmp_path / "cluster").exists()


# ----------------------------------------------------------------------------- slurm executor
@pytest.mark.slurm
@needs_slurm
def test_map_array_on_slurm_returns_results_in_order(cluster: LocalSlurm, tmp_path: Path) -> None:
    executor = make_executor("slurm", tmp_path, SMALL, name="squares")
    jobs = submit_array(executor, st.square, [3, 4, 5])
    array_ids = {job.job_id.split("_")[0] for job in jobs}
    assert len(array_ids) == 1 and [job.job_id.split("_")[1] for job in jobs] == ["0", "1", "2"]
    seen: list[JobOutcome] = []
    outcomes = wait(jobs, on_done=seen.append, poll_s=0.5, timeout_s=120)
    assert [o.result for o in outcomes] == [9, 16, 25]
    assert sorted(o.index for o in seen) == [0, 1, 2]
    assert all(o.ok and o.stdout is not None and o.stdout.exists() for o in outcomes)
    assert [_sacct_state(job) for job in jobs] == ["COMPLETED"] * 3  # accounting is on
    submission = next(tmp_path.glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --array=0-2%3" in submission and "#SBATCH --cpus-per-task=1" in submission
    assert "--gpus-per-node" not in submission


@pytest.mark.slurm
@needs_slurm
def test_failing_job_reports_its_exception_and_stderr_log(cluster: LocalSlurm, tmp_path: Path) -> None:
    executor = make_executor("slurm", tmp_path, SMALL, name="fails")
    jobs = submit_array(executor, st.fail_if_negative, [-7, 2])
    bad, good = wait(jobs, poll_s=0.5, timeout_s=120)
    assert good.ok and good.result == 2
    assert not bad.ok and "selftest refuses negative input -7" in str(bad.error)
    assert bad.stderr is not None and bad.stderr == Path(jobs[0].paths.stderr) and bad.stderr.exists()
    assert "about to fail on -7" in bad.stderr.read_text()
    assert error_summary(bad.error) == "ValueError: selftest refuses negative input -7"
    with pytest.raises(Exception, match="selftest refuses negative input -7"):
        jobs[0].result()  # submitit itself raises too, without hanging


@pytest.mark.slurm
@needs_slurm
def test_cancelled_job_ends_instead_of_hanging(cluster: LocalSlurm, tmp_path: Path) -> None:
    executor = make_executor("slurm", tmp_path, SMALL, name="cancelled")
    (job,) = submit_array(executor, st.sleep_then_return, [(300, 1)])
    _wait_until_running(job)
    job.cancel()
    (outcome,) = wait([job], poll_s=0.5, timeout_s=90, result_grace_s=2)
    assert isinstance(outcome.error, UncompletedJobError)
    assert "CANCELLED" in str(outcome.error) and "ended without a result" in str(outcome.error)
    assert _sacct_state(job) == "CANCELLED by 0"


@pytest.mark.slurm
@needs_slurm
def test_without_accounting_wait_still_ends_a_killed_job(
    cluster: LocalSlurm,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No sacct: submitit sees UNKNOWN forever; wait() notices the job left squeue."""
    bare = LocalSlurm(tmp_path_factory.mktemp("bare"), accounting=False, first_job_id=500000)
    try:
        bare.start()
        monkeypatch.setenv("SLURM_CONF", bare.env["SLURM_CONF"])
        executor = make_executor("slurm", tmp_path / "logs", SMALL, name="bare")
        (job,) = submit_array(executor, st.sleep_then_return, [(300, 1)])
        _wait_until_running(job, use_squeue=True)
        subprocess.run(["scancel", job.job_id], check=True, env=os.environ)
        (outcome,) = wait([job], poll_s=0.5, timeout_s=90, squeue_every_s=1.0, result_grace_s=2)
        assert isinstance(outcome.error, UncompletedJobError)
        assert "ended without a result" in str(outcome.error) and "state: UNKNOWN" in str(outcome.error)
    finally:
        pid_files = [bare.layout.pid_file(name) for name in bare.daemons]
        pids = [path.read_text() for path in pid_files if path.exists()]
        bare.stop()
    assert pids and not any(Path(f"/proc/{pid.strip()}").exists() and _not_zombie(pid) for pid in pids)
    assert all(cluster.running().values()), "stopping one cluster must not touch another"


@pytest.mark.slurm
@needs_slurm
def test_time_limit_requeues_a_checkpointable_job(cluster: LocalSlurm, tmp_path: Path) -> None:
    """A real 1-minute limit: SLURM sends USR2 before it, submitit requeues, the job resumes.

    The first run would count for ~3 hours; a resumed run counts 3 more steps and returns.
    """
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    one_minute = Resources(cpus_per_task=1, mem_gb=0.5, timeout_min=1)
    executor = make_executor("slurm", tmp_path / "logs", one_minute, name="timeout")
    (job,) = submit_array(executor, CheckpointableJob(st.resumable_count), [(str(state_dir), 10_000, 1.0, 3)])
    (outcome,) = wait([job], poll_s=1.0, timeout_s=150)
    assert outcome.ok, outcome.error
    first, second = outcome.result["steps_per_run"]
    assert outcome.result["runs"] == 2 and first and len(second) == 3
    assert first + second == list(range(1, len(first) + 4))  # resumed where the limit cut it
    assert _sacct_history(job) == ["REQUEUED", "COMPLETED"]  # SLURM's own record of both runs
    assert "timed-out" in outcome.stderr.read_text()  # submitit logged the SLURM signal


def test_checkpoint_returns_a_delayed_submission_of_itself() -> None:
    wrapped = CheckpointableJob(st.add)
    assert wrapped(2, 3) == 5
    delayed = wrapped.checkpoint(2, 3)
    assert isinstance(delayed, DelayedSubmission)
    assert delayed.function is wrapped and delayed.args == (2, 3) and delayed.kwargs == {}
    assert delayed.result() == 5


def test_slurm_executor_without_sbatch_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError) as info:
        make_executor("slurm", tmp_path, SMALL, name="x")
    message = str(info.value)
    assert "sbatch" in message and "--executor local" in message
    assert "python -m slurm.local_cluster start" in message


def test_unknown_executor_kind_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="choose one of slurm, local, debug"):
        make_executor("kubernetes", tmp_path, SMALL, name="x")


# ----------------------------------------------------------------------------- local / debug
# The local executor's two ways to start a job: submitit's fresh interpreter (no preload; used
# by pretraining) and forks of a server that imported ``preload`` once (run_all's cells).
LOCAL_FLAVOURS = pytest.mark.parametrize("preload", [(), ("torch",)], ids=["fresh", "forked"])


@LOCAL_FLAVOURS
def test_local_executor_runs_an_array_one_job_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preload: tuple[str, ...]
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    one_at_a_time = Resources(cpus_per_task=os.cpu_count() or 1, timeout_min=5)
    assert one_at_a_time.local_parallelism() == 1
    executor = make_executor("local", tmp_path / "logs", one_at_a_time, name="local",
                             preload=preload)
    marks = tmp_path / "marks"
    marks.mkdir()
    jobs = submit_array(executor, st.record_pid, [(str(marks), f"t{i}", 0.3) for i in range(3)])
    assert all(isinstance(job, QueuedJob) for job in jobs)
    assert [job.state for job in jobs[1:]] == ["QUEUED", "QUEUED"]
    outcomes = wait(jobs, poll_s=0.1, timeout_s=120)
    records = [o.result for o in outcomes]
    assert [r["tag"] for r in records] == ["t0", "t1", "t2"]
    assert len({r["pid"] for r in records}) == 3 and os.getpid() not in {r["pid"] for r in records}
    assert all(a["end"] <= b["start"] for a, b in zip(records, records[1:]))  # never overlapped
    assert all(o.stderr is not None and o.stderr.exists() for o in outcomes)


@LOCAL_FLAVOURS
def test_a_job_runs_torch_on_its_cpus_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           preload: tuple[str, ...]) -> None:
    """torch would start one thread per core in every job: two 1-CPU cells on 2 cores would
    then run 4 threads. A CheckpointableJob runs torch on its cpus_per_task (never more than
    torch's own default), under the local executor as under SLURM."""
    import torch

    if torch.get_num_threads() < 2:
        pytest.skip("torch runs one thread here: nothing to lower")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    ex = make_executor("local", tmp_path, Resources(cpus_per_task=1, timeout_min=5), name="t",
                       preload=preload)
    (one,) = wait(submit_array(ex, CheckpointableJob(st.torch_threads), [0]), timeout_s=120)
    many = Resources(cpus_per_task=4096, timeout_min=5)
    ex = make_executor("local", tmp_path / "b", many, name="t", preload=preload)
    (default,) = wait(submit_array(ex, CheckpointableJob(st.torch_threads), [0]), timeout_s=120)
    assert (one.result, default.result) == (1, torch.get_num_threads())
    assert st.torch_threads() == torch.get_num_threads()  # the submitting process: untouched


@LOCAL_FLAVOURS
def test_local_executor_reports_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         preload: tuple[str, ...]) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    executor = make_executor("local", tmp_path, Resources(cpus_per_task=1, timeout_min=5),
                             name="local", preload=preload)
    outcomes = wait(submit_array(executor, st.fail_if_negative, [4, -1]), poll_s=0.1, timeout_s=120)
    assert outcomes[0].result == 4
    assert "selftest refuses negative input -1" in str(outcomes[1].error)
    assert "about to fail on -1" in outcomes[1].stderr.read_text()


def test_debug_executor_runs_an_array_in_process(tmp_path: Path) -> None:
    executor = make_executor("debug", tmp_path, SMALL, name="debug")
    jobs = submit_array(executor, st.add, [(1, 2), (3, 4), (-5, 5)])
    outcomes = wait(jobs, poll_s=0.01, timeout_s=30)
    assert [o.result for o in outcomes] == [3, 7, 0]
    failing = wait(submit_array(executor, st.fail_if_negative, [-2]), timeout_s=30)
    assert isinstance(failing[0].error, ValueError) and "negative input -2" in str(failing[0].error)


def test_submit_array_rejects_ragged_arguments(tmp_path: Path) -> None:
    executor = make_executor("debug", tmp_path, SMALL, name="debug")
    with pytest.raises(ValueError, match="one non-zero length"):
        submit_array(executor, st.add, [(1, 2), (3,)])
    assert submit_array(executor, st.add, []) == []


def test_resources_key_groups_equal_needs_and_validates() -> None:
    cells = [Resources(gpus_per_node=1), Resources(), Resources(gpus_per_node=1), Resources(mem_gb=8)]
    groups: dict[str, list[Resources]] = {}
    for cell in cells:
        groups.setdefault(cell.key(), []).append(cell)
    assert sorted(len(group) for group in groups.values()) == [1, 1, 2]
    assert Resources().key() == Resources().key() != Resources(partition="gpu").key()
    with pytest.raises(UserError, match="cpus_per_task"):
        Resources(cpus_per_task=0)
    with pytest.raises(UserError, match="mem_gb"):
        Resources(mem_gb=0)


# ----------------------------------------------------------------------------- helpers
def _wait_until_running(job: object, use_squeue: bool = False, timeout_s: float = 60) -> None:
    """Block until a SLURM job runs (squeue when there is no accounting)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if use_squeue:
            command = ["squeue", "-h", "-j", job.job_id, "-o", "%T"]
            out = subprocess.run(command, capture_output=True, text=True)
            if out.stdout.strip() == "RUNNING":
                return
        elif job.get_info(mode="force").get("State") == "RUNNING":
            return
        time.sleep(0.3)
    raise AssertionError(f"job {job.job_id} did not start within {timeout_s} s")


def _sacct_state(job: object, timeout_s: float = 30) -> str:
    """The job's final state as sacct reports it (the accounting record may lag a little)."""
    deadline = time.monotonic() + timeout_s
    state = ""
    while time.monotonic() < deadline:
        state = job.get_info(mode="force").get("State", "")
        if state and state not in ("PENDING", "RUNNING", "COMPLETING"):
            break
        time.sleep(0.5)
    return state


def _sacct_history(job: object, timeout_s: float = 30) -> list[str]:
    """All states sacct recorded for a job, one per run (``-D``: duplicates, i.e. requeues)."""
    deadline = time.monotonic() + timeout_s
    states: list[str] = []
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", job.job_id], capture_output=True, text=True
        )
        states = out.stdout.split()
        if states and states[-1] == "COMPLETED":
            break
        time.sleep(0.5)
    return states


def _not_zombie(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid.strip()}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
