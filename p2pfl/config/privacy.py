"""`[privacy]` resolved: the DP mechanism a run's peers apply, its noise calibrated.

With `target_epsilon`, the noise multiplier is the smallest one whose ε after the
scenario's rounds (one step per round: the most a peer can spend; sampled at
`centralized.fraction` for central DP) is at most the target at the run's δ. DP-SGD's
q and steps depend on each peer's shard size, so it is calibrated for the worst-placed
peer: the largest σ any shard size needs, so that every peer ends at or under the
target. The calibration runs once per process (cached) and an unreachable target is a
ScenarioError naming the field.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from p2pfl.config.schema import Scenario, ScenarioError
from p2pfl.core.privacy import Accountant, DpPlan, calibrate, dp_sgd_schedule, epsilon, spent

_SIZES: dict[str, list[int]] = {}  # scenario digest -> its distinct shard sizes


@functools.lru_cache(maxsize=16)
def _calibrated(
    target: float, q: float, releases: int, delta: float, accountant: Accountant
) -> float:
    try:
        return calibrate(target, q, releases, delta, accountant)
    except ValueError as exc:
        raise ScenarioError(f"privacy.target_epsilon = {target:g}: {exc}") from None


def shard_sizes(s: Scenario) -> list[int]:
    """The distinct training-shard sizes of the scenario's peers (loads the data once)."""
    key = s.digest()
    if key not in _SIZES:
        from p2pfl.config.learning import data_spec
        from p2pfl.learning.local import host_data

        host, _ = host_data(data_spec(s), list(range(s.peers)))
        _SIZES[key] = sorted({int(n) for n in host.n_train})
    return _SIZES[key]


def _dp_sgd_sigma(s: Scenario, target: float, delta: float, accountant: Accountant) -> float:
    """The smallest noise multiplier that keeps every peer's DP-SGD ε after the run's
    rounds at most `target`: calibrated for the schedule (q, steps) that spends the most,
    then raised for any other schedule still above the target."""
    t, rounds = s.training, s.training.rounds
    schedules = sorted({dp_sgd_schedule(n, t.batch_size, t.local_epochs) for n in shard_sizes(s)})

    def eps(qk: tuple[float, int], sigma: float) -> float:
        return epsilon(qk[0], sigma, qk[1] * rounds, delta, accountant)

    worst = max(schedules, key=lambda qk: eps(qk, 1.0))
    sigma = _calibrated(target, worst[0], worst[1] * rounds, delta, accountant)
    for _ in schedules:
        over = [qk for qk in schedules if eps(qk, sigma) > target * (1 + 1e-6)]
        if not over:
            break
        sigma = max(_calibrated(target, q, k * rounds, delta, accountant) for q, k in over)
    return sigma


def privacy_settings(s: Scenario) -> dict[str, Any] | None:
    """What `summary.json` records of the run's DP (None without it)."""
    dp = dp_plan(s)
    return None if dp is None else dp.as_dict()


def dp_plan(s: Scenario) -> DpPlan | None:
    """The run's participant-level DP (`mechanism = "update"`), or None."""
    p = s.privacy
    if p.mechanism == "none":
        return None
    delta = p.resolved_delta(s.peers)
    q = s.centralized.fraction if p.where == "server" else 1.0
    sigma = 1.0 if p.noise_multiplier is None else p.noise_multiplier
    if p.target_epsilon is not None and p.mechanism == "dp_sgd":
        sigma = _dp_sgd_sigma(s, p.target_epsilon, delta, p.accountant)
    elif p.target_epsilon is not None:
        sigma = _calibrated(p.target_epsilon, q, s.training.rounds, delta, p.accountant)
    mechanism: Literal["update", "dp_sgd"] = "dp_sgd" if p.mechanism == "dp_sgd" else "update"
    t = s.training
    return DpPlan(
        p.clip, sigma, delta, p.accountant, p.where, q, mechanism, t.batch_size, t.local_epochs
    )


def forecast(s: Scenario, rounds: list[int]) -> dict[int, tuple[float, float]]:
    """(smallest, largest) ε over the peers after each of `rounds`, for a peer that
    trains every round: what `p2pfl privacy` prints before anything runs. DP-SGD reads
    the shard sizes (each peer's q and steps); the update mechanisms are the same for
    every peer."""
    dp = dp_plan(s)
    if dp is None:
        return {}
    sizes = shard_sizes(s) if dp.mechanism == "dp_sgd" else [0]
    out = {}
    for r in rounds:
        eps = [spent(dp, r, r, n).epsilon for n in sizes]
        out[r] = (min(eps), max(eps))
    return out
