"""The retrieval cells end to end on the embedded Oxford- / Paris-format sets: the shared
descriptor cache (a rerun extracts nothing, a truncated cache is rebuilt, the Paris cell reuses
what the Oxford cell extracted), the Revisited E / M / H columns, run_all + render, and the bad
inputs a user meets (one message naming the path, exit 2, no record)."""
from __future__ import annotations

import json
import logging
import pickle
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import load_fixture_module
from dcbench.core import resolve_device
from evaluations import retrieval as rt
from evaluations.backbone import describe_checkpoint
from evaluations.context import Runtime, TaskContext
from evaluations.datasets import RETRIEVAL_ROLES
from evaluations.datasets import oxford
from evaluations.datasets.embedded import build_embedded

REPO = Path(__file__).resolve().parent.parent
lc = load_fixture_module("legacy_checkpoints.py", "legacy_checkpoints_fixture")
CFG = rt.RetrievalConfig(max_size=160)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    roots = build_embedded(root / "cache", roles=("oxford5k", "paris6k", "roxford5k",
                                                   "rparis6k"))
    ckpt = root / "released.pth"  # the authors' format, written without the project's writer
    lc.write_released_checkpoint(ckpt, "alexnet", fc_dim=32, k=None, seed=0)
    return {"root": root, "roots": roots, "ckpt": ckpt, "info": describe_checkpoint(ckpt)}


def ctx_for(env, role: str, shared: Path) -> TaskContext:
    other = oxford.WHITENING_ROLE[role]
    return TaskContext(env["info"], role, env["roots"][role], 0, Runtime(workers=0),
                       resolve_device("cpu"), shared / "state",
                       {other: env["roots"][other]}, shared / "cache")


def test_role_lists_agree():
    assert RETRIEVAL_ROLES == oxford.RETRIEVAL_ROLES


def test_embedded_roles_share_one_folder(env):
    assert env["roots"]["oxford5k"] == env["roots"]["roxford5k"]
    assert env["roots"]["paris6k"] == env["roots"]["rparis6k"]


def test_rerun_uses_the_cache_and_a_truncated_cache_is_rebuilt(env, tmp_path, monkeypatch,
                                                                caplog):
    (first,) = rt.run(CFG, ctx_for(env, "oxford5k", tmp_path))
    data = oxford.read_retrieval(env["roots"]["oxford5k"], "oxford5k")
    paris = oxford.read_retrieval(env["roots"]["paris6k"], "paris6k")
    assert first.column == "oxford5k" and first.metric == "mAP" and 0 <= first.value <= 100
    assert first.details["extracted"] == {"oxford5k": len(data) + len(data.queries),
                                          "paris6k": len(paris)}
    assert first.details["whitening"]["learned_on"] == "paris6k"
    assert set(first.details["seconds"]) == {"extract", "whiten", "rank", "score"}

    real = rt.extract_regions
    monkeypatch.setattr(rt, "extract_regions", lambda *a, **k: pytest.fail("extracted again"))
    (again,) = rt.run(CFG, ctx_for(env, "oxford5k", tmp_path))
    assert again.value == first.value and again.details["extracted"] == {"oxford5k": 0,
                                                                         "paris6k": 0}
    monkeypatch.setattr(rt, "extract_regions", real)
    files = sorted((tmp_path / "cache" / "retrieval").glob("*.pt"))
    assert len(files) == 2  # one per image folder (Oxford's, Paris')
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="evaluations.retrieval"):
        (rebuilt,) = rt.run(CFG, ctx_for(env, "oxford5k", tmp_path))
    assert "unreadable" in caplog.text and "rebuilding" in caplog.text
    assert rebuilt.value == first.value
    assert rebuilt.details["extracted"]["oxford5k"] > 0


def test_paris_cell_reuses_what_the_oxford_cell_extracted(env, tmp_path):
    rt.run(CFG, ctx_for(env, "oxford5k", tmp_path))
    (paris,) = rt.run(CFG, ctx_for(env, "paris6k", tmp_path))
    data = oxford.read_retrieval(env["roots"]["paris6k"], "paris6k")
    # Paris' database was extracted for the Oxford cell's whitening: only its queries are new
    assert paris.details["extracted"] == {"paris6k": len(data.queries), "oxford5k": 0}
    assert paris.details["excluded"] == sorted(set(data.excluded))
    assert paris.column == "paris6k"


def test_revisited_cell_gives_easy_medium_hard(env, tmp_path):
    out = rt.run(CFG, ctx_for(env, "roxford5k", tmp_path))
    assert [m.column for m in out] == ["roxford5k/E", "roxford5k/M", "roxford5k/H"]
    data = oxford.read_retrieval(env["roots"]["roxford5k"], "roxford5k")
    for m in out:
        assert 0 <= m.value <= 100 and set(m.details["mP@k"]) == {1, 5, 10}
        assert len(m.details["per_query_ap"]) == len(data.queries)
        assert m.details["query_crop"] == "before_resize"
        assert m.details["whitening"]["learned_on"] == "rparis6k"
    # revisited queries are not in the database: their crops come on top of imlist
    assert out[0].details["extracted"]["roxford5k"] == len(data) + len(data.queries)


def test_more_regions_from_multi_scale_and_query_expansion_recorded(env, tmp_path):
    cfg = replace(CFG, scales=(1.0, 0.7071), query_expansion=2)
    (m,) = rt.run(cfg, ctx_for(env, "oxford5k", tmp_path))
    (base,) = rt.run(CFG, ctx_for(env, "oxford5k", tmp_path))
    assert m.details["regions_per_image"] > base.details["regions_per_image"]


