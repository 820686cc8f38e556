"""Bootstrap machines, both sides, in process: hello, welcome, registry."""

from __future__ import annotations

from structlog.testing import capture_logs

from p2pfl.protocol import wire
from p2pfl.protocol.bootstrap import Bootstrap, Registry
from p2pfl.protocol.events import COORDINATOR, Malformed, Received, Send
from p2pfl.protocol.messages import hello_address, parse_welcome

COORD = 3  # the coordinator's sender id in a 3-peer scenario
LINE = {0: [1], 1: [0, 2], 2: [1]}


def welcome(pairs, sender: int = COORD, type_: str = "welcome") -> Received:
    return Received(wire.Message(type_, sender, 0, {"neighbours": pairs}))


def hello(sender: int, address: object, origin: bytes) -> Received:
    return Received(wire.Message("hello", sender, 0, {"address": address}), origin=origin)


def drops(logs) -> list[dict]:
    return [e for e in logs if e["event"] == "message_dropped"]


def peer(now: float = 0.0) -> Bootstrap:
    """Peer 1 of the line 0 - 1 - 2, waiting up to 5 s."""
    return Bootstrap(1, "tcp://10.0.0.2:9000", [2, 0], COORD, 5.0, now)


def test_hello_then_the_welcome_naming_exactly_our_neighbours():
    """The hello carries our address; a welcome naming 0 and 2 with tcp addresses is taken."""
    b = peer()
    assert b.hello() == [Send(COORDINATOR, "hello", 0, {"address": "tcp://10.0.0.2:9000"})]
    assert not b.done(1.0) and b.wake_in(1.0) == 4.0
    with capture_logs() as logs:
        b.feed(welcome([[2, "tcp://10.0.0.3:9000"], [0, "tcp://10.0.0.1:9000"]]), 1.0)
    assert not drops(logs)
    assert b.welcomed and b.done(1.0) and b.wake_in(1.0) == 0.0
    assert b.addresses == {0: "tcp://10.0.0.1:9000", 2: "tcp://10.0.0.3:9000"}
    assert b.bye() == [Send(COORDINATOR, "bye", 0)]


def test_a_wrong_set_or_bad_address_is_dropped_and_the_wait_is_bounded():
    """Too few, too many, a bad address, another sender or type, malformed: one drop each on
    the bootstrap channel; no welcome by the deadline: done, not welcomed."""
    b = peer()
    good = [[0, "tcp://a:1"], [2, "tcp://b:2"]]
    bad = [
        welcome([[0, "tcp://a:1"]]),
        welcome([*good, [1, "tcp://c:3"]]),
        welcome([[0, "tcp://a:1"], [2, "udp://b:2"]]),
        welcome([[0, "tcp://a:1"], [2, "tcp://b:0"]]),
        welcome([[0, "tcp://a:1"], [2, 7]]),
        welcome([[0, "tcp://a:1"], [2, "tcp://b:2", 3]]),
        welcome(good, sender=0),
        welcome(good, type_="heartbeat"),
        Received(wire.Message("welcome", COORD, 0, {"neighbours": "all"})),
    ]
    with capture_logs() as logs:
        for event in bad:
            b.feed(event, 1.0)
        b.feed(Malformed("header is not valid msgpack"), 1.0)
    lines = drops(logs)
    assert [e["reason"] for e in lines] == ["not a welcome naming exactly our neighbours"] * len(
        bad
    ) + ["header is not valid msgpack"]
    assert all(e["channel"] == "bootstrap" for e in lines)
    assert not b.welcomed and not b.done(4.9) and b.done(5.0) and not b.welcomed


