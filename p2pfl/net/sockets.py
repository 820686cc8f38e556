"""Every ZeroMQ socket of a process comes from one factory; what arrives is an `Envelope`.

One place sets the options (and, once CurveZMQ arrives, the keys: server options
before `bind`, client keys before `connect`), so no socket is ever built with a
forgotten limit. Options, chosen so a dead peer neither blocks nor floods its
neighbours:

- every send is NOBLOCK and each outbound socket holds at most `SEND_HWM` messages: a
  send to a dead neighbour is queued (start-up order does not matter) until that bound,
  then dropped. A returning peer therefore receives at most `SEND_HWM` stale messages
  per neighbour, which it drops by round number;
- reconnects back off from `RECONNECT_IVL_MS` to `RECONNECT_IVL_MAX_MS`: a dead peer
  costs each neighbour one connection attempt every 2 s, a returning one is reconnected
  within 2 s;
- TCP keepalive finds a connection whose host vanished without closing it (a pulled
  cable), so ZeroMQ reconnects instead of queueing into it. ZMTP heartbeats are not
  used: a peer busy training stops reading its socket, and they would cut its
  connections (losing what the kernel buffered);
- inbound sockets cap frame size (`MAXMSGSIZE`) and queue (`RCVHWM`); LINGER is 0 on
  pure inboxes and bounded on senders, so close flushes the last messages, bounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import zmq

from p2pfl.protocol.wire import MAX_FRAME_BYTES, Buffer, frames_size

CONTROL_LINGER_MS = 500  # a bye or end_session gets this long to leave on close
SEND_HWM = 4  # messages queued per neighbour before sends are dropped
LINGER_MS = 2000  # on close, time allowed to flush the last round's models
RECV_HWM = 16  # messages ZeroMQ queues per connection before it stops reading from it
MAX_RECV_FRAME = 2 * MAX_FRAME_BYTES  # ZMQ drops the connection of a sender above this
RECONNECT_IVL_MS = 100  # first retry after a lost connection ...
RECONNECT_IVL_MAX_MS = 2000  # ... doubling up to this
KEEPALIVE_IDLE_S, KEEPALIVE_INTVL_S, KEEPALIVE_CNT = 10, 5, 3  # a vanished host: ~25 s


@dataclass(frozen=True)
class Envelope:
    """One received message as the transport saw it.

    `authenticated` is the sender identity the transport vouches for (the peer id its
    CURVE key maps to, from the frame's `User-Id`); None while sockets are not
    authenticated, so nothing may be trusted beyond the header's claim. `origin` is the
    ROUTER routing id of the connection, where there is one.
    """

    frames: list[Buffer]
    channel: str = "gossip"  # gossip | control | updates
    authenticated: int | None = None
    origin: bytes | None = None

    @property
    def size(self) -> int:
        """Bytes in the kept frames."""
        return frames_size(self.frames)


def read_capped(sock: zmq.Socket, keep: int) -> list[zmq.Frame]:
    """The frames of one waiting message, at most `keep` of them.

    The rest of an over-long message is read and discarded, so memory stays bounded
    and the caller still sees (and can reject) a message with too many frames.
    """
    frames: list[zmq.Frame] = []
    while True:
        frame = sock.recv(copy=False)
        if len(frames) < keep:
            frames.append(frame)
        if not frame.more:
            return frames


def send_nowait(sock: zmq.Socket, frames: Sequence[Buffer]) -> bool:
    """Queue a message without blocking; False if it was dropped (queue full, no route)."""
    try:
        sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
    except (zmq.Again, zmq.ZMQError):  # ZMQError: EHOSTUNREACH from a ROUTER_MANDATORY socket
        return False
    return True


class Sockets:
    """The factory, and owner of the ZeroMQ context, of one process's sockets.

    `bind` makes a socket that others connect to, `connect` one that connects out;
    `receives` / `sends` choose the inbound limits and outbound options it gets.
    """

    def __init__(self) -> None:
        self.ctx = zmq.Context()

    def _make(self, kind: int, *, receives: bool, sends: bool, linger_ms: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, linger_ms)
        if receives:
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_RECV_FRAME)
            sock.setsockopt(zmq.RCVHWM, RECV_HWM)
        if sends:
            sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        return sock

    def bind(self, kind: int, addr: str, *, sends: bool = False, linger_ms: int = 0) -> zmq.Socket:
        """A socket bound at `addr` that reads untrusted input (and replies if `sends`)."""
        sock = self._make(kind, receives=True, sends=sends, linger_ms=linger_ms)
        if kind == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a gone peer fails at once
        sock.bind(addr)
        return sock

    def connect(
        self,
        kind: int,
        addr: str,
        *,
        receives: bool = False,
        linger_ms: int = LINGER_MS,
        routing_id: bytes | None = None,
    ) -> zmq.Socket:
        """A socket connecting out to `addr`, with backoff and keepalive."""
        sock = self._make(kind, receives=receives, sends=True, linger_ms=linger_ms)
        if routing_id is not None:
            sock.setsockopt(zmq.ROUTING_ID, routing_id)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTVL_S)
        sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_CNT)
        sock.connect(addr)
        return sock

    def envelope(
        self, frames: list[zmq.Frame], channel: str, origin: bytes | None = None
    ) -> Envelope:
        """Wrap received frames; the authenticated sender stays None until CURVE + ZAP
        map a key to an identity (then read from `frames[0].get("User-Id")`)."""
        return Envelope([f.buffer for f in frames], channel, None, origin)

    def term(self) -> None:
        """Terminate the context (every socket must be closed first)."""
        self.ctx.term()
