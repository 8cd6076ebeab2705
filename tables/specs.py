"""One spec per paper table: its columns, metric, the protocols that feed it, and the
default selection rule for our rows.

Table and column ids match what the evaluations write into records
(:mod:`evaluations.records`).
"""
from __future__ import annotations

from dataclasses import dataclass

# Protocols the suite writes: the paper's, and the documented re-implementation.
KNOWN_PROTOCOLS = ("dc2018", "dc2018-reimpl")


@dataclass(frozen=True)
class ColumnSpec:
    """One column: the record ``column`` id, its headers, metric and feeding protocol."""

    key: str
    group: str
    sub: str
    metric: str
    protocol: str
    variant: str | None = None  # the test variant its task writes, where fixed by the task

    @property
    def label(self) -> str:
        """One-line header (Markdown, CSV)."""
        return f"{self.group} {self.sub}".strip()


@dataclass(frozen=True)
class TableSpec:
    """A paper table.

    ``selection`` / ``variant`` are the defaults for our rows (``None``: any value);
    ``reference`` is the paper row (name, attrs) that the Δ rows subtract.
    """

    id: str
    title: str
    columns: tuple[ColumnSpec, ...]
    protocols: tuple[str, ...]
    protocol_note: str
    selection: str | None = None
    variant: str | None = None
    row_attrs: tuple[str, ...] = ()
    reference: tuple[str, tuple[tuple[str, str], ...]] = ("DeepCluster", ())

    @property
    def mixed_protocols(self) -> bool:
        """Columns fed by different protocols (the VOC table): a checkpoint's records made
        as each column specifies share one row, whose label then names no protocol."""
        return len({c.protocol for c in self.columns}) > 1

    @property
    def column_keys(self) -> tuple[str, ...]:
        return tuple(c.key for c in self.columns)

    def column(self, key: str) -> ColumnSpec:
        for c in self.columns:
            if c.key == key:
                return c
        raise KeyError(key)


def _t1_columns() -> tuple[ColumnSpec, ...]:
    groups = (("imagenet", "ImageNet"), ("places", "Places"))
    return tuple(ColumnSpec(f"{d}/conv{i}", g, f"conv{i}", "top1", "dc2018")
                 for d, g in groups for i in range(1, 6))


def _voc_columns() -> tuple[ColumnSpec, ...]:
    tasks = (("classification", "Classification", "mAP", "dc2018", "10crops"),
             ("detection", "Detection", "mAP", "dc2018-reimpl", "single-scale"),
             ("segmentation", "Segmentation", "mIoU", "dc2018-reimpl", "single-scale"))
    return tuple(ColumnSpec(f"{t}/{m}", g, m, metric, proto, variant)
                 for t, g, metric, proto, variant in tasks for m in ("fc6-8", "all"))


def _retrieval_columns() -> tuple[ColumnSpec, ...]:
    paper = (ColumnSpec("oxford5k", "Oxford5K", "", "mAP", "dc2018"),
             ColumnSpec("paris6k", "Paris6K", "", "mAP", "dc2018"))
    revisited = tuple(ColumnSpec(f"{d}/{s}", g, s, "mAP", "dc2018-reimpl")
                      for d, g in (("roxford5k", "ROxford"), ("rparis6k", "RParis"))
                      for s in ("E", "M", "H"))
    return paper + revisited


SPECS: dict[str, TableSpec] = {
    "table1": TableSpec(
        id="table1",
        title="Table 1: linear classification on frozen AlexNet conv1-conv5, "
              "ImageNet and Places (top-1 %)",
        columns=_t1_columns(),
        protocols=KNOWN_PROTOCOLS,
        protocol_note="dc2018 (frozen conv layers, AvgPool to ~9k dims, one linear layer, "
                      "90 epochs)",
        selection="best_epoch",
        variant="10crop",
    ),
    "supp_fc": TableSpec(
        id="supp_fc",
        title="Supplementary: ImageNet classification with frozen conv layers and "
              "retrained fc layers (Acc@1 %)",
        columns=(ColumnSpec("imagenet/acc1", "", "Acc@1", "top1", "dc2018-reimpl"),),
        protocols=KNOWN_PROTOCOLS,
        protocol_note="dc2018-reimpl (conv layers frozen, fc6-8 re-initialised and retrained "
                      "on ImageNet; the paper's schedule being unpublished)",
        selection="best_epoch",
        variant="10crop",
        row_attrs=("Pre-trained dataset",),
        reference=("DeepCluster", (("Pre-trained dataset", "ImageNet"),)),
    ),
    "voc": TableSpec(
        id="voc",
        title="Pascal VOC: classification (VOC07 mAP), detection (VOC07 mAP), "
              "segmentation (VOC12 mIoU); fc6-8 trained or all layers",
        columns=_voc_columns(),
        protocols=KNOWN_PROTOCOLS,
        protocol_note="classification dc2018; detection (Fast R-CNN style) and "
                      "segmentation (FCN-32s) dc2018-reimpl, the paper's settings being "
                      "unpublished",
    ),
    "retrieval": TableSpec(
        id="retrieval",
        title="Instance retrieval: Oxford5K and Paris6K (mAP %), VGG16 R-MAC; Revisited "
              "Oxford / Paris (mAP % Easy / Medium / Hard, not in the paper)",
        columns=_retrieval_columns(),
        protocols=KNOWN_PROTOCOLS,
        protocol_note="Oxford5K / Paris6K dc2018 (conv5_3 R-MAC, L=3, PCA-whitening learned "
                      "on the other dataset, Oxford compute_ap); ROxford / RParis "
                      "dc2018-reimpl (the same descriptor, revisitop compute_map)",
    ),
}
