"""VOC07 detection and VOC12 segmentation: what do the detector and the FCN cost over the trunk?

    python benchmarks/bench_voc_dense.py [--quick] [--iterations 20] [--device auto]
        [--fc-dim 1024] [--size 128] [--seg-size 192]

For each task and mode, in one process, training img/s of:

* ``cell``: the task's own training loop on the embedded VOC data (decode, augmentation,
  forward, loss, backward, SGD step), as a cell runs it;
* ``model``: the task's network alone (forward, loss, backward, step) on one in-memory batch;
* ``backbone``: the checkpoint's plain network (Sobel, conv layers, fc6, fc7; every layer
  trained) forward + backward + step at the same input size and batch.

``model / backbone`` is the detector's (RPN, RoI heads, NMS) or the FCN's (convolutional fc6
over every position, upsampling, per-pixel loss) overhead over the trunk; ``cell / model`` is
what the data path costs. ``--device auto`` takes the GPU when there is one (same code).
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
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcbench.core import resolve_device  # noqa: E402
from evaluations import voc_detection as vd, voc_segmentation as vs  # noqa: E402
from evaluations.backbone import (describe_checkpoint, load_cell_checkpoint,  # noqa: E402
                                  write_random_checkpoint)
from evaluations.context import Runtime, TaskContext  # noqa: E402
from evaluations.datasets.embedded import build_embedded  # noqa: E402
from evaluations.datasets.voc import VocDetection  # noqa: E402
from evaluations.finetune import train_iterations  # noqa: E402
from pretrain.models import ModelSpec  # noqa: E402


def _sig(x: float) -> float:
    """Four significant digits (ratios recomputed from the printed numbers agree)."""
    return float(f"{x:.4g}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step, params, n: int, batch: int, device: torch.device) -> float:
    """img/s of ``n`` iterations of ``loss = step(); backward; SGD step`` (after one warm-up)."""
    opt = torch.optim.SGD([p for p in params if p.requires_grad], lr=1e-5, momentum=0.9)
    for i in range(n + 1):
        if i == 1:
            _sync(device)
            t0 = time.perf_counter()
        loss = step()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return n * batch / (time.perf_counter() - t0)


def backbone_img_per_s(ctx: TaskContext, size: int, batch: int, n: int) -> float:
    """The plain checkpoint network (to fc7, all layers trained) at ``size`` px."""
    net = load_cell_checkpoint(ctx).to(ctx.device).train()
    net.top_layer = None
    x = torch.randn(batch, 3, size, size, device=ctx.device)
    return timed_steps(lambda: net(x).square().mean(), list(net.parameters()), n, batch,
                       ctx.device)


def detection_batch(cfg: vd.VocDetectionConfig, size: int, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=gen).to(device) for _ in range(cfg.batch_size)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 30.0, 120.0, 90.0]],
                                      device=device) * size / 128,
                "labels": torch.tensor([3, 15], device=device)} for _ in images]
    return images, targets


def run(quick: bool = False, iterations: int = 20, device: str = "auto", fc_dim: int = 1024,
        size: int = 128, seg_size: int = 192) -> dict[str, Any]:
    iterations = 4 if quick else iterations
    dev = resolve_device(device)
    out: dict[str, Any] = {"iterations": iterations, "device": str(dev), "fc_dim": fc_dim,
                           "threads": torch.get_num_threads()}
    det = vd.VocDetectionConfig(min_size=size, max_size=size, anchor_sizes=(24, 48, 96),
                                rpn_pre_nms_train=1000, rpn_post_nms_train=300, roi_batch=64,
                                iterations=iterations)
    seg = vs.VocSegmentationConfig(batch_size=4, crop_size=seg_size, image_scale=2.0,
                                   scale_range=(0.75, 1.25), iterations=iterations)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        n = 40 if quick else 200
        roots = build_embedded(tmp / "cache", roles=("voc07", "voc12"), voc_trainval=n,
                               voc_test=8)
        info = describe_checkpoint(write_random_checkpoint(ModelSpec("alexnet", True, fc_dim),
                                                           tmp / "r.pth"))
        for task, cfg, role, px in (("detection", det, "voc07", size),
                                    ("segmentation", seg, "voc12", seg_size)):
            for mode in ("fc6-8", "all"):
                cfg_m = replace(cfg, mode=mode)
                ctx = TaskContext(info, role, roots[role], 0, Runtime(workers=0, device=device),
                                  dev, tmp / "state" / task / mode)
                if task == "detection":
                    net = vd.Detector(load_cell_checkpoint(ctx), cfg_m, 0).to(dev).train()
                    data = VocDetection(roots[role], "trainval", 2007,
                                           vd.DetectionTransform(True), keep_difficult=False)
                    images, targets = detection_batch(cfg_m, px, dev)
                    step = lambda: sum(net(images, targets).values())  # noqa: E731
                    cell = train_iterations(net, data, cfg_m, ctx, loss_of=vd._batch_loss,
                                            lr_at=lambda i: 1e-5, tag="bench",
                                            collate_fn=vd.collate_lists)
                else:
                    net = vs.FCN32s(load_cell_checkpoint(ctx), cfg_m, 0).to(dev).train()
                    data = vs.training_set(cfg_m, ctx)
                    x = torch.randn(cfg_m.batch_size, 3, px, px, device=dev)
                    y = torch.randint(0, 21, (cfg_m.batch_size, px, px), device=dev)
                    step = lambda: F.cross_entropy(net(x), y, ignore_index=255)  # noqa: E731
                    cell = train_iterations(net, data, cfg_m, ctx, loss_of=vs._batch_loss,
                                            lr_at=lambda i: 1e-5, tag="bench")
                model = _sig(timed_steps(step, list(net.parameters()), iterations,
                                         cfg_m.batch_size, dev))
                trunk = _sig(backbone_img_per_s(ctx, px, cfg_m.batch_size, iterations))
                cell_ips = _sig(iterations * cfg_m.batch_size / cell["train_seconds"])
                r = {"size": px, "batch": cfg_m.batch_size, "cell_img_per_s": cell_ips,
                     "model_img_per_s": model, "backbone_img_per_s": trunk,
                     "model_vs_backbone": _sig(model / trunk),
                     "cell_vs_model": _sig(cell_ips / model)}
                out[f"{task}/{mode}"] = r
                print(f"VOC {task} {mode}: cell {r['cell_img_per_s']:6.1f} img/s, model "
                      f"{model:6.1f}, backbone {trunk:6.1f} ({px} px, batch {r['batch']}); "
                      f"model/backbone {r['model_vs_backbone']:.2f}, cell/model "
                      f"{r['cell_vs_model']:.2f} on {dev}")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--fc-dim", type=int, default=1024)
    ap.add_argument("--size", type=int, default=128, help="detection image side")
    ap.add_argument("--seg-size", type=int, default=192, help="segmentation crop side")
    a = ap.parse_args()
    run(a.quick, a.iterations, a.device, a.fc_dim, a.size, a.seg_size)
