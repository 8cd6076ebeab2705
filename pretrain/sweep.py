"""``python -m pretrain.sweep``: the k ablation (paper Fig. 2c) as one command.

    python -m pretrain.sweep --k 10 30 100 --preset demo --out runs/ksweep
    python -m pretrain.sweep --k 1000 3000 10000 30000 100000 --preset paper --epochs 300 \\
        --data /datasets/imagenet --data-root voc07=/datasets/VOCdevkit --out runs/ksweep \\
        --executor slurm --cluster-config cluster.toml

1. Pretrains one DeepCluster run per k, in ``<out>/k<K>/``, as ONE submitit array
   (``--executor local``, the default: subprocesses on this machine, as many at a time as the
   jobs' resources allow -- one when they ask for a GPU; ``slurm``: one SLURM array whose jobs
   requeue themselves at the time limit).
   The runs' settings are the ``--preset``'s with the pretraining flags given here; they
   differ only in k. A k whose run has finished (``checkpoint.pth`` at ``--epochs``) is not
   resubmitted; a k with a partial run continues it from its last epoch. Everything the user
   can get wrong (the k list, k > the number of images, a run folder holding a run with other
   settings, the evaluation's dataset roots, the resources) is refused before anything is
   submitted.
2. Evaluates every checkpoint with the suite's cells (``k_ablation``: VOC07 classification,
   fc6-8, train -> val, the paper's recipe; ``k_ablation_demo`` under ``--preset demo``: the
   same on the embedded VOC07 at the demo's scale) through ``evaluations.run_all``, into
   ``--results`` (default ``<out>/results``); a rerun skips cells whose record exists.
3. Renders the VOC table and the figures (``k_ablation.png/.pdf``: mAP against k, and
   ``nmi.png/.pdf`` of the runs) with ``tables/render.py`` into ``--tables`` (default
   ``<out>/tables``) and prints mAP per k.

Exit codes: 0 done; 1 a pretraining job or an evaluation cell failed (rerun the same command
after fixing the cause: finished work is kept); 2 a usage error; 3 evaluation cells are being
computed by another process (rerun later); 130 / 143 stopped by SIGINT / SIGTERM.
"""
from __future__ import annotations

import argparse
import logging
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from dcbench.core import UserError

from .config import PRESETS, PretrainConfig, preset_config

log = logging.getLogger(__name__)
EXECUTORS = ("local", "slurm")
EVAL_COLUMN = "classification/fc6-8"  # the k ablation's column (table "voc")
# settings a run folder's run may differ in from this sweep's: how it runs, not what it
# computes; ``lr_rule`` is a note on ``lr``; ``epochs`` is compared apart (a shorter run is
# continued)
class JobsFailed(UserError):
    """Some pretraining jobs failed (exit code 1, not a usage error)."""


@dataclass(frozen=True)
class KRun:
    """One k of the sweep: its settings, its run folder, and the epochs already trained there."""

    k: int
    cfg: PretrainConfig
    out: Path
    trained: int = 0  # epochs in out/checkpoint.pth (0: no run yet)

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoint.pth"

    @property
    def finished(self) -> bool:
        return self.trained >= self.cfg.epochs

    def describe(self) -> str:
        if self.finished:
            return f"finished ({self.trained} epochs), not resubmitted"
        if self.trained:
            return f"continues from epoch {self.trained} of {self.cfg.epochs}"
        return f"new run of {self.cfg.epochs} epochs"


# ------------------------------------------------------------------ the k list and the configs


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """The k values, ascending; one error for an empty list, a k < 2 or a repeated k."""
    if not ks:
        raise UserError("--k needs at least one number of clusters, e.g. --k 10 30 100.")
    bad = [k for k in ks if k < 2]
    if bad:
        raise UserError(f"--k {' '.join(map(str, ks))}: every k must be >= 2 clusters (got "
                        f"{', '.join(map(str, bad))}). Give k values such as --k 10 30 100.")
    repeated = sorted({k for k in ks if list(ks).count(k) > 1})
    if repeated:
        raise UserError(f"--k {' '.join(map(str, ks))} lists k = {', '.join(map(str, repeated))} "
                        "more than once: give each k once.")
    if len(ks) < 2:
        log.warning("--k %d: one value of k gives no curve (the figure needs two or more)", ks[0])
    return tuple(sorted(ks))


