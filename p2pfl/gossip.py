"""Gossip maths: one round's mixing of the models that arrived, as a pure function.

Kept apart from the loop that moves bytes so tests (and a future in-process backend)
can use it without sockets. Received models come as `wire.Chunked` (read-only views on
the frames they arrived in, never joined into one array: see `wire`) or as plain
arrays; `mix` reads each one once, chunk by chunk, into float64 accumulators.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np

from p2pfl.wire import Chunked

Model = np.ndarray | Chunked  # a flat parameter vector, joined or as received


class Mixed(NamedTuple):
    """The mixed model and the local consensus estimate."""

    params: np.ndarray
    disagreement: float  # ||own - mean(own and received)||, before mixing


def _pieces(x: Model, size: int) -> Iterable[tuple[slice, np.ndarray]]:
    """(where in the flat vector, values) for each chunk of a model of `size` elements."""
    chunks = x.chunks if isinstance(x, Chunked) else (np.ravel(x),)
    if sum(c.size for c in chunks) != size:
        raise ValueError(f"a received model has {x.size} elements, ours has {size}")
    start = 0
    for c in chunks:
        yield slice(start, start + c.size), c
        start += c.size


def _add_weighted(
    acc: np.ndarray,
    x: Model,
    w: float,
    scratch: np.ndarray,
    plain: np.ndarray | None = None,
) -> np.ndarray:
    """acc += w x (and plain += x), chunk by chunk in float64; returns the scratch buffer."""
    for where, chunk in _pieces(x, acc.size):
        if scratch.size < chunk.size:
            scratch = np.empty(chunk.size)
        tmp = scratch[: chunk.size]
        np.multiply(chunk, w, out=tmp, dtype=np.float64)
        acc[where] += tmp
        if plain is not None:
            plain[where] += chunk
    return scratch


def mix(own: np.ndarray, received: Mapping[int, Model], weights: Mapping[int, float]) -> Mixed:
    """x_i <- w_ii x_i + sum_j w_ij x_j over the neighbours heard this round.

    A neighbour not heard from leaves its weight with the peer itself (w_ii = 1 - sum
    of the heard weights), so each row still sums to one and, when both ends of an
    edge miss each other, the network mean is preserved. Sums are kept in float64 and
    each received model is read once, chunk by chunk, with one chunk-sized scratch
    buffer: no received model is ever joined or copied whole.
    """
    flat = np.ravel(own)
    acc = flat.astype(np.float64)  # becomes w_ii x_i + sum_j w_ij x_j
    acc *= 1.0 - sum(weights[j] for j in received)
    total = flat.astype(np.float64)  # becomes x_i + sum_j x_j
    scratch = np.empty(0)
    for j, x in received.items():
        scratch = _add_weighted(acc, x, weights[j], scratch, total)
    total /= 1 + len(received)  # the local mean
    total -= flat
    disagreement = float(np.linalg.norm(total))
    return Mixed(acc.astype(np.float32).reshape(own.shape), disagreement)


def weighted_mean(models: Mapping[int, Model], weights: Mapping[int, float]) -> np.ndarray:
    """sum_j w_j x_j / sum_j w_j over the models that arrived: the FedAvg server's step.

    Like `mix`, each model is read once, chunk by chunk, into a float64 accumulator; with
    the weights of a full graph's Metropolis–Hastings matrix this is the same arithmetic
    as a gossip peer's mix, which is what makes the two modes comparable bit for bit.
    """
    if not models:
        raise ValueError("no models to average")
    total = sum(weights[j] for j in models)
    if not total > 0:
        raise ValueError(f"weights sum to {total}, not a positive number")
    acc = np.zeros(next(iter(models.values())).size, np.float64)
    scratch = np.empty(0)
    for j in sorted(models):  # a fixed order: the result must not depend on arrival order
        scratch = _add_weighted(acc, models[j], weights[j] / total, scratch)
    return acc.astype(np.float32)
