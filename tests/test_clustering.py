"""Tests of pretrain.clustering against independent references (faiss, scikit-learn)."""

from __future__ import annotations

import math

import sys

import numpy as np
import pytest
import torch

from pretrain import clustering
from pretrain.clustering import (
    available_backends,
    draw_init_indices,
    kmeans,
    nmi,
    pca_whiten_l2,
    split_empty_clusters,
)
from dcbench.core import UserError

faiss = pytest.importorskip("faiss")
sk_metrics = pytest.importorskip("sklearn.metrics")


def blobs(n: int, d: int, centres: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d)) * 10
    return (c[rng.integers(0, centres, n)] + rng.normal(size=(n, d))).astype(np.float32)


def anisotropic(n: int, d: int, seed: int) -> np.ndarray:
    """Gaussian data with well-separated covariance eigenvalues and a non-zero mean."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return ((rng.normal(size=(n, d)) * np.linspace(8, 1, d)) @ q.T + 3.0).astype(np.float32)


def faiss_pca_l2(x: np.ndarray, dim: int) -> np.ndarray:
    pca = faiss.PCAMatrix(x.shape[1], dim, -0.5)
    pca.train(x)
    y = pca.apply(x)
    faiss.normalize_L2(y)
    return y


def nearest(x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d2 = ((x.astype(np.float64)[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1)
    return d2.argmin(1), d2.min(1)


# ----------------------------------------------------------------------------- PCA


@pytest.mark.parametrize("dim", [16, 64])
def test_pca_matches_faiss_up_to_sign(dim: int) -> None:
    x = anisotropic(3000, 64, seed=0)
    ours = pca_whiten_l2(x, dim)
    ref = faiss_pca_l2(x, dim)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float32 and ours.shape == (3000, dim)
    signs = np.sign((ours * ref).sum(axis=0))  # align each component's sign
    assert np.all(signs != 0)
    np.testing.assert_allclose(ours * signs, ref, atol=2e-4)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-6)
    fast = pca_whiten_l2(x, dim, scatter_dtype=torch.float32)
    np.testing.assert_allclose(fast, ours, atol=1e-4)


def test_pca_whitens_before_normalising() -> None:
    x = anisotropic(4000, 32, seed=1).astype(np.float64)
    fit = clustering.fit_pca_whitening(x, 8)
    y = ((torch.from_numpy(x) - fit.mean) @ fit.projection).numpy()
    np.testing.assert_allclose(y.T @ y, np.eye(8), atol=1e-8)  # whitened w.r.t. the scatter
    assert np.all(np.diff(fit.eigenvalues.numpy()) < 0)


def test_pca_keeps_input_type_and_is_chunk_invariant() -> None:
    x = anisotropic(1000, 24, seed=2)
    out_np = pca_whiten_l2(x, 8)
    out_t = pca_whiten_l2(torch.from_numpy(x), 8, chunk_elems=24 * 37)  # 37-row chunks
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    np.testing.assert_allclose(out_t.numpy(), out_np, atol=1e-6)


def test_pca_errors() -> None:
    x = anisotropic(100, 16, seed=3)
    with pytest.raises(ValueError, match="larger than the feature dimension 16"):
        pca_whiten_l2(x, 32)
    with pytest.raises(UserError, match="at least 2 feature rows"):
        pca_whiten_l2(x[:1], 1)
    with pytest.raises(UserError, match="at least 17 feature rows"):
        pca_whiten_l2(x[:10], 16)
    bad = x.copy()
    bad[5, 3] = np.nan
    with pytest.raises(UserError, match="NaN/inf: the network diverged; lower the learning rate"):
        pca_whiten_l2(bad, 8)
    bad[5, 3] = np.inf
    with pytest.raises(UserError, match="NaN/inf"):
        pca_whiten_l2(torch.from_numpy(bad), 8)
    collapsed = np.repeat(x[:, :2], 8, axis=1)  # rank 2
    with pytest.raises(UserError, match="fewer than 4 dimensions"):
        pca_whiten_l2(collapsed, 4)


# ----------------------------------------------------------------------------- k-means


def assert_same_clustering(a: clustering.KMeansResult, b: clustering.KMeansResult) -> None:
    np.testing.assert_array_equal(a.assign, b.assign)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-4)
    np.testing.assert_allclose(a.iteration_losses, b.iteration_losses, rtol=1e-4)
    np.testing.assert_allclose(a.centroids, b.centroids, atol=1e-4)
    assert a.iteration_splits == b.iteration_splits
    np.testing.assert_array_equal(a.sizes, b.sizes)


@pytest.mark.parametrize(
    ("x", "k"),
    [
        (blobs(5000, 32, 20, seed=1), 20),  # well-separated blobs
        (blobs(3000, 32, 5, seed=2), 5),  # N > 256 k: faiss would subsample by default
        (np.random.default_rng(3).normal(size=(5000, 32)).astype(np.float32), 50),  # random
    ],
    ids=["blobs-k20", "blobs-k5-no-subsampling", "random-k50"],
)
def test_faiss_and_torch_backends_agree(x: np.ndarray, k: int) -> None:
    f = kmeans(x, k, niter=20, seed=0, backend="faiss", device="cpu")
    t = kmeans(x, k, niter=20, seed=0, backend="torch", device="cpu")
    np.testing.assert_array_equal(f.init_indices, t.init_indices)
    assert f.empty_splits == t.empty_splits
    assert len(f.iteration_losses) == len(t.iteration_losses) == 20  # no early stop
    assert_same_clustering(f, t)
    # final hard assignment against the final centroids, loss = its objective
    ref_assign, ref_d2 = nearest(x, t.centroids)
    np.testing.assert_array_equal(t.assign, ref_assign)
    np.testing.assert_allclose(t.loss, ref_d2.sum(), rtol=1e-5)
    assert t.loss <= t.iteration_losses[-1] * (1 + 1e-6)  # Lloyd never increases the objective
    assert t.sizes.sum() == len(x)
    assert t.centroids.dtype == np.float32 and t.assign.dtype == np.int64


def test_init_is_k_distinct_points_from_the_seed() -> None:
    x = np.random.default_rng(0).normal(size=(500, 8)).astype(np.float32)
    r0 = kmeans(x, 30, niter=0, seed=11, backend="torch")
    np.testing.assert_array_equal(r0.init_indices, draw_init_indices(500, 30, 11))
    assert np.unique(r0.init_indices).size == 30
    np.testing.assert_array_equal(r0.centroids, x[r0.init_indices])  # niter=0: the init itself
    assert not np.array_equal(draw_init_indices(500, 30, 12), r0.init_indices)


def test_torch_backend_is_deterministic_and_chunk_invariant() -> None:
    x = blobs(2000, 16, 10, seed=4)
    a = kmeans(x, 10, backend="torch", device="cpu")
    b = kmeans(torch.from_numpy(x), 10, backend="torch", device="cpu", chunk_elems=16 * 97)
    np.testing.assert_array_equal(a.assign, b.assign)
    np.testing.assert_array_equal(a.centroids, b.centroids)


def test_float64_accumulation_used_on_cuda_matches_cpu_update() -> None:
    x = torch.from_numpy(blobs(3000, 16, 10, seed=6))
    assign = torch.from_numpy(np.random.default_rng(0).integers(0, 12, 3000))
    assign[assign == 11] = 0  # cluster 11 empty
    c32, n32 = clustering._update_torch(x, assign, 12, 1 << 20, torch.float32)
    c64, n64 = clustering._update_torch(x, assign, 12, 1 << 20, torch.float64)
    assert torch.equal(n32, n64) and int(n32[11]) == 0
    assert c64.dtype == torch.float32 and torch.all(c64[11] == 0)
    torch.testing.assert_close(c64, c32, rtol=1e-5, atol=1e-5)


def test_faiss_backend_falls_back_to_cpu_without_faiss_gpus() -> None:
    x = blobs(500, 8, 5, seed=7)
    r = kmeans(x, 5, backend="faiss", device="cuda")
    expect = "cuda:0" if faiss.get_num_gpus() > 0 else "cpu"
    assert r.device == expect


def duplicated_data() -> tuple[np.ndarray, np.ndarray]:
    """Six identical rows among the initial centroids: five clusters start empty."""
    x = np.random.default_rng(3).normal(size=(3000, 16)).astype(np.float32)
    x[1:6] = x[0]
    init = np.concatenate([np.arange(6), 100 + np.arange(34)])
    return x, init


def test_forced_empty_clusters_split_like_faiss() -> None:
    x, init = duplicated_data()
    for niter in (1, 2):  # the split itself, then one more update: bit-identical to faiss
        f = kmeans(x, 40, niter=niter, backend="faiss", device="cpu", init_indices=init)
        t = kmeans(x, 40, niter=niter, backend="torch", device="cpu", init_indices=init)
        assert f.iteration_splits[0] == t.iteration_splits[0] == 5
        np.testing.assert_array_equal(f.centroids, t.centroids)  # same donors: same RNG
        np.testing.assert_array_equal(f.assign, t.assign)
    for backend in ("faiss", "torch"):
        r = kmeans(x, 40, niter=20, backend=backend, device="cpu", init_indices=init)
        assert r.empty_splits >= 5
        assert (np.bincount(r.assign, minlength=40) > 0).all()


def test_split_rule() -> None:
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(4, 6)).astype(np.float32)
    before = centroids.copy()
    counts = np.array([0, 7, 1, 1])  # n = 9: cluster 1 is the only possible donor
    new_c, new_h, nsplit = split_empty_clusters(centroids, counts, n=9)
    up = np.float32([1 + 1 / 1024, 1 - 1 / 1024] * 3)  # even dims x (1+eps), odd x (1-eps)
    down = np.float32([1 - 1 / 1024, 1 + 1 / 1024] * 3)
    assert nsplit == 1
    np.testing.assert_array_equal(new_c[0], centroids[1] * up)
    np.testing.assert_array_equal(new_c[1], centroids[1] * down)
    np.testing.assert_array_equal(new_c[2:], centroids[2:])
    np.testing.assert_array_equal(new_h, np.float32([3.5, 3.5, 1, 1]))  # donor count halved
    np.testing.assert_array_equal(centroids, before)  # inputs untouched
    same_c, _, none = split_empty_clusters(centroids, np.array([2, 3, 1, 3]), n=9)
    assert none == 0 and np.array_equal(same_c, centroids)


def scalar_faiss_split(c: np.ndarray, counts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A literal, one-draw-at-a-time transcription of faiss's split_clusters loop."""
    c, h = c.copy(), counts.astype(np.float32)
    k, d = c.shape
    mt = np.random.RandomState(1234)  # std::mt19937(1234)
    eps = np.float32(1 / 1024)
    for ci in range(k):
        if h[ci] != 0:
            continue
        cj, tries = 0, 0
        while True:
            if tries == 10 * k:
                cj = int(np.argmax(h))
                break
            p = np.float32((np.float64(h[cj]) - 1.0) / np.float64(np.float32(n - k)))
            r = np.float32(mt.randint(0, 2**32, dtype=np.uint64)) / np.float32(4294967296.0)
            if r < p:
                break
            cj, tries = (cj + 1) % k, tries + 1
        c[ci] = c[cj]
        for j in range(d):
            c[ci, j] *= (1 + eps) if j % 2 == 0 else (1 - eps)
            c[cj, j] *= (1 - eps) if j % 2 == 0 else (1 + eps)
        h[ci] = h[cj] / np.float32(2)
        h[cj] -= h[ci]
    return c, h


