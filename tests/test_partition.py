"""Partitioners: holdout and shards are disjoint, cover the pool, and depend on the seed."""

from __future__ import annotations

import numpy as np
import pytest

from p2pfl.learning import partition
from p2pfl.learning.partition import holdout_split, min_pool, pool_size, split, train_test

PARTITIONS = ["iid", "dirichlet", "shards"]


def _labels(n: int = 1797, classes: int = 10, seed: int = 0) -> np.ndarray:
    """Digits-sized label vector with every class present."""
    return np.random.default_rng(seed).integers(0, classes, size=n).astype(np.int32)


def _assert_disjoint_cover(parts: list[np.ndarray], pool: np.ndarray) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)), "a sample is in two shards"
    np.testing.assert_array_equal(np.sort(joined), np.sort(pool))


def test_holdout_split_is_disjoint_and_covers_everything():
    """holdout_split returns a pool and a holdout that partition 0..n-1."""
    pool, holdout = holdout_split(1000, 0.2, seed=3)
    assert len(holdout) == 200
    assert len(np.intersect1d(pool, holdout)) == 0
    np.testing.assert_array_equal(np.sort(np.r_[pool, holdout]), np.arange(1000))


def test_holdout_is_the_same_for_every_partition():
    """The common holdout depends only on the seed and fraction, not on how shards are cut."""
    labels = _labels()
    holdouts = [split(labels, 8, p, seed=4, test_fraction=0.2).holdout for p in PARTITIONS]
    for h in holdouts[1:]:
        np.testing.assert_array_equal(h, holdouts[0])


@pytest.mark.parametrize("peers", [2, 3, 8, 13, 50])
def test_iid_shards_disjoint_cover_equal_sizes(peers):
    """IID shards are disjoint, cover the pool, and their sizes differ by at most one."""
    labels = _labels()
    s = split(labels, peers, "iid", seed=0, test_fraction=0.2)
    pool, _ = holdout_split(len(labels), 0.2, 0)
    assert len(s.shards) == peers
    _assert_disjoint_cover(s.shards, pool)
    sizes = [len(x) for x in s.shards]
    assert max(sizes) - min(sizes) <= 1


def test_iid_helper_directly():
    """iid() on an arbitrary pool splits exactly that pool."""
    pool = np.arange(100, 137)
    parts = partition.iid(pool, 4, np.random.default_rng(0))
    _assert_disjoint_cover(parts, pool)
    assert sorted(len(p) for p in parts) == [9, 9, 9, 10]


@pytest.mark.parametrize("kind", PARTITIONS)
@pytest.mark.parametrize("peers", [2, 8, 20])
def test_shards_disjoint_from_holdout_and_cover_pool(kind, peers):
    """For every partition, shards avoid the holdout and together cover the pool exactly."""
    labels = _labels()
    s = split(labels, peers, kind, seed=1, test_fraction=0.25, alpha=0.3, shards_per_peer=2)
    pool, holdout = holdout_split(len(labels), 0.25, 1)
    np.testing.assert_array_equal(s.holdout, holdout)
    for shard in s.shards:
        assert len(np.intersect1d(shard, s.holdout)) == 0
    _assert_disjoint_cover(s.shards, pool)


@pytest.mark.parametrize("kind", PARTITIONS)
@pytest.mark.parametrize("peers", [2, 8, 32, 100])
def test_every_peer_has_at_least_two_samples(kind, peers):
    """Each peer gets at least two samples (one to train on, one to test on)."""
    s = split(_labels(), peers, kind, seed=2, test_fraction=0.2, alpha=0.05, shards_per_peer=2)
    assert min(len(x) for x in s.shards) >= 2


