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

Liveness (gossip): a `Ticker` thread lets the peer send a small heartbeat to each
neighbour it has sent nothing to for `gossip.heartbeat_s`, on the same PUSH sockets as
the models (any message counts as a sign of life). Sends from that thread, the delay
line and the round loop are serialised by one lock: ZeroMQ sockets may change threads
only behind a full memory barrier.

Socket options, chosen so a dead peer neither blocks nor floods its neighbours:
- every send is NOBLOCK and each outbox holds at most `SEND_HWM` messages: a send to
  a dead neighbour is queued (start-up order does not matter) until that bound, then
  dropped. A returning peer therefore receives at most `SEND_HWM` stale messages per
  neighbour, which it drops by round number;
- reconnects back off from `RECONNECT_IVL_MS` to `RECONNECT_IVL_MAX_MS`: a dead peer
  costs each neighbour one connection attempt every 2 s, a returning one is reconnected
  within 2 s;
- TCP keepalive finds a connection whose host vanished without closing it (a pulled
  cable), so ZeroMQ reconnects instead of queueing into it. ZMTP heartbeats are not
  used: a peer busy training stops reading its socket, and they would cut its
  connections (losing what the kernel buffered);
- inbound sockets cap frame size (`MAXMSGSIZE`) and queue (`RCVHWM`); LINGER is 0 on
  them and `LINGER_MS` on outboxes, so close flushes the last round's models, bounded;
- the coordinator's ROUTER is `ROUTER_MANDATORY`: a reply to a peer whose connection is
  gone fails at once (counted as dropped) instead of vanishing.

