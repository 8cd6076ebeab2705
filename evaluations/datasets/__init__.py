"""Readers for the official dataset formats (DATA_FORMATS.md) and the embedded demo suite.

:data:`READERS` maps a classification role to ``reader(root, split) -> Split``
(:class:`~.common.Split`); :func:`check_root` validates any role's root before jobs are
submitted (the layout, and for VOC that the per-class files agree with the annotations);
``embedded.build_embedded`` writes the embedded real-image suite in the same formats.
"""
from pathlib import Path
from types import MappingProxyType

from .imagenet import imagenet_split
from .places205 import places205_split

READERS = MappingProxyType({"imagenet": imagenet_split, "places": places205_split})
VOC_YEARS = MappingProxyType({"voc07": 2007, "voc12": 2012})
ROLES = (*READERS, *VOC_YEARS)


def check_root(role: str, root: Path) -> None:
    """One UserError now, naming the path and the fix, rather than in a job hours later."""
    if role in READERS:
        READERS[role](root, "val")
        return
    from .voc import VocClassification, check_labels_match_annotations, image_ids, voc_root

    year_root = voc_root(root, VOC_YEARS[role])
    if role == "voc07":
        for split in ("trainval", "test"):
            check_labels_match_annotations(year_root, split)
            VocClassification(year_root, split, 2007)  # every listed image is there
    else:
        image_ids(year_root, "train", "Segmentation")
        image_ids(year_root, "val", "Segmentation")
