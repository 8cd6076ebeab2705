"""Does the demo preset collapse on small real-image datasets? (issue: robustness when the
paper's recipe is scaled down.)

    python benchmarks/bench_collapse.py [--sizes 2000 4000 10000 60000] [--epochs 10]
                                        [--lrs default 0.05] [--out FILE.json]

Runs ``--preset demo`` for ``--epochs`` epochs on the first N images of its Fashion-MNIST set
for each N, and on scikit-learn's digits (1,797 8x8 grey images written as an ImageFolder),
once with the preset's learning rate (0.05 x batch/256) and once per extra ``--lrs`` value
(0.05 = the paper's value at a quarter of its batch). Reports per run: whether it finished,
the error if not, and the per-epoch effective rank of the feature spectrum, NMI to the labels
and train loss.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcbench.core import UserError  # noqa: E402
from pretrain.config import preset_config  # noqa: E402
from pretrain.train import COLLAPSE_WARNING_TAIL, run as pretrain  # noqa: E402


def digits_folder(root: Path) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        folder = root / f"digit{y}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(img * 255 / 16).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


def one_run(name: str, cfg, tmp: Path) -> dict:
    out = tmp / name
    t0 = time.perf_counter()
    error = None
    try:
        pretrain(cfg, out)
    except UserError as e:
        error = str(e)
    rows = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()] \
        if (out / "log.jsonl").exists() else []
    n = int(np.fromfile(out / "assignments.bin", np.int32).size / max(len(rows), 1)) \
        if rows else None
    res = {"run": name, "lr": cfg.lr, "n": n, "epochs_done": len(rows),
           "finished": error is None, "error": error, "seconds": round(time.perf_counter() - t0),
           "warned_epochs": [r["epoch"] for r in rows
                             if r["features"]["tail_ratio"] < COLLAPSE_WARNING_TAIL],
           "effective_rank": [r["features"]["effective_rank"] for r in rows],
           "tail_ratio": [r["features"]["tail_ratio"] for r in rows],
           "nmi_labels": [r["nmi_labels"] for r in rows],
           "train_loss": [round(r["train_loss"], 3) for r in rows]}
    print(json.dumps(res), flush=True)
    return res


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 4000, 10000, 60000])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lrs", nargs="+", default=["default", "0.05"])
    ap.add_argument("--no-digits", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        digits = digits_folder(tmp / "digits")
        runs = [] if args.no_digits else [
            (f"digits-{lr}", dict(data=str(digits), dataset=None, subset=None), lr)
            for lr in args.lrs]
        runs += [(f"fmnist{n}-{lr}", dict(subset=n), lr) for n in args.sizes for lr in args.lrs]
        for name, data, lr in runs:
            over = {"epochs": args.epochs, **data}
            if lr != "default":
                over["lr"] = over["head_lr"] = float(lr)
            cfg = preset_config("demo", **{k: v for k, v in over.items() if k != "dataset"})
            if data.get("dataset", "x") is None:
                from dataclasses import replace
                cfg = replace(cfg, dataset=None)
            results.append(one_run(name, cfg, tmp))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