Link faults (`[faults] link_delay_ms`, `link_drop`, gossip only): `Transport` can lose
each message to a neighbour with a seeded probability, and hold each one back for a
fixed delay before it is queued, as a slow or lossy network would. Delayed messages
wait (copied) in a heap served by one small sender thread, so the peer's round loop
never blocks on them; `close` sends what falls due within `LINGER_MS` and drops the
rest. Losses are counted and logged once, at debug level (`link_dropped`), at close.
"""

from __future__ import annotations

import heapq
import math
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import structlog
import zmq

from p2pfl.wire import MAX_FRAME_BYTES, Buffer

CONTROL_LINGER_MS = 500  # a bye or end_session gets this long to leave on close
SEND_HWM = 4  # messages queued per neighbour before sends are dropped
LINGER_MS = 2000  # on close, time allowed to flush the last round's models
RECV_HWM = 16  # messages ZeroMQ queues per connection before it stops reading from it
MAX_RECV_FRAME = 2 * MAX_FRAME_BYTES  # ZMQ drops the connection of a sender above this
RECONNECT_IVL_MS = 100  # first retry after a lost connection ...
RECONNECT_IVL_MAX_MS = 2000  # ... doubling up to this
KEEPALIVE_IDLE_S, KEEPALIVE_INTVL_S, KEEPALIVE_CNT = 10, 5, 3  # a vanished host: ~25 s
log = structlog.get_logger()


def read_capped(sock: zmq.Socket, keep: int) -> list[Buffer]:
    """The frames of one waiting message, at most `keep` of them.

    The rest of an over-long message is read and discarded, so memory stays bounded
    and the caller still sees (and can reject) a message with too many frames.
    """
    frames: list[Buffer] = []
    while True:
        frame = sock.recv(copy=False)
        if len(frames) < keep:
            frames.append(frame.buffer)
        if not frame.more:
            return frames


def send_nowait(sock: zmq.Socket, frames: Sequence[Buffer]) -> bool:
    """Queue a message without blocking; False if it was dropped (queue full, no route)."""
    try:
        sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
    except (zmq.Again, zmq.ZMQError):  # ZMQError: EHOSTUNREACH from a ROUTER_MANDATORY socket
        return False
    return True


def _outbound(sock: zmq.Socket, linger_ms: int) -> zmq.Socket:
    """Send-side options every connecting socket gets (see the module docstring)."""
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDHWM, SEND_HWM)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTVL_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_CNT)
    return sock


class Ticker:
    """Calls `tick()` every `interval_s` from one daemon thread until `stop` (heartbeats).

    An exception in `tick` is logged and the ticking goes on: liveness must not die
    with one bad call.
    """

    def __init__(self, interval_s: float, tick: Callable[[], None]) -> None:
        self._interval_s = interval_s
        self._tick = tick
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="p2pfl-ticker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            try:
                self._tick()
            except Exception:  # logged, and the next tick tries again
                log.exception("tick_failed")

    def stop(self) -> None:
        """Stop ticking and wait for a tick in progress to finish."""
        self._stopped.set()
        self._thread.join()


def _inbound(sock: zmq.Socket) -> zmq.Socket:
    """Receive limits every socket that reads untrusted input gets."""
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_RECV_FRAME)
    sock.setsockopt(zmq.RCVHWM, RECV_HWM)
    return sock


class _DelayLine:
    """Sends each message once its delay has passed, from one thread, in due order.

    `put` copies the frames (the caller may reuse its buffers) and returns at once;
    the thread sleeps on a condition until the earliest message is due, so the
    caller's loop is never held up. Only this thread sends on the outboxes while it
    runs; `close` lets it send what is due by a deadline, drops the rest and joins it.
    """

    def __init__(self, delay_s: float, send: Callable[[int, list[bytes]], bool]) -> None:
        self._delay_s = delay_s
        self._send = send
        self._heap: list[tuple[float, int, int, list[bytes]]] = []  # (due, seq, to, frames)
        self._seq = 0
        self._closing = False
        self._cond = threading.Condition()
        self.queue_full: Counter[int] = Counter()  # refused by ZeroMQ when they fell due
        self.unsent = 0  # still waiting at the close deadline: dropped
        self._thread = threading.Thread(target=self._run, name="p2pfl-link-delay", daemon=True)
        self._thread.start()

    def put(self, peer_id: int, frames: Sequence[Buffer]) -> None:
        """Hold a copy of `frames` for `peer_id` until the delay has passed."""
        copies = [bytes(f) for f in frames]
        with self._cond:
            due = time.monotonic() + self._delay_s
            heapq.heappush(self._heap, (due, self._seq, peer_id, copies))
            self._seq += 1
            self._cond.notify()

    def _next(self) -> tuple[int, list[bytes]] | None:
        """The next message once it is due; None when closing and nothing is left."""
        with self._cond:
            while True:
                if self._heap:
                    wait = self._heap[0][0] - time.monotonic()
                    if wait <= 0:
                        _, _, peer_id, frames = heapq.heappop(self._heap)
                        return peer_id, frames
                    self._cond.wait(wait)
                elif self._closing:
                    return None
                else:
                    self._cond.wait()

    def _run(self) -> None:
        while (item := self._next()) is not None:
            peer_id, frames = item
            if not self._send(peer_id, frames):
                self.queue_full[peer_id] += 1
                log.info("send_dropped", to=peer_id, reason="neighbour queue full", delayed=True)

    def close(self, deadline: float) -> None:
        """Send what falls due by `deadline` (monotonic), drop the rest, stop the thread."""
        with self._cond:
            keep = [item for item in self._heap if item[0] <= deadline]
            self.unsent += len(self._heap) - len(keep)
            heapq.heapify(keep)
            self._heap = keep
            self._closing = True
            self._cond.notify()
        self._thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
        if self._thread.is_alive():  # cannot happen: the thread never blocks on a socket
            log.error("link_delay_thread_stuck")


class Transport:
    """A peer's sockets: `send` to a neighbour id, `recv` from anyone, `close` at the end.

    `link_delay_ms` and `link_drop` inject link faults on send (see the module
    docstring); `seed` seeds the losses: the same sequence of sends loses the same
    messages (in a gossip run, heartbeats interleave with the models at moments that
    depend on timing, so which models are lost varies from run to run).
    With both at 0 (the default) sends go straight to ZeroMQ, exactly as without them.
    """

    def __init__(
        self,
        bind: str,
        neighbours: Mapping[int, str],
        max_frames: int,
        *,
        link_delay_ms: float = 0.0,
        link_drop: float = 0.0,
        seed: int | Sequence[int] | None = None,
    ) -> None:
        if not (link_delay_ms >= 0.0 and np.isfinite(link_delay_ms)):
            raise ValueError(f"link_delay_ms = {link_delay_ms!r}: must be finite and >= 0")
        if not 0.0 <= link_drop < 1.0:
            raise ValueError(f"link_drop = {link_drop!r}: must be in [0, 1)")
        self._ctx = zmq.Context()
        self._max_frames = max_frames
        # An honest neighbour has at most a few rounds of models in flight; beyond that
        # ZeroMQ applies back-pressure to the sender instead of queueing more.
        self.inbox = _inbound(self._ctx.socket(zmq.PULL))
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.bind(bind)
        self.outboxes: dict[int, zmq.Socket] = {}
        for peer_id, addr in neighbours.items():
            self.outboxes[peer_id] = self._outbox(addr)
        self._poller = zmq.Poller()
        self._poller.register(self.inbox, zmq.POLLIN)
        self._lock = threading.Lock()  # one sender at a time: round loop, ticker, delay line
        self._faulty = link_delay_ms > 0.0 or link_drop > 0.0
        self._drop = link_drop
        self._rng = np.random.default_rng(seed)
        self._delay = (
            _DelayLine(link_delay_ms / 1000.0, self._send_now) if link_delay_ms > 0.0 else None
        )
        self.link_messages: Counter[int] = Counter()  # send calls per neighbour
        self.link_dropped: Counter[int] = Counter()  # of which lost on the link (link_drop)
        self.last_sent: dict[int, float] = {}  # neighbour -> monotonic time of the last send

    def _outbox(self, addr: str) -> zmq.Socket:
        sock = _outbound(self._ctx.socket(zmq.PUSH), LINGER_MS)
        sock.connect(addr)
        return sock

    def _send_now(self, peer_id: int, frames: Sequence[Buffer]) -> bool:
        """The delay line's send: under the lock, like every other."""
        with self._lock:
            return send_nowait(self.outboxes[peer_id], frames)

    def send(self, peer_id: int, frames: Sequence[Buffer]) -> bool:
        """Queue a message for a neighbour; False (dropped) if its queue is full.

        A message lost or held back by the link faults counts as sent (True): the
        sender of a real network cannot tell either. A delayed message that finds the
        neighbour's queue full when it falls due is logged (`send_dropped`) instead.
        Safe to call from any thread.
        """
        with self._lock:
            if peer_id not in self.outboxes:
                raise KeyError(peer_id)
            self.last_sent[peer_id] = time.monotonic()
            if not self._faulty:
                return send_nowait(self.outboxes[peer_id], frames)
            self.link_messages[peer_id] += 1
            if self._drop > 0.0 and self._rng.random() < self._drop:
                self.link_dropped[peer_id] += 1
                return True
            if self._delay is not None:
                self._delay.put(peer_id, frames)
                return True
            return send_nowait(self.outboxes[peer_id], frames)

    def idle(self, since_s: float) -> list[int]:
        """The neighbours nothing was sent to for at least `since_s` seconds."""
        now = time.monotonic()
        with self._lock:
            return [j for j in self.outboxes if now - self.last_sent.get(j, 0.0) >= since_s]

    def recv(self, timeout_s: float) -> list[Buffer] | None:
        """The next message's frames, or None if none arrives within `timeout_s`.

        At most `max_frames + 1` frames are kept; the rest of an over-long message is
        read and discarded so memory stays bounded and the caller can reject it.
        """
        if not self._poller.poll(max(0, math.ceil(timeout_s * 1000))):  # never a busy spin
            return None
        return read_capped(self.inbox, self._max_frames + 1)

    def connect(self, peer_id: int, addr: str) -> None:
        """Add an outbox to a neighbour learnt after start-up (from the bootstrap)."""
        with self._lock:
            self.outboxes[peer_id] = self._outbox(addr)

    def close(self) -> None:
        """Flush (bounded by LINGER_MS, delayed messages included) and close every socket."""
        linger: int | None = None  # the sockets' own LINGER_MS
        if self._delay is not None:
            deadline = time.monotonic() + LINGER_MS / 1000.0
            self._delay.close(deadline)
            linger = max(0, int((deadline - time.monotonic()) * 1000))
        if self._faulty:
            log.debug(
                "link_dropped",
                dropped=sum(self.link_dropped.values()),
                messages=sum(self.link_messages.values()),
                per_neighbour={str(j): self.link_dropped[j] for j in sorted(self.link_messages)},
                queue_full=sum(self._delay.queue_full.values()) if self._delay else 0,
                unsent_on_close=self._delay.unsent if self._delay else 0,
            )
        for sock in self.outboxes.values():
            sock.close(linger=linger)
        self.inbox.close()
        self._ctx.term()


