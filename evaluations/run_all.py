"""``python -m evaluations.run_all --ckpt model.pth``: every evaluation of a suite, as records.

Builds the cells (checkpoint x task x dataset x seed), skips those whose record file exists,
submits the rest through submitit (one SLURM array per resource group; ``local`` runs them
as subprocesses here, ``debug`` in this process), shows progress, and ends with a summary
(done / skipped / failed with each failure's log). Exit codes: 0 all cells done, 1 a cell
failed, 2 a usage error, 3 cells left to other processes or SLURM jobs that hold their claims
(rerun later), 130 / 143 stopped by SIGINT / SIGTERM (what this process started is cancelled,
except SLURM jobs, which go on; nothing false is recorded).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from dcbench.core import UserError

log = logging.getLogger("evaluations.run_all")
# what a cell's process imports: the local executor's fork server imports it once
CELL_MODULES = ("evaluations.worker", "evaluations.tasks")
DEFAULT_CACHE = Path(os.environ.get("DCBENCH_CACHE", Path.home() / ".cache" / "dcbench"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluations.run_all",
                                description="Run a suite of DeepCluster evaluations on checkpoints.")
    p.add_argument("--ckpt", action="append", required=True, metavar="PATH",
                   help="checkpoint to evaluate (ours, the authors' released, or a state dict); "
                   "repeat for several")
    p.add_argument("--label", action="append", default=[], metavar="TEXT",
                   help="table row label of each --ckpt, in order (default: file stem)")
    p.add_argument("--suite", default="paper", help="demo | paper | FILE.toml (default paper)")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the suite's tasks")
    p.add_argument("--executor", default="auto", choices=["auto", "slurm", "local", "debug"],
                   help="auto = slurm if sbatch is on PATH, else local")
    p.add_argument("--results", default="results", help="results folder (default ./results)")
    p.add_argument("--data-root", action="append", default=[], metavar="ROLE=PATH",
                   help="dataset root of a role (imagenet, places, voc07, voc12, sbd, oxford5k, "
                        "paris6k, roxford5k, rparis6k); "
                        "'embedded' builds the demo data (not for sbd)")
    p.add_argument("--datasets", default=None, metavar="FILE.toml",
                   help="TOML file with a [datasets] table of role = \"path\"")
    p.add_argument("--cache", default=str(DEFAULT_CACHE),
                   help="where the embedded data is built (default ~/.cache/dcbench)")
    p.add_argument("--random-baseline", action=argparse.BooleanOptionalAction, default=None,
                   help="also evaluate a never-trained network of the same architecture "
                   "(default: the suite's setting)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers per cell (runtime: never reruns a finished cell)")
    p.add_argument("--device", default=None,
                   help="auto | cpu | cuda[:N] (runtime: never reruns a finished cell)")
    p.add_argument("--trust-pickle", action="store_true", default=None,
                   help="load checkpoints that hold Python objects beyond tensors "
                   "(torch.load weights_only=False: runs code from the file; only for files "
                   "you trust)")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--timeout-min", type=int, default=None, help="override every job's time limit")
    p.add_argument("--array-parallelism", type=int, default=None,
                   help="max array tasks running at once")
    p.add_argument("--dry-run", action="store_true",
                   help="print the job matrix, the resources of each array and the estimated "
                   "GPU-hours per cell, array and in all; submit nothing. The estimate is the "
                   "cell's recipe (epochs or iterations, batch, input size) on the paper's full "
                   "datasets with the paper's network on one P100-class GPU "
                   "(evaluations/tasks.py): a scaled-down recipe scales it, but embedded data "
                   "(--suite demo) is far smaller than the paper's, so its cells take far less")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def parse_roots(args, suite, cache: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Dataset roots and names by role, from the suite, --datasets and --data-root (last wins)."""
    from .datasets.common import read_datasets_file

    given: dict[str, str | Path] = dict(suite.datasets)
    if args.datasets:
        given.update(read_datasets_file(args.datasets))
    for item in args.data_root:
        role, sep, path = item.partition("=")
        if not sep or not role or not path:
            raise UserError(f"--data-root {item!r} must be ROLE=PATH, e.g. imagenet=/data/ILSVRC2012.")
        given[role] = path
    from .datasets import check_root
    from .suites import needed_roles

    roots, names = {}, {}
    for role in needed_roles(suite):
        if role not in given:
            raise UserError(f"no dataset root for role {role!r} (needed by suite {suite.name}). "
                            f"Pass --data-root {role}=PATH or --datasets FILE.toml "
                            "(or --suite demo for the embedded data).")
        if str(given[role]) == "embedded":
            from .datasets.embedded import build_embedded, role_dataset_name

            emb = build_embedded(cache / "embedded", roles=(role,), **suite.embedded)
            roots[role], names[role] = emb[role], role_dataset_name(role, **suite.embedded)
        else:
            root = Path(given[role]).expanduser()
            check_root(role, root)  # the layout now, not in a job hours later
            roots[role], names[role] = root, role
    return roots, names


