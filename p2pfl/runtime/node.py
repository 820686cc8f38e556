"""The one loop every role runs: a sans-I/O protocol machine driven over a transport.

A role (gossip peer, centralized client, server, bootstrap) is a machine from
`p2pfl.protocol` plus a `Port`: the role's sockets as the loop sees them, decoded
events in (`Received` / `Malformed`, see `decode`) and `Send` actions out (see
`encode`). `drive` owns the waiting and the clock; the machine owns every decision.

Contract of `drive(machine, port, until)`:

1. With `drain_first`, whatever is already queued is read and fed without waiting
   (at most `max_unwaited` messages), before the machine judges any time: what queued
   up while the caller was busy (training) is read before a silence is declared.
2. Then, over and over: `machine.tick(now)` (sends due by time: heartbeats, requests,
   a round that starts) is carried out, and the loop receives for at most
   `machine.wake_in(now)` seconds (0: only what is already queued). A message is fed
   (`machine.feed(event, now)`) and its sends carried out; the loop goes on.
3. When a receive comes back empty, `until(now)` is asked: the loop returns once it
   holds. A machine that has nothing more to wait for should say `wake_in` 0, so the
   loop only reads what is already queued and then asks `until`.
4. At most `max_unwaited` receives that did not wait are made after step 1 (a flood of
   queued messages cannot hold the loop forever): then it returns, whatever `until`
   says. Receives that waited are bounded by the machine's own deadlines instead.

Every call into the machine is made holding `lock` (when given): a machine is not
thread-safe, and a role's other thread (the gossip heartbeat ticker) must take the
same lock around its own calls. Sends are carried out after the lock is released.
Times are `clock()` (monotonic seconds), the same clock the machine's `now` is on.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from p2pfl.protocol import wire
from p2pfl.protocol.events import Event, Malformed, Received, Send

MAX_UNWAITED = 256  # receives without waiting per drive: a flood cannot stall the loop
Clock = Callable[[], float]  # monotonic seconds


class Machine(Protocol):
    """What `drive` needs of a protocol machine."""

    def feed(self, event: Event, now: float) -> list[Send]:
        """One received (or malformed) message; returns the sends it causes."""
        ...

    def tick(self, now: float) -> list[Send]:
        """The sends due by time alone at `now`."""
        ...

    def wake_in(self, now: float) -> float:
        """Seconds a receive may wait before the machine must be asked again (0: do not wait)."""
        ...


class Port(Protocol):
    """A role's sockets, as the loop sees them."""

    def receive(self, timeout_s: float) -> Event | None:
        """The next message, decoded and checked, or None if none came within `timeout_s`."""
        ...

    def carry_out(self, sends: Sequence[Send]) -> None:
        """Encode and send each action (a send that cannot be queued is the port's to
        log, or to report back to its machine)."""
        ...


@dataclass
class Driven:
    """What one `drive` call saw: messages and their bytes, seconds blocked waiting."""

    messages: int = 0
    received_bytes: int = 0
    blocked_s: float = 0.0


def drive(
    machine: Machine,
    port: Port,
    until: Callable[[float], bool],
    *,
    lock: threading.Lock | None = None,
    clock: Clock = time.monotonic,
    drain_first: bool = False,
    max_unwaited: int = MAX_UNWAITED,
) -> Driven:
    """Drive `machine` over `port` until `until(now)` holds; see the module docstring.

    Args:
        machine: the protocol machine (`feed`, `tick`, `wake_in`).
        port: the role's sockets (`receive`, `carry_out`).
        until: the exit predicate, asked when a receive comes back empty.
        lock: held around every call into the machine (shared with other threads).
        clock: the monotonic clock the machine's times are on.
        drain_first: read what is already queued before anything else.
        max_unwaited: bound on receives that did not wait (and on the first drain).

    Returns:
        The messages received, their bytes and the seconds spent blocked in receives.
    """
    guard = lock if lock is not None else contextlib.nullcontext()
    seen = drain(machine, port, lock=lock, clock=clock, limit=max_unwaited if drain_first else 0)

    def feed(event: Event) -> None:
        _feed(machine, port, event, guard, clock, seen)

    unwaited = 0
    while unwaited < max_unwaited:
        with guard:
            now = clock()
            sends = machine.tick(now)
            wait = max(0.0, machine.wake_in(now))
        port.carry_out(sends)
        unwaited += wait == 0.0
        t = clock()
        event = port.receive(wait)
        seen.blocked_s += clock() - t
        if event is not None:
            feed(event)
            continue
        with guard:
            if until(clock()):
                break
    return seen


def _feed(
    machine: Machine, port: Port, event: Event, guard: Any, clock: Clock, seen: Driven
) -> None:
    seen.messages += 1
    seen.received_bytes += event.size
    with guard:
        sends = machine.feed(event, clock())
    port.carry_out(sends)


def drain(
    machine: Machine,
    port: Port,
    *,
    lock: threading.Lock | None = None,
    clock: Clock = time.monotonic,
    limit: int = MAX_UNWAITED,
) -> Driven:
    """Feed `machine` what is already queued on `port` (at most `limit` messages),
    without waiting and without ticking it."""
    guard = lock if lock is not None else contextlib.nullcontext()
    seen = Driven()
    for _ in range(limit):
        if (event := port.receive(0.0)) is None:
            break
        _feed(machine, port, event, guard, clock, seen)
    return seen


def decode(
    frames: Sequence[wire.Buffer],
    expect: wire.Expect,
    origin: bytes | None = None,
    authenticated: int | None = None,
) -> Event:
    """Received frames as the event a machine is fed: checked, or why not.

    With `authenticated` (the node id the transport's CURVE key vouches for) the
    header's sender must be that node: this is the one place a claimed sender is
    bound to a key. A mismatch is `Malformed` with no claimed sender or round, so no
    machine gives the claim any weight.
    """
    size = wire.frames_size(frames)
    try:
        msg = wire.decode(frames, expect)
    except wire.WireError as exc:
        if authenticated is not None and exc.sender is not None and exc.sender != authenticated:
            return Malformed(_mismatch(exc.sender, authenticated), None, None, size, origin)
        return Malformed(str(exc), exc.sender, exc.round, size, origin)
    if authenticated is not None and msg.sender != authenticated:
        return Malformed(_mismatch(msg.sender, authenticated), None, None, size, origin)
    return Received(msg, size, authenticated, origin)


def _mismatch(claimed: int, key: int) -> str:
    who = "no allowed key" if key < 0 else f"the key of node {key}"
    return f"sender mismatch: the header claims {claimed}, the message came with {who}"


def encode(send: Send, sender: int, scenario: str) -> list[wire.Buffer]:
    """The frames of a send, stamped with this process's id and the scenario hash."""
    return wire.encode(send.type, sender, send.round, scenario, send.meta, send.arrays)