class Link:
    """A peer's connection to the coordinator: control DEALER, and PUSH for updates."""

    def __init__(self, control: str, updates: str | None, max_frames: int) -> None:
        self._ctx = zmq.Context()
        self._max_frames = max_frames
        self.control = _outbound(_inbound(self._ctx.socket(zmq.DEALER)), CONTROL_LINGER_MS)
        # One routing id for this process's life: after a TCP reconnect the coordinator
        # still knows the peer by it; a restarted peer gets a new one (and says hello).
        self.control.setsockopt(zmq.ROUTING_ID, b"p2pfl-" + secrets.token_hex(8).encode())
        self.control.connect(control)
        self.updates: zmq.Socket | None = None
        if updates is not None:
            self.updates = _outbound(self._ctx.socket(zmq.PUSH), LINGER_MS)
            self.updates.connect(updates)

    def send(self, frames: Sequence[Buffer]) -> bool:
        """Queue a control message for the coordinator; False if dropped."""
        return send_nowait(self.control, frames)

    def push(self, frames: Sequence[Buffer]) -> bool:
        """Queue a model update on the update channel; False if dropped."""
        if self.updates is None:
            raise RuntimeError("this link has no update channel")
        return send_nowait(self.updates, frames)

    def recv(self, timeout_s: float) -> list[Buffer] | None:
        """The next control message from the coordinator, or None after `timeout_s`."""
        if not self.control.poll(max(0, int(timeout_s * 1000))):
            return None
        return read_capped(self.control, self._max_frames + 1)

    def close(self) -> None:
        """Flush (bounded by the lingers) and close."""
        self.control.close()
        if self.updates is not None:
            self.updates.close()
        self._ctx.term()


