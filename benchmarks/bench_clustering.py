"""Time the clustering step on one synthetic data set: ours (torch) versus faiss.

    python benchmarks/bench_clustering.py [--n 100000 --d-in 1024 --d 256 --k 1000] [--quick]

Steps, all on the SAME data in one run: PCA-whitening + L2 (``pca_whiten_l2`` vs faiss
``PCAMatrix(d_in, d, -0.5)`` + ``normalize_L2``), then k-means on the whitened features
(faiss backend vs torch backend on CPU, and on CUDA when available). Prints a table with
seconds and torch/faiss ratios; :func:`run` returns the same as a dict for a runner.
Each timed call follows a small untimed warm-up of the same code path.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.clustering import (available_backends, fit_pca_whitening, kmeans, nmi,  # noqa: E402
                                 pca_whiten_l2)

log = logging.getLogger("bench_clustering")


@dataclass(frozen=True)
class BenchConfig:
    n: int = 100_000
    d_in: int = 1024
    d: int = 256
    k: int = 1000
    niter: int = 20
    seed: int = 0
    repeat: int = 1  # best of this many timed calls
    few_rows: int = 300  # a small run at the paper's fc7 width (issue 13: ~9 s/epoch in eigh)
    wide_d: int = 4096


QUICK = BenchConfig(n=5000, d_in=128, d=32, k=50, few_rows=100, wide_d=512)


def synthetic_features(cfg: BenchConfig) -> np.ndarray:
    """Gaussian mixture (k centres) in d_in dims with a decaying spectrum, float32."""
    rng = np.random.default_rng(cfg.seed)
    centres = rng.normal(size=(cfg.k, cfg.d_in)).astype(np.float32) * 3
    x = centres[rng.integers(0, cfg.k, cfg.n)]
    x += rng.normal(size=(cfg.n, cfg.d_in)).astype(np.float32)
    x *= np.linspace(2.0, 0.2, cfg.d_in, dtype=np.float32)
    return x


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[Any, float]:
    """The last result and the best wall time of ``repeat`` calls."""
    best = float("inf")
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def faiss_pca_l2(x: np.ndarray, dim: int) -> np.ndarray:
    import faiss

    pca = faiss.PCAMatrix(x.shape[1], dim, -0.5)  # positional: keyword fails on faiss >= 1.14
    pca.train(x)
    y = pca.apply(x)
    faiss.normalize_L2(y)
    return y


def run(quick: bool = False, cfg: BenchConfig | None = None) -> dict[str, Any]:
    """Time every step; returns {"config", "device", "rows", "ratios", "agreement"}."""
    cfg = cfg or (QUICK if quick else BenchConfig())
    have_faiss = "faiss" in available_backends()
    have_cuda = torch.cuda.is_available()
    x_in = synthetic_features(cfg)
    warm = x_in[: max(cfg.k * 2, 2 * cfg.d_in)]
    rows: list[dict[str, Any]] = []

    def record(step: str, impl: str, seconds: float) -> None:
        rows.append({"step": step, "impl": impl, "seconds": round(seconds, 4)})
        log.info("%s / %s: %.3f s", step, impl, seconds)

    # --- PCA-whitening + L2
    pca_whiten_l2(warm, cfg.d)
    x, t = timed(lambda: pca_whiten_l2(x_in, cfg.d), cfg.repeat)
    record("pca", "torch-cpu", t)
    x32, t = timed(lambda: pca_whiten_l2(x_in, cfg.d, scatter_dtype=torch.float32), cfg.repeat)
    record("pca", "torch-cpu-fp32scatter", t)
    if have_faiss:
        faiss_pca_l2(warm, cfg.d)
        x_ref, t = timed(lambda: faiss_pca_l2(x_in, cfg.d), cfg.repeat)
        record("pca", "faiss-cpu", t)
        signs = np.sign((x * x_ref).sum(axis=0))
        pca_max_abs_diff = float(np.abs(x * signs - x_ref).max())
    if have_cuda:
        xg_in = torch.from_numpy(x_in).cuda()
        pca_whiten_l2(xg_in[: warm.shape[0]], cfg.d)
        torch.cuda.synchronize()
        _, t = timed(lambda: (pca_whiten_l2(xg_in, cfg.d), torch.cuda.synchronize()), cfg.repeat)
        record("pca", "torch-cuda", t)
        del xg_in

    # --- a small run at the paper's width (N < d): the Gram route vs the d x d scatter
    few = synthetic_features(replace(cfg, n=cfg.few_rows, d_in=cfg.wide_d))
    fit_pca_whitening(few[:64], 32)
    _, t = timed(lambda: fit_pca_whitening(few, cfg.d, route="scatter"), cfg.repeat)
    record(f"pca N={cfg.few_rows} d={cfg.wide_d}", "scatter", t)
    _, t = timed(lambda: fit_pca_whitening(few, cfg.d, route="gram"), cfg.repeat)
    record(f"pca N={cfg.few_rows} d={cfg.wide_d}", "gram", t)

    # --- k-means on the whitened features (the same array for every backend)
    results = {}
    runs = [("torch-cpu", "torch", "cpu")]
    if have_faiss:
        runs.insert(0, ("faiss", "faiss", None))
    if have_cuda:
        runs.append(("torch-cuda", "torch", "cuda"))
    for name, backend, device in runs:
        kmeans(x[: cfg.k * 2], cfg.k, niter=2, seed=cfg.seed, backend=backend, device=device)
        res, t = timed(
            lambda: kmeans(x, cfg.k, cfg.niter, cfg.seed, backend=backend, device=device),
            cfg.repeat,
        )
        record("kmeans", f"{name} ({res.device})", t)
        results[name] = res

    seconds = {(r["step"], r["impl"].split(" ")[0]): r["seconds"] for r in rows}
    ratios = {}
    wide = f"pca N={cfg.few_rows} d={cfg.wide_d}"
    ratios[f"{wide} scatter/gram"] = seconds[(wide, "scatter")] / seconds[(wide, "gram")]
    agreement: dict[str, Any] = {}
    if have_faiss:
        for impl in ("torch-cpu", "torch-cpu-fp32scatter"):
            ratios[f"pca {impl}/faiss-cpu"] = seconds[("pca", impl)] / seconds[("pca", "faiss-cpu")]
        agreement["pca_max_abs_diff_after_sign_alignment"] = pca_max_abs_diff
        agreement["pca_fp32scatter_max_abs_diff"] = float(np.abs(x32 - x).max())
        for name in ("torch-cpu", "torch-cuda"):
            if name in results:
                ratios[f"kmeans {name}/faiss"] = (
                    seconds[("kmeans", name)] / seconds[("kmeans", "faiss")]
                )
                f, o = results["faiss"], results[name]
                agreement[f"kmeans {name} vs faiss"] = {
                    "same_assignment_fraction": float(np.mean(f.assign == o.assign)),
                    "nmi": nmi(f.assign, o.assign),
                    "loss_rel_diff": abs(o.loss - f.loss) / f.loss,
                    "empty_splits": [f.empty_splits, o.empty_splits],
                }
    if "torch-cuda" in results:
        ratios["pca torch-cuda/torch-cpu"] = (
            seconds[("pca", "torch-cuda")] / seconds[("pca", "torch-cpu")]
        )
    return {
        "config": asdict(cfg),
        "device": {
            "cpu_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if have_cuda else None,
            "faiss": have_faiss,
        },
        "rows": rows,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "agreement": agreement,
    }


def format_table(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"N={cfg['n']} d_in={cfg['d_in']} d={cfg['d']} k={cfg['k']} niter={cfg['niter']} "
        f"threads={report['device']['cpu_threads']} cuda={report['device']['cuda']}",
        f"{'step':<8} {'implementation':<26} {'seconds':>9}",
    ]
    lines += [f"{r['step']:<8} {r['impl']:<26} {r['seconds']:>9.3f}" for r in report["rows"]]
    lines += [f"ratio {name}: {value:.2f}" for name, value in report["ratios"].items()]
    lines += [f"agreement {name}: {value}" for name, value in report["agreement"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help=f"small sizes ({QUICK})")
    p.add_argument("--n", type=int)
    p.add_argument("--d-in", type=int, help="feature dimension before PCA")
    p.add_argument("--d", type=int, help="PCA output dimension = k-means dimension")
    p.add_argument("--k", type=int)
    p.add_argument("--niter", type=int)
    p.add_argument("--repeat", type=int, help="best of this many timed calls (default 1)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s")
    base = QUICK if args.quick else BenchConfig()
    fields = ("n", "d_in", "d", "k", "niter", "repeat")
    overrides = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    report = run(args.quick, BenchConfig(**{**asdict(base), **overrides}))
    print(format_table(report))
    return report


if __name__ == "__main__":
    main()
