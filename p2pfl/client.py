"""A peer in centralized mode: the talk's node, working for the FedAvg server.

It says hello (with its sample count) on the control channel, then waits. A
start_round brings the global model of the round before: the peer evaluates it
(history line for that round), trains on its shard, and pushes its update (model,
sample count, loss) on the update channel. end_session brings the final model: the
peer evaluates and saves it, says bye and exits 0.

Every round it trained in is checkpointed (`p2pfl/checkpoint.py`); with `--resume` a
restarted peer takes its optimizer state and PRNG key from there, appends to its
history, and says hello again: the server's next start_round brings the global model.

The peer sends a heartbeat every `centralized.heartbeat_s` and treats any message as
a sign of life. If the coordinator is silent for `coordinator_timeout_s` (before the
welcome: `startup_timeout_s`), or ends the session with an error, the peer raises
`CoordinatorLostError`, which the CLI turns into a clear message and exit code 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from p2pfl import checkpoint, wire
from p2pfl.faults import die, poison
from p2pfl.history import HistoryWriter, RoundRecord, save_model
from p2pfl.learning.local import build, evaluate
from p2pfl.learning.trainer import FlatParams, TrainState, as_numpy
from p2pfl.scenario import Scenario
from p2pfl.transport import Link

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


class FedClient:
    """Owns one centralized-mode peer's link to the coordinator and its history file."""

    def __init__(
        self, scenario: Scenario, peer_id: int, out_dir: Path, resume: bool = False
    ) -> None:
        self.s = scenario
        self.resume = resume
        self.id = peer_id
        self.out_dir = out_dir
        self.local = build(scenario, peer_id)
        self.samples = int(self.local.data.x_train.shape[0])
        n_params = self.local.trainer.n_params
        self.expect = wire.Expect(scenario.digest(), scenario.peers, {"params": (n_params,)})
        self.coordinator = scenario.coordinator_addresses()
        self.link = Link(*self.coordinator, self.expect.max_frames)
        self.history = HistoryWriter(out_dir / f"peer-{peer_id}.jsonl", append=resume)
        self.checkpoint = checkpoint.path_for(out_dir, peer_id)
        self.log = log.bind(peer=peer_id)
        self.t0 = time.perf_counter()
        self.welcomed = False
        self.last_heard = self.last_sent = time.monotonic()
        self.sent = self.received = 0  # bytes since the last history line
        self.wait_s = 0.0
        self.last_size = 0  # bytes of the last message read
        self.cpu0 = 0.0
        self.recorded = -1  # the last round with a history line
        self.trained: _Trained | None = None
        self.attack = scenario.byzantine(peer_id)
        self.rng = np.random.default_rng([scenario.seed, peer_id, 11])  # the attack's noise

    # -- messages ------------------------------------------------------------------

    def _send(
        self, msg_type: str, round_: int, meta: dict, params: np.ndarray | None = None
    ) -> None:
        arrays = {"params": params} if params is not None else None
        frames = wire.encode(msg_type, self.id, round_, self.expect.scenario, meta, arrays)
        ok = self.link.push(frames) if msg_type == "update" else self.link.send(frames)
        if ok:
            self.sent += wire.frames_size(frames)
        else:
            self.log.info("send_dropped", to="coordinator", type=msg_type)
        self.last_sent = time.monotonic()

    def _lost(self, reason: str) -> CoordinatorLostError:
        self.log.error("coordinator_lost", reason=reason, coordinator=self.coordinator[0])
        return CoordinatorLostError(f"peer {self.id}: {reason} (coordinator {self.coordinator[0]})")

    def _receive(self, timeout_s: float) -> wire.Message | None:
        """One checked message from the coordinator within `timeout_s` (heartbeats included)."""
        t = time.perf_counter()
        frames = self.link.recv(timeout_s)
        self.wait_s += time.perf_counter() - t
        if frames is None:
            return None
        self.last_size = wire.frames_size(frames)
        self.received += self.last_size
        try:
            msg = wire.decode(frames, self.expect)
        except wire.WireError as exc:
            self.log.warning("message_dropped", reason=str(exc))
            return None
        if msg.sender != self.s.peers:
            self.log.warning(
                "message_dropped", reason="not from the coordinator", sender=msg.sender
            )
            return None
        self.last_heard = time.monotonic()
        return msg

    def _next(self) -> wire.Message:
        """The newest welcome / start_round / end_session, heartbeating while it waits.

        Messages already queued behind a start_round are read at once, so a peer that
        fell behind (a straggler) skips to the newest round instead of replaying old ones.
        """
        c = self.s.centralized
        found: wire.Message | None = None
        while True:
            limit = c.coordinator_timeout_s if self.welcomed else c.startup_timeout_s
            if self.welcomed and time.monotonic() - self.last_sent >= c.heartbeat_s:
                self._send("heartbeat", 0, {})
            msg = self._receive(0.0 if found is not None else min(c.heartbeat_s, limit))
            if msg is None:
                if self.link.control.poll(0):
                    continue  # the message read was dropped; more are queued
                if found is not None:
                    return found
                # Silence counts only while waiting with nothing queued: a long training
                # round is not the coordinator's silence, its heartbeats wait in the queue.
                if time.monotonic() - self.last_heard > limit:
                    what = "no welcome" if not self.welcomed else "no message"
                    raise self._lost(f"{what} from the coordinator for {limit:g} s")
                continue
            if msg.type == "welcome" and not self.welcomed:
                self.welcomed = True
                self.log.info("joined", round=msg.meta.get("round"))
            elif msg.type in ("start_round", "end_session"):
                if found is not None:
                    self.log.info("skipped_round", skipped=found.round, newer=msg.round)
                found = msg
            elif msg.type != "heartbeat":
                self.log.warning("message_dropped", reason=f"unexpected type {msg.type!r}")

    # -- rounds --------------------------------------------------------------------

    def _record(
        self, round_: int, params: FlatParams, evaluated_on: str, global_params: np.ndarray | None
    ) -> None:
        """The history line of `round_`, with the accuracy of `params` (see `_adopt`)."""
        t = time.perf_counter()
        test_acc, hold_acc = evaluate(self.local.trainer, params, self.local.data)
        eval_s = time.perf_counter() - t
        mine = self.trained if self.trained and self.trained.round == round_ else None
        disagreement = None
        if mine is not None and global_params is not None:
            disagreement = float(np.linalg.norm(mine.model - global_params))
        self.history.write(
            RoundRecord(
                round=round_,
                train_loss=mine.loss if mine else None,
                test_accuracy=test_acc,
                holdout_accuracy=hold_acc,
                bytes_sent=self.sent,
                bytes_received=self.received,
                train_s=mine.train_s if mine else 0.0,
                eval_s=eval_s,
                comm_s=0.0,
                wait_s=self.wait_s,
                cpu_s=time.process_time() - self.cpu0,
                neighbours_heard=[],
                neighbours_missing=[],
                disagreement=disagreement,
                t=time.perf_counter() - self.t0,
                time=time.time(),
                evaluated_on=evaluated_on,
            )
        )
        self.sent = self.received = 0
        self.wait_s = 0.0
        self.cpu0 = time.process_time()
        self.recorded = round_

    def _adopt(
        self, done: int, model: wire.Chunked, state: TrainState
    ) -> tuple[TrainState, np.ndarray]:
        """Take the global model after round `done` (start_round of round `done + 1`
        carries it, and end_session the final one).

        Its round gets a history line evaluated on it. A round this peer trained in whose
        global model it never received (it was not sampled in the next round) gets its
        line first, evaluated on the update the peer sent: the best model it had then.
        """
        params = np.asarray(model)
        mine = self.trained
        if mine is not None and self.recorded < mine.round < done:
            self.received -= self.last_size  # the model that just came belongs to `done`
            self._record(mine.round, mine.model, "update", None)
            self.received += self.last_size
        state = self.local.trainer.with_params(state, params)
        if done > self.recorded:
            self._record(done, state.params, "global", params)
        return state, params

    def _train(self, round_: int, state: TrainState) -> TrainState:
        t = time.perf_counter()
        state, loss = self.local.trainer.train(
            state, self.local.data.x_train, self.local.data.y_train
        )
        model = as_numpy(state.params)
        train_s = time.perf_counter() - t
        delay = self.s.slow_delay(self.id)
        if delay:
            time.sleep(delay)  # an injected straggler (faults.slow), on purpose
        meta = {"samples": self.samples, "loss": float(loss)}
        sent = model if self.attack is None else poison(self.attack, model, self.rng)
        self._send("update", round_, meta, sent)
        self.trained = _Trained(round_, float(loss), model, train_s)
        checkpoint.save(self.checkpoint, state, round_)
        return state

    def _restore(self) -> TrainState:
        """The checkpointed state (`--resume`: its optimizer state and key count; the
        parameters are replaced by the next global model), or the initial state."""
        if self.resume and self.checkpoint.exists():
            saved = checkpoint.load(self.checkpoint, self.local.state)
            # its rounds before that are in the history; the line of saved.round itself
            # waited for the next global model, and the crash came first
            self.recorded = saved.round
            self.log.info("resumed", round=saved.round)
            return saved.state
        if self.resume:
            self.log.warning("no_checkpoint", path=str(self.checkpoint), starting="round 1")
        self._record(0, self.local.state.params, "initial", None)
        return self.local.state

    def run(self) -> None:
        """Join, train whenever sampled, and finish with the final global model."""
        state = self._restore()
        # Compile before saying hello: a sampled peer's first round must not spend the
        # round's deadline compiling (the gossip loop allows round 1 extra time instead).
        d = self.local.data
        self.local.trainer.train.lower(state, d.x_train, d.y_train).compile()  # type: ignore[attr-defined]
        self._send("hello", 0, {"samples": self.samples})
        self.log.info("peer_started", coordinator=self.coordinator[0], samples=self.samples)
        crash = None if self.resume else self.s.crash_round(self.id)
        while True:
            msg = self._next()
            if msg.type == "end_session":
                break
            if "params" not in msg.arrays:
                self.log.warning("message_dropped", reason="start_round without params")
                continue
            structlog.contextvars.bind_contextvars(round=msg.round)
            if crash is not None and msg.round >= crash:
                die(self.log)
            state, _ = self._adopt(msg.round - 1, msg.arrays["params"], state)
            state = self._train(msg.round, state)
        structlog.contextvars.unbind_contextvars("round")
        error = msg.meta.get("error")
        if error is not None or "params" not in msg.arrays:
            raise self._lost(f"the coordinator ended the session: {error or 'no final model'}")
        state, params = self._adopt(msg.round, msg.arrays["params"], state)
        save_model(self.out_dir / "models" / f"peer-{self.id}.npz", params)
        self._send("bye", msg.round, {})
        self.log.info("peer_finished", rounds=msg.round)

    def close(self) -> None:
        """Flush the bye and release the sockets and the history file."""
        self.link.close()
        self.history.close()


def run_client(scenario: Scenario, peer_id: int, out_dir: Path, resume: bool = False) -> None:
    """Run one centralized-mode peer to the end of the session; sockets closed even on error."""
    client = FedClient(scenario, peer_id, out_dir, resume)
    try:
        client.run()
    finally:
        client.close()
