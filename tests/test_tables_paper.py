"""The transcribed paper numbers against an independent re-parse of the seed's table text.

``tests/fixtures/tables/paper_tables.txt`` is a verbatim copy of the seed's tables
(tab-separated); the parser below knows nothing of :mod:`tables.paper`.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tables import paper

FIXTURE = Path(__file__).parent / "fixtures" / "tables" / "paper_tables.txt"
DASHES = {"-", "—"}


def _name(raw: str) -> str:
    return re.sub(r"<i>(.*?)</i>", r"\1", raw).strip()


def _value(raw: str) -> tuple[float | None, str]:
    raw = raw.strip()
    if raw in DASHES:
        return None, ""
    m = re.fullmatch(r"(\d+\.\d)(?:\s+(\[\S+\]))?", raw)
    assert m, f"unparsable cell {raw!r}"
    return float(m.group(1)), m.group(2) or ""


def parse_seed_tables(text: str) -> dict[tuple, tuple[float | None, str]]:
    """{(table, row, column, attrs): (value, marker)} from the seed's tab-separated tables."""
    blocks: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith("== "):
            current = line[3:].strip()
            blocks[current] = []
        else:
            blocks[current].append(line)
    cells: dict[tuple, tuple[float | None, str]] = {}
    for table, lines in blocks.items():
        if table == "supp_fc":  # header "Method | Pre-trained dataset Acc@1" is merged
            for line in lines[1:]:
                name, dataset, acc = line.split("\t")
                attrs = (("Pre-trained dataset", dataset),)
                cells[(table, _name(name), "imagenet/acc1", attrs)] = _value(acc)
            continue
        if table in ("table1", "voc"):  # two header lines: groups (forward-filled), subs
            groups, subs = lines[0].split("\t")[1:], lines[1].split("\t")[1:]
            filled, last = [], ""
            for g in groups:
                last = g or last
                filled.append(last)
            columns = [f"{g.lower()}/{s.lower()}" for g, s in zip(filled, subs)]
            body = lines[2:]
        else:
            columns = [h.lower() for h in lines[0].split("\t")[1:]]
            body = lines[1:]
        for line in body:
            name, *values = line.split("\t")
            assert len(values) == len(columns), line
            for col, raw in zip(columns, values):
                cells[(table, _name(name), col, ())] = _value(raw)
    return cells


@pytest.fixture(scope="module")
def seed_cells() -> dict[tuple, tuple[float | None, str]]:
    return parse_seed_tables(FIXTURE.read_text(encoding="utf-8"))


def _transcribed() -> dict[tuple, paper.PaperCell]:
    return {(c.table, c.row, c.column, c.attrs): c for c in paper.PAPER_CELLS
            if c.source != paper.ERRATUM_SOURCE}


def test_seed_parse_sizes(seed_cells):
    """The re-parse itself sees every cell: 11x10 + 11 + 15x6 + 5x2."""
    per_table = {}
    for key in seed_cells:
        per_table[key[0]] = per_table.get(key[0], 0) + 1
    assert per_table == {"table1": 110, "supp_fc": 11, "voc": 90, "retrieval": 10}


def test_every_cell_matches_the_seed(seed_cells):
    ours = _transcribed()
    assert set(ours) == set(seed_cells), (set(ours) ^ set(seed_cells))
    wrong = {k: ((c.value, c.marker), seed_cells[k]) for k, c in ours.items()
             if (c.value, c.marker) != seed_cells[k]}
    assert not wrong


def test_cells_are_unique_and_sourced():
    keys = [(c.table, c.row, c.column, c.attrs) for c in paper.PAPER_CELLS]
    assert len(keys) == len(set(keys))
    for c in paper.PAPER_CELLS:
        assert c.source, c
        assert c.source == paper.ERRATUM_SOURCE or paper.SEED in c.source


@pytest.mark.parametrize("table,row,column,attrs,value", [
    ("table1", "DeepCluster", "imagenet/conv3", (), 41.0),
    ("table1", "Zhang et al. [72]", "places/conv4", (), 34.1),
    ("voc", "DeepCluster", "detection/fc6-8", (), 51.4),
    ("voc", "Noroozi and Favaro [42]", "classification/fc6-8", (), None),
    ("retrieval", "DeepCluster", "paris6k", (), 72.0),
    ("supp_fc", "DeepCluster", "imagenet/acc1", (("Pre-trained dataset", "YFCC100M"),), 39.6),
])
def test_spot_values(table, row, column, attrs, value):
    assert paper.lookup(table, row, column, attrs).value == value


def test_erratum_is_a_separate_published_row():
    c = paper.lookup("voc", paper.ERRATUM_ROW, "classification/fc6-8")
    assert c.value == 70.4
    assert "README erratum" in c.source
    assert paper.lookup("voc", "DeepCluster", "classification/fc6-8").value == 72.0
    assert [x for x in paper.cells_for("voc") if x.row == paper.ERRATUM_ROW] == [c]
