"""What a simulated run keeps between rounds, for both modes: peers, lines, clocks.

`Run` holds the stacked peers (`sim.population`), their states, the crash schedule,
the histories and the server's lines; it writes a peer's line, evaluates and records
a set of peers, applies the attackers' outgoing transforms, reports progress, and
finishes the run folder. The round loops are `sim.engine.GossipRun` and
`sim.fedavg.CentralizedRun`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import structlog

from p2pfl.config.plan import SimPlan
from p2pfl.core import privacy
from p2pfl.learning.trainer import TrainState
from p2pfl.record.history import HistoryWriter, ServerRecord, as_dict
from p2pfl.record.rounds import simulated
from p2pfl.record.runs import Result
from p2pfl.sim import population
from p2pfl.sim.outputs import Histories, summary, write_models
from p2pfl.sim.schedule import Schedule

log = structlog.get_logger()


@dataclass(frozen=True)
class RoundDone:
    """What a progress view hears after each round."""

    round: int
    rounds: int
    mean_holdout_accuracy: float | None
    alive: int


OnRound = Callable[[RoundDone], None]


def scatter(states: TrainState, rows: np.ndarray, new: TrainState) -> TrainState:
    """`states` with peers `rows` replaced by `new` (stacked like `rows`)."""
    if len(rows) == len(states.params) and (rows == np.arange(len(rows))).all():
        return new
    idx = jnp.asarray(rows)
    return jax.tree_util.tree_map(lambda a, b: a.at[idx].set(b), states, new)


def mean_of(values: np.ndarray | None) -> float | None:
    if values is None or len(values) == 0:
        return None
    return float(np.mean(values))


class Run:
    """One simulated run's state between rounds (see the module docstring)."""

    def __init__(self, plan: SimPlan, on_round: OnRound | None) -> None:
        self.plan, self.on_round = plan, on_round
        r = plan.run
        self.pop = population.build(plan.learning, plan.chunk, plan.label_flips)
        self.files = self.pop.process == 0  # a distributed run: the first process writes
        if self.files:
            r.out.mkdir(parents=True, exist_ok=True)
        self.states = population.initial_states(self.pop, plan.learning)
        self.n = r.peers
        self.schedule = Schedule(self.n, plan.crashes, r.mode)
        self.global_model: jax.Array | None = None  # centralized: the server's model
        self.global_holdout: float | None = None  # ... and its holdout accuracy
        self.histories = Histories(r.out, self.n, r.rounds, self.files)
        self.server: list[ServerRecord] = []
        self.t0, self.started_at = time.perf_counter(), time.time()
        self.transform_states = {i: t.init(r.seed, i) for i, t in plan.transforms.items()}
        self.done = 0  # rounds completed
        self.releases = np.zeros(self.n, np.int64)  # [privacy]: each peer's DP releases
        self.log = log.bind(peer="sim", peers=self.n)
        self.log.info(
            "sim_start",
            mode=r.mode,
            rounds=r.rounds,
            chunk=self.pop.chunk,
            devices=len(jax.devices()),
            processes=self.pop.processes,
            glibc_tunables=os.environ.get("GLIBC_TUNABLES"),  # see runtime.process
        )

    def rounds(self) -> None:
        """Every round of the run (each mode's loop)."""
        raise NotImplementedError

    def line(self, peer: int, round_: int, **fields: Any) -> None:
        dp = self.plan.privacy
        spent = None
        if dp is not None:
            n = int(self.pop.n_train[peer])
            spent = privacy.spent(dp, int(self.releases[peer]), round_, n)
        record = simulated(
            round_, t=time.perf_counter() - self.t0, wall=time.time(), dp=spent, **fields
        )
        self.histories.write(peer, record)

    def privatize(self, trained: TrainState, rows: np.ndarray, round_: int) -> TrainState:
        """[privacy]: the trained states of peers `rows` with each update clipped and
        noised (`core.privacy`, as a networked peer does), from their current models."""
        dp = self.plan.privacy
        if dp is None or dp.where != "peer":
            return trained
        self.releases[rows] += 1
        if dp.mechanism == "dp_sgd":  # noised inside the training itself
            return trained
        start = self.states.params[jnp.asarray(rows)]
        params = privacy.privatize_many(start, trained.params, dp, self.plan.run.seed, rows, round_)
        return trained._replace(params=params)

    def evaluate_lines(
        self,
        params: jax.Array,
        rows: np.ndarray,
        round_: int,
        evaluated_on: str,
        evaluate: bool = True,
        holdout: float | None = None,
        **per_peer: Any,
    ) -> np.ndarray | None:
        """Evaluate peers `rows` on `params` (every peer's) and write their lines; the
        holdout accuracies come back. `per_peer` values are arrays like `rows`. Without
        `evaluate` the lines carry no accuracy; with `holdout` (one model for all of
        them: the global one, already evaluated) only their test splits are evaluated."""
        if len(rows) == 0:
            return None
        hold: np.ndarray | None
        if evaluate and holdout is not None:
            test, _ = population.evaluate(self.pop, params, rows, holdout=False)
            hold = np.full(len(rows), holdout)
        elif evaluate:
            test, hold = population.evaluate(self.pop, params, rows)
        else:
            test, hold = np.full(len(rows), np.nan), None
        for k, i in enumerate(rows):
            self.line(
                int(i),
                round_,
                test_accuracy=None if np.isnan(test[k]) else float(test[k]),
                holdout_accuracy=None if hold is None else float(hold[k]),
                evaluated_on=evaluated_on,
                **{name: values[k] for name, values in per_peer.items()},
            )
        return hold

    def outgoing(self, own: jax.Array, senders: np.ndarray) -> jax.Array:
        """What every peer sends: its model, or its attack's transform of it (applied,
        and its state advanced, only for the peers that send this round: `senders`)."""
        sent = own
        for i, t in self.plan.transforms.items():
            if senders[i]:
                out, self.transform_states[i] = t.apply(own[i], self.transform_states[i])
                sent = sent.at[i].set(jnp.asarray(out, jnp.float32))
        return sent

    def progress(self, round_: int, hold: np.ndarray | None, alive: int) -> None:
        self.done = round_
        self.log.info("round_done", round=round_, holdout_accuracy=mean_of(hold), alive=alive)
        if self.on_round is not None:
            self.on_round(RoundDone(round_, self.plan.run.rounds, mean_of(hold), alive))

    def finish(self, interrupted: bool) -> Result:
        p = self.plan
        self.histories.close()
        models = np.asarray(self.states.params, np.float32)
        centralized = p.run.mode == "centralized"
        global_model = None
        if centralized and self.global_model is not None:
            global_model = np.asarray(self.global_model, np.float32)
            if self.files:
                w = HistoryWriter(p.run.out / "coordinator.jsonl")
                for rec in self.server:
                    w.write(rec)
                w.close()
        if self.files:
            write_models(p.run.out, models, global_model)
        alive = self.schedule.alive(self.done + 1)
        completed = [i for i in range(self.n) if alive[i]] if not interrupted else []
        crashed = [i for i, down in self.schedule.down.items() if down <= self.done]
        result = summary(
            p.run.name,
            p.run.mode,
            p.run.rounds,
            self.histories,
            completed,
            crashed,
            time.perf_counter() - self.t0,
            self.started_at,
            self.server,
            interrupted,
            None if p.privacy is None else p.privacy.as_dict(),
        )
        return Result(
            result,
            self.histories.columns,
            models,
            p.run.out,
            [as_dict(s) for s in self.server],
            global_model,
        )
