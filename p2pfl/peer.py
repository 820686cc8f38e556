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

import numpy as np
import structlog

from p2pfl import checkpoint, wire
from p2pfl.faults import die, poison
from p2pfl.gossip import mix
from p2pfl.history import HistoryWriter, RoundRecord, save_model
from p2pfl.learning.local import Local, build, evaluate
from p2pfl.learning.trainer import FlatParams, TrainState, as_numpy
from p2pfl.robust import gossip_aggregate
from p2pfl.scenario import Scenario, check_tcp
from p2pfl.topology import build_graph, local_weights
from p2pfl.transport import Link, Transport

MAX_ROUNDS_AHEAD = 2  # models for rounds further ahead than this are dropped
MAX_DRAIN = 256  # messages read without waiting per round: a flood cannot stall the loop
log = structlog.get_logger()


@dataclass
class _Inbox:
    """Checked models waiting for their round, bounded by the rounds-ahead window."""

    models: dict[int, dict[int, tuple[wire.Chunked, int]]] = field(default_factory=dict)
    refused: dict[int, set[int]] = field(default_factory=dict)  # round -> bad-model senders

    def put(self, round_: int, sender: int, params: wire.Chunked, degree: int) -> bool:
        slot = self.models.setdefault(round_, {})
        if sender in slot:
            return False
        slot[sender] = (params, degree)
        return True

    def refuse(self, round_: int, sender: int) -> None:
        """`sender`'s round model came but was unusable (NaN, short): do not wait for it."""
        self.refused.setdefault(round_, set()).add(sender)

    def heard(self, round_: int) -> set[int]:
        """Senders not to wait for in `round_`: their model came, was refused, or a later
        one came (one connection delivers in order, so the earlier one was lost)."""
        later = {j for r, slot in self.models.items() if r > round_ for j in slot}
        later |= {j for r, senders in self.refused.items() if r > round_ for j in senders}
        return set(self.models.get(round_, {})) | self.refused.get(round_, set()) | later

    def take(self, round_: int) -> dict[int, tuple[wire.Chunked, int]]:
        for book in (self.models, self.refused):
            for r in [r for r in book if r < round_]:
                del book[r]
        self.refused.pop(round_, None)
        return self.models.pop(round_, {})


