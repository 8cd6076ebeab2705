"""Executors, job arrays, progress and requeueable jobs, on top of submitit.

Three kinds of executor run the same job functions:

* ``slurm``: one SLURM array (``sbatch --array=0-N%P``) per :func:`submit_array` call.
* ``local``: subprocesses on this machine. submitit's ``LocalExecutor`` has no arrays: it
  starts every element at once, each in its own subprocess, ignores ``array_parallelism``,
  and gives every job the same GPUs. :func:`submit_array` therefore starts local elements
  as slots free up, at most ``min(array_parallelism, cpu_count // cpus_per_task)`` at a time
  (one at a time when GPUs are requested). Queued elements start only while someone polls
  them (:func:`wait`, ``job.done()``, ``job.result()``). With ``preload`` (run_all's cells)
  each job is a fork of a server that imported those modules once (:mod:`slurm.forked`),
  not submitit's fresh interpreter: same files, kill and failure reports, no import per job.
* ``debug``: in this process, one job after the other, when :func:`wait` (or
  ``job.result()``) reaches it. :func:`wait` reports failures like the other kinds;
  ``job.result()`` on a failing debug job opens pdb (submitit's behaviour).

Logs of job ``J`` go to ``<folder>/J/`` (``J_0_log.out`` / ``J_0_log.err``; for arrays
``<array id>_<index>``).
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Generic, TypeVar

import submitit
from submitit.core.utils import DelayedSubmission, JobPaths, UncompletedJobError
from submitit.helpers import Checkpointable
from submitit.local.debug import DebugJob
from submitit.slurm.slurm import SlurmJob

from dcbench.core import UserError

from .forked import ForkedExecutor, ForkedJob, kill_tree

log = logging.getLogger(__name__)

R = TypeVar("R")
EXECUTOR_KINDS = ("slurm", "local", "debug")
MAX_ARRAY_SIZE = 1000  # SLURM's default MaxArraySize (1001) allows indices 0..1000
SQUEUE_EVERY_S = 30.0  # how often wait() asks squeue about jobs without a result yet


@dataclass(frozen=True)
class Resources:
    """What one job of a group needs; cells with equal :meth:`key` share one array."""

    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: float = 4
    timeout_min: int = 60
    partition: str | None = None
    array_parallelism: int = 64
    constraint: str | None = None
    nodes: int = 1
    tasks_per_node: int = 1  # processes per node (data-parallel ranks: one per GPU)

    def __post_init__(self) -> None:
        minimums = {"gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 0, "timeout_min": 1,
                    "nodes": 1, "tasks_per_node": 1}
        for name, minimum in (*minimums.items(), ("array_parallelism", 1)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < minimum or (name == "mem_gb" and value == 0):
                raise UserError(
                    f"Resources.{name} = {value!r} is invalid: it must be a number "
                    f"{'> 0' if name == 'mem_gb' else f'>= {minimum}'}."
                )
        check_sbatch_value("partition", self.partition)
        check_sbatch_value("constraint", self.constraint)

    def key(self) -> str:
        """A stable, readable key: equal for cells that can share one job array."""
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))

    def local_parallelism(self) -> int:
        """How many such jobs fit on this machine at once (the local executor's limit)."""
        if self.gpus_per_node > 0:
            return 1
        fit = max(1, (os.cpu_count() or 1) // (self.cpus_per_task * self.tasks_per_node))
        return min(self.array_parallelism, fit)


# How often a job may hit its time limit and be requeued (submitit's default, 3, would end the
# paper's 12-day pretraining on a 72-hour partition, or a 24 GPU-h probe on a 4-hour one). Each
# requeue resumes from saved state, so a run whose epoch fits in the limit always progresses.
MAX_TIME_LIMIT_REQUEUES = 100


class SuiteExecutor(submitit.AutoExecutor):
    """submitit's AutoExecutor that remembers its kind and the resources it was made for."""

    def __init__(self, folder: Path, kind: str, resources: Resources) -> None:
        limits = {f"{kind}_max_num_timeout": MAX_TIME_LIMIT_REQUEUES} if kind != "debug" else {}
        super().__init__(folder=folder, cluster=kind, **limits)
        self.kind = kind
        self.resources = resources


_SAFE = {"job name": r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}",
         "partition": r"[A-Za-z0-9_.,-]+",
         "constraint": r"[A-Za-z0-9_.,&|!()*\[\]:-]+"}


def check_sbatch_value(what: str, value: str | None) -> None:
    """One UserError for a string that would reach a generated sbatch script and could break
    out of its line (newlines, ``#SBATCH`` lines, quotes, spaces)."""
    if value is None:
        return
    if what in _SAFE:
        ok = re.fullmatch(_SAFE[what], value) is not None
    else:  # paths: anything printable
        ok = value.isprintable()
    if not ok:
        raise UserError(f"{what} {value!r} cannot go into a SLURM batch script: "
                        + ("use letters, digits and . _ + - only." if what == "job name" else
                           "it holds a newline or another character sbatch cannot take."))


def make_executor(kind: str, folder: Path, resources: Resources, name: str,
                  preload: Sequence[str] = ()) -> SuiteExecutor | ForkedExecutor:
    """An executor of ``kind`` (slurm | local | debug) whose job logs go to ``folder/%j``.

    ``preload``: for local jobs of one task each, modules that a fork server imports once;
    each job is then a fork of it (:mod:`slurm.forked`) instead of a fresh interpreter that
    imports them again (~4-5 s for torch and torchvision).
    """
    check_sbatch_value("job name", name)
    check_sbatch_value("partition", resources.partition)
    check_sbatch_value("constraint", resources.constraint)
    check_sbatch_value("log folder", str(folder))
    if kind not in EXECUTOR_KINDS:
        raise UserError(f"Unknown executor '{kind}': choose one of {', '.join(EXECUTOR_KINDS)}.")
    if kind == "slurm" and shutil.which("sbatch") is None:
        raise UserError(
            "--executor slurm needs SLURM's sbatch on PATH, and it is not there. Run on a "
            "SLURM login node, or use --executor local, or start a local cluster with "
            "'python -m slurm.local_cluster start --dir /tmp/slurm' and export the "
            "SLURM_CONF it prints (it needs: apt-get install -y slurm-wlm slurmdbd "
            "mariadb-server munge)."
        )
    if kind == "local" and preload and resources.tasks_per_node == 1:
        return ForkedExecutor(folder, resources, (*preload, __name__), MAX_TIME_LIMIT_REQUEUES)
    executor = SuiteExecutor(Path(folder) / "%j", kind, resources)
    executor.update_parameters(**_parameters(kind, resources, name))
    return executor


def _parameters(kind: str, resources: Resources, name: str) -> dict[str, Any]:
    """submitit parameters for ``resources`` (generic ones plus slurm_* ones)."""
    params: dict[str, Any] = {
        "name": name,
        "timeout_min": int(resources.timeout_min),
        "mem_gb": float(resources.mem_gb),
        "cpus_per_task": int(resources.cpus_per_task),
        "tasks_per_node": int(resources.tasks_per_node),
        "nodes": int(resources.nodes),
    }
    if resources.gpus_per_node > 0:  # '--gpus-per-node=0' is rejected by clusters without GPUs
        params["gpus_per_node"] = int(resources.gpus_per_node)
    if kind == "slurm":
        params.update(
            slurm_partition=resources.partition,
            slurm_constraint=resources.constraint,
            slurm_array_parallelism=int(resources.array_parallelism),
            # USR2 this many seconds before the time limit: time to checkpoint and requeue
            slurm_signal_delay_s=max(15, min(120, resources.timeout_min * 60 // 5)),
        )
    return params


# ----------------------------------------------------------------------------- arrays
def submit_array(
    executor: submitit.Executor, fn: Callable[..., R], args_list: Iterable[Any]
) -> list[submitit.Job[R] | QueuedJob]:
    """Submit ``fn(*args)`` for each ``args`` in ``args_list`` as one array; return its jobs.

    Each item is a tuple of positional arguments (any other value is one argument); all
    tuples must have the same length. The caller groups calls by :meth:`Resources.key`.
    SLURM arrays larger than :data:`MAX_ARRAY_SIZE` are split into several arrays.
    """
    calls = [item if isinstance(item, tuple) else (item,) for item in args_list]
    if not calls:
        return []
    arity = {len(call) for call in calls}
    if len(arity) != 1 or 0 in arity:
        raise ValueError(f"submit_array needs argument tuples of one non-zero length, got {sorted(arity)}")
    resources = getattr(executor, "resources", None)
    local = getattr(executor, "kind", None) == "local"
    if isinstance(fn, CheckpointableJob) and resources is not None \
            and getattr(executor, "kind", None) in ("slurm", "local"):
        fn = CheckpointableJob(fn.fn, resources.cpus_per_task)
    if local and resources is not None:
        limit = resources.local_parallelism()
        if limit < len(calls):
            return _LocalQueue(executor, fn, calls, limit).jobs
    jobs: list[submitit.Job[R] | QueuedJob] = []
    for start in range(0, len(calls), MAX_ARRAY_SIZE):
        chunk = calls[start : start + MAX_ARRAY_SIZE]
        with _children_ignore_sigint(local):
            jobs.extend(executor.map_array(fn, *zip(*chunk)))
    log.info("Submitted %d job(s) of %s to %s", len(jobs), _name(fn), type(executor).__name__)
    return jobs


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", type(fn).__name__)


@contextmanager
def _children_ignore_sigint(active: bool):
    """Start local jobs with SIGINT ignored (inherited across exec): a Ctrl-C in the terminal
    then reaches the submitting process only, which stops its jobs itself
    (:func:`kill_local_jobs`), instead of every job printing its own traceback."""
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def kill_local_jobs(jobs: Iterable[Any]) -> None:
    """Stop local jobs now: queued ones never start; started ones are killed with their whole
    process tree (SIGKILL: a job killed so writes neither a result nor a record)."""
    for job in jobs:
        if isinstance(job, QueuedJob) and job.job is None:
            job.cancel()
            continue
        job = getattr(job, "job", job)
        if isinstance(job, ForkedJob):
            job.kill()
            continue
        process = getattr(job, "_process", None)
        if process is None or process.poll() is not None:
            continue
        kill_tree(process.pid)
        process.wait()


class _LocalQueue:
    """Starts the calls of one local array as slots free up (at most ``limit`` running)."""

    def __init__(
        self, executor: submitit.Executor, fn: Callable[..., Any], calls: list[tuple[Any, ...]], limit: int
    ) -> None:
        self._executor = executor
        self._fn = fn
        self._calls = calls
        self._limit = limit
        self._next = 0
        self.started: list[Any] = [None] * len(calls)
        self.cancelled: set[int] = set()
        self.jobs = [QueuedJob(self, index) for index in range(len(calls))]
        log.info("Queued %d local job(s) of %s, %d at a time", len(calls), _name(fn), limit)
        self.pump()

    def pump(self) -> None:
        """Start queued calls while fewer than ``limit`` are running."""
        running = sum(1 for job in self.started if job is not None and not job.done())
        while self._next < len(self._calls) and running < self._limit:
            index, self._next = self._next, self._next + 1
            if index in self.cancelled:
                continue
            with _children_ignore_sigint(True):
                self.started[index] = self._executor.submit(self._fn, *self._calls[index])
            running += 1


class QueuedJob:
    """One element of a local array: waits for a slot, then forwards to its submitit job."""

    def __init__(self, queue: _LocalQueue, index: int) -> None:
        self._queue = queue
        self._index = index

    @property
    def job(self) -> Any:
        """The submitit job once started, else None."""
        return self._queue.started[self._index]

    @property
    def job_id(self) -> str:
        return self.job.job_id if self.job is not None else f"queued-{self._index}"

    @property
    def state(self) -> str:
        if self.job is not None:
            return str(self.job.state)
        return "CANCELLED" if self._index in self._queue.cancelled else "QUEUED"

    @property
    def paths(self) -> JobPaths:
        if self.job is None:
            raise RuntimeError(f"Local job {self._index} has not started yet: it has no log paths")
        return self.job.paths

    def done(self, force_check: bool = False) -> bool:
        self._queue.pump()
        if self.job is None:
            return self._index in self._queue.cancelled
        return bool(self.job.done(force_check))

    def wait(self) -> None:
        while not self.done():
            time.sleep(0.5)

    def exception(self) -> BaseException | None:
        self.wait()
        if self.job is None:
            return UncompletedJobError(f"Local job {self._index} was cancelled before it started")
        return self.job.exception()

    def result(self) -> Any:
        error = self.exception()
        if error is not None:
            raise error
        return self.job.result()

    def cancel(self, check: bool = True) -> None:
        if self.job is None:
            self._queue.cancelled.add(self._index)
        else:
            self.job.cancel(check=check)

    def __repr__(self) -> str:
        return f"QueuedJob(index={self._index}, job={self.job!r})"


# ----------------------------------------------------------------------------- waiting
@dataclass
class JobOutcome:
    """How one job ended: its result or its error, and where its logs are."""

    index: int
    job: Any
    result: Any = None
    error: BaseException | None = None
    stdout: Path | None = None
    stderr: Path | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def wait(
    jobs: Sequence[Any],
    on_done: Callable[[JobOutcome], None] | None = None,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
    squeue_every_s: float = SQUEUE_EVERY_S,
    result_grace_s: float = 15.0,
) -> list[JobOutcome]:
    """Poll ``jobs`` until all have ended; call ``on_done`` as each ends; return outcomes in order.

    A failed job gives an outcome whose ``error`` holds the exception (its text includes the
    job's traceback) and whose ``stderr`` is the job's log path (the debug executor logs to
    the console). A job that ended without writing a result (killed, cancelled, out of time
    or memory) gets an ``UncompletedJobError`` once its result file has not appeared for
    ``result_grace_s`` (slow shared file systems). SLURM jobs that left the queue are found
    with squeue every ``squeue_every_s``, so clusters without accounting (where submitit
    reports UNKNOWN forever) cannot hang this. Raises ``TimeoutError`` after ``timeout_s``.
    """
    pending = dict(enumerate(jobs))
    outcomes: list[JobOutcome | None] = [None] * len(jobs)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last_squeue = time.monotonic()
    while pending:
        vanished: set[str] = set()
        if time.monotonic() - last_squeue >= squeue_every_s:
            vanished, last_squeue = _left_slurm_queue(pending.values()), time.monotonic()
        for index, job in list(pending.items()):
            if isinstance(job, DebugJob):
                outcome = _collect(index, job)
            elif job.job_id in vanished or job.done():
                has_result = _has_result(job, result_grace_s)
                outcome = _collect(index, job) if has_result else _without_result(index, job)
            else:
                continue
            outcomes[index] = outcome
            del pending[index]
            _report(outcome, on_done)
        if pending:
            if deadline is not None and time.monotonic() > deadline:
                ids = ", ".join(str(job.job_id) for job in pending.values())
                raise TimeoutError(f"{len(pending)} job(s) still running after {timeout_s} s: {ids}")
            time.sleep(poll_s)
    return [outcome for outcome in outcomes if outcome is not None]


def _collect(index: int, job: Any) -> JobOutcome:
    """Read a finished job's result or error (a debug job runs here, in this process); a job
    of several tasks (data-parallel ranks) gives the result of its first task."""
    outcome = JobOutcome(index=index, job=job)
    try:
        outcome.error = job.exception()
        if outcome.error is None:
            outcome.result = (job.results()[0] if isinstance(job, submitit.Job)
                              else job.result())
    except Exception as error:  # noqa: BLE001 - any failure to read the outcome is the job's
        outcome.error = error
    _add_log_paths(outcome)
    return outcome


def _add_log_paths(outcome: JobOutcome) -> None:
    try:
        outcome.stdout, outcome.stderr = Path(outcome.job.paths.stdout), Path(outcome.job.paths.stderr)
    except RuntimeError:  # a local job cancelled before it started has no logs
        pass


def _has_result(job: Any, grace_s: float) -> bool:
    """True if the job's result file exists or appears within ``grace_s``."""
    try:
        result_file = Path(job.paths.result_pickle)
    except RuntimeError:  # a local job cancelled before it started: submitit's path says so
        return True
    deadline = time.monotonic() + grace_s
    while not result_file.exists():
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(1.0, grace_s))
    return True


def _without_result(index: int, job: Any) -> JobOutcome:
    """The outcome of a job that ended without writing a result."""
    outcome = JobOutcome(index=index, job=job)
    _add_log_paths(outcome)
    log_tail = ""
    if outcome.stderr is not None and outcome.stderr.exists():
        log_tail = outcome.stderr.read_text(errors="replace")[-2000:]
    state = final_state(job)
    outcome.error = UncompletedJobError(
        f"Job {job.job_id} ended without a result: {ending(state)} (state: {state}). "
        f"Its log: {outcome.stderr}\n{log_tail}"
    )
    return outcome


def final_state(job: Any) -> str:
    """How the scheduler says ``job`` ended: for SLURM, sacct asked afresh (submitit's cached
    state may still say RUNNING for a job that squeue no longer lists)."""
    if isinstance(job, SlurmJob):
        try:
            return job.get_info(mode="force").get("State") or "UNKNOWN"
        except Exception:  # noqa: BLE001 - no accounting: the state cannot be told
            return "UNKNOWN"
    return str(job.state)


_ENDINGS = {
    "CANCELLED": "cancelled (scancel, or an administrator)",
    "TIMEOUT": "out of time (raise --timeout-min or the suite's [resources] timeout_min)",
    "OUT_OF_MEMORY": "out of memory (raise the suite's [resources] mem_gb)",
    "NODE_FAIL": "its node failed",
    "BOOT_FAIL": "its node failed to boot",
    "PREEMPTED": "preempted and not requeued",
    "DEADLINE": "past its deadline",
}


def ending(state: str) -> str:
    """Why a job in SLURM state ``state`` (``CANCELLED by 0``, ``TIMEOUT``...) left no result."""
    word = state.split()[0].rstrip("+") if state.strip() else ""
    return _ENDINGS.get(word, "killed, cancelled, or out of time or memory")


def _report(outcome: JobOutcome, on_done: Callable[[JobOutcome], None] | None) -> None:
    if outcome.ok:
        log.debug("Job %s finished", outcome.job.job_id)
    else:
        summary = error_summary(outcome.error)
        log.warning("Job %s failed (log: %s): %s", outcome.job.job_id, outcome.stderr, summary)
    if on_done is not None:
        on_done(outcome)


def error_summary(error: BaseException | None) -> str:
    """The most telling line of an error: the last line of a job's traceback if it has one."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "----------------------" in lines:  # submitit's FailedJobError: trace between two rulers
        start = lines.index("----------------------")
        trace = lines[start + 1 : lines.index("----------------------", start + 1)]
        if trace:
            return trace[-1]
    return lines[0] if lines else type(error).__name__


def _left_slurm_queue(jobs: Iterable[Any]) -> set[str]:
    """Ids of SLURM jobs (array elements included) that squeue no longer lists."""
    ids = {job.job_id for job in jobs if isinstance(job, SlurmJob)}
    active = active_slurm_jobs(ids) if ids else set()
    return set() if active is None else ids - active


def active_slurm_jobs(job_ids: Iterable[str]) -> set[str] | None:
    """Which of ``job_ids`` (``<id>`` or ``<array>_<index>``) squeue lists as queued or
    running; None when squeue is unavailable or fails (the caller cannot tell)."""
    ids = set(job_ids)
    if not ids or shutil.which("squeue") is None:
        return None if ids else set()
    command = ["squeue", "-h", "-r", "-o", "%i", "-u", getpass.getuser()]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    if result.returncode != 0:
        return None
    return ids & set(result.stdout.split())


# ----------------------------------------------------------------------------- requeue
def use_cpus(cpus: int) -> None:
    """Run torch's intra-op threads on the job's ``cpus`` only. Its default (every core of
    the node) oversubscribes a node shared by several jobs: two 1-CPU cells on 2 cores run
    ~1.4x faster together than one 2-thread cell after the other."""
    import torch

    if 0 < cpus < torch.get_num_threads():  # never more threads than torch would start
        torch.set_num_threads(int(cpus))


class CheckpointableJob(Checkpointable, Generic[R]):
    """Wraps ``fn(*args)`` so that a SLURM time-out or preemption requeues the job.

    On the USR2 signal SLURM sends before the time limit (or on preemption), submitit
    calls :meth:`checkpoint`, which resubmits the same call; the requeued job runs
    ``fn(*args)`` again, and ``fn`` resumes from its own checkpoint files.
    """

    def __init__(self, fn: Callable[..., R], cpus: int | None = None) -> None:
        self.fn = fn
        self.cpus = cpus  # torch threads in the job: its CPUs (None: torch's default)

    def __call__(self, *args: Any) -> R:
        if self.cpus:
            use_cpus(self.cpus)
        return self.fn(*args)

    def checkpoint(self, *args: Any) -> DelayedSubmission:
        log.info("Requeueing %s%r; it will resume from its own checkpoint", _name(self.fn), args)
        return DelayedSubmission(self, *args)

    def __repr__(self) -> str:
        return f"CheckpointableJob({_name(self.fn)})"
