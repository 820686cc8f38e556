"""Synchronous gossip as a sans-I/O machine: one peer's rounds, barrier and liveness.

Round r: the runtime trains, then `start_round(r, model, now)` returns the sends of
the model to every neighbour; the runtime feeds what arrives (`feed(event, now)`) until
`done(now)`: every neighbour still alive has been heard for round r, or the round's
deadline passed (`round_timeout_s`, plus `startup_timeout_s` in round 1). `take` then
hands over the round's models with the degrees they carry; the mixing is the core
step's business, not this machine's.

Heard for round r means: its round-r model came, or came unusable (a `Malformed` whose
header claimed that sender and round), or something from a later round came from it
(a model, or a heartbeat naming a later round: one connection delivers in order, so
the round-r model was lost on the way). Models for rounds up to `max_rounds_ahead`
ahead wait in the inbox for their round; further ahead, duplicates and non-neighbours
are dropped, each with one `message_dropped` log line; stale models are ignored.

Liveness: any checked message from a neighbour is a sign of life. A neighbour silent
for `peer_timeout_s` is gone (logged `neighbour_gone`) and no longer waited for, even
in the middle of a round; it is taken back the moment it speaks (`neighbour_back`).
Start-up counts as heard until `startup_timeout_s` after the machine was made. A bye
means the neighbour finished: gone without an alarm (`neighbour_left`). `heartbeats`
names the neighbours due one: heard at least once, not gone, sent nothing for
`heartbeat_s`. A heartbeat flagged `catch_up` (a neighbour back from a restart) gets
this round's model again, flagged `resend`, at most once per `heartbeat_s` each.

A dissensus attacker (`SyncConfig.targets` and a `craft` hook) sends each target, as
soon as the target's model of the round arrives, `craft(target, its model, our model)`
(our plain model where that is not finite), and the plain model at `take` to targets
whose model never came.

Not thread-safe: the runtime calls `heartbeats` from a ticker thread while its round
loop calls the rest, so it must hold one lock around every call of this machine.
Nothing here reads a clock or touches a socket: every time is the `now` passed in
(seconds on one monotonic clock), every send a returned `Send`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from p2pfl.protocol import wire
from p2pfl.protocol.events import Event, Malformed, Send
from p2pfl.protocol.liveness import Liveness
from p2pfl.protocol.messages import Bye, Heartbeat, ModelMsg, parse_gossip

MAX_ROUNDS_AHEAD = 2  # models for rounds further ahead than this are dropped

# (target neighbour, its model of the round, our model) -> the model to send it
Craft = Callable[[int, wire.Chunked, np.ndarray], np.ndarray]
Model = tuple[wire.Chunked, int]  # a neighbour's model and the degree it carried


@dataclass(frozen=True)
class SyncConfig:
    """Everything the machine needs to know, as plain values.

    Args:
        peer_id: this peer's id.
        neighbours: its neighbours' ids, sorted.
        peers: the number of peers (a degree is in 1..peers - 1).
        rounds: the run's last round.
        round_timeout_s: a round's deadline, from its start.
        startup_timeout_s: added to round 1's deadline; also the start-up grace of liveness.
        heartbeat_s: a neighbour sent nothing this long gets a heartbeat; resends to one
            neighbour are at least this far apart.
        peer_timeout_s: a neighbour silent this long is gone.
        samples: the sample count every model sent carries (`meta.samples`).
        targets: the neighbours a dissensus attacker crafts a model for (else empty).
        max_rounds_ahead: models further ahead of the round in progress are dropped.
    """

    peer_id: int
    neighbours: tuple[int, ...]
    peers: int
    rounds: int
    round_timeout_s: float
    startup_timeout_s: float
    heartbeat_s: float
    peer_timeout_s: float
    samples: int = 0
    targets: frozenset[int] = frozenset()
    max_rounds_ahead: int = MAX_ROUNDS_AHEAD

    def __post_init__(self) -> None:
        if list(self.neighbours) != sorted(set(self.neighbours)):
            raise ValueError(f"neighbours {self.neighbours} are not sorted and distinct")
        if self.peer_id in self.neighbours:
            raise ValueError(f"peer {self.peer_id} is its own neighbour")
        if not self.targets <= set(self.neighbours):
            raise ValueError(f"targets {sorted(self.targets)} are not all neighbours")

    @property
    def degree(self) -> int:
        """This peer's degree, carried by every model it sends."""
        return len(self.neighbours)


@dataclass(frozen=True)
class RoundResult:
    """A round's outcome: the neighbours' models by id, who was heard and who was not."""

    round: int
    models: dict[int, Model]
    heard: list[int]
    missing: list[int]