def k_configs(preset: str, ks: Sequence[int], overrides: dict) -> dict[int, PretrainConfig]:
    """One validated config per k: the preset with ``overrides``, differing only in k."""
    if overrides.get("k") is not None:
        raise ValueError("k comes from the sweep's --k list, not from the overrides")
    return {k: preset_config(preset, **{**overrides, "k": k}).validate() for k in ks}


def image_count(cfg: PretrainConfig) -> tuple[int, str]:
    """(N, description) of the images a run of ``cfg`` clusters (the training loop's own
    reader: the first ``--subset`` images of ``--data`` or ``--dataset``)."""
    from .train import load_pretrain_data

    make_dataset, _, desc = load_pretrain_data(cfg)
    return len(make_dataset(None)), desc


def check_ks_fit(ks: Sequence[int], n: int, desc: str, cfg: PretrainConfig) -> None:
    """One error naming every k that exceeds the N images (a cluster per image at most)."""
    too_many = [k for k in ks if k > n]
    if too_many:
        more = (f"raise --subset (now {cfg.subset}) or " if cfg.subset is not None else "")
        raise UserError(f"--k {', '.join(map(str, too_many))} exceeds the number of images "
                        f"N={n} in {desc}: k-means cannot make more clusters than images. "
                        f"Lower those k (at most {n}), or {more}pretrain on more images.")


# ------------------------------------------------------------------ what is there already


def run_folder(out: Path, k: int) -> Path:
    return out / f"k{k}"


def setting_differences(saved: dict, cfg: PretrainConfig) -> dict[str, tuple]:
    """The settings a run cannot continue under (``PretrainConfig.SHAPE_FIELDS``, as
    ``--resume`` checks them) in which a saved run differs from ``cfg``; a setting the saved
    config lacks (a run older than the setting) had its default."""
    defaults = {f.name: f.default for f in fields(PretrainConfig)}
    return {name: (saved.get(name, defaults[name]), getattr(cfg, name))
            for name in PretrainConfig.SHAPE_FIELDS
            if saved.get(name, defaults[name]) != getattr(cfg, name)}


def trained_epochs(cfg: PretrainConfig, folder: Path) -> int:
    """Epochs of the run in ``folder`` (0 if none); an error when that run is not one of
    ``cfg`` (other settings, or more epochs than ``cfg.epochs``)."""
    from .checkpoint import FORMAT, read_checkpoint_file

    path = folder / "checkpoint.pth"
    if not path.exists():
        return 0
    ck = read_checkpoint_file(path)
    if ck.get("format") != FORMAT or not isinstance(ck.get("epoch"), int) \
            or not isinstance(ck.get("config"), dict):
        raise UserError(f"{path} is not a pretraining run of this suite (no format, epoch and "
                        f"config): move it away, or pass another --out.")
    diff = setting_differences(ck["config"], cfg)
    if diff:
        listed = ", ".join(f"{name} (run {a!r}, now {b!r})" for name, (a, b) in diff.items())
        raise UserError(f"{folder} holds a run of k={cfg.k} with other settings: {listed}"
                        f". Rerun with the run's settings (see {folder / 'config.json'}), or "
                        "pass another --out.")
    if ck["epoch"] > cfg.epochs:
        raise UserError(f"{folder} holds a run of {ck['epoch']} epochs, more than --epochs "
                        f"{cfg.epochs}: pass --epochs {ck['epoch']} to evaluate it, or another "
                        "--out.")
    return ck["epoch"]


def plan(cfgs: dict[int, PretrainConfig], out: Path) -> list[KRun]:
    """Every k with its run folder and what is already trained there."""
    return [KRun(k, cfg, run_folder(out, k), trained_epochs(cfg, run_folder(out, k)))
            for k, cfg in cfgs.items()]


# ------------------------------------------------------------------ the evaluation's inputs


