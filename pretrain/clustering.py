"""The clustering step of DeepCluster (PROTOCOLS.md §1, steps 2, 3 and 8).

* :func:`pca_whiten_l2` -- PCA to ``dim`` dimensions, whitening (each component scaled by
  eigenvalue^-0.5, no epsilon), row L2-normalisation; the same map as faiss
  ``PCAMatrix(d, dim, -0.5)`` followed by ``faiss.normalize_L2`` (up to each component's sign).
* :func:`kmeans` -- Lloyd's k-means with faiss ``Clustering`` semantics, on two backends that
  agree up to float rounding (the same assignments barring near-ties): ``"faiss"`` (faiss
  itself, GPU index when faiss has GPUs) and ``"torch"`` (pure torch, CPU or CUDA; on CPU
  its centroid update is faiss's bit for bit). Both use the same initial centroids (k distinct
  points drawn with ``numpy.random.default_rng(seed)``), no subsampling, exact fp32 L2 search,
  ``niter`` iterations, faiss's empty-cluster splitting (reproduced bit for bit, including
  its Mersenne-Twister donor draws, by :func:`split_empty_clusters`) and one final hard
  assignment against the final centroids.
* :func:`nmi` -- normalised mutual information with the GEOMETRIC average (scikit-learn).

Loss conventions (see :class:`KMeansResult`): ``iteration_losses[i]`` is faiss's
``iteration_stats[i].obj``, the sum of squared distances of the points to the centroids
at the START of iteration ``i`` (before that iteration's update); ``loss`` is the sum of
squared distances of the final assignment to the final centroids (one pass more than faiss
reports).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence, TypeVar

import numpy as np
import torch

from dcbench.core import UserError

log = logging.getLogger(__name__)

Array = TypeVar("Array", np.ndarray, torch.Tensor)

BACKENDS: tuple[str, ...] = ("faiss", "torch")
"""Every k-means backend this module knows; :func:`available_backends` says which import."""

SPLIT_EPS = np.float32(1.0 / 1024.0)
"""faiss's relative perturbation when an empty cluster takes half of a donor."""

FAISS_SPLIT_SEED = 1234
"""faiss re-seeds its ``RandomGenerator`` (std::mt19937) with 1234 at every split pass."""

DEFAULT_CHUNK_ELEMS = 1 << 25
"""Rows per chunk = this // max(k, d): bounds the (rows x k) distance block (128 MiB fp32)."""

CUDA_CHUNK_ELEMS = 1 << 28
"""The k-means default on CUDA (1 GiB fp32 blocks: fewer, larger matrix products)."""

class FeatureCollapse(UserError):
    """The features cannot be clustered: non-finite, or spanning fewer dims than the PCA."""


NAN_MESSAGE = (
    "features contain NaN/inf: the network diverged; lower the learning rate "
    "(--lr) or check the input data"
)


# --------------------------------------------------------------------------- helpers


def _as_tensor(x: np.ndarray | torch.Tensor, name: str = "features") -> torch.Tensor:
    """A 2-D tensor view of ``x`` (no copy for numpy arrays)."""
    if isinstance(x, np.ndarray):
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise ValueError(f"{name} must be a numeric array, got dtype {x.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(x))  # a copy only for odd strides
    elif isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N x d), got shape {tuple(t.shape)}")
    return t


