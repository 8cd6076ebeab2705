"""Are the embedded VOC tasks learnable by this suite's own pipelines? A supervised sanity run.

    python benchmarks/sanity_voc.py [--iterations 800] [--schedules 1,4] [--modes fc6-8,all]
        [--networks supervised,random] [--supervised CKPT | --keep CKPT] [--out FILE.json]

The embedded analogue of the paper's "ImageNet labels" row: a network of the demo's
architecture (AlexNet + Sobel, fc 1024) is trained *with labels* -- VOC07 classification,
every layer but Sobel, on the embedded VOC2007 trainval labels (``--iterations`` of batch 16 at
128 px, crops of 0.3-1 of the image, the task's own loss and optimizer) -- and saved in the
released format. That checkpoint then goes through the demo suite's detection and
segmentation cells (the same recipes, read from ``evaluations/suites/demo.toml``), and the
numbers are printed beside those of a never-trained network of the same init, at the demo's
schedule and at ``--schedules`` times its iterations (lr steps scaled alike). A supervised trunk
well above the random one says the tasks can be learned by this code on this data; the demo's
DeepCluster numbers then sit where they sit, on their own merit. ``--supervised`` reuses a
checkpoint kept by an earlier run (``--keep``).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcbench.core import atomic_write_json, resolve_device  # noqa: E402
from evaluations import voc_classification as vc  # noqa: E402
from evaluations.backbone import describe_checkpoint, write_random_checkpoint  # noqa: E402
from evaluations.context import Runtime, TaskContext  # noqa: E402
from evaluations.datasets.embedded import build_embedded  # noqa: E402
from evaluations.datasets.voc import VocClassification  # noqa: E402
from evaluations.suites import load_suite  # noqa: E402
from evaluations.tasks import get_task, resolve_config  # noqa: E402
from pretrain.checkpoint import atomic_torch_save, released_payload  # noqa: E402
from pretrain.models import ModelSpec  # noqa: E402

SPEC = ModelSpec("alexnet", True, 1024)  # the demo preset's network


def supervised_checkpoint(random_ckpt: Path, voc07: Path, out: Path, iterations: int,
                          device: torch.device, tmp: Path) -> dict:
    """Train VOC07 classification ("all") from ``random_ckpt``; save its network to ``out``."""
    cfg = vc.VocClassificationConfig(mode="all", iterations=iterations, input_size=128,
                                     crop_scale=(0.3, 1.0), lr=0.01,
                                     lr_step=max(1, iterations // 3))
    ctx = TaskContext(describe_checkpoint(random_ckpt), "voc07", voc07, 0, Runtime(workers=0),
                      device, tmp / "state-supervised")
    net = vc.VocNet(vc.load_cell_checkpoint(ctx), cfg, 0).to(device)
    data = VocClassification(voc07, "trainval", 2007, vc.crop_transform(cfg))
    info = vc.train(net, data, cfg, ctx)
    test = VocClassification(voc07, "test", 2007, vc._RandomCrops(vc.crop_transform(cfg), 1))
    mean_ap, _ = vc.classification_map(test.labels, vc.test_scores(net, test, cfg, ctx))
    trunk = net.trunk.cpu()
    trunk.top_layer = None
    atomic_torch_save(released_payload(trunk, epoch=0), out)
    return {"iterations": iterations, "train_seconds": info["train_seconds"],
            "voc07_classification_map_1crop": round(100 * float(mean_ap), 2)}


def demo_cells(modes: tuple[str, ...], schedules: tuple[int, ...]) -> list:
    """(task, recipe, role, schedule) of the demo suite's detection and segmentation cells in
    ``modes``, at each of ``schedules`` times the demo's iterations."""
    cells = []
    for spec in load_suite("demo").cells:
        if spec.task in ("voc_detection", "voc_segmentation"):
            task = get_task(spec.task)
            cfg = resolve_config(task, spec.config)
            if cfg.mode not in modes:
                continue
            for n in schedules:
                steps = {"lr_step": cfg.lr_step * n} if hasattr(cfg, "lr_step") else {}
                cells.append((task, replace(cfg, iterations=cfg.iterations * n, **steps),
                              spec.datasets[0], f"x{n}"))
    return cells


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=800, help="supervised training")
    ap.add_argument("--schedules", default="1,4", help="iteration multipliers of the demo's")
    ap.add_argument("--modes", default="fc6-8,all")
    ap.add_argument("--networks", default="supervised,random")
    ap.add_argument("--supervised", default=None, help="a supervised checkpoint kept earlier")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="write the numbers here as JSON")
    ap.add_argument("--keep", default=None, help="also keep the supervised checkpoint here")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    results: dict = {"device": str(device)}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        roots = build_embedded(Path.home() / ".cache" / "dcbench" / "embedded",
                               roles=("voc07", "voc12"), voc_trainval=800, voc_test=400)
        random_ckpt = write_random_checkpoint(SPEC, tmp / "random.pth")
        t0 = time.perf_counter()
        networks = args.networks.split(",")
        sup = Path(args.supervised) if args.supervised else tmp / "supervised.pth"
        if not args.supervised and "supervised" in networks:
            results["supervised_training"] = supervised_checkpoint(
                random_ckpt, roots["voc07"], sup, args.iterations, device, tmp)
            print(f"supervised trunk: {results['supervised_training']} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.keep and sup.exists():
            shutil.copyfile(sup, args.keep)
        for name, ckpt in (("supervised (VOC07 labels)", sup), ("random (same init)", random_ckpt)):
            if name.split()[0] not in networks:
                continue
            info = describe_checkpoint(ckpt)
            for task, cfg, role, schedule in demo_cells(
                    tuple(args.modes.split(",")), tuple(int(n) for n in args.schedules.split(","))):
                ctx = TaskContext(info, role, roots[role], 0, Runtime(workers=0), device,
                                  tmp / "state" / name / f"{task.name}-{cfg.mode}-{schedule}")
                t1 = time.perf_counter()
                m, = task.run(cfg, ctx)
                results.setdefault(name, {})[f"{m.column} {schedule}"] = m.value
                print(f"{name:28s} {m.column:22s} {schedule:3s} {m.metric} {m.value:6.2f} "
                      f"({time.perf_counter() - t1:.0f} s)", flush=True)
                if args.out:  # as it goes: a long run stopped early keeps what it measured
                    atomic_write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
