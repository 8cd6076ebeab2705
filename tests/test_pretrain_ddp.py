"""Data-parallel pretraining: the batch split and the feature gather (hand-built references),
a REAL two-process gloo job through submitit against the one-process run, and the layouts
refused before anything is submitted."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dcbench.core import UserError
from pretrain import cluster
from pretrain.config import preset_config
from pretrain.distributed import Dist, rank_batches, shard
from slurm.launch import Resources
from slurm.local_cluster import LocalSlurm

REPO = Path(__file__).resolve().parent.parent
FMNIST = Path("/usr/share/datasets/fashion-mnist")
N, K = 2000, 20  # 63 steps of 32 per epoch: enough to see the loss fall within 2 epochs
SMALL = ["--preset", "demo", "--subset", str(N), "--k", str(K), "--fc-dim", "128",
         "--pca-dim", "16", "--input-size", "64", "--resize-size", "72", "--epochs", "2",
         "--batch-size", "32", "--lr", "0.02", "--head-lr", "0.02"]


def test_rank_slices_of_each_global_batch_rebuild_the_epoch():
    draws = [(i, 100 + i) for i in range(10)]  # 10 draws, global batch 4 -> 4, 4, 2
    r0 = rank_batches(draws, 4, Dist(0, 2, backend="gloo"))
    r1 = rank_batches(draws, 4, Dist(1, 2, backend="gloo"))
    assert r0 == [[(0, 100), (1, 101)], [(4, 104), (5, 105)], [(8, 108)]]
    assert r1 == [[(2, 102), (3, 103)], [(6, 106), (7, 107)], [(9, 109)]]
    # one process: the plain batches of 4 (what DataLoader(batch_size=4) makes)
    assert rank_batches(draws, 4, Dist()) == [draws[0:4], draws[4:8], draws[8:10]]
    # a last batch smaller than the number of ranks is dropped on every rank alike
    three = [rank_batches(draws[:9], 4, Dist(r, 3, backend="gloo")) for r in range(3)]
    assert [len(b) for b in three] == [2, 2, 2]
    assert sorted(d for b in three for batch in b for d in batch) == draws[:8]


def test_shards_are_contiguous_blocks_covering_every_image_once():
    blocks = [shard(10, Dist(r, 3, backend="gloo")).tolist() for r in range(3)]
    assert blocks == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as tdist

    from pretrain.distributed import gather_rows

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                             world_size=world)
    try:
        n = 7
        rows = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
        mine = rows[torch.from_numpy(shard(n, Dist(rank, world, backend="gloo")))]
        got = gather_rows(mine, n, Dist(rank, world, backend="gloo"), torch.device("cpu"))
        if rank == 0:
            np.save(out, got)
        else:
            assert got is None
    finally:
        tdist.destroy_process_group()


def test_gathered_rows_come_back_in_image_order(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rows.npy")
    mp.spawn(_gather_worker, args=(3, port, out), nprocs=3, join=True)
    np.testing.assert_array_equal(np.load(out), np.arange(21, dtype=np.float32).reshape(7, 3))


@pytest.mark.parametrize("res, cfg_kw, kind, needle", [
    (Resources(gpus_per_node=0, tasks_per_node=3), {}, "local", "does not split over 3"),
    (Resources(gpus_per_node=0, nodes=2), {}, "local", "--nodes 2 needs --executor slurm"),
    (Resources(gpus_per_node=2, tasks_per_node=4), {}, "slurm", "one process per GPU"),
    (Resources(gpus_per_node=0, tasks_per_node=2), {"sync_bn": True}, "local", "--sync-bn"),
])
def test_layouts_the_run_cannot_use_are_refused_before_submitting(tmp_path, res, cfg_kw,
                                                                   kind, needle):
    cfg = preset_config("demo", batch_size=64, **cfg_kw)
    with pytest.raises(UserError, match=re.escape(needle)):
        cluster.check_processes(cfg, kind, res)


def test_one_process_per_gpu_unless_told_otherwise():
    assert cluster.resources(None, {"gpus_per_node": 8}).tasks_per_node == 8
    assert cluster.resources(None, {"gpus_per_node": 8, "tasks_per_node": 1}).tasks_per_node == 1
    assert cluster.resources(None, {}).tasks_per_node == 1


def test_job_flags_without_an_executor_are_one_clear_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pretrain", "--preset", "demo", "--out",
                        str(tmp_path / "x"), "--tasks-per-node", "2"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.count("error:") == 1 and "--tasks-per-node" in p.stderr
    assert "--executor" in p.stderr and not (tmp_path / "x").exists()


def _pretrain(out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pretrain", *SMALL, "--out", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.exists(), reason="apt-get install dataset-fashion-mnist")
def test_two_gloo_processes_train_like_one(tmp_path, tmp_path_factory):
    """Through the REAL local SLURM where it installs (one job, two tasks), else the local
    executor (two processes)."""
    kind = "slurm" if LocalSlurm.available() else "local"
    job = ["--executor", kind, "--gpus-per-node", "0", "--cpus-per-task", "1",
           "--mem-gb", "2", "--timeout-min", "20", "--tasks-per-node", "2"]
    if kind == "slurm":
        # a short folder: socket paths stay under 108 characters
        with LocalSlurm(tmp_path_factory.mktemp("slurm"), first_job_id=960000) as slurm:
            env = {**slurm.env, "PYTHONPATH": os.pathsep.join(
                filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
            two = _pretrain(tmp_path / "two", *job, env=env)
            assert two.returncode == 0, (two.stdout[-2000:], two.stderr[-3000:])
            steps = subprocess.run(["sacct", "-n", "-P", "-o", "JobID,NTasks", "-j",
                                    two.stdout.split("as job ")[1].split()[0]],
                                   env={**os.environ, **env}, capture_output=True,
                                   text=True).stdout
            assert any(line.endswith("|2") for line in steps.split()), steps  # srun: 2 tasks
    else:
        two = _pretrain(tmp_path / "two", *job)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "1 node(s) x 2 process(es)" in two.stdout
    one = _pretrain(tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]

    def log(name):
        return [json.loads(x) for x in (tmp_path / name / "log.jsonl").read_text().splitlines()]

    logs2, logs1 = log("two"), log("one")
    assert [r["epoch"] for r in logs2] == [0, 1] and {r["world_size"] for r in logs2} == {2}
    # every image assigned each epoch, by rank 0's one clustering (written once)
    assign = np.fromfile(tmp_path / "two" / "assignments.bin", dtype=np.int32).reshape(2, N)
    assert assign.min() >= 0 and assign.max() < K
    # epoch 0 clusters the same initial network's features: the same assignment as one process
    one_assign = np.fromfile(tmp_path / "one" / "assignments.bin", dtype=np.int32).reshape(2, N)
    np.testing.assert_array_equal(assign[0], one_assign[0])
    for logs in (logs2, logs1):  # learning: below a uniform guess's cross-entropy, falling
        assert logs[1]["train_loss"] < logs[0]["train_loss"] < math.log(K)
    # the same global batches and crops; only BatchNorm statistics are per process
    assert abs(logs2[0]["train_loss"] - logs1[0]["train_loss"]) < 0.1 * logs1[0]["train_loss"]
    ck = torch.load(tmp_path / "two" / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert ck["epoch"] == 2 and ck["world_size"] == 2
    w1 = torch.load(tmp_path / "one" / "checkpoint.pth", map_location="cpu",
                    weights_only=False)["state_dict"]
    assert ck["state_dict"].keys() == w1.keys()  # same file format as one process
    # the evaluations read it
    from evaluations.backbone import describe_checkpoint
    from pretrain.checkpoint import load_checkpoint

    info = describe_checkpoint(str(tmp_path / "two" / "checkpoint.pth"))
    assert (info.arch, info.k, info.fc_dim, info.epoch) == ("alexnet", K, 128, 2)
    net = load_checkpoint(tmp_path / "two" / "checkpoint.pth").model.eval()
    with torch.no_grad():
        taps = net.forward_taps(torch.rand(2, 3, 64, 64), ("conv5",))
    assert torch.isfinite(taps["conv5"]).all()
