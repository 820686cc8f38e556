"""A peer in centralized mode: the talk's node, working for the FedAvg server.

It says hello (with its sample count) on the control channel, then waits. A
start_round brings the global model of the round before: the peer evaluates it
(history line for that round), trains on its shard, and pushes its update (model,
sample count, loss) on the update channel. end_session brings the final model: the
peer evaluates and saves it, says bye and exits 0.

Every round it trained in is checkpointed (`p2pfl/record/checkpoint.py`); with
`--resume` a restarted peer takes its optimizer state and PRNG key from there, appends
to its history, and says hello again: the server's next start_round brings the global
model.

What to do with the coordinator's messages is the `FedAvgClient` machine's decision
(`p2pfl.protocol.fedavg_client`): heartbeats every `centralized.heartbeat_s` once
welcomed, any message a sign of life, a straggler skipping to the newest round, the
coordinator lost after `coordinator_timeout_s` of silence (before the welcome:
`startup_timeout_s`) or an end_session with an error. Then the peer raises
`CoordinatorLostError`, which the CLI turns into a clear message and exit code 1.
This module drives it (`node.drive`), trains, evaluates and records.

With secure aggregation (`[privacy] secure_aggregation`) a sampled peer sends fresh
keys before it trains and, instead of its model, a masked input of its update (its
model minus the global one) once the server's roster and the others' shares came; it
answers the server's one unmask request (`p2pfl.protocol.secagg.SecAggPeer` decides).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import structlog

from p2pfl.config.plan import ClientPlan
from p2pfl.learning.trainer import FlatParams, TrainState
from p2pfl.net.transport import Link
from p2pfl.protocol import wire
from p2pfl.protocol.fedavg_client import (
    FedAvgClient,
    Finish,
    Lost,
    Secure,
    Task,
    Train,
    lines_on_adopt,
)
from p2pfl.protocol.secagg import SecAggPeer
from p2pfl.record.history import save_model
from p2pfl.record.rounds import PeerHistory
from p2pfl.runtime.learner import Learner
from p2pfl.runtime.node import drive
from p2pfl.runtime.ports import LinkPort
from p2pfl.runtime.process import die

log = structlog.get_logger()


class CoordinatorLostError(RuntimeError):
    """The coordinator went silent or ended the session with an error."""


@dataclass(frozen=True)
class _Trained:
    """What the peer did in the last round it trained in, until that round's line is written."""

    round: int
    loss: float
    model: np.ndarray  # the update it sent
    train_s: float
    delta: np.ndarray | None = None  # secure aggregation: what it sent less the global model


