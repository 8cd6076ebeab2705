"""Tests of pretrain.sampler: the paper's uniform sampler and the released code's variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.sampler import (
    ReleasedClusterSampler,
    UniformClusterSampler,
    cluster_lists,
    make_sampler,
    per_cluster_draws,
    uses_replacement,
)

SKEWED_SIZES = (1000, 100, 10, 1)


def shuffled_labels(sizes: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Cluster ids with the given cluster sizes, scattered randomly over the images."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.default_rng(seed).permutation(labels)


def label_histogram(indices: np.ndarray, assign: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(assign[indices], minlength=k)


def expected_released_counts(assign: np.ndarray, n_total: int) -> np.ndarray:
    """Expected cluster histogram of the released sampler, from its definition.

    Cluster c draws per = N // m + 1 members uniformly (each member equally likely,
    with or without replacement); a drawn original id i yields the image at POSITION i of
    the cluster-sorted list, whose cluster is the one whose block of positions holds i.
    Truncation to N keeps a uniformly random N of the m * per draws.
    """
    sizes = np.bincount(assign)
    k = sizes.size
    non_empty = [c for c in range(k) if sizes[c] > 0]
    per = n_total // len(non_empty) + 1
    block_end = np.cumsum(sizes)  # positions [block_end[c-1], block_end[c]) hold cluster c
    expected = np.zeros(k)
    for c in non_empty:
        members = np.flatnonzero(assign == c)
        cluster_at_position = np.searchsorted(block_end, members, side="right")
        expected += per * np.bincount(cluster_at_position, minlength=k) / members.size
    return expected * n_total / (per * len(non_empty))


@pytest.mark.parametrize("kind", ["uniform", "released"])
@pytest.mark.parametrize("reassign", [1, 2, 0.5])
def test_length_determinism_and_range(kind: str, reassign: float) -> None:
    assign = shuffled_labels(SKEWED_SIZES)
    s1 = make_sampler(kind, assign, reassign, seed=3)
    s2 = make_sampler(kind, assign, reassign, seed=3)
    s3 = make_sampler(kind, assign, reassign, seed=4)
    n_total = int(len(assign) * reassign)
    assert len(s1) == n_total and len(list(s1)) == n_total
    assert list(s1) == list(s2) == list(s1)  # deterministic, and stable across __iter__ calls
    assert list(s1) != list(s3)
    idx = np.asarray(list(s1))
    assert idx.min() >= 0 and idx.max() < len(assign)


def test_uniform_sampler_equalises_clusters() -> None:
    assign = shuffled_labels(SKEWED_SIZES)
    sampler = make_sampler("uniform", assign, reassign=1, seed=0)
    assert isinstance(sampler, UniformClusterSampler)
    assert not isinstance(sampler, ReleasedClusterSampler)
    hist = label_histogram(sampler.indices, assign, 4)
    n_total = len(assign)
    # 4 x (1111 // 4 + 1) = 1112 draws, 1111 kept: every cluster gets 277 or 278
    assert hist.sum() == n_total
    assert np.all(np.abs(hist - n_total / 4) <= 0.01 * n_total / 4), hist


def test_released_sampler_is_proportional_to_cluster_size() -> None:
    assign = shuffled_labels(SKEWED_SIZES, seed=1)
    reassign = 20  # more samples: a tighter statistical check
    sampler = make_sampler("released", assign, reassign=reassign, seed=0)
    n_total = len(assign) * reassign
    hist = label_histogram(sampler.indices, assign, 4)
    expected = expected_released_counts(assign, n_total)
    assert hist.sum() == n_total
    assert np.all(np.abs(hist - expected) <= 5 * np.sqrt(expected) + 2), (hist, expected)
    # ... which is proportional to the cluster sizes in expectation over where the labels
    # fall (a small cluster's few members land in one or two blocks: loose tolerance)
    proportional = np.asarray(SKEWED_SIZES) / sum(SKEWED_SIZES)
    np.testing.assert_allclose(hist / n_total, proportional, atol=0.05)
    # ... and far from uniform
    assert hist[0] > 0.85 * n_total and hist[3] < 0.01 * n_total


def test_released_equals_uniform_when_images_are_already_sorted_by_cluster() -> None:
    assign = np.repeat(np.arange(4), SKEWED_SIZES)  # L is the identity
    uniform = make_sampler("uniform", assign, 1, seed=7)
    released = make_sampler("released", assign, 1, seed=7)
    np.testing.assert_array_equal(uniform.indices, released.indices)


def test_released_maps_draws_through_the_cluster_sorted_list() -> None:
    assign = np.array([1, 0, 1, 0, 2])  # L = [1, 3, 0, 2, 4]
    uniform = make_sampler("uniform", assign, 3, seed=5)
    released = make_sampler("released", assign, 3, seed=5)
    np.testing.assert_array_equal(released.indices, np.array([1, 3, 0, 2, 4])[uniform.indices])


def test_replacement_rule() -> None:
    assert uses_replacement(10, 10) and uses_replacement(3, 10) and not uses_replacement(11, 10)
    # N = 2000, m = 2 -> per = 1001 draws per cluster
    rng = np.random.default_rng(0)
    big, small = per_cluster_draws(cluster_lists(shuffled_labels((1002, 998))), 2000, rng)
    assert big.size == small.size == 1001
    assert np.unique(big).size == 1001  # 1002 > 1001 members: without replacement
    assert np.unique(small).size < 998  # 998 <= 1001: with replacement (duplicates)
    rng = np.random.default_rng(0)
    big, _ = per_cluster_draws(cluster_lists(shuffled_labels((1001, 999))), 2000, rng)
    assert np.unique(big).size < 1001  # exactly per members: with replacement


def test_draws_come_from_their_cluster_and_empty_clusters_are_skipped() -> None:
    assign = np.array([0, 0, 3, 3, 3, 0, 3, 3])  # clusters 1, 2 and 4 empty (k=5)
    lists = cluster_lists(assign, k=5)
    assert [m.tolist() for m in lists] == [[0, 1, 5], [], [], [2, 3, 4, 6, 7], []]
    draws = per_cluster_draws(lists, len(assign), np.random.default_rng(0))
    assert len(draws) == 2  # m = 2 non-empty clusters, 8 // 2 + 1 = 5 draws each
    assert set(draws[0]) <= {0, 1, 5} and set(draws[1]) <= {2, 3, 4, 6, 7}
    assert all(d.size == 5 for d in draws)
    sampler = make_sampler("uniform", assign, 1, seed=0, k=5)
    counts = np.bincount(assign[sampler.indices], minlength=5)
    assert counts[[0, 3]].tolist() in ([4, 4], [5, 3], [3, 5])  # 2 x 5 draws, 8 kept


def test_works_with_a_dataloader() -> None:
    assign = shuffled_labels((30, 20, 10))
    sampler = make_sampler("uniform", assign, 1, seed=0)
    batches = list(torch.utils.data.DataLoader(torch.arange(60), sampler=sampler, batch_size=16))
    assert torch.cat(batches).tolist() == sampler.indices.tolist()


def test_errors() -> None:
    assign = shuffled_labels((3, 2))
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("balanced", assign, 1, 0)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        make_sampler("uniform", np.array([], dtype=np.int64), 1, 0)
    with pytest.raises(ValueError, match=">= 0"):
        make_sampler("uniform", np.array([0, -1]), 1, 0)
    with pytest.raises(ValueError, match="integers"):
        make_sampler("uniform", np.array([0.0, 1.0]), 1, 0)
    with pytest.raises(ValueError, match="out of range"):
        make_sampler("uniform", np.array([0, 5]), 1, 0, k=3)
    with pytest.raises(ValueError, match="reassign"):
        make_sampler("uniform", assign, 0, 0)
