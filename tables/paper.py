"""The paper's published numbers, transcribed from the seed presentation, as data.

Source: ``seeds/000_90ae412de3578888.txt`` (the paper's tables as printed in the seed),
plus the authors' README erratum (VOC07 classification fc6-8 with BN frozen: 70.4).

Method names are kept exactly as the seed prints them (``<i>et al.</i>`` written as
``et al.``), with the bracketed citation numbers and the ``[*]`` row markers. A cell the
seed prints as "—" (or "-") is ``None``; a cell marked ``[†]`` keeps the marker in
:attr:`PaperCell.marker`. Note that the supplementary table numbers its citations
differently from the main tables: that is how the seed prints them.
"""
from __future__ import annotations

from dataclasses import dataclass

SEED = "seeds/000_90ae412de3578888.txt"
ERRATUM_SOURCE = "authors' README erratum (facebookresearch/deepcluster)"

SOURCES = {
    "table1": f"{SEED}: 'Results: image classification (paper)'",
    "supp_fc": f"{SEED}: 'Results: image classification (supplementary)'",
    "voc": f"{SEED}: 'Results: Pascal VOC (detection, classif., segment.)'",
    "retrieval": f"{SEED}: 'Results: instance-level image retrieval'",
}

DAGGER = "[†]"
PRETRAINED = "Pre-trained dataset"
ERRATUM_ROW = "DeepCluster (erratum: BN frozen)"


