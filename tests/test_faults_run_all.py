"""Fault injection for run_all: SIGTERM and Ctrl-C under the local executor, two run_all on
one results folder, a truncated cell file, temp litter, a full disk, relabelling, the same
checkpoint twice, and strings that would reach an sbatch script. After each: nothing false
recorded, nothing stuck, the rerun completes the rest, one clear message."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import load_fixture_module
from dcbench.core import pid_alive, read_owner
from evaluations import records

REPO = Path(__file__).resolve().parent.parent
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
pytestmark = pytest.mark.skipif(not FMNIST.exists(), reason="apt-get install dataset-fashion-mnist")
lc = load_fixture_module("legacy_checkpoints.py", "legacy_checkpoints_fixture")

SUITE = """
name = "faults"
[datasets]
imagenet = "embedded"
places = "embedded"
[embedded]
n_train_per_class = 4
n_val_per_class = 2
[resources]
cpus_per_task = 2
mem_gb = 2
timeout_min = 10
[runtime]
workers = 0
[[cell]]
task = "linear"
datasets = ["imagenet", "places"]
seeds = [0, 1]
[cell.config]
epochs = {epochs}
batch_size = 8
layers = ["conv1", "conv3"]
input_size = 64
resize_size = 72
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    ckpt = root / "released.pth"
    lc.write_released_checkpoint(ckpt, "alexnet", fc_dim=32, k=None, seed=0)
    (root / "quick.toml").write_text(SUITE.format(epochs=1))
    (root / "slow.toml").write_text(SUITE.format(epochs=8))
    cache = root / "cache"
    warm = cmd(root, ckpt, cache, root / "warm", "quick.toml", "--dry-run")  # builds the data
    assert subprocess.run(warm, cwd=REPO, capture_output=True).returncode == 0
    return {"root": root, "ckpt": ckpt, "cache": cache}


def cmd(root: Path, ckpt: Path, cache: Path, results: Path, suite: str, *extra: str) -> list:
    return [sys.executable, "-m", "evaluations.run_all", "--ckpt", str(ckpt), "--suite",
            str(root / suite), "--cache", str(cache), "--results", str(results), *extra]


def run_all(env, results, suite="quick.toml", *extra, **kw):
    return subprocess.run(cmd(env["root"], env["ckpt"], env["cache"], results, suite, *extra),
                          cwd=REPO, capture_output=True, text=True, timeout=600, **kw)


def files(results: Path, pattern: str) -> list[Path]:
    return sorted(results.glob(f"*/{pattern}"))


def cells(results: Path) -> list[Path]:
    return [p for p in files(results, "*.json") if not p.name.endswith(".failed.json")
            and not p.name.startswith(".")]


def values(results: Path) -> dict:
    return {(r.cell_key, r.column, r.selection, r.variant): r.value
            for f in cells(results) for r in records.read_results_file(f).records}


def wait_for(cond, timeout=300, what=""):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def worker_running(results: Path, parent: int) -> list[int]:
    """pids of jobs that took a claim (a claim held by another pid than run_all's)."""
    pids = [read_owner(p).pid for p in files(results, "*.claim")]
    return [p for p in pids if p != parent and pid_alive(p)]


@pytest.fixture(scope="module")
def clean(env, tmp_path_factory) -> dict:
    """The numbers of an uninterrupted run of the quick suite."""
    res = tmp_path_factory.mktemp("clean") / "res"
    p = run_all(env, res, "quick.toml", "--executor", "debug")
    assert p.returncode == 0, p.stderr[-2000:]
    return values(res)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopping_run_all_stops_its_jobs_and_records_nothing_false(env, tmp_path, sig):
    results = tmp_path / "res"
    proc = subprocess.Popen(cmd(env["root"], env["ckpt"], env["cache"], results, "slow.toml",
                                "--executor", "local"), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: worker_running(results, proc.pid), what="a running cell")
    workers = worker_running(results, proc.pid)
    if sig == signal.SIGINT:  # Ctrl-C: the whole foreground process group gets it
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    name = "SIGTERM" if sig == signal.SIGTERM else "SIGINT"
    assert f"stopped by {name}" in out and "not finished" in out and "rerun the same" in out
    wait_for(lambda: not any(pid_alive(p) for p in workers), timeout=30, what="workers to exit")
    assert not files(results, "*.failed.json")  # a stop is not a failure
    assert not files(results, "*.claim") and not files(results, ".*.tmp")
    assert not cells(results)  # 8 epochs take longer than the wait: nothing finished
    rerun = run_all(env, results, "quick.toml", "--executor", "local")
    assert rerun.returncode == 0 and "4 done, 0 skipped" in rerun.stdout, rerun.stdout