@dataclass
class _Inbox:
    """Checked models waiting for their round, bounded by the rounds-ahead window."""

    models: dict[int, dict[int, Model]] = field(default_factory=dict)
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
        one or a heartbeat from a later round came."""
        later = {j for r, slot in self.models.items() if r > round_ for j in slot}
        later |= {j for r, senders in self.refused.items() if r > round_ for j in senders}
        later |= {j for j, r in self.ahead.items() if r > round_}
        return set(self.models.get(round_, {})) | self.refused.get(round_, set()) | later

    def take(self, round_: int) -> dict[int, Model]:
        for book in (self.models, self.refused):
            for r in [r for r in book if r < round_]:
                del book[r]
        self.refused.pop(round_, None)
        return self.models.pop(round_, {})


class SyncGossip:
    """One peer's side of synchronous gossip; see the module docstring for the rules.

    Args:
        config: the peer's settings.
        now: the time the machine starts (the start-up grace runs from here).
        log: where drops and liveness changes are logged (a structlog logger).
        craft: the dissensus hook, required when `config.targets` is not empty.
    """

    def __init__(
        self, config: SyncConfig, now: float, log: Any = None, craft: Craft | None = None
    ) -> None:
        if config.targets and craft is None:
            raise ValueError("dissensus targets need a craft hook")
        self.config = config
        self.liveness: Liveness[int] = Liveness(
            config.neighbours, config.peer_timeout_s, grace_until=now + config.startup_timeout_s
        )
        self.round = 0  # the round in progress (heartbeats carry it)
        self.deadline = float("inf")  # of the round in progress
        self.log = log if log is not None else structlog.get_logger()
        self._craft = craft
        self._inbox = _Inbox()
        self._sent: tuple[int, np.ndarray] | None = None  # (round, model) as last sent
        self._served: set[int] = set()  # targets sent their crafted model this round
        self._last_sent: dict[int, float] = {}  # neighbour -> when it was last sent anything
        self._resent: dict[int, float] = {}  # neighbour -> when it was last resent a model

    # -- rounds --------------------------------------------------------------------

    def enter(self, round_: int) -> None:
        """Round `round_` has begun (training): heartbeats from now on carry it."""
        self.round = round_

    def start_round(self, round_: int, model: np.ndarray, now: float) -> list[Send]:
        """Send `model` (this peer's model of `round_`) and start waiting for the others'.

        Returns the model for every neighbour (a crafted one for each dissensus target
        whose model of the round is already in, none yet for the other targets).
        """
        c = self.config
        self.round = round_
        self._sent = (round_, model)
        self._served = set()
        self.deadline = now + c.round_timeout_s + (c.startup_timeout_s if round_ == 1 else 0.0)
        sends = [self._model(j, round_, model) for j in c.neighbours if j not in c.targets]
        for j, (x, _) in self._inbox.models.get(round_, {}).items():
            sends += self._crafted(j, x)
        return self._out(sends, now)

    def pending(self, now: float) -> set[int]:
        """Neighbours still waited for in the round in progress: alive (silence judged up
        to `now`, newly gone ones logged) and not heard for the round."""
        for j, silent in self.liveness.expire(now):
            self.log.warning("neighbour_gone", neighbour=j, silent_s=round(silent, 3))
        return self.liveness.alive() - self._inbox.heard(self.round)

    def done(self, now: float) -> bool:
        """Nobody is waited for any more, or the round's deadline has passed."""
        return now >= self.deadline or not self.pending(now)

    def wake_in(self, now: float) -> float:
        """Seconds a receive may wait before the machine must be asked again: until the
        deadline or the first silence expiry of a neighbour waited for; 0 when done."""
        pending = self.pending(now)
        if not pending or now >= self.deadline:
            return 0.0
        return min(self.deadline - now, self.liveness.next_expiry(now, pending))

    def tick(self, now: float) -> list[Send]:
        """Nothing is due on the round loop's clock (heartbeats have their own thread)."""
        return []

    def take(self, now: float) -> tuple[RoundResult, list[Send]]:
        """The round's models (forgotten here) and the sends still owed: the plain model
        to each dissensus target whose model never came."""
        late = []
        if self._sent is not None and self._sent[0] == self.round:
            unserved = sorted(self.config.targets - self._served)
            late = [self._model(j, self.round, self._sent[1]) for j in unserved]
        got = self._inbox.take(self.round)
        missing = sorted(set(self.config.neighbours) - set(got))
        return RoundResult(self.round, got, sorted(got), missing), self._out(late, now)

    def bye(self) -> list[Send]:
        """The last sends: a bye to every neighbour, so they stop waiting without an alarm."""
        return [Send(j, "bye", self.config.rounds) for j in self.config.neighbours]

    # -- receiving -----------------------------------------------------------------

    def feed(self, event: Event, now: float) -> list[Send]:
        """Take one received (or malformed) message into account; returns what to send."""
        if isinstance(event, Malformed):
            self._drop(event.reason)
            j, claimed, r = event.sender, event.round, self.round
            ahead = self.config.max_rounds_ahead
            if (
                j is not None
                and j in self.liveness
                and claimed is not None
                and r <= claimed <= r + ahead
            ):
                self._inbox.refuse(claimed, j)
            return []
        msg = event.msg
        c = self.config
        got = parse_gossip(msg, neighbours=c.neighbours, peers=c.peers, rounds=c.rounds)
        if isinstance(got, str):
            self._drop(got, sender=msg.sender, msg_round=msg.round)
            if msg.type not in ("heartbeat", "bye") and msg.sender in self.liveness:
                self._heard(msg.sender, now)
            return []
        if not isinstance(got, ModelMsg):
            sends = self.note_liveness(got, now)
            if isinstance(got, Heartbeat) and got.round > self.round:
                self._inbox.passed(got.sender, got.round)
            return sends
        sends = []
        if got.round > self.round + c.max_rounds_ahead:
            self._drop("round too far ahead", sender=got.sender, msg_round=got.round)
        elif got.round < self.round:
            self.log.debug("stale_model", sender=got.sender, msg_round=got.round)
        elif self._inbox.put(got.round, got.sender, got.params, got.degree):
            if got.round == self.round:
                sends = self._crafted(got.sender, got.params)
        else:
            self._drop("duplicate model for this round", sender=got.sender, msg_round=got.round)
        self._heard(got.sender, now)
        return self._out(sends, now)

    def note_liveness(self, msg: Heartbeat | Bye, now: float) -> list[Send]:
        """A neighbour's heartbeat (alive; a resend if it asks to catch up) or bye (left)."""
        if isinstance(msg, Bye):
            if self.liveness.left(msg.sender):
                self.log.info("neighbour_left", neighbour=msg.sender, its_round=msg.round)
            return []
        self._heard(msg.sender, now)
        return self._resend(msg.sender, now) if msg.catch_up else []

    def heard(self, j: int, now: float) -> None:
        """Neighbour `j` spoke (any checked message): alive, taken back if it was gone."""
        self._heard(j, now)

    # -- sending -------------------------------------------------------------------

    def heartbeats(self, now: float) -> list[Send]:
        """A heartbeat carrying the round in progress to each neighbour due one: heard
        at least once (before that it may not be up, and heartbeats queued for it could
        push this peer's first model out of its queue), not gone, sent nothing for
        `heartbeat_s`. Safe to call while the round loop waits (never judges silence)."""
        lv, limit = self.liveness, self.config.heartbeat_s
        due = [
            j
            for j in self.config.neighbours
            if j in lv.spoken
            and j not in lv.gone
            and now - self._last_sent.get(j, -np.inf) >= limit
        ]
        return self._out([Send(j, "heartbeat", self.round) for j in due], now)

    def sent(self, to: int, now: float) -> None:
        """Note a send to `to` made outside this machine (a catch-up request)."""
        self._last_sent[to] = now

    def _out(self, sends: list[Send], now: float) -> list[Send]:
        for s in sends:
            if isinstance(s.to, int):
                self._last_sent[s.to] = now
        return sends

    def _model(self, j: int, round_: int, model: np.ndarray, resend: bool = False) -> Send:
        meta: dict[str, Any] = {"degree": self.config.degree, "samples": self.config.samples}
        if resend:
            meta["resend"] = True
        return Send(j, "model", round_, meta, {"params": model})

    def _resend(self, j: int, now: float) -> list[Send]:
        """The model last sent, flagged `resend`, for a neighbour catching up after a
        restart; at most once per `heartbeat_s` each, so a stream of requests cannot
        amplify into models."""
        if self._sent is None or now - self._resent.get(j, -np.inf) < self.config.heartbeat_s:
            return []
        self._resent[j] = now
        round_, model = self._sent
        return self._out([self._model(j, round_, model, resend=True)], now)

    def _crafted(self, j: int, target: wire.Chunked) -> list[Send]:
        """Dissensus: the model for target `j`, built from its own model of the round."""
        if (
            self._craft is None
            or j not in self.config.targets
            or j in self._served
            or self._sent is None
            or self._sent[0] != self.round
        ):
            return []
        own = self._sent[1]
        x = self._craft(j, target, own)
        self._served.add(j)
        return [self._model(j, self.round, x if np.isfinite(x).all() else own)]

    # -- logging -------------------------------------------------------------------

    def _heard(self, j: int, now: float) -> None:
        if self.liveness.heard(j, now):
            self.log.info("neighbour_back", neighbour=j)

    def _drop(self, reason: str, **fields: object) -> None:
        self.log.warning("message_dropped", reason=reason, **fields)
