"""The demo over several pretraining seeds: every seed listed, mean +- std, and Random.

    python benchmarks/demo_seeds.py --seeds 0 1 2 --out demo_seeds [--tabulate-only]

For each seed S it runs what `make demo` runs -- ``python -m pretrain --preset demo --seed S``
then ``python -m evaluations.run_all --suite demo`` on that checkpoint -- into one results
folder (the never-trained Random baseline does not depend on S: its cells run once), then
writes ``<out>/seeds.md`` and ``seeds.json`` (records matched to seeds by the checkpoints'
sha256): one row per seed, the mean +- sample std
(ddof 1) over the seeds, the Random row, and mean - Random. Finished steps are skipped on a
rerun (the pretraining resumes, run_all skips finished cells).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from dcbench.core import UserError, atomic_write, atomic_write_json, file_sha256  # noqa: E402

# (header, task, column): the README's demo columns; best epoch / final, paper test variant
COLUMNS = (
    *[(f"IN {c}", "linear", f"imagenet/{c}") for c in ("conv1", "conv2", "conv3", "conv4", "conv5")],
    ("IN fc6-8", "fc_retrain", "imagenet/acc1"),
    *[(f"Pl {c}", "linear", f"places/{c}") for c in ("conv1", "conv2", "conv3", "conv4", "conv5")],
    ("VOC cls fc6-8", "voc_classification", "classification/fc6-8"),
    ("VOC cls all", "voc_classification", "classification/all"),
    ("VOC det fc6-8", "voc_detection", "detection/fc6-8"),
    ("VOC det all", "voc_detection", "detection/all"),
    ("VOC seg fc6-8", "voc_segmentation", "segmentation/fc6-8"),
    ("VOC seg all", "voc_segmentation", "segmentation/all"),
    ("Oxford5K", "retrieval", "oxford5k"),
    ("Paris6K", "retrieval", "paris6k"),
)
SELECTIONS = {"best_epoch", "final"}
VARIANTS = {"10crop", "10crops", "single-scale", None}


def label(seed: int) -> str:
    return f"DeepCluster (demo, seed {seed})"


def run_seed(seed: int, out: Path, python: str) -> None:
    pre = out / f"seed{seed}"
    cmd = [python, "-m", "pretrain", "--preset", "demo", "--seed", str(seed), "--out", str(pre)]
    if (pre / "checkpoint.pth").is_file():
        cmd.append("--resume")
    subprocess.run(cmd, check=True)
    subprocess.run([python, "-m", "evaluations.run_all", "--suite", "demo", "--executor", "local",
                    "--ckpt", str(pre / "checkpoint.pth"), "--label", label(seed),
                    "--results", str(out / "results"), "--cache", str(out / "cache")], check=True)


def values(results: Path) -> dict[str, dict[str, float]]:
    """{checkpoint sha256 (or "Random"): {header: value}} from every record under ``results``."""
    wanted = {(task, col): head for head, task, col in COLUMNS}
    out: dict[str, dict[str, float]] = {}
    source: dict[tuple[str, str], Path] = {}
    for f in sorted(results.glob("*/*.json")):
        try:
            recs = json.loads(f.read_text())["records"]
        except (OSError, ValueError, KeyError):
            continue
        for r in recs:
            head = wanted.get((r["task"], r["column"]))
            if head and r["selection"] in SELECTIONS and r["variant"] in VARIANTS:
                ck = r["checkpoint"]
                key = "Random" if ck["label"].startswith("Random") else ck["sha256"]
                first = source.setdefault((key, head), f)
                if first != f:
                    raise UserError(
                        f"{results} holds two cells with {head} of checkpoint {ck['label']!r}: "
                        f"{first} and {f} (a suite whose recipe changed between runs); give "
                        "a fresh --out, or delete the cell file of the recipe no longer wanted.")
                out.setdefault(key, {})[head] = float(r["value"])
    return out


def table(vals: dict[str, dict[str, float]], shas: dict[int, str]) -> tuple[str, dict]:
    """The markdown table and its numbers; ``shas``: each seed's checkpoint sha256."""
    heads, seeds = [h for h, _, _ in COLUMNS], list(shas)
    random = vals.get("Random", {})
    rows, summary = [], {"seeds": {}, "mean": {}, "std": {}, "random": random, "delta": {}}
    for s in seeds:
        v = vals.get(shas[s], {})
        summary["seeds"][s] = v
        rows.append([f"seed {s}"] + [f"{v[h]:.1f}" if h in v else "-" for h in heads])
    mean_row, delta_row = ["mean ± std"], ["mean − Random"]
    for h in heads:
        xs = [vals.get(shas[s], {}).get(h) for s in seeds]
        xs = [x for x in xs if x is not None]
        if not xs:
            mean_row.append("-")
            delta_row.append("-")
            continue
        m = statistics.fmean(xs)
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        summary["mean"][h], summary["std"][h] = m, sd
        mean_row.append(f"{m:.1f} ± {sd:.1f}")
        if h in random:
            summary["delta"][h] = m - random[h]
            delta_row.append(f"{m - random[h]:+.1f}")
        else:
            delta_row.append("-")
    rows += [mean_row, ["Random"] + [f"{random[h]:.1f}" if h in random else "-" for h in heads],
             delta_row]
    lines = ["| | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n", summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="demo_seeds")
    ap.add_argument("--tabulate-only", action="store_true", help="only read the records")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not args.tabulate_only:
        for s in args.seeds:
            run_seed(s, out, sys.executable)
    missing = [str(out / f"seed{s}" / "checkpoint.pth") for s in args.seeds
               if not (out / f"seed{s}" / "checkpoint.pth").is_file()]
    if missing:
        print(f"error: no checkpoint at {', '.join(missing)}: run without --tabulate-only "
              "(or give the --out and --seeds of an earlier run)", file=sys.stderr)
        return 2
    shas = {s: file_sha256(out / f"seed{s}" / "checkpoint.pth") for s in args.seeds}
    try:
        md, summary = table(values(out / "results"), shas)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(md)
    atomic_write(out / "seeds.md", md)
    atomic_write_json(out / "seeds.json", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
