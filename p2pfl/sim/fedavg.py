"""A centralized (FedAvg) round for every peer at once, as the server and its clients run it.

Round r: the server samples the live peers with `protocol.fedavg_rounds.sample`; the
sampled peers adopt the global model, train and send their (transformed) update; the
server keeps the finite ones, closes the round by `close_reason` and aggregates them
in id order with the plan's rule. Every peer writes the lines
`protocol.fedavg_client.lines_on_adopt` says a networked client writes, and the
server one `coordinator.jsonl` line per round. With secure aggregation the server
gets the fixed-point weighted mean a masked round unmasks (`core.secagg`: the masks
cancel exactly, so they are skipped); a peer that crashes in a round, even after
masking, is left out of it as at the round's start.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from p2pfl.core import privacy, secagg, streams
from p2pfl.protocol.fedavg_client import lines_on_adopt
from p2pfl.protocol.fedavg_rounds import close_reason, sample
from p2pfl.protocol.secagg_server import summary
from p2pfl.record.history import ServerRecord
from p2pfl.sim import population
from p2pfl.sim.run import Run, scatter


def _round(trained: int) -> int | None:
    """A peer's last trained round as `lines_on_adopt` takes it (-1: none yet)."""
    return None if trained < 0 else int(trained)


def _distances(models: np.ndarray, rows: np.ndarray, g: np.ndarray, block: int = 256) -> np.ndarray:
    """||models[i] - g|| for each of `rows`, a block of rows at a time (no `[n, d]`
    temporaries: large ones fragment the heap a long run lives in)."""
    return np.concatenate(
        [
            np.linalg.norm(models[rows[k : k + block]] - g, axis=1)
            for k in range(0, len(rows), block)
        ]
    )


class _Clients:
    """Centralized peers' bookkeeping between rounds, as each networked client keeps it."""

    def __init__(self, n: int, d: int) -> None:
        self.recorded = np.zeros(n, int)  # the last round with a line
        self.trained = np.full(n, -1)  # the last round trained in (-1: none)
        self.updates = np.zeros((n, d), np.float32)  # the model it trained then
        self.losses = np.zeros(n)  # ... and its loss


class CentralizedRun(Run):
    """The centralized mode's rounds (see the module docstring)."""

    def rounds(self) -> None:
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
                live,
                r,
                seed=cfg.seed,
                fraction=cfg.fraction,
                min_updates=cfg.min_updates,
                poisson=cfg.poisson,
            )
            dying = self.schedule.sampled(r, sampled)
            rows = np.array([i for i in sampled if i not in dying], int)
            self.adopt(rows, c, r - 1)
            if len(rows):
                new, trained_losses = population.train(self.pop, self.states, rows)
                new = self.privatize(new, rows, r)
                losses = np.asarray(trained_losses)
                self.states = scatter(self.states, rows, new)
                own = np.asarray(new.params)
                c.updates[rows], c.losses[rows], c.trained[rows] = own, losses, r
                senders = np.zeros(n, bool)
                senders[rows] = True
                outgoing: jax.Array | None = self.outgoing(self.states.params, senders)
                sent = np.asarray(outgoing)  # (a view: no copy)
                if len(rows) < n:
                    sent, outgoing = sent[rows], None
            else:
                outgoing = None
                losses = np.zeros(0)
                sent = np.zeros((0, c.updates.shape[1]), np.float32)
            secure_range = cfg.secagg_range
            finite = np.isfinite(sent).all(axis=1)
            if secure_range is not None:  # masked: the server cannot tell a NaN apart
                finite = np.ones(len(rows), bool)
            accepted = [int(i) for i, ok in zip(rows, finite, strict=True) if ok]
            closed_by = close_reason(accepted, sampled, set(sampled) - set(dying), cfg.min_updates)
            t = time.perf_counter()
            loss: float | None = None
            secure: dict[str, object] | None = None
            if secure_range is not None and len(accepted) < secagg.MIN_PEERS:
                need = max(secagg.MIN_PEERS, cfg.min_updates)
                secure = {"failure": f"{len(accepted)} peers sent keys, {need} needed"}
                closed_by = "quorum_missed"
            if closed_by != "quorum_missed" and accepted:
                counts = self.pop.n_train[accepted].astype(np.float64)
                w = np.ones(len(accepted)) if cfg.weighting == "uniform" else counts
                if secure_range is not None:
                    g = np.asarray(global_model, np.float64)
                    mean, over = secagg.fixed_point_mean(sent - g, w, secure_range)
                    global_model = jnp.asarray(g + mean, jnp.float32)
                    k = len(accepted)  # everyone who fixed masks survived
                    scale = secagg.scale_for(secure_range, k)
                    secure = summary(k, k, [], secagg.threshold(k), scale, over)
                elif p.privacy is not None and p.privacy.where == "server":  # central DP
                    key = privacy.noise_key(p.run.seed, n, r)
                    expected = p.privacy.q * len(live)
                    global_model = privacy.central_mean(
                        global_model, sent[finite], p.privacy, expected, key
                    )
                else:
                    kept: Any = sent if outgoing is None else outgoing  # (no copy)
                    if not finite.all():
                        kept = sent[finite]
                    global_model = jnp.asarray(p.server_aggregator(kept, w), jnp.float32)
                ls = np.asarray(losses)[finite]
                loss = float((counts * ls).sum() / counts.sum())
            aggregate_s = time.perf_counter() - t
            self.global_model = global_model
            closed = (sampled, accepted, live, closed_by, loss)
            hold = self.server_line(r, closed, aggregate_s, secure)
            self.progress(r, np.array([hold]), len(live))
        final = [int(i) for i in everyone[self.schedule.alive(p.run.rounds + 1)]]
        self.adopt(np.array(final, int), c, p.run.rounds)

    def initial_global(self) -> jax.Array:
        """The server's first global model: the shared initial parameters."""
        seed = self.plan.run.seed
        return self.pop.init_one(seed, streams.SHARED_INIT, streams.TRAIN_BASE).params

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
        everyone = jnp.broadcast_to(self.global_model, self.states.params.shape)
        if len(rows) == self.n:
            self.states = self.states._replace(params=everyone)
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
            spread = _distances(c.updates, on_global, np.asarray(self.global_model))
            self.evaluate_lines(
                everyone,
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

    def server_line(
        self,
        round_: int,
        closed: tuple[Any, ...] | None,
        aggregate_s: float,
        secure: dict[str, object] | None = None,
    ) -> float:
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
                secagg=secure,
            )
        )
        self.global_holdout = acc
        return acc
