"""A peer's local learning as both peer roles run it: one round's training, evaluation,
checkpoints.

The gossip peer and the centralized client train the same way: train on the shard,
privatize the update when `[privacy]` is on (`core.privacy.privatize`: the model the
peer keeps and sends), hold the model back if the peer is an injected straggler, pass
it through the plan's outgoing-model transform (an attack), and checkpoint after the
round. Written once here; the roles differ only in where the result goes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from p2pfl.config.plan import ClientPlan, GossipPlan
from p2pfl.core import privacy
from p2pfl.learning.local import Local, build, evaluate
from p2pfl.learning.trainer import FlatParams, TrainState, as_numpy
from p2pfl.record import checkpoint


@dataclass(frozen=True)
class Trained:
    """One round's local training."""

    state: TrainState
    loss: float
    model: np.ndarray  # this peer's own model after training
    sent: np.ndarray  # what it sends: the transform's output (the model itself if honest)
    train_s: float  # training alone, without the injected straggling


class Learner:
    """One peer's learning set-up, outgoing transform state and checkpoint file."""

    def __init__(self, plan: GossipPlan | ClientPlan, log: Any) -> None:
        self.local: Local = build(plan.learning, plan.peer_id, plan.faults.label_flip)
        self.faults = plan.faults
        self.checkpoint = checkpoint.path_for(plan.run.out, plan.peer_id)
        self.log = log
        self._transform = plan.transform
        self._transform_state = plan.transform.init(plan.run.seed, plan.peer_id)
        self.dp = plan.privacy
        self.seed, self.peer_id = plan.run.seed, plan.peer_id
        self.releases = 0  # DP releases so far (restored from the checkpoint on resume)

    @property
    def n_params(self) -> int:
        """The flat model's length."""
        return self.local.trainer.n_params

    def train(self, state: TrainState, round_: int) -> Trained:
        """Train round `round_`, privatize the update (DP), straggle if injected, and
        transform what is sent."""
        t = time.perf_counter()
        start = state.params
        state, loss = self.local.trainer.train(state, self.local.data.train)
        if self.dp is not None and self.dp.where == "peer":  # dp_sgd noised inside training
            if self.dp.mechanism == "update":
                key = privacy.noise_key(self.seed, self.peer_id, round_)
                private = privacy.privatize(start, state.params, self.dp, key)
                state = self.with_params(state, private)
            self.releases += 1
        model = as_numpy(state.params)
        train_s = time.perf_counter() - t
        if delay := self.faults.slow_delay_s:
            time.sleep(delay)  # an injected straggler (faults.slow), on purpose
        sent, self._transform_state = self._transform.apply(model, self._transform_state)
        return Trained(state, float(loss), model, np.asarray(sent), train_s)

    def spent(self, round_: int) -> privacy.Spent | None:
        """What round `round_`'s history line carries of the peer's DP: its ε and the
        steps composed (local DP: its releases; central DP: every round so far)."""
        if self.dp is None:
            return None
        return privacy.spent(self.dp, self.releases, round_, self.local.data.n_train)

    def evaluate(self, params: FlatParams | np.ndarray) -> tuple[float, float | None, float]:
        """(own test accuracy, holdout accuracy or None, seconds it took)."""
        t = time.perf_counter()
        test_acc, hold_acc = evaluate(self.local.trainer, params, self.local.data)
        return test_acc, hold_acc, time.perf_counter() - t

    def with_params(self, state: TrainState, params: FlatParams | np.ndarray) -> TrainState:
        """`state` with new parameters (mixed, or the server's global model)."""
        return self.local.trainer.with_params(state, params)

    def save(self, state: TrainState, round_: int) -> None:
        """Checkpoint `state` after `round_` (and the DP releases made so far)."""
        checkpoint.save(self.checkpoint, state, round_, self.releases)

    def restore(self, resume: bool) -> checkpoint.Checkpoint | None:
        """The checkpoint to go on from when resuming and there is one, else None."""
        if resume and self.checkpoint.exists():
            saved = checkpoint.load(self.checkpoint, self.local.state)
            self.releases = saved.releases
            self.log.info("resumed", round=saved.round)
            return saved
        if resume:
            self.log.warning("no_checkpoint", path=str(self.checkpoint), starting="round 1")
        return None
