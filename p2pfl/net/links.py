"""Link faults as a wrapper around any sender: messages lost or held back on the way.

`[faults] link_delay_ms` and `link_drop` (gossip only) make each message to a
neighbour be lost with a seeded probability, or held back for a fixed delay before it
is queued, as a slow or lossy network would. `FaultyLinks` wraps anything with
`send(peer_id, frames) -> bool` (the gossip `Transport`), so the transport itself
knows nothing of faults. Delayed messages wait (copied) in a heap served by one small
sender thread, so the peer's round loop never blocks on them; `close` sends what falls
due by a deadline and drops the rest. Losses are counted and logged once, at debug
level (`link_dropped`), at close.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

import numpy as np
import structlog

from p2pfl.net.sockets import LINGER_MS, Envelope
from p2pfl.protocol.wire import Buffer

log = structlog.get_logger()


class GossipTransport(Protocol):
    """What a gossip peer needs of its transport (`p2pfl.net.transport.Transport`)."""

    def send(self, peer_id: int, frames: Sequence[Buffer]) -> bool: ...
    def recv(self, timeout_s: float) -> Envelope | None: ...
    def connect(self, peer_id: int, addr: str) -> None: ...
    def close(self, linger_ms: int | None = None, done: Collection[int] = ()) -> None: ...


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


def with_faults(
    inner: GossipTransport,
    *,
    delay_ms: float = 0.0,
    drop: float = 0.0,
    seed: int | Sequence[int] | None = None,
) -> GossipTransport:
    """`inner` behind link faults, or `inner` itself when both are 0 (sends go straight
    to ZeroMQ, exactly as without the fault layer)."""
    if delay_ms == 0.0 and drop == 0.0:
        return inner
    return FaultyLinks(inner, delay_ms=delay_ms, drop=drop, seed=seed)


class FaultyLinks:
    """A transport whose sends suffer seeded losses and a fixed delay; thread-safe.

    A message lost or held back counts as sent (True): the sender of a real network
    cannot tell either. A delayed message that finds the neighbour's queue full when it
    falls due is logged (`send_dropped`) instead. `seed` seeds the losses: the same
    sequence of sends loses the same messages (in a gossip run, heartbeats interleave
    with the models at moments that depend on timing, so which models are lost varies
    from run to run).
    """

    def __init__(
        self,
        inner: GossipTransport,
        *,
        delay_ms: float = 0.0,
        drop: float = 0.0,
        seed: int | Sequence[int] | None = None,
    ) -> None:
        if not (delay_ms >= 0.0 and np.isfinite(delay_ms)):
            raise ValueError(f"link_delay_ms = {delay_ms!r}: must be finite and >= 0")
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"link_drop = {drop!r}: must be in [0, 1)")
        self._inner = inner
        self._drop = drop
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()  # the loss draws: round loop and ticker both send
        self._delay = _DelayLine(delay_ms / 1000.0, inner.send) if delay_ms > 0.0 else None
        self.messages: Counter[int] = Counter()  # send calls per neighbour
        self.dropped: Counter[int] = Counter()  # of which lost on the link

    def send(self, peer_id: int, frames: Sequence[Buffer]) -> bool:
        """Lose, delay or pass on one message (see the class docstring)."""
        with self._lock:
            self.messages[peer_id] += 1
            if self._drop > 0.0 and self._rng.random() < self._drop:
                self.dropped[peer_id] += 1
                return True
        if self._delay is not None:
            self._delay.put(peer_id, frames)
            return True
        return self._inner.send(peer_id, frames)

    def recv(self, timeout_s: float) -> Envelope | None:
        """Receiving is not faulty: the sender's side loses and delays."""
        return self._inner.recv(timeout_s)

    def connect(self, peer_id: int, addr: str) -> None:
        """Add a neighbour to the transport below."""
        self._inner.connect(peer_id, addr)

    def close(self, linger_ms: int | None = None, done: Collection[int] = ()) -> None:
        """Send the delayed messages that fall due within the linger (LINGER_MS unless
        given), drop the rest, log the losses, then close the transport below with what
        is left of the linger (`done`: as `Transport.close`)."""
        deadline = time.monotonic() + (LINGER_MS if linger_ms is None else linger_ms) / 1000.0
        if self._delay is not None:
            self._delay.close(deadline)
        self._inner.close(max(0, int((deadline - time.monotonic()) * 1000)), done)
        log.debug(
            "link_dropped",
            dropped=sum(self.dropped.values()),
            messages=sum(self.messages.values()),
            per_neighbour={str(j): self.dropped[j] for j in sorted(self.messages)},
            queue_full=sum(self._delay.queue_full.values()) if self._delay else 0,
            unsent_on_close=self._delay.unsent if self._delay else 0,
        )
