"""One gossip peer: local data -> trainer -> synchronous gossip rounds -> history.

Round r: train locally, send the model to every neighbour, wait (poll with a
deadline, never sleep) for the neighbours' round-r models, mix them with
Metropolis–Hastings weights computed from the degrees they carry, evaluate, record.
A neighbour that misses the deadline is left out of that round (its weight stays with
this peer).

Liveness: any message from a neighbour is a sign of life, and a `Ticker` thread sends a
small heartbeat (carrying this peer's round) to each neighbour it heard from and sent
nothing to for `gossip.heartbeat_s`, even while this peer trains or straggles. A
neighbour silent for `gossip.peer_timeout_s` is declared gone and no longer waited for
(even in the middle of a round's wait); it is taken back as soon as it speaks again.
A heartbeat from a neighbour already past this round also ends the wait for its model:
that model was lost on the way.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog

from p2pfl import checkpoint, wire
from p2pfl.faults import die, dissensus, dissensus_gains, poison
from p2pfl.gossip import mix
from p2pfl.history import HistoryWriter, RoundRecord, save_model
from p2pfl.learning.local import Local, build, evaluate
from p2pfl.learning.trainer import FlatParams, TrainState, as_numpy
from p2pfl.robust import coordinate_median, gossip_aggregate
from p2pfl.scenario import Scenario, check_tcp
from p2pfl.topology import build_graph, local_weights
from p2pfl.transport import Link, Ticker, Transport

MAX_ROUNDS_AHEAD = 2  # models for rounds further ahead than this are dropped
MAX_DRAIN = 256  # messages read without waiting per round: a flood cannot stall the loop
log = structlog.get_logger()


@dataclass
class _Inbox:
    """Checked models waiting for their round, bounded by the rounds-ahead window."""

    models: dict[int, dict[int, tuple[wire.Chunked, int]]] = field(default_factory=dict)
    refused: dict[int, set[int]] = field(default_factory=dict)  # round -> bad-model senders
    ahead: dict[int, int] = field(default_factory=dict)  # sender -> round its heartbeat named

    def put(self, round_: int, sender: int, params: wire.Chunked, degree: int) -> bool:
        slot = self.models.setdefault(round_, {})
        if sender in slot:
            return False
        slot[sender] = (params, degree)
        return True

    def refuse(self, round_: int, sender: int) -> None:
        """`sender`'s round model came but was unusable (NaN, short): do not wait for it."""
        self.refused.setdefault(round_, set()).add(sender)

    def passed(self, sender: int, round_: int) -> None:
        """`sender`'s heartbeat says it is in `round_`: its earlier models were all sent."""
        self.ahead[sender] = max(round_, self.ahead.get(sender, 0))

    def heard(self, round_: int) -> set[int]:
        """Senders not to wait for in `round_`: their model came, was refused, or a later
        one or a heartbeat from a later round came (one connection delivers in order, so
        the earlier model was lost)."""
        later = {j for r, slot in self.models.items() if r > round_ for j in slot}
        later |= {j for r, senders in self.refused.items() if r > round_ for j in senders}
        later |= {j for j, r in self.ahead.items() if r > round_}
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
        # neighbour -> monotonic time last heard; start-up counts as heard until it ends
        grace = time.monotonic() + scenario.gossip.startup_timeout_s
        self.last_heard = dict.fromkeys(self.neighbours, grace)
        self.spoken: set[int] = set()  # neighbours heard at least once: heartbeats go to them
        self.gone: set[int] = set()
        self.round = 0  # the round in progress, for the heartbeat thread
        self.ticker: Ticker | None = None
        self.last_model: tuple[int, np.ndarray] | None = None  # (round, model) as last sent
        self.heartbeat_bytes = 0  # sent by the ticker since the last round record
        self.heartbeat_lock = threading.Lock()
        self.resent: dict[int, float] = {}  # neighbour -> when last_model was last resent
        self.round_bytes = 0  # model bytes sent in the round in progress
        # dissensus attacker: gain per honest neighbour; its own model of the round (the
        # honest peers' centre, as it sees it); neighbours sent their crafted model
        self.gains = (
            dissensus_gains(scenario, graph, peer_id)
            if self.attack is not None and self.attack.attack == "dissensus"
            else None
        )
        self.centre = np.zeros(0, np.float32)
        self.served: set[int] = set()
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
            if exc.sender in self.last_heard and current <= claimed <= current + MAX_ROUNDS_AHEAD:
                self.inbox.refuse(claimed, exc.sender)
            return
        if msg.type == "heartbeat" and msg.round > self.s.training.rounds:
            self._drop("heartbeat beyond the last round", sender=msg.sender, msg_round=msg.round)
            return
        if self._liveness_message(msg):
            if msg.type == "heartbeat" and msg.round > current and msg.sender in self.last_heard:
                self.inbox.passed(msg.sender, msg.round)
            return
        if (problem := self._not_a_model(msg)) is not None:
            self._drop(problem, sender=msg.sender)
        elif msg.round > current + MAX_ROUNDS_AHEAD:
            self._drop("round too far ahead", sender=msg.sender, msg_round=msg.round)
        elif msg.round < current:
            self.log.debug("stale_model", sender=msg.sender, msg_round=msg.round)
        elif self.inbox.put(msg.round, msg.sender, msg.arrays["params"], msg.meta["degree"]):
            if msg.round == current:
                self._craft(current, msg.sender, msg.arrays["params"])
        else:
            self._drop("duplicate model for this round", sender=msg.sender, msg_round=msg.round)
        if msg.sender in self.last_heard:
            self._heard(msg.sender)

    # -- liveness ----------------------------------------------------------------

    def _heard(self, j: int) -> None:
        """Neighbour `j` spoke (any checked message): alive, and taken back if it was gone."""
        self.last_heard[j] = time.monotonic()  # ends the start-up grace too
        self.spoken.add(j)
        if j in self.gone:
            self.gone.discard(j)
            self.log.info("neighbour_back", neighbour=j)

    def _resend(self, j: int) -> None:
        """This round's model again, flagged `resend`, for a neighbour catching up after a
        restart; at most once per `heartbeat_s` each, so a stream of requests cannot
        amplify into models."""
        now = time.monotonic()
        if self.last_model is None or now - self.resent.get(j, -1e9) < self.s.gossip.heartbeat_s:
            return
        self.resent[j] = now
        round_, params = self.last_model
        self._send(j, self._model_frames(round_, params, resend=True))

    def _liveness_message(self, msg: wire.Message) -> bool:
        """True if `msg` is a heartbeat (a sign of life) or a bye (a neighbour that
        finished: not waited for, and no alarm); either is handled here."""
        if msg.type not in ("heartbeat", "bye"):
            return False
        j = msg.sender
        if j not in self.last_heard:
            self._drop(f"{msg.type} from a peer that is not a neighbour", sender=j)
        elif msg.type == "heartbeat":
            self._heard(j)
            if msg.meta.get("catch_up") is True:
                self._resend(j)
        elif j not in self.gone:
            self.gone.add(j)
            self.log.info("neighbour_left", neighbour=j, its_round=msg.round)
        return True

    def _take_heartbeat_bytes(self) -> int:
        with self.heartbeat_lock:
            sent, self.heartbeat_bytes = self.heartbeat_bytes, 0
        return sent

    def _alive(self) -> set[int]:
        """Neighbours heard within `peer_timeout_s`; those silent longer are declared gone."""
        now, limit = time.monotonic(), self.s.gossip.peer_timeout_s
        for j, t in self.last_heard.items():
            if now - t >= limit and j not in self.gone:
                self.gone.add(j)
                self.log.warning("neighbour_gone", neighbour=j, silent_s=round(now - t, 3))
        return set(self.neighbours) - self.gone

    def _next_silence(self, pending: set[int]) -> float:
        """Seconds until the first of `pending` would be declared gone."""
        limit = self.s.gossip.peer_timeout_s
        return max(0.0, min(self.last_heard[j] for j in pending) + limit - time.monotonic())

    def _send_heartbeats(self) -> None:
        """Ticker thread: a heartbeat to each live neighbour this peer sent nothing to for
        `heartbeat_s` (only to neighbours heard once: before that they may not be up, and
        heartbeats queued for them could push this peer's first model out of the queue)."""
        to = [
            j
            for j in self.transport.idle(self.s.gossip.heartbeat_s)
            if j in self.spoken and j not in self.gone
        ]
        if to:
            frames = wire.encode("heartbeat", self.id, self.round, self.expect.scenario)
            sent = sum(self.transport.send(j, frames) for j in to) * wire.frames_size(frames)
            with self.heartbeat_lock:
                self.heartbeat_bytes += sent

    def _not_a_model(self, msg: wire.Message) -> str | None:
        """Why a decoded message is not a neighbour's usable model (None if it is one)."""
        degree = msg.meta.get("degree")
        if msg.type != "model":
            return f"unexpected message type {msg.type!r} in gossip mode"
        if msg.sender not in self.last_heard:
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
        What queued up while this peer trained is read before any silence is judged.
        Returns (bytes received, seconds spent blocked in poll).
        """
        received, blocked, drained = 0, 0.0, 0
        while drained < MAX_DRAIN and (frames := self.transport.recv(0.0)) is not None:
            drained += 1
            received += wire.frames_size(frames)
            self._accept(frames, round_)
        drained = 0
        while drained < MAX_DRAIN:
            pending = self._alive() - self.inbox.heard(round_)
            left = max(0.0, deadline - time.perf_counter()) if pending else 0.0
            # wake when one of them would be declared gone, to stop waiting for it
            wait = min(left, self._next_silence(pending)) if pending else 0.0
            drained += wait == 0.0
            t = time.perf_counter()
            frames = self.transport.recv(wait)
            blocked += time.perf_counter() - t
            if frames is None:
                if wait < left:
                    continue  # a neighbour's silence ran out: see who is still waited for
                return received, blocked
            received += wire.frames_size(frames)
            self._accept(frames, round_)
        return received, blocked

    # -- one round ---------------------------------------------------------------

    def _evaluate(self, params: FlatParams) -> tuple[float, float | None, float]:
        t = time.perf_counter()
        test_acc, hold_acc = evaluate(self.local.trainer, params, self.local.data)
        return test_acc, hold_acc, time.perf_counter() - t

    def _model_frames(
        self, round_: int, params: np.ndarray, resend: bool = False
    ) -> list[wire.Buffer]:
        meta = {"degree": self.degree, "samples": int(self.local.data.x_train.shape[0])}
        if resend:
            meta["resend"] = True
        return wire.encode("model", self.id, round_, self.expect.scenario, meta, {"params": params})

    def _send(self, j: int, frames: list[wire.Buffer]) -> None:
        """Queue a model for neighbour `j`, counting its bytes in this round's record."""
        if self.transport.send(j, frames):
            self.round_bytes += wire.frames_size(frames)
        else:
            self.log.info("send_dropped", to=j, reason="neighbour queue full")

    def _broadcast(self, round_: int, own: np.ndarray) -> None:
        """This round's model to every neighbour; a Byzantine peer sends its attack and
        keeps its model. A dissensus attacker sends its colluders its model, and crafts
        one for each honest neighbour whose model of this round is already in."""
        sent = own if self.attack is None else poison(self.attack, own, self.rng)
        self.last_model = (round_, sent)
        frames = self._model_frames(round_, sent)
        for j in self.neighbours:
            if self.gains is None or j not in self.gains:
                self._send(j, frames)
        if self.gains is not None:
            self.centre, self.served = own, set()
            for j, (x, _) in self.inbox.models.get(round_, {}).items():
                self._craft(round_, j, x)

    def _craft(self, round_: int, j: int, target: wire.Chunked) -> None:
        """Dissensus: the model for honest neighbour `j`, built from its own (`target`)."""
        if self.gains is None or j not in self.gains or j in self.served:
            return
        x = dissensus(np.asarray(target), self.centre, self.gains[j])
        self._send(j, self._model_frames(round_, x if np.isfinite(x).all() else self.centre))
        self.served.add(j)

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
        self.round_bytes = 0
        self._broadcast(round_, own)
        timeout = self.s.gossip.round_timeout_s
        if round_ == 1:
            timeout += self.s.gossip.startup_timeout_s
        received, wait_s = self._gather(round_, time.perf_counter() + timeout)
        for j in set(self.gains or ()) - self.served:  # their model never came: nothing to
            self._send(j, self._model_frames(round_, own))  # craft from, the plain model
        got = self.inbox.take(round_)
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
                bytes_sent=self.round_bytes + self._take_heartbeat_bytes(),
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
                clip_drop=g.clip_drop,
            )
        except ValueError as exc:  # e.g. clipping would overflow float32
            self.log.error("aggregation_failed", reason=str(exc), kept="own model")
            return own

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
        """After a restart: ask for the neighbours' current models, adopt a combination of
        the newest from each and go on from the round after the newest of them.

        The neighbours gave up waiting for this peer long ago. A heartbeat flagged
        `catch_up`, repeated every `heartbeat_s`, makes them take it back (so each
        stops at its current round to wait for it) and resend their current model,
        flagged `resend`. What waited in their queues while this peer was down arrives
        first and is older, so listening ends once every neighbour's resend is in, or
        after `round_timeout_s` with what came. The models are combined by the
        scenario's rule: their mean, or with a robust `gossip.aggregator` their
        coordinate-wise median. A neighbour left in an earlier round stops waiting as
        soon as this peer's next model arrives.
        """
        ask = wire.encode("heartbeat", self.id, last, self.expect.scenario, {"catch_up": True})
        g = self.s.gossip
        newest: dict[int, tuple[int, wire.Chunked]] = {}  # neighbour -> (round, model)
        resent: set[int] = set()
        deadline = time.monotonic() + g.round_timeout_s
        asked = -1e9
        while (now := time.monotonic()) < deadline and resent != set(self.neighbours):
            if now - asked >= g.heartbeat_s:
                asked = now
                for j in self.neighbours:
                    self.transport.send(j, ask)
            frames = self.transport.recv(min(deadline, asked + g.heartbeat_s) - now)
            if frames is None:
                continue
            try:
                msg = wire.decode(frames, self.expect)
            except wire.WireError as exc:
                self._drop(str(exc))
                continue
            if self._liveness_message(msg):
                continue
            if (problem := self._not_a_model(msg)) is not None:
                self._drop(problem, sender=msg.sender)
                continue
            if msg.round > self.s.training.rounds:
                self._drop("model for a round beyond the last", sender=msg.sender)
                continue
            self._heard(msg.sender)
            if msg.meta.get("resend") is True:
                resent.add(msg.sender)
            if msg.round > max(last, newest.get(msg.sender, (-1, None))[0]):
                newest[msg.sender] = (msg.round, msg.arrays["params"])
        to_round = max((r for r, _ in newest.values()), default=last)
        if to_round == last:
            self.log.info("catch_up_found_nobody", continuing_from=last + 1)
            return state, last
        models = np.stack([np.asarray(x) for _, x in newest.values()])
        params = (
            models.astype(np.float64).mean(axis=0).astype(np.float32)
            if g.aggregator == "mean"
            else coordinate_median(models)
        )
        if not np.isfinite(params).all():
            self.log.error("caught_up_model_not_finite", kept="checkpoint")
            return state, last
        self.log.info(
            "caught_up",
            from_round=last,
            to_round=to_round,
            neighbours={str(j): r for j, (r, _) in sorted(newest.items())},
            resent=sorted(resent),
        )
        return self.local.trainer.with_params(state, params), to_round

    def run(self) -> None:
        """Every round of the scenario, then the final model to `models/peer-<id>.npz`.

        The state is checkpointed after every round; with `--resume` the peer starts
        from its checkpoint and catches up with its neighbours first.
        """
        state, last = self._restore()
        if self.s.coordinator.bootstrap:
            self._bootstrap()
        self.round = last
        # ticking at half the interval: no neighbour waits more than 1.5 x heartbeat_s
        self.ticker = Ticker(self.s.gossip.heartbeat_s / 2, self._send_heartbeats)
        if last > 0:
            state, last = self._catch_up(state, last)
        self.log.info(
            "peer_started", neighbours=self.neighbours, params=self.local.trainer.n_params
        )
        crash = None if self.resume else self.s.crash_round(self.id)
        for r in range(last + 1, self.s.training.rounds + 1):
            self.round = r
            structlog.contextvars.bind_contextvars(round=r)
            if r == crash:
                die(self.log)
            state = self._round(r, state)
            checkpoint.save(self.checkpoint, state, r)
        structlog.contextvars.unbind_contextvars("round")
        self.ticker.stop()
        bye = wire.encode("bye", self.id, self.s.training.rounds, self.expect.scenario)
        for j in self.neighbours:  # they stop waiting for this peer without an alarm
            self.transport.send(j, bye)
        save_model(self.out_dir / "models" / f"peer-{self.id}.npz", as_numpy(state.params))
        if self.link is not None:  # best effort: the coordinator may be long gone
            self.link.send(wire.encode("bye", self.id, 0, self.expect.scenario))
        self.log.info("peer_finished", rounds=self.s.training.rounds)

    def close(self) -> None:
        """Stop the heartbeats, flush the last sends, release the sockets and the history."""
        if self.ticker is not None:
            self.ticker.stop()
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
