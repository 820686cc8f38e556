"""The centralized FedAvg server as a sans-I/O machine (the talk's server, decisions only).

Peers say hello on the control channel (a ROUTER: `Received.origin` is the connection's
routing id) and push updates on the update channel (origin None). Once `min_peers` are
fresh a round starts: a seeded sample of them gets start_round with the global model;
the round closes when every sampled update is in (`all_in`), when the sampled peers
still missing left or restarted or could not be reached (`early`), at its deadline with
at least `min_updates` (`deadline`), or else as `quorum_missed` (the global model is
kept). The runtime then aggregates `closing.updates` with `closing.weights`, evaluates,
records, and hands the new model back with `close_round`; the next round starts on the
next `tick`. After the last round every member gets end_session with the final model
(retried where it could not be queued) and the server waits, bounded, for the byes.
Membership (hello, heartbeats, bye, which connection speaks for which peer, who is
fresh) is `p2pfl.protocol.fedavg_members.Members`; this machine keeps the rounds. With
secure aggregation (`secagg_range` set) a round's updates are masked: the round is
driven by `p2pfl.protocol.secagg.SecAggRound` and closes with `closing.secure`, the
inputs and secrets that unmask only their sum.

The machine never touches a socket or a clock: every call takes `now` (seconds on any
monotonic clock) and returns the `Send`s to carry out; a send that could not be queued
is reported back with `undelivered`. `wake_in(now)` says when to call `tick` next.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import structlog

from p2pfl.protocol import wire
from p2pfl.protocol.events import Event, Malformed, Send
from p2pfl.protocol.fedavg_members import Member, Members
from p2pfl.protocol.fedavg_rounds import (
    ClosedRound,
    ServerConfig,
    Update,
    close_reason,
    parse_update,
    sample,
    stack_updates,
)
from p2pfl.protocol.secagg_server import SecAggRound

__all__ = ["ClosedRound", "FedAvgServer", "ServerConfig", "Update", "stack_updates"]

END_WAIT_S = 5.0  # after end_session, wait at least this long for every peer's bye
END_RETRY_S = 0.1  # while waiting for byes, retry an end_session that was not queued this often

Logger = Any  # a structlog logger, bound or not
Phase = Literal["idle", "waiting", "open", "closing", "ending", "done", "aborted"]


@dataclass
class _Round:
    """The open round: who was sampled, whose update may still come, what came."""

    sampled: tuple[int, ...]
    connected: tuple[int, ...]
    started: float
    deadline: float
    quorum_wait_s: float
    expected: set[int]
    updates: dict[int, Update] = field(default_factory=dict)
    secure: SecAggRound | None = None  # secure aggregation drives this round

    def close(self, round_: int, config: ServerConfig) -> ClosedRound:
        """This round closed with what came: why, and its weights (none if quorum_missed)."""
        if self.secure is not None:
            last = round_ == config.rounds
            return self.secure.closed(self.connected, self.started, self.quorum_wait_s, last=last)
        closed_by = close_reason(self.updates, self.sampled, self.expected, config.min_updates)
        weights = {}
        if closed_by != "quorum_missed":
            uniform = config.weighting == "uniform"
            weights = {j: 1.0 if uniform else float(u.samples) for j, u in self.updates.items()}
        return ClosedRound(
            round=round_,
            closed_by=closed_by,
            sampled=self.sampled,
            connected=self.connected,
            updates=dict(self.updates),
            weights=weights,
            started=self.started,
            quorum_wait_s=self.quorum_wait_s,
            last=round_ == config.rounds,
        )


class FedAvgServer:
    """The FedAvg server's decisions: quorum, sampling, rounds, end (membership: `Members`).

    Args:
        config: the session's settings.
        model: the initial global model (what the first start_round carries).
        now: the current time.
        log: where decisions are logged (default: structlog's logger).
    """

    def __init__(
        self, config: ServerConfig, model: np.ndarray, now: float, log: Logger = None
    ) -> None:
        self.config = config
        self.model = model  # the global model; replaced by `close_round`
        self.log = log if log is not None else structlog.get_logger()
        self.round = 1 if config.rounds > 0 else 0  # the round waited for, open or closing
        self.closed = 0  # the last round closed: updates for it or earlier are late
        self.phase: Phase = "idle"
        self.membership = Members(config.peer_timeout_s, self.log)
        self.open: _Round | None = None
        self.closing: ClosedRound | None = None  # a closed round for the runtime to aggregate
        self.aborted: str | None = None  # why the session was given up (too few peers)
        self.end_unsent: set[int] = set()  # peers whose end_session could not be queued
        self._wait_started = now
        self._bye_deadline: float | None = None
        self._last_beat = -math.inf
        self._outbox: list[Send] = []  # sends decided outside feed / tick (`undelivered`)

    # -- the runtime's calls ----------------------------------------------------------

    @property
    def members(self) -> dict[int, Member]:
        """The joined peers by id, in the order they joined (a view: do not change it)."""
        return self.membership.joined

    @property
    def done(self) -> bool:
        """The session is over (ended, byes in or waited for; or aborted)."""
        return self.phase in ("done", "aborted")

    @property
    def ending(self) -> bool:
        """end_session has gone out (the bye wait, or over)."""
        return self.phase in ("ending", "done")

    def route(self, peer: int) -> bytes | None:
        """The routing id a send to `peer` goes to (None: not a member)."""
        return self.membership.route(peer)

    def live(self, now: float) -> list[int]:
        """Members heard within `peer_timeout_s`, sorted: the ones sampled and heartbeated."""
        return self.membership.fresh(now)

    def feed(self, event: Event, now: float) -> list[Send]:
        """Take one received (or malformed) message; returns what to send now."""
        if isinstance(event, Malformed):
            channel = "control" if event.origin is not None else "updates"
            self._drop(event.reason, channel=channel)
            return []
        out, self._outbox = self._outbox, []
        if event.origin is None:
            self._on_update(event.msg, now)
        else:
            out += self._on_control(event.origin, event.msg, now)
        return out + self._advance(now)

    def tick(self, now: float) -> list[Send]:
        """Heartbeats when due, then whatever time decides: a round starts or closes,
        the quorum wait gives up, the bye wait ends (call when `wake_in` says)."""
        out, self._outbox = self._outbox, []
        due = now - self._last_beat >= self.config.heartbeat_s
        if due and not self.done:
            self._last_beat = now
            out += [Send(p, "heartbeat", self.round) for p in self.live(now)]
        return out + self._advance(now)

    def undelivered(self, send: Send, now: float) -> None:
        """A send of ours could not be queued (the peer is gone, or its queue is full)."""
        assert isinstance(send.to, int)
        mid_round = self.open is not None and send.round == self.round
        if send.type in ("start_round", "secagg") and self.open is not None and mid_round:
            self.open.expected.discard(send.to)  # not worth waiting for
            if self.open.secure is not None:
                self.open.secure.forget(send.to)
            self._outbox += self._check_close(now)
        elif send.type == "end_session" and "error" not in send.meta:
            self.end_unsent.add(send.to)  # retried while waiting for the byes

    def close_round(self, model: np.ndarray, now: float) -> list[Send]:
        """The runtime has aggregated `closing` into `model` (the old one when
        `quorum_missed`); returns end_session to everyone after the last round.

        The next round is begun by the next `tick`, so that the runtime can record this
        one first (its bytes include the end_session, not the next start_round).
        """
        if self.closing is None:
            raise RuntimeError("no round is waiting to be closed")
        last, self.closing, self.open = self.closing.last, None, None
        self.model = model
        if last:
            return self._end()
        self.round += 1
        self.phase = "idle"
        return []

    def wake_in(self, now: float) -> float:
        """Seconds until `tick` has something to do (0: call it now)."""
        c = self.config
        if self.phase in ("idle", "closing", "done", "aborted"):
            return 0.0
        t = self._last_beat + c.heartbeat_s - now
        if self.phase == "waiting":
            t = min(t, self._wait_started + c.startup_timeout_s - now)
        elif self.phase == "open" and self.open is not None:
            secure = self.open.secure
            t = min(t, (secure.deadline if secure is not None else self.open.deadline) - now)
        elif self.phase == "ending":
            if self._bye_deadline is None:
                return 0.0
            t = min(t, END_RETRY_S, self._bye_deadline - now)
        return max(0.0, t)

    # -- time -------------------------------------------------------------------------

    def _advance(self, now: float) -> list[Send]:
        """Move on where the state and `now` allow."""
        c = self.config
        if self.phase == "ending":
            return self._await_byes(now)
        if self.phase == "idle":
            self.phase, self._wait_started = "waiting", now
            if len(self.live(now)) < c.min_peers:
                self.log.info("waiting_for_peers", live=len(self.live(now)), need=c.min_peers)
        if self.phase == "waiting":
            live = self.live(now)
            if len(live) >= c.min_peers:
                return self._start(live, now) if self.round > 0 else self._end()
            if now >= self._wait_started + c.startup_timeout_s:
                return self._abort(len(live))
        elif self.phase == "open":
            return self._check_close(now)
        return []

    def _abort(self, live: int) -> list[Send]:
        """Give the session up (too few peers): end_session with the reason to everyone."""
        c = self.config
        self.aborted = (
            f"only {live} of the {c.min_peers} peers needed (centralized.min_peers) "
            f"were connected after {c.startup_timeout_s:g} s"
        )
        self.phase = "aborted"
        return [
            Send(p, "end_session", self.round, {"error": self.aborted}) for p in self.membership
        ]

    def _start(self, live: list[int], now: float) -> list[Send]:
        """Open the round: start_round with the global model to a seeded sample of `live`."""
        c = self.config
        sampled = sample(
            live,
            self.round,
            seed=c.seed,
            fraction=c.fraction,
            min_updates=c.min_updates,
            poisson=c.poisson,
        )
        deadline = now + c.round_timeout_s
        secure = None
        if c.secagg_range is not None:
            secure = SecAggRound(
                round=self.round,
                sampled=sampled,
                range_=c.secagg_range,
                uniform=c.weighting == "uniform",
                min_updates=c.min_updates,
                now=now,
                round_deadline=deadline,
                step_s=c.round_timeout_s,
                log=self.log,
            )
        self.open = _Round(
            sampled=sampled,
            connected=tuple(live),
            started=now,
            deadline=deadline,
            quorum_wait_s=now - self._wait_started,
            expected=set(sampled),
            secure=secure,
        )
        self.phase = "open"
        return [Send(p, "start_round", self.round, {}, {"params": self.model}) for p in sampled]

    def _check_close(self, now: float) -> list[Send]:
        """Close the open round once no awaited update is missing, or at its deadline (a
        secure round: once its protocol finished); the secure protocol's next sends."""
        r = self.open
        if self.phase != "open" or r is None:
            return []
        out: list[Send] = []
        if r.secure is not None:
            out = r.secure.advance(now, self.live(now))
            if not r.secure.finished:
                return out
        elif r.expected - set(r.updates) and now < r.deadline:
            return []
        closing = self.closing = r.close(self.round, self.config)
        if closing.missing:
            self.log.warning(
                "round_missing_updates", missing=closing.missing, closed_by=closing.closed_by
            )
        self.closed = self.round  # updates for this round are late from now on
        self.phase = "closing"
        return out

    def _end_send(self, peer: int) -> Send:
        """end_session with the final model to `peer` (marked sent until `undelivered`)."""
        self.end_unsent.discard(peer)  # added back if `undelivered` says so
        return Send(peer, "end_session", self.round, {}, {"params": self.model})

    def _end(self) -> list[Send]:
        """end_session with the final model to every member; the bye wait starts next."""
        self.phase, self._bye_deadline = "ending", None
        return [self._end_send(p) for p in list(self.membership)]

    def _await_byes(self, now: float) -> list[Send]:
        """Retry the unsent end_sessions until every member said bye, or the wait is over."""
        if self._bye_deadline is None:
            self._bye_deadline = now + max(END_WAIT_S, self.config.coordinator_timeout_s)
        if not self.membership:
            self.phase = "done"
        elif now >= self._bye_deadline:
            self.log.warning("no_bye", peers=sorted(self.membership))
            self.phase = "done"
        if self.phase == "done":
            return []
        return [self._end_send(p) for p in sorted(self.end_unsent & set(self.membership))]

    # -- messages ---------------------------------------------------------------------

    def _drop(self, reason: str, **fields: object) -> None:
        """Log a message that changes nothing, and why."""
        self.log.warning("message_dropped", reason=reason, **fields)

    def _on_control(self, origin: bytes, msg: wire.Message, now: float) -> list[Send]:
        """A control message, applied by `membership`; a joiner or leaver is not awaited."""
        what = self.membership.control(origin, msg, now)
        if what == "secagg":
            self._on_secagg(msg)
            return []
        if what is not None and self.open is not None:  # gone, or restarted mid-round:
            self.open.expected.discard(msg.sender)  # its update is not coming
            if self.open.secure is not None:
                self.open.secure.forget(msg.sender)
        if what == "bye":
            self.end_unsent.discard(msg.sender)  # no end_session to retry either
        if what not in ("hello", "rejoin"):
            return []
        rejoin = what == "rejoin"
        self.log.info("peer_joined", sender=msg.sender, rejoin=rejoin, round=self.round)
        if self.ending:  # too late for any round: it gets the final model at once
            return [self._end_send(msg.sender)]
        return [Send(msg.sender, "welcome", self.round, {"round": self.round})]

    def _on_secagg(self, msg: wire.Message) -> None:
        """A secure-aggregation step from a member: for the open secure round, or dropped."""
        r = self.open if self.phase == "open" else None
        if r is None or r.secure is None or msg.round != self.round:
            self._drop(
                f"secagg message for round {msg.round}, no secure round of it is open",
                sender=msg.sender,
            )
        elif (why := r.secure.on_message(msg.sender, msg.meta)) is not None:
            self._drop(why, sender=msg.sender)

    def _on_update(self, msg: wire.Message, now: float) -> None:
        """An update on the update channel: kept if it is for the open round and awaited."""
        r = self.open if self.phase == "open" else None
        if msg.type != "update":
            self._drop(f"unexpected message type {msg.type!r} on the update channel")
        elif msg.sender not in self.membership:
            self._drop("update from a peer that has not joined", sender=msg.sender)
        elif msg.round <= self.closed:
            self.log.info("late_update", sender=msg.sender, msg_round=msg.round)
        elif msg.round != self.round or r is None:
            self._drop(
                f"update for round {msg.round}, the open round is "
                f"{self.round if r is not None else 'none'}",
                sender=msg.sender,
            )
        elif msg.sender not in r.sampled:
            self._drop("update from a peer not sampled this round", sender=msg.sender)
        elif msg.sender in r.updates:
            self._drop("duplicate update for this round", sender=msg.sender)
        elif r.secure is not None:
            if (why := r.secure.on_masked(msg)) is not None:
                self._drop(why, sender=msg.sender)
            else:
                self.membership.heard(msg.sender, now)
        elif isinstance(got := parse_update(msg), str):
            self._drop(got, sender=msg.sender)
        else:
            self.membership.heard(msg.sender, now)
            r.updates[msg.sender] = got