def test_missing_whitening_root_is_a_clear_error(env, tmp_path):
    ctx = replace(ctx_for(env, "oxford5k", tmp_path), extra_roots={})
    with pytest.raises(Exception, match=r"paris6k.*--data-root paris6k=PATH"):
        rt.run(CFG, ctx)


# --------------------------------------------------------------------------- run_all

SUITE = """
name = "retr"
random_baseline = true
[datasets]
oxford5k = "{oxford}"
paris6k = "{paris}"
roxford5k = "{oxford}"
rparis6k = "{paris}"
[runtime]
workers = 0
[resources]
cpus_per_task = 2
mem_gb = 2
timeout_min = 10
[[cell]]
task = "retrieval"
datasets = {original}
[cell.config]
max_size = 160
[[cell]]
task = "retrieval_revisited"
datasets = ["roxford5k", "rparis6k"]
[cell.config]
max_size = 160
"""


def run_all(env, results: Path, oxford_root: Path, paris_root: Path, *extra: str,
            original: str = '["oxford5k", "paris6k"]', suite_text: str = SUITE):
    suite = results.parent / f"{results.name}.toml"
    suite.write_text(suite_text.format(oxford=oxford_root, paris=paris_root, original=original))
    return subprocess.run([sys.executable, "-m", "evaluations.run_all", "--ckpt",
                           str(env["ckpt"]), "--suite", str(suite), "--results", str(results),
                           "--executor", "local", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=900)


def record_files(results: Path) -> list[Path]:
    return [p for p in results.glob("*/*.json") if not p.name.startswith(".")]


@pytest.mark.slow
def test_run_all_and_render_fill_the_retrieval_table(env, tmp_path):
    results = tmp_path / "results"
    p = run_all(env, results, env["roots"]["oxford5k"], env["roots"]["paris6k"])
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [r for f in record_files(results) for r in json.loads(f.read_text())["records"]]
    cols = sorted({(r["checkpoint"]["label"], r["column"]) for r in recs})
    assert len(cols) == 2 * 8  # ours and Random x (2 + 2 x 3) columns
    assert {r["protocol"] for r in recs if "/" in r["column"]} == {"dc2018-reimpl"}
    assert {r["protocol"] for r in recs if "/" not in r["column"]} == {"dc2018"}
    out = tmp_path / "tables"
    r = subprocess.run([sys.executable, "tables/render.py", "--results", str(results), "--out",
                        str(out), "--tables", "retrieval", "--no-figures"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    md = (out / "retrieval.md").read_text()
    ours = next(line for line in md.splitlines() if line.startswith("| released"))
    assert "missing" not in ours and ours.count("|") == 10  # 9 columns all filled
    again = run_all(env, results, env["roots"]["oxford5k"], env["roots"]["paris6k"])
    assert again.returncode == 0 and "0 done, 8 skipped" in again.stdout + again.stderr


def _copy(env, tmp_path, role: str) -> Path:
    dst = tmp_path / role
    shutil.copytree(env["roots"][role], dst)
    return dst


def _first_query(root: Path) -> str:
    return sorted(p.name[:-len("_query.txt")] for p in (root / "lab").glob("*_query.txt"))[0]


def _break_gt_file(root: Path) -> str:
    f = root / "lab" / f"{_first_query(root)}_good.txt"
    f.unlink()
    return str(f)


def _break_query_image(root: Path) -> str:
    name = (root / "lab" / f"{_first_query(root)}_query.txt").read_text().split()[0]
    name = name.removeprefix("oxc1_")
    (path,) = (root / "jpg").rglob(f"{name}.jpg")
    path.unlink()
    return name


def _break_box(root: Path) -> str:
    f = root / "lab" / f"{_first_query(root)}_query.txt"
    name = f.read_text().split()[0]
    f.write_text(f"{name} 10 10 5000 20\n")
    return str(f)


def _gnd(root: Path) -> Path:
    return root / "gnd_roxford5k.pkl"


def _break_pkl_shape(root: Path) -> str:
    data = pickle.loads(_gnd(root).read_bytes())
    data["gnd"] = data["gnd"][:-1]  # one query without ground truth
    _gnd(root).write_bytes(pickle.dumps(data, protocol=4))
    return str(_gnd(root))


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _break_pkl_object(root: Path) -> str:
    data = pickle.loads(_gnd(root).read_bytes())
    data["gnd"][0]["easy"] = Evil()
    _gnd(root).write_bytes(pickle.dumps(data, protocol=4))
    return str(_gnd(root))


@pytest.mark.parametrize("damage,needle", [
    (_break_gt_file, "_good.txt"), (_break_query_image, "not under"),
    (_break_box, "outside its image"), (_break_pkl_shape, "gnd"),
    (_break_pkl_object, "builtins.print")])
def test_bad_inputs_one_message_no_record(env, tmp_path, damage, needle):
    ox = _copy(env, tmp_path, "oxford5k")
    where = damage(ox)
    results = tmp_path / "results"
    p = run_all(env, results, ox, env["roots"]["paris6k"])
    assert p.returncode == 2, p.stdout + p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in p.stderr
    if "/" in where:
        assert where in errors[0]
    assert "pwned" not in p.stdout + p.stderr
    assert not record_files(results)


def test_whitening_role_is_required_up_front(env, tmp_path):
    suite = ('name = "alone"\n[datasets]\noxford5k = "{oxford}"\n[[cell]]\n'
             'task = "retrieval"\ndatasets = {original}\n')
    results = tmp_path / "results"
    p = run_all(env, results, env["roots"]["oxford5k"], env["roots"]["paris6k"],
                original='["oxford5k"]', suite_text=suite)
    assert p.returncode == 2 and "paris6k" in p.stderr, p.stderr[-2000:]
    assert sum(line.startswith("error:") for line in p.stderr.splitlines()) == 1
    assert not record_files(results)
