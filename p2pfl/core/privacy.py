"""Differential privacy: the update mechanism, and ε after every round from its inputs.

`privatize` is the participant-level mechanism, written once for every networked
role and the simulator: a peer's update (its model after local training minus the
model it started the round from) clipped to `clip` in L2, plus N(0, (σ·clip)²) per
coordinate; the peer then keeps and sends `start + noisy update`, so everything it
ever releases is a post-processing of noised updates. The noise key depends only on
(seed, peer, round): a resumed peer and the simulator draw the same noise.

Accounting: pure functions over Google's `dp-accounting`. A mechanism is described by a
`DpSchedule`: each round composes `steps` Gaussian mechanisms of noise multiplier
`sigma`, each applied to a random subset (Poisson with rate `q`, or `q = 1`: every
record / every participant, no amplification). ε at `delta` after r rounds is what the
RDP accountant (the default: tight enough, milliseconds per round) or the PLD
accountant (tighter, about a second per call) returns for r rounds composed. The
schedule is written next to the ε it gives, so anyone can recompute it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from p2pfl.core import streams

if TYPE_CHECKING:  # dp-accounting takes ~1.7 s to import: only a DP run pays for it
    import dp_accounting

Accountant = Literal["rdp", "pld"]
ACCOUNTANTS: tuple[Accountant, ...] = ("rdp", "pld")
MAX_SIGMA = 1e4  # calibration searches noise multipliers up to this


class DpSchedule(NamedTuple):
    """The accountant's inputs for one peer: per round, `steps` sampled Gaussians."""

    q: float  # sampling rate of each step (1.0: no subsampling)
    sigma: float  # noise multiplier: noise std / sensitivity (the clip norm)
    steps: int  # mechanisms composed per round
    delta: float

    def as_dict(self) -> dict[str, float | int]:
        """The inputs as JSON-ready values (what the run folder records)."""
        return {"q": self.q, "noise_multiplier": self.sigma, "steps_per_round": self.steps}


class Spent(NamedTuple):
    """A peer's privacy budget spent so far: ε at the run's δ after `steps` mechanisms,
    each sampled at rate `q` (what its history line records)."""

    epsilon: float
    steps: int
    q: float


