"""The coordinator's and a centralized peer's sockets as `node.Port`s.

`HubPort` (the coordinator: control ROUTER + update PULL) decodes what arrives into
events whose `origin` is the control connection's routing id (None on the update
channel), and sends each `Send` to the routing id its machine's `route` names; a send
that cannot be queued is logged (`send_dropped`) and reported back with the machine's
`undelivered`. `LinkPort` (a peer: control DEALER + update PUSH) does the same towards
the coordinator, an update on the update channel. Both count the bytes each way, for
the history lines.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from p2pfl.net.sockets import Envelope
from p2pfl.net.transport import Hub, Link
from p2pfl.protocol import wire
from p2pfl.protocol.events import Event, Send
from p2pfl.runtime.node import decode, encode

Route = Callable[[int], bytes | None]  # a peer id -> the routing id of its connection
Undelivered = Callable[[Send, float], None]  # a send that could not be queued, at `now`


class Tally(Protocol):
    """Where a port counts its bytes (a peer's `record.rounds.PeerHistory`)."""

    def sent(self, nbytes: int) -> None:
        """Bytes sent."""
        ...

    def received(self, nbytes: int) -> None:
        """Bytes received."""
        ...


def _event(envelope: Envelope, expect: wire.Expect) -> Event:
    """What arrived, decoded and checked, with the transport's origin and identity."""
    return decode(envelope.frames, expect, envelope.origin, envelope.authenticated)


class HubPort:
    """The coordinator's Hub as a `node.Port`.

    Args:
        hub: the sockets.
        expect: what is accepted (scenario hash, sender ids, array shapes).
        sender: the id stamped on every send (the number of peers).
        route: the machine's `route`.
        undelivered: the machine's `undelivered`.
        log: where dropped sends are logged.
        hold: while it returns True, `receive` reads nothing (the machine has something
            for the runtime to do first, such as a closed round to aggregate).
    """

    def __init__(
        self,
        hub: Hub,
        expect: wire.Expect,
        sender: int,
        route: Route,
        undelivered: Undelivered,
        log: Any,
        hold: Callable[[], bool] = lambda: False,
    ) -> None:
        self.hub = hub
        self.expect = expect
        self.sender = sender
        self.route = route
        self.undelivered = undelivered
        self.log = log
        self.hold = hold
        self.sent = self.received = 0  # bytes since the last `take_bytes`

    def receive(self, timeout_s: float) -> Event | None:
        """The next message on either channel, decoded, or None after `timeout_s`."""
        if self.hold():
            return None
        envelope = self.hub.recv(timeout_s)
        if envelope is None:
            return None
        event = _event(envelope, self.expect)
        self.received += event.size
        return event

    def carry_out(self, sends: Sequence[Send]) -> None:
        """Send each to its peer's connection; a failure is logged and reported."""
        for send in sends:
            assert isinstance(send.to, int)
            frames = encode(send, self.sender, self.expect.scenario)
            route = self.route(send.to)
            if route is not None and self.hub.send(route, frames):
                self.sent += wire.frames_size(frames)
                continue
            self.log.info("send_dropped", to=send.to, type=send.type)
            self.undelivered(send, time.monotonic())

    def take_bytes(self) -> tuple[int, int]:
        """(sent, received) bytes since the last call."""
        out = (self.sent, self.received)
        self.sent = self.received = 0
        return out


class LinkPort:
    """A centralized peer's Link to the coordinator as a `node.Port`; bytes each way are
    counted in `tally`."""

    def __init__(
        self, link: Link, expect: wire.Expect, sender: int, log: Any, tally: Tally
    ) -> None:
        self.link = link
        self.expect = expect
        self.sender = sender
        self.log = log
        self.tally = tally

    def receive(self, timeout_s: float) -> Event | None:
        """The next control message from the coordinator, decoded, or None."""
        envelope = self.link.recv(timeout_s)
        if envelope is None:
            return None
        event = _event(envelope, self.expect)
        self.tally.received(event.size)
        return event

    def carry_out(self, sends: Sequence[Send]) -> None:
        """Send each: an update on the update channel, the rest on the control channel."""
        for send in sends:
            frames = encode(send, self.sender, self.expect.scenario)
            push = send.channel == "updates"
            if self.link.push(frames) if push else self.link.send(frames):
                self.tally.sent(wire.frames_size(frames))
            else:
                self.log.info("send_dropped", to="coordinator", type=send.type)
