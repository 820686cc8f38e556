"""The node loop (`p2pfl.runtime.node.drive`) over a fake port and a fake clock."""

from __future__ import annotations

import threading

import numpy as np

from p2pfl.protocol import wire
from p2pfl.protocol.events import Malformed, Received, Send
from p2pfl.runtime.node import decode, drain, drive, encode


class Clock:
    """A fake monotonic clock: a receive that waits moves it on."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakePort:
    """Messages arriving at given times; what was sent, and every receive's timeout."""

    def __init__(self, clock: Clock, arrivals: list[tuple[float, Received]]) -> None:
        self.clock, self.arrivals = clock, sorted(arrivals, key=lambda a: a[0])
        self.sent: list[Send] = []
        self.waits: list[float] = []

    def receive(self, timeout_s: float):
        self.waits.append(timeout_s)
        if self.arrivals and self.arrivals[0][0] <= self.clock.t + timeout_s:
            t, event = self.arrivals.pop(0)
            self.clock.t = max(self.clock.t, t)
            return event
        self.clock.t += timeout_s
        return None

    def carry_out(self, sends):
        self.sent.extend(sends)


class Counter:
    """A machine that wants `need` messages or gives up at `deadline`, sends a tick at once."""

    def __init__(self, need: int, deadline: float) -> None:
        self.need, self.deadline, self.fed, self.ticked = need, deadline, [], False

    def feed(self, event, now):
        self.fed.append(now)
        return [Send(0, "heartbeat", len(self.fed))]

    def tick(self, now):
        if self.ticked:
            return []
        self.ticked = True
        return [Send(0, "hello", 0)]

    def done(self, now):
        return len(self.fed) >= self.need or now >= self.deadline

    def wake_in(self, now):
        return 0.0 if self.done(now) else self.deadline - now


def msg(n: int) -> Received:
    return Received(wire.Message("heartbeat", 1, n), size=10)


def test_drive_feeds_until_done_and_counts():
    """Messages fed as they come, their sends carried out, the tick's too; returns when done."""
    clock = Clock()
    port = FakePort(clock, [(1.0, msg(1)), (2.0, msg(2)), (50.0, msg(3))])
    m = Counter(need=2, deadline=10.0)
    seen = drive(m, port, m.done, clock=clock)
    assert m.fed == [1.0, 2.0] and seen.messages == 2 and seen.received_bytes == 20
    assert [s.type for s in port.sent] == ["hello", "heartbeat", "heartbeat"]
    assert port.waits[:2] == [10.0, 9.0] and port.waits[-1] == 0.0
    assert seen.blocked_s == 2.0


def test_drive_stops_at_the_machine_deadline():
    """Nothing comes: one wait to the deadline, then `until` holds."""
    clock = Clock()
    port = FakePort(clock, [])
    m = Counter(need=1, deadline=3.0)
    drive(m, port, m.done, clock=clock)
    assert clock.t == 3.0 and m.fed == []


def test_drain_first_and_the_flood_bound():
    """drain_first reads what is queued before anything else; once done, at most
    max_unwaited more queued messages are read."""
    clock = Clock()
    port = FakePort(clock, [(0.0, msg(i)) for i in range(20)])
    m = Counter(need=0, deadline=10.0)
    lock = threading.Lock()
    seen = drive(m, port, m.done, lock=lock, clock=clock, drain_first=True, max_unwaited=5)
    assert seen.messages == 10  # 5 drained first, then 5 more without waiting
    assert not lock.locked()


def test_drain_reads_only_what_is_queued():
    """drain feeds what has already arrived, never waits, never ticks (a finished peer
    reading its neighbours' byes)."""
    clock = Clock()
    port = FakePort(clock, [(0.0, msg(1)), (0.0, msg(2)), (5.0, msg(3))])
    m = Counter(need=99, deadline=10.0)
    seen = drain(m, port, clock=clock)
    assert seen.messages == 2 and m.fed == [0.0, 0.0]
    assert port.waits == [0.0, 0.0, 0.0] and clock.t == 0.0
    assert not m.ticked and [s.type for s in port.sent] == ["heartbeat", "heartbeat"]


def test_decode_and_encode():
    """decode: a Received with its size, or a Malformed with the header's claims; encode
    stamps the sender and the scenario."""
    x = np.ones(3, np.float32)
    send = Send(2, "model", 4, {"degree": 1}, {"params": x})
    frames = encode(send, 7, "abc")
    expect = wire.Expect("abc", 9, {"params": (3,)})
    event = decode(frames, expect, origin=b"r")
    assert isinstance(event, Received) and event.origin == b"r"
    assert (event.msg.sender, event.msg.round, event.msg.type) == (7, 4, "model")
    assert event.size == wire.frames_size(frames)
    bad = decode([frames[0], b"\0" * 8], expect)
    assert isinstance(bad, Malformed) and (bad.sender, bad.round) == (7, 4)
    assert "carries" in bad.reason
