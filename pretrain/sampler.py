"""Samplers over pseudo-labelled images (PROTOCOLS.md §1, step 5).

* ``"uniform"`` (the paper, the default): N = int(len(assign) * reassign) samples, uniform
  over the m non-empty clusters. Each non-empty cluster (in increasing cluster id) draws
  N // m + 1 of its members -- with replacement iff it has <= N // m + 1 members --, the
  draws are concatenated, shuffled, and the first N kept. Yields ORIGINAL dataset indices.
* ``"released"``: the authors' released code. It draws exactly as above but indexes the
  cluster-sorted image list L (the concatenation of every cluster's members, clusters in
  increasing id, members in increasing index) with those original ids, so the image it
  yields is L[i]. The effective sampling is then about proportional to cluster size. An
  explicit option to reproduce that code, never the default.

Both are deterministic given ``seed`` (``numpy.random.default_rng``); every ``__iter__``
yields the same precomputed sequence (build one sampler per epoch).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


log = logging.getLogger(__name__)

SAMPLER_KINDS: tuple[str, ...] = ("uniform", "released")


def cluster_lists(assign: np.ndarray, k: int | None = None) -> list[np.ndarray]:
    """Members of each cluster 0..K-1 (increasing index); K = k or max(assign) + 1."""
    a = np.asarray(assign)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"cluster assignments must be a non-empty 1-D array, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"cluster assignments must be integers, got dtype {a.dtype}")
    if a.min() < 0:
        raise ValueError(f"cluster ids must be >= 0, got {a.min()}")
    n_clusters = int(a.max()) + 1 if k is None else int(k)
    if a.max() >= n_clusters:
        raise ValueError(f"cluster id {a.max()} is out of range for k={n_clusters}")
    order = np.argsort(a, kind="stable")
    bounds = np.cumsum(np.bincount(a, minlength=n_clusters))[:-1]
    return [m.astype(np.int64) for m in np.split(order, bounds)]


def uses_replacement(cluster_size: int, per_cluster: int) -> bool:
    """The paper's rule: draw with replacement iff the cluster has <= per_cluster members."""
    return cluster_size <= per_cluster


def sample_count(n_images: int, reassign: float) -> int:
    """N = int(n_images * reassign): samples per epoch."""
    if reassign <= 0:
        raise ValueError(f"reassign must be > 0, got {reassign}")
    n = int(n_images * reassign)
    if n < 1:
        raise ValueError(f"reassign={reassign} times {n_images} images gives no sample")
    return n


def per_cluster_draws(
    lists: list[np.ndarray], n_total: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """N // m + 1 members drawn from each non-empty cluster (empty clusters: no entry)."""
    non_empty = [m for m in lists if m.size > 0]
    if not non_empty:
        raise ValueError("every cluster is empty: nothing to sample")
    per = n_total // len(non_empty) + 1
    return [rng.choice(m, size=per, replace=uses_replacement(m.size, per)) for m in non_empty]


def uniform_indices(lists: list[np.ndarray], n_total: int, seed: int) -> np.ndarray:
    """The paper's sampling: per-cluster draws concatenated, shuffled, first N kept."""
    rng = np.random.default_rng(seed)
    res = np.concatenate(per_cluster_draws(lists, n_total, rng))
    rng.shuffle(res)
    return res[:n_total].astype(np.int64)


class UniformClusterSampler(Sampler[int]):
    """Uniform over non-empty clusters; yields original dataset indices (see module doc)."""

    def __init__(
        self, assign: np.ndarray, reassign: float = 1, seed: int = 0, k: int | None = None
    ) -> None:
        self.lists = cluster_lists(assign, k)
        self.n_total = sample_count(len(assign), reassign)
        self.seed = seed
        self.indices = self._indices()
        log.info(
            "%s: %d samples over %d non-empty clusters (seed %d)",
            type(self).__name__, self.n_total, sum(m.size > 0 for m in self.lists), seed,
        )  # fmt: skip

    def _indices(self) -> np.ndarray:
        return uniform_indices(self.lists, self.n_total, self.seed)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices.tolist())

    def __len__(self) -> int:
        return self.n_total


class ReleasedClusterSampler(UniformClusterSampler):
    """The released code's behaviour: the uniform draws i index the cluster-sorted list L.

    Yields original indices L[i]; sampling is then about proportional to cluster size.
    """

    def _indices(self) -> np.ndarray:
        sorted_images = np.concatenate(self.lists)
        return sorted_images[uniform_indices(self.lists, self.n_total, self.seed)]


def make_sampler(
    kind: str, assign: np.ndarray, reassign: float = 1, seed: int = 0, k: int | None = None
) -> UniformClusterSampler:
    """``"uniform"`` (the paper) or ``"released"`` (the authors' code, see module doc)."""
    if kind == "uniform":
        return UniformClusterSampler(assign, reassign, seed, k)
    if kind == "released":
        return ReleasedClusterSampler(assign, reassign, seed, k)
    raise ValueError(f"unknown sampler {kind!r}; choose one of {', '.join(SAMPLER_KINDS)}")
