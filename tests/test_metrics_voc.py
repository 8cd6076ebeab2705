"""VOC metrics against the worked examples of DATA_FORMATS.md B.3, scikit-learn, and hand-computed
detection / segmentation cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from evaluations.metrics import (ap_sklearn, ap_voc07, ap_voc10, box_iou_voc, classification_map,
                                 confusion_matrix, detection_ap, detection_map, miou)

# (gt, scores, VOC07 11-point, VOC2010 area, sklearn) -- DATA_FORMATS.md B.3 worked examples
WORKED = [
    ([1, -1, 1, 0, -1, 1, -1], [.9, .8, .7, .65, .6, .5, .4], 0.7636363636, 0.7555555556,
     0.7555555556),
    ([1, -1, -1, 1, 1], [.9, .8, .7, .6, .5], 0.7454545455, 0.7333333333, 0.7),
]


@pytest.mark.parametrize("gt, scores, voc07, voc10, skl", WORKED)
def test_worked_examples(gt, scores, voc07, voc10, skl):
    assert ap_voc07(gt, scores) == pytest.approx(voc07, abs=1e-9)
    assert ap_voc10(gt, scores) == pytest.approx(voc10, abs=1e-9)
    assert ap_sklearn(gt, scores) == pytest.approx(skl, abs=1e-9)


def test_classification_map_definitions_on_worked_examples():
    # both examples as two classes of one [N, C] matrix (padded with ignored entries)
    n = 7
    gt = np.zeros((n, 2), dtype=np.int8)
    scores = np.zeros((n, 2))
    for c, (g, s, *_) in enumerate(WORKED):
        gt[:len(g), c], scores[:len(s), c] = g, s
    for k, definition in ((2, "voc07"), (3, "voc10"), (4, "sklearn")):
        m, aps = classification_map(gt, scores, definition)
        expected = [w[k] for w in WORKED]
        assert aps == pytest.approx(expected, abs=1e-9)
        assert m == pytest.approx(np.mean(expected), abs=1e-9)
    with pytest.raises(ValueError, match="unknown AP definition"):
        classification_map(gt, scores, "voc12")


def test_ignored_entries_change_nothing():
    gt, scores = np.array(WORKED[0][0]), np.array(WORKED[0][1])
    keep = gt != 0
    for ap in (ap_sklearn, ap_voc07, ap_voc10):
        assert ap(gt, scores) == pytest.approx(ap(gt[keep], scores[keep]), abs=1e-12)


def test_ap_sklearn_matches_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(5, 200))
        gt = rng.choice([-1, 0, 1], size=n, p=[.6, .1, .3])
        gt[0] = 1
        # informative ranks / n: gaps >= 1/n >> 1e-5, so the tie-break is moot
        scores = np.argsort(np.argsort(rng.normal(size=n) + gt)) / n
        keep = gt != 0
        assert ap_sklearn(gt, scores) == pytest.approx(
            average_precision_score(gt[keep] > 0, scores[keep]), abs=1e-12)
        # the envelope only adds precision; the 11-point AP stays in [0, 1]
        assert ap_voc10(gt, scores) >= ap_sklearn(gt, scores) - 1e-12
        assert 0.0 <= ap_voc07(gt, scores) <= 1.0


def test_ap_sklearn_tie_break_ranks_positive_below_tied_negative():
    # positive tied with a negative: -1e-5*y puts the positive second -> AP 0.5
    assert ap_sklearn([1, -1], [0.5, 0.5]) == pytest.approx(0.5)
    assert ap_sklearn([1, -1], [0.6, 0.5]) == pytest.approx(1.0)


def test_no_positive_is_nan_and_left_out_of_the_map():
    assert math.isnan(ap_sklearn([-1, 0, -1], [.3, .2, .1]))
    assert math.isnan(ap_voc07([-1, -1], [.3, .2]))
    assert math.isnan(ap_voc10([0, -1], [.3, .2]))
    gt = np.array([[1, -1], [-1, -1]])
    m, aps = classification_map(gt, np.array([[.9, .1], [.1, .2]]), "voc10")
    assert aps[0] == 1.0 and math.isnan(aps[1]) and m == 1.0


def test_bad_gt_values_raise():
    with pytest.raises(ValueError, match="gt must hold"):
        ap_voc10([2, -1], [.1, .2])


# --------------------------------------------------------------------------- detection

def _gt(boxes, difficult):
    return np.array(boxes, dtype=float).reshape(-1, 4), np.array(difficult, dtype=bool)


def test_detection_difficult_duplicate_and_miss():
    """Image 0: GT A (10x10) and a difficult GT B; image 1: GT C. npos = 2.

    By score: d1 on A -> TP; d2 on A again -> FP (duplicate); d3 on B -> ignored (difficult);
    d4 on nothing -> FP; d5 on C -> TP. rec .5 .5 .5 .5 1, prec 1 .5 .5 1/3 .5 ->
    VOC10 = .5*1 + .5*.5 = .75; VOC07 = (6*1 + 5*.5)/11.
    """
    gts = [_gt([[1, 1, 10, 10], [21, 21, 30, 30]], [False, True]), _gt([[1, 1, 10, 10]], [0])]
    dets = [np.array([[1, 1, 10, 10, .9], [1, 1, 10, 10, .8], [21, 21, 30, 30, .7]]),
            np.array([[50, 50, 60, 60, .6], [1, 1, 10, 10, .5]])]
    assert detection_ap(dets, gts, use_07_metric=False) == pytest.approx(0.75)
    assert detection_ap(dets, gts, use_07_metric=True) == pytest.approx(8.5 / 11)
    # the same with B not difficult: d3 becomes a TP and npos = 3
    gts_b = [_gt(gts[0][0], [False, False]), gts[1]]
    # tp 1 0 1 0 1; rec 1/3 1/3 2/3 2/3 1; prec 1 .5 2/3 .5 .6 -> envelope 1 2/3 2/3 .6 .6
    assert detection_ap(dets, gts_b, use_07_metric=False) == pytest.approx(
        (1 + 2 / 3 + 0.6) / 3)


def test_detection_iou_exactly_half_with_plus_one_widths():
    # GT 10x10 = 100 px; det 10x5 = 50 px inside it: IoU = 50/100 = 0.5 exactly (+1 widths);
    # without the +1 it would be 36/81 < 0.5.
    gt_box, det_box = [1, 1, 10, 10], [1, 1, 10, 5]
    assert box_iou_voc(det_box, np.array([gt_box]))[0] == 0.5
    gts = [_gt([gt_box], [False])]
    dets = [np.array([det_box + [0.9]])]
    assert detection_ap(dets, gts, iou_threshold=0.5) == 1.0  # >= like the MATLAB devkit
    assert detection_ap(dets, gts, iou_threshold=0.51) == 0.0


def test_detection_image_without_gt_is_fp_and_class_without_gt_is_nan():
    gts = [_gt([[1, 1, 10, 10]], [False]), _gt([], [])]
    dets = [np.array([[1, 1, 10, 10, .5]]), np.array([[1, 1, 10, 10, .9]])]
    # FP (score .9) before the TP: rec 0 1, prec 0 .5 -> VOC10 .5
    assert detection_ap(dets, gts, use_07_metric=False) == pytest.approx(0.5)
    assert math.isnan(detection_ap(dets, [_gt([], []), _gt([], [])]))
    assert math.isnan(detection_ap([np.zeros((0, 5))], [_gt([[1, 1, 5, 5]], [True])]))


def test_detection_map_over_classes():
    gts = [{"boxes": np.array([[1, 1, 10, 10], [20, 20, 40, 40]]), "labels": np.array([0, 2]),
            "difficult": np.array([False, False])}]
    dets = [{"boxes": np.array([[1, 1, 10, 10], [1, 1, 10, 10]]), "scores": np.array([.9, .8]),
             "labels": np.array([0, 1])}]
    m, aps = detection_map(dets, gts, num_classes=3)
    # class 0: perfect; class 1: no GT -> NaN, left out; class 2: GT never found -> 0
    assert aps[0] == 1.0 and math.isnan(aps[1]) and aps[2] == 0.0
    assert m == pytest.approx(0.5)
    torch = pytest.importorskip("torch")
    tgt = [{k: torch.as_tensor(v) for k, v in gts[0].items()}]
    out = [{k: torch.as_tensor(v) for k, v in dets[0].items()}]
    m2, aps2 = detection_map(out, tgt, num_classes=3)
    assert m2 == m and np.array_equal(np.isnan(aps2), np.isnan(aps))


# --------------------------------------------------------------------------- segmentation

def test_confusion_and_miou_hand_computed():
    gt = np.array([[0, 0, 1], [1, 255, 2]])
    pred = np.array([[0, 1, 1], [1, 0, 0]])
    conf = confusion_matrix(gt, pred, num_classes=4)
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 0] = 1, 1, 2, 1
    assert conf.dtype == np.int64 and np.array_equal(conf, expected)  # the 255 pixel ignored
    m, iou = miou(conf)
    # IoU0 = 1/(1+1+1), IoU1 = 2/(2+1+0), IoU2 = 0/(0+0+1), class 3 absent from both -> NaN
    assert iou[:3] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert math.isnan(iou[3])
    assert m == pytest.approx(1 / 3)  # mean over the 3 defined classes


def test_confusion_accumulates_over_images():
    rng = np.random.default_rng(1)
    a_gt, b_gt = rng.integers(0, 21, (2, 5, 7)), rng.integers(0, 21, (2, 4, 6))
    a_gt[0, 0, :3] = 255
    a_pred, b_pred = rng.integers(0, 21, (5, 7)), rng.integers(0, 21, (4, 6))
    total = confusion_matrix(a_gt[0], a_pred) + confusion_matrix(b_gt[0], b_pred)
    joint = confusion_matrix(np.concatenate([a_gt[0].ravel(), b_gt[0].ravel()]),
                             np.concatenate([a_pred.ravel(), b_pred.ravel()]))
    assert np.array_equal(total, joint) and total.sum() == 5 * 7 + 4 * 6 - 3


def test_confusion_rejects_out_of_range():
    with pytest.raises(ValueError, match="pred"):
        confusion_matrix(np.array([0, 1]), np.array([0, 21]))
    with pytest.raises(ValueError, match="gt"):
        confusion_matrix(np.array([0, 22]), np.array([0, 1]))
