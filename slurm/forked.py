"""Local jobs forked from a server that imported their modules once.

A fresh Python process spends ~4-5 s importing torch and torchvision before a cell's first
step; for the demo's 26 short cells on 2 cores that was ~70 s of the evaluation's wall time.
Here Python's ``forkserver`` imports ``preload`` once, and each job is a fork of it: its own
process (own pid, killed with its process tree, own log and result files), started in
milliseconds, that has never run a torch op (it inherits no OpenMP pool, no CUDA context).

The jobs answer what :mod:`slurm.launch` asks of submitit's local jobs: ``job_id``,
``paths`` (``stdout``, ``stderr``, ``result_pickle``), ``state``, ``done()``,
``exception()``, ``result()``, ``cancel()``. A checkpointable job still running after
``timeout_min`` is stopped and started again, as submitit requeues it (it resumes from its
own saved state); any other is killed (state ``TIMEOUT``). Not supported, so not offered:
several tasks per job (data-parallel ranks).
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from submitit.core.utils import FailedJobError, UncompletedJobError

from dcbench.core import atomic_write

JOB_ID_ENV = "DCBENCH_LOCAL_JOB_ID"  # set in each forked job: its id (= its pid)
JOB_LOG_ENV = "DCBENCH_JOB_LOG"  # set in each forked job: its stderr log


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields_ = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields_[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    order, todo = [], [pid]
    while todo:
        p = todo.pop()
        order.append(p)
        todo += children.get(p, [])
    return order[::-1]


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process under it, children first."""
    for p in process_tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass(frozen=True)
class JobFiles:
    """Where job ``job_id`` writes: ``<folder>/<id>/<id>_0_log.out|err``, ``..._result.pkl``
    (submitit's layout)."""

    folder: Path
    job_id: str

    @property
    def stdout(self) -> Path:
        return self.folder / self.job_id / f"{self.job_id}_0_log.out"

    @property
    def stderr(self) -> Path:
        return self.folder / self.job_id / f"{self.job_id}_0_log.err"

    @property
    def result_pickle(self) -> Path:
        return self.folder / self.job_id / f"{self.job_id}_0_result.pkl"