def _chunk_rows(n_cols: int, chunk_elems: int) -> int:
    return max(1, chunk_elems // max(1, n_cols))


def _check_finite(t: torch.Tensor, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> None:
    """Raise :class:`UserError` if any entry is NaN or inf (chunked: no full-size mask)."""
    step = _chunk_rows(t.shape[1], chunk_elems)
    for s in range(0, t.shape[0], step):
        if not bool(torch.isfinite(t[s : s + step]).all()):
            raise FeatureCollapse(NAN_MESSAGE)


# --------------------------------------------------------------------------- PCA


@dataclass(frozen=True)
class PCAWhitening:
    """A fitted PCA-whitening map ``y = (x - mean) @ projection``.

    ``projection[:, j]`` is the j-th principal axis (eigenvalues in decreasing order)
    multiplied by ``eigenvalues[j] ** -0.5``. Eigenvalues are those of the scatter matrix
    ``sum_i (x_i - mean)(x_i - mean)^T`` (not divided by N: faiss's convention; the global
    scale disappears in the L2-normalisation). Each axis's sign is fixed so that its
    largest-magnitude coordinate is positive.
    """

    mean: torch.Tensor  # float64 [d]
    projection: torch.Tensor  # float64 [d, dim]
    eigenvalues: torch.Tensor  # float64 [dim]
    effective_rank: float = float("nan")  # exp(entropy) of the whole normalised spectrum

    def transform(self, x: torch.Tensor, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> torch.Tensor:
        """Project, whiten and L2-normalise the rows of ``x``, chunk by chunk on the device
        the PCA was fitted on; float32 on ``x``'s device."""
        n, d = x.shape
        out = torch.empty((n, self.projection.shape[1]), dtype=torch.float32, device=x.device)
        step = _chunk_rows(d, chunk_elems)
        for s in range(0, n, step):
            y = (x[s : s + step].to(self.mean.device, torch.float64) - self.mean) @ self.projection
            norms = torch.linalg.vector_norm(y, dim=1, keepdim=True)
            out[s : s + step] = torch.where(norms > 0, y / norms, y).to(out.device, torch.float32)
        return out


def fit_pca_whitening(
    x: np.ndarray | torch.Tensor,
    dim: int = 256,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    scatter_dtype: torch.dtype = torch.float64,
    route: str = "auto",
    device: str | torch.device | None = None,
) -> PCAWhitening:
    """Fit PCA-whitening to ``dim`` components on all rows of ``x``.

    Mean, scatter accumulation and eigendecomposition in float64. ``scatter_dtype``: the
    dtype of each chunk's product (x - mean)^T (x - mean); float32 is ~3x faster on CPU and
    still more accurate than faiss (float32, uncentred), float64 (default) is exact.
    With fewer rows than dimensions (N < d) the same eigenpairs come from the N x N Gram
    matrix (Xc Xc^T u = l u  =>  v = Xc^T u / sqrt(l)): O(N^2 d) instead of O(d^3).
    ``route``: auto (gram when N < d) | scatter | gram. ``device``: where the float64 work
    runs (default: ``x``'s); rows are moved there chunk by chunk, so features kept in host
    memory are fitted on a GPU without holding them all in its memory.
    """
    if route not in ("auto", "scatter", "gram"):
        raise ValueError(f"route must be auto, scatter or gram, got {route!r}")
    t = _as_tensor(x)
    n, d = t.shape
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"PCA dimension must be a positive integer, got {dim!r}")
    if dim > d:
        raise ValueError(f"PCA dimension {dim} is larger than the feature dimension {d}; lower it")
    if n < 2:
        raise UserError(f"PCA needs at least 2 feature rows, got {n}")
    if dim > n - 1:
        raise UserError(
            f"PCA to {dim} dimensions needs at least {dim + 1} feature rows, got {n}: "
            "use more images or a smaller PCA dimension"
        )
    step = _chunk_rows(d, chunk_elems)
    dev = torch.device(device) if device is not None else t.device
    total = torch.zeros(d, dtype=torch.float64, device=dev)
    for s in range(0, n, step):
        chunk = t[s : s + step].to(dev)
        if not bool(torch.isfinite(chunk).all()):
            raise FeatureCollapse(NAN_MESSAGE)
        total += chunk.to(torch.float64).sum(dim=0)
    mean = total / n
    if route == "gram" or (route == "auto" and n < d):
        evals, evecs = _gram_eigh(t.to(dev), mean)
    else:
        scatter = torch.zeros((d, d), dtype=torch.float64, device=dev)
        for s in range(0, n, step):
            xc = (t[s : s + step].to(dev, torch.float64) - mean).to(scatter_dtype)
            if scatter_dtype == torch.float64:
                scatter.addmm_(xc.T, xc)
            else:
                scatter += (xc.T @ xc).to(torch.float64)
        evals, evecs = torch.linalg.eigh(scatter)  # ascending
    rank = effective_rank(evals)
    # numerical rank tolerance, as numpy.linalg.matrix_rank: below it an eigenvalue is noise
    tol = float(evals[-1].clamp_min(0)) * d * torch.finfo(torch.float64).eps
    evals = evals.flip(0)[:dim]
    evecs = evecs.flip(1)[:, :dim]
    if not float(evals[-1]) > tol:
        raise FeatureCollapse(
            f"the features span fewer than {dim} dimensions (eigenvalue {float(evals[-1]):.3g} "
            f"of component {dim}, largest {float(evals[0]):.3g}, effective rank {rank:.1f}): "
            "the representation collapsed"
        )
    signs = torch.sign(evecs.gather(0, evecs.abs().argmax(dim=0, keepdim=True)))
    evecs = evecs * torch.where(signs == 0, torch.ones_like(signs), signs)
    return PCAWhitening(mean=mean, projection=evecs * evals.rsqrt(), eigenvalues=evals,
                        effective_rank=rank)


def _gram_eigh(t: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending eigenpairs of the scatter Xc^T Xc (N < d) from the Gram matrix Xc Xc^T:
    the N eigenvalues (the other d - N are 0) and unit eigenvectors in R^d."""
    xc = t.to(torch.float64) - mean
    evals, u = torch.linalg.eigh(xc @ xc.T)
    evals = evals.clamp_min(0)
    v = xc.T @ u  # columns of norm sqrt(eval)
    norms = torch.linalg.vector_norm(v, dim=0)
    return evals, v / torch.where(norms > 0, norms, torch.ones_like(norms))


def effective_rank(eigenvalues: torch.Tensor) -> float:
    """exp(entropy) of the eigenvalue distribution (Roy & Vetterli 2007): d for a white
    spectrum, 1 when one direction holds all the variance."""
    lam = eigenvalues.clamp_min(0).to(torch.float64)
    total = float(lam.sum())
    if not total > 0:
        return 0.0
    p = lam[lam > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def pca_whiten_l2(
    x: Array,
    dim: int = 256,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    scatter_dtype: torch.dtype = torch.float64,
) -> Array:
    """PCA to ``dim`` dims, whitening (eigenvalue^-0.5, no epsilon), row L2-normalisation.

    Fitted on all rows of ``x`` (float64 covariance; ``scatter_dtype``: see
    :func:`fit_pca_whitening`), returned as float32 of the input's
    type (numpy in, numpy out; a tensor stays on its device). Equals faiss
    ``PCAMatrix(d, dim, -0.5)`` + ``normalize_L2`` up to the sign of each component.
    """
    t = _as_tensor(x)
    out = fit_pca_whitening(t, dim, chunk_elems, scatter_dtype).transform(t, chunk_elems)
    return out.numpy() if isinstance(x, np.ndarray) else out


# --------------------------------------------------------------------------- k-means


@dataclass(frozen=True)
class KMeansResult:
    """Outcome of :func:`kmeans`.

    ``loss``: sum of squared L2 distances of every point to its centroid in the final
    assignment (against the final centroids). ``iteration_losses[i]``: faiss's convention,
    the same sum at the start of iteration ``i``, before its centroid update (faiss sums it
    in float32, the torch backend in float64). ``iteration_splits[i]``: empty clusters split
    at iteration ``i``; ``empty_splits`` is their total.
    """

    assign: np.ndarray  # int64 [N]
    centroids: np.ndarray  # float32 [k, d]
    loss: float
    iteration_losses: list[float]
    iteration_splits: list[int]
    empty_splits: int
    sizes: np.ndarray  # int64 [k]
    init_indices: np.ndarray  # int64 [k]
    backend: str
    device: str


def available_backends() -> tuple[str, ...]:
    """The k-means backends usable here: ``"torch"`` always, ``"faiss"`` if it imports."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return ("torch",)
    return BACKENDS


def draw_init_indices(n: int, k: int, seed: int) -> np.ndarray:
    """k distinct row indices in [0, n), from ``numpy.random.default_rng(seed)``."""
    if k > n:
        raise ValueError(f"k={k} is larger than the number of images N={n}; lower --k")
    return np.random.default_rng(seed).choice(n, size=k, replace=False).astype(np.int64)


class _MT19937Floats:
    """faiss ``RandomGenerator(seed).rand_float()``: ``float(mt19937()) / float(2**32 - 1)``.

    numpy's legacy ``RandomState(seed)`` is the same std::mt19937 (init_genrand) and its
    ``randint(0, 2**32, dtype=uint32)`` returns the raw 32-bit outputs. ``float(2**32 - 1)``
    rounds to 2**32 in float32, hence the exact power-of-two division.
    """

    def __init__(self, seed: int) -> None:
        self._state = np.random.RandomState(seed)
        self._buf = np.empty(0, dtype=np.float32)
        self._pos = 0

    def peek(self, m: int) -> np.ndarray:
        """The next ``m`` floats, not consumed."""
        have = self._buf.size - self._pos
        if have < m:
            raw = self._state.randint(0, 2**32, size=max(m - have, 4096), dtype=np.uint32)
            new = raw.astype(np.float32) / np.float32(4294967296.0)
            self._buf = np.concatenate([self._buf[self._pos :], new])
            self._pos = 0
        return self._buf[self._pos : self._pos + m]

    def advance(self, m: int) -> None:
        self._pos += m


def _pick_donor(h: np.ndarray, n: int, rng: _MT19937Floats) -> int:
    """faiss's donor search: cycle cj = 0, 1, ... and stop at the first draw r < p[cj].

    ``p = float32((h - 1.0) / float32(n - k))``; at most ``10 k`` draws, then the largest
    cluster (faiss >= 1.14 fallback).
    """
    k = h.size
    p = ((h.astype(np.float64) - 1.0) / np.float64(np.float32(n - k))).astype(np.float32)
    tries = 0
    max_tries = 10 * k
    while tries < max_tries:
        m = min(k, max_tries - tries)  # tries is a multiple of k here: cj starts at 0
        hits = np.flatnonzero(rng.peek(m) < p[:m])
        if hits.size:
            rng.advance(int(hits[0]) + 1)
            return int(hits[0])
        rng.advance(m)
        tries += m
    return int(np.argmax(h))


def split_empty_clusters(
    centroids: np.ndarray, counts: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """faiss ``split_clusters``: give every empty cluster half of a randomly chosen donor.

    For each empty cluster ``ci`` in increasing order: the donor ``cj`` is drawn with
    probability proportional to (size - 1) (faiss's RNG, reseeded with 1234 on every call),
    ``centroid[ci] = centroid[cj]`` with even dims scaled by (1 + 1/1024) and odd dims by
    (1 - 1/1024), the donor the other way round; the donor's count is halved between the two.
    Returns new (float32 centroids, float32 counts, number of splits); inputs untouched.
    """
    c = np.array(centroids, dtype=np.float32, copy=True)
    h = np.array(counts, dtype=np.float32, copy=True)
    k, d = c.shape
    empty = np.flatnonzero(h == 0)
    if empty.size == 0:
        return c, h, 0
    if n <= k:
        raise ValueError(f"cannot split empty clusters with n={n} <= k={k}")
    rng = _MT19937Floats(FAISS_SPLIT_SEED)
    even = np.arange(d) % 2 == 0
    up = np.where(even, np.float32(1) + SPLIT_EPS, np.float32(1) - SPLIT_EPS).astype(np.float32)
    down = np.where(even, np.float32(1) - SPLIT_EPS, np.float32(1) + SPLIT_EPS).astype(np.float32)
    for ci in empty:  # a split never empties another cluster: the list stays valid
        cj = _pick_donor(h, n, rng)
        c[ci] = c[cj] * up
        c[cj] = c[cj] * down
        h[ci] = h[cj] / np.float32(2)
        h[cj] = h[cj] - h[ci]
    return c, h, int(empty.size)


def _faiss_index(faiss, d: int, device: str | torch.device | None):  # noqa: ANN001, ANN202
    """An exact L2 index: on a GPU when faiss has GPUs and ``device`` is not CPU."""
    want_gpu = device is None or torch.device(device).type == "cuda"
    if want_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = (torch.device(device).index or 0) if device is not None else 0
        return faiss.GpuIndexFlatL2(res, d, cfg), res, f"cuda:{cfg.device}"
    return faiss.IndexFlatL2(d), None, "cpu"


def _kmeans_faiss(
    x: np.ndarray, init: np.ndarray, niter: int, seed: int, device: str | torch.device | None
) -> tuple[np.ndarray, list[float], list[int], np.ndarray, np.ndarray, str]:
    """faiss ``Clustering`` from the given initial centroids; + final assignment."""
    import faiss

    n, d = x.shape
    k = init.shape[0]
    cp = faiss.ClusteringParameters()
    cp.niter = niter
    cp.seed = seed  # unused: the centroids are given
    cp.verbose = False
    cp.min_points_per_centroid = 1  # no "too few points" warning
    cp.max_points_per_centroid = n // k + 1  # k * max > n: no subsampling
    if hasattr(cp, "early_stop_threshold"):
        cp.early_stop_threshold = -1.0  # faiss >= 1.14 stops on an unchanged objective
    index, _res, dev = _faiss_index(faiss, d, device)  # _res keeps GPU memory alive
    if niter > 0 and n > k:
        clus = faiss.Clustering(d, k, cp)
        init32 = np.ascontiguousarray(init, dtype=np.float32)
        faiss.copy_array_to_vector(init32.ravel(), clus.centroids)
        clus.train(x, index)
        stats = clus.iteration_stats
        losses = [float(stats.at(i).obj) for i in range(stats.size())]
        splits = [int(stats.at(i).nsplit) for i in range(stats.size())]
        centroids = faiss.vector_float_to_array(clus.centroids).reshape(k, d).copy()
    else:
        losses, splits, centroids = [], [], np.array(init, dtype=np.float32, copy=True)
    index.reset()
    index.add(centroids)
    dist, assign = index.search(x, 1)
    return centroids, losses, splits, assign[:, 0].astype(np.int64), dist[:, 0], dev


def _assign_torch(
    x: torch.Tensor, c: torch.Tensor, chunk_elems: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid and squared distance per row: argmin_j (|c_j|^2 - 2 x.c_j), fp32."""
    n = x.shape[0]
    cn = (c * c).sum(dim=1)
    assign = torch.empty(n, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, dtype=torch.float32, device=x.device)
    step = _chunk_rows(max(c.shape[0], x.shape[1]), chunk_elems)
    for s in range(0, n, step):
        xb = x[s : s + step]
        scores = torch.addmm(cn, xb, c.T, alpha=-2.0)
        a = scores.argmin(dim=1)  # first index on ties, like faiss
        best = scores.gather(1, a[:, None])[:, 0]
        assign[s : s + step] = a
        dist[s : s + step] = ((xb * xb).sum(dim=1) + best).clamp_min_(0)
    return assign, dist


def _update_torch(
    x: torch.Tensor, assign: torch.Tensor, k: int, chunk_elems: int, acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids = means of their points (empty clusters -> 0) and counts.

    Sums accumulated in ``acc``, then scaled by float32(1 / count). With float32 on CPU
    (index_add_ adds in point order) this is faiss's ``compute_centroids`` bit for bit; on
    CUDA, float64 sums hide the unordered atomic adds once rounded to float32.
    """
    n, d = x.shape
    sums = torch.zeros((k, d), dtype=acc, device=x.device)
    step = _chunk_rows(d, chunk_elems)
    for s in range(0, n, step):
        sums.index_add_(0, assign[s : s + step], x[s : s + step].to(acc))
    counts = torch.bincount(assign, minlength=k)
    inv = 1.0 / counts.clamp_min(1).to(torch.float32)
    return (sums * inv.to(acc)[:, None]).to(torch.float32), counts


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else torch.float64


def _kmeans_torch(
    x: torch.Tensor, init_idx: np.ndarray, niter: int, chunk_elems: int
) -> tuple[np.ndarray, list[float], list[int], np.ndarray, np.ndarray]:
    n, _ = x.shape
    k = init_idx.size
    c = x[torch.from_numpy(init_idx).to(x.device)].clone()
    losses: list[float] = []
    splits: list[int] = []
    for it in range(niter if n > k else 0):
        assign, dist = _assign_torch(x, c, chunk_elems)
        losses.append(float(dist.sum(dtype=torch.float64)))
        c, counts = _update_torch(x, assign, k, chunk_elems, _accumulation_dtype(x.device))
        nsplit = 0
        if bool((counts == 0).any()):
            c_np, _, nsplit = split_empty_clusters(c.cpu().numpy(), counts.cpu().numpy(), n)
            c = torch.from_numpy(c_np).to(x.device)
        splits.append(nsplit)
        log.debug("k-means (torch) iteration %d: loss %.6g, %d splits", it, losses[-1], nsplit)
    assign, dist = _assign_torch(x, c, chunk_elems)
    return c.cpu().numpy(), losses, splits, assign.cpu().numpy(), dist.cpu().numpy()


def _resolve_torch_device(
    x: np.ndarray | torch.Tensor, device: str | torch.device | None
) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(x, torch.Tensor):
        return x.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def kmeans(
    x: np.ndarray | torch.Tensor,
    k: int,
    niter: int = 20,
    seed: int = 0,
    backend: str = "faiss",
    device: str | torch.device | None = None,
    init_indices: Sequence[int] | np.ndarray | None = None,
    chunk_elems: int | None = None,
) -> KMeansResult:
    """Euclidean k-means with faiss semantics on ``backend`` ("faiss" or "torch").

    Init: the rows ``init_indices`` (default :func:`draw_init_indices` ``(N, k, seed)``),
    shared by both backends. Then ``niter`` iterations of: exact fp32 assignment, mean
    update, faiss's empty-cluster split. Finally one hard assignment against the final
    centroids. With the same input and init, both backends give the same assignments when
    no near-ties occur (they differ only in float rounding). ``device``: torch backend --
    where to compute (default: the tensor's device, else CUDA if available); faiss backend
    -- "cpu" forces a CPU index, otherwise a GPU index is used when faiss has GPUs.
    ``chunk_elems`` bounds the torch backend's distance blocks (default
    :data:`DEFAULT_CHUNK_ELEMS`, :data:`CUDA_CHUNK_ELEMS` on CUDA); the CPU result does not
    depend on it.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown k-means backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend not in available_backends():
        raise UserError(
            f"k-means backend {backend!r} is not available (faiss is not installed): "
            "pip install faiss-cpu, or use the torch backend"
        )
    t = _as_tensor(x)
    n, d = t.shape
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    if k > n:
        raise ValueError(f"k={k} is larger than the number of images N={n}; lower --k")
    if niter < 0:
        raise ValueError(f"niter must be >= 0, got {niter}")
    _check_finite(t, chunk_elems or DEFAULT_CHUNK_ELEMS)
    if init_indices is None:
        init_idx = draw_init_indices(n, k, seed)
    else:
        init_idx = np.asarray(init_indices, dtype=np.int64).reshape(-1)
        if init_idx.size != k or init_idx.min() < 0 or init_idx.max() >= n:
            raise ValueError(f"init_indices must be {k} row indices in [0, {n})")
    if n == k:  # faiss's corner case: the centroids are the points themselves, in order
        init_idx = np.arange(n, dtype=np.int64)

    t0 = time.perf_counter()
    if backend == "faiss":
        x_np = np.ascontiguousarray(t.to(device="cpu", dtype=torch.float32).numpy())
        centroids, losses, splits, assign, dist, dev = _kmeans_faiss(
            x_np, x_np[init_idx], niter, seed, device
        )
    else:
        tdev = _resolve_torch_device(x, device)
        xt = t.to(device=tdev, dtype=torch.float32).contiguous()
        chunk = chunk_elems or (CUDA_CHUNK_ELEMS if tdev.type == "cuda" else DEFAULT_CHUNK_ELEMS)
        centroids, losses, splits, assign, dist = _kmeans_torch(xt, init_idx, niter, chunk)
        dev = str(tdev)
    if n == k:
        losses, splits = [0.0], [0]  # faiss's "one fake iteration"
    result = KMeansResult(
        assign=assign,
        centroids=centroids,
        loss=float(np.sum(dist, dtype=np.float64)),
        iteration_losses=losses,
        iteration_splits=splits,
        empty_splits=int(sum(splits)),
        sizes=np.bincount(assign, minlength=k).astype(np.int64),
        init_indices=init_idx,
        backend=backend,
        device=dev,
    )
    log.info(
        "k-means (%s on %s): N=%d d=%d k=%d, %d iterations in %.2f s, loss %.6g, %d empty-cluster "
        "splits, %d empty at the end",
        backend, dev, n, d, k, len(losses), time.perf_counter() - t0, result.loss,
        result.empty_splits, int((result.sizes == 0).sum()),
    )  # fmt: skip
    return result


# --------------------------------------------------------------------------- metrics


def nmi(a: np.ndarray | Sequence[int], b: np.ndarray | Sequence[int]) -> float:
    """Normalised mutual information with the GEOMETRIC average, I(a;b) / sqrt(H(a) H(b)),
    as the paper (scikit-learn's default became the arithmetic average in 0.22)."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(np.asarray(a).reshape(-1), np.asarray(b).reshape(-1),
                                              average_method="geometric"))