@dataclass(frozen=True)
class PaperCell:
    """One published number: its table, row (method as printed), column and source.

    ``value`` is ``None`` for a cell the paper prints as "—". ``attrs`` holds text columns
    of the row (the supplementary table's "Pre-trained dataset"); a row is identified by
    ``(row, attrs)``.
    """

    table: str
    row: str
    column: str
    value: float | None
    source: str
    note: str = ""
    marker: str = ""
    attrs: tuple[tuple[str, str], ...] = ()

    @property
    def row_key(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        return (self.row, self.attrs)


_T1_COLUMNS = tuple(f"{d}/conv{i}" for d in ("imagenet", "places") for i in range(1, 6))
# method, ImageNet conv1..conv5, Places conv1..conv5 (None: "-" in the seed)
_TABLE1: tuple[tuple[str, tuple[float | None, ...]], ...] = (
    ("Places labels", (None, None, None, None, None, 22.1, 35.1, 40.2, 43.3, 44.6)),
    ("ImageNet labels", (19.3, 36.3, 44.2, 48.3, 50.5, 22.7, 34.8, 38.4, 39.4, 38.7)),
    ("Random", (11.6, 17.1, 16.9, 16.3, 14.1, 15.7, 20.3, 19.8, 19.1, 17.5)),
    ("Pathak et al. [46]", (14.1, 20.7, 21.0, 19.8, 15.5, 18.2, 23.2, 23.4, 21.9, 18.4)),
    ("Doersch et al. [13]", (16.2, 23.3, 30.2, 31.7, 29.6, 19.7, 26.7, 31.9, 32.7, 30.9)),
    ("Zhang et al. [71]", (12.5, 24.5, 30.4, 31.5, 30.3, 16.0, 25.7, 29.6, 30.3, 29.7)),
    ("Donahue et al. [15]", (17.7, 24.5, 31.0, 29.9, 28.0, 21.4, 26.2, 27.1, 26.1, 24.0)),
    ("Noroozi and Favaro [42]", (18.2, 28.8, 34.0, 33.9, 27.1, 23.0, 32.1, 35.5, 34.8, 31.3)),
    ("Noroozi et al. [43]", (18.0, 30.6, 34.3, 32.5, 25.7, 23.3, 33.9, 36.3, 34.7, 29.6)),
    ("Zhang et al. [72]", (17.7, 29.3, 35.4, 35.2, 32.8, 21.3, 30.7, 34.0, 34.1, 32.5)),
    ("DeepCluster", (13.4, 32.3, 41.0, 39.6, 38.2, 19.6, 33.2, 39.2, 39.8, 34.7)),
)

# method, pre-trained dataset (as printed), Acc@1
_SUPP: tuple[tuple[str, str, float], ...] = (
    ("Supervised", "ImageNet", 59.7),
    ("Supervised Sobel", "ImageNet", 57.8),
    ("Random", "-", 12.0),
    ("Wang et al. [29]", "YouTube100K [74]", 29.8),
    ("Doersch et al. [25]", "ImageNet", 30.4),
    ("Donahue et al. [20]", "ImageNet", 32.2),
    ("Noroozi and Favaro [26]", "ImageNet", 34.6),
    ("Zhang et al. [28]", "ImageNet", 35.2),
    ("Bojanowski and Joulin [19]", "ImageNet", 36.0),
    ("DeepCluster", "ImageNet", 44.0),
    ("DeepCluster", "YFCC100M", 39.6),
)

_VOC_COLUMNS = tuple(f"{t}/{m}" for t in ("classification", "detection", "segmentation")
                     for m in ("fc6-8", "all"))
_D = "dagger"  # marks the next value as "[†]" in the rows below
_VocCell = float | None | tuple[float, str]
# method, classification fc6-8/all, detection fc6-8/all, segmentation fc6-8/all
_VOC: tuple[tuple[str, tuple[_VocCell, ...]], ...] = (
    ("ImageNet labels", (78.9, 79.9, None, 56.8, None, 48.0)),
    ("Random-rgb", (33.2, 57.0, 22.2, 44.5, 15.2, 30.1)),
    ("Random-sobel", (29.0, 61.9, 18.9, 47.9, 13.0, 32.0)),
    ("Pathak et al. [46]", (34.6, 56.5, None, 44.5, None, 29.7)),
    ("Donahue et al. [15] [*]", (52.3, 60.1, None, 46.9, None, 35.2)),
    ("Pathak et al. [45]", (None, 61.0, None, 52.2, None, None)),
    ("Owens et al. [44] [*]", (52.3, 61.3, None, None, None, None)),
    ("Wang and Gupta [63] [*]", (55.6, 63.1, (32.8, _D), 47.2, (26.0, _D), (35.4, _D))),
    ("Doersch et al. [13] [*]", (55.1, 65.3, None, 51.1, None, None)),
    ("Bojanowski and Joulin [5] [*]", (56.7, 65.3, (33.7, _D), 49.4, (26.7, _D), (37.1, _D))),
    ("Zhang et al. [71] [*]", (61.5, 65.9, (43.4, _D), 46.9, (35.8, _D), 35.6)),
    ("Zhang et al. [72] [*]", (63.0, 67.1, None, 46.7, None, 36.0)),
    ("Noroozi and Favaro [42]", (None, 67.6, None, 53.2, None, 37.6)),
    ("Noroozi et al. [43]", (None, 67.7, None, 51.4, None, 36.6)),
    ("DeepCluster", (72.0, 73.7, 51.4, 55.4, 43.2, 45.1)),
)

# method, Oxford5K, Paris6K
_RETRIEVAL: tuple[tuple[str, float, float], ...] = (
    ("ImageNet labels", 72.4, 81.5),
    ("Random", 6.9, 22.0),
    ("Doersch et al. [13]", 35.4, 53.1),
    ("Wang et al. [64]", 42.3, 58.0),
    ("DeepCluster", 61.0, 72.0),
)

ERRATUM_NOTE = ("VOC07 classification fc6-8 with the BN affine parameters frozen; the "
                "published 72.0 had the BN scales trainable by mistake")

# Rows trained with labels: left out when the best unsupervised number is put in bold.
SUPERVISED_ROWS = frozenset({"Places labels", "ImageNet labels", "Supervised",
                             "Supervised Sobel"})


def _build() -> tuple[PaperCell, ...]:
    cells: list[PaperCell] = []
    for row, values in _TABLE1:
        for col, v in zip(_T1_COLUMNS, values, strict=True):
            cells.append(PaperCell("table1", row, col, v, SOURCES["table1"]))
    for row, dataset, v in _SUPP:
        cells.append(PaperCell("supp_fc", row, "imagenet/acc1", v, SOURCES["supp_fc"],
                               attrs=((PRETRAINED, dataset),)))
    for row, values in _VOC:
        for col, v in zip(_VOC_COLUMNS, values, strict=True):
            if isinstance(v, tuple):
                cells.append(PaperCell("voc", row, col, v[0], SOURCES["voc"], marker=DAGGER))
            else:
                cells.append(PaperCell("voc", row, col, v, SOURCES["voc"]))
        if row == "DeepCluster":
            cells.append(PaperCell("voc", ERRATUM_ROW, "classification/fc6-8", 70.4,
                                   ERRATUM_SOURCE, note=ERRATUM_NOTE))
    for row, ox, pa in _RETRIEVAL:
        cells.append(PaperCell("retrieval", row, "oxford5k", ox, SOURCES["retrieval"]))
        cells.append(PaperCell("retrieval", row, "paris6k", pa, SOURCES["retrieval"]))
    return tuple(cells)


PAPER_CELLS: tuple[PaperCell, ...] = _build()


def cells_for(table: str) -> list[PaperCell]:
    """The published cells of one table, in the order the paper prints them."""
    return [c for c in PAPER_CELLS if c.table == table]


def lookup(table: str, row: str, column: str,
           attrs: tuple[tuple[str, str], ...] = ()) -> PaperCell:
    """The published cell at (table, row, column); ``KeyError`` if the paper has none."""
    for c in PAPER_CELLS:
        if c.table == table and c.row == row and c.column == column and c.attrs == attrs:
            return c
    raise KeyError((table, row, column, attrs))