def default_suite(preset: str) -> str:
    return "k_ablation_demo" if preset == "demo" else "k_ablation"


def check_eval_inputs(suite_name: str, data_roots: Sequence[str], datasets_file: str | None,
                      arch: str) -> None:
    """Before any pretraining: the suite loads, every role it reads has a root (embedded
    roots are built later by run_all), real roots have their layout, and the suite's tasks
    take the runs' architecture."""
    from evaluations.datasets import check_root
    from evaluations.datasets.common import read_datasets_file
    from evaluations.suites import load_suite, needed_roles
    from evaluations.tasks import get_task

    suite = load_suite(suite_name)
    given: dict[str, str | Path] = dict(suite.datasets)
    if datasets_file:
        given.update(read_datasets_file(datasets_file))
    for item in data_roots:
        role, sep, path = item.partition("=")
        if not sep or not role or not path:
            raise UserError(f"--data-root {item!r} must be ROLE=PATH, e.g. "
                            "voc07=/data/VOCdevkit.")
        given[role] = path
    for role in needed_roles(suite):
        if role not in given:
            raise UserError(f"no dataset root for role {role!r}, which suite {suite.name} "
                            f"evaluates on: pass --data-root {role}=PATH or --datasets "
                            "FILE.toml (or --suite k_ablation_demo for the embedded VOC07).")
        if str(given[role]) != "embedded":
            check_root(role, Path(given[role]).expanduser())
    for spec in suite.cells:
        task = get_task(spec.task)
        if arch not in task.archs:
            raise UserError(f"suite {suite.name}'s task {task.name} needs a network with "
                            f"fc6/fc7 ({' or '.join(task.archs)}), not --arch {arch}.")


# ------------------------------------------------------------------ pretraining


def job_name(out: Path) -> str:
    """A SLURM job name from the sweep folder's name (characters sbatch takes)."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", f"dc-ksweep-{out.name}")[:60]


def pretrain_runs(runs: Sequence[KRun], out: Path, kind: str, res) -> None:
    """Submit the unfinished runs as one array, wait; one error naming each failed k."""
    from slurm.launch import (CheckpointableJob, error_summary, kill_local_jobs, make_executor,
                              submit_array, wait)

    from .cluster import pretrain_job

    todo = [r for r in runs if not r.finished]
    if not todo:
        print("every k is pretrained already: nothing to submit", flush=True)
        return
    executor = make_executor(kind, out / "_logs", res, job_name(out))
    jobs = submit_array(executor, CheckpointableJob(pretrain_job),
                        [(r.cfg, str(r.out)) for r in todo])
    print(f"submitted {len(jobs)} pretraining job(s) as one array ({kind}: "
          f"{res.gpus_per_node} GPU, {res.cpus_per_task} CPUs, {res.mem_gb:g} GB, "
          f"{res.timeout_min} min per run, requeued at the limit): "
          + ", ".join(f"k={r.k} job {j.job_id}" for r, j in zip(todo, jobs))
          + f"; logs in {out / '_logs'}", flush=True)
    try:
        outcomes = wait(jobs)
    except KeyboardInterrupt:
        if kind == "slurm":
            print("stopped waiting; the jobs go on under SLURM (scancel "
                  + " ".join(str(j.job_id) for j in jobs) + " to stop them); rerun this "
                  "command to continue", flush=True)
        else:
            kill_local_jobs(jobs)
        raise
    failed = [(r, o) for r, o in zip(todo, outcomes) if not o.ok]
    if failed:
        raise JobsFailed("pretraining failed for "
                         + "; ".join(f"k={r.k} (job {o.job.job_id}: {error_summary(o.error)}; "
                                     f"log: {o.stderr})" for r, o in failed)
                         + ". Fix the cause and rerun the same command: finished k are kept, "
                         "the others continue from their last epoch.")


# ------------------------------------------------------------------ evaluation and rendering


@dataclass(frozen=True)
class EvalPlan:
    """What run_all is asked for: the suite, where records go, and pass-through flags."""

    suite: str
    executor: str
    results: Path
    data_roots: tuple[str, ...] = ()
    datasets: str | None = None
    cache: str | None = None
    partition: str | None = None
    array_parallelism: int | None = None


def label(k: int) -> str:
    return f"DeepCluster k={k}"


def run_all_argv(runs: Sequence[KRun], ev: EvalPlan) -> list[str]:
    """``evaluations.run_all``'s arguments: every checkpoint with its label, the suite."""
    argv = ["--suite", ev.suite, "--executor", ev.executor, "--results", str(ev.results),
            "--no-random-baseline"]
    for r in runs:
        argv += ["--ckpt", str(r.checkpoint), "--label", label(r.k)]
    for item in ev.data_roots:
        argv += ["--data-root", item]
    optional = {"--datasets": ev.datasets, "--cache": ev.cache, "--partition": ev.partition,
                "--array-parallelism": ev.array_parallelism}
    for flag, value in optional.items():
        if value is not None:
            argv += [flag, str(value)]
    return argv


