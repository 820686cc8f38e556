"""Split a dataset into a common holdout set and one shard per peer, from the seed alone.

Every peer runs the same deterministic computation and keeps its own part, so no
data ever moves and any peer's shard can be recomputed for tests.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

from p2pfl.core import streams

Partition = Literal["iid", "dirichlet", "shards"]


class Split(NamedTuple):
    """Indices into the dataset: the common holdout, and each peer's shard."""

    holdout: np.ndarray
    shards: list[np.ndarray]


def holdout_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool, holdout) index arrays: a seeded random `test_fraction` is held out."""
    perm = streams.rng(seed, streams.HOLDOUT).permutation(n)
    cut = round(n * test_fraction)
    return np.sort(perm[cut:]), np.sort(perm[:cut])


def iid(pool: np.ndarray, peers: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Equal random shards (sizes differ by at most one)."""
    return [np.sort(s) for s in np.array_split(rng.permutation(pool), peers)]


def dirichlet(
    pool: np.ndarray, labels: np.ndarray, peers: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per class, proportions over peers drawn from Dirichlet(alpha): small alpha, skewed labels.

    Every peer is guaranteed at least two samples, taken from the largest shards.
    """
    parts: list[list[int]] = [[] for _ in range(peers)]
    for c in np.unique(labels[pool]):
        members = rng.permutation(pool[labels[pool] == c])
        cuts = (np.cumsum(rng.dirichlet([alpha] * peers)) * len(members)).astype(int)[:-1]
        for peer, chunk in enumerate(np.split(members, cuts)):
            parts[peer].extend(chunk.tolist())
    for peer in range(peers):
        while len(parts[peer]) < 2:
            donor = max(range(peers), key=lambda p: len(parts[p]))
            parts[peer].append(parts[donor].pop())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def shards(
    pool: np.ndarray, labels: np.ndarray, peers: int, per_peer: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Sort by label, cut into peers*per_peer shards, deal them out at random (McMahan et al.)."""
    ordered = pool[np.argsort(labels[pool], kind="stable")]
    pieces = np.array_split(ordered, peers * per_peer)
    order = rng.permutation(len(pieces))
    return [np.sort(np.concatenate([pieces[k] for k in order[p::peers]])) for p in range(peers)]


def pool_size(n: int, test_fraction: float) -> int:
    """How many of `n` samples remain for the peers' shards after the holdout."""
    return n - round(n * test_fraction)


def min_pool(peers: int, partition: Partition, shards_per_peer: int = 2) -> int:
    """Fewest pool samples that give every peer at least two (one to train, one to test)."""
    return max(2 * peers, peers * shards_per_peer) if partition == "shards" else 2 * peers


def split(
    labels: np.ndarray,
    peers: int,
    partition: Partition,
    seed: int,
    test_fraction: float,
    alpha: float = 0.5,
    shards_per_peer: int = 2,
) -> Split:
    """The whole split; each peer takes `shards[its id]`."""
    pool, holdout = holdout_split(len(labels), test_fraction, seed)
    need = min_pool(peers, partition, shards_per_peer)
    if len(pool) < need:
        raise ValueError(
            f"{len(pool)} samples outside the holdout cannot give {peers} peers at least two "
            f"each with the {partition!r} partition (need {need})"
        )
    rng = streams.rng(seed, streams.SPLIT)
    if partition == "iid":
        parts = iid(pool, peers, rng)
    elif partition == "dirichlet":
        parts = dirichlet(pool, labels, peers, alpha, rng)
    else:
        parts = shards(pool, labels, peers, shards_per_peer, rng)
    return Split(holdout, parts)


def test_size(n: int, test_fraction: float) -> int:
    """How many of a shard's `n` samples its peer keeps to test on (at least one)."""
    return min(n - 1, max(1, round(n * test_fraction)))


def train_test(
    indices: np.ndarray, test_fraction: float, seed: int, peer: int
) -> tuple[np.ndarray, np.ndarray]:
    """A peer's own (train, test) split of its shard; test keeps at least one sample."""
    perm = streams.rng(seed, streams.PEER_TEST, peer).permutation(indices)
    cut = test_size(len(perm), test_fraction)
    return perm[cut:], perm[:cut]


def padded_sizes(shard_sizes: list[int], test_fraction: float) -> tuple[int, int]:
    """(train, test) lengths every peer pads its own split to: the largest of any peer.

    Shapes shared by all peers let one compiled train step serve them all.
    """
    tests = [test_size(n, test_fraction) for n in shard_sizes]
    return max(n - t for n, t in zip(shard_sizes, tests, strict=True)), max(tests)
