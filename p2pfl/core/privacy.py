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

import functools
from collections.abc import Iterable
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
    """A peer's privacy budget spent so far: ε at the run's δ after `steps` mechanisms."""

    epsilon: float
    steps: int


class UpdateDp(NamedTuple):
    """Participant-level DP of one run: each release is one Gaussian mechanism.

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
        return {
            "mechanism": "update",
            "where": self.where,
            "clip": self.clip,
            "noise_multiplier": self.sigma,
            "delta": self.delta,
            "accountant": self.accountant,
            **self.schedule().as_dict(),
            "steps": steps,
        }


@functools.lru_cache(maxsize=4096)
def release_epsilon(dp: UpdateDp, steps: int) -> float:
    """A peer's ε at `dp.delta` after `steps` steps of the mechanism (`schedule`)."""
    return epsilon(dp.q, dp.sigma, steps, dp.delta, dp.accountant)


def spent(dp: UpdateDp, releases: int, round_: int) -> Spent:
    """A peer's budget after round `round_`: local DP composes its `releases`, central
    DP every round so far (sampled or not, amplified by the sampling)."""
    steps = releases if dp.where == "peer" else round_
    return Spent(release_epsilon(dp, steps), steps)


def central_mean(
    global_: ArrayLike, models: ArrayLike, dp: UpdateDp, expected: float, key: jax.Array
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


def privatize(start: ArrayLike, trained: ArrayLike, dp: UpdateDp, key: jax.Array) -> jax.Array:
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
    start: jax.Array, trained: jax.Array, dp: UpdateDp, seed: int, peers: ArrayLike, round_: int
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


def epsilon(
    q: float, sigma: float, steps: int, delta: float, accountant: Accountant = "rdp"
) -> float:
    """ε at `delta` after `steps` Poisson-sampled Gaussian mechanisms (0 steps: 0)."""
    if steps <= 0:
        return 0.0
    from dp_accounting import dp_event

    acc = _fresh(accountant)
    acc.compose(dp_event.SelfComposedDpEvent(_step(q, sigma), steps))
    return float(acc.get_epsilon(delta))


def epsilons(
    schedule: DpSchedule, rounds: Iterable[int], accountant: Accountant = "rdp"
) -> list[float]:
    """ε after each of the given round counts (increasing), composing incrementally."""
    from dp_accounting import dp_event

    acc = _fresh(accountant)
    step = _step(schedule.q, schedule.sigma)
    done, out = 0, []
    for r in rounds:
        if r < done:
            raise ValueError("round counts must not decrease")
        if r > done:
            acc.compose(dp_event.SelfComposedDpEvent(step, (r - done) * schedule.steps))
            done = r
        out.append(float(acc.get_epsilon(schedule.delta)) if done else 0.0)
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
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: _fresh(accountant),
            lambda sigma: dp_event.SelfComposedDpEvent(_step(q, sigma), steps),
            target_epsilon,
            delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(1e-3, MAX_SIGMA),
        )
    )