def checkpoints(args, suite, results: Path) -> list:
    from .backbone import describe_checkpoint, write_random_checkpoint
    from .records import RANDOM_DIR

    if args.label and len(args.label) != len(args.ckpt):
        raise UserError(f"--label given {len(args.label)} times for {len(args.ckpt)} --ckpt; "
                        "give one label per checkpoint or none.")
    labels = args.label or [None] * len(args.ckpt)
    infos = [describe_checkpoint(p, lab, bool(args.trust_pickle))
             for p, lab in zip(args.ckpt, labels)]
    seen: dict[str, str] = {}
    for info in infos:
        if info.sha256 in seen:
            raise UserError(f"the same checkpoint is given twice: {seen[info.sha256]} and "
                            f"{info.path} have the same bytes (sha256 {info.sha256[:12]}...). "
                            "Give it once, with the --label you want (a label is only the row "
                            "name: changing it later recomputes nothing).")
        seen[info.sha256] = info.path
    want_random = suite.random_baseline if args.random_baseline is None else args.random_baseline
    if want_random:
        from pretrain.models import ModelSpec

        specs = {ModelSpec(i.arch, i.sobel, i.fc_dim) for i in infos}
        for spec in sorted(specs, key=str):
            name = f"random-{spec.arch}-{'sobel' if spec.sobel else 'rgb'}-fc{spec.fc_dim}"
            path = write_random_checkpoint(spec, results / RANDOM_DIR / f"{name}.pth")
            infos.append(describe_checkpoint(path, f"Random ({spec.arch}, same init)"))
    return infos


def gpu_hours(cell) -> float:
    """The estimated GPU-hours of ``cell`` (evaluations.tasks.estimate_gpu_hours)."""
    from .tasks import estimate_gpu_hours, get_task

    return estimate_gpu_hours(get_task(cell.task), cell.config, cell.dataset)


def fmt_hours(hours: float) -> str:
    """``~24.0 GPU-h``, ``~0.37 GPU-h``, ``<0.01 GPU-h``."""
    if hours < 0.005:
        return "<0.01 GPU-h"
    return f"~{hours:.1f} GPU-h" if hours >= 1 else f"~{hours:.2f} GPU-h"


def print_matrix(groups: dict, todo: list, skipped: list, executor: str) -> None:
    from .tasks import get_task

    print(f"executor: {executor}; {len(todo)} cell(s) to run, {len(skipped)} already done")
    for res, cells in groups.items():
        r = asdict(cells[0].resources)
        print(f"\narray of {len(cells)} task(s): gpus={r['gpus_per_node']} cpus={r['cpus_per_task']} "
              f"mem={r['mem_gb']}G time={r['timeout_min']}min partition={r['partition']} "
              f"parallelism={r['array_parallelism']}; {fmt_hours(sum(map(gpu_hours, cells)))}")
        for task in sorted({c.task for c in cells}):
            print(f"  {task}: {get_task(task).description}")
        for c in cells:
            print(f"  {c.key:44s} {c.task:11s} {c.dataset:9s} seed={c.seed} "
                  f"ckpt={c.checkpoint.label} {fmt_hours(gpu_hours(c))}")
    for c in skipped:
        print(f"  skip {c.key} (record exists)")
    print(f"\ntotal: {fmt_hours(sum(map(gpu_hours, todo)))} for {len(todo)} cell(s) in "
          f"{len(groups)} array(s): each cell's recipe on the paper's full datasets and network, "
          "one P100-class GPU")
    embedded = sum(c.dataset_name.startswith("embedded/") for c in todo)
    if embedded:
        print(f"  {embedded} of them read embedded data, far smaller than the paper's datasets: "
              "they take far less")


