"""Instance retrieval: AP oracles (DATA_FORMATS.md B.4-B.5 worked examples, hand-computed
Revisited E/M/H), the Tolias grid by hand, whitening against scikit-learn's PCA, batched
extraction against one image at a time, the query crops of both protocols."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.decomposition import PCA

from evaluations import retrieval as rt
from evaluations.metrics import (ap_from_ranks, oxford_ap, positive_ranks, revisited_map)
from pretrain.models import ModelSpec, build_model

# --------------------------------------------------------------------------- AP oracles


def test_worked_example_0533333_both_scorers():
    """DATA_FORMATS.md B.5: ranked [a, x, j, b, y, c], positives {a, b, c, d}, junk {j}."""
    names = ["a", "x", "j", "b", "y", "c"]
    assert oxford_ap(names, {"a", "b", "c", "d"}, {"j"}) == pytest.approx(0.533333, abs=1e-6)
    ranks = positive_ranks(np.arange(6), [0, 3, 5], [2])
    assert ranks.tolist() == [0, 2, 4]
    assert ap_from_ranks(ranks, 4) == pytest.approx(0.533333, abs=1e-6)


def test_oxford_ap_by_hand_small_cases():
    assert oxford_ap(["p", "n"], {"p"}, set()) == 1.0
    # n, p: recall 0 -> 1 at precision 0 -> 1/2: (1 - 0) * (0 + 0.5) / 2
    assert oxford_ap(["n", "p"], {"p"}, set()) == pytest.approx(0.25)
    assert oxford_ap(["j", "n", "p"], {"p"}, {"j"}) == pytest.approx(0.25)  # junk takes no rank
    assert oxford_ap(["n"], {"p"}, set()) == 0.0  # never retrieved: contributes 0
    assert np.isnan(oxford_ap(["n"], set(), set()))


@pytest.mark.parametrize("seed", range(25))
def test_name_scorer_and_rank_scorer_agree_on_complete_rankings(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    order = rng.permutation(n)
    labels = rng.choice(3, size=n, p=[0.6, 0.25, 0.15])  # 0 negative, 1 positive, 2 junk
    if not (labels == 1).any():
        labels[rng.integers(n)] = 1
    pos, junk = np.flatnonzero(labels == 1), np.flatnonzero(labels == 2)
    extra = int(rng.integers(0, 3))  # positives absent from the database still count
    names = [f"im{i}" for i in order]
    want = oxford_ap(names, {f"im{i}" for i in pos} | {f"gone{i}" for i in range(extra)},
                     {f"im{i}" for i in junk})
    got = ap_from_ranks(positive_ranks(order, pos, junk), len(pos) + extra)
    assert got == pytest.approx(want, abs=1e-12)


def _revisited_fixture():
    """db [a, x, j, b, y, c, d] = 0..6. Query 0: easy {a, b}, hard {c, d}, junk {j}, ranked
    in db order. Query 1: easy {x}, no hard positive, ranked x first."""
    groups = [{"easy": [0, 3], "hard": [5, 6], "junk": [2]},
              {"easy": [1], "hard": [], "junk": []}]
    order = np.array([[0, 1, 2, 3, 4, 5, 6], [1, 0, 2, 3, 4, 5, 6]])
    return order, groups


def test_revisited_easy_medium_hard_by_hand():
    order, groups = _revisited_fixture()
    e, m, h = (revisited_map(order, groups, s) for s in ("E", "M", "H"))
    # E: positives a, b at 0, 3; junk j (and hard c, d) before b -> ranks [0, 2]:
    #    (1 + (1/2 + 2/3) / 2) / 2 = 0.791667; query 1: 1.0
    assert e["aps"].tolist() == pytest.approx([0.791667, 1.0], abs=1e-6)
    assert e["map"] == pytest.approx((0.791667 + 1) / 2, abs=1e-6)
    # M: a, b, c, d at 0, 3, 5, 6 -> [0, 2, 4, 5]: (1 + 0.583333 + 0.55 + 0.633333) / 4
    assert m["aps"][0] == pytest.approx(0.691667, abs=1e-6)
    # H: c, d at 5, 6 with a, j, b junk before -> [2, 3]: ((0 + 1/3) / 2 + (1/3 + 1/2) / 2) / 2
    assert h["aps"][0] == pytest.approx(0.291667, abs=1e-6)
    assert np.isnan(h["aps"][1]) and h["n_empty"] == 1  # no hard positive: excluded
    assert h["map"] == pytest.approx(0.291667, abs=1e-6)
    assert e["n_empty"] == m["n_empty"] == 0


def test_revisited_mp_at_k_keeps_revisitops_quirk():
    order, groups = _revisited_fixture()
    e = revisited_map(order, groups, "E", kappas=(1, 5, 10))
    # query 0: one-based ranks [1, 3]: P@1 = 1, P@5 = 2 / min(3, 5) = 2/3 (not 2/5)
    assert e["mpk"] == pytest.approx({1: 1.0, 5: (2 / 3 + 1) / 2, 10: (2 / 3 + 1) / 2})


def test_revisited_agrees_with_oxford_scorer_on_complete_rankings():
    rng = np.random.default_rng(7)
    n = 40
    order = np.stack([rng.permutation(n) for _ in range(6)])
    groups = []
    for _ in range(6):
        lab = rng.choice(4, size=n, p=[0.6, 0.15, 0.15, 0.1])  # neg, easy, hard, junk
        lab[rng.integers(n)] = 1
        groups.append({"easy": np.flatnonzero(lab == 1).tolist(),
                       "hard": np.flatnonzero(lab == 2).tolist(),
                       "junk": np.flatnonzero(lab == 3).tolist()})
    m = revisited_map(order, groups, "M")
    for row, g, ap in zip(order, groups, m["aps"]):
        names = [str(i) for i in row]
        want = oxford_ap(names, {str(i) for i in g["easy"] + g["hard"]},
                         {str(i) for i in g["junk"]})
        assert ap == pytest.approx(want, abs=1e-12)


# --------------------------------------------------------------------------- R-MAC


def test_rmac_grid_square_map_by_hand():
    """10 x 10, L = 3: 1 region of side 10; 2 x 2 of side 6 at 0, 4; 3 x 3 of side 5 at
    0, 2, 5 (floor(1 + 2.5 i) - 1)."""
    regions = rt.rmac_regions(10, 10, 3)
    want = [(0, 0, 10)] + [(x, y, 6) for y in (0, 4) for x in (0, 4)] \
        + [(x, y, 5) for y in (0, 2, 5) for x in (0, 2, 5)]
    assert regions == want


def test_rmac_grid_landscape_map_by_hand():
    """h = 30, w = 40 (a 768 x 1024 image's map shape): the overlap criterion picks one extra
    region along the long side (|0.6 - b/30| is smallest for b = 10), 2 + 6 + 12 = 20."""
    regions = rt.rmac_regions(30, 40, 3)
    want = ([(x, 0, 30) for x in (0, 10)]
            + [(x, y, 20) for y in (0, 10) for x in (0, 10, 20)]
            + [(x, y, 15) for y in (0, 7, 15) for x in (0, 8, 16, 25)])
    assert regions == want
    portrait = rt.rmac_regions(40, 30, 3)  # transposed map: transposed regions
    assert sorted(portrait) == sorted((y, x, s) for x, y, s in want)


def test_rmac_regions_stay_inside_small_maps():
    for h in range(1, 12):
        for w in range(1, 12):
            regions = rt.rmac_regions(h, w, 3)
            assert regions, (h, w)
            for x, y, s in regions:
                assert 0 <= x and 0 <= y and x + s <= w and y + s <= h and s >= 1


def test_regional_max_against_a_loop():
    fmap = torch.randn(2, 3, 7, 9)
    regions = rt.rmac_regions(7, 9, 3)
    got = rt.regional_max(fmap, regions)
    for b in range(2):
        for r, (x, y, s) in enumerate(regions):
            for c in range(3):
                assert got[b, r, c] == fmap[b, c, y:y + s, x:x + s].numpy().max()


# --------------------------------------------------------------------------- whitening


def test_whitening_matches_sklearn_pca_whiten_after_l2():
    """Same whitened geometry as scikit-learn's PCA(whiten=True): after L2-normalisation the
    Gram matrices agree (eigenvector signs and the scatter's scale drop out)."""
    rng = np.random.default_rng(0)
    train = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    test = rng.normal(size=(30, 16)) @ rng.normal(size=(16, 16))
    w = rt.learn_whitening(torch.tensor(train, dtype=torch.float32), dim=10, eig_floor=1e-5)
    ours = torch.nn.functional.normalize((torch.tensor(test, dtype=torch.float32) - w.mean)
                                         @ w.projection.T, dim=1).numpy()
    ref = PCA(n_components=10, whiten=True, svd_solver="full").fit(train).transform(test)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(ours @ ours.T, ref @ ref.T, atol=1e-4)


def test_whitening_floors_tiny_eigenvalues():
    """Fewer regions than channels (a rank-deficient scatter) still gives finite descriptors,
    and the floored directions are scaled by 1/sqrt(max * floor), not by 1/sqrt(0)."""
    x = torch.randn(5, 12)
    w = rt.learn_whitening(x, dim=12, eig_floor=1e-5)
    assert torch.isfinite(w.projection).all()
    z = rt.aggregate([x[:2], x[2:]], w)
    assert torch.isfinite(z).all() and torch.allclose(z.norm(dim=1), torch.ones(2))


def test_aggregate_sums_whitened_regions_per_image():
    rng = torch.Generator().manual_seed(0)
    regions = [torch.randn(n, 6, generator=rng) for n in (3, 1, 4)]
    w = rt.Whitening(torch.randn(6, generator=rng), torch.randn(4, 6, generator=rng))
    got = rt.aggregate(regions, w)
    for r, g in zip(regions, got):
        z = (r - w.mean) @ w.projection.T
        z = z / z.norm(dim=1, keepdim=True)
        s = z.sum(dim=0)
        assert torch.allclose(g, s / s.norm(), atol=1e-6)


def test_rank_is_a_descending_dot_product_with_stable_ties():
    db = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    order = rt.rank(q, db)
    assert order.tolist() == [[0, 2, 3, 1], [1, 3, 0, 2]]
    # query expansion with the top 1: q0 + db0 is still along x
    assert rt.rank(q, db, expansion=1).tolist()[0] == [0, 2, 3, 1]


# --------------------------------------------------------------------------- images


def test_query_plans_of_both_protocols_by_hand(tmp_path):
    item = rt.ImageItem("k", tmp_path / "a.jpg", (10.5, 20.2, 150.7, 90.9), "after_resize")
    plan = rt.plan_item(item, (200, 100), 100)  # ratio 0.5
    assert plan.resize == (100, 50) and plan.post_crop == (5, 10, 76, 46)
    assert plan.shape == (36, 71)
    before = rt.plan_item(rt.ImageItem("k", item.path, item.box, "before_resize"),
                          (200, 100), 100)
    # PIL rounds the box (10.5 -> 10, half to even); the 141 x 71 crop -> longest side 100
    assert before.pre_crop == (10, 20, 151, 91) and before.resize == (100, 50)
    full = rt.plan_item(rt.ImageItem("k", item.path), (300, 400), 1024)
    assert full.resize == (768, 1024) and full.pre_crop is None and full.post_crop is None


def test_thin_query_box_is_widened_inside_the_image(tmp_path):
    item = rt.ImageItem("k", tmp_path / "q.jpg", (0, 10, 20, 90), "after_resize")
    plan = rt.plan_item(item, (100, 100), 100)
    assert plan.post_crop == (0, 10, 32, 90) and plan.grown  # clamped at the left border
    mid = rt.plan_item(rt.ImageItem("k", item.path, (40, 10, 50, 90), "after_resize"),
                       (100, 100), 100)
    assert mid.post_crop == (29, 10, 61, 90)  # about the centre 45: [29, 61)
    # before_resize: 10 x 80 px crop -> longest side 100; 32 px at the input need
    # ceil(32 * 80 / 100) = 26 px in the original
    before = rt.plan_item(rt.ImageItem("k", item.path, (40, 10, 50, 90), "before_resize"),
                          (100, 100), 100)
    assert before.pre_crop == (32, 10, 58, 90) and before.shape[1] >= rt.MIN_SIDE
    ok = rt.plan_item(rt.ImageItem("k", item.path, (10, 10, 90, 90), "after_resize"),
                      (100, 100), 100)
    assert not ok.grown


def test_image_too_small_for_the_network_is_one_clear_error(tmp_path):
    with pytest.raises(Exception, match=r"q\.jpg.*below the 32 px"):
        rt.plan_item(rt.ImageItem("k", tmp_path / "q.jpg"), (100, 20), 100)


def _photos(tmp_path, sizes):
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(sizes):
        p = tmp_path / f"im{i}.jpg"
        base = rng.integers(0, 255, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        Image.fromarray(base).resize((w, h), Image.BICUBIC).save(p, quality=90)
        paths.append(p)
    return paths


@pytest.mark.parametrize("arch,sobel", [("alexnet", True), ("vgg16", False)])
def test_batched_extraction_equals_one_at_a_time(tmp_path, arch, sobel):
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch, sobel, 64, None)).eval()
    paths = _photos(tmp_path, [(160, 120), (120, 160), (160, 120), (100, 100), (160, 120)])
    items = [rt.ImageItem(p.name, p) for p in paths]
    items.append(rt.ImageItem("q1", paths[0], (10.0, 5.0, 140.0, 110.0), "after_resize"))
    items.append(rt.ImageItem("q2", paths[1], (3.0, 9.5, 100.0, 150.0), "before_resize"))
    cfg = rt.RetrievalConfig(max_size=96, scales=(1.0, 0.75))
    batched = rt.extract_regions(model, items, cfg, torch.device("cpu"),
                                 max_pixels=rt.MAX_BATCH_PIXELS)
    single = rt.extract_regions(model, items, cfg, torch.device("cpu"), max_pixels=1)
    shapes = [p.shape for _, p in
              [(None, rt.plan_item(it, Image.open(it.path).size, 96)) for it in items]]
    assert len(rt.size_batches(shapes, rt.MAX_BATCH_PIXELS)) < len(items)  # really batched
    for b, s in zip(batched, single):
        assert b.shape == s.shape and b.shape[1] == (512 if arch == "vgg16" else 256)
        assert torch.allclose(b, s, atol=1e-5)
        norms = b.norm(dim=1)  # each region L2-normalised (an all-zero region stays 0)
        assert ((norms - 1).abs() < 1e-5).logical_or(norms < 1e-6).all()


def test_regions_come_from_the_conv5_tap_of_the_resized_image(tmp_path):
    """Independent route: resize with PIL, normalise by hand, run the network's own layers
    up to conv5 with torch.nn.functional, max over each region, L2."""
    torch.manual_seed(1)
    model = build_model(ModelSpec("alexnet", True, 32, None)).eval()
    (path,) = _photos(tmp_path, [(200, 150)])
    cfg = rt.RetrievalConfig(max_size=128)
    (got,) = rt.extract_regions(model, [rt.ImageItem("a", path)], cfg, torch.device("cpu"))
    img = Image.open(path).convert("RGB").resize((128, 96), Image.BILINEAR)
    x = torch.tensor(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) \
        / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        x = model.sobel(x)
        for m in list(model.features)[:-1]:  # conv5's ReLU output, its max-pool dropped
            x = m(x)
    want = torch.stack([x[0, :, y:y + s, xx:xx + s].amax(dim=(1, 2))
                        for xx, y, s in rt.rmac_regions(x.shape[2], x.shape[3], 3)])
    want = want / want.norm(dim=1, keepdim=True).clamp(min=1e-12)
    assert torch.allclose(got, want, atol=1e-5)


def test_config_validation():
    with pytest.raises(Exception, match="levels"):
        rt.RetrievalConfig(levels=0)
    with pytest.raises(Exception, match="scales"):
        rt.RetrievalConfig(scales=())
    with pytest.raises(Exception, match="max_size"):
        rt.RetrievalConfig(max_size=8)
