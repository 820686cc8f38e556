"""ZeroMQ sockets, bytes only: the gossip mesh and the coordinator's two channels.

Gossip (`Transport`): each peer binds a PULL socket at its address and connects one
PUSH socket to each neighbour's address. PUSH queues for a neighbour that has not
bound yet (so start-up order does not matter) and drops, never blocks, once that
neighbour's queue is full (so a dead neighbour cannot stall a round).

Coordinator (`Hub` on the coordinator, `Link` on a peer): a control channel (ROUTER
bound by the coordinator, one DEALER per peer) carries hello / welcome / start_round /
end_session / heartbeat / bye, the talk's Socket.IO events; a separate update channel
(PULL bound by the coordinator, PUSH from each peer) carries model updates, the role
the talk's Kafka topic played. This module knows frames, not models.

Socket options live in `p2pfl.net.sockets` (one factory); link faults in
`p2pfl.net.links` (a wrapper around `Transport.send`). `recv` returns an `Envelope`:
the frames plus the slot for the transport-authenticated sender.

Sends from the heartbeat thread, the delay line and the round loop are serialised by
one lock: ZeroMQ sockets may change threads only behind a full memory barrier.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Collection, Mapping, Sequence

import zmq

from p2pfl.net.keys import Keyring
from p2pfl.net.sockets import (
    CONTROL_LINGER_MS,
    Envelope,
    Sockets,
    read_capped,
    send_nowait,
)
from p2pfl.protocol.wire import Buffer


def _poll_ms(timeout_s: float) -> int:
    """A poll timeout in whole milliseconds, rounded up: never a busy spin."""
    return max(0, math.ceil(timeout_s * 1000))


class Transport:
    """A peer's gossip sockets: `send` to a neighbour id, `recv` from anyone, `close`."""

    def __init__(
        self,
        bind: str,
        neighbours: Mapping[int, str],
        max_frames: int,
        keys: Keyring | None = None,
    ) -> None:
        self._sockets = Sockets(keys, "gossip")
        self._max_frames = max_frames
        # An honest neighbour has at most a few rounds of models in flight; beyond that
        # ZeroMQ applies back-pressure to the sender instead of queueing more.
        self.inbox = self._sockets.bind(zmq.PULL, bind)
        self.outboxes: dict[int, zmq.Socket] = {}
        for peer_id, addr in neighbours.items():
            self.outboxes[peer_id] = self._sockets.connect(zmq.PUSH, addr, node=peer_id)
        self._poller = zmq.Poller()
        self._poller.register(self.inbox, zmq.POLLIN)
        self._lock = threading.Lock()  # one sender at a time: round loop, ticker, delay line

    def send(self, peer_id: int, frames: Sequence[Buffer]) -> bool:
        """Queue a message for a neighbour; False (dropped) if its queue is full.

        Safe to call from any thread.
        """
        with self._lock:
            if peer_id not in self.outboxes:
                raise KeyError(peer_id)
            return send_nowait(self.outboxes[peer_id], frames)

    def recv(self, timeout_s: float) -> Envelope | None:
        """The next message, or None if none arrives within `timeout_s`.

        At most `max_frames + 1` frames are kept; the rest of an over-long message is
        read and discarded so memory stays bounded and the caller can reject it.
        """
        if not self._poller.poll(_poll_ms(timeout_s)):
            return None
        return self._sockets.envelope(read_capped(self.inbox, self._max_frames + 1), "gossip")

    def connect(self, peer_id: int, addr: str) -> None:
        """Add an outbox to a neighbour learnt after start-up (from the bootstrap)."""
        with self._lock:
            self.outboxes[peer_id] = self._sockets.connect(zmq.PUSH, addr, node=peer_id)

    def close(self, linger_ms: int | None = None, done: Collection[int] = ()) -> None:
        """Flush (bounded by `linger_ms`, default the sockets' LINGER_MS) and close.

        The outboxes of neighbours in `done` (finished or gone: they read nothing more)
        are dropped at once: messages queued for a process that has exited would hold
        the close for the whole linger.
        """
        for j, sock in self.outboxes.items():
            sock.close(linger=0 if j in done else linger_ms)
        self.inbox.close()
        self._sockets.term()


