"""Run every benchmark once and write their numbers to benchmarks/results.json.

    python benchmarks/run.py [--quick]

Each benchmark reports ratios measured within its own run (never against a stored number).
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from dcbench.core import atomic_write_json  # noqa: E402
BENCHES = ("bench_clustering", "bench_linear_probe", "bench_pretrain", "bench_tables",
           "bench_voc", "bench_voc_dense", "bench_retrieval", "epoch")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--out", default=str(HERE / "results.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("pretrain", "evaluations"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    results = {"platform": platform.platform(), "python": platform.python_version(),
               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for name in BENCHES:
        print(f"\n== {name}")
        mod = _load(name)
        if name == "bench_tables":
            results[name] = mod.main(["--records", "500", "--repeat", "1"] if args.quick else [])
            continue
        results[name] = mod.run(quick=args.quick)
    atomic_write_json(args.out, results)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
