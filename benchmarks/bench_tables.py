"""Speed of ``tables``: load + collate + render for thousands of synthetic records.

    python benchmarks/bench_tables.py [--records 5000] [--per-file 5] [--repeat 3]

Writes synthetic records with ``evaluations.records.write_cell`` into a temp folder, then
times (best of ``--repeat``): a reference pass that only ``json.loads`` every file, the
loader (parse + validate + tidy DataFrame), collation of the four tables, and rendering to
Markdown, LaTeX and CSV. Prints records/s and the loader's ratio to the reference. No
assertion on time.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluations.records import CellFile, Record, iter_results_files, write_cell  # noqa: E402
from tables.collate import build_view, collate_table, load_results  # noqa: E402
from tables.render import to_csv, to_latex, to_markdown  # noqa: E402
from tables.specs import SPECS  # noqa: E402


def _record(rng: random.Random, ckpt: dict, table: str, column: str, seed: int,
            selection: str, variant: str | None, key: str) -> Record:
    return Record(
        table=table, column=column, task="synthetic", dataset=column.split("/")[0],
        dataset_name="synthetic", protocol="dc2018", metric=SPECS[table].column(column).metric,
        value=rng.uniform(10, 80), selection=selection, variant=variant, seed=seed,
        checkpoint=ckpt, config={"lr": 0.01, "epochs": 90}, config_hash="0" * 12, cell_key=key,
        code={"version": "0", "git_sha": "0" * 40, "dirty": False},
        env={"python": "3.11"}, job_id="0", started="", ended="", seconds=1.0)


def make_records(root: Path, n: int, per_file: int, seed: int = 0) -> int:
    """Write about ``n`` synthetic records (``per_file`` per cell) under ``root``."""
    rng = random.Random(seed)
    slots = [(t, c) for t, s in SPECS.items() for c in s.column_keys]
    written = 0
    i = 0
    while written < n:
        ck = i % 40
        ckpt = {"id": f"ckpt{ck:02d}", "label": f"synthetic {ck:02d}", "path": "", "sha256": "",
                "arch": "alexnet", "sobel": True, "epoch": 1, "k": 10 ** (2 + ck % 4)}
        recs = []
        key = f"cell{i:06d}"
        for j in range(min(per_file, n - written)):
            table, column = slots[(i * per_file + j) % len(slots)]
            sel, var = ("best_epoch", "10crop") if table == "table1" else ("final", None)
            recs.append(_record(rng, ckpt, table, column, seed=i // 40, selection=sel,
                                variant=var, key=key))
        write_cell(root, ckpt["id"], CellFile(key, "synthetic", tuple(recs)))
        written += len(recs)
        i += 1
    return written


def _best(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=5000)
    p.add_argument("--per-file", type=int, default=5)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "results"
        t0 = time.perf_counter()
        n = make_records(root, args.records, args.per_file)
        files = iter_results_files(root)
        print(f"wrote {n} records in {len(files)} files in {time.perf_counter() - t0:.2f} s")

        t_ref, _ = _best(lambda: [json.loads(f.read_text()) for f in files], args.repeat)
        t_load, res = _best(lambda: load_results(root), args.repeat)
        t_col, views = _best(lambda: [build_view(collate_table(s, res))
                                      for s in SPECS.values()], args.repeat)
        t_ren, _ = _best(lambda: [(to_markdown(v), to_latex(v), to_csv(v)) for v in views],
                         args.repeat)

    total = t_load + t_col + t_ren
    rows = sum(len([r for r in v.rows if r.kind == "ours"]) for v in views)
    print(f"reference json.loads of every file: {t_ref * 1e3:8.1f} ms")
    print(f"load_results (parse+validate+tidy): {t_load * 1e3:8.1f} ms "
          f"({t_load / t_ref:.2f}x reference)")
    print(f"collate 4 tables ({rows} our rows):   {t_col * 1e3:8.1f} ms")
    print(f"render md + latex + csv:            {t_ren * 1e3:8.1f} ms")
    print(f"collate+render:                     {(t_col + t_ren) * 1e3:8.1f} ms "
          f"= {n / (t_col + t_ren):,.0f} records/s")
    print(f"load+collate+render:                {total * 1e3:8.1f} ms "
          f"= {n / total:,.0f} records/s")
    return {"records": n, "files": len(files), "reference_load_s": t_ref, "load_s": t_load,
            "collate_s": t_col, "render_s": t_ren, "load_vs_reference": t_load / t_ref,
            "records_per_s": n / total, "our_rows": rows}


if __name__ == "__main__":
    main()
