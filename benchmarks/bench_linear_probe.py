"""Multi-head linear probing vs five single-layer runs, on the same data in one run.

    python benchmarks/bench_linear_probe.py [--quick] [--input-size 64] [--n 60]

The paper's protocol trains conv1..conv5 probes; training them as five separate runs
repeats the frozen backbone forward five times. ``evaluations.heads.train_heads`` feeds all
heads from one forward per batch (and decodes/augments each image once). The data are the
embedded suite's real image files through the suite's own readers and transforms. Reports seconds of each way, the speed ratio, and checks
the two give identical accuracies (same seed, same data order).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
import tempfile
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluations.datasets.embedded import build_embedded  # noqa: E402
from evaluations.datasets.imagenet import imagenet_split  # noqa: E402
from dcbench.core import probe_test_transform, probe_train_transform  # noqa: E402
from evaluations.heads import HeadTrainConfig, train_heads  # noqa: E402
from evaluations.linear import conv_heads  # noqa: E402
from pretrain.models import CONV_TAPS, AlexNet  # noqa: E402


def run(quick: bool = False, n: int = 60, size: int = 64) -> dict[str, Any]:
    """``n`` train images per class of the embedded ImageNet role (real PNG files)."""
    if quick:
        n, size = 10, 48
    torch.manual_seed(0)
    net = AlexNet(sobel=True, fc_dim=256).eval()
    cfg = HeadTrainConfig(epochs=1, batch_size=64, lr=0.01, momentum=0.9, weight_decay=1e-7,
                          workers=0, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        root = build_embedded(Path(tmp), n, max(n // 6, 2))["imagenet"]
        resize = round(size * 256 / 224)
        train = imagenet_split(root, "train").dataset(probe_train_transform(resize, size))
        val = imagenet_split(root, "val").dataset(probe_test_transform(resize, size))
        return _compare(net, cfg, train, val, size)


def _compare(net, cfg, train, val, size) -> dict[str, Any]:
    n = len(train)
    dev = torch.device("cpu")

    def probe(layers):
        heads, _ = conv_heads(net, layers, size, 10, cfg.seed, dev)
        return train_heads(net, heads, train, val, cfg, dev)

    t0 = time.perf_counter()
    multi = probe(list(CONV_TAPS))
    t_multi = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = {layer: probe([layer])[layer] for layer in CONV_TAPS}
    t_single = time.perf_counter() - t0
    same = all(single[layer].epochs == multi[layer].epochs for layer in CONV_TAPS)
    out = {"images": n, "input_size": size, "multi_head_s": round(t_multi, 3),
           "five_single_s": round(t_single, 3), "speedup": round(t_single / t_multi, 2),
           "identical_numbers": same}
    print(f"linear probes, {n} images at {size}px, 1 epoch + 10-crop eval (CPU, "
          f"{torch.get_num_threads()} threads)")
    print(f"  one multi-head run : {t_multi:8.2f} s")
    print(f"  five single runs   : {t_single:8.2f} s")
    print(f"  speed ratio        : {t_single / t_multi:8.2f}x   identical numbers: {same}")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=60, help="train images per class")
    ap.add_argument("--input-size", type=int, default=64)
    a = ap.parse_args()
    run(a.quick, a.n, a.input_size)
