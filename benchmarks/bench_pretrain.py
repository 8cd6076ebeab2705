"""Per-phase throughput of one DeepCluster epoch (features, PCA, k-means, training).

    python benchmarks/bench_pretrain.py [--quick]

Runs one epoch of the demo preset (Fashion-MNIST clutter) in a temp folder and reports the seconds
and images/s of each phase from the run's own log, plus each phase's share of the epoch
(the paper: "k-means takes a third of the time" at ImageNet scale on a GPU).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.config import preset_config  # noqa: E402
from pretrain.train import run as pretrain  # noqa: E402


def run(quick: bool = False) -> dict[str, Any]:
    cfg = replace(preset_config("demo"), epochs=1)
    if quick:
        cfg = replace(cfg, subset=1000, k=20)
    with tempfile.TemporaryDirectory() as tmp:
        pretrain(cfg, tmp)
        row = json.loads((Path(tmp) / "log.jsonl").read_text().splitlines()[0])
    secs = row["seconds"]
    total = secs["total"]
    print(f"one DeepCluster epoch, demo preset (N={cfg.subset}, {cfg.input_size}px, {cfg.arch} "
          f"fc{cfg.fc_dim}, k={cfg.k}):")
    for phase in ("features", "pca", "kmeans", "train"):
        print(f"  {phase:9s} {secs[phase]:8.2f} s  {100 * secs[phase] / total:5.1f}%")
    print(f"  features {row['img_per_s']['features']:.0f} img/s, train "
          f"{row['img_per_s']['train']:.0f} img/s")
    return {"seconds": secs, "img_per_s": row["img_per_s"], "n": cfg.subset}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    run(ap.parse_args().quick)