@pytest.mark.parametrize("seed", range(3))
def test_vectorised_split_equals_scalar_faiss_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = 150
    counts = rng.integers(0, 6, k) * (rng.random(k) < 0.7)  # ~30% empty, many size-1
    counts[rng.integers(0, k)] += 1  # at least one possible donor
    c = rng.normal(size=(k, 5)).astype(np.float32)
    new_c, new_h, nsplit = split_empty_clusters(c, counts, n=int(counts.sum()) + 10 * k)
    ref_c, ref_h = scalar_faiss_split(c, counts, n=int(counts.sum()) + 10 * k)
    assert nsplit == int((counts == 0).sum())
    np.testing.assert_array_equal(new_c, ref_c)
    np.testing.assert_array_equal(new_h, ref_h)
    assert np.all(new_h > 0)


def test_split_donor_probability_is_proportional_to_size_minus_one() -> None:
    # 2000 empty clusters share donors of sizes 2 (size - 1 = 1) and 10 (size - 1 = 9)
    k = 2002
    counts = np.zeros(k, dtype=np.int64)
    counts[[700, 1400]] = [2, 10]
    c = np.zeros((k, 2), np.float32)
    c[700], c[1400] = 1.0, -1.0
    new_c, _, _ = split_empty_clusters(c, counts, n=12 + k)  # n - k keeps p < 1
    from_small = np.mean(new_c[counts == 0, 0] > 0)  # copies of donor 700 (or its copies)
    assert 0.02 < from_small < 0.25  # the split copies become donors too; never 0.5


