"""Catching up after a restart, as a sans-I/O machine.

A peer restarted from its checkpoint of round `last` finds its neighbours rounds ahead;
they gave up waiting for it long ago. It asks with a heartbeat flagged `catch_up`,
repeated every `heartbeat_s`: each neighbour takes it back (so stops at its current
round to wait for it) and resends its current model, flagged `resend`. What waited in
their queues while this peer was down arrives first and is older, so the machine keeps
the newest model of each neighbour, and is done once every neighbour's resend is in,
or `round_timeout_s` after it started, with what came. Models of rounds beyond the
last are refused.

The result is the newest model of each neighbour (of a round after `last`) and the
round to continue after; combining the models (their mean, or a robust rule) is the
runtime's business, with the aggregator registry.

The machine shares the peer's `SyncGossip` liveness: a neighbour heard now is alive
for the rounds that follow, and a heartbeat or bye is handled as in a round. Like
`SyncGossip`, it is not thread-safe: one lock around every call, with the heartbeat
thread's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from p2pfl.protocol import wire
from p2pfl.protocol.events import Event, Malformed, Send
from p2pfl.protocol.messages import ModelMsg, parse_gossip
from p2pfl.protocol.sync import SyncGossip

BEYOND_LAST = "model for a round beyond the last"


@dataclass(frozen=True)
class CaughtUp:
    """What the catch-up found.

    `models`: neighbour -> (round, model), the newest of each, of rounds after
    `from_round` only; `to_round`: the newest of their rounds (`from_round` when none
    came); `resent`: the neighbours whose resend came, sorted.
    """

    from_round: int
    to_round: int
    models: dict[int, tuple[int, wire.Chunked]]
    resent: list[int]


class CatchUp:
    """The catch-up of a peer whose checkpoint is of round `last`, started at `now`."""

    def __init__(self, sync: SyncGossip, last: int, now: float) -> None:
        self.sync = sync
        self.last = last
        self.deadline = now + sync.config.round_timeout_s
        self._asked = -np.inf
        self._newest: dict[int, tuple[int, wire.Chunked]] = {}
        self._resent: set[int] = set()

    def tick(self, now: float) -> list[Send]:
        """The catch-up request to every neighbour, when `heartbeat_s` has passed since
        the last (at once the first time); nothing once done."""
        c = self.sync.config
        if self.done(now) or now - self._asked < c.heartbeat_s:
            return []
        self._asked = now
        for j in c.neighbours:
            self.sync.sent(j, now)
        return [Send(j, "heartbeat", self.last, {"catch_up": True}) for j in c.neighbours]

    def done(self, now: float) -> bool:
        """Every neighbour's resend is in, or the time is up."""
        return now >= self.deadline or self._resent == set(self.sync.config.neighbours)

    def wake_in(self, now: float) -> float:
        """Seconds until the next request or the deadline; 0 when done."""
        if self.done(now):
            return 0.0
        return max(0.0, min(self.deadline, self._asked + self.sync.config.heartbeat_s) - now)

    def feed(self, event: Event, now: float) -> list[Send]:
        """Take one received (or malformed) message into account; returns what to send."""
        log = self.sync.log
        if isinstance(event, Malformed):
            log.warning("message_dropped", reason=event.reason)
            return []
        msg, c = event.msg, self.sync.config
        got = parse_gossip(msg, neighbours=c.neighbours, peers=c.peers, rounds=c.rounds)
        if isinstance(got, str):
            log.warning("message_dropped", reason=got, sender=msg.sender, msg_round=msg.round)
            return []
        if not isinstance(got, ModelMsg):
            return self.sync.note_liveness(got, now)
        if got.round > c.rounds:
            log.warning("message_dropped", reason=BEYOND_LAST, sender=got.sender)
            return []
        self.sync.heard(got.sender, now)
        if got.resend:
            self._resent.add(got.sender)
        if got.round > max(self.last, self._newest.get(got.sender, (-1, None))[0]):
            self._newest[got.sender] = (got.round, got.params)
        return []

    def result(self) -> CaughtUp:
        """The newest model of each neighbour and the round to continue after."""
        to_round = max((r for r, _ in self._newest.values()), default=self.last)
        return CaughtUp(self.last, to_round, dict(self._newest), sorted(self._resent))