class Hub:
    """The coordinator's sockets: control ROUTER (replies by routing id) and update PULL.

    ROUTER_MANDATORY makes a send to a peer whose connection is gone fail at once
    (counted as dropped) instead of vanishing silently.
    """

    def __init__(self, control: str, updates: str | None, max_frames: int) -> None:
        self._ctx = zmq.Context()
        self._max_frames = max_frames
        self.control = _inbound(self._ctx.socket(zmq.ROUTER))
        self.control.setsockopt(zmq.LINGER, CONTROL_LINGER_MS)
        self.control.setsockopt(zmq.SNDHWM, SEND_HWM)
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.control.bind(control)
        self._poller = zmq.Poller()
        self._poller.register(self.control, zmq.POLLIN)
        self._control_next = True
        self.updates: zmq.Socket | None = None
        if updates is not None:
            self.updates = _inbound(self._ctx.socket(zmq.PULL))
            self.updates.setsockopt(zmq.LINGER, 0)
            self.updates.bind(updates)
            self._poller.register(self.updates, zmq.POLLIN)

    def send(self, routing_id: bytes, frames: Sequence[Buffer]) -> bool:
        """Queue a control message for one peer; False if dropped (gone, or queue full)."""
        return send_nowait(self.control, [routing_id, *frames])

    def recv(self, timeout_s: float) -> tuple[bytes | None, list[Buffer]] | None:
        """(routing id, frames) of the next control message, or (None, frames) of the
        next update; None if nothing arrives within `timeout_s`."""
        ready = dict(self._poller.poll(max(0, int(timeout_s * 1000))))
        # When both channels have input, take turns: a flood on one cannot starve the other.
        order = [self.control, self.updates] if self._control_next else [self.updates, self.control]
        for sock in order:
            if sock is not None and sock in ready:
                self._control_next = sock is not self.control
                if sock is self.control:
                    frames = read_capped(self.control, self._max_frames + 2)
                    return bytes(frames[0]), frames[1:]
                return None, read_capped(sock, self._max_frames + 1)
        return None

    def close(self) -> None:
        """Flush (bounded by the lingers) and close."""
        self.control.close()
        if self.updates is not None:
            self.updates.close()
        self._ctx.term()
