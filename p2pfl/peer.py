"""One gossip peer: local data -> trainer -> synchronous gossip rounds -> history.

Round r: train locally, send the model to every neighbour, wait (poll with a
deadline, never sleep) for the neighbours' round-r models, mix them with
Metropolis–Hastings weights computed from the degrees they carry, evaluate, record.
A neighbour that misses the deadline is left out of that round (its weight stays with
this peer); one silent for `gone_after_rounds` rounds is no longer waited for, and is
taken back as soon as it is heard again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
import structlog

from p2pfl import wire
from p2pfl.gossip import mix
from p2pfl.history import HistoryWriter, RoundRecord
from p2pfl.learning.local import Local, build
from p2pfl.learning.trainer import FlatParams, TrainState, as_numpy
from p2pfl.scenario import Scenario
from p2pfl.topology import build_graph, local_weights
from p2pfl.transport import Transport

MAX_ROUNDS_AHEAD = 2  # models for rounds further ahead than this are dropped
MAX_DRAIN = 256  # messages read without waiting per round: a flood cannot stall the loop
log = structlog.get_logger()


@dataclass
class _Inbox:
    """Checked models waiting for their round, bounded by the rounds-ahead window."""

    models: dict[int, dict[int, tuple[wire.Chunked, int]]] = field(default_factory=dict)

    def put(self, round_: int, sender: int, params: wire.Chunked, degree: int) -> bool:
        slot = self.models.setdefault(round_, {})
        if sender in slot:
            return False
        slot[sender] = (params, degree)
        return True

    def heard(self, round_: int) -> set[int]:
        return set(self.models.get(round_, {}))

    def take(self, round_: int) -> dict[int, tuple[wire.Chunked, int]]:
        for r in [r for r in self.models if r < round_]:
            del self.models[r]
        return self.models.pop(round_, {})


class GossipPeer:
    """Owns one peer's sockets and history file; `run` does every round."""

    def __init__(self, scenario: Scenario, peer_id: int, out_dir: Path) -> None:
        self.s = scenario
        self.id = peer_id
        self.out_dir = out_dir
        graph = build_graph(scenario.topology, scenario.seed, scenario.base_dir)
        self.neighbours = sorted(graph.neighbors(peer_id))
        self.degree = len(self.neighbours)
        self.local: Local = build(scenario, peer_id)
        n_params = self.local.trainer.n_params
        self.expect = wire.Expect(scenario.digest(), scenario.peers - 1, {"params": (n_params,)})
        self.transport = Transport(
            scenario.address(peer_id),
            {j: scenario.address(j) for j in self.neighbours},
            self.expect.max_frames,
        )
        self.inbox = _Inbox()
        self.misses = dict.fromkeys(self.neighbours, 0)
        self.history = HistoryWriter(out_dir / f"peer-{peer_id}.jsonl")
        self.t0 = time.perf_counter()
        self.log = log.bind(peer=peer_id)

    # -- receiving ---------------------------------------------------------------

    def _drop(self, reason: str, **fields: object) -> None:
        self.log.warning("message_dropped", reason=reason, **fields)

    def _accept(self, frames: list[wire.Buffer], current: int) -> None:
        """Check one received message and keep it if it is a usable model."""
        try:
            msg = wire.decode(frames, self.expect)
        except wire.WireError as exc:
            self._drop(str(exc))
            return
        if msg.type != "model":
            self._drop(f"unexpected message type {msg.type!r} in gossip mode", sender=msg.sender)
        elif msg.sender not in self.misses:
            self._drop("sender is not a neighbour", sender=msg.sender)
        elif "params" not in msg.arrays:
            self._drop("model message without params", sender=msg.sender)
        elif msg.round > current + MAX_ROUNDS_AHEAD:
            self._drop("round too far ahead", sender=msg.sender, msg_round=msg.round)
        elif not (wire.is_int(d := msg.meta.get("degree")) and 1 <= d < self.s.peers):
            self._drop("meta.degree missing or out of range", sender=msg.sender)
        elif msg.round < current:
            self.log.debug("stale_model", sender=msg.sender, msg_round=msg.round)
        elif not self.inbox.put(msg.round, msg.sender, msg.arrays["params"], d):
            self._drop("duplicate model for this round", sender=msg.sender, msg_round=msg.round)

    def _gather(self, round_: int, deadline: float) -> tuple[int, float]:
        """Receive until every expected neighbour's round model is in or the deadline passes.

        Whatever is already queued is read too, even when nobody is waited for, so a
        neighbour that was given up on is heard (and taken back) as soon as it speaks.
        Returns (bytes received, seconds spent blocked in poll).
        """
        waiting = {j for j, m in self.misses.items() if m < self.s.gossip.gone_after_rounds}
        received, blocked, drained = 0, 0.0, 0
        while drained < MAX_DRAIN:
            pending = waiting - self.inbox.heard(round_)
            remaining = max(0.0, deadline - time.perf_counter()) if pending else 0.0
            drained += remaining == 0.0
            t = time.perf_counter()
            frames = self.transport.recv(remaining)
            blocked += time.perf_counter() - t
            if frames is None:
                return received, blocked
            received += sum(len(f) for f in frames)
            self._accept(frames, round_)
        return received, blocked

    # -- one round ---------------------------------------------------------------

    def _evaluate(self, params: FlatParams) -> tuple[float, float | None, float]:
        t = time.perf_counter()
        d = self.local.data
        sets: list[tuple[jax.Array, jax.Array]] = [(d.x_test, d.y_test)]
        if d.x_holdout is not None and d.y_holdout is not None:
            sets.append((d.x_holdout, d.y_holdout))
        results = jax.device_get(self.local.trainer.evaluate_sets(params, tuple(sets)))
        hold = float(results[1][0]) if len(results) > 1 else None
        return float(results[0][0]), hold, time.perf_counter() - t

    def _broadcast(self, round_: int, own: np.ndarray) -> int:
        frames = wire.encode(
            "model",
            self.id,
            round_,
            self.expect.scenario,
            {"degree": self.degree, "samples": int(self.local.data.x_train.shape[0])},
            {"params": own},
        )
        size = sum(len(memoryview(f).cast("B")) for f in frames)
        sent = 0
        for j in self.neighbours:
            if self.transport.send(j, frames):
                sent += size
            else:
                self.log.info("send_dropped", to=j, reason="neighbour queue full")
        return sent

    def _round(self, round_: int, state: TrainState) -> TrainState:
        trainer, d = self.local.trainer, self.local.data
        cpu0 = time.process_time()
        t = time.perf_counter()
        state, loss = trainer.train(state, d.x_train, d.y_train)
        own = as_numpy(state.params)
        train_s = time.perf_counter() - t

        t = time.perf_counter()
        sent = self._broadcast(round_, own)
        timeout = self.s.gossip.round_timeout_s
        if round_ == 1:
            timeout += self.s.gossip.startup_timeout_s
        received, wait_s = self._gather(round_, time.perf_counter() + timeout)
        got = self.inbox.take(round_)
        self._update_liveness(got)
        weights = local_weights(
            self.s.gossip.mixing, self.degree, {j: g[1] for j, g in got.items()}
        )
        mixed = mix(own, {j: g[0] for j, g in got.items()}, weights)
        if np.isfinite(mixed.params).all():
            state = trainer.with_params(state, mixed.params)
        else:  # finite but huge neighbour values can overflow float32 when summed
            self.log.error("mixed_model_not_finite", heard=sorted(got), kept="own model")
        comm_s = time.perf_counter() - t - wait_s

        test_acc, hold_acc, eval_s = self._evaluate(state.params)
        self.history.write(
            RoundRecord(
                round=round_,
                train_loss=float(loss),
                test_accuracy=test_acc,
                holdout_accuracy=hold_acc,
                bytes_sent=sent,
                bytes_received=received,
                train_s=train_s,
                eval_s=eval_s,
                comm_s=comm_s,
                wait_s=wait_s,
                cpu_s=time.process_time() - cpu0,
                neighbours_heard=sorted(got),
                neighbours_missing=sorted(set(self.neighbours) - set(got)),
                disagreement=mixed.disagreement,
                t=time.perf_counter() - self.t0,
            )
        )
        self.log.info("round_done", holdout_accuracy=hold_acc, heard=len(got))
        return state

    def _update_liveness(self, got: dict[int, tuple[wire.Chunked, int]]) -> None:
        limit = self.s.gossip.gone_after_rounds
        for j in self.neighbours:
            if j in got:
                if self.misses[j] >= limit:
                    self.log.info("neighbour_back", neighbour=j)
                self.misses[j] = 0
            else:
                self.misses[j] += 1
                if self.misses[j] == limit:
                    self.log.warning("neighbour_gone", neighbour=j, silent_rounds=limit)

    def run(self) -> None:
        """Every round of the scenario, then the final model to `models/peer-<id>.npz`."""
        state = self.local.state
        test_acc, hold_acc, eval_s = self._evaluate(state.params)
        self.history.write(
            RoundRecord(
                round=0,
                train_loss=None,
                test_accuracy=test_acc,
                holdout_accuracy=hold_acc,
                bytes_sent=0,
                bytes_received=0,
                train_s=0.0,
                eval_s=eval_s,
                comm_s=0.0,
                wait_s=0.0,
                cpu_s=time.process_time(),
                neighbours_heard=[],
                neighbours_missing=[],
                disagreement=None,
                t=time.perf_counter() - self.t0,
            )
        )
        self.log.info(
            "peer_started", neighbours=self.neighbours, params=self.local.trainer.n_params
        )
        for r in range(1, self.s.training.rounds + 1):
            structlog.contextvars.bind_contextvars(round=r)
            state = self._round(r, state)
        structlog.contextvars.unbind_contextvars("round")
        models = self.out_dir / "models"
        models.mkdir(parents=True, exist_ok=True)
        tmp = models / f"peer-{self.id}.tmp.npz"
        np.savez(tmp, params=as_numpy(state.params))
        tmp.replace(models / f"peer-{self.id}.npz")
        self.log.info("peer_finished", rounds=self.s.training.rounds)

    def close(self) -> None:
        """Flush the last sends and release the sockets and the history file."""
        self.transport.close()
        self.history.close()


def run_peer(scenario: Scenario, peer_id: int, out_dir: Path) -> None:
    """Run one peer to completion; sockets are closed even on error."""
    peer = GossipPeer(scenario, peer_id, out_dir)
    try:
        peer.run()
    finally:
        peer.close()
