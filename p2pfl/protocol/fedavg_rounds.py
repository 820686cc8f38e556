"""A FedAvg round's values and pure decisions: the server's settings, who is sampled, what
an update must carry, why a round closed, and the updates as the aggregator takes them.

The server machine (`fedavg_server`) applies these; the simulator can call the same
functions, so both sample and close rounds alike.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from p2pfl.core.streams import SAMPLE, rng
from p2pfl.protocol import wire

if TYPE_CHECKING:
    from p2pfl.protocol.secagg_server import SecureSum

MAX_SAMPLES = 2**31 - 1  # largest sample count an update may claim
ClosedBy = Literal["all_in", "early", "deadline", "quorum_missed"]


@dataclass(frozen=True)
class Update:
    """An accepted update: the peer's model, its sample count and its reported loss."""

    params: wire.Chunked | np.ndarray
    samples: int
    loss: float | None


@dataclass(frozen=True)
class ClosedRound:
    """A round the server closed, waiting for the runtime to aggregate and record it.

    `updates` are in arrival order; `weights` are the FedAvg weights of the updates to
    aggregate (empty when `quorum_missed`: the global model is kept). `started` is the
    `now` the round's start_round went out at. A secure round's updates are masked
    (uint32, never to be averaged): `secure` unmasks their weighted mean, and
    `secure_failure` says why a secure round closed `quorum_missed`.
    """

    round: int
    closed_by: ClosedBy
    sampled: tuple[int, ...]
    connected: tuple[int, ...]
    updates: Mapping[int, Update]
    weights: Mapping[int, float]
    started: float
    quorum_wait_s: float
    last: bool
    secure: SecureSum | None = None
    secure_failure: str | None = None

    @property
    def participants(self) -> list[int]:
        """The peers whose update went into the new global model."""
        return sorted(self.updates) if self.closed_by != "quorum_missed" else []

    @property
    def missing(self) -> list[int]:
        """Sampled peers whose update did not go into the global model."""
        return sorted(set(self.sampled) - set(self.participants))

    @property
    def train_loss(self) -> float | None:
        """The sample-weighted mean of the losses the participants reported, if any."""
        losses = [(u.samples, u.loss) for u in self.updates.values() if u.loss is not None]
        if not losses or self.closed_by == "quorum_missed":
            return None
        return sum(n * x for n, x in losses) / sum(n for n, _ in losses)


@dataclass(frozen=True)
class ServerConfig:
    """What the server decides with: plain values (the runtime builds them from a scenario)."""

    peers: int  # peer ids are 0 .. peers - 1
    rounds: int
    seed: int
    min_peers: int  # fresh peers needed before a round starts
    fraction: float = 1.0  # share of the fresh peers sampled per round
    min_updates: int = 1  # updates a round closed at its deadline needs
    round_timeout_s: float = 30.0
    startup_timeout_s: float = 60.0  # longest wait for min_peers before a round
    heartbeat_s: float = 0.5
    peer_timeout_s: float = 10.0  # a peer silent this long is not sampled, nor heartbeated
    coordinator_timeout_s: float = 10.0  # the peers' patience: the bye wait is at least this
    weighting: Literal["samples", "uniform"] = "samples"
    poisson: bool = False  # central DP: each peer sampled independently (see `sample`)
    secagg_range: float | None = None  # secure aggregation: each coordinate's |Δ| bound


def sample_size(n: int, fraction: float, min_updates: int) -> int:
    """How many of `n` fresh peers a round samples (without Poisson sampling)."""
    return min(n, max(min_updates, math.ceil(fraction * n)))


def sample(
    live: Sequence[int],
    round_: int,
    *,
    seed: int,
    fraction: float,
    min_updates: int,
    poisson: bool = False,
) -> tuple[int, ...]:
    """Round `round_`'s sample of the fresh peers `live` (sorted), reproducibly.

    k = min(n, max(min_updates, ceil(fraction * n))) of the n, drawn without replacement
    from the numpy stream `[seed, SAMPLE, round]`; returned sorted. With `poisson`
    (central DP) each peer is taken independently with probability `fraction`, from
    the same stream: the sample size varies, as the accountant's amplification needs.
    """
    if poisson:
        taken = rng(seed, SAMPLE, round_).random(len(live)) < fraction
        return tuple(sorted(int(i) for i, t in zip(live, taken, strict=True) if t))
    k = sample_size(len(live), fraction, min_updates)
    draw = rng(seed, SAMPLE, round_).choice(list(live), size=k, replace=False)
    return tuple(sorted(int(i) for i in draw))


def close_reason(
    updates: Collection[int], sampled: Collection[int], expected: Collection[int], min_updates: int
) -> ClosedBy:
    """Why a round closes with these updates in (it closes once nothing `expected` is
    missing, or at its deadline)."""
    if len(updates) < min_updates:
        return "quorum_missed"
    if len(updates) == len(sampled):
        return "all_in"
    if set(expected) <= set(updates):
        return "early"  # the others left, restarted or could not be reached
    return "deadline"


def parse_update(msg: wire.Message) -> Update | str:
    """An update's params, sample count and loss, or why it is dropped."""
    samples, loss = msg.meta.get("samples"), msg.meta.get("loss")
    if "params" not in msg.arrays:
        return "update without params"
    if not (wire.is_int(samples) and 1 <= samples <= MAX_SAMPLES):
        return "meta.samples missing or out of range"
    if loss is not None and not (isinstance(loss, float) and math.isfinite(loss)):
        return "meta.loss is not a finite float"
    return Update(msg.arrays["params"], samples, loss)


def stack_updates(closed: ClosedRound) -> tuple[np.ndarray, np.ndarray]:
    """The round's updates as `[n, d]` and their weights as `[n]`, in peer id order (what
    `core.aggregators.server_aggregator` takes; the order keeps results independent of
    arrival order)."""
    ids: Sequence[int] = sorted(closed.weights)
    updates = np.stack([np.ravel(np.asarray(closed.updates[j].params)) for j in ids])
    return updates, np.array([closed.weights[j] for j in ids])