@pytest.mark.parametrize("kind", PARTITIONS)
def test_split_is_deterministic_in_seed(kind):
    """The same seed gives the same split; another seed gives a different one."""
    labels = _labels()
    a = split(labels, 8, kind, seed=7, test_fraction=0.2)
    b = split(labels, 8, kind, seed=7, test_fraction=0.2)
    c = split(labels, 8, kind, seed=8, test_fraction=0.2)
    np.testing.assert_array_equal(a.holdout, b.holdout)
    for x, y in zip(a.shards, b.shards, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.holdout, c.holdout)
    assert any(not np.array_equal(x, y) for x, y in zip(a.shards, c.shards, strict=True))


def test_dirichlet_small_alpha_skews_labels():
    """With small alpha most peers see few classes; with large alpha label mixes are even."""
    labels = _labels(n=5000)

    def mean_classes(alpha: float) -> float:
        s = split(labels, 10, "dirichlet", seed=0, test_fraction=0.2, alpha=alpha)
        return float(np.mean([len(np.unique(labels[x])) for x in s.shards]))

    assert mean_classes(0.05) < 5
    assert mean_classes(100.0) == 10


def test_shards_partition_gives_each_peer_few_labels():
    """The shards partition (sorted by label, 2 shards per peer) leaves each peer ≤ 4 classes."""
    labels = _labels(n=2000)
    s = split(labels, 10, "shards", seed=0, test_fraction=0.2, shards_per_peer=2)
    assert max(len(np.unique(labels[x])) for x in s.shards) <= 4


def test_shards_are_sorted_index_arrays():
    """Shards come back as sorted int index arrays usable for fancy indexing."""
    s = split(_labels(), 4, "dirichlet", seed=0, test_fraction=0.2)
    for x in s.shards:
        assert np.issubdtype(x.dtype, np.integer)
        assert (np.diff(x) > 0).all()


@pytest.mark.parametrize("size", [2, 3, 10, 101])
def test_train_test_split_of_a_shard(size):
    """A peer's own train/test split is disjoint, covers its shard and keeps both non-empty."""
    shard = np.arange(1000, 1000 + size)
    train, test = train_test(shard, 0.2, seed=0, peer=3)
    assert len(train) >= 1 and len(test) >= 1
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.sort(np.r_[train, test]), shard)


def test_train_test_depends_on_peer_and_seed():
    """Different peers with the same shard draw different train/test splits, deterministically."""
    shard = np.arange(200)
    a = train_test(shard, 0.2, seed=0, peer=1)
    b = train_test(shard, 0.2, seed=0, peer=1)
    c = train_test(shard, 0.2, seed=0, peer=2)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("kind", PARTITIONS)
@pytest.mark.parametrize("per_peer", [1, 2, 5])
def test_smallest_allowed_pool_still_gives_two_each(kind, per_peer):
    """At the smallest pool min_pool() allows, every peer still gets at least two samples."""
    peers, need = 8, min_pool(8, kind, per_peer)
    n = next(n for n in range(need, 10 * need) if pool_size(n, 0.2) >= need)
    labels = np.arange(n) % 3
    for seed in range(5):
        s = split(labels, peers, kind, seed, 0.2, alpha=0.05, shards_per_peer=per_peer)
        assert min(len(x) for x in s.shards) >= 2, (seed, [len(x) for x in s.shards])


@pytest.mark.parametrize("kind", PARTITIONS)
def test_split_refuses_a_pool_too_small_for_the_peers(kind):
    """A pool that cannot give every peer two samples is refused, not silently starved."""
    labels = np.arange(10) % 4  # pool of 8 for 8 peers
    with pytest.raises(ValueError, match="at least two"):
        split(labels, 8, kind, seed=0, test_fraction=0.2)


def test_pool_size_matches_holdout_split():
    """pool_size() predicts the pool holdout_split() actually leaves."""
    for n, fraction in [(1797, 0.2), (5000, 0.1), (10, 0.25), (101, 0.5)]:
        pool, _ = holdout_split(n, fraction, seed=0)
        assert len(pool) == pool_size(n, fraction)
