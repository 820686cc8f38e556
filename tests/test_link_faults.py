"""Link faults in the gossip transport (`[faults] link_delay_ms`, `link_drop`), on real
ZeroMQ sockets over loopback: delay, loss rate, seeding, zero settings, close."""

from __future__ import annotations

import struct
import threading
import time

import numpy as np
import pytest
import zmq
from conftest import free_base_port
from structlog.testing import capture_logs

from p2pfl.config.loader import parse
from p2pfl.config.schema import ScenarioError
from p2pfl.net.links import FaultyLinks, with_faults
from p2pfl.net.sockets import LINGER_MS
from p2pfl.net.transport import Transport

pytestmark = pytest.mark.slow  # real sockets on loopback

MAX_FRAMES = 4


@pytest.fixture
def pair():
    """make(**faults) -> (sender with neighbour 1, receiver 1); all closed at teardown."""
    made: list = []

    def make(**faults):
        base = free_base_port(2)
        receiver = Transport(f"tcp://127.0.0.1:{base + 1}", {}, MAX_FRAMES)
        inner = Transport(f"tcp://127.0.0.1:{base}", {1: f"tcp://127.0.0.1:{base + 1}"}, MAX_FRAMES)
        sender = with_faults(inner, **faults)
        made.extend([(sender, inner), (receiver, receiver)])
        return sender, receiver

    yield make
    for t, inner in made:
        if not inner._sockets.ctx.closed:
            t.close()


def message(seq: int, payload: np.ndarray | None = None) -> list:
    """A sequence-numbered header and, as the peers send, a memoryview on an array."""
    body = np.full(256, seq, np.float32) if payload is None else payload
    return [struct.pack("!q", seq), memoryview(body).cast("B")]


def seq_of(frames) -> int:
    """The sequence number of received frames."""
    return struct.unpack("!q", bytes(frames[0]))[0]


def writable(t) -> None:
    """Wait until the outbox to neighbour 1 takes a message.

    ZeroMQ returns send credit (SNDHWM = 4) lazily, so back-to-back sends fail every
    few messages even when the receiver keeps up; a peer sends one model a round and
    never meets this, a tight test loop must wait (undelayed sends only: with a delay
    the sender thread owns the socket).
    """
    inner = t._inner if isinstance(t, FaultyLinks) else t
    assert inner.outboxes[1].poll(2000, zmq.POLLOUT)


def delay_threads() -> list[threading.Thread]:
    """The link-delay sender threads alive in this process."""
    return [t for t in threading.enumerate() if t.name == "p2pfl-link-delay"]


def test_zero_settings_change_nothing(pair):
    """Defaults and explicit zeros: no thread, no draws, no counting, every message in order."""
    before = len(delay_threads())
    for faults in ({}, {"delay_ms": 0.0, "drop": 0.0, "seed": [0, 1, 12]}):
        sender, receiver = pair(**faults)
        assert len(delay_threads()) == before
        for i in range(200):
            payload = np.arange(256, dtype=np.float32) + i
            writable(sender)
            assert sender.send(1, message(i, payload))
            frames = receiver.recv(2.0).frames
            assert frames is not None and seq_of(frames) == i
            assert np.array_equal(np.frombuffer(frames[1], np.float32), payload)
        assert receiver.recv(0.05) is None
        assert isinstance(sender, Transport)  # no fault layer at all
        with capture_logs() as logs:
            sender.close()
        assert not [e for e in logs if e["event"] == "link_dropped"]
    with pytest.raises(KeyError):
        sender.send(7, message(0))


def test_delay_holds_each_message_without_blocking_the_sender(pair):
    """Every message arrives at least link_delay_ms after it was sent; send returns at once;
    order is kept; the bytes are those at send time even if the caller reuses its buffer."""
    delay_s = 0.15
    sender, receiver = pair(delay_ms=delay_s * 1000)
    buffer = np.zeros(256, np.float32)
    sent_at, send_cost = [], []
    for i in range(10):
        buffer[:] = i  # the same array, reused for every message
        t = time.monotonic()
        assert sender.send(1, message(i, buffer))
        send_cost.append(time.monotonic() - t)
        sent_at.append(t)
        time.sleep(0.01)
    buffer[:] = -1  # overwritten after every send: the queued copies must not see it
    latencies = []
    for i in range(10):
        frames = receiver.recv(5.0).frames
        assert frames is not None and seq_of(frames) == i  # in order
        latencies.append(time.monotonic() - sent_at[i])
        assert np.all(np.frombuffer(frames[1], np.float32) == i)
    assert min(latencies) >= delay_s  # a lower bound, not an exact wall-clock figure
    assert max(send_cost) < delay_s / 10  # the caller's loop is never held
    assert sender.messages[1] == 10 and not sender.dropped


