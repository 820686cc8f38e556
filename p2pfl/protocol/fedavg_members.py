"""Who the FedAvg server is talking to: hello, heartbeats and bye on the control channel.

A peer joins with hello on a control connection (its ROUTER routing id); from then on
only that connection may speak for its sender id, so a message whose sender id is
claimed from another connection is dropped. A member is fresh while it was heard
within `peer_timeout_s` (`p2pfl.protocol.liveness.Liveness`): only fresh members are
sampled and heartbeated. A bye removes a member for good, until it says hello again
(a rejoin). Nothing here touches rounds: the server (`fedavg_server`) reacts to what
`control` returns. Like the server, nothing reads a clock: every call takes `now`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from p2pfl.protocol import wire
from p2pfl.protocol.liveness import Liveness

__all__ = ["Control", "Member", "Members"]

Logger = Any  # a structlog logger, bound or not
Control = Literal["hello", "rejoin", "bye", "secagg"] | None  # what the rounds react to


@dataclass
class Member:
    """A joined peer: the control connection a send to it goes to."""

    routing_id: bytes  # the control connection it said hello on


class Members:
    """The server's members: who joined on which connection, who left, who is fresh.

    Args:
        peer_timeout_s: a member silent this long is not fresh (not sampled, nor
            heartbeated).
        log: where dropped control messages are logged.
    """

    def __init__(self, peer_timeout_s: float, log: Logger) -> None:
        self.log = log
        self.joined: dict[int, Member] = {}  # in the order they (last) said hello
        self.liveness: Liveness[int] = Liveness([], peer_timeout_s)
        self.left: set[int] = set()  # said bye, and no hello since

    def __contains__(self, peer: object) -> bool:
        """`peer` has joined (and not said bye since)."""
        return peer in self.joined

    def __iter__(self) -> Iterator[int]:
        """The members' ids, in the order they joined."""
        return iter(self.joined)

    def __len__(self) -> int:
        """How many members there are."""
        return len(self.joined)

    def route(self, peer: int) -> bytes | None:
        """The routing id a send to `peer` goes to (None: not a member)."""
        member = self.joined.get(peer)
        return member.routing_id if member is not None else None

    def fresh(self, now: float) -> list[int]:
        """Members heard within `peer_timeout_s`, sorted: the ones sampled and heartbeated."""
        return self.liveness.fresh(now)

    def heard(self, peer: int, now: float) -> None:
        """A member's update arrived at `now`: a sign of life, like a heartbeat."""
        self.liveness.heard(peer, now)

    def control(self, origin: bytes, msg: wire.Message, now: float) -> Control:
        """Apply a control message from connection `origin`; what the rounds must react to."""
        if msg.type == "hello":
            back = msg.sender in self.joined or msg.sender in self.left
            self.joined[msg.sender] = Member(origin)
            self.liveness.add(msg.sender, now)
            self.left.discard(msg.sender)
            return "rejoin" if back else "hello"
        member = self.joined.get(msg.sender)
        if member is None:
            self._drop("sender has not joined", sender=msg.sender, type=msg.type)
        elif member.routing_id != origin:
            self._drop("sender id claimed from another connection", sender=msg.sender)
        elif msg.type == "heartbeat":
            self.liveness.heard(msg.sender, now)
        elif msg.type == "secagg":  # a secure-aggregation step: for the rounds to check
            self.liveness.heard(msg.sender, now)
            return "secagg"
        elif msg.type == "bye":
            del self.joined[msg.sender]
            self.liveness.forget(msg.sender)
            self.left.add(msg.sender)
            self.log.info("peer_left", sender=msg.sender)
            return "bye"
        else:
            self._drop(f"unexpected message type {msg.type!r} on the control channel")
        return None

    def _drop(self, reason: str, **fields: object) -> None:
        """Log a control message that changes nothing, and why."""
        self.log.warning("message_dropped", reason=reason, **fields)
