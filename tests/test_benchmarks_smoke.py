"""The benchmark runner works end to end at small sizes (numbers are never asserted on time)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists(),
                    reason="apt-get install dataset-fashion-mnist")
def test_benchmark_runner_quick(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["bench_linear_probe"]["identical_numbers"] is True
    assert set(res["bench_pretrain"]["seconds"]) >= {"features", "pca", "kmeans", "train"}
    assert res["bench_clustering"]
