"""Every ZeroMQ socket of a process comes from one factory; what arrives is an `Envelope`.

One place sets the options and the CurveZMQ keys, so no socket is ever built with a
forgotten limit or in clear by mistake. With a `Keyring`:

- a bound socket is a CURVE server, and a ZAP authenticator (one per factory, started
  before the first bind: without one libzmq would accept any key) admits only the
  keyring's public keys; every message it delivers carries its key's node id as
  `User-Id`, which `envelope` puts in `Envelope.authenticated`. A refused key never
  gets past the handshake, so it cannot make the process buffer a byte of a message;
- a connecting socket uses the process's own pair and the server key of the node it
  connects to: a server without that node's secret key fails the handshake, and what
  arrives on the connection is vouched for as that node's.

Options, chosen so a dead peer neither blocks nor floods its neighbours:

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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from p2pfl.net.keys import Keyring
from p2pfl.protocol.wire import MAX_FRAME_BYTES, Buffer, frames_size

CONTROL_LINGER_MS = 500  # a bye or end_session gets this long to leave on close
SEND_HWM = 4  # messages queued per neighbour before sends are dropped
LINGER_MS = 2000  # on close, time allowed to flush the last round's models
RECV_HWM = 16  # messages ZeroMQ queues per connection before it stops reading from it
MAX_RECV_FRAME = 2 * MAX_FRAME_BYTES  # ZMQ drops the connection of a sender above this
RECONNECT_IVL_MS = 100  # first retry after a lost connection ...
RECONNECT_IVL_MAX_MS = 2000  # ... doubling up to this
KEEPALIVE_IDLE_S, KEEPALIVE_INTVL_S, KEEPALIVE_CNT = 10, 5, 3  # a vanished host: ~25 s
UNVOUCHED = -1  # `authenticated` of a CURVE message without a User-Id: matches no sender
REFUSED_LOGGED = 64  # distinct refused keys logged one line each; then one line per 1000

log = structlog.get_logger()


@dataclass(frozen=True)
class Envelope:
    """One received message as the transport saw it.

    `authenticated` is the sender identity the transport vouches for (the peer id its
    CURVE key maps to, from the frame's `User-Id`; `UNVOUCHED` if CURVE is on and the
    message has none); None while sockets are not authenticated, so nothing may be
    trusted beyond the header's claim. `origin` is the
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


class AllowList:
    """The ZAP decision: a CURVE client key is admitted iff it is in `ids`.

    Refusals are counted; each of the first `REFUSED_LOGGED` distinct keys gets one
    `message_dropped` line, then one line per 1000 refusals, so a flood of handshakes
    cannot flood the log.
    """

    def __init__(self, ids: Mapping[bytes, int], channel: str) -> None:
        self.ids = dict(ids)  # Z85 public key -> node id
        self.channel = channel
        self.refused = 0
        self._logged: set[bytes] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook, called (in the ZAP thread) per handshake."""
        if key in self.ids:
            return True
        self.refused += 1
        fresh = key not in self._logged and len(self._logged) < REFUSED_LOGGED
        if fresh or self.refused % 1000 == 0:
            self._logged.add(key)
            log.warning(
                "message_dropped",
                reason="key not allowed",
                key=key.decode("ascii", "replace"),
                channel=self.channel,
                refused=self.refused,
            )
        return False


class _Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP thread, with the User-Id of an admitted key set to its node id."""

    def __init__(self, ctx: zmq.Context, allow: AllowList) -> None:
        super().__init__(ctx)
        self.allow_list = allow

    def curve_user_id(self, client_public_key: bytes) -> str:
        return str(self.allow_list.ids[z85.encode(client_public_key)])


class Sockets:
    """The factory, and owner of the ZeroMQ context, of one process's sockets.

    `bind` makes a socket that others connect to, `connect` one that connects out;
    `receives` / `sends` choose the inbound limits and outbound options it gets.
    With `keys` every socket is CURVE (see the module docstring); `channel` names the
    sockets in the authenticator's log lines.
    """

    def __init__(self, keys: Keyring | None = None, channel: str = "gossip") -> None:
        self.ctx = zmq.Context()
        self.keys = keys
        self.allow: AllowList | None = None
        self._auth: _Authenticator | None = None
        if keys is not None:
            self.allow = AllowList({k: j for j, k in keys.known.items()}, channel)
            self._auth = _Authenticator(self.ctx, self.allow)
            self._auth.configure_curve_callback("*", credentials_provider=self.allow)
            self._auth.start()

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
        if self.keys is not None:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)
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
        node: int | None = None,
    ) -> zmq.Socket:
        """A socket connecting out to `addr` (node `node`'s, whose key the server must
        hold when CURVE is on), with backoff and keepalive."""
        sock = self._make(kind, receives=receives, sends=True, linger_ms=linger_ms)
        if self.keys is not None:
            if node is None:
                raise ValueError("a CURVE connection needs the node id of its server")
            sock.setsockopt(zmq.CURVE_SERVERKEY, self.keys.server_key(node))
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)
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
        self,
        frames: list[zmq.Frame],
        channel: str,
        origin: bytes | None = None,
        node: int | None = None,
    ) -> Envelope:
        """Wrap received frames with the sender the transport vouches for: None in
        clear; with CURVE, `node` on a connection to that node, else the node id the
        authenticator set as the message's `User-Id`."""
        return Envelope([f.buffer for f in frames], channel, self._sender(frames, node), origin)

    def _sender(self, frames: list[zmq.Frame], node: int | None) -> int | None:
        if self.keys is None:
            return None
        if node is not None:
            return node
        try:
            user: Any = frames[0].get("User-Id")
        except (IndexError, zmq.ZMQError):
            return UNVOUCHED
        return int(user) if isinstance(user, str) and user.isdigit() else UNVOUCHED

    def term(self) -> None:
        """Stop the authenticator and terminate the context (close every socket first)."""
        if self._auth is not None:
            self._auth.stop()
        self.ctx.term()