class Link:
    """A peer's connection to the coordinator: control DEALER, and PUSH for updates.

    `coordinator` is the coordinator's node id: with `keys`, the key it must hold and
    the sender every message on this link is vouched for as.
    """

    def __init__(
        self,
        control: str,
        updates: str | None,
        max_frames: int,
        keys: Keyring | None = None,
        coordinator: int | None = None,
    ) -> None:
        self._sockets = Sockets(keys, "control")
        self._max_frames = max_frames
        self._coordinator = coordinator
        # One routing id for this process's life: after a TCP reconnect the coordinator
        # still knows the peer by it; a restarted peer gets a new one (and says hello).
        self.control = self._sockets.connect(
            zmq.DEALER,
            control,
            receives=True,
            linger_ms=CONTROL_LINGER_MS,
            routing_id=b"p2pfl-" + secrets.token_hex(8).encode(),
            node=coordinator,
        )
        self.updates: zmq.Socket | None = None
        if updates is not None:
            self.updates = self._sockets.connect(zmq.PUSH, updates, node=coordinator)

    def send(self, frames: Sequence[Buffer]) -> bool:
        """Queue a control message for the coordinator; False if dropped."""
        return send_nowait(self.control, frames)

    def push(self, frames: Sequence[Buffer]) -> bool:
        """Queue a model update on the update channel; False if dropped."""
        if self.updates is None:
            raise RuntimeError("this link has no update channel")
        return send_nowait(self.updates, frames)

    def recv(self, timeout_s: float) -> Envelope | None:
        """The next control message from the coordinator, or None after `timeout_s`."""
        if not self.control.poll(_poll_ms(timeout_s)):
            return None
        frames = read_capped(self.control, self._max_frames + 1)
        return self._sockets.envelope(frames, "control", node=self._coordinator)

    def close(self) -> None:
        """Flush (bounded by the lingers) and close."""
        self.control.close()
        if self.updates is not None:
            self.updates.close()
        self._sockets.term()


class Hub:
    """The coordinator's sockets: control ROUTER (replies by routing id) and update PULL.

    ROUTER_MANDATORY makes a send to a peer whose connection is gone fail at once
    (counted as dropped) instead of vanishing silently.
    """

    def __init__(
        self, control: str, updates: str | None, max_frames: int, keys: Keyring | None = None
    ) -> None:
        self._sockets = Sockets(keys, "control")
        self._max_frames = max_frames
        self.control = self._sockets.bind(
            zmq.ROUTER, control, sends=True, linger_ms=CONTROL_LINGER_MS
        )
        self._poller = zmq.Poller()
        self._poller.register(self.control, zmq.POLLIN)
        self._control_next = True
        self.updates: zmq.Socket | None = None
        if updates is not None:
            self.updates = self._sockets.bind(zmq.PULL, updates)
            self._poller.register(self.updates, zmq.POLLIN)

    def send(self, routing_id: bytes, frames: Sequence[Buffer]) -> bool:
        """Queue a control message for one peer; False if dropped (gone, or queue full)."""
        return send_nowait(self.control, [routing_id, *frames])

    def recv(self, timeout_s: float) -> Envelope | None:
        """The next control message (with its routing id as `origin`) or update; None if
        nothing arrives within `timeout_s`."""
        ready = dict(self._poller.poll(_poll_ms(timeout_s)))
        # When both channels have input, take turns: a flood on one cannot starve the other.
        order = [self.control, self.updates] if self._control_next else [self.updates, self.control]
        for sock in order:
            if sock is not None and sock in ready:
                self._control_next = sock is not self.control
                if sock is self.control:
                    frames = read_capped(self.control, self._max_frames + 2)
                    return self._sockets.envelope(frames[1:], "control", frames[0].bytes)
                return self._sockets.envelope(read_capped(sock, self._max_frames + 1), "updates")
        return None

    def close(self) -> None:
        """Flush (bounded by the lingers) and close."""
        self.control.close()
        if self.updates is not None:
            self.updates.close()
        self._sockets.term()
