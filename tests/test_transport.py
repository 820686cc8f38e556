"""`Transport.recv` on real ZeroMQ sockets over loopback: a message already waiting is
read at once, one that arrives during the wait is read after the poll, and either way
an over-long message keeps at most `max_frames + 1` frames and does not spill over."""

from __future__ import annotations

import threading

import pytest
import zmq

from p2pfl.net.transport import Transport

pytestmark = pytest.mark.slow  # real sockets
MAX_FRAMES = 3


@pytest.fixture
def pair():
    """(sender PUSH socket, receiving Transport), both closed at teardown."""
    receiver = Transport("tcp://127.0.0.1:*", {}, MAX_FRAMES)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(receiver.inbox.getsockopt(zmq.LAST_ENDPOINT).decode())
    yield push, receiver
    push.close()
    ctx.term()
    receiver.close()


def _wait_until_waiting(t: Transport) -> None:
    assert t.inbox.poll(2000), "nothing arrived within 2 s"


def test_waiting_message_is_read_whole(pair):
    """A message queued before `recv` comes back frame for frame."""
    push, receiver = pair
    push.send_multipart([b"h", b"a" * 100, b"b"])
    _wait_until_waiting(receiver)
    envelope = receiver.recv(0.0)
    assert envelope is not None
    assert [bytes(f) for f in envelope.frames] == [b"h", b"a" * 100, b"b"]
    assert envelope.channel == "gossip"


@pytest.mark.parametrize("waiting", [True, False], ids=["waiting", "arrives-during-wait"])
def test_over_long_message_is_capped_and_does_not_spill(pair, waiting):
    """At most max_frames + 1 frames are kept; the rest is discarded, not the next message."""
    push, receiver = pair
    long_message = [b"%d" % i for i in range(MAX_FRAMES + 5)]

    def send() -> None:
        push.send_multipart(long_message)
        push.send_multipart([b"next"])

    sender = threading.Timer(0.0 if waiting else 0.05, send)
    sender.start()
    if waiting:
        sender.join()
        _wait_until_waiting(receiver)
    first = receiver.recv(2.0)
    sender.join()
    assert first is not None
    assert [bytes(f) for f in first.frames] == long_message[: MAX_FRAMES + 1]
    second = receiver.recv(2.0)
    assert second is not None
    assert [bytes(f) for f in second.frames] == [b"next"]


def test_recv_returns_none_with_nothing_waiting(pair):
    """No message within the timeout (zero included): None."""
    _, receiver = pair
    assert receiver.recv(0.0) is None
    assert receiver.recv(0.05) is None


def test_close_drops_what_is_queued_for_a_finished_neighbour():
    """A neighbour that said bye (or went silent) reads nothing more: what is queued for
    it is dropped at close instead of holding the exit for the whole linger, while a
    live neighbour still gets its last message."""
    import time

    from p2pfl.net.sockets import LINGER_MS

    live = Transport("tcp://127.0.0.1:*", {}, MAX_FRAMES)
    live_addr = live.inbox.getsockopt(zmq.LAST_ENDPOINT).decode()
    gone = Transport("tcp://127.0.0.1:*", {}, MAX_FRAMES)
    gone_addr = gone.inbox.getsockopt(zmq.LAST_ENDPOINT).decode()
    gone.close()  # its process has exited: nothing will ever read its queue
    sender = Transport("tcp://127.0.0.1:*", {1: live_addr, 2: gone_addr}, MAX_FRAMES)
    try:
        assert sender.send(1, [b"last model"]) and sender.send(2, [b"bye"])
        t = time.monotonic()
        sender.close(done={2})
        assert time.monotonic() - t < LINGER_MS / 2000  # not held for the linger
        assert live.inbox.poll(2000) and live.inbox.recv_multipart() == [b"last model"]
    finally:
        live.close()
