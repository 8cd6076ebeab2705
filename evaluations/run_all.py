"""``python -m evaluations.run_all --ckpt model.pth``: every evaluation of a suite, as records.

Builds the cells (checkpoint x task x dataset x seed), skips those whose record file exists,
submits the rest through submitit (one SLURM array per resource group; ``local`` runs them
as subprocesses here, ``debug`` in this process), shows progress, and ends with a summary
(done / skipped / failed with each failure's log). Exit code 1 if any cell failed, 2 on a
usage error.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path

from dcbench.core import UserError

log = logging.getLogger("evaluations.run_all")
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
                   help="dataset root of a role (imagenet, places); 'embedded' builds the demo data")
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
                   help="print the job matrix and the resources of each array; submit nothing")
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
    from .datasets import READERS
    from .suites import needed_roles

    roots, names = {}, {}
    for role in needed_roles(suite):
        if role not in given:
            raise UserError(f"no dataset root for role {role!r} (needed by suite {suite.name}). "
                            f"Pass --data-root {role}=PATH or --datasets FILE.toml "
                            "(or --suite demo for the embedded data).")
        if str(given[role]) == "embedded":
            from .datasets.embedded import DATASET_NAMES, build_embedded

            emb = build_embedded(cache / "embedded", **suite.embedded)
            roots[role], names[role] = emb[role], DATASET_NAMES[role]
        else:
            root = Path(given[role]).expanduser()
            READERS[role](root, "val")  # validates the layout now, not in a job hours later
            roots[role], names[role] = root, role
    return roots, names


def checkpoints(args, suite, results: Path) -> list:
    from .backbone import describe_checkpoint, write_random_checkpoint

    if args.label and len(args.label) != len(args.ckpt):
        raise UserError(f"--label given {len(args.label)} times for {len(args.ckpt)} --ckpt; "
                        "give one label per checkpoint or none.")
    labels = args.label or [None] * len(args.ckpt)
    infos = [describe_checkpoint(p, lab, bool(args.trust_pickle))
             for p, lab in zip(args.ckpt, labels)]
    want_random = suite.random_baseline if args.random_baseline is None else args.random_baseline
    if want_random:
        from pretrain.models import ModelSpec

        specs = {ModelSpec(i.arch, i.sobel, i.fc_dim) for i in infos}
        for spec in sorted(specs, key=str):
            name = f"random-{spec.arch}-{'sobel' if spec.sobel else 'rgb'}-fc{spec.fc_dim}"
            path = write_random_checkpoint(spec, results / "_random" / f"{name}.pth")
            infos.append(describe_checkpoint(path, f"Random ({spec.arch}, same init)"))
    return infos


def clean_temp_files(results: Path, older_than_s: float = 600) -> int:
    """Remove temp files a killed writer left behind (never a finished record). A write takes
    milliseconds: only files older than ``older_than_s`` are stale, so a job that is still
    running elsewhere never loses the file it is about to rename."""
    n = 0
    now = time.time()
    for p in results.glob("*/.*.tmp"):
        try:
            if now - p.stat().st_mtime > older_than_s:
                p.unlink()
                n += 1
        except FileNotFoundError:
            pass
    return n


def print_matrix(groups: dict, todo: list, skipped: list, executor: str) -> None:
    from .tasks import get_task

    print(f"executor: {executor}; {len(todo)} cell(s) to run, {len(skipped)} already done")
    for res, cells in groups.items():
        r = asdict(cells[0].resources)
        print(f"\narray of {len(cells)} task(s): gpus={r['gpus_per_node']} cpus={r['cpus_per_task']} "
              f"mem={r['mem_gb']}G time={r['timeout_min']}min partition={r['partition']} "
              f"parallelism={r['array_parallelism']}")
        for task in sorted({c.task for c in cells}):
            print(f"  {task}: {get_task(task).description}")
        for c in cells:
            print(f"  {c.key:44s} {c.task:11s} {c.dataset:9s} seed={c.seed} "
                  f"ckpt={c.checkpoint.label}")
    for c in skipped:
        print(f"  skip {c.key} (record exists)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (PermissionError, NotADirectoryError, FileExistsError) as e:
        print(f"error: cannot write {e.filename}: {e.strerror}. Pass a writable folder to "
              "--results / --cache.", file=sys.stderr)
        return 2


def _main(args) -> int:
    from slurm.launch import make_executor

    from . import legacy, records
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
    infos = checkpoints(args, suite, results)
    roots, names = parse_roots(args, suite, Path(args.cache).expanduser())
    overrides = {k: v for k, v in {"partition": args.partition, "timeout_min": args.timeout_min,
                                   "array_parallelism": args.array_parallelism}.items()
                 if v is not None}
    runtime = {k: v for k, v in {"workers": args.workers, "device": args.device,
                                 "trust_pickle": args.trust_pickle}.items() if v is not None}
    cells = build_cells(suite, infos, roots, names, overrides, runtime, results)
    if not args.dry_run:
        clean_temp_files(results)
    done_keys = {c.key for c in cells if records.is_done(results, c.checkpoint.id, c.key)
                 or (not args.dry_run and legacy.migrate(c))}
    skipped = [c for c in cells if c.key in done_keys]
    todo = [c for c in cells if c.key not in done_keys]
    groups: dict = defaultdict(list)
    for c in todo:
        groups[c.resources.key()].append(c)
    if args.dry_run:
        print_matrix(groups, todo, skipped, executor_kind)
        return 0
    done, failed = _submit_and_wait(groups, results, executor_kind, suite.name, make_executor)
    _summary(done, skipped, failed, time.perf_counter() - t0, results)
    return 1 if failed else 0


def _submit_and_wait(groups, results: Path, executor_kind: str, suite_name: str, make_executor):
    from submitit.core.utils import FailedJobError
    from tqdm import tqdm

    from slurm.launch import error_summary, submit_array, wait

    from . import records
    from .worker import failure_of, run_cell

    done, failed = [], []
    jobs_all = []
    logs = results / "_logs"
    for _, cells in groups.items():
        ex = make_executor(executor_kind, logs, cells[0].resources, f"dc-{suite_name}")
        try:
            jobs = submit_array(ex, run_cell, cells)
        except FailedJobError as e:
            r = cells[0].resources
            raise UserError(f"the scheduler refused the array of {len(cells)} cell(s) "
                            f"(gpus={r.gpus_per_node}, cpus={r.cpus_per_task}, mem={r.mem_gb}G, "
                            f"time={r.timeout_min}min, partition={r.partition}): "
                            f"{str(e).strip().splitlines()[-1]} Fix the suite's [resources] or "
                            "pass --partition / --timeout-min.") from None
        jobs_all += list(zip(jobs, cells))
        log.info("submitted %d cell(s) as %s", len(cells), ", ".join(str(j.job_id) for j in jobs[:3])
                 + (" ..." if len(jobs) > 3 else ""))
    by_job = {id(j): c for j, c in jobs_all}
    bar = tqdm(total=len(jobs_all), desc="cells", unit="cell")

    def on_done(outcome):
        job, error = outcome.job, outcome.error
        log_paths = str(outcome.stderr) if outcome.stderr else "(no log: in-process job)"
        cell = by_job[id(job)]
        if error is None:
            done.append(cell)
        else:
            fpath = records.failure_path(results, cell.checkpoint.id, cell.key)
            if not fpath.exists():  # the job died before the worker could say why
                records.write_failure(results, cell.checkpoint.id, replace(
                    failure_of(cell, error_summary(error)[:500], log_paths),
                    job_id=str(job.job_id)))
            failed.append((cell, error, log_paths))
        bar.update(1)

    wait([j for j, _ in jobs_all], on_done=on_done)
    bar.close()
    return done, failed


def _summary(done, skipped, failed, seconds: float, results: Path) -> None:
    from slurm.launch import error_summary

    print(f"\nrun_all: {len(done)} done, {len(skipped)} skipped (record exists), "
          f"{len(failed)} failed in {seconds:.1f}s; records under {results}")
    for cell, error, log_paths in failed:
        print(f"  FAILED {cell.key}: {error_summary(error)[:300]}\n    log: {log_paths}")


if __name__ == "__main__":
    sys.exit(main())