def test_drop_rate_is_near_the_probability_and_seeded(pair):
    """Over 3000 messages the loss rate is within 5 sigma of link_drop; exactly the messages
    counted as lost never arrive; the same seed loses the same messages."""
    p, n = 0.2, 3000
    lost_sets = []
    for _ in range(2):
        sender, receiver = pair(drop=p, seed=[0, 3, 12])
        lost = set()
        for i in range(n):
            before = sender.dropped[1]
            writable(sender)
            assert sender.send(1, message(i))  # a loss is invisible to the sender
            if sender.dropped[1] > before:
                lost.add(i)
                continue
            frames = receiver.recv(2.0).frames  # everything not lost arrives, and in order
            assert frames is not None and seq_of(frames) == i
        assert receiver.recv(0.1) is None  # no lost message turns up late
        sigma = (n * p * (1 - p)) ** 0.5
        assert abs(len(lost) - n * p) < 5 * sigma, len(lost)
        assert sender.messages[1] == n and sender.dropped[1] == len(lost)
        with capture_logs() as logs:
            sender.close()
        [line] = [e for e in logs if e["event"] == "link_dropped"]
        assert line["log_level"] == "debug"
        assert line["dropped"] == len(lost) and line["messages"] == n
        assert line["per_neighbour"] == {"1": len(lost)}
        lost_sets.append(lost)
    assert lost_sets[0] == lost_sets[1]
    other, _ = pair(drop=p, seed=[0, 4, 12])  # another seed loses other messages
    other_lost = set()
    for i in range(200):
        before = other.dropped[1]
        other.send(1, message(i))
        if other.dropped[1] > before:
            other_lost.add(i)
    assert other_lost and other_lost != {i for i in lost_sets[0] if i < 200}


def test_delay_and_drop_together(pair):
    """With both, the messages not lost still arrive, late; the lost ones never do."""
    sender, receiver = pair(delay_ms=50, drop=0.3, seed=7)
    sent_at = {}
    for i in range(100):
        sent_at[i] = time.monotonic()
        sender.send(1, message(i))
        time.sleep(0.003)  # a peer sends a neighbour one model a round, not a burst
    got = []
    while (envelope := receiver.recv(0.5)) is not None:
        got.append(seq_of(envelope.frames))
        assert time.monotonic() - sent_at[got[-1]] >= 0.05
    assert got == sorted(got) and len(got) == 100 - sender.dropped[1]
    assert 10 <= sender.dropped[1] <= 50


def test_close_flushes_what_falls_due_and_does_not_hang(pair):
    """close() sends a message due within the linger window, drops one due far later
    (counted), and returns within the linger bound even with no neighbour listening."""
    sender, receiver = pair(delay_ms=300)
    sender.send(1, message(1))
    t = time.monotonic()
    sender.close()
    assert time.monotonic() - t >= 0.25  # it waited for the message to fall due ...
    frames = receiver.recv(2.0).frames
    assert frames is not None and seq_of(frames) == 1  # ... and sent it

    base = free_base_port(2)
    nobody = f"tcp://127.0.0.1:{base + 1}"  # never bound: sends queue in ZeroMQ
    stuck = FaultyLinks(
        Transport(f"tcp://127.0.0.1:{base}", {1: nobody}, MAX_FRAMES), delay_ms=60_000
    )
    threads = len(delay_threads())
    for i in range(3):
        assert stuck.send(1, message(i))
    t = time.monotonic()
    with capture_logs() as logs:
        stuck.close()
    assert time.monotonic() - t < LINGER_MS / 1000 + 1.0
    assert len(delay_threads()) == threads - 1  # the sender thread is gone
    [line] = [e for e in logs if e["event"] == "link_dropped"]
    assert line["unsent_on_close"] == 3 and line["dropped"] == 0


def test_scenario_fields():
    """[faults] link_delay_ms >= 0 and link_drop in [0, 1), both 0 by default."""
    s = parse({})
    assert s.faults.link_delay_ms == 0.0 and s.faults.link_drop == 0.0
    s = parse({"faults": {"link_delay_ms": 50, "link_drop": 0.05}})
    assert s.faults.link_delay_ms == 50.0 and s.faults.link_drop == 0.05
    for bad in ({"link_delay_ms": -1}, {"link_drop": 1.0}, {"link_drop": -0.1}):
        with pytest.raises(ScenarioError, match=f"faults.{next(iter(bad))}"):
            parse({"faults": bad})
    with pytest.raises(ValueError, match="link_drop"):
        FaultyLinks(object(), drop=1.0)  # type: ignore[arg-type]  # refused before use