def test_k_equals_n_copies_the_points() -> None:
    x = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    for backend in ("faiss", "torch"):
        r = kmeans(x, 30, backend=backend, device="cpu")
        np.testing.assert_array_equal(r.assign, np.arange(30))
        np.testing.assert_array_equal(r.centroids, x)
        assert r.loss < 1e-5 and r.iteration_losses == [0.0]  # faiss: "one fake iteration"


def test_kmeans_errors() -> None:
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    message = "k=21 is larger than the number of images N=20; lower --k"
    for backend in ("torch", "faiss"):
        with pytest.raises(ValueError) as err:
            kmeans(x, 21, backend=backend)
        assert str(err.value) == message
    with pytest.raises(ValueError, match="unknown k-means backend"):
        kmeans(x, 2, backend="sklearn")
    bad = x.copy()
    bad[0, 0] = np.inf
    with pytest.raises(UserError, match="NaN/inf"):
        kmeans(bad, 2, backend="torch")
    with pytest.raises(ValueError, match="init_indices"):
        kmeans(x, 2, backend="torch", init_indices=[0, 20])


def test_backends_listing_and_missing_faiss(monkeypatch: pytest.MonkeyPatch) -> None:
    assert available_backends() == ("faiss", "torch")
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    assert available_backends() == ("torch",)
    with pytest.raises(UserError, match="faiss is not installed"):
        kmeans(np.zeros((4, 2), np.float32), 2, backend="faiss")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_backend_on_cuda_matches_cpu() -> None:
    x = blobs(20000, 64, 50, seed=5)
    g = kmeans(torch.from_numpy(x).cuda(), 50, backend="torch")
    c = kmeans(x, 50, backend="torch", device="cpu")
    assert g.device.startswith("cuda")
    np.testing.assert_array_equal(g.assign, c.assign)
    np.testing.assert_allclose(g.loss, c.loss, rtol=1e-4)


