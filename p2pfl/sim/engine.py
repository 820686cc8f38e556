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

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import structlog

from p2pfl.config.plan import SimPlan
from p2pfl.core import streams
from p2pfl.learning.trainer import TrainState
from p2pfl.protocol.fedavg_client import lines_on_adopt
from p2pfl.protocol.fedavg_rounds import close_reason, sample
from p2pfl.record.history import HistoryWriter, ServerRecord, as_dict
from p2pfl.record.rounds import simulated
from p2pfl.record.runs import Result
from p2pfl.sim import population
from p2pfl.sim.gossip import dissensus_rows, mix, neighbourhoods
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


def _scatter(states: TrainState, rows: np.ndarray, new: TrainState) -> TrainState:
    """`states` with peers `rows` replaced by `new` (stacked like `rows`)."""
    if len(rows) == len(states.params) and (rows == np.arange(len(rows))).all():
        return new
    idx = jnp.asarray(rows)
    return jax.tree_util.tree_map(lambda a, b: a.at[idx].set(b), states, new)


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


def _round(trained: int) -> int | None:
    """A peer's last trained round as `lines_on_adopt` takes it (-1: none yet)."""
    return None if trained < 0 else int(trained)


def _mean(values: np.ndarray | None) -> float | None:
    if values is None or len(values) == 0:
        return None
    return float(np.mean(values))


class _Clients:
    """Centralized peers' bookkeeping between rounds, as each networked client keeps it."""

    def __init__(self, n: int, d: int) -> None:
        self.recorded = np.zeros(n, int)  # the last round with a line
        self.trained = np.full(n, -1)  # the last round trained in (-1: none)
        self.updates = np.zeros((n, d), np.float32)  # the model it trained then
        self.losses = np.zeros(n)  # ... and its loss


