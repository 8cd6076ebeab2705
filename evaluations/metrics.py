"""Metrics: top-k of the linear probes; Pascal VOC classification AP (three definitions),
detection AP and segmentation mIoU (DATA_FORMATS.md B.3, PROTOCOLS.md §3-5); instance
retrieval AP: Oxford's compute_ap and the Revisited compute_map (B.4-B.5, §6)."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import numpy as np
import torch

log = logging.getLogger(__name__)


def topk_correct(scores: torch.Tensor, target: torch.Tensor, k: int = 1) -> int:
    """How many rows have ``target`` among their ``k`` highest scores (ties: torch's order)."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return int((top == target[:, None]).any(dim=1).sum())


def tencrop_probs(logits: torch.Tensor, n_crops: int) -> torch.Tensor:
    """Softmax of each crop's logits, averaged over the crops: [B*n, C] -> [B, C]."""
    b = logits.shape[0] // n_crops
    return torch.softmax(logits.float(), dim=1).view(b, n_crops, -1).mean(dim=1)


# --------------------------------------------------------------------------- Pascal VOC

_VOC_EPS = np.finfo(np.float64).eps


def _as_numpy(x) -> np.ndarray:
    """numpy view of an array-like or a (possibly CUDA) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_cls_inputs(gt, scores) -> tuple[np.ndarray, np.ndarray]:
    gt, scores = _as_numpy(gt).ravel(), _as_numpy(scores).astype(np.float64).ravel()
    if gt.shape != scores.shape:
        raise ValueError(f"gt and scores differ in size: {gt.shape} vs {scores.shape}")
    if not np.isin(gt, (-1, 0, 1)).all():
        raise ValueError("gt must hold only 1 (positive), -1 (negative), 0 (ignored/difficult)")
    return gt, scores


def ap_sklearn(gt, scores) -> float:
    """The authors' VOC07 classification AP (deepcluster ``eval_voc_classif.py``,
    philkr/voc-classification): scikit-learn's non-interpolated ``average_precision_score``
    (``sum (R_n - R_{n-1}) P_n``) on the entries with ``gt != 0``, scores shifted by
    ``-1e-5 * y`` with ``y`` = 1 for positives, 0 for negatives (their encoding), so a
    positive tied with a negative ranks below it.

    ``gt``: 1 positive, -1 negative, 0 ignored (difficult only). NaN if no positive is left.
    """
    from sklearn.metrics import average_precision_score

    gt, scores = _check_cls_inputs(gt, scores)
    keep = gt != 0
    y = (gt[keep] > 0).astype(np.float64)
    if not y.any():
        return float("nan")
    return float(average_precision_score(y, scores[keep] - 1e-5 * y))


def _voc_pr(gt: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision after each entry, by descending score (stable on ties):
    ``tp = gt > 0``, ``fp = gt < 0``, ``gt == 0`` counts as neither (``VOCevalcls.m``)."""
    order = np.argsort(-scores, kind="stable")
    g = gt[order]
    tp, fp = np.cumsum(g > 0), np.cumsum(g < 0)
    rec = tp / max(int((gt > 0).sum()), 1)
    prec = tp / np.maximum(tp + fp, _VOC_EPS)
    return rec, prec


def voc_ap_from_pr(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool) -> float:
    """AP from a recall/precision curve, as py-faster-rcnn ``voc_eval.py: voc_ap`` and the
    VOC devkit: the 11-point AP (``use_07_metric``; thresholds ``k/10``, max of an empty set
    = 0) or the area under the monotone precision envelope (VOC2010+)."""
    rec, prec = np.asarray(rec, np.float64), np.asarray(prec, np.float64)
    if use_07_metric:
        points = [prec[rec >= k / 10].max(initial=0.0) for k in range(11)]
        return float(np.sum(points) / 11.0)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # monotone envelope, from the right
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def ap_voc07(gt, scores) -> float:
    """VOC2007 11-point interpolated AP (devkit ``VOCevalcls.m``, year 2007):
    ``mean_{t=0,0.1..1} max(prec[rec >= t])``. ``gt``: 1 / -1 / 0 (ignored).
    NaN if there is no positive."""
    gt, scores = _check_cls_inputs(gt, scores)
    if not (gt > 0).any():
        return float("nan")
    return voc_ap_from_pr(*_voc_pr(gt, scores), use_07_metric=True)


