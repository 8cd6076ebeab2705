"""Small importable job functions used by the tests of ``slurm`` (jobs unpickle them by name)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from dcbench.core import atomic_write_json


def square(x: int) -> int:
    """A pure function: the job's result is ``x * x``."""
    return x * x


def add(x: int, y: int) -> int:
    """A pure function of two arguments."""
    return x + y


def fail_if_negative(x: int) -> int:
    """Raises ``ValueError`` for a negative ``x``; prints a line to stderr first."""
    if x < 0:
        print(f"selftest: about to fail on {x}", file=sys.stderr, flush=True)
        raise ValueError(f"selftest refuses negative input {x}")
    return x


def sleep_then_return(seconds: float, value: int) -> int:
    """Sleeps, then returns ``value`` (a job that can be cancelled while running)."""
    time.sleep(seconds)
    return value


def record_pid(folder: str, tag: str, seconds: float) -> dict[str, float]:
    """Writes ``tag`` with its start/end times to ``folder``; used to see how jobs overlap."""
    start = time.time()
    time.sleep(seconds)
    end = time.time()
    record = {"tag": tag, "pid": os.getpid(), "start": start, "end": end}
    Path(folder, f"{tag}.json").write_text(json.dumps(record))
    return record


def resumable_count(
    state_dir: str, steps: int, step_s: float, steps_after_resume: int = 0
) -> dict[str, object]:
    """Counts to ``steps``, one step per ``step_s`` seconds, resuming from ``state_dir``.

    Progress is saved after every step (atomic rename), so a requeued job continues where
    the previous run stopped. With ``steps_after_resume > 0`` a resumed run stops after that
    many more steps (a first run can then outlast its time limit). Returns the number of
    runs and the steps each run did.
    """
    state_path = Path(state_dir) / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"done": 0, "runs": []}
    state["runs"].append([])
    _save(state_path, state)
    target = steps
    if steps_after_resume and len(state["runs"]) > 1:
        target = min(steps, state["done"] + steps_after_resume)
    while state["done"] < target:
        time.sleep(step_s)
        state["done"] += 1
        state["runs"][-1].append(state["done"])
        _save(state_path, state)
    return {"runs": len(state["runs"]), "steps_per_run": state["runs"], "done": state["done"]}


def _save(path: Path, state: dict[str, object]) -> None:
    atomic_write_json(path, state)


def torch_threads(_: object = None) -> int:
    """The intra-op threads torch runs with inside the job (the argument is ignored)."""
    import torch

    return torch.get_num_threads()


def modules_at_start(names: list[str]) -> dict[str, bool]:
    """Which of ``names`` were imported before the job ran (a forked job has its server's)."""
    return {name: name in sys.modules for name in names}


def sleep_under_a_child(folder: str, seconds: float) -> int:
    """Starts ``sleep`` as a child process, writes both pids to ``folder/pids.json``, sleeps."""
    import subprocess

    child = subprocess.Popen(["sleep", str(seconds)])
    atomic_write_json(Path(folder) / "pids.json", {"job": os.getpid(), "child": child.pid})
    time.sleep(seconds)
    return child.pid