class FedClient:
    """Owns one centralized-mode peer's link to the coordinator and its history file."""

    def __init__(self, plan: ClientPlan) -> None:
        self.plan = plan
        self.id = plan.peer_id
        self.out_dir = plan.run.out
        self.log = log.bind(peer=self.id)
        self.learner = Learner(plan, self.log)
        n_params = self.learner.n_params
        expect = wire.Expect(plan.run.digest, plan.run.peers, {"params": (n_params,)})
        self.link = Link(plan.control, plan.updates, expect.max_frames, plan.keys, plan.run.peers)
        self.history = PeerHistory(self.out_dir / f"peer-{self.id}.jsonl", append=plan.resume)
        self.port = LinkPort(self.link, expect, self.id, self.log, self.history)
        config = dataclasses.replace(plan.client, samples=self.learner.local.data.n_train)
        self.machine = FedAvgClient(config, time.monotonic(), self.log)
        self.recorded = -1  # the last round with a history line
        self.trained: _Trained | None = None
        secure = plan.client.secagg_range
        self.secure = None
        if secure is not None:
            self.secure = SecAggPeer(self.id, secure, plan.secagg_auth)
        self._unsaved: tuple[TrainState, int] | None = None  # secure: saved once masked

    def _lost(self, reason: str) -> CoordinatorLostError:
        where = self.plan.control
        self.log.error("coordinator_lost", reason=reason, coordinator=where)
        return CoordinatorLostError(f"peer {self.id}: {reason} (coordinator {where})")

    def _next(self) -> Train | Finish | Secure:
        """The newest start_round / end_session, heartbeating while it waits."""
        got: list[Task] = []

        def taken(now: float) -> bool:  # asked only when nothing more is queued
            task = self.machine.take(now)
            if task is not None:
                got.append(task)
            return task is not None

        while not got:
            self.history.waited(drive(self.machine, self.port, taken).blocked_s)
        task = got[0]
        if isinstance(task, Lost):
            if task.ended:
                structlog.contextvars.unbind_contextvars("round")
            raise self._lost(task.reason)
        return task

    # -- rounds --------------------------------------------------------------------

    def _record(
        self,
        round_: int,
        params: FlatParams | np.ndarray,
        evaluated_on: str,
        global_params: np.ndarray | None,
    ) -> None:
        """The history line of `round_`, with the accuracy of `params` (see `_adopt`)."""
        test_acc, hold_acc, eval_s = self.learner.evaluate(params)
        mine = self.trained if self.trained and self.trained.round == round_ else None
        disagreement = None
        if mine is not None and global_params is not None:
            disagreement = float(np.linalg.norm(mine.model - global_params))
        self.history.write(
            round_,
            test_accuracy=test_acc,
            holdout_accuracy=hold_acc,
            evaluated_on=evaluated_on,
            train_loss=mine.loss if mine else None,
            train_s=mine.train_s if mine else 0.0,
            eval_s=eval_s,
            disagreement=disagreement,
            dp=self.learner.spent(round_),
        )
        self.recorded = round_

    def _adopt(
        self, done: int, model: wire.Chunked, size: int, state: TrainState
    ) -> tuple[TrainState, np.ndarray]:
        """Take the global model after round `done` (start_round of round `done + 1`
        carries it, and end_session the final one; `size`: that message's bytes).

        The lines to write are `lines_on_adopt`'s: a round this peer trained in whose
        global model never came is evaluated on its own update, then `done` on the
        global model.
        """
        params = np.asarray(model)
        mine = self.trained
        lines = lines_on_adopt(self.recorded, mine.round if mine else None, done)
        if mine is not None and lines and lines[0][1] == "update":
            self.history.received(-size)  # the model that just came belongs to `done`
            self._record(mine.round, mine.model, "update", None)
            self.history.received(size)
        state = self.learner.with_params(state, params)
        if lines and lines[-1][1] == "global":
            self._record(done, state.params, "global", params)
        return state, params

    def _train(self, round_: int, state: TrainState, start: np.ndarray) -> TrainState:
        """Train `round_` from the global model `start` and send the update (secure
        aggregation: send keys first, and keep the update until the masks are fixed)."""
        if self.secure is not None:
            keys = self.secure.keys(round_, self.machine.config.samples)
            self.port.carry_out([self.machine.secagg(round_, keys, time.monotonic())])
        trained = self.learner.train(state, round_)
        delta = None
        if self.secure is None:
            update = self.machine.update(round_, trained.loss, trained.sent, time.monotonic())
            self.port.carry_out([update])
        else:
            delta = np.asarray(trained.sent, np.float64) - start
        self.trained = _Trained(round_, trained.loss, trained.model, trained.train_s, delta)
        if self.secure is None:
            self.learner.save(trained.state, round_)
        else:  # checkpointed once its masked input is out (a crash before: as at the start)
            self._unsaved = (trained.state, round_)
        return trained.state

    def _secure_step(self, task: Secure) -> None:
        """One step of a secure round: answer the roster with shares, the shares with our
        masked input, the unmask request with our shares of the secrets asked for."""
        assert self.secure is not None
        r, step, mine = task.round, task.meta.get("step"), self.trained
        reply: dict[str, object] | str | None = None
        if step == "roster":
            reply = self.secure.roster(r, task.meta)
        elif step == "unmask":
            reply = self.secure.unmask(r, task.meta)
        elif step != "shares":
            reply = "unexpected secagg step from the server"
        elif mine is None or mine.round != r or mine.delta is None:
            reply = "secagg shares for a round we did not train in"
        elif (why := self.secure.shares(r, task.meta)) is not None:
            reply = why
        elif isinstance(q := self.secure.masked_input(r, mine.delta), str):
            reply = q
        else:
            if self.plan.faults.crash_after_masking and not self.plan.resume:
                crash = self.plan.faults.crash_round
                if crash is not None and r >= crash:
                    die(self.log)  # the masks are fixed: the others must recover ours
            if q.out_of_range:
                self.log.warning(
                    "secagg_out_of_range", coordinates=q.out_of_range, max_abs=q.max_abs
                )
            now = time.monotonic()
            self.port.carry_out([self.machine.masked(r, mine.loss, q.values, q.out_of_range, now)])
            if self._unsaved is not None and self._unsaved[1] == r:
                self.learner.save(*self._unsaved)
                self._unsaved = None
        if isinstance(reply, str):
            shown = step[:20] if isinstance(step, str) else None
            self.log.warning("message_dropped", reason=reply, step=shown)
        elif reply is not None:
            self.port.carry_out([self.machine.secagg(r, reply, time.monotonic())])

    def _restore(self) -> TrainState:
        """The checkpointed state (`--resume`: its optimizer state and key count; the
        parameters are replaced by the next global model), or the initial state."""
        saved = self.learner.restore(self.plan.resume)
        if saved is not None:
            # its rounds before that are in the history; the line of saved.round itself
            # waited for the next global model, and the crash came first
            self.recorded = saved.round
            return saved.state
        initial = self.learner.local.state
        self._record(0, initial.params, "initial", None)
        return initial

    def run(self) -> None:
        """Join, train whenever sampled, and finish with the final global model."""
        state = self._restore()
        # Compile before saying hello: a sampled peer's first round must not spend the
        # round's deadline compiling (the gossip loop allows round 1 extra time instead).
        d = self.learner.local
        d.trainer.train.lower(state, d.data.train).compile()  # type: ignore[attr-defined]
        self.port.carry_out([self.machine.hello(time.monotonic())])
        samples = self.machine.config.samples
        self.log.info("peer_started", coordinator=self.plan.control, samples=samples)
        crash = None if self.plan.resume else self.plan.faults.crash_round
        if self.plan.faults.crash_after_masking:
            crash = None  # it dies in `_secure_step` instead
        while not isinstance(task := self._next(), Finish):
            if isinstance(task, Secure):
                self._secure_step(task)
                continue
            structlog.contextvars.bind_contextvars(round=task.round)
            if crash is not None and task.round >= crash:
                die(self.log)
            state, start = self._adopt(task.round - 1, task.params, task.size, state)
            state = self._train(task.round, state, start)
        structlog.contextvars.unbind_contextvars("round")
        state, params = self._adopt(task.round, task.params, task.size, state)
        save_model(self.out_dir / "models" / f"peer-{self.id}.npz", params)
        self.port.carry_out([self.machine.bye(task.round, time.monotonic())])
        self.log.info("peer_finished", rounds=task.round)

    def close(self) -> None:
        """Flush the bye and release the sockets and the history file."""
        self.link.close()
        self.history.close()


def run_client(plan: ClientPlan) -> None:
    """Run one centralized-mode peer to the end of the session; sockets closed even on error."""
    client = FedClient(plan)
    try:
        client.run()
    finally:
        client.close()
