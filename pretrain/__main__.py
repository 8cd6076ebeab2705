"""``python -m pretrain``: DeepCluster pretraining from the command line.

Examples::

    python -m pretrain --preset paper --data /datasets/imagenet --out runs/dc_alexnet
    python -m pretrain --preset demo --out runs/demo          # embedded Fashion-MNIST
    python -m pretrain --preset demo --out runs/demo --resume # continue after a crash
    python -m pretrain --preset paper --data /datasets/imagenet --out runs/dc --executor slurm \
        --cluster-config cluster.toml                         # a SLURM job that requeues itself
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields

from .config import PRESETS, PretrainConfig, preset_config
from dcbench.core import UserError

HELP = {
    "data": "ImageNet-layout folder: <DIR>/train/<wnid>/*.JPEG, <DIR>/<wnid>/*, or a flat "
            "folder of images (no labels)",
    "dataset": "embedded dataset instead of --data, from Debian's dataset-fashion-mnist: "
               "fashion-clutter (each item whole among 2-4 smaller, dimmer ones, 72 px), "
               "fashion-mnist (the 28-px items) or fashion-scenes (each item on a 72-px "
               "photo crop)",
    "subset": "use only the first N images",
    "arch": "network: alexnet | vgg16 | resnet50",
    "sobel": "frozen Sobel front end (--no-sobel for RGB input)",
    "fc_dim": "width of fc6/fc7 (paper 4096)",
    "k": "number of k-means clusters (paper 10000)",
    "pca_dim": "PCA-whitening output dims before k-means (paper 256)",
    "kmeans_iters": "k-means iterations (paper 20)",
    "kmeans_backend": "auto (faiss if installed) | faiss | torch",
    "sampler": "uniform (paper: uniform over clusters) | released (authors' code: "
               "proportional to cluster size)",
    "reassign": "sampler length as a multiple of N (paper 1)",
    "epochs": "epochs, one clustering each (paper 500)",
    "batch_size": "batch size (paper 256)",
    "lr": "body learning rate, constant (paper 0.05 at batch 256; default 0.05 x batch/256)",
    "momentum": "body SGD momentum (paper 0.9)",
    "weight_decay": "body weight decay (paper 1e-5)",
    "head_lr": "per-epoch head learning rate, momentum 0 (paper 0.05; default 0.05 x "
               "batch/256)",
    "head_weight_decay": "per-epoch head weight decay (paper 1e-5)",
    "input_size": "crop size (paper 224)",
    "resize_size": "resize before the centre crop of feature extraction (paper 256)",
    "workers": "DataLoader worker processes",
    "seed": "run seed (every random draw derives from it and the epoch)",
    "device": "auto | cpu | cuda[:N]",
    "precision": "fp32 | bf16: bf16 autocast of every forward pass (extraction and training; "
                 "weights, optimizer and PCA stay fp32/fp64)",
    "channels_last": "NHWC memory format for the network and its inputs (faster convolutions "
                     "on recent GPUs)",
    "loader": "cpu | gpu | auto: where images are decoded and cropped. cpu (default): PIL in "
              "DataLoader workers; gpu: nvJPEG + batched crops on the GPU (pretrain/gpu_data.py; "
              "the same boxes, pixels within a resampling tolerance); auto: gpu on CUDA with "
              "--data, else cpu",
    "sync_bn": "data-parallel runs (--executor with several processes): BatchNorm statistics "
               "over the global batch (SyncBatchNorm, GPUs only); off: per process, as "
               "DistributedDataParallel does by default",
}


JOB_FLAGS = ("cluster_config", "partition", "timeout_min", "gpus_per_node", "cpus_per_task",
             "mem_gb", "nodes", "tasks_per_node")


def add_resource_flags(group, what: str) -> None:
    """The job-resource flags (:data:`JOB_FLAGS`) of ``python -m pretrain`` and the sweep."""
    group.add_argument("--cluster-config", metavar="FILE.toml", default=None,
                       help="[slurm] partition, constraint, timeout_min, cpus_per_task, "
                            "mem_gb, gpus_per_node, nodes, tasks_per_node")
    group.add_argument("--partition", default=None, help="SLURM partition")
    group.add_argument("--timeout-min", type=int, default=None,
                       help=f"time limit of one run of {what} (it requeues at the limit)")
    group.add_argument("--gpus-per-node", type=int, default=None)
    group.add_argument("--nodes", type=int, default=None,
                       help=f"nodes of {what}, data-parallel (SLURM only)")
    group.add_argument("--tasks-per-node", type=int, default=None,
                       help="processes per node (default: one per GPU, else 1; on CPU, gloo "
                            "processes)")
    group.add_argument("--cpus-per-task", type=int, default=None)
    group.add_argument("--mem-gb", type=float, default=None)


def add_config_flags(group, skip: tuple[str, ...] = ()) -> None:
    """One flag per :class:`PretrainConfig` setting (default None: the preset's value)."""
    for f in fields(PretrainConfig):
        if f.name not in HELP or f.name in skip:  # lr_rule is derived, not a flag
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=None, help=HELP[f.name])
        else:
            typ = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
            group.add_argument(flag, dest=f.name, type=typ, default=None,
                               help=f"{HELP[f.name]} (paper: {f.default})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pretrain", description="DeepCluster pretraining (Caron et al. 2018). "
        "Flags left out take the --preset's value; the paper preset is PROTOCOLS.md §1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS),
                   help="paper: the paper's protocol; demo: minutes on a laptop CPU")
    p.add_argument("--out", required=True, help="run folder (checkpoint.pth, log.jsonl, "
                   "assignments.bin, config.json)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    job = p.add_argument_group("cluster job (without --executor: runs in this process)")
    job.add_argument("--executor", choices=["slurm", "local"], default=None,
                     help="submit through submitit; at SLURM's time limit the job requeues "
                          "itself and continues from its last finished epoch")
    add_resource_flags(job, "the job")
    add_config_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {f.name: getattr(args, f.name) for f in fields(PretrainConfig) if f.name in HELP}
    try:
        cfg = preset_config(args.preset, **overrides)
        job_flags = [f"--{k.replace('_', '-')}" for k in JOB_FLAGS if getattr(args, k) is not None]
        if args.executor is None and job_flags:
            raise UserError(f"{', '.join(job_flags)} describe a cluster job: add --executor "
                            "slurm (or local), or drop them to train in this process.")
        if args.executor is None:
            from .train import run  # torch import deferred so --help is instant

            ckpt = run(cfg, args.out, resume=args.resume)
        else:
            from . import cluster

            res = cluster.resources(args.cluster_config, {
                "partition": args.partition, "timeout_min": args.timeout_min,
                "gpus_per_node": args.gpus_per_node, "cpus_per_task": args.cpus_per_task,
                "nodes": args.nodes, "tasks_per_node": args.tasks_per_node,
                "mem_gb": args.mem_gb})
            ckpt = cluster.submit(cfg, args.out, args.executor, res, args.resume)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.executor != "slurm":  # a SLURM job goes on (cluster.submit said so)
            print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    print(ckpt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
