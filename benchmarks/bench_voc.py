"""VOC07 classification: does data loading keep up with the model?

    python benchmarks/bench_voc.py [--quick] [--iterations 60] [--workers 0]

Runs the ``voc_classification`` training loop (decode + random crops + forward + backward +
SGD step, as a cell runs it) for ``--iterations`` on the embedded VOC2007 set, and the same
network's forward + backward + step alone on tensors already in memory, in one process;
reports img/s of each and their ratio (1.0 = the data path costs nothing), per mode.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluations import voc_classification as vc  # noqa: E402
from evaluations.backbone import describe_checkpoint, write_random_checkpoint  # noqa: E402
from evaluations.context import Runtime, TaskContext  # noqa: E402
from evaluations.datasets.embedded import build_embedded  # noqa: E402
from evaluations.datasets.voc import VocClassification  # noqa: E402
from pretrain.models import ModelSpec  # noqa: E402


def model_only(net: vc.VocNet, cfg, n_iter: int, size: int) -> float:
    """img/s of forward + BCE + backward + clip + step on one fixed in-memory batch."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    x = torch.randn(cfg.batch_size, 3, size, size)
    y = (torch.rand(cfg.batch_size, 20) > 0.8).float()
    net.train()
    t0 = time.perf_counter()
    for _ in range(n_iter):
        loss = vc._loss(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
    return n_iter * cfg.batch_size / (time.perf_counter() - t0)


def run(quick: bool = False, iterations: int = 60, workers: int = 0) -> dict[str, Any]:
    iterations = 12 if quick else iterations
    out: dict[str, Any] = {"iterations": iterations, "workers": workers,
                           "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        root = build_embedded(tmp / "cache", roles=("voc07",), voc_trainval=200 if quick else 800,
                              voc_test=20)["voc07"]
        ck = write_random_checkpoint(ModelSpec("alexnet", True, 1024), tmp / "r.pth")
        info = describe_checkpoint(ck)
        for mode in ("fc6-8", "all"):
            cfg = replace(vc.VocClassificationConfig(mode=mode), iterations=iterations,
                          input_size=64)
            ctx = TaskContext(info, "voc07", root, 0, Runtime(workers=workers),
                              torch.device("cpu"), tmp / "state" / mode)
            net = vc.VocNet(vc.load_cell_checkpoint(ctx), cfg, 0)
            data = VocClassification(root, "trainval", 2007, vc.crop_transform(cfg))
            cell = vc.train(net, data, cfg, ctx)["train_img_per_s"]
            alone = model_only(net, cfg, iterations, cfg.input_size)
            out[mode] = {"cell_img_per_s": round(cell, 1), "model_img_per_s": round(alone, 1),
                         "cell_vs_model": round(cell / alone, 3)}
            print(f"VOC classification {mode}: cell {cell:7.1f} img/s, model alone "
                  f"{alone:7.1f} img/s, ratio {cell / alone:.2f} (64 px, batch "
                  f"{cfg.batch_size}, {workers} workers, {torch.get_num_threads()} threads)")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--workers", type=int, default=0)
    a = ap.parse_args()
    run(a.quick, a.iterations, a.workers)
