"""Instance retrieval: extraction throughput at longest side 1024, batched vs one image at a
time, ranking cost, and where a retrieval cell's time goes.

    python benchmarks/bench_retrieval.py [--quick] [--images 8] [--device auto]

1. ``extract/<arch>``: img/s of R-MAC regional descriptors (decode, resize, Sobel, conv layers
   to conv5, regional max, L2) of AlexNet and VGG16 (the paper's conv trunks, random init) on
   JPEGs of Oxford's shapes (1024x768 and 768x1024, cut from scikit-learn's two photos) at
   longest side 1024: batched by size (up to ``retrieval.MAX_BATCH_PIXELS``, 4 images) vs one
   image at a time, and the largest difference between the two routes' descriptors. (A cell
   batches on a GPU only: on 2 CPU cores batching measured 0.80-0.93x.)
2. ``rank``: ranking ``n`` queries against ``n`` database descriptors (512-d) by one matrix
   product and one argsort.
3. ``cell``: one retrieval cell (the demo's recipe, an AlexNet, the embedded Oxford-format set
   with whitening on the Paris-format one) from an empty cache: its seconds in extraction,
   whitening, ranking and scoring, and their shares.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcbench.core import resolve_device  # noqa: E402
from evaluations import retrieval as rt  # noqa: E402
from evaluations.backbone import describe_checkpoint, write_random_checkpoint  # noqa: E402
from evaluations.context import Runtime, TaskContext  # noqa: E402
from evaluations.datasets.embedded import build_embedded  # noqa: E402
from evaluations.suites import load_suite  # noqa: E402
from evaluations.tasks import get_task, resolve_config  # noqa: E402
from pretrain.models import ModelSpec, build_model  # noqa: E402


def _sig(x: float) -> float:
    """Four significant digits (ratios recomputed from the printed numbers agree)."""
    return float(f"{x:.4g}")


def oxford_like_jpegs(folder: Path, n: int) -> list[Path]:
    """``n`` JPEGs alternating 1024x768 and 768x1024, cut from scikit-learn's photos."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    paths = []
    for i in range(n):
        src = photos[i % len(photos)]
        w, h = (1024, 768) if i % 2 == 0 else (768, 1024)
        big = src.resize((max(w, h) * src.width // src.height + 1, max(w, h)), Image.BICUBIC)
        left = (i * 37) % (big.width - w + 1)
        p = folder / f"oxford_like_{i:03d}.jpg"
        big.crop((left, 0, left + w, h)).save(p, quality=90)
        paths.append(p)
    return paths


def extraction(arch: str, paths: list[Path], max_size: int, device) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch, True, 1024, None)).eval().to(device)
    items = [rt.ImageItem(p.name, p) for p in paths]
    cfg = rt.RetrievalConfig(max_size=max_size)
    rt.extract_regions(model, items[:1], cfg, device)  # warm-up
    t0 = time.perf_counter()
    batched = rt.extract_regions(model, items, cfg, device, max_pixels=rt.MAX_BATCH_PIXELS)
    t1 = time.perf_counter()
    single = rt.extract_regions(model, items, cfg, device, max_pixels=1)
    t2 = time.perf_counter()
    diff = max(float((b - s).abs().max()) for b, s in zip(batched, single))
    out = {"images": len(items), "max_size": max_size,
           "batched_img_per_s": _sig(len(items) / (t1 - t0)),
           "single_img_per_s": _sig(len(items) / (t2 - t1)),
           "max_abs_diff": diff, "regions_per_image": batched[0].shape[0]}
    out["batched_vs_single"] = _sig(out["batched_img_per_s"] / out["single_img_per_s"])
    return out


def ranking(n: int, dim: int = 512) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    db = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1)
    q = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1)
    t0 = time.perf_counter()
    order = rt.rank(q, db)
    secs = time.perf_counter() - t0
    assert order.shape == (n, n)
    return {"queries": n, "database": n, "dim": dim, "seconds": _sig(secs)}


def cell(tmp: Path, device: str) -> dict[str, Any]:
    roots = build_embedded(tmp / "cache", roles=("oxford5k", "paris6k"))
    info = describe_checkpoint(write_random_checkpoint(ModelSpec("alexnet", True, 1024),
                                                       tmp / "random.pth"))
    spec = next(c for c in load_suite("demo").cells if c.task == "retrieval")
    cfg = resolve_config(get_task("retrieval"), spec.config)
    ctx = TaskContext(info, "oxford5k", roots["oxford5k"], 0,
                      Runtime(workers=0, device=device), resolve_device(device),
                      tmp / "state", {"paris6k": roots["paris6k"]}, tmp / "shared")
    (m,) = rt.run(cfg, ctx)
    secs = m.details["seconds"]
    total = sum(secs.values())
    return {"recipe": {"max_size": cfg.max_size}, "n_database": m.details["n_database"],
            "n_whitening_images": m.details["whitening"]["n_images"], "seconds": secs,
            "share": {k: round(v / total, 4) for k, v in secs.items()}, "mAP": m.value}


def run(quick: bool = False, images: int = 8, device: str = "auto") -> dict[str, Any]:
    dev = resolve_device(device)
    n = 2 if quick else images
    max_size = 256 if quick else 1024
    out: dict[str, Any] = {"device": str(dev), "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        paths = oxford_like_jpegs(tmp, n)
        for arch in ("alexnet", "vgg16"):
            r = extraction(arch, paths, max_size, dev)
            out[f"extract/{arch}"] = r
            print(f"retrieval extraction {arch} at {max_size} px: batched "
                  f"{r['batched_img_per_s']:.2f} img/s, one at a time "
                  f"{r['single_img_per_s']:.2f} img/s (x{r['batched_vs_single']:.2f}); "
                  f"max |diff| {r['max_abs_diff']:.1e}; {r['regions_per_image']} regions "
                  f"on {dev}")
        out["rank"] = ranking(500 if quick else 5000)
        print(f"ranking {out['rank']['queries']} x {out['rank']['database']} "
              f"({out['rank']['dim']}-d): {out['rank']['seconds']:.3f} s")
        out["cell"] = c = cell(tmp, device)
        print("retrieval cell (demo recipe, oxford5k-format, empty cache): " + ", ".join(
            f"{k} {v:.2f} s ({100 * c['share'][k]:.0f} %)" for k, v in c["seconds"].items()))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    run(a.quick, a.images, a.device)
