"""Where `make demo`'s time goes, against the demo network's own limits on this machine.

    python benchmarks/demo_profile.py --demo demo --out demo_profile.json [--no-measure]

Reads what a finished demo wrote -- the pretraining log (per epoch: feature extraction,
PCA, k-means, training, in seconds and img/s) and every record's ``seconds``, ``started``,
``ended`` -- and measures, in this run, the demo network's raw throughput on in-memory batches
(the limit of each phase): the training step (forward + backward + both SGD steps, batch 64)
and the eval forward (batch 256), each with torch's default threads and with one thread,
in NCHW and in channels_last. It prints one table per part and writes the JSON report.
Nothing is asserted about speed.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from dcbench.core import atomic_write_json, resolve_device  # noqa: E402
from pretrain.config import preset_config  # noqa: E402
from pretrain.train import Speed  # noqa: E402


def pretraining(log_path: Path) -> dict:
    """Per-phase seconds summed over the logged epochs, and mean img/s where logged."""
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "seconds" in r]
    phases = defaultdict(float)
    for r in rows:
        for k, v in r["seconds"].items():
            phases[k] += v
    rates = {k: sum(r["img_per_s"][k] for r in rows) / len(rows)
             for k in ("features", "train") if rows and all(k in r.get("img_per_s", {}) for r in rows)}
    return {"epochs": len(rows), "seconds": dict(phases), "img_per_s": rates}


def _cell_name(rec: dict) -> str:
    mode = rec.get("config", {}).get("mode")
    return f"{rec['task']}{'/' + mode if mode else ''}"


def cells(results: Path) -> dict:
    """Seconds per kind of cell (summed over checkpoints) and the evaluation's wall span."""
    per, spans = defaultdict(lambda: [0, 0.0]), []
    for f in sorted(results.glob("*/*.json")):
        try:
            rec = json.loads(f.read_text())["records"][0]
        except (OSError, ValueError, KeyError, IndexError):
            continue
        per[_cell_name(rec)][0] += 1
        per[_cell_name(rec)][1] += rec["seconds"]
        spans.append((datetime.fromisoformat(rec["started"]), datetime.fromisoformat(rec["ended"])))
    wall = (max(e for _, e in spans) - min(s for s, _ in spans)).total_seconds() if spans else 0.0
    return {"by_kind": {k: {"cells": n, "seconds": round(s, 1)} for k, (n, s) in sorted(per.items())},
            "cell_seconds": round(sum(s for _, s in per.values()), 1), "wall_seconds": wall}


def limits(min_seconds: float) -> dict:
    """The demo network's raw img/s: threads (default, 1) x memory format (NCHW, NHWC)."""
    import epoch  # the per-phase timers of benchmarks/epoch.py

    cfg = preset_config("demo")
    device = resolve_device("cpu")
    default_threads, out = torch.get_num_threads(), {}
    try:
        for threads in sorted({default_threads, 1}, reverse=True):
            torch.set_num_threads(threads)
            for cl in (False, True):
                speed = Speed(channels_last=cl)
                model = epoch.make_model(cfg, device, speed)
                fwd = epoch.time_forward(model, cfg, 256, device, speed, min_seconds)
                step = epoch.time_train_step(model, cfg, device, speed, min_seconds)
                out[f"{threads}t/{'nhwc' if cl else 'nchw'}"] = {
                    "forward_img_per_s": round(fwd["img_per_s"], 1),
                    "train_step_img_per_s": round(step["img_per_s"], 1)}
    finally:
        torch.set_num_threads(default_threads)
    return out


def render(rep: dict) -> str:
    pre, ev = rep["pretraining"], rep["evaluation"]
    lines = [f"pretraining: {pre['epochs']} epochs, " + ", ".join(
        f"{k} {v:.1f} s" for k, v in pre["seconds"].items()),
        "  pipeline img/s: " + ", ".join(f"{k} {v:.0f}" for k, v in pre["img_per_s"].items())]
    for name, lim in rep.get("limits", {}).items():
        lines.append(f"  raw {name}: forward {lim['forward_img_per_s']:.0f} img/s, train step "
                     f"{lim['train_step_img_per_s']:.0f} img/s")
    lines.append(f"evaluation: {ev['cell_seconds']:.0f} cell-seconds in {ev['wall_seconds']:.0f} s wall")
    lines += [f"  {k:32s} {v['cells']:2d} cells {v['seconds']:7.1f} s" for k, v in ev["by_kind"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", default="demo", help="the OUT folder of `make demo`")
    ap.add_argument("--out", help="JSON report (written atomically)")
    ap.add_argument("--no-measure", action="store_true", help="skip the raw throughput runs")
    ap.add_argument("--min-seconds", type=float, default=3.0)
    args = ap.parse_args(argv)
    demo = Path(args.demo)
    log = demo / "pretrain" / "log.jsonl"
    if not log.is_file():
        print(f"error: {log} not found: run `make demo` (or give --demo OUT) first", file=sys.stderr)
        return 2
    rep = {"pretraining": pretraining(log), "evaluation": cells(demo / "results")}
    if not args.no_measure:
        rep["limits"] = limits(args.min_seconds)
    print(render(rep))
    if args.out:
        atomic_write_json(args.out, rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