def test_two_run_all_on_one_folder_compute_each_cell_once(env, tmp_path, clean):
    results = tmp_path / "res"
    first = subprocess.Popen(cmd(env["root"], env["ckpt"], env["cache"], results, "quick.toml",
                                 "--executor", "local"), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(files(results, "*.claim")) == 4, what="the first run's claims")
    second = run_all(env, results, "quick.toml", "--executor", "local")
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert "4 done" in out
    assert second.returncode == 3, second.stdout  # 3: cells left to another process
    done = int(second.stdout.split("run_all:")[1].split(" done")[0])
    assert done + int(out.split("run_all:")[1].split(" done")[0]) == 4  # each cell once
    assert "being computed by pid" in second.stdout
    third = run_all(env, results, "quick.toml", "--executor", "local")
    assert third.returncode == 0 and "0 done, 4 skipped" in third.stdout
    assert values(results) == clean


def test_truncated_cell_file_is_moved_aside_and_recomputed(env, tmp_path, clean):
    results = tmp_path / "res"
    assert run_all(env, results, "quick.toml", "--executor", "debug").returncode == 0
    victim = cells(results)[0]
    victim.write_text(victim.read_text()[:300])  # a write cut short
    stale = victim.parent / f".{victim.name}.{os.uname().nodename}.99999999.dead.tmp"
    stale.write_text("half")  # a temp file of a dead writer
    dry = run_all(env, results, "quick.toml", "--dry-run")
    assert "1 cell(s) to run, 3 already done" in dry.stdout, dry.stdout
    assert victim.exists() and stale.exists()  # a dry run changes nothing
    p = run_all(env, results, "quick.toml", "--executor", "debug")
    assert p.returncode == 0 and "1 done, 3 skipped" in p.stdout, p.stdout
    assert "moved" in p.stderr and victim.name in p.stderr
    assert (victim.parent / (victim.name + ".corrupt")).is_file()
    assert not stale.exists()
    assert values(results) == clean
    render = subprocess.run([sys.executable, "tables/render.py", "--results", str(results),
                             "--out", str(tmp_path / "t"), "--no-figures", "-q"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert render.returncode == 0, render.stderr


def test_labels_are_presentation_and_a_checkpoint_given_twice_is_an_error(env, tmp_path):
    results = tmp_path / "res"
    assert run_all(env, results, "quick.toml", "--executor", "debug", "--label",
                   "first name").returncode == 0
    again = run_all(env, results, "quick.toml", "--executor", "debug", "--label", "new name")
    assert again.returncode == 0 and "0 done, 4 skipped" in again.stdout  # no recompute
    out = tmp_path / "t"
    subprocess.run([sys.executable, "tables/render.py", "--results", str(results), "--out",
                    str(out), "--format", "md", "--no-figures", "-q"], cwd=REPO, check=True)
    table = (out / "table1.md").read_text()
    assert "new name" in table and "first name" not in table
    copy = tmp_path / "copy.pth"
    copy.write_bytes(env["ckpt"].read_bytes())
    twice = subprocess.run([sys.executable, "-m", "evaluations.run_all", "--ckpt",
                            str(env["ckpt"]), "--ckpt", str(copy), "--label", "a", "--label", "b",
                            "--suite", str(env["root"] / "quick.toml"), "--results", str(results),
                            "--cache", str(env["cache"])], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert twice.returncode == 2 and "the same checkpoint is given twice" in twice.stderr
    assert str(copy) in twice.stderr and "Traceback" not in twice.stderr


@pytest.mark.parametrize("name", ["x\\n#SBATCH --wrap=rm", "two words", "a;b"])
def test_strings_that_would_reach_sbatch_are_refused_at_parse(env, tmp_path, name):
    suite = tmp_path / "evil.toml"
    text = (env["root"] / "quick.toml").read_text().replace('name = "faults"',
                                                              f'name = "{name}"')
    suite.write_text(text)
    p = subprocess.run(cmd(tmp_path, env["ckpt"], env["cache"], tmp_path / "res", "evil.toml",
                           "--dry-run"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "cannot go into a SLURM batch script" in p.stderr, p.stderr
    bad_partition = run_all(env, tmp_path / "res", "quick.toml", "--dry-run", "--partition",
                            "gpu\n#SBATCH --x")
    assert bad_partition.returncode == 2 and "partition" in bad_partition.stderr


def test_full_results_disk_is_one_clear_failure(env, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        p = run_all(env, disk / "res", "quick.toml", "--executor", "debug", "--tasks", "linear")
        assert p.returncode in (1, 2), p.stdout[-2000:] + p.stderr[-2000:]
        assert "no space left on device" in p.stdout + p.stderr
        assert "Traceback" not in p.stderr.split("run_all:")[-1]
        assert not [f for f in (disk / "res").rglob("*.tmp")]
        assert not cells(disk / "res")
    finally:
        subprocess.run(["umount", "-l", str(disk)])
