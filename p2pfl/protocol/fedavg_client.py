"""A centralized-mode peer's protocol as a sans-I/O machine (the talk's node, decisions only).

The peer says hello (with its sample count), is welcomed, and heartbeats every
`heartbeat_s` from then on while it waits. Any checked message from the coordinator is
a sign of life; anything claiming another sender is dropped. start_round and
end_session are queued: when the runtime has read everything waiting on the socket,
`take` hands over the newest (a straggler skips to the newest round instead of
replaying old ones: `skipped_round`). The coordinator is lost after
`coordinator_timeout_s` of silence (`startup_timeout_s` before the welcome), judged
only while the peer waits with nothing queued: a long training round is not the
coordinator's silence, its heartbeats wait in the queue. An end_session with an error
(or without the final model) loses it too. With secure aggregation the server's
`secagg` steps of a round are queued too and handed over in order (`Secure`) after
that round's start_round; a newer start_round or end_session drops the older ones.

No sockets, no clock: every call takes `now`; the runtime carries out the `Send`s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import structlog

from p2pfl.protocol import wire
from p2pfl.protocol.events import COORDINATOR, Event, Malformed, Received, Send
from p2pfl.protocol.liveness import Liveness

Logger = Any  # a structlog logger, bound or not
EvaluatedOn = Literal["global", "update"]  # what a history line's accuracy was measured on
MAX_SECURE_QUEUED = 16  # secagg steps held while training (a secure round sends 3)


@dataclass(frozen=True)
class ClientConfig:
    """What a centralized-mode peer decides with: plain values."""

    peer: int  # this peer's id
    coordinator: int  # the sender id the coordinator stamps (the number of peers)
    samples: int  # training samples, announced in hello and every update
    heartbeat_s: float = 0.5
    coordinator_timeout_s: float = 10.0  # silence after the welcome that means it is gone
    startup_timeout_s: float = 60.0  # how long to wait for the welcome
    secagg_range: float | None = None  # secure aggregation: each coordinate's |Δ| bound


@dataclass(frozen=True)
class Train:
    """start_round of `round`: train from `params`, the global model after `round - 1`
    (`size`: the message's bytes on the wire)."""

    round: int
    params: wire.Chunked
    size: int = 0


@dataclass(frozen=True)
class Finish:
    """end_session: `params` is the final global model, after round `round`."""

    round: int
    params: wire.Chunked
    size: int = 0


@dataclass(frozen=True)
class Lost:
    """The coordinator is gone: silent too long, or (`ended`) it ended the session with
    an error or without the final model."""

    reason: str
    ended: bool = False


@dataclass(frozen=True)
class Secure:
    """A secure-aggregation step of `round` from the server (roster, shares, unmask)."""

    round: int
    meta: Mapping[str, Any]


Task = Train | Finish | Lost | Secure


class FedAvgClient:
    """One centralized-mode peer's decisions about the coordinator's messages.

    Args:
        config: the peer's settings.
        now: the current time; the welcome is waited for from here.
        log: where decisions are logged (default: structlog's logger).
    """

    def __init__(self, config: ClientConfig, now: float, log: Logger = None) -> None:
        self.config = config
        self.log = log if log is not None else structlog.get_logger()
        self.welcomed = False
        self.liveness: Liveness[str] = Liveness(
            [COORDINATOR], config.startup_timeout_s, grace_until=now
        )
        self.last_sent = now
        self._found: Received | None = None  # the newest start_round / end_session
        self._secure: list[Received] = []  # secagg steps, in arrival order

    @property
    def limit_s(self) -> float:
        """The silence that means the coordinator is gone, before / after the welcome."""
        c = self.config
        return c.coordinator_timeout_s if self.welcomed else c.startup_timeout_s

    # -- what the peer sends ------------------------------------------------------------

    def _send(self, send: Send, now: float) -> Send:
        self.last_sent = now
        return send

    def hello(self, now: float) -> Send:
        """The first message: who we are and how many samples we train on."""
        return self._send(Send(COORDINATOR, "hello", 0, {"samples": self.config.samples}), now)

    def update(self, round_: int, loss: float, params: np.ndarray, now: float) -> Send:
        """Our model after training in `round_`, on the update channel."""
        meta: Mapping[str, Any] = {"samples": self.config.samples, "loss": float(loss)}
        send = Send(COORDINATOR, "update", round_, meta, {"params": params}, channel="updates")
        return self._send(send, now)

    def masked(
        self, round_: int, loss: float, values: np.ndarray, out_of_range: int, now: float
    ) -> Send:
        """Our masked input of secure round `round_` (uint32), on the update channel."""
        meta = {"loss": float(loss), "out_of_range": int(out_of_range)}
        send = Send(COORDINATOR, "update", round_, meta, {"masked": values}, channel="updates")
        return self._send(send, now)

    def secagg(self, round_: int, meta: Mapping[str, Any], now: float) -> Send:
        """A secure-aggregation step of ours (keys, shares, unmask answer)."""
        return self._send(Send(COORDINATOR, "secagg", round_, meta), now)

    def bye(self, round_: int, now: float) -> Send:
        """The last message, after the final model of `round_` arrived."""
        return self._send(Send(COORDINATOR, "bye", round_), now)

    # -- what the runtime feeds ---------------------------------------------------------

    def feed(self, event: Event, now: float) -> list[Send]:
        """Take one received (or malformed) message; nothing is sent in reply."""
        if isinstance(event, Malformed):
            self.log.warning("message_dropped", reason=event.reason)
            return []
        msg = event.msg
        if msg.sender != self.config.coordinator:
            self.log.warning(
                "message_dropped", reason="not from the coordinator", sender=msg.sender
            )
            return []
        self.liveness.heard(COORDINATOR, now)
        if msg.type == "welcome" and not self.welcomed:
            self.welcomed = True
            self.log.info("joined", round=msg.meta.get("round"))
        elif msg.type in ("start_round", "end_session"):
            if self._found is not None:
                self.log.info("skipped_round", skipped=self._found.msg.round, newer=msg.round)
            self._found = event
            self._secure = [e for e in self._secure if e.msg.round >= msg.round]
        elif msg.type == "secagg" and self.config.secagg_range is not None:
            if len(self._secure) >= MAX_SECURE_QUEUED:  # a round has 3 steps: a flood
                self.log.warning("message_dropped", reason="too many queued secagg steps")
            else:
                self._secure.append(event)
        elif msg.type != "heartbeat":
            self.log.warning("message_dropped", reason=f"unexpected type {msg.type!r}")
        return []

    def tick(self, now: float) -> list[Send]:
        """A heartbeat once welcomed, when nothing was sent for `heartbeat_s`."""
        if self.welcomed and now - self.last_sent >= self.config.heartbeat_s:
            return [self._send(Send(COORDINATOR, "heartbeat", 0), now)]
        return []

    def wake_in(self, now: float) -> float:
        """How long the runtime may wait on the socket before calling `tick` / `take`."""
        if self._found is not None or self._secure:
            return 0.0  # only drain what is already queued
        return min(self.config.heartbeat_s, self.limit_s)

    def take(self, now: float) -> Task | None:
        """The newest queued start_round / end_session, else the oldest queued secagg
        step, or `Lost`, or None (wait on).

        Call it only when nothing more is queued on the socket: the silence it judges
        is the silence of a peer waiting with nothing to read.
        """
        found, self._found = self._found, None
        if found is not None:
            return self._task(found)
        if self._secure:
            msg = self._secure.pop(0).msg
            return Secure(msg.round, msg.meta)
        limit = self.limit_s
        if self.liveness.silent_s(COORDINATOR, now) > limit:
            what = "no welcome" if not self.welcomed else "no message"
            return Lost(f"{what} from the coordinator for {limit:g} s")
        return None

    def _task(self, found: Received) -> Task | None:
        """What a queued start_round / end_session asks of the peer."""
        msg = found.msg
        if msg.type == "end_session":
            error = msg.meta.get("error")
            if error is not None or "params" not in msg.arrays:
                reason = error or "no final model"
                return Lost(f"the coordinator ended the session: {reason}", ended=True)
            return Finish(msg.round, msg.arrays["params"], found.size)
        if "params" not in msg.arrays:
            self.log.warning("message_dropped", reason="start_round without params")
            return None
        return Train(msg.round, msg.arrays["params"], found.size)


def lines_on_adopt(recorded: int, trained: int | None, done: int) -> list[tuple[int, EvaluatedOn]]:
    """The history lines a peer writes when the global model after round `done` arrives.

    Args:
        recorded: the last round that has a line.
        trained: the last round the peer trained in (None: none yet).
        done: the round the arrived global model closed.

    Returns:
        (round, evaluated_on) in order: a round it trained in whose global model never
        came (it was not sampled in the next round) gets its line evaluated on its own
        update, the best model it had then; then `done` itself, on the global model,
        unless it already has a line.
    """
    lines: list[tuple[int, EvaluatedOn]] = []
    if trained is not None and recorded < trained < done:
        lines.append((trained, "update"))
    if done > recorded:
        lines.append((done, "global"))
    return lines
