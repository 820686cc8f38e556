"""Gossip maths: one round's mixing of the models that arrived, as a pure function.

Kept apart from the loop that moves bytes so tests (and a future in-process backend)
can use it without sockets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np


class Mixed(NamedTuple):
    """The mixed model and the local consensus estimate."""

    params: np.ndarray
    disagreement: float  # ||own - mean(own and received)||, before mixing


def mix(own: np.ndarray, received: Mapping[int, np.ndarray], weights: Mapping[int, float]) -> Mixed:
    """x_i <- w_ii x_i + sum_j w_ij x_j over the neighbours heard this round.

    A neighbour not heard from leaves its weight with the peer itself (w_ii = 1 - sum
    of the heard weights), so each row still sums to one and, when both ends of an
    edge miss each other, the network mean is preserved.
    """
    acc = own.astype(np.float64) * (1.0 - sum(weights[j] for j in received))
    total = own.astype(np.float64)
    for j, x in received.items():
        acc += weights[j] * x
        total += x
    mean = total / (1 + len(received))
    return Mixed(acc.astype(np.float32), float(np.linalg.norm(own - mean)))
