"""`simulate`: every peer of a run in one process, round by round, the networked maths.

Gossip round r, as every networked peer runs it (`runtime.peer`): train, pass the
model through the peer's outgoing transform (an attack), exchange, mix with the core
step (`sim.gossip.mix`), evaluate, write the line. Centralized round r, as the server
and its clients run it (`runtime.server` / `runtime.client`): sample with
`protocol.fedavg_rounds.sample`, the sampled peers adopt the global model and train,
the server aggregates the finite updates in id order with the plan's rule, and every
peer writes the lines `protocol.fedavg_client.lines_on_adopt` says it writes.

Same PRNG streams, same trainer, same steps: without wall-time faults the final models
match `p2pfl launch`'s to float32 rounding. What has no meaning without sockets or
clocks (bytes, per-peer seconds, CPU) is None in the lines; see `sim.outputs`.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from p2pfl.config.plan import SimPlan
from p2pfl.core import streams
from p2pfl.record.runs import Result
from p2pfl.sim import population
from p2pfl.sim.fedavg import CentralizedRun
from p2pfl.sim.gossip import dissensus_rows, mix, neighbourhoods
from p2pfl.sim.run import OnRound, RoundDone, Run, scatter

__all__ = ["OnRound", "RoundDone", "simulate"]


def _heard_and_missing(
    idx: np.ndarray, real: np.ndarray, delivered: np.ndarray, rows: np.ndarray
) -> tuple[list[list[int]], list[list[int]]]:
    """Each of `rows`' neighbours heard this round and those not (plain lists, for lines)."""
    heard, missing = [], []
    for ids, is_real, got in zip(
        idx[rows].tolist(), real[rows].tolist(), delivered[rows].tolist(), strict=True
    ):
        heard.append([j for j, r, g in zip(ids, is_real, got, strict=True) if r and g])
        missing.append([j for j, r, g in zip(ids, is_real, got, strict=True) if r and not g])
    return heard, missing


class GossipRun(Run):
    """The gossip mode's rounds (see the module docstring)."""

    def rounds(self) -> None:
        p, n = self.plan, self.n
        nb = neighbourhoods(p.neighbours, p.mixing)
        everyone = np.arange(n)
        self.evaluate_lines(self.states.params, everyone, 0, "initial")
        for r in range(1, p.run.rounds + 1):
            alive = self.schedule.alive(r)
            self.catch_up(r, nb)
            rows = everyone[alive]
            trained, losses = population.train(self.pop, self.states, None if alive.all() else rows)
            trained = self.privatize(trained, rows, r)
            self.states = scatter(self.states, rows, trained)
            own = self.states.params
            sent = self.outgoing(own, alive)
            delivered = nb.real & alive[nb.idx] & alive[:, None] & self.links(r, nb.real.shape)
            crafted = dissensus_rows(p.gains, own, sent, nb, delivered)
            mixed = mix(own, sent, nb, delivered, alive, p.aggregator, crafted)
            self.states = self.states._replace(params=mixed.params)
            heard, missing = _heard_and_missing(nb.idx, nb.real, delivered, rows)
            every = p.eval_every
            hold = self.evaluate_lines(
                self.states.params,
                rows,
                r,
                "mixed",
                r % every == 0 or r == p.run.rounds,
                train_loss=np.asarray(losses).tolist(),
                heard=heard,
                missing=missing,
                disagreement=mixed.disagreement[rows].tolist(),
            )
            self.progress(r, hold, len(rows))

    def links(self, round_: int, shape: tuple[int, ...]) -> np.ndarray:
        """[n, k_max] bool: the link into each slot delivered this round's model."""
        if self.plan.link_drop == 0.0:
            return np.ones(shape, bool)
        draw = streams.rng(self.plan.run.seed, streams.SIM_LINK, round_).random(shape)
        return np.asarray(draw >= self.plan.link_drop)

    def catch_up(self, round_: int, nb: Any) -> None:
        """Peers rejoining this round take their live neighbours' newest models, combined
        by the plan's catch-up rule (the networked catch-up), keeping their checkpointed
        optimizer state and key; with no live neighbour, their checkpoint."""
        back = self.schedule.rejoining(round_)
        if not back:
            return
        alive = self.schedule.alive(round_)
        params = np.array(self.states.params)
        for i in back:
            peers = [int(j) for j in nb.idx[i][nb.real[i]] if alive[j] and j not in back]
            if not peers:
                self.log.info("catch_up_found_nobody", rejoined=i, round=round_)
                continue
            models = params[sorted(peers)]
            combined = np.asarray(self.plan.catch_up(models, np.ones(len(models), np.float32)))
            if np.isfinite(combined).all():
                params[i] = combined
        self.states = self.states._replace(params=jnp.asarray(params))


def simulate(plan: SimPlan, on_round: OnRound | None = None) -> Result:
    """Run every round of `plan` and write its run folder; Ctrl-C stops after the round
    in progress and still writes the summary of what ran (`interrupted: true`), as does
    a distributed run that loses a process (then `population.ProcessLostError` is raised)."""
    run: Run = (CentralizedRun if plan.run.mode == "centralized" else GossipRun)(plan, on_round)
    interrupted, lost = False, None
    try:
        run.rounds()
    except KeyboardInterrupt:
        interrupted = True
    except population.ProcessLostError as exc:
        run.log.error("process_lost", reason=str(exc), rounds_done=run.done)
        interrupted, lost = True, exc
    result = run.finish(interrupted)
    if lost is not None:
        raise lost
    return result