def ap_voc10(gt, scores) -> float:
    """VOC2010+ AP (devkit ``VOCevalcls.m``, py-faster-rcnn ``voc_ap``): area under the
    monotone envelope of the precision/recall curve. ``gt``: 1 / -1 / 0 (ignored).
    NaN if there is no positive."""
    gt, scores = _check_cls_inputs(gt, scores)
    if not (gt > 0).any():
        return float("nan")
    return voc_ap_from_pr(*_voc_pr(gt, scores), use_07_metric=False)


_AP_DEFINITIONS = {"sklearn": ap_sklearn, "voc07": ap_voc07, "voc10": ap_voc10}


def _nanmean_classes(aps: np.ndarray, what: str) -> float:
    """Mean over the classes whose AP/IoU is defined (not NaN); NaN if none is."""
    undefined = np.flatnonzero(np.isnan(aps))
    if undefined.size:
        log.warning(
            "%s: %d classes undefined (no ground truth), left out of the mean: %s", what,
            undefined.size, undefined.tolist())
    return float(np.nanmean(aps)) if undefined.size < aps.size else float("nan")


def classification_map(gt, scores, definition: str = "sklearn") -> tuple[float, np.ndarray]:
    """(mAP, per-class APs [C]) of multi-label scores; ``gt`` [N, C] in 1 / -1 / 0 (the VOC
    per-class file labels), ``scores`` [N, C]. ``definition``: ``sklearn`` (:func:`ap_sklearn`,
    what DeepCluster reports), ``voc07`` (:func:`ap_voc07`) or ``voc10`` (:func:`ap_voc10`).
    A class without positives has AP NaN and is left out of the mean (with a warning)."""
    if definition not in _AP_DEFINITIONS:
        raise ValueError(f"unknown AP definition {definition!r}; use one of "
                         f"{', '.join(_AP_DEFINITIONS)}")
    gt, scores = _as_numpy(gt), _as_numpy(scores)
    if gt.ndim != 2 or gt.shape != scores.shape:
        raise ValueError(f"gt and scores must both be [N, C]; got {gt.shape} and {scores.shape}")
    ap = _AP_DEFINITIONS[definition]
    aps = np.array([ap(gt[:, c], scores[:, c]) for c in range(gt.shape[1])], dtype=np.float64)
    return _nanmean_classes(aps, f"classification mAP ({definition})"), aps