def _run_job(fn: Callable[..., Any], args: tuple, folder: str, job_id: str | None) -> None:
    """The forked job: logs to its own files (appending: a requeued run continues them),
    ignores SIGINT (the submitting process stops its jobs itself), and writes
    ("success", result) or ("error", traceback) atomically. ``job_id`` None: its pid."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    files = JobFiles(Path(folder), job_id or str(os.getpid()))
    files.stderr.parent.mkdir(parents=True, exist_ok=True)
    os.environ[JOB_ID_ENV], os.environ[JOB_LOG_ENV] = files.job_id, str(files.stderr)
    for fd, stream, path in ((1, sys.stdout, files.stdout), (2, sys.stderr, files.stderr)):
        if stream is not None:
            stream.flush()
        with open(path, "ab", buffering=0) as f:
            os.dup2(f.fileno(), fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    try:
        outcome: tuple[str, Any] = ("success", fn(*args))
    except BaseException:  # noqa: BLE001 - every failure is the job's result
        trace = traceback.format_exc()
        print(trace, file=sys.stderr, flush=True)
        outcome = ("error", trace)
    atomic_write(files.result_pickle, pickle.dumps(outcome))


class ForkedJob:
    """One job forked from the executor's server (see the module docstring).

    Past ``timeout_s`` the job is killed and, while ``requeues`` remain, started again with
    the same id and log files (submitit's requeue: the job resumes from its own saved state);
    then it ends as ``TIMEOUT``.
    """

    def __init__(self, start: Callable[[str | None], Any], folder: Path, timeout_s: float,
                 requeues: int) -> None:
        self._start, self._timeout_s, self._requeues_left = start, timeout_s, requeues
        self._process = start(None)
        self._deadline = time.monotonic() + timeout_s
        self._ended_as: str | None = None  # TIMEOUT / CANCELLED when this side ended it
        self.paths = JobFiles(folder, str(self._process.pid))
        self.job_id = self.paths.job_id
        self.requeued = 0

    def done(self, force_check: bool = False) -> bool:
        if self._process.exitcode is not None:
            return True
        if time.monotonic() <= self._deadline:
            return False
        if self.paths.result_pickle.exists():  # finished at the limit: only exiting
            self._process.join()
            return True
        if self._requeues_left > 0:
            self._requeue()
            return False
        self._end("TIMEOUT")
        return True

    def _requeue(self) -> None:
        kill_tree(self._process.pid)
        self._process.join()
        self._requeues_left -= 1
        self.requeued += 1
        with open(self.paths.stderr, "a") as log:
            log.write(f"\n[local executor] past its time limit ({self._timeout_s / 60:g} min): "
                      f"stopped and started again (requeue {self.requeued}); it resumes from "
                      "its own saved state\n")
        self._process = self._start(self.job_id)
        self._deadline = time.monotonic() + self._timeout_s

    @property
    def state(self) -> str:
        if self._process.exitcode is None:
            return "RUNNING"
        if self._ended_as is not None:
            return self._ended_as
        if self._process.exitcode < 0:
            return f"KILLED (signal {-self._process.exitcode})"
        return "COMPLETED" if self._outcome()[0] == "success" else "FAILED"

    def _outcome(self) -> tuple[str, Any]:
        try:
            return pickle.loads(self.paths.result_pickle.read_bytes())
        except (OSError, EOFError, pickle.UnpicklingError):
            return ("missing", None)

    def wait(self) -> None:
        while not self.done():
            time.sleep(0.2)

    def exception(self) -> BaseException | None:
        self.wait()
        status, value = self._outcome()
        if status == "success":
            return None
        if status == "error":
            return FailedJobError(f"Job {self.job_id} failed; its log: {self.paths.stderr}\n"
                                  f"----------------------\n{value}\n----------------------")
        return UncompletedJobError(f"Job {self.job_id} ended without a result ({self.state}, "
                                   f"exit code {self._process.exitcode}); its log: "
                                   f"{self.paths.stderr}")

    def result(self) -> Any:
        error = self.exception()
        if error is not None:
            raise error
        return self._outcome()[1]

    def kill(self) -> None:
        """Stop the job now with its whole process tree (it writes no result)."""
        self._end("CANCELLED")

    def cancel(self, check: bool = True) -> None:
        self.kill()

    def _end(self, state: str) -> None:
        if self._process.exitcode is None:
            self._ended_as = state
            kill_tree(self._process.pid)
            self._process.join()

    def __repr__(self) -> str:
        return f"ForkedJob({self.job_id}, {self.state})"


class ForkedExecutor:
    """Starts local jobs as forks of one server that imported ``preload`` (module names).

    ``kind`` and ``resources`` are what :func:`slurm.launch.submit_array` reads; ``timeout_min``
    of ``resources`` bounds each job. The server starts with the first job and ends with this
    process.
    """

    kind = "local"

    def __init__(self, folder: str | Path, resources: Any, preload: Sequence[str],
                 max_requeues: int = 0) -> None:
        self.folder = Path(folder)
        self.resources = resources
        self.max_requeues = max_requeues  # for checkpointable jobs (``fn.checkpoint``)
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(list(preload))

    def submit(self, fn: Callable[..., Any], *args: Any) -> ForkedJob:
        def start(job_id: str | None) -> Any:
            process = self._ctx.Process(target=_run_job, args=(fn, args, str(self.folder), job_id))
            process.start()
            return process

        requeues = self.max_requeues if callable(getattr(fn, "checkpoint", None)) else 0
        return ForkedJob(start, self.folder, float(self.resources.timeout_min) * 60, requeues)

    def map_array(self, fn: Callable[..., Any], *iterables: Sequence[Any]) -> list[ForkedJob]:
        return [self.submit(fn, *args) for args in zip(*iterables)]