def evaluate(runs: Sequence[KRun], ev: EvalPlan) -> int:
    """run_all's exit code (0 done, 1 a cell failed, 3 cells left to others, ...)."""
    from evaluations import run_all

    argv = run_all_argv(runs, ev)
    print("evaluating: python -m evaluations.run_all " + shlex.join(argv), flush=True)
    return run_all.main(argv)


def render_tables(results: Path, tables: Path, runs: Sequence[KRun]) -> int:
    """tables/render.py on the sweep's records (the VOC table, Fig. 2c and the NMI curves)."""
    from tables import render

    return render.main(["--results", str(results), "--out", str(tables), "--tables", "voc",
                        "--logs", *(str(r.out) for r in runs), "-q"])


def map_per_k(results: Path, runs: Sequence[KRun]) -> dict[int, float]:
    """Mean VOC07 fc6-8 mAP (over seeds) of each run's checkpoint, by the k its records carry
    (``ckpt_k``, from the checkpoint), from the records of these very checkpoints."""
    from evaluations.backbone import describe_checkpoint
    from tables.collate import load_results

    ids = {describe_checkpoint(r.checkpoint).id for r in runs}
    df = load_results(results).records
    df = df[(df["table"] == "voc") & (df["column"] == EVAL_COLUMN) & df["ckpt_id"].isin(ids)
            & df["ckpt_k"].notna()]
    return {int(k): float(v) for k, v in df.groupby("ckpt_k")["value"].mean().items()}


def report(runs: Sequence[KRun], results: Path, tables: Path) -> list[int]:
    """Print mAP per k and where the figure and tables are; return the k without a value."""
    values = map_per_k(results, runs)
    print("\nk ablation: VOC07 classification mAP (fc6-8, train -> val) per k")
    print("| k | mAP |\n|---:|---:|")
    for r in runs:
        print(f"| {r.k} | {values[r.k]:.1f} |" if r.k in values else f"| {r.k} | missing |")
    figure = tables / "figures" / "k_ablation.png"
    print(f"figure: {figure} (and .pdf)" if figure.exists() else
          "figure: not written (it needs records of two or more k)")
    print(f"NMI per epoch: {tables / 'figures' / 'nmi.png'}; tables: {tables / 'voc.md'} "
          f"(.tex, .csv); records: {results}")
    return [r.k for r in runs if r.k not in values]