def box_iou_voc(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box with each of ``boxes`` [M, 4] (``x1, y1, x2, y2`` inclusive integer
    pixel coordinates, 0- or 1-based alike): widths ``x2 - x1 + 1`` as in ``VOCevaldet.m`` and
    py-faster-rcnn ``voc_eval.py``."""
    box, boxes = np.asarray(box, np.float64), np.asarray(boxes, np.float64).reshape(-1, 4)
    iw = np.maximum(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]) + 1.0, 0)
    ih = np.maximum(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]) + 1.0, 0)
    inter = iw * ih
    union = ((box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
             + (boxes[:, 2] - boxes[:, 0] + 1.0) * (boxes[:, 3] - boxes[:, 1] + 1.0) - inter)
    return inter / union


def detection_ap(detections: Sequence, ground_truth: Sequence, iou_threshold: float = 0.5,
                 use_07_metric: bool = True) -> float:
    """AP of one class (devkit ``VOCevaldet.m``; py-faster-rcnn ``voc_eval.py``).

    ``detections[i]``: [K, 5] ``x1, y1, x2, y2, score`` of image ``i``; ``ground_truth[i]``:
    ``(boxes [M, 4], difficult [M])`` of image ``i`` (same box convention, inclusive pixels).
    Detections of all images by descending score (stable on ties); each takes the GT of its
    image with the largest IoU (:func:`box_iou_voc`, +1 widths). IoU ``>= iou_threshold`` (the
    MATLAB devkit; py-faster-rcnn uses ``>``): a difficult GT -> neither TP nor FP, an unmatched
    GT -> TP (marked), an already matched one -> FP (duplicate); otherwise FP. npos = number of
    non-difficult GT. AP = :func:`voc_ap_from_pr` (11-point if ``use_07_metric``, the VOC2007
    test setting). NaN when the class has no non-difficult GT (recall undefined).
    """
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} detection lists for {len(ground_truth)} images")
    gts = [(_as_numpy(b).astype(np.float64).reshape(-1, 4), _as_numpy(d).astype(bool).ravel())
           for b, d in ground_truth]
    npos = sum(int((~d).sum()) for _, d in gts)
    dets = [_as_numpy(d).astype(np.float64).reshape(-1, 5) for d in detections]
    image = np.concatenate([np.full(len(d), i) for i, d in enumerate(dets)]).astype(np.int64)
    allbox = np.concatenate(dets) if dets else np.zeros((0, 5))
    order = np.argsort(-allbox[:, 4], kind="stable")
    used = [np.zeros(len(b), dtype=bool) for b, _ in gts]
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    for k, j in enumerate(order):
        boxes, difficult = gts[image[j]]
        if len(boxes) == 0:
            fp[k] = 1
            continue
        ov = box_iou_voc(allbox[j, :4], boxes)
        m = int(np.argmax(ov))
        if ov[m] >= iou_threshold:
            if difficult[m]:
                continue
            if used[image[j]][m]:
                fp[k] = 1
            else:
                tp[k], used[image[j]][m] = 1, True
        else:
            fp[k] = 1
    if npos == 0:
        return float("nan")
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    return voc_ap_from_pr(tp / npos, tp / np.maximum(tp + fp, _VOC_EPS), use_07_metric)


def detection_map(detections: Sequence[Mapping], ground_truth: Sequence[Mapping],
                  num_classes: int = 20, iou_threshold: float = 0.5,
                  use_07_metric: bool = True) -> tuple[float, np.ndarray]:
    """(mAP, per-class APs [num_classes]) over all classes, by :func:`detection_ap`.

    Per image: ``detections[i]`` = ``{"boxes" [K, 4], "scores" [K], "labels" [K]}`` (a
    torchvision detector's output), ``ground_truth[i]`` = ``{"boxes" [M, 4], "labels" [M],
    "difficult" [M]}`` (``VocDetection`` targets; ``difficult`` optional, default False).
    Labels 0..num_classes-1. A class without non-difficult GT is NaN and left out of the mean.
    """
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} detection dicts for {len(ground_truth)} images")
    dets, gts = [], []
    for d, g in zip(detections, ground_truth):
        boxes = _as_numpy(d["boxes"]).astype(np.float64).reshape(-1, 4)
        scores = _as_numpy(d["scores"]).astype(np.float64).reshape(-1, 1)
        dets.append((np.hstack([boxes, scores]), _as_numpy(d["labels"]).ravel()))
        gl = _as_numpy(g["labels"]).ravel()
        diff = _as_numpy(g["difficult"]).astype(bool).ravel() if "difficult" in g else \
            np.zeros(len(gl), dtype=bool)
        gts.append((_as_numpy(g["boxes"]).astype(np.float64).reshape(-1, 4), gl, diff))
    aps = np.array([
        detection_ap([b[lab == c] for b, lab in dets],
                     [(gb[gl == c], gd[gl == c]) for gb, gl, gd in gts],
                     iou_threshold, use_07_metric)
        for c in range(num_classes)], dtype=np.float64)
    return _nanmean_classes(aps, "detection mAP"), aps


def confusion_matrix(gt, pred, num_classes: int = 21, ignore: int = 255) -> np.ndarray:
    """int64 [C, C] counts, rows = ground truth, columns = prediction, over pixels whose GT
    is not ``ignore`` (devkit ``VOCevalseg.m``). Accumulate over a dataset by summing the
    matrices of its images; ``gt``/``pred`` are equal-shape integer arrays (or tensors)."""
    gt, pred = _as_numpy(gt).ravel(), _as_numpy(pred).ravel()
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred differ in size: {gt.shape} vs {pred.shape}")
    keep = gt != ignore
    g, p = gt[keep].astype(np.int64), pred[keep].astype(np.int64)
    for name, a in (("gt", g), ("pred", p)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} holds values outside 0..{num_classes - 1}"
                             + (f" (other than {ignore})" if name == "gt" else ""))
    return np.bincount(g * num_classes + p, minlength=num_classes ** 2).reshape(
        num_classes, num_classes).astype(np.int64)


def miou(conf) -> tuple[float, np.ndarray]:
    """(mIoU, per-class IoU [C]) of a dataset-level confusion matrix (``VOCevalseg.m``):
    ``IoU_c = TP / (TP + FP + FN)``, mean over all classes (background included).

    A class absent from both GT and prediction (0/0) has IoU NaN and is left out of the mean
    (the devkit yields NaN there); a class predicted but never in the GT has IoU 0 and counts.
    """
    conf = _as_numpy(conf).astype(np.float64)
    tp = np.diag(conf)
    denom = conf.sum(axis=0) + conf.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / denom, np.nan)
    return _nanmean_classes(iou, "segmentation mIoU"), iou


# --------------------------------------------------------------------------- instance retrieval


def oxford_ap(ranked: Sequence[str], positives: set[str], junk: set[str]) -> float:
    """Oxford's ``compute_ap`` over a ranked list of names (DATA_FORMATS.md B.4), as written:
    junk is skipped (it takes no rank), trapezoid between successive (recall, precision)
    points; ``|positives|`` counts every name, retrieved or not. Float64 (the C++ is float32).
    The reference the fast :func:`ap_from_ranks` route is tested against."""
    if not positives:
        return float("nan")
    old_recall, old_precision, ap, hits, j = 0.0, 1.0, 0.0, 0, 0
    for name in ranked:
        if name in junk:
            continue
        if name in positives:
            hits += 1
        recall, precision = hits / len(positives), hits / (j + 1)
        ap += (recall - old_recall) * (old_precision + precision) / 2
        old_recall, old_precision = recall, precision
        j += 1
    return ap


def positive_ranks(order: np.ndarray, positives: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based positions in the ranking ``order`` (database indices, best first) of the
    ``positives``, once the ``junk`` entries are taken out of it; ascending."""
    order = np.asarray(order)
    is_pos = np.isin(order, np.asarray(positives, dtype=np.int64))
    is_junk = np.isin(order, np.asarray(junk, dtype=np.int64)) & ~is_pos
    pos = np.flatnonzero(is_pos)
    return pos - np.cumsum(is_junk)[pos]  # junk seen before each positive (never itself)


def ap_from_ranks(ranks: np.ndarray, n_positives: int) -> float:
    """revisitop's ``compute_ap``: trapezoid AP from the junk-free 0-based ``ranks`` of the
    retrieved positives, out of ``n_positives`` (which may count unretrievable ones)."""
    if n_positives <= 0:
        return float("nan")
    r = np.sort(np.asarray(ranks, dtype=np.float64))
    j = np.arange(len(r), dtype=np.float64)
    p0 = np.where(r == 0, 1.0, j / np.maximum(r, 1))
    p1 = (j + 1) / (r + 1)
    return float(((p0 + p1) / 2).sum() / n_positives)


REVISITED_SETUPS = MappingProxyType({  # protocol -> (positive groups, junk groups)
    "E": (("easy",), ("junk", "hard")),
    "M": (("easy", "hard"), ("junk",)),
    "H": (("hard",), ("junk", "easy"))})


def revisited_map(order: np.ndarray, groups: Sequence[Mapping[str, Sequence[int]]],
                  setup: str, kappas: Sequence[int] = (1, 5, 10)) -> dict:
    """revisitop's ``compute_map`` for one setup (E / M / H) of the Revisited protocol.

    ``order``: [n_queries, n_db] database indices, best first (one row per query);
    ``groups[i]``: query i's ``easy`` / ``hard`` / ``junk`` index lists. A query with no
    positive under ``setup`` is left out of the means (its AP is NaN). mP@k keeps revisitop's
    quirk: when every positive is found before rank k the denominator is the last one's rank.
    Returns ``{"map", "aps", "mpk": {k: value}, "n_empty"}`` (fractions, not percent).
    """
    pos_groups, junk_groups = REVISITED_SETUPS[setup]
    aps, prs = [], []
    for row, g in zip(np.asarray(order), groups):
        ok = np.unique(np.concatenate([np.asarray(g[k], dtype=np.int64) for k in pos_groups]))
        if ok.size == 0:
            aps.append(float("nan"))
            continue
        junk = np.concatenate([np.asarray(g[k], dtype=np.int64) for k in junk_groups])
        ranks = positive_ranks(row, ok, junk)
        aps.append(ap_from_ranks(ranks, ok.size))
        one_based = ranks + 1
        prs.append([0.0 if one_based.size == 0 else
                    float((one_based <= min(one_based.max(), k)).sum() / min(one_based.max(), k))
                    for k in kappas])
    aps_arr = np.asarray(aps, dtype=np.float64)
    valid = ~np.isnan(aps_arr)
    mean_pr = np.mean(prs, axis=0) if prs else np.full(len(kappas), np.nan)
    return {"map": float(aps_arr[valid].mean()) if valid.any() else float("nan"),
            "aps": aps_arr, "mpk": {int(k): float(v) for k, v in zip(kappas, mean_pr)},
            "n_empty": int((~valid).sum())}
