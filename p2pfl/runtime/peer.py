"""One gossip peer: local data -> trainer -> synchronous gossip rounds -> history.

A thin composition, built from the peer's `GossipPlan` and nothing else: the gossip
sockets (`Transport`, behind the link faults), the sync-gossip machine
(`p2pfl.protocol.sync`: the barrier, liveness, resends, what is dropped and why), the
core step and the plan's aggregation rule, the learning set-up, and the history and
checkpoint files. Threads, clocks, sockets and files are here; every protocol
decision is the machine's.

Round r: train, send the model (`SyncGossip.start_round`), drive the machine over the
sockets until it is done (`p2pfl.runtime.node.drive`: everything heard, or the
deadline), mix what came with the weights its degrees give, evaluate, record,
checkpoint. A `Ticker` thread sends the heartbeats the machine says are due, even
while this peer trains or straggles; the machine is called under one lock from both.
With `--resume`, the peer starts from its checkpoint and catches up first
(`p2pfl.protocol.catchup`); with a bootstrap coordinator it learns its neighbours'
addresses from it first (`p2pfl.protocol.bootstrap`).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import structlog

from p2pfl.config.plan import GossipPlan
from p2pfl.core.attacks import dissensus
from p2pfl.core.graphs import local_weights
from p2pfl.core.mixing import disagreement, stack_neighbourhood
from p2pfl.learning.trainer import TrainState, as_numpy
from p2pfl.net.links import GossipTransport, with_faults
from p2pfl.net.transport import Link, Transport
from p2pfl.protocol import wire
from p2pfl.protocol.bootstrap import Bootstrap
from p2pfl.protocol.catchup import CatchUp
from p2pfl.protocol.events import Event, Send
from p2pfl.protocol.sync import SyncGossip
from p2pfl.record.history import save_model
from p2pfl.record.rounds import PeerHistory
from p2pfl.runtime.learner import Learner
from p2pfl.runtime.node import decode, drain, drive, encode
from p2pfl.runtime.process import die
from p2pfl.runtime.ticker import Ticker

COUNTED = frozenset({"model", "heartbeat"})  # the sends a round's bytes_sent counts
log = structlog.get_logger()


class BootstrapError(RuntimeError):
    """No usable welcome from the bootstrap coordinator in time."""


class GossipPort:
    """The gossip sockets as the node loop sees them: checked events in, sends out.

    Model and heartbeat bytes that were queued count in the history (`counting`); a
    model that could not be queued is logged `send_dropped`. Safe to use from the
    round loop and the heartbeat thread at once.
    """

    def __init__(
        self,
        transport: GossipTransport,
        expect: wire.Expect,
        sender: int,
        history: PeerHistory,
        logger: Any,
        counting: bool = True,
    ) -> None:
        self.transport, self.expect, self.sender = transport, expect, sender
        self.history, self.log, self.counting = history, logger, counting

    def receive(self, timeout_s: float) -> Event | None:
        envelope = self.transport.recv(timeout_s)
        if envelope is None:
            return None
        return decode(envelope.frames, self.expect, envelope.origin, envelope.authenticated)

    def carry_out(self, sends: Sequence[Send]) -> None:
        for send in sends:
            assert isinstance(send.to, int)
            frames = encode(send, self.sender, self.expect.scenario)
            if self.transport.send(send.to, frames):
                if self.counting and send.type in COUNTED:
                    self.history.sent(wire.frames_size(frames))
            elif send.type == "model":
                self.log.info("send_dropped", to=send.to, reason="neighbour queue full")

    def quiet(self) -> GossipPort:
        """The same sockets, counting nothing (the catch-up and the byes)."""
        return GossipPort(self.transport, self.expect, self.sender, self.history, self.log, False)


class _CoordinatorPort:
    """The link to the bootstrap coordinator as the node loop sees it (bytes not counted:
    the hello and the welcome belong to no round)."""

    def __init__(self, link: Link, expect: wire.Expect, sender: int) -> None:
        self.link, self.expect, self.sender = link, expect, sender

    def receive(self, timeout_s: float) -> Event | None:
        envelope = self.link.recv(timeout_s)
        if envelope is None:
            return None
        return decode(envelope.frames, self.expect, envelope.origin, envelope.authenticated)

    def carry_out(self, sends: Sequence[Send]) -> None:
        for send in sends:
            self.link.send(encode(send, self.sender, self.expect.scenario))


class GossipPeer:
    """Owns one peer's sockets, machine, heartbeat thread and files; `run` does every round."""

    def __init__(self, plan: GossipPlan) -> None:
        self.plan = p = plan
        self.id = p.peer_id
        self.log = log.bind(peer=p.peer_id)
        self.learner = Learner(plan, self.log)
        n_params = self.learner.n_params
        self.expect = wire.Expect(p.run.digest, p.run.peers - 1, {"params": (n_params,)})
        self.transport = with_faults(
            Transport(p.address, p.neighbour_addresses, self.expect.max_frames, p.keys),
            delay_ms=p.faults.link_delay_ms,
            drop=p.faults.link_drop,
            seed=list(p.faults.link_seed),  # which messages the link loses
        )
        self.history = PeerHistory(p.run.out / f"peer-{p.peer_id}.jsonl", append=p.resume)
        self.port = GossipPort(self.transport, self.expect, p.peer_id, self.history, self.log)
        self.lock = threading.Lock()  # around every call of the machines: loop and ticker
        config = dataclasses.replace(p.sync, samples=self.learner.local.data.n_train)
        craft = self._craft if p.gains else None
        self.sync = SyncGossip(config, time.monotonic(), self.log, craft)
        self.ticker: Ticker | None = None
        self.link: Link | None = None
        self.boot: Bootstrap | None = None
        self.boot_port: _CoordinatorPort | None = None

    def _craft(self, j: int, theirs: wire.Chunked, ours: np.ndarray) -> np.ndarray:
        """Dissensus: the model for honest neighbour `j`, from its own and ours."""
        return dissensus(np.asarray(theirs), ours, self.plan.gains[j])

    def _beat(self) -> None:
        """Ticker thread: the heartbeats the machine says are due."""
        with self.lock:
            sends = self.sync.heartbeats(time.monotonic())
        self.port.carry_out(sends)

    def _bootstrap(self) -> None:
        """Register with the coordinator and connect to the neighbours it names.

        Only the welcome is needed: once connected, the peer never talks to the
        coordinator again except for a best-effort bye, so gossip goes on if it dies.
        """
        p = self.plan
        assert p.bootstrap is not None
        coordinator = wire.Expect(p.run.digest, p.run.peers, {})
        self.link = Link(p.bootstrap, None, coordinator.max_frames, p.keys, p.run.peers)
        self.boot_port = port = _CoordinatorPort(self.link, coordinator, self.id)
        limit = p.sync.startup_timeout_s
        boot = Bootstrap(
            self.id, p.address, p.sync.neighbours, p.run.peers, limit, time.monotonic(), self.log
        )
        port.carry_out(boot.hello())
        drive(boot, port, boot.done)
        if boot.addresses is None:
            raise BootstrapError(
                f"peer {self.id}: no welcome from the coordinator at {p.bootstrap} within "
                f"{limit:g} s (gossip.startup_timeout_s)"
            )
        for j, addr in boot.addresses.items():
            self.transport.connect(j, addr)
        self.log.info("bootstrapped", coordinator=p.bootstrap, neighbours=boot.addresses)
        self.boot = boot

    def _round(self, round_: int, state: TrainState) -> TrainState:
        p = self.plan
        trained = self.learner.train(state, round_)
        state, own = trained.state, trained.model
        t = time.perf_counter()
        with self.lock:
            sends = self.sync.start_round(round_, trained.sent, time.monotonic())
        self.port.carry_out(sends)
        seen = drive(self.sync, self.port, self.sync.done, lock=self.lock, drain_first=True)
        with self.lock:
            got, late = self.sync.take(time.monotonic())
        self.port.carry_out(late)  # dissensus: the plain model where nothing was crafted
        self.history.received(seen.received_bytes)
        self.history.waited(seen.blocked_s)
        degrees = {j: degree for j, (_, degree) in got.models.items()}
        weights = local_weights(p.mixing, p.sync.degree, degrees)
        stack, w = stack_neighbourhood(  # [degree, d], zero rows for those not heard
            p.sync.neighbours, {j: x for j, (x, _) in got.models.items()}, weights, own.size
        )
        params, spread = self._mix(own, stack, w)
        if np.isfinite(params).all():
            state = self.learner.with_params(state, params)
        else:  # finite but huge neighbour values can overflow float32 when summed
            self.log.error("mixed_model_not_finite", heard=got.heard, kept="own model")
        comm_s = time.perf_counter() - t - seen.blocked_s

        test_acc, hold_acc, eval_s = self.learner.evaluate(state.params)
        self.history.write(
            round_,
            test_accuracy=test_acc,
            holdout_accuracy=hold_acc,
            evaluated_on="mixed",
            train_loss=trained.loss,
            train_s=trained.train_s,
            eval_s=eval_s,
            comm_s=comm_s,
            heard=got.heard,
            missing=got.missing,
            disagreement=spread,
            dp=self.learner.spent(round_),
        )
        if p.run.every_round:
            path = p.run.out / "models" / f"round-{round_}" / f"peer-{self.id}.npz"
            save_model(path, as_numpy(state.params))
        self.log.info("round_done", holdout_accuracy=hold_acc, heard=len(got.heard))
        return state

    def _mix(
        self, own: np.ndarray, stack: np.ndarray, weights: np.ndarray
    ) -> tuple[np.ndarray, float]:
        """The round's new model under the plan's aggregator, and the disagreement figure."""
        try:
            mixed = self.plan.aggregator(own, stack, weights)
        except ValueError as exc:  # e.g. clipping would overflow float32
            self.log.error("aggregation_failed", reason=str(exc), kept="own model")
            return own, float(disagreement(own, stack, weights))
        return np.asarray(mixed.params), float(mixed.disagreement)

    def _restore(self) -> tuple[TrainState, int]:
        """The checkpointed state and its round (`--resume`), or the initial state."""
        saved = self.learner.restore(self.plan.resume)
        if saved is not None:
            return saved.state, saved.round
        initial = self.learner.local.state
        test_acc, hold_acc, eval_s = self.learner.evaluate(initial.params)
        self.history.write(
            0,
            test_accuracy=test_acc,
            holdout_accuracy=hold_acc,
            evaluated_on="initial",
            eval_s=eval_s,
            dp=self.learner.spent(0),
        )
        return initial, 0

    def _catch_up(self, state: TrainState, last: int) -> tuple[TrainState, int]:
        """After a restart: the neighbours' newest models (the catch-up machine), combined
        by the plan's catch-up rule (their mean, or with a robust aggregator their
        coordinate-wise median); go on from the round after the newest of them."""
        with self.lock:
            catch = CatchUp(self.sync, last, time.monotonic())
        drive(catch, self.port.quiet(), catch.done, lock=self.lock)
        got = catch.result()
        if got.to_round == last:
            self.log.info("catch_up_found_nobody", continuing_from=last + 1)
            return state, last
        models = np.stack([np.asarray(got.models[j][1]) for j in sorted(got.models)])
        params = np.asarray(self.plan.catch_up(models, np.ones(len(models), np.float32)))
        if not np.isfinite(params).all():
            self.log.error("caught_up_model_not_finite", kept="checkpoint")
            return state, last
        self.log.info(
            "caught_up",
            from_round=last,
            to_round=got.to_round,
            neighbours={str(j): r for j, (r, _) in sorted(got.models.items())},
            resent=got.resent,
        )
        return self.learner.with_params(state, params), got.to_round

    def run(self) -> None:
        """Every round of the run, then the final model to `models/peer-<id>.npz`.

        The state is checkpointed after every round; with `--resume` the peer starts
        from its checkpoint and catches up with its neighbours first.
        """
        p = self.plan
        state, last = self._restore()
        if p.bootstrap is not None:
            self._bootstrap()
        with self.lock:
            self.sync.enter(last)
        # ticking at half the interval: no neighbour waits more than 1.5 x heartbeat_s
        self.ticker = Ticker(p.sync.heartbeat_s / 2, self._beat)
        if last > 0:
            state, last = self._catch_up(state, last)
        self.log.info(
            "peer_started", neighbours=list(p.sync.neighbours), params=self.learner.n_params
        )
        crash = None if p.resume else p.faults.crash_round
        for r in range(last + 1, p.run.rounds + 1):
            with self.lock:
                self.sync.enter(r)
            structlog.contextvars.bind_contextvars(round=r)
            if r == crash:
                die(self.log)
            state = self._round(r, state)
            self.learner.save(state, r)
        structlog.contextvars.unbind_contextvars("round")
        self.ticker.stop()
        # the byes already in: those neighbours are done, so `close` drops what is queued
        # for them instead of holding the exit for the whole linger
        drain(self.sync, self.port, lock=self.lock)
        self.port.quiet().carry_out(self.sync.bye())  # no alarm: they stop waiting for us
        save_model(p.run.out / "models" / f"peer-{self.id}.npz", as_numpy(state.params))
        if self.boot is not None and self.boot_port is not None:  # best effort: it may be gone
            self.boot_port.carry_out(self.boot.bye())
        self.log.info("peer_finished", rounds=p.run.rounds)

    def close(self) -> None:
        """Stop the heartbeats, flush the last sends, release the sockets and the history."""
        if self.ticker is not None:
            self.ticker.stop()
        with self.lock:  # neighbours that said bye or went silent read nothing more
            done = frozenset(self.sync.liveness.gone)
        self.transport.close(done=done)
        if self.link is not None:
            self.link.close()
        self.history.close()


def run_peer(plan: GossipPlan) -> None:
    """Run one gossip peer to completion; sockets are closed even on error."""
    peer = GossipPeer(plan)
    try:
        peer.run()
    finally:
        peer.close()
