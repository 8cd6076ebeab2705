"""Probes resume at their last finished epoch: a cell stopped mid-training (in-process crash,
a real SIGKILL of its process) and rerun ends with the same numbers as an uninterrupted run,
for the linear probes (several heads) and the fc6-8 retraining (dropout: the RNG resumes)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import load_fixture_module
from dcbench.core import resolve_device
from evaluations import fc_retrain, heads, linear
from evaluations.backbone import describe_checkpoint
from evaluations.context import Runtime, TaskContext
from evaluations.datasets.embedded import build_embedded

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists(),
                                reason="apt-get install dataset-fashion-mnist")
lc = load_fixture_module("legacy_checkpoints.py", "legacy_checkpoints_fixture")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    roots = build_embedded(root / "cache", n_train_per_class=6, n_val_per_class=2,
                           roles=("places",))
    ckpt = root / "released.pth"
    lc.write_released_checkpoint(ckpt, "alexnet", fc_dim=32, k=None, seed=0)
    return {"root": root, "places": roots["places"], "ckpt": ckpt,
            "info": describe_checkpoint(ckpt)}


def ctx_for(env, state: Path) -> TaskContext:
    return TaskContext(env["info"], "places", env["places"], 0, Runtime(workers=0),
                       resolve_device("cpu"), state)


TASKS = [(linear.run, linear.LinearProbeConfig(epochs=4, batch_size=16, input_size=64,
                                               resize_size=72, layers=("conv1", "conv3"),
                                               lrs=(0.01, 0.003))),
         (fc_retrain.run, fc_retrain.FcRetrainConfig(epochs=4, batch_size=16, input_size=64,
                                                     resize_size=72))]


@pytest.mark.parametrize("run,cfg", TASKS, ids=["linear", "fc_retrain"])
def test_a_crashed_probe_resumes_at_its_last_epoch_with_the_same_numbers(env, tmp_path,
                                                                        monkeypatch, run, cfg):
    whole = run(cfg, ctx_for(env, tmp_path / "a"))
    assert all(m.details["resumed_at_epoch"] == 0 for m in whole)
    assert not (tmp_path / "a").exists()  # the state is removed once the numbers exist

    real, calls = heads.evaluate_heads, []

    def crash_in_epoch_2(*a, **k):  # the evaluation at the end of the third epoch
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(heads, "evaluate_heads", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, ctx_for(env, tmp_path / "b"))
    assert (tmp_path / "b" / heads.HEADS_STATE).is_file()
    monkeypatch.setattr(heads, "evaluate_heads", real)
    resumed = run(cfg, ctx_for(env, tmp_path / "b"))
    assert [m.details["resumed_at_epoch"] for m in resumed] == [2] * len(resumed)
    assert [(m.column, m.selection, m.variant, m.value, m.details["epoch"]) for m in resumed] \
        == [(m.column, m.selection, m.variant, m.value, m.details["epoch"]) for m in whole]


def test_an_unreadable_or_foreign_state_starts_over(env, tmp_path, caplog):
    run, cfg = TASKS[1]
    state = tmp_path / "s"
    state.mkdir()
    (state / heads.HEADS_STATE).write_bytes(b"not a torch file")
    out = run(cfg, ctx_for(env, state))
    assert "ignored the unreadable training state" in caplog.text
    assert all(m.details["resumed_at_epoch"] == 0 for m in out)


SUITE = """
name = "resume"
[datasets]
places = "{places}"
[runtime]
workers = 0
[resources]
cpus_per_task = 2
mem_gb = 2
timeout_min = 10
[[cell]]
task = "linear"
datasets = ["places"]
[cell.config]
epochs = 40
batch_size = 8
input_size = 64
resize_size = 72
layers = ["conv1", "conv5"]
"""


def run_all(env, results: Path, **kw):
    suite = results.parent / "suite.toml"
    suite.parent.mkdir(parents=True, exist_ok=True)
    suite.write_text(SUITE.format(places=env["places"]))
    return subprocess.Popen([sys.executable, "-m", "evaluations.run_all", "--ckpt",
                             str(env["ckpt"]), "--suite", str(suite), "--results",
                             str(results), "--executor", "local"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


def values(results: Path) -> list:
    (f,) = [p for p in results.glob("*/linear-*.json")]
    recs = json.loads(f.read_text())["records"]
    return [(r["column"], r["selection"], r["variant"], r["value"]) for r in recs], recs


@pytest.mark.slow
def test_a_killed_probe_cell_resumes_when_run_all_is_rerun(env, tmp_path):
    whole = run_all(env, tmp_path / "whole" / "results")
    whole.communicate(timeout=900)
    assert whole.returncode == 0
    want, _ = values(tmp_path / "whole" / "results")

    results = tmp_path / "killed" / "results"
    p = run_all(env, results)
    deadline = time.time() + 600
    while not list(results.glob(f"*/.state/*/{heads.HEADS_STATE}")):
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGKILL)  # run_all and its job, mid-run: no handler runs
    p.wait()
    assert not list(results.glob("*/linear-*.json"))
    again = run_all(env, results)
    out, err = again.communicate(timeout=900)
    assert again.returncode == 0, err[-3000:]
    got, recs = values(results)
    assert got == want
    assert recs[0]["details"]["resumed_at_epoch"] >= 1
    assert not list(results.glob("*/.state/*/*"))


def test_train_images_are_kept_only_without_workers_and_within_the_budget(env, tmp_path):
    """The memo of decoded train images is a runtime choice: on with no workers when the set
    fits in val_cache_gb, off otherwise -- and a probe gives the same numbers either way."""
    def ctx(workers, val_cache_gb=2.0):
        return TaskContext(env["info"], "places", env["places"], 0,
                           Runtime(workers=workers, val_cache_gb=val_cache_gb),
                           resolve_device("cpu"), tmp_path / f"w{workers}-gb{val_cache_gb}")

    assert heads.probe_data(ctx(workers=0), 72, 64).train.memo
    assert not heads.probe_data(ctx(workers=2), 72, 64).train.memo
    assert not heads.probe_data(ctx(workers=0, val_cache_gb=0), 72, 64).train.memo
    cfg = TASKS[0][1]
    kept = linear.run(cfg, ctx(workers=0))
    decoded_each_epoch = linear.run(cfg, ctx(workers=0, val_cache_gb=0))
    assert [(m.column, m.value, m.details["epoch"], m.details["head"]) for m in kept] == \
        [(m.column, m.value, m.details["epoch"], m.details["head"]) for m in decoded_each_epoch]
