"""Readers for the official dataset formats (DATA_FORMATS.md) and the embedded demo suite.

:data:`READERS` maps a classification role to ``reader(root, split) -> Split``
(:class:`~.common.Split`); :func:`check_root` validates any role's root before jobs are
submitted (the layout, for VOC that the per-class files agree with the annotations, for
Oxford / Paris the ground truth, query images and boxes);
``embedded.build_embedded`` writes the embedded real-image suite in the same formats.
"""
from pathlib import Path
from types import MappingProxyType

from .imagenet import imagenet_split
from .oxford import RETRIEVAL_ROLES
from .places205 import places205_split

READERS = MappingProxyType({"imagenet": imagenet_split, "places": places205_split})
VOC_YEARS = MappingProxyType({"voc07": 2007, "voc12": 2012})
# sbd: VOC2012 segmentation's train_aug (SBD's .mat files)
ROLES = (*READERS, *VOC_YEARS, "sbd", *RETRIEVAL_ROLES)


def check_root(role: str, root: Path) -> None:
    """One UserError now, naming the path and the fix, rather than in a job hours later."""
    if role in READERS:
        READERS[role](root, "val")
        return
    if role in RETRIEVAL_ROLES:
        from .oxford import read_retrieval

        read_retrieval(root, role)  # ground truth, query images and boxes
        return
    if role == "sbd":
        from .sbd import sbd_ids

        sbd_ids(root, "train")
        sbd_ids(root, "val")
        return
    from .voc import (VocClassification, VocDetection, VocSegmentation,
                      check_labels_match_annotations, voc_root)

    year_root = voc_root(root, VOC_YEARS[role])
    if role == "voc07":
        for split in ("trainval", "test"):
            check_labels_match_annotations(year_root, split)
            VocClassification(year_root, split, 2007)  # every listed image is there
            VocDetection(year_root, split, 2007)  # objects and boxes a detector can use
    else:
        for split in ("train", "val"):
            VocSegmentation(year_root, split, 2012).check_sizes()
