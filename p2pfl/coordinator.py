"""The coordinator: a bootstrap registry for gossip, and the classic centralized FedAvg server.

Bootstrap (gossip mode, `coordinator.bootstrap = true`): peers say hello with their
address; each gets a welcome with its neighbours' addresses as soon as all of them
have registered. After that the peers never need the coordinator again.

Server (`mode = "centralized"`): the talk's server, over ZeroMQ. Peers connect
(hello / welcome, the talk's connection_received); once `min_peers` are alive a round
starts: a sample of them gets start_round with the global model; each trains and
pushes its update (model, sample count, loss) on the update channel; the round closes
when every sampled update is in, or at its deadline with whoever is in (at least
`min_updates`; otherwise the round is recorded as missed and the global model kept).
Updates are averaged (FedAvg, weighted by sample count or uniformly), the result is
evaluated on the common holdout and written to `coordinator.jsonl`, and the next round
starts. At the end every peer gets end_session with the final model and says bye.

Unlike the talk's server: nothing is unpickled; a round starts with *at least*
`min_peers` (peers that join later take part from the next round); every update is
averaged whole; a round waits on sockets with a deadline, not a fixed idle timeout;
history is written every round. One message carries an update and its metrics, so
there is no race between the talk's fl_update event and its Kafka record.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from p2pfl import wire
from p2pfl.history import HistoryWriter, ServerRecord, save_model
from p2pfl.scenario import Scenario, check_tcp
from p2pfl.topology import build_graph
from p2pfl.transport import Hub

END_WAIT_S = 5.0  # after end_session, how long to wait for every peer's bye
MAX_SAMPLES = 2**31 - 1  # largest sample count an update may claim
log = structlog.get_logger()


class SessionAbortedError(RuntimeError):
    """The server gave up (too few peers); peers were told why in end_session."""


@dataclass
class _Member:
    """A peer the coordinator has heard say hello, and when it last heard from it."""

    routing_id: bytes
    last_heard: float
    address: str | None = None
    welcomed: bool = False


@dataclass(frozen=True)
class _Update:
    params: wire.Chunked
    samples: int
    loss: float | None


class Coordinator:
    """Owns the coordinator's sockets and history; `serve` (centralized) or `bootstrap`
    (gossip) runs its role to the end."""

    def __init__(self, scenario: Scenario, out_dir: Path) -> None:
        self.s = scenario
        self.id = scenario.peers  # the sender id the coordinator stamps on its messages
        self.out_dir = out_dir
        self.centralized = scenario.mode == "centralized"
        shapes: dict[str, tuple[int, ...]] = {}
        if self.centralized:
            from p2pfl.learning.local import build_server
            from p2pfl.learning.trainer import as_numpy

            self.server = build_server(scenario)
            self.global_params = as_numpy(self.server.params)
            shapes = {"params": (self.server.trainer.n_params,)}
        self.expect = wire.Expect(scenario.digest(), scenario.peers - 1, shapes)
        control, updates = scenario.coordinator_addresses()
        self.hub = Hub(control, updates if self.centralized else None, self.expect.max_frames)
        self.graph = build_graph(scenario.topology, scenario.seed, scenario.base_dir)
        self.members: dict[int, _Member] = {}
        self.left: set[int] = set()
        self.round = 0
        self.sampled: list[int] = []  # this round's sample, once start_round has gone out
        self.expected: set[int] = set()  # sampled peers whose update may still come
        self.closed = 0  # the last round closed: updates for it or earlier are late
        self.updates: dict[int, _Update] = {}
        self.ending = False  # end_session has gone out
        self.end_unsent: set[int] = set()  # peers end_session could not be queued for
        self.sent = self.received = 0  # bytes this round
        self.last_beat = 0.0
        self.quorum_wait_s = 0.0
        self.t0 = time.perf_counter()
        self.history: HistoryWriter | None = None
        role = "server" if self.centralized else "bootstrap"
        self.log = log.bind(peer="coordinator", role=role)
        self.log.info("coordinator_started", control=control, updates=updates, peers=self.s.peers)

    # -- messages ------------------------------------------------------------------

    def _drop(self, reason: str, **fields: object) -> None:
        self.log.warning("message_dropped", reason=reason, **fields)

    def _send(self, peer: int, msg_type: str, meta: dict[str, Any], params: Any = None) -> bool:
        arrays = {"params": params} if params is not None else None
        frames = wire.encode(msg_type, self.id, self.round, self.expect.scenario, meta, arrays)
        if self.hub.send(self.members[peer].routing_id, frames):
            self.sent += wire.frames_size(frames)
            return True
        self.log.info("send_dropped", to=peer, type=msg_type)
        return False

    def _poll(self, timeout_s: float) -> None:
        """Handle at most one message arriving within `timeout_s`; send heartbeats when due."""
        if self.centralized:
            timeout_s = min(timeout_s, self.s.centralized.heartbeat_s)
        got = self.hub.recv(max(0.0, timeout_s))
        self._heartbeat()
        if got is None:
            return
        routing_id, frames = got
        self.received += wire.frames_size(frames)
        try:
            msg = wire.decode(frames, self.expect)
        except wire.WireError as exc:
            self._drop(str(exc), channel="control" if routing_id is not None else "updates")
            return
        if routing_id is None:
            self._on_update(msg)
        else:
            self._on_control(routing_id, msg)

    def _on_control(self, routing_id: bytes, msg: wire.Message) -> None:
        member = self.members.get(msg.sender)
        if msg.type == "hello":
            self._on_hello(routing_id, msg)
        elif member is None:
            self._drop("sender has not joined", sender=msg.sender, type=msg.type)
        elif member.routing_id != routing_id:
            self._drop("sender id claimed from another connection", sender=msg.sender)
        elif msg.type == "heartbeat":
            member.last_heard = time.monotonic()
        elif msg.type == "bye":
            del self.members[msg.sender]
            self.left.add(msg.sender)
            self.end_unsent.discard(msg.sender)
            self.expected.discard(msg.sender)  # its update, if any, is not coming
            self.log.info("peer_left", sender=msg.sender)
        else:
            self._drop(f"unexpected message type {msg.type!r} on the control channel")

    def _on_hello(self, routing_id: bytes, msg: wire.Message) -> None:
        address = msg.meta.get("address")
        if not self.centralized:
            try:
                check_tcp(address if isinstance(address, str) else "")
            except ValueError:
                self._drop("hello without a valid tcp:// address", sender=msg.sender)
                return
        back = msg.sender in self.members or msg.sender in self.left
        self.members[msg.sender] = _Member(routing_id, time.monotonic(), address)
        self.left.discard(msg.sender)
        self.expected.discard(msg.sender)  # restarted mid-round: it never got this start_round
        self.log.info("peer_joined", sender=msg.sender, rejoin=back, round=self.round)
        if not self.centralized:
            self._welcome_ready()
        elif self.ending:  # too late for any round: it gets the final model at once
            self._send_end(msg.sender)
        else:
            self._send(msg.sender, "welcome", {"round": self.round})

    def _welcome_ready(self) -> None:
        """Bootstrap: welcome every peer whose neighbours have all registered."""
        known = {i: m.address for i, m in self.members.items()}
        for i, m in self.members.items():
            neighbours = sorted(self.graph.neighbors(i))
            if m.welcomed or not all(known.get(j) for j in neighbours):
                continue
            m.welcomed = self._send(
                i, "welcome", {"neighbours": [[j, known[j]] for j in neighbours]}
            )

    def _on_update(self, msg: wire.Message) -> None:
        samples, loss = msg.meta.get("samples"), msg.meta.get("loss")
        if msg.type != "update":
            self._drop(f"unexpected message type {msg.type!r} on the update channel")
        elif msg.sender not in self.members:
            self._drop("update from a peer that has not joined", sender=msg.sender)
        elif msg.round <= self.closed:
            self.log.info("late_update", sender=msg.sender, msg_round=msg.round)
        elif msg.round != self.round or not self.sampled:
            self._drop(
                f"update for round {msg.round}, the open round is "
                f"{self.round if self.sampled else 'none'}",
                sender=msg.sender,
            )
        elif msg.sender not in self.sampled:
            self._drop("update from a peer not sampled this round", sender=msg.sender)
        elif msg.sender in self.updates:
            self._drop("duplicate update for this round", sender=msg.sender)
        elif "params" not in msg.arrays:
            self._drop("update without params", sender=msg.sender)
        elif not (wire.is_int(samples) and 1 <= samples <= MAX_SAMPLES):
            self._drop("meta.samples missing or out of range", sender=msg.sender)
        elif loss is not None and not (isinstance(loss, float) and math.isfinite(loss)):
            self._drop("meta.loss is not a finite float", sender=msg.sender)
        else:
            self.members[msg.sender].last_heard = time.monotonic()
            self.updates[msg.sender] = _Update(msg.arrays["params"], samples, loss)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if not self.centralized or now - self.last_beat < self.s.centralized.heartbeat_s:
            return
        self.last_beat = now
        for peer in self._live():  # a peer silent past peer_timeout_s gets none until it speaks
            self._send(peer, "heartbeat", {})

    def _live(self) -> list[int]:
        limit = time.monotonic() - self.s.centralized.peer_timeout_s
        return sorted(i for i, m in self.members.items() if m.last_heard > limit)

    # -- bootstrap -----------------------------------------------------------------

    def bootstrap(self) -> None:
        """Answer hellos until every peer has said bye, or until a whole run's worth of
        time has passed since the last welcome (a peer that crashed never says bye)."""
        g = self.s.gossip
        idle_limit = g.startup_timeout_s + self.s.training.rounds * g.round_timeout_s
        last_change = time.monotonic()
        while len(self.left) < self.s.peers:
            known = (len(self.members), len(self.left))
            self._poll(1.0)
            if (len(self.members), len(self.left)) != known:
                last_change = time.monotonic()
            elif time.monotonic() - last_change > idle_limit:
                self.log.warning("bootstrap_gave_up", no_bye=sorted(self.members))
                return
        self.log.info("bootstrap_finished")

    # -- server --------------------------------------------------------------------

    def _await_quorum(self) -> None:
        """Wait (bounded) until at least `min_peers` peers are alive."""
        need, limit = self.s.min_peers, self.s.centralized.startup_timeout_s
        deadline = time.monotonic() + limit
        if len(self._live()) < need:
            self.log.info("waiting_for_peers", live=len(self._live()), need=need)
        while len(live := self._live()) < need:
            if time.monotonic() >= deadline:
                reason = (
                    f"only {len(live)} of the {need} peers needed (centralized.min_peers) "
                    f"were connected after {limit:g} s"
                )
                for peer in list(self.members):
                    self._send(peer, "end_session", {"error": reason})
                raise SessionAbortedError(reason)
            self._poll(deadline - time.monotonic())

    def _sample(self, live: list[int]) -> list[int]:
        c = self.s.centralized
        k = min(len(live), max(c.min_updates, math.ceil(c.fraction * len(live))))
        rng = np.random.default_rng([self.s.seed, self.round, 3])
        return sorted(int(i) for i in rng.choice(live, size=k, replace=False))

    def _evaluate(self) -> tuple[float, float]:
        import jax

        results = jax.device_get(
            self.server.trainer.evaluate_sets(self.global_params, (self.server.holdout,))
        )
        return float(results[0][0]), float(results[0][1])

    def _record(
        self, closed_by: str, sampled: list[int], connected: list[int], t_round: float, agg_s: float
    ) -> None:
        t = time.perf_counter()
        acc, loss = self._evaluate()
        eval_s = time.perf_counter() - t
        got = self.updates
        participants = sorted(got) if closed_by != "quorum_missed" else []
        losses = [(u.samples, u.loss) for u in got.values() if u.loss is not None]
        train_loss = None
        if losses and closed_by != "quorum_missed":
            train_loss = sum(n * x for n, x in losses) / sum(n for n, _ in losses)
        assert self.history is not None
        self.history.write(
            ServerRecord(
                round=self.round,
                holdout_accuracy=acc,
                holdout_loss=loss,
                train_loss=train_loss,
                sampled=sampled,
                participants=participants,
                missing=sorted(set(sampled) - set(participants)),
                connected=connected,
                closed_by=closed_by,
                bytes_sent=self.sent,
                bytes_received=self.received,
                quorum_wait_s=self.quorum_wait_s,
                round_s=time.perf_counter() - t_round,
                aggregate_s=agg_s,
                eval_s=eval_s,
                t=time.perf_counter() - self.t0,
                time=time.time(),
            )
        )
        self.sent = self.received = 0
        if self.s.output.models == "every_round" and self.round > 0:
            save_model(
                self.out_dir / "models" / f"round-{self.round}" / "global.npz", self.global_params
            )
        self.log.info("round_closed", round=self.round, closed_by=closed_by, holdout_accuracy=acc)

    def _round(self, last: bool) -> None:
        c = self.s.centralized
        t = time.perf_counter()
        self._await_quorum()
        self.quorum_wait_s = time.perf_counter() - t
        t_round = time.perf_counter()
        connected = self._live()
        self.sampled = self._sample(connected)
        self.expected = set(self.sampled)
        self.updates = {}
        for peer in self.sampled:
            if not self._send(peer, "start_round", {}, self.global_params):
                self.expected.discard(peer)  # gone or its queue is full: not worth waiting for
        deadline = time.monotonic() + c.round_timeout_s
        while self.expected - set(self.updates) and time.monotonic() < deadline:
            self._poll(deadline - time.monotonic())
        if len(self.updates) < c.min_updates:
            closed_by = "quorum_missed"
        elif len(self.updates) == len(self.sampled):
            closed_by = "all_in"
        elif self.expected <= set(self.updates):
            closed_by = "early"  # the others left, restarted or could not be reached
        else:
            closed_by = "deadline"
        missing = sorted(set(self.sampled) - set(self.updates))
        if missing:
            self.log.warning("round_missing_updates", missing=missing, closed_by=closed_by)
        t = time.perf_counter()
        if closed_by != "quorum_missed":
            weights = {
                j: float(u.samples) if c.weighting == "samples" else 1.0
                for j, u in self.updates.items()
            }
            self.global_params = self._aggregate(weights)
        aggregate_s = time.perf_counter() - t
        if last:  # end_session goes out with the last round, so its bytes are on its line
            self._end()
        self._record(closed_by, self.sampled, connected, t_round, aggregate_s)
        self.closed = self.round  # updates for this round are late from now on
        self.sampled, self.expected, self.updates = [], set(), {}

    def _aggregate(self, weights: dict[int, float]) -> np.ndarray:
        """The new global model from this round's updates under `centralized.aggregator`."""
        from p2pfl.gossip import weighted_mean
        from p2pfl.robust import server_aggregate

        c = self.s.centralized
        if c.aggregator == "mean":  # FedAvg, read chunk by chunk (the path gossip matches)
            return weighted_mean({j: u.params for j, u in self.updates.items()}, weights)
        ids = sorted(self.updates)
        return server_aggregate(
            c.aggregator,
            np.stack([np.asarray(self.updates[j].params) for j in ids]),
            np.array([weights[j] for j in ids]),
            trim=c.trim,
            f=c.krum_f,
        )

    def _send_end(self, peer: int) -> None:
        if self._send(peer, "end_session", {}, self.global_params):
            self.end_unsent.discard(peer)
        else:
            self.end_unsent.add(peer)  # retried while waiting for the byes

    def _end(self) -> None:
        """end_session with the final model to every peer."""
        self.ending = True
        for peer in list(self.members):
            self._send_end(peer)

    def _await_byes(self) -> None:
        """Wait (bounded) for every peer's bye, resending end_session where it failed."""
        deadline = time.monotonic() + max(END_WAIT_S, self.s.centralized.coordinator_timeout_s)
        while self.members and time.monotonic() < deadline:
            for peer in sorted(self.end_unsent & set(self.members)):
                self._send_end(peer)
            self._poll(min(0.1, deadline - time.monotonic()))
        if self.members:
            self.log.warning("no_bye", peers=sorted(self.members))

    def serve(self) -> None:
        """The whole centralized session: quorum, every round, end_session, byes."""
        self.history = HistoryWriter(self.out_dir / "coordinator.jsonl")
        self._record("initial", [], [], time.perf_counter(), 0.0)
        rounds = self.s.training.rounds
        for r in range(1, rounds + 1):
            self.round = r
            structlog.contextvars.bind_contextvars(round=r)
            self._round(last=r == rounds)
        structlog.contextvars.unbind_contextvars("round")
        if rounds == 0:  # nothing to train: hand the initial model to whoever came
            self._await_quorum()
            self._end()
        save_model(self.out_dir / "models" / "global.npz", self.global_params)
        self._await_byes()
        self.log.info("session_finished", rounds=rounds)

    def close(self) -> None:
        """Release the sockets and the history file."""
        self.hub.close()
        if self.history is not None:
            self.history.close()


def run_coordinator(scenario: Scenario, out_dir: Path) -> None:
    """Run the coordinator in the role the scenario needs; sockets closed even on error."""
    coordinator = Coordinator(scenario, out_dir)
    try:
        if coordinator.centralized:
            coordinator.serve()
        else:
            coordinator.bootstrap()
    finally:
        coordinator.close()