class Stopped(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: stop what this process started, record nothing false."""


def _on_sigterm(signum, frame):
    raise Stopped()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the embedded data's cache folder
        from dcbench.core import WRITE_ERRORS, write_error

        if e.errno not in WRITE_ERRORS:
            raise
        print(f"error: {write_error(Path(e.filename or args.results), e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # before any cell was submitted
        print(f"run_all: stopped by {'SIGTERM' if isinstance(e, Stopped) else 'SIGINT'} before "
              "submitting anything; nothing was recorded.", file=sys.stderr)
        return 143 if isinstance(e, Stopped) else 130


@dataclass
class Outcome:
    """How the submitted cells ended: done, failed (with error and log), or not finished
    because run_all was stopped (cancelled here, or still running as SLURM jobs)."""

    done: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    unfinished: list = field(default_factory=list)
    stopped: KeyboardInterrupt | None = None


def _main(args) -> int:
    from dcbench.core import remove_stale_temps, write_error

    from . import claims, legacy, records
    from .suites import build_cells, filter_tasks, load_suite

    t0 = time.perf_counter()
    executor_kind = args.executor
    if executor_kind == "auto":
        executor_kind = "slurm" if shutil.which("sbatch") else "local"
    if executor_kind == "slurm" and not shutil.which("sbatch"):
        raise UserError("--executor slurm needs SLURM's sbatch on PATH, and none was found. "
                        "Use --executor local (subprocesses here) or debug (in-process), or start a "
                        "local cluster: python -m slurm.local_cluster start --dir DIR.")
    suite = load_suite(args.suite)
    suite = filter_tasks(suite, [t for t in (args.tasks or "").split(",") if t])
    results = Path(args.results).expanduser().resolve()
    if not args.dry_run:
        try:
            results.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(results, e) from None
    infos = checkpoints(args, suite, results)
    roots, names = parse_roots(args, suite, Path(args.cache).expanduser())
    overrides = {k: v for k, v in {"partition": args.partition, "timeout_min": args.timeout_min,
                                   "array_parallelism": args.array_parallelism}.items()
                 if v is not None}
    runtime = {k: v for k, v in {"workers": args.workers, "device": args.device,
                                 "trust_pickle": args.trust_pickle}.items() if v is not None}
    cells = build_cells(suite, infos, roots, names, overrides, runtime, results)
    if not args.dry_run:
        for info in infos:
            remove_stale_temps(results / info.id)
            records.write_checkpoint_info(results, info)
    done_keys = {c.key for c in cells
                 if records.is_done(results, c.checkpoint.id, c.key, repair=not args.dry_run)
                 or (not args.dry_run and legacy.migrate(c))}
    skipped = [c for c in cells if c.key in done_keys]
    todo = [c for c in cells if c.key not in done_keys]
    if args.dry_run:
        print_matrix(_groups(todo), todo, skipped, executor_kind)
        return 0
    busy, mine = [], []
    for c in todo:
        why = claims.claim(claims.claim_path(results, c.checkpoint.id, c.key))
        if why:
            busy.append((c, why))
        else:
            mine.append(c)
    out = _submit_and_wait(_groups(mine), results, executor_kind, suite.name)
    _summary(out, skipped, busy, time.perf_counter() - t0, results, executor_kind)
    if out.stopped is not None:
        return 143 if isinstance(out.stopped, Stopped) else 130
    return 1 if out.failed else (3 if busy else 0)


def _groups(cells) -> dict:
    groups: dict = defaultdict(list)
    for c in cells:
        groups[c.resources.key()].append(c)
    return groups


def _submit_and_wait(groups, results: Path, executor_kind: str, suite_name: str) -> Outcome:
    from submitit.core.utils import FailedJobError
    from tqdm import tqdm

    from slurm.launch import (CheckpointableJob, error_summary, make_executor, submit_array,
                              wait)

    from . import claims, records
    from .worker import failure_of, run_cell

    out = Outcome()
    jobs_all: list = []
    claim = {c.key: claims.claim_path(results, c.checkpoint.id, c.key)
             for cells in groups.values() for c in cells}
    finished: set[str] = set()
    submitted: set[str] = set()
    try:
        for _, cells in groups.items():
            ex = make_executor(executor_kind, results / "_logs", cells[0].resources,
                               f"dc-{suite_name}", preload=CELL_MODULES)
            try:
                # on SLURM's time-limit / preemption signal the job requeues itself and the
                # cell resumes from its saved training state
                jobs = submit_array(ex, CheckpointableJob(run_cell), cells)
            except FailedJobError as e:
                r = cells[0].resources
                raise UserError(f"the scheduler refused the array of {len(cells)} cell(s) "
                                f"(gpus={r.gpus_per_node}, cpus={r.cpus_per_task}, "
                                f"mem={r.mem_gb}G, time={r.timeout_min}min, partition="
                                f"{r.partition}): {str(e).strip().splitlines()[-1]} Fix the "
                                "suite's [resources] or pass --partition / --timeout-min.") from None
            jobs_all += list(zip(jobs, cells))
            submitted.update(c.key for c in cells)
            if executor_kind == "slurm":
                for job, c in zip(jobs, cells):
                    claims.set_job(claim[c.key], str(job.job_id))
            log.info("submitted %d cell(s) as %s", len(cells),
                     ", ".join(str(j.job_id) for j in jobs[:3]) + (" ..." if len(jobs) > 3 else ""))
        by_job = {id(j): c for j, c in jobs_all}
        bar = tqdm(total=len(jobs_all), desc="cells", unit="cell")

        def on_done(outcome):
            job, error = outcome.job, outcome.error
            log_paths = str(outcome.stderr) if outcome.stderr else "(no log: in-process job)"
            cell = by_job[id(job)]
            finished.add(cell.key)
            claims.release(claim[cell.key])
            if error is None:
                out.done.append(cell)
            else:
                fpath = records.failure_path(results, cell.checkpoint.id, cell.key)
                if not fpath.exists():  # the job died before the worker could say why
                    try:
                        records.write_failure(results, cell.checkpoint.id, replace(
                            failure_of(cell, error_summary(error)[:500], log_paths),
                            job_id=str(job.job_id)))
                    except UserError as e:  # e.g. the disk that failed the cell is full
                        log.warning("could not record the failure of %s: %s", cell.key, e)
                out.failed.append((cell, error, log_paths))
            bar.update(1)

        wait([j for j, _ in jobs_all], on_done=on_done)
        bar.close()
    except KeyboardInterrupt as e:
        out.stopped = e
        out.unfinished = _stop(jobs_all, finished, executor_kind)
    finally:  # whatever ended this: no claim outlives its cell, but a live SLURM job's
        for key, path in claim.items():
            if key not in finished and not (executor_kind == "slurm" and key in submitted):
                claims.release(path)
    return out


def _stop(jobs_all, finished: set[str], executor_kind: str) -> list:
    """Kill the unfinished local jobs this process started (their claims are released by the
    caller); SLURM jobs go on. Returns the unfinished (cell, job id) pairs."""
    from slurm.launch import kill_local_jobs

    unfinished = [(j, c) for j, c in jobs_all if c.key not in finished]
    if executor_kind == "local":
        kill_local_jobs([j for j, _ in unfinished])
    return [(c, str(j.job_id)) for j, c in unfinished]


def _summary(out: Outcome, skipped, busy, seconds: float, results: Path,
             executor_kind: str) -> None:
    from slurm.launch import error_summary

    how = ""
    if out.stopped is not None:
        how = f"stopped by {'SIGTERM' if isinstance(out.stopped, Stopped) else 'SIGINT'}: "
    print(f"\nrun_all: {how}{len(out.done)} done, {len(skipped)} skipped (record exists), "
          f"{len(out.failed)} failed, {len(out.unfinished)} not finished, {len(busy)} left to "
          f"others in {seconds:.1f}s; records under {results}")
    for cell, error, log_paths in out.failed:
        print(f"  FAILED {cell.key}: {error_summary(error)[:300]}\n    log: {log_paths}")
    if out.unfinished and executor_kind == "slurm":
        print(f"  {len(out.unfinished)} cell(s) go on as SLURM jobs "
              f"({', '.join(j for _, j in out.unfinished[:5])}"
              f"{' ...' if len(out.unfinished) > 5 else ''}); rerun this command later to "
              "collect their records: it does not resubmit them while they are queued or run.")
    elif out.unfinished:
        print(f"  not finished (cancelled, nothing recorded): "
              f"{', '.join(c.key for c, _ in out.unfinished)}\n  rerun the same command to "
              "compute them.")
    for cell, why in busy:
        print(f"  SKIPPED {cell.key}: {why}")
    if busy:
        print("  rerun this command when they are done to collect their records.")


if __name__ == "__main__":
    sys.exit(main())
