"""ZeroMQ sockets: one bound inbox per peer and one outbox per neighbour. Bytes only.

Each peer binds a PULL socket at its address and connects one PUSH socket to each
neighbour's address. PUSH queues for a neighbour that has not bound yet (so start-up
order does not matter) and drops, never blocks, once that neighbour's queue is full
(so a dead neighbour cannot stall a round). This module knows frames, not models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import zmq

from p2pfl.wire import MAX_FRAME_BYTES, Buffer

SEND_HWM = 4  # messages queued per neighbour before sends are dropped
LINGER_MS = 2000  # on close, time allowed to flush the last round's models
RECV_HWM = 16  # messages ZeroMQ queues per connection before it stops reading from it
MAX_RECV_FRAME = 2 * MAX_FRAME_BYTES  # ZMQ drops the connection of a sender above this


class Transport:
    """A peer's sockets: `send` to a neighbour id, `recv` from anyone, `close` at the end."""

    def __init__(
        self,
        bind: str,
        neighbours: Mapping[int, str],
        max_frames: int,
    ) -> None:
        self._ctx = zmq.Context()
        self._max_frames = max_frames
        self.inbox = self._ctx.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.setsockopt(zmq.MAXMSGSIZE, MAX_RECV_FRAME)
        # An honest neighbour has at most a few rounds of models in flight; beyond that
        # ZeroMQ applies back-pressure to the sender instead of queueing more.
        self.inbox.setsockopt(zmq.RCVHWM, RECV_HWM)
        self.inbox.bind(bind)
        self.outboxes: dict[int, zmq.Socket] = {}
        for peer_id, addr in neighbours.items():
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, LINGER_MS)
            sock.setsockopt(zmq.SNDHWM, SEND_HWM)
            sock.connect(addr)
            self.outboxes[peer_id] = sock
        self._poller = zmq.Poller()
        self._poller.register(self.inbox, zmq.POLLIN)

    def send(self, peer_id: int, frames: Sequence[Buffer]) -> bool:
        """Queue a message for a neighbour; False (dropped) if its queue is full."""
        try:
            self.outboxes[peer_id].send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        return True

    def recv(self, timeout_s: float) -> list[Buffer] | None:
        """The next message's frames, or None if none arrives within `timeout_s`.

        At most `max_frames + 1` frames are kept; the rest of an over-long message is
        read and discarded so memory stays bounded and the caller can reject it.
        """
        if not self._poller.poll(max(0, int(timeout_s * 1000))):
            return None
        frames: list[Buffer] = []
        while True:
            frame = self.inbox.recv(copy=False)
            if len(frames) <= self._max_frames:
                frames.append(frame.buffer)
            if not frame.more:
                return frames

    def close(self) -> None:
        """Flush (bounded by LINGER_MS) and close every socket."""
        for sock in self.outboxes.values():
            sock.close()
        self.inbox.close()
        self._ctx.term()
