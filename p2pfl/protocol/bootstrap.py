"""Bootstrap as sans-I/O machines: a gossip peer learns its neighbours' addresses from
the coordinator (`Bootstrap`), and the coordinator keeps the registry (`Registry`).

Peer: say hello with this peer's address; the welcome that names exactly this peer's
neighbours, each with a valid tcp:// address, is the answer; anything else is dropped
(one `message_dropped` line, `channel="bootstrap"`). No such welcome within
`startup_timeout_s` is a failure the runtime reports. After that the peer never
needs the coordinator again, except for a best-effort bye.

Coordinator (gossip mode): every peer says hello with its address; a peer is welcomed,
with its neighbours' addresses, as soon as all of them have registered, once; a bye
means it finished. A welcome the runtime could not deliver is retried at the next
registration (`undelivered`).

The runtime maps the coordinator's `Send.to` (a peer id) to that peer's connection
with `Registry.route(peer)`: the `origin` its hello came on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from p2pfl.protocol.events import COORDINATOR, Event, Malformed, Send
from p2pfl.protocol.messages import BAD_HELLO, NOT_A_WELCOME, hello_address, parse_welcome


class Bootstrap:
    """A gossip peer's side: hello, then wait (bounded) for the welcome.

    Args:
        peer_id: this peer's id.
        address: the tcp:// address it listens at (announced in the hello).
        neighbours: its neighbours' ids, sorted.
        coordinator: the coordinator's sender id (the number of peers).
        startup_timeout_s: how long to wait for the welcome.
        now: the time the hello goes out.
    """

    def __init__(
        self,
        peer_id: int,
        address: str,
        neighbours: Sequence[int],
        coordinator: int,
        startup_timeout_s: float,
        now: float,
        log: Any = None,
    ) -> None:
        self.peer_id = peer_id
        self.address = address
        self.neighbours = sorted(neighbours)
        self.coordinator = coordinator
        self.startup_timeout_s = startup_timeout_s
        self.deadline = now + startup_timeout_s
        self.addresses: dict[int, str] | None = None  # the welcome's, once it came
        self.log = log if log is not None else structlog.get_logger()

    def hello(self) -> list[Send]:
        """The registration: this peer's address, to the coordinator."""
        return [Send(COORDINATOR, "hello", 0, {"address": self.address})]

    def feed(self, event: Event, now: float) -> list[Send]:
        """A message from the coordinator: the welcome, or a drop."""
        if self.addresses is not None:
            return []
        if isinstance(event, Malformed):
            self._drop(event.reason)
            return []
        got = parse_welcome(event.msg, coordinator=self.coordinator, neighbours=self.neighbours)
        if got is None:
            self._drop(NOT_A_WELCOME)
        else:
            self.addresses = got
        return []

    def tick(self, now: float) -> list[Send]:
        """Nothing is repeated: one hello."""
        return []

    @property
    def welcomed(self) -> bool:
        """The welcome came."""
        return self.addresses is not None

    def done(self, now: float) -> bool:
        """Welcomed, or out of time (then `welcomed` is False)."""
        return self.welcomed or now >= self.deadline

    def wake_in(self, now: float) -> float:
        """Seconds left to wait for the welcome; 0 when done."""
        return 0.0 if self.done(now) else self.deadline - now

    def bye(self) -> list[Send]:
        """The best-effort goodbye at the end of the run."""
        return [Send(COORDINATOR, "bye", 0)]

    def _drop(self, reason: str) -> None:
        self.log.warning("message_dropped", reason=reason, channel="bootstrap")


@dataclass
class Member:
    """A registered peer: the connection its hello came on, its address, welcomed yet."""

    origin: bytes | None
    address: str
    welcomed: bool = False


class Registry:
    """The coordinator's bootstrap registry (gossip mode).

    Args:
        neighbours: every peer id -> its neighbours' ids (the public graph).
    """

    def __init__(self, neighbours: Mapping[int, Sequence[int]], log: Any = None) -> None:
        self.neighbours = {i: sorted(js) for i, js in neighbours.items()}
        self.members: dict[int, Member] = {}
        self.left: set[int] = set()
        self.log = log if log is not None else structlog.get_logger()

    @property
    def finished(self) -> bool:
        """Every peer has said bye."""
        return len(self.left) >= len(self.neighbours)

    def route(self, peer: int) -> bytes | None:
        """The connection (routing id) a send to `peer` goes to; None: not a member."""
        member = self.members.get(peer)
        return member.origin if member is not None else None

    def feed(self, event: Event, now: float) -> list[Send]:
        """A message on the control channel; returns the welcomes now due."""
        if isinstance(event, Malformed):
            self._drop(event.reason, channel="control")
            return []
        msg = event.msg
        member = self.members.get(msg.sender)
        if msg.type == "hello":
            return self._hello(event.origin, msg.sender, hello_address(event.msg))
        if member is None:
            self._drop("sender has not joined", sender=msg.sender, type=msg.type)
        elif member.origin != event.origin:
            self._drop("sender id claimed from another connection", sender=msg.sender)
        elif msg.type == "bye":
            del self.members[msg.sender]
            self.left.add(msg.sender)
            self.log.info("peer_left", sender=msg.sender)
        elif msg.type != "heartbeat":  # a heartbeat is a sign of life: nothing to do
            self._drop(f"unexpected message type {msg.type!r} on the control channel")
        return []

    def undelivered(self, send: Send, now: float) -> None:
        """A send of ours could not be queued: a welcome is due again at the next hello."""
        member = self.members.get(send.to) if isinstance(send.to, int) else None
        if member is not None and send.type == "welcome":
            member.welcomed = False

    def _hello(self, origin: bytes | None, sender: int, address: str | None) -> list[Send]:
        if address is None:
            self._drop(BAD_HELLO, sender=sender)
            return []
        back = sender in self.members or sender in self.left
        self.members[sender] = Member(origin, address)
        self.left.discard(sender)
        self.log.info("peer_joined", sender=sender, rejoin=back, round=0)
        return self._welcomes()

    def _welcomes(self) -> list[Send]:
        """A welcome to every registered peer whose neighbours have all registered."""
        sends = []
        for i, m in self.members.items():
            neighbours = self.neighbours.get(i, [])
            if m.welcomed or not all(j in self.members for j in neighbours):
                continue
            m.welcomed = True
            pairs = [[j, self.members[j].address] for j in neighbours]
            sends.append(Send(i, "welcome", 0, {"neighbours": pairs}))
        return sends

    def _drop(self, reason: str, **fields: object) -> None:
        self.log.warning("message_dropped", reason=reason, **fields)