# ------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    from .__main__ import add_config_flags, add_resource_flags

    p = argparse.ArgumentParser(
        prog="python -m pretrain.sweep",
        description="The k ablation (paper Fig. 2c): pretrain one DeepCluster run per k (one "
        "job array), evaluate each on VOC07 classification fc6-8 (train -> val), plot mAP "
        "against k. Pretraining flags left out take the --preset's value (the paper trained "
        "each k for 300 epochs: --epochs 300).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--k", type=int, nargs="+", required=True, metavar="K",
                   help="the numbers of clusters, e.g. --k 1000 10000 100000")
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS),
                   help="paper: the paper's protocol; demo: the embedded Fashion-MNIST clutter")
    p.add_argument("--out", required=True, type=Path,
                   help="sweep folder: one run folder k<K>/ per k, job logs in _logs/")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: subprocesses here (one at a time when the jobs ask for a "
                        "GPU); slurm: one SLURM array")
    p.add_argument("--suite", default=None,
                   help="evaluation suite (default: k_ablation_demo with --preset demo, else "
                        "k_ablation), or FILE.toml")
    p.add_argument("--results", type=Path, default=None,
                   help="records folder (default: <out>/results)")
    p.add_argument("--tables", type=Path, default=None,
                   help="tables and figures folder (default: <out>/tables)")
    p.add_argument("--data-root", action="append", default=[], metavar="ROLE=PATH",
                   help="evaluation dataset root, e.g. voc07=/data/VOCdevkit")
    p.add_argument("--datasets", default=None, metavar="FILE.toml",
                   help="TOML file with a [datasets] table of role = \"path\"")
    p.add_argument("--cache", default=None,
                   help="where run_all builds the embedded data (default: its own)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    job = p.add_argument_group("pretraining jobs (resources: the paper's, then "
                               "--cluster-config, then these flags)")
    add_resource_flags(job, "a pretraining job")
    job.add_argument("--array-parallelism", type=int, default=None,
                     help="at most this many jobs of an array at once (also the evaluation's)")
    add_config_flags(p.add_argument_group("pretraining settings, the same for every k"),
                     skip=("k",))
    return p


def pretrain_overrides(args: argparse.Namespace) -> dict:
    """The pretraining settings given on the command line (None: the preset's)."""
    return {f.name: getattr(args, f.name) for f in fields(PretrainConfig)
            if f.name != "k" and hasattr(args, f.name)}


def sweep(args: argparse.Namespace) -> int:
    """Check everything, pretrain, evaluate, render; the exit code."""
    from .cluster import check_processes, resources

    ks = check_ks(args.k)
    cfgs = k_configs(args.preset, ks, pretrain_overrides(args))
    first = cfgs[ks[0]]
    res = resources(args.cluster_config, {
        "partition": args.partition, "timeout_min": args.timeout_min,
        "array_parallelism": args.array_parallelism, "gpus_per_node": args.gpus_per_node,
        "cpus_per_task": args.cpus_per_task, "mem_gb": args.mem_gb, "nodes": args.nodes,
        "tasks_per_node": args.tasks_per_node})
    for cfg in cfgs.values():
        check_processes(cfg, args.executor, res)
    suite = args.suite or default_suite(args.preset)
    check_eval_inputs(suite, args.data_root, args.datasets, first.arch)
    n, desc = image_count(first)
    check_ks_fit(ks, n, desc, first)
    out = args.out.expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the sweep (it is created "
                        "if missing).")
    runs = plan(cfgs, out)
    print(f"k ablation in {out}: {len(ks)} values of k on {desc} (N={n})")
    for r in runs:
        print(f"  k={r.k}: {r.out} -- {r.describe()}")
    pretrain_runs(runs, out, args.executor, res)
    runs = plan(cfgs, out)  # what the jobs left: every run finished
    unfinished = [r.k for r in runs if not r.finished]
    if unfinished:
        raise JobsFailed(f"the runs of k={unfinished} did not reach {first.epochs} epochs; "
                         "rerun the same command to continue them.")
    results = (args.results or out / "results").expanduser().resolve()
    tables = (args.tables or out / "tables").expanduser().resolve()
    rc = evaluate(runs, EvalPlan(suite, args.executor, results, tuple(args.data_root),
                                 args.datasets, args.cache, args.partition,
                                 args.array_parallelism))
    if rc not in (0, 1, 3):  # a usage error (run_all printed it) or stopped: nothing to plot
        return rc
    render_rc = render_tables(results, tables, runs)
    if render_rc == 0:
        missing = report(runs, results, tables)
        if missing and rc == 0:
            print(f"warning: no {EVAL_COLUMN} record of k={missing} under {results} (does "
                  f"--suite {suite} evaluate VOC07 classification fc6-8?)", file=sys.stderr)
    if rc == 3:
        print("some cells are computed by another process: rerun this command later to "
              "collect them", file=sys.stderr)
    return rc or render_rc


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return sweep(args)
    except JobsFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue (finished k are kept)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