# ----------------------------------------------------------------------------- metrics


def test_nmi_worked_example_geometric() -> None:
    """a = [0,0,1,1], b = [0,0,0,1] by hand: I = 1/2 ln(4/3) + 1/4 ln(2/3) + 1/4 ln 2,
    H(a) = ln 2, H(b) = -(3/4 ln 3/4 + 1/4 ln 1/4); NMI = I / sqrt(H(a) H(b)) = 0.34559..."""
    mi = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    ha, hb = math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert nmi([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(mi / math.sqrt(ha * hb), rel=1e-12)
    assert nmi([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(0.345592, abs=1e-6)
    assert nmi([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)  # a relabelling


def test_nmi_is_symmetric_and_differs_from_arithmetic() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 5, 400), rng.integers(0, 50, 400)
    assert nmi(a, b) == pytest.approx(nmi(b, a), rel=1e-12)
    arithmetic = sk_metrics.normalized_mutual_info_score(a, b)
    assert abs(nmi(a, b) - arithmetic) > 1e-3


def test_pca_with_fewer_rows_than_dims_matches_sklearn() -> None:
    """N < d takes the Gram-matrix route: the eigenpairs of scikit-learn's full PCA."""
    from sklearn.decomposition import PCA

    x = anisotropic(60, 200, seed=4).astype(np.float64)
    fit = clustering.fit_pca_whitening(x, 16)
    ref = PCA(n_components=16, whiten=True, svd_solver="full").fit(x)
    # scatter eigenvalues = sklearn's variances x (N - 1)
    np.testing.assert_allclose(fit.eigenvalues.numpy(), ref.explained_variance_ * 59, rtol=1e-9)
    y = ((torch.from_numpy(x) - fit.mean) @ fit.projection).numpy()
    want = ref.transform(x) / np.sqrt(59)
    signs = np.sign((y * want).sum(axis=0))
    np.testing.assert_allclose(y * signs, want, atol=1e-9)
    # the spectrum's effective rank, from numpy's eigenvalues of the d x d scatter
    xc = x - x.mean(axis=0)
    lam = np.clip(np.linalg.eigvalsh(xc.T @ xc), 0, None)
    p = lam[lam > lam.max() * 1e-12] / lam.sum()
    assert fit.effective_rank == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-6)


def test_pca_with_fewer_rows_than_dims_still_detects_a_collapse() -> None:
    x = np.repeat(anisotropic(60, 4, seed=5), 50, axis=1)  # 200 dims spanning only 4
    with pytest.raises(UserError, match="fewer than 8 dimensions"):
        clustering.fit_pca_whitening(x, 8)