class _Run:
    """One simulated run's state between rounds (peers, records, clocks)."""

    def __init__(self, plan: SimPlan, on_round: OnRound | None) -> None:
        self.plan, self.on_round = plan, on_round
        r = plan.run
        r.out.mkdir(parents=True, exist_ok=True)
        self.pop = population.build(plan.learning, plan.chunk, plan.label_flips)
        self.states = population.initial_states(self.pop, plan.learning)
        self.n = r.peers
        self.schedule = Schedule(self.n, plan.crashes, r.mode)
        self.global_model: jax.Array | None = None  # centralized: the server's model
        self.global_holdout: float | None = None  # ... and its holdout accuracy
        self.histories = Histories(r.out, self.n, r.rounds)
        self.server: list[ServerRecord] = []
        self.t0, self.started_at = time.perf_counter(), time.time()
        self.transform_states = {i: t.init(r.seed, i) for i, t in plan.transforms.items()}
        self.done = 0  # rounds completed
        self.log = log.bind(peer="sim", peers=self.n)

    def line(self, peer: int, round_: int, **fields: Any) -> None:
        record = simulated(round_, t=time.perf_counter() - self.t0, wall=time.time(), **fields)
        self.histories.write(peer, record)

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
        self.log.info("round_done", round=round_, holdout_accuracy=_mean(hold), alive=alive)
        if self.on_round is not None:
            self.on_round(RoundDone(round_, self.plan.run.rounds, _mean(hold), alive))

    # -- gossip ---------------------------------------------------------------------

    def gossip(self) -> None:
        p, n = self.plan, self.n
        nb = neighbourhoods(p.neighbours, p.mixing)
        everyone = np.arange(n)
        self.evaluate_lines(self.states.params, everyone, 0, "initial")
        for r in range(1, p.run.rounds + 1):
            alive = self.schedule.alive(r)
            self.catch_up(r, nb)
            rows = everyone[alive]
            trained, losses = population.train(self.pop, self.states, None if alive.all() else rows)
            self.states = _scatter(self.states, rows, trained)
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

    # -- centralized ------------------------------------------------------------------

    def centralized(self) -> None:
        p, n = self.plan, self.n
        cfg = p.server
        global_model = self.initial_global()
        self.global_model = global_model
        everyone = np.arange(n)
        self.evaluate_lines(self.states.params, everyone, 0, "initial")
        self.server_line(0, None, 0.0)
        c = _Clients(n, int(self.states.params.shape[1]))
        for r in range(1, p.run.rounds + 1):
            live = [int(i) for i in everyone[self.schedule.alive(r)]]
            sampled = sample(
                live, r, seed=cfg.seed, fraction=cfg.fraction, min_updates=cfg.min_updates
            )
            dying = self.schedule.sampled(r, sampled)
            rows = np.array([i for i in sampled if i not in dying], int)
            self.adopt(rows, c, r - 1)
            if len(rows):
                new, trained_losses = population.train(self.pop, self.states, rows)
                losses = np.asarray(trained_losses)
                self.states = _scatter(self.states, rows, new)
                own = np.asarray(new.params)
                c.updates[rows], c.losses[rows], c.trained[rows] = own, losses, r
                senders = np.zeros(n, bool)
                senders[rows] = True
                sent = np.asarray(self.outgoing(self.states.params, senders))[rows]
            else:
                losses = np.zeros(0)
                sent = np.zeros((0, c.updates.shape[1]), np.float32)
            finite = np.isfinite(sent).all(axis=1)
            accepted = [int(i) for i, ok in zip(rows, finite, strict=True) if ok]
            closed_by = close_reason(accepted, sampled, set(sampled) - set(dying), cfg.min_updates)
            t = time.perf_counter()
            loss = None
            if closed_by != "quorum_missed" and accepted:
                counts = self.pop.n_train[accepted].astype(np.float64)
                w = np.ones(len(accepted)) if cfg.weighting == "uniform" else counts
                global_model = jnp.asarray(p.server_aggregator(sent[finite], w), jnp.float32)
                ls = np.asarray(losses)[finite]
                loss = float((counts * ls).sum() / counts.sum())
            aggregate_s = time.perf_counter() - t
            self.global_model = global_model
            closed = (sampled, accepted, live, closed_by, loss)
            hold = self.server_line(r, closed, aggregate_s)
            self.progress(r, np.array([hold]), len(live))
        final = [int(i) for i in everyone[self.schedule.alive(p.run.rounds + 1)]]
        self.adopt(np.array(final, int), c, p.run.rounds)

    def initial_global(self) -> jax.Array:
        """The server's first global model: the shared initial parameters."""
        seed = self.plan.run.seed
        return self.pop.trainer.init(seed, streams.SHARED_INIT, streams.TRAIN_BASE).params

    def adopt(self, rows: np.ndarray, c: _Clients, done: int) -> None:
        """Peers `rows` receive the global model after round `done` and take it as their
        own; each writes the lines `lines_on_adopt` gives: an update of its own whose
        global model never came, then `done` on the global model (with its loss and
        distance from it when it trained in `done`), as `runtime.client` does."""
        lines = {
            int(i): lines_on_adopt(int(c.recorded[i]), _round(c.trained[i]), done) for i in rows
        }
        by_round: dict[int, list[int]] = {}  # rounds of unreported updates -> their peers
        for i, todo in lines.items():
            if todo and todo[0][1] == "update":
                by_round.setdefault(todo[0][0], []).append(i)
        for round_, ids in sorted(by_round.items()):
            self.evaluate_lines(
                jnp.asarray(c.updates), np.array(ids), round_, "update", train_loss=c.losses[ids]
            )
            c.recorded[ids] = round_
        assert self.global_model is not None
        if len(rows) == self.n:
            shape = self.states.params.shape
            self.states = self.states._replace(params=jnp.broadcast_to(self.global_model, shape))
        elif len(rows):
            idx = jnp.asarray(rows)
            self.states = self.states._replace(
                params=self.states.params.at[idx].set(self.global_model)
            )
        on_global = np.array(
            [i for i, todo in lines.items() if todo and todo[-1][1] == "global"], int
        )
        if len(on_global):
            mine = c.trained[on_global] == done
            g = np.asarray(self.global_model)
            spread = np.linalg.norm(c.updates[on_global] - g, axis=1)
            self.evaluate_lines(
                jnp.broadcast_to(self.global_model, self.states.params.shape),
                on_global,
                done,
                "global",
                holdout=self.global_holdout,
                train_loss=[
                    float(x) if m else None for x, m in zip(c.losses[on_global], mine, strict=True)
                ],
                disagreement=[float(x) if m else None for x, m in zip(spread, mine, strict=True)],
            )
            c.recorded[on_global] = done

    def server_line(self, round_: int, closed: tuple[Any, ...] | None, aggregate_s: float) -> float:
        t = time.perf_counter()
        assert self.global_model is not None
        acc, loss = population.evaluate_holdout(self.pop, self.global_model)
        eval_s = time.perf_counter() - t
        sampled, accepted, live, closed_by, train_loss = closed or ((), [], [], "initial", None)
        self.server.append(
            ServerRecord(
                round=round_,
                holdout_accuracy=acc,
                holdout_loss=loss,
                train_loss=train_loss,
                sampled=list(sampled),
                participants=sorted(accepted) if closed_by != "quorum_missed" else [],
                missing=sorted(set(sampled) - set(accepted)),
                connected=list(live),
                closed_by=closed_by,
                bytes_sent=None,
                bytes_received=None,
                quorum_wait_s=None,
                round_s=0.0,
                aggregate_s=aggregate_s,
                eval_s=eval_s,
                t=time.perf_counter() - self.t0,
                time=time.time(),
            )
        )
        self.global_holdout = acc
        return acc

    # -- the end ------------------------------------------------------------------------

    def finish(self, interrupted: bool) -> Result:
        p = self.plan
        self.histories.close()
        models = np.asarray(self.states.params, np.float32)
        centralized = p.run.mode == "centralized"
        global_model = None
        if centralized and self.global_model is not None:
            global_model = np.asarray(self.global_model, np.float32)
            w = HistoryWriter(p.run.out / "coordinator.jsonl")
            for rec in self.server:
                w.write(rec)
            w.close()
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
        )
        return Result(
            result,
            self.histories.columns,
            models,
            p.run.out,
            [as_dict(s) for s in self.server],
            global_model,
        )


def simulate(plan: SimPlan, on_round: OnRound | None = None) -> Result:
    """Run every round of `plan` and write its run folder; Ctrl-C stops after the round
    in progress and still writes the summary of what ran (`interrupted: true`)."""
    run = _Run(plan, on_round)
    interrupted = False
    try:
        if plan.run.mode == "centralized":
            run.centralized()
        else:
            run.gossip()
    except KeyboardInterrupt:
        interrupted = True
    return run.finish(interrupted)