def test_registry_welcomes_each_peer_once_all_its_neighbours_registered():
    """Line 0 - 1 - 2, hellos from 2, 0, then 1: nobody can be welcomed before 1 is in;
    then all three at once, each with exactly its neighbours' addresses."""
    r = Registry(LINE)
    addr = {i: f"tcp://10.0.0.{i + 1}:9000" for i in range(3)}
    assert r.feed(hello(2, addr[2], b"c2"), 0.0) == []
    assert r.feed(hello(0, addr[0], b"c0"), 0.1) == []
    with capture_logs() as logs:
        sends = r.feed(hello(1, addr[1], b"c1"), 0.2)
    assert {s.to: s.meta["neighbours"] for s in sends} == {
        0: [[1, addr[1]]],
        1: [[0, addr[0]], [2, addr[2]]],
        2: [[1, addr[1]]],
    }
    assert all(s.type == "welcome" for s in sends)
    assert r.route(2) == b"c2" and r.route(7) is None
    [joined] = [e for e in logs if e["event"] == "peer_joined"]
    assert joined["sender"] == 1 and joined["rejoin"] is False
    # a hello again (a restart) is welcomed again, the others are not re-sent theirs ...
    assert [s.to for s in r.feed(hello(0, addr[0], b"c0b"), 0.3)] == [0]
    # ... unless theirs could not be sent: due again at the next hello
    r.undelivered(next(s for s in sends if s.to == 2), 0.35)
    assert sorted(s.to for s in r.feed(hello(0, addr[0], b"c0b"), 0.4)) == [0, 2]


def test_registry_drops_bad_hellos_strangers_and_counts_byes():
    """A hello without a tcp address, a message before hello, from another connection, of an
    unexpected type: one drop each; heartbeats are quiet; finished once all said bye."""
    r = Registry(LINE)
    with capture_logs() as logs:
        r.feed(hello(0, "udp://x:1", b"c0"), 0.0)
        r.feed(hello(0, 42, b"c0"), 0.0)
        r.feed(Received(wire.Message("bye", 1, 0), origin=b"c1"), 0.0)
        r.feed(hello(0, "tcp://x:1", b"c0"), 0.0)
        r.feed(Received(wire.Message("bye", 0, 0), origin=b"evil"), 0.0)
        r.feed(Received(wire.Message("model", 0, 0), origin=b"c0"), 0.0)
        r.feed(Received(wire.Message("heartbeat", 0, 0), origin=b"c0"), 0.0)
        r.feed(Malformed("header is not valid msgpack"), 0.0)
    assert [e["reason"] for e in drops(logs)] == [
        "hello without a valid tcp:// address",
        "hello without a valid tcp:// address",
        "sender has not joined",
        "sender id claimed from another connection",
        "unexpected message type 'model' on the control channel",
        "header is not valid msgpack",
    ]
    for i in range(3):
        r.feed(hello(i, f"tcp://x:{i + 1}", f"c{i}".encode()), 1.0)
        assert not r.finished
    for i in range(3):
        r.feed(Received(wire.Message("bye", i, 0), origin=f"c{i}".encode()), 2.0)
    assert r.finished and r.members == {} and r.left == {0, 1, 2}
    with capture_logs() as logs:
        r.feed(hello(1, "tcp://x:2", b"c1"), 3.0)
    assert [e["rejoin"] for e in logs if e["event"] == "peer_joined"] == [True]


def test_parse_welcome_and_hello_address():
    """The pure parses behind both sides."""
    msg = welcome([[1, "tcp://h:1"]]).msg
    assert parse_welcome(msg, coordinator=COORD, neighbours=[1]) == {1: "tcp://h:1"}
    assert parse_welcome(msg, coordinator=COORD, neighbours=[1, 2]) is None
    assert (
        parse_welcome(welcome([[True, "tcp://h:1"]]).msg, coordinator=COORD, neighbours=[1]) is None
    )
    assert hello_address(hello(0, "tcp://h:5", b"").msg) == "tcp://h:5"
    assert hello_address(hello(0, "tcp://[::1]:5", b"").msg) is None
    assert hello_address(Received(wire.Message("hello", 0, 0, {})).msg) is None