def dp_sgd_schedule(n: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(Poisson sampling rate, steps per round) of DP-SGD on a peer with `n` samples:
    each step takes every row with probability batch_size / n (at most 1), and a round
    runs `local_epochs` × ceil(n / batch_size) steps. What the accountant composes."""
    n = max(int(n), 1)
    return min(1.0, batch_size / n), local_epochs * math.ceil(n / batch_size)


class DpPlan(NamedTuple):
    """The DP of one run. `mechanism = "dp_sgd"`: sample-level, inside local training
    (`learning.trainer`), q and steps per round from each peer's shard size
    (`dp_sgd_schedule`). `mechanism = "update"`: participant-level, one Gaussian per
    release.

    `where = "peer"` (local DP): each peer privatizes its own update (`privatize`), one
    release per round it trains in, no amplification (q = 1). `where = "server"`
    (central DP, centralized mode): peers send their models in clear to the server,
    which clips each update and noises their sum (`central_mean`); the server samples
    each peer with probability `q` (Poisson), so every peer composes one sampled
    Gaussian per round, sampled or not.
    """

    clip: float  # L2 bound on a peer's update
    sigma: float  # noise multiplier: the noise std is sigma * clip
    delta: float
    accountant: Accountant = "rdp"
    where: Literal["peer", "server"] = "peer"
    q: float = 1.0  # central: the server's Poisson sampling rate (centralized.fraction)
    mechanism: Literal["update", "dp_sgd"] = "update"
    batch_size: int = 0  # dp_sgd: the expected batch (each row taken w.p. batch / n)
    local_epochs: int = 0  # dp_sgd: epochs of steps per round

    def schedule(self) -> DpSchedule:
        """One (sampled) Gaussian per step: what the peer's ε composes."""
        return DpSchedule(self.q, self.sigma, 1, self.delta)

    def as_dict(self) -> dict[str, Any]:
        """The settings and the accountant's inputs, as `summary.json` records them: ε
        after k steps is the accountant's for k steps of (q, noise_multiplier)."""
        steps = (
            "one per round the peer trains in (its releases)"
            if self.where == "peer"
            else "one per round (every peer, sampled or not: Poisson amplification)"
        )
        extra: dict[str, Any] = {}
        if self.mechanism == "dp_sgd":
            steps = "local_epochs * ceil(n_local / batch_size) per round the peer trains in"
            extra = {
                "q": "batch_size / n_local per peer (Poisson): dp_q in its history lines",
                "steps_per_round": steps,
                "batch_size": self.batch_size,
                "local_epochs": self.local_epochs,
            }
        return {
            "mechanism": self.mechanism,
            "where": self.where,
            "clip": self.clip,
            "noise_multiplier": self.sigma,
            "delta": self.delta,
            "accountant": self.accountant,
            **self.schedule().as_dict(),
            "steps": steps,
            **extra,
        }


@functools.lru_cache(maxsize=4096)
def release_epsilon(dp: DpPlan, steps: int) -> float:
    """A peer's ε at `dp.delta` after `steps` steps of the mechanism (`schedule`)."""
    return epsilon(dp.q, dp.sigma, steps, dp.delta, dp.accountant)


def spent(dp: DpPlan, releases: int, round_: int, n: int = 0) -> Spent:
    """A peer's budget after round `round_`, `releases` rounds trained, `n` samples:
    DP-SGD composes its rounds' steps at rate batch / n; local update DP its releases;
    central DP every round so far (sampled or not, amplified by the sampling)."""
    if dp.mechanism == "dp_sgd":
        q, per_round = dp_sgd_schedule(n, dp.batch_size, dp.local_epochs)
        steps = releases * per_round
        return Spent(epsilon(q, dp.sigma, steps, dp.delta, dp.accountant), steps, q)
    steps = releases if dp.where == "peer" else round_
    return Spent(release_epsilon(dp, steps), steps, dp.q)


def central_mean(
    global_: ArrayLike, models: ArrayLike, dp: DpPlan, expected: float, key: jax.Array
) -> jax.Array:
    """Central DP FedAvg (McMahan et al. 2018): `global + (Σ clip(m_i - global) +
    N(0, (σ·clip)²)) / expected`, the denominator fixed (q × the peers live when the
    round was sampled) so one peer changes the sum by at most `clip`."""
    g = jnp.asarray(global_, jnp.float32)
    m = jnp.asarray(models, jnp.float32).reshape(-1, g.shape[0])
    return _central(g, m, jnp.float32(dp.clip), jnp.float32(dp.sigma), jnp.float32(expected), key)


@jax.jit
def _central(
    g: jax.Array,
    m: jax.Array,
    clip: jax.Array,
    sigma: jax.Array,
    expected: jax.Array,
    key: jax.Array,
) -> jax.Array:
    clipped = jax.vmap(lambda u: clip_l2(u, clip))(m - g)
    noise = sigma * clip * jax.random.normal(key, g.shape, jnp.float32)
    return g + (clipped.sum(axis=0) + noise) / jnp.maximum(expected, 1e-12)


def noise_key(seed: int, peer: ArrayLike, round_: ArrayLike) -> jax.Array:
    """The key of peer `peer`'s round-`round_` DP noise (vmappable over peers)."""
    base = jax.random.fold_in(jax.random.PRNGKey(seed), streams.DP_KEY)
    return jax.random.fold_in(jax.random.fold_in(base, peer), round_)


def clip_l2(update: jax.Array, clip: ArrayLike) -> jax.Array:
    """`update` scaled down to L2 norm `clip` when it is longer (unchanged otherwise)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(update)))
    return update * jnp.minimum(1.0, jnp.float32(clip) / jnp.maximum(norm, 1e-30))


@jax.jit
def _privatize(
    start: jax.Array, trained: jax.Array, clip: jax.Array, sigma: jax.Array, key: jax.Array
) -> jax.Array:
    update = clip_l2(trained - start, clip)
    noise = jax.random.normal(key, start.shape, jnp.float32)
    return start + update + sigma * clip * noise


def privatize(start: ArrayLike, trained: ArrayLike, dp: DpPlan, key: jax.Array) -> jax.Array:
    """`start + clip(trained - start) + N(0, (σ·clip)²)`: the model a DP peer keeps and sends."""
    return _privatize(
        jnp.asarray(start, jnp.float32),
        jnp.asarray(trained, jnp.float32),
        jnp.float32(dp.clip),
        jnp.float32(dp.sigma),
        key,
    )


_privatize_many = jax.jit(jax.vmap(_privatize, in_axes=(0, 0, None, None, 0)))


def privatize_many(
    start: jax.Array, trained: jax.Array, dp: DpPlan, seed: int, peers: ArrayLike, round_: int
) -> jax.Array:
    """`privatize` for the peers `peers` at once (rows of `start` / `trained`), each
    with its own (seed, peer, round) noise: the same values as one call per peer."""
    keys = jax.vmap(lambda peer: noise_key(seed, peer, round_))(jnp.asarray(peers))
    return _privatize_many(
        jnp.asarray(start, jnp.float32),
        jnp.asarray(trained, jnp.float32),
        jnp.float32(dp.clip),
        jnp.float32(dp.sigma),
        keys,
    )


def _step(q: float, sigma: float) -> Any:
    from dp_accounting import dp_event

    gaussian = dp_event.GaussianDpEvent(sigma)
    return gaussian if q >= 1.0 else dp_event.PoissonSampledDpEvent(q, gaussian)


def _fresh(accountant: Accountant) -> dp_accounting.PrivacyAccountant:
    from dp_accounting import pld, rdp

    if accountant == "rdp":
        return rdp.RdpAccountant()
    if accountant == "pld":
        return pld.PLDAccountant()
    raise ValueError(f"unknown accountant {accountant!r}; expected one of {ACCOUNTANTS}")


@functools.lru_cache(maxsize=256)
def _rdp_per_step(q: float, sigma: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """dp-accounting's RDP orders and one step's RDP at each (the slow part: fractional
    orders at a large q take seconds); k steps compose to k times it, exactly."""
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant()
    with _quiet_absl():
        acc.compose(_step(q, sigma))
    return tuple(acc._orders), tuple(float(x) for x in acc._rdp)


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp-accounting warns through absl for every RDP order whose series does not
    converge (that order is left out, as it should be): not for our users' terminals."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=8192)
def epsilon(
    q: float, sigma: float, steps: int, delta: float, accountant: Accountant = "rdp"
) -> float:
    """ε at `delta` after `steps` Poisson-sampled Gaussian mechanisms (0 steps: 0).

    RDP: the same orders and conversion as dp-accounting's `RdpAccountant`, with one
    step's RDP computed once per (q, σ) and scaled by `steps` (what composition is),
    so a peer's ε every round costs microseconds. PLD: a fresh accountant per call.
    """
    if steps <= 0:
        return 0.0
    if accountant == "rdp":
        from dp_accounting.rdp import rdp_privacy_accountant

        orders, per_step = _rdp_per_step(q, sigma)
        rdp = [steps * x for x in per_step]
        return float(rdp_privacy_accountant.compute_epsilon(orders, rdp, delta)[0])
    from dp_accounting import dp_event

    acc = _fresh(accountant)
    with _quiet_absl():
        acc.compose(dp_event.SelfComposedDpEvent(_step(q, sigma), steps))
        return float(acc.get_epsilon(delta))


def epsilons(
    schedule: DpSchedule, rounds: Iterable[int], accountant: Accountant = "rdp"
) -> list[float]:
    """ε after each of the given round counts (increasing)."""
    out, last = [], 0
    for r in rounds:
        if r < last:
            raise ValueError("round counts must not decrease")
        last = r
        steps = r * schedule.steps
        out.append(epsilon(schedule.q, schedule.sigma, steps, schedule.delta, accountant))
    return out


def calibrate(
    target_epsilon: float,
    q: float,
    steps: int,
    delta: float,
    accountant: Accountant = "rdp",
) -> float:
    """The smallest noise multiplier whose ε after `steps` steps is at most the target.

    Raises ValueError when even `MAX_SIGMA` does not reach it (or nothing is released).
    """
    import dp_accounting
    from dp_accounting import dp_event

    if steps <= 0:
        raise ValueError("nothing is released: no steps to calibrate over")
    if epsilon(q, MAX_SIGMA, steps, delta, accountant) > target_epsilon:
        raise ValueError(
            f"target ε = {target_epsilon:g} cannot be met at δ = {delta:g} over {steps} steps "
            f"(sampling rate {q:g}) with any noise multiplier up to {MAX_SIGMA:g}"
        )
    with _quiet_absl():
        return float(
            dp_accounting.calibrate_dp_mechanism(
                lambda: _fresh(accountant),
                lambda sigma: dp_event.SelfComposedDpEvent(_step(q, sigma), steps),
                target_epsilon,
                delta,
                bracket_interval=dp_accounting.ExplicitBracketInterval(1e-3, MAX_SIGMA),
            )
        )
