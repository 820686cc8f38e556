"""Liveness on the gossip sockets: heartbeats, silence, and what a dead peer costs."""

from __future__ import annotations

import time

import pytest
import zmq
from conftest import read_jsonl
from test_faults import finished

from p2pfl.app.ports import free_base_port
from p2pfl.net.sockets import SEND_HWM
from p2pfl.net.transport import Transport
from p2pfl.runtime.ticker import Ticker

pytestmark = pytest.mark.slow  # real sockets and threads


def test_a_slow_but_alive_neighbour_is_waited_for_not_declared_gone(make_scenario, launch_run):
    """A straggler silent in its round loop for 2 s (peer_timeout_s = 1 s) keeps heartbeating
    from its thread: nobody declares it gone, every round mixes its model, and it does not
    take its own sleep for its neighbours' silence."""
    scenario = make_scenario(
        {
            "name": "straggler",
            "training": {"rounds": 3},
            "gossip": {"round_timeout_s": 10.0, "peer_timeout_s": 1.0, "heartbeat_s": 0.2},
            "faults": {"slow": [{"peer": 2, "delay_s": 2.0}]},
        }
    )
    run = launch_run(scenario, "straggler")
    finished(run, timeout=120)
    for i in (1, 3):
        rows = read_jsonl(run.out / f"peer-{i}.jsonl")[1:]
        assert [r["round"] for r in rows] == [1, 2, 3]
        assert all(2 in r["neighbours_heard"] for r in rows), rows
        assert max(r["wait_s"] for r in rows[1:]) > 1.0  # it really waited past peer_timeout_s
    for i in (1, 2, 3):  # nor did the straggler, reading what queued up while it slept
        events = [e["event"] for e in read_jsonl(run.out / "logs" / f"peer-{i}.jsonl")]
        assert "neighbour_gone" not in events, (i, events)


def test_sends_to_a_dead_neighbour_neither_block_nor_pile_up():
    """Nobody at the neighbour's address: every send returns at once, at most SEND_HWM
    are queued; when the neighbour comes up it gets those few, the rest were dropped."""
    # a free port below the ephemeral range: connecting to a dead one inside it can get
    # that very port as the source, a TCP self-connection that occupies the address
    addr = f"tcp://127.0.0.1:{free_base_port(1)}"
    ctx = zmq.Context()
    back = ctx.socket(zmq.PULL)
    transport = Transport("tcp://127.0.0.1:*", {1: addr}, max_frames=4)
    try:
        t = time.perf_counter()
        sent = [transport.send(1, [f"message {k}".encode()]) for k in range(100)]
        assert time.perf_counter() - t < 1.0  # never blocked
        assert sum(sent) <= SEND_HWM + 1 and not all(sent)
        back.bind(addr)  # the neighbour comes back at its address
        got = []
        while back.poll(1500):
            got.append(back.recv())
        assert got[0] == b"message 0" and 1 <= len(got) == sum(sent) <= SEND_HWM + 1, got
    finally:
        transport.close()
        back.close(linger=0)
        ctx.term()


def test_the_ticker_ticks_and_survives_a_failing_tick():
    """`Ticker` (the heartbeat thread) calls on time and survives a failing tick; which
    neighbours are due a heartbeat is the sync machine's decision (test_protocol_sync)."""
    calls: list[float] = []

    def tick() -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("one bad tick")

    ticker = Ticker(0.05, tick)
    time.sleep(0.5)
    ticker.stop()
    n = len(calls)
    time.sleep(0.15)
    assert 5 <= n == len(calls), calls  # kept ticking after the error, stopped on stop()
