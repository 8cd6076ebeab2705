"""Rendering: golden Markdown/LaTeX, published cells read back from the rendered text,
LaTeX structure (and compilation when a TeX engine is installed), CSV."""
from __future__ import annotations

import importlib.util
import io
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from tables.render import render

FIXTURES = Path(__file__).parent / "fixtures" / "tables"
_spec = importlib.util.spec_from_file_location("tables_fixture_records", FIXTURES / "records.py")
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)

TABLES = ("table1", "voc", "supp_fc", "retrieval")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """The golden records rendered in every format into one output folder."""
    root = tmp_path_factory.mktemp("render")
    fx.golden_results(root / "results")
    render(root / "results", root / "out", "all", figures=False)
    return root / "out"


# ----------------------------------------------------------------------------- golden


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("ext", [".md", ".tex"])
def test_golden(rendered, table, ext):
    got = (rendered / f"{table}{ext}").read_text(encoding="utf-8")
    want = (FIXTURES / f"golden_{table}{ext}").read_text(encoding="utf-8")
    assert got == want


# ----------------------------------------------------------------------------- read back


def parse_markdown_table(text: str) -> list[dict[str, str]]:
    """Rows of the one GitHub-style pipe table in ``text``, as {header: cell} dicts."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    header, sep, body = split[0], split[1], split[2:]
    assert all(set(s) <= set("-:") for s in sep)
    assert all(len(r) == len(header) for r in body)
    return [dict(zip(header, r)) for r in body]


def md_cell(out: Path, table: str, method: str, column: str, **attrs: str) -> str:
    rows = [r for r in parse_markdown_table((out / f"{table}.md").read_text(encoding="utf-8"))
            if r["Method"] == method and all(r[k] == v for k, v in attrs.items())]
    assert len(rows) == 1, (table, method, attrs, rows)
    return rows[0][column]


@pytest.mark.parametrize("table,method,column,attrs,want", [
    ("table1", "DeepCluster", "ImageNet conv3", {}, "41.0"),
    ("table1", "Zhang et al. [72]", "Places conv4", {}, "34.1"),
    ("voc", "DeepCluster", "Detection fc6-8", {}, "51.4"),
    ("retrieval", "DeepCluster", "Paris6K", {}, "72.0"),
    ("voc", "Noroozi and Favaro [42]", "Classification fc6-8", {}, "—"),
    ("supp_fc", "DeepCluster", "Acc@1", {"Pre-trained dataset": "YFCC100M"}, "39.6"),
    ("supp_fc", "DeepCluster", "Acc@1", {"Pre-trained dataset": "ImageNet"}, "44.0"),
    ("voc", "DeepCluster (erratum: BN frozen)", "Classification fc6-8", {}, "70.4"),
    ("voc", "Wang and Gupta [63] [*]", "Detection fc6-8", {}, "32.8 [†]"),
    ("table1", "Places labels", "ImageNet conv1", {}, "—"),
    ("retrieval", "Random", "Oxford5K", {}, "6.9"),
])
def test_published_cells_read_back_from_markdown(rendered, table, method, column, attrs, want):
    assert md_cell(rendered, table, method, column, **attrs) == want


def test_our_cells_and_states_read_back(rendered):
    ours = "DeepCluster (ours, demo) · dc2018 · best_epoch · 10crop"
    assert md_cell(rendered, "table1", ours, "ImageNet conv1") == "12.5 ± 0.7 (2)"
    assert md_cell(rendered, "table1", ours, "Places conv3") == "37.3"
    assert md_cell(rendered, "table1", ours, "Places conv4") == "missing"
    assert md_cell(rendered, "table1", ours, "Places conv5") == "failed"
    # embedded data: Δ against the Random row of the same architecture, not the paper
    assert f"Δ vs paper DeepCluster ({ours})" not in (rendered / "table1.md").read_text()
    delta = f"Δ vs Random ({ours})"
    assert md_cell(rendered, "table1", delta, "ImageNet conv3") == "+26.6"  # 41.6 - 15.0
    assert md_cell(rendered, "table1", delta, "ImageNet conv5") == "+24.0"  # 36.0 - 12.0
    assert md_cell(rendered, "table1", delta, "Places conv3") == ""  # Random has no Places
    # the real Oxford5k records keep their Δ against the paper: 58.2 - 61.0
    assert md_cell(rendered, "retrieval", "Δ vs paper DeepCluster (DeepCluster (ours, demo) "
                   "· final)", "Oxford5K") == "-2.8"


def test_published_cell_read_back_from_latex(rendered):
    tex = (rendered / "table1.tex").read_text(encoding="utf-8")
    row = next(ln for ln in tex.splitlines() if ln.startswith("DeepCluster &"))
    cells = [c.strip() for c in row.removesuffix(r"\\").split("&")]
    assert cells[3] == "41.0"  # conv3: our 41.6 is the column's best
    assert cells[2] == r"\textbf{32.3}"


# ----------------------------------------------------------------------------- LaTeX


def _unescaped(s: str, ch: str) -> int:
    return len(re.findall(rf"(?<!\\){re.escape(ch)}", s))


def check_latex_structure(tex: str) -> None:
    assert _unescaped(tex, "{") == _unescaped(tex, "}")
    depth = 0
    for ch in re.sub(r"\\[{}]", "", tex):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    lines = tex.splitlines()
    order = [i for i, ln in enumerate(lines) if ln in (r"\toprule", r"\bottomrule")]
    assert [lines[i] for i in order] == [r"\toprule", r"\bottomrule"]
    top, bottom = order
    assert any(ln == r"\midrule" for ln in lines[top:bottom])
    colspec = re.search(r"\\begin\{tabular\}\{([lcr]+)\}", tex).group(1)
    n = len(colspec)
    for ln in lines[top + 1:bottom]:
        if ln.startswith(("\\midrule", "\\cmidrule")):
            continue
        assert ln.endswith(r"\\"), ln  # one row per line
        width = 0
        for cell in re.split(r"(?<!\\)&", ln.removesuffix(r"\\")):
            m = re.match(r"\s*\\multicolumn\{(\d+)\}", cell)
            width += int(m.group(1)) if m else 1
        assert width == n, ln


@pytest.mark.parametrize("table", TABLES)
def test_latex_structure(rendered, table):
    check_latex_structure((rendered / f"{table}.tex").read_text(encoding="utf-8"))


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no pdflatex installed")
def test_latex_compiles(rendered, tmp_path):
    body = (rendered / "tables.tex").read_text(encoding="utf-8")
    doc = ("\\documentclass{article}\n\\usepackage[T1]{fontenc}\n\\usepackage{booktabs}\n"
           f"\\begin{{document}}\n{body}\n\\end{{document}}\n")
    (tmp_path / "t.tex").write_text(doc, encoding="utf-8")
    run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout[-2000:]
    assert (tmp_path / "t.pdf").stat().st_size > 0


# ----------------------------------------------------------------------------- CSV


def test_csv_is_tidy(rendered):
    df = pd.read_csv(io.StringIO((rendered / "voc.csv").read_text(encoding="utf-8")),
                     keep_default_na=False)
    assert list(df.columns) == ["table", "section", "method", "attrs", "column", "text",
                                "value"]
    dc = df[(df["method"] == "DeepCluster") & (df["column"] == "detection/fc6-8")]
    assert dc["text"].tolist() == ["51.4"] and dc["value"].astype(float).tolist() == [51.4]
    nf = df[(df["method"] == "Noroozi and Favaro [42]")
            & (df["column"] == "classification/fc6-8")]
    assert nf["text"].tolist() == ["—"] and nf["value"].tolist() == [""]
    assert set(df["section"]) == {"paper", "ours"}  # embedded, and no Random row: no Δ
    t1 = pd.read_csv(rendered / "table1.csv", keep_default_na=False)
    assert set(t1["section"]) == {"paper", "ours", "delta"}
    supp = pd.read_csv(rendered / "supp_fc.csv", keep_default_na=False)
    assert "Pre-trained dataset=YFCC100M" in set(supp["attrs"])


def test_combined_outputs(rendered):
    md = (rendered / "tables.md").read_text(encoding="utf-8")
    assert md.count("### ") == 4
    assert (rendered / "tables.tex").read_text(encoding="utf-8").count(r"\begin{table}") == 4