class GossipPeer:
    """Owns one peer's sockets and history file; `run` does every round."""

    def __init__(
        self,
        scenario: Scenario,
        peer_id: int,
        out_dir: Path,
        address: str | None = None,
        resume: bool = False,
    ) -> None:
        self.s = scenario
        self.resume = resume
        self.id = peer_id
        self.out_dir = out_dir
        graph = build_graph(scenario.topology, scenario.seed, scenario.base_dir)
        self.neighbours = sorted(graph.neighbors(peer_id))
        self.degree = len(self.neighbours)
        self.local: Local = build(scenario, peer_id)
        n_params = self.local.trainer.n_params
        self.expect = wire.Expect(scenario.digest(), scenario.peers - 1, {"params": (n_params,)})
        self.address = address or scenario.address(peer_id)
        known = (
            {}
            if scenario.coordinator.bootstrap
            else {j: scenario.address(j) for j in self.neighbours}
        )
        self.transport = Transport(
            self.address,
            known,
            self.expect.max_frames,
            link_delay_ms=scenario.faults.link_delay_ms,
            link_drop=scenario.faults.link_drop,
            seed=[scenario.seed, peer_id, 12],  # which messages the link loses
        )
        self.link: Link | None = None
        self.inbox = _Inbox()
        self.attack = scenario.byzantine(peer_id)
        self.rng = np.random.default_rng([scenario.seed, peer_id, 11])  # the attack's noise
        self.misses = dict.fromkeys(self.neighbours, 0)
        self.history = HistoryWriter(out_dir / f"peer-{peer_id}.jsonl", append=resume)
        self.checkpoint = checkpoint.path_for(out_dir, peer_id)
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
            claimed = exc.round if exc.round is not None else -1
            if exc.sender in self.misses and current <= claimed <= current + MAX_ROUNDS_AHEAD:
                self.inbox.refuse(claimed, exc.sender)
            return
        if (problem := self._not_a_model(msg)) is not None:
            self._drop(problem, sender=msg.sender)
        elif msg.round > current + MAX_ROUNDS_AHEAD:
            self._drop("round too far ahead", sender=msg.sender, msg_round=msg.round)
        elif msg.round < current:
            self.log.debug("stale_model", sender=msg.sender, msg_round=msg.round)
        elif not self.inbox.put(msg.round, msg.sender, msg.arrays["params"], msg.meta["degree"]):
            self._drop("duplicate model for this round", sender=msg.sender, msg_round=msg.round)

    def _not_a_model(self, msg: wire.Message) -> str | None:
        """Why a decoded message is not a neighbour's usable model (None if it is one)."""
        degree = msg.meta.get("degree")
        if msg.type != "model":
            return f"unexpected message type {msg.type!r} in gossip mode"
        if msg.sender not in self.misses:
            return "sender is not a neighbour"
        if "params" not in msg.arrays:
            return "model message without params"
        if not (wire.is_int(degree) and 1 <= degree < self.s.peers):
            return "meta.degree missing or out of range"
        return None

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
            received += wire.frames_size(frames)
            self._accept(frames, round_)
        return received, blocked

    # -- one round ---------------------------------------------------------------

    def _evaluate(self, params: FlatParams) -> tuple[float, float | None, float]:
        t = time.perf_counter()
        test_acc, hold_acc = evaluate(self.local.trainer, params, self.local.data)
        return test_acc, hold_acc, time.perf_counter() - t

    def _broadcast(self, round_: int, own: np.ndarray) -> int:
        if self.attack is not None:  # a Byzantine peer sends its attack, keeps its model
            own = poison(self.attack, own, self.rng)
        frames = wire.encode(
            "model",
            self.id,
            round_,
            self.expect.scenario,
            {"degree": self.degree, "samples": int(self.local.data.x_train.shape[0])},
            {"params": own},
        )
        size = wire.frames_size(frames)
        sent = 0
        for j in self.neighbours:
            if self.transport.send(j, frames):
                sent += size
            else:
                self.log.info("send_dropped", to=j, reason="neighbour queue full")
        return sent

    def _bootstrap(self) -> None:
        """Register with the coordinator and connect to the neighbours it names.

        Only the welcome is needed: once connected, the peer never talks to the
        coordinator again except for a best-effort bye, so gossip goes on if it dies.
        """
        control, _ = self.s.coordinator_addresses()
        coordinator = wire.Expect(self.expect.scenario, self.s.peers, {})
        self.link = Link(control, None, coordinator.max_frames)
        hello = wire.encode("hello", self.id, 0, self.expect.scenario, {"address": self.address})
        self.link.send(hello)
        limit = self.s.gossip.startup_timeout_s
        deadline = time.monotonic() + limit
        while (remaining := deadline - time.monotonic()) > 0:
            frames = self.link.recv(remaining)
            if frames is None:
                break
            try:
                msg = wire.decode(frames, coordinator)
            except wire.WireError as exc:
                self._drop(str(exc), channel="bootstrap")
                continue
            addresses = _neighbour_addresses(msg, self.s.peers, self.neighbours)
            if addresses is None:
                self._drop("not a welcome naming exactly our neighbours", channel="bootstrap")
                continue
            for j, addr in addresses.items():
                self.transport.connect(j, addr)
            self.log.info("bootstrapped", coordinator=control, neighbours=addresses)
            return
        raise BootstrapError(
            f"peer {self.id}: no welcome from the coordinator at {control} within {limit:g} s "
            "(gossip.startup_timeout_s)"
        )

    def _round(self, round_: int, state: TrainState) -> TrainState:
        trainer, d = self.local.trainer, self.local.data
        cpu0 = time.process_time()
        t = time.perf_counter()
        state, loss = trainer.train(state, d.x_train, d.y_train)
        own = as_numpy(state.params)
        train_s = time.perf_counter() - t

        if delay := self.s.slow_delay(self.id):
            time.sleep(delay)  # an injected straggler (faults.slow), on purpose
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
        models = {j: g[0] for j, g in got.items()}
        mixed = mix(own, models, weights)  # also the disagreement figure, whatever the rule
        params = mixed.params
        if self.s.gossip.aggregator != "mean" and models:
            params = self._robust(own, models, weights)
        if np.isfinite(params).all():
            state = trainer.with_params(state, params)
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
                time=time.time(),
                evaluated_on="mixed",
            )
        )
        if self.s.output.models == "every_round":
            path = self.out_dir / "models" / f"round-{round_}" / f"peer-{self.id}.npz"
            save_model(path, as_numpy(state.params))
        self.log.info("round_done", holdout_accuracy=hold_acc, heard=len(got))
        return state

    def _robust(
        self, own: np.ndarray, received: dict[int, wire.Chunked], weights: dict[int, float]
    ) -> np.ndarray:
        """The round's new model under a robust `gossip.aggregator` (not "mean")."""
        g = self.s.gossip
        ids = sorted(received)
        stack = np.stack([np.asarray(received[j]) for j in ids])
        try:
            return gossip_aggregate(
                g.aggregator,
                own,
                stack,
                np.array([weights[j] for j in ids]),
                trim=g.trim,
                tau=None if g.clip_tau == "adaptive" else g.clip_tau,
                clip_fraction=g.clip_fraction,
            )
        except ValueError as exc:  # e.g. clipping would overflow float32
            self.log.error("aggregation_failed", reason=str(exc), kept="own model")
            return own

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

    def _record_initial(self, state: TrainState) -> None:
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
                time=time.time(),
                evaluated_on="initial",
            )
        )

    def _restore(self) -> tuple[TrainState, int]:
        """The checkpointed state and its round (`--resume`), or the initial state."""
        if self.resume and self.checkpoint.exists():
            saved = checkpoint.load(self.checkpoint, self.local.state)
            self.log.info("resumed", round=saved.round)
            return saved.state, saved.round
        if self.resume:
            self.log.warning("no_checkpoint", path=str(self.checkpoint), starting="round 1")
        self._record_initial(self.local.state)
        return self.local.state, 0

    def _catch_up(self, state: TrainState, last: int) -> tuple[TrainState, int]:
        """After a restart: listen (up to one round timeout) for the neighbours' models,
        adopt the mean of the newest round's and go on from the round after it.

        The neighbours gave up waiting for this peer long ago; they take it back as soon
        as its models arrive in time for their rounds again.
        """
        seen: dict[int, dict[int, tuple[wire.Chunked, int]]] = {}
        deadline = time.monotonic() + self.s.gossip.round_timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            frames = self.transport.recv(remaining)
            if frames is None:
                break
            try:
                msg = wire.decode(frames, self.expect)
            except wire.WireError as exc:
                self._drop(str(exc))
                continue
            if (problem := self._not_a_model(msg)) is not None:
                self._drop(problem, sender=msg.sender)
                continue
            seen.setdefault(msg.round, {})[msg.sender] = (msg.arrays["params"], msg.meta["degree"])
            if len(seen[msg.round]) == self.degree:
                break  # one round with every neighbour's model: new enough
        if not seen or max(seen) <= last:
            self.log.info("catch_up_found_nobody", continuing_from=last + 1)
            return state, last
        newest = max(seen)
        models = [np.asarray(x) for x, _ in seen[newest].values()]
        params = np.mean(np.stack(models).astype(np.float64), axis=0).astype(np.float32)
        for r in (newest + 1, newest + 2):  # already here: keep them for those rounds
            for j, (x, d) in seen.get(r, {}).items():
                self.inbox.put(r, j, x, d)
        self.log.info(
            "caught_up", from_round=last, to_round=newest, neighbours=sorted(seen[newest])
        )
        return self.local.trainer.with_params(state, params), newest

    def run(self) -> None:
        """Every round of the scenario, then the final model to `models/peer-<id>.npz`.

        The state is checkpointed after every round; with `--resume` the peer starts
        from its checkpoint and catches up with its neighbours first.
        """
        state, last = self._restore()
        if self.s.coordinator.bootstrap:
            self._bootstrap()
        if last > 0:
            state, last = self._catch_up(state, last)
        self.log.info(
            "peer_started", neighbours=self.neighbours, params=self.local.trainer.n_params
        )
        crash = None if self.resume else self.s.crash_round(self.id)
        for r in range(last + 1, self.s.training.rounds + 1):
            structlog.contextvars.bind_contextvars(round=r)
            if r == crash:
                die(self.log)
            state = self._round(r, state)
            checkpoint.save(self.checkpoint, state, r)
        structlog.contextvars.unbind_contextvars("round")
        save_model(self.out_dir / "models" / f"peer-{self.id}.npz", as_numpy(state.params))
        if self.link is not None:  # best effort: the coordinator may be long gone
            self.link.send(wire.encode("bye", self.id, 0, self.expect.scenario))
        self.log.info("peer_finished", rounds=self.s.training.rounds)

    def close(self) -> None:
        """Flush the last sends and release the sockets and the history file."""
        self.transport.close()
        if self.link is not None:
            self.link.close()
        self.history.close()


class BootstrapError(RuntimeError):
    """No usable welcome from the bootstrap coordinator in time."""


def _neighbour_addresses(
    msg: wire.Message, coordinator: int, neighbours: list[int]
) -> dict[int, str] | None:
    """The neighbour -> address map of a welcome, if it is one and names exactly ours."""
    pairs = msg.meta.get("neighbours")
    if msg.type != "welcome" or msg.sender != coordinator or not isinstance(pairs, list):
        return None
    addresses: dict[int, str] = {}
    for pair in pairs:
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and wire.is_int(pair[0])
            and isinstance(pair[1], str)
        ):
            return None
        try:
            check_tcp(pair[1])
        except ValueError:
            return None
        addresses[pair[0]] = pair[1]
    return addresses if sorted(addresses) == neighbours else None


def run_peer(
    scenario: Scenario,
    peer_id: int,
    out_dir: Path,
    address: str | None = None,
    resume: bool = False,
) -> None:
    """Run one gossip peer to completion; sockets are closed even on error."""
    peer = GossipPeer(scenario, peer_id, out_dir, address, resume)
    try:
        peer.run()
    finally:
        peer.close()
