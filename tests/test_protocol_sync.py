"""The sync-gossip and catch-up machines, in process: a fake clock, no sockets, no sleeps."""

from __future__ import annotations

import numpy as np
import pytest
from structlog.testing import capture_logs

from p2pfl.protocol import wire
from p2pfl.protocol.catchup import CatchUp
from p2pfl.protocol.events import Malformed, Received, Send
from p2pfl.protocol.messages import Bye, Heartbeat, ModelMsg, parse_gossip
from p2pfl.protocol.sync import SyncConfig, SyncGossip

D = 4  # model size


def config(**changes) -> SyncConfig:
    """Peer 0 with neighbours 1, 2, 3 of 8 peers, 5 rounds, short timeouts."""
    base = dict(
        peer_id=0,
        neighbours=(1, 2, 3),
        peers=8,
        rounds=5,
        round_timeout_s=10.0,
        startup_timeout_s=30.0,
        heartbeat_s=0.5,
        peer_timeout_s=2.0,
        samples=100,
    )
    return SyncConfig(**(base | changes))


def chunked(value: float) -> wire.Chunked:
    """A received model: every coordinate `value`."""
    x = np.full(D, value, np.float32)
    x.flags.writeable = False
    return wire.Chunked((x,), (D,))


def model(sender: int, round_: int, value: float = 1.0, **meta) -> Received:
    """A neighbour's model message as it comes out of the wire checks."""
    meta = {"degree": 2, "samples": 10} | meta
    return Received(wire.Message("model", sender, round_, meta, {"params": chunked(value)}))


def beat(sender: int, round_: int, **meta) -> Received:
    return Received(wire.Message("heartbeat", sender, round_, meta))


def bye(sender: int, round_: int = 5) -> Received:
    return Received(wire.Message("bye", sender, round_))


def drops(logs) -> list[str]:
    """The reasons of the `message_dropped` lines."""
    return [e["reason"] for e in logs if e["event"] == "message_dropped"]


def events(logs, name) -> list[dict]:
    return [e for e in logs if e["event"] == name]


def started(round_: int = 2, now: float = 0.0, **changes) -> SyncGossip:
    """A machine whose neighbours have all spoken, in `round_` (no start-up grace)."""
    m = SyncGossip(config(**changes), now)
    for j in m.config.neighbours:
        m.heard(j, now)
    m.start_round(round_, np.zeros(D, np.float32), now)
    return m


def test_start_round_sends_the_model_with_degree_and_samples_to_every_neighbour():
    """start_round: one model send per neighbour, meta degree and samples, the round's number."""
    m = SyncGossip(config(), 0.0)
    x = np.arange(D, dtype=np.float32)
    sends = m.start_round(1, x, 0.0)
    assert [s.to for s in sends] == [1, 2, 3]
    assert all(s.type == "model" and s.round == 1 for s in sends)
    assert all(s.meta == {"degree": 3, "samples": 100} and s.arrays["params"] is x for s in sends)


def test_barrier_all_in_is_done_before_the_deadline():
    """Every neighbour's model of the round in: done at once, all heard, none missing."""
    m = started()
    for j in (1, 2):
        m.feed(model(j, 2, float(j)), 1.0)
        assert not m.done(1.0)
    m.feed(model(3, 2, 3.0), 1.5)
    assert m.done(1.5) and m.wake_in(1.5) == 0.0
    result, late = m.take(1.5)
    assert result.heard == [1, 2, 3] and result.missing == [] and late == []
    assert {j: float(np.asarray(x)[0]) for j, (x, _) in result.models.items()} == {
        1: 1.0,
        2: 2.0,
        3: 3.0,
    }
    assert all(degree == 2 for _, degree in result.models.values())


def test_deadline_one_silent_neighbour_is_missing():
    """Neighbour 3 never sends (but heartbeats): done exactly at the deadline, 3 missing."""
    m = started(peer_timeout_s=100.0)
    m.feed(model(1, 2), 1.0)
    m.feed(model(2, 2), 1.0)
    assert m.wake_in(1.0) == pytest.approx(9.0)  # the deadline, 10 s after the start
    assert not m.done(9.99)
    assert m.done(10.0)
    result, _ = m.take(10.0)
    assert result.heard == [1, 2] and result.missing == [3]


def test_round_one_waits_the_startup_timeout_too():
    """Round 1's deadline is round_timeout_s + startup_timeout_s after its start."""
    m = SyncGossip(config(peer_timeout_s=1000.0), 0.0)
    m.start_round(1, np.zeros(D, np.float32), 5.0)
    assert m.deadline == 45.0
    assert not m.done(44.9) and m.done(45.0)


def test_silent_neighbour_is_gone_mid_round_and_back_when_it_speaks():
    """Silent for peer_timeout_s: neighbour_gone (with its silence), no longer waited for,
    the round done without it; it speaks again: neighbour_back, waited for again."""
    m = started()
    m.feed(model(1, 2), 0.5)
    m.feed(model(2, 2), 0.5)
    assert m.wake_in(0.5) == pytest.approx(1.5)  # neighbour 3's silence runs out at 2.0
    with capture_logs() as logs:
        assert not m.done(1.9)
        assert m.done(2.0)  # long before the deadline: 3 is gone
    [gone] = events(logs, "neighbour_gone")
    assert gone["neighbour"] == 3 and gone["silent_s"] == 2.0 and gone["log_level"] == "warning"
    assert m.take(2.0)[0].missing == [3]
    m.start_round(3, np.zeros(D, np.float32), 3.0)
    with capture_logs() as logs:
        m.feed(beat(3, 3), 3.5)
    assert [e["neighbour"] for e in events(logs, "neighbour_back")] == [3]
    m.feed(model(1, 3), 3.5)
    m.feed(model(2, 3), 3.5)
    assert m.pending(3.5) == {3} and not m.done(3.5)  # waited for again


def test_startup_grace_counts_as_heard():
    """A neighbour never heard is first judged silent peer_timeout_s after the start-up grace;
    its first word ends the grace."""
    m = SyncGossip(config(), 0.0)  # grace until 30 s
    m.start_round(1, np.zeros(D, np.float32), 0.0)
    assert m.pending(4.0) == {1, 2, 3}
    m.heard(1, 5.0)  # ends 1's grace: silent from 5 s on
    with capture_logs() as logs:
        assert m.pending(7.0) == {2, 3}
    assert [e["neighbour"] for e in events(logs, "neighbour_gone")] == [1]
    assert m.pending(31.9) == {2, 3}
    assert m.pending(32.0) == set()


def test_bye_is_not_waited_for_and_raises_no_alarm():
    """A bye: neighbour_left (info), not waited for, never neighbour_gone later."""
    m = started()
    m.feed(model(1, 2), 0.1)
    m.feed(model(2, 2), 0.1)
    with capture_logs() as logs:
        m.feed(bye(3), 0.2)
        assert m.done(0.2)
        m.done(100.0)
    [left] = events(logs, "neighbour_left")
    assert left["neighbour"] == 3 and left["its_round"] == 5 and left["log_level"] == "info"
    assert not events(logs, "neighbour_gone") and not drops(logs)


def test_heartbeat_from_a_later_round_ends_the_wait_for_a_lost_model():
    """Neighbour 3's heartbeat names round 3 while we wait in round 2: its round-2 model was
    lost, do not wait for it; a heartbeat of the same round does not end the wait."""
    m = started()
    m.feed(model(1, 2), 0.1)
    m.feed(model(2, 2), 0.1)
    m.feed(beat(3, 2), 0.2)
    assert m.pending(0.2) == {3}
    m.feed(beat(3, 3), 0.3)
    assert m.done(0.3)
    assert m.take(0.3)[0].missing == [3]


def test_a_later_model_also_ends_the_wait_and_waits_for_its_round():
    """A round-3 model from 3 in round 2: 3 is not waited for in round 2; in round 3 it is in."""
    m = started()
    m.feed(model(1, 2), 0.1)
    m.feed(model(2, 2), 0.1)
    m.feed(model(3, 3, 7.0), 0.1)
    assert m.done(0.1)
    m.take(0.1)
    m.start_round(3, np.zeros(D, np.float32), 1.0)
    assert m.pending(1.0) == {1, 2}
    result, _ = m.take(1.0)
    assert result.heard == [3] and float(np.asarray(result.models[3][0])[0]) == 7.0


def test_rounds_ahead_window():
    """Models up to 2 rounds ahead are kept for their round; 3 ahead are dropped."""
    m = started()
    with capture_logs() as logs:
        m.feed(model(1, 4), 0.1)
        m.feed(model(1, 5), 0.1)
    assert drops(logs) == ["round too far ahead"]
    [line] = events(logs, "message_dropped")
    assert line["sender"] == 1 and line["msg_round"] == 5
    m.take(0.2)
    m.start_round(3, np.zeros(D, np.float32), 1.0)
    m.take(1.0)
    m.start_round(4, np.zeros(D, np.float32), 2.0)
    assert m.take(2.0)[0].heard == [1]


def test_duplicate_dropped_stale_ignored_non_neighbour_dropped():
    """A second model of the round from one sender, a model from a non-neighbour: one drop
    each; a model of an earlier round: a debug line, no drop."""
    m = started()
    with capture_logs() as logs:
        m.feed(model(1, 2, 1.0), 0.1)
        m.feed(model(1, 2, 9.0), 0.2)
        m.feed(model(1, 1), 0.3)
        m.feed(model(5, 2), 0.4)
    assert drops(logs) == ["duplicate model for this round", "sender is not a neighbour"]
    assert [e["msg_round"] for e in events(logs, "stale_model")] == [1]
    assert float(np.asarray(m.take(0.5)[0].models[1][0])[0]) == 1.0  # the first one kept


def test_bad_meta_and_types_are_dropped_with_their_reasons():
    """Degree out of range, no params, a non-gossip type, heartbeat or bye from a stranger,
    a heartbeat beyond the last round: one drop each, with today's wording."""
    m = started()
    no_params = Received(wire.Message("model", 1, 2, {"degree": 2}, {}))
    cases = [
        (model(1, 2, degree=0), "meta.degree missing or out of range"),
        (model(1, 2, degree=8), "meta.degree missing or out of range"),
        (model(1, 2, degree=True), "meta.degree missing or out of range"),
        (no_params, "model message without params"),
        (Received(wire.Message("update", 1, 2, {})), "unexpected message type 'update'"),
        (beat(6, 2), "heartbeat from a peer that is not a neighbour"),
        (bye(6), "bye from a peer that is not a neighbour"),
        (beat(1, 6), "heartbeat beyond the last round"),
    ]
    with capture_logs() as logs:
        for event, _ in cases:
            assert m.feed(event, 0.1) == []
    assert len(drops(logs)) == len(cases)
    for (_, fragment), reason in zip(cases, drops(logs), strict=True):
        assert fragment in reason
    assert m.pending(0.1) == {1, 2, 3}  # none of it counts as a model


def test_a_malformed_model_with_a_claimed_sender_and_round_is_not_waited_for():
    """NaN from neighbour 3 claiming round 2: dropped once, 3 refused for round 2 (not
    waited for, not heard); a claim for a round outside the window changes nothing."""
    m = started()
    with capture_logs() as logs:
        m.feed(Malformed("'params' contains NaN or Inf", sender=2, round=9), 0.1)
        m.feed(Malformed("'params' contains NaN or Inf", sender=3, round=2), 0.1)
        m.feed(Malformed("header is not valid msgpack"), 0.1)
    assert drops(logs) == ["'params' contains NaN or Inf"] * 2 + ["header is not valid msgpack"]
    assert m.pending(0.1) == {1, 2}
    result, _ = m.take(0.1)
    assert 3 not in result.models and result.missing == [1, 2, 3]


def test_heartbeats_go_only_to_spoken_idle_live_neighbours():
    """Due: heard once, not gone, sent nothing for heartbeat_s; each carries the round."""
    m = SyncGossip(config(), 0.0)
    m.enter(1)
    assert m.heartbeats(10.0) == []  # nobody has spoken yet
    m.heard(1, 0.0)
    m.heard(2, 0.0)
    assert [(s.to, s.type, s.round) for s in m.heartbeats(0.0)] == [
        (1, "heartbeat", 1),
        (2, "heartbeat", 1),
    ]
    assert m.heartbeats(0.4) == []  # just sent
    m.start_round(1, np.zeros(D, np.float32), 0.4)  # the model counts as a send
    assert m.heartbeats(0.8) == []
    assert [s.to for s in m.heartbeats(0.9)] == [1, 2]
    m.feed(bye(2), 1.0)
    assert [s.to for s in m.heartbeats(1.5)] == [1]


def test_catch_up_heartbeat_gets_one_resend_per_heartbeat_s():
    """A catch_up heartbeat gets the model last sent, flagged resend, at most once per
    heartbeat_s per neighbour; before any model was sent, nothing."""
    m = SyncGossip(config(), 0.0)
    assert m.feed(beat(1, 0, catch_up=True), 0.0) == []
    x = np.ones(D, np.float32)
    m.start_round(2, x, 1.0)
    [send] = m.feed(beat(1, 0, catch_up=True), 1.1)
    assert (send.to, send.type, send.round) == (1, "model", 2)
    assert send.meta == {"degree": 3, "samples": 100, "resend": True}
    assert send.arrays["params"] is x
    assert m.feed(beat(1, 0, catch_up=True), 1.5) == []  # within heartbeat_s
    assert [s.to for s in m.feed(beat(2, 0, catch_up=True), 1.5)] == [2]  # another neighbour
    assert len(m.feed(beat(1, 0, catch_up=True), 1.6)) == 1
    assert m.feed(beat(1, 0), 5.0) == []  # a plain heartbeat asks for nothing


def test_the_dissensus_hook_crafts_as_models_arrive_and_the_plain_model_goes_late():
    """Targets get craft(j, its model, ours) as soon as their model is in (at start_round
    for one already in), the plain model where the craft is not finite, and at take to
    targets whose model never came; the other neighbours get the plain model at once."""
    calls = []

    def craft(j, theirs, ours):
        calls.append(j)
        out = np.asarray(theirs) * 10 + ours
        return out if j != 2 else np.full(D, np.inf, np.float32)

    m = SyncGossip(config(targets=frozenset({1, 2, 3})), 0.0, craft=craft)
    m.feed(model(1, 1, 1.0), 0.0)  # in before the round starts (ahead)
    own = np.ones(D, np.float32)
    first = m.start_round(1, own, 0.1)
    assert [(s.to, float(s.arrays["params"][0])) for s in first] == [(1, 11.0)]
    [second] = m.feed(model(2, 1, 2.0), 0.2)
    assert second.to == 2 and second.arrays["params"] is own  # not finite: the plain model
    assert m.feed(model(2, 1, 5.0), 0.3) == []  # a duplicate crafts nothing
    result, late = m.take(0.4)
    assert [(s.to, s.arrays["params"] is own) for s in late] == [(3, True)]
    assert calls == [1, 2] and result.heard == [1, 2]
    with pytest.raises(ValueError, match="craft hook"):
        SyncGossip(config(targets=frozenset({1})), 0.0)


def test_bye_and_config_checks():
    """bye() says bye to every neighbour with the last round; a bad config is refused."""
    m = SyncGossip(config(), 0.0)
    assert m.bye() == [Send(j, "bye", 5) for j in (1, 2, 3)]
    with pytest.raises(ValueError, match="sorted"):
        config(neighbours=(2, 1))
    with pytest.raises(ValueError, match="own neighbour"):
        config(neighbours=(0, 1))
    with pytest.raises(ValueError, match="targets"):
        config(targets=frozenset({7}))


def test_parse_gossip_reads_the_flags():
    """parse_gossip: typed messages with their resend / catch_up flags (True only if True)."""
    kw = {"neighbours": (1, 2), "peers": 4, "rounds": 3}
    got = parse_gossip(model(1, 2, resend=True).msg, **kw)
    assert isinstance(got, ModelMsg) and got.resend and got.degree == 2
    assert parse_gossip(model(1, 2, resend=1).msg, **kw).resend is False
    assert parse_gossip(beat(2, 3, catch_up=True).msg, **kw) == Heartbeat(2, 3, True)
    assert parse_gossip(beat(2, 3, catch_up="yes").msg, **kw) == Heartbeat(2, 3, False)
    assert parse_gossip(bye(1, 3).msg, **kw) == Bye(1, 3)


# -- catch-up -------------------------------------------------------------------------


def catching_up(last: int = 3, now: float = 0.0) -> tuple[SyncGossip, CatchUp]:
    m = SyncGossip(config(rounds=20), now)
    m.enter(last)
    return m, CatchUp(m, last, now)


def test_catch_up_asks_every_heartbeat_s_until_done():
    """A catch_up heartbeat with the checkpoint's round to every neighbour at once, again
    every heartbeat_s; wake_in names the next ask; a plain heartbeat is not due meanwhile."""
    m, c = catching_up()
    asks = c.tick(0.0)
    assert [(s.to, s.type, s.round, dict(s.meta)) for s in asks] == [
        (j, "heartbeat", 3, {"catch_up": True}) for j in (1, 2, 3)
    ]
    assert c.tick(0.3) == [] and c.wake_in(0.3) == pytest.approx(0.2)
    m.heard(1, 0.3)
    assert m.heartbeats(0.4) == []  # the ask counts as a send to 1
    assert len(c.tick(0.5)) == 3


def test_catch_up_keeps_the_newest_model_per_neighbour_and_resends_end_it():
    """Older queued models first, then resends: the newest of each neighbour kept, done
    once all three resends are in, to_round the newest round; models not newer than the
    checkpoint are not kept."""
    m, c = catching_up(last=3)
    c.tick(0.0)
    c.feed(model(1, 2, 0.0), 0.1)  # older than the checkpoint
    c.feed(model(1, 5, 5.0), 0.1)
    c.feed(model(1, 4, 4.0), 0.1)  # older than 1's newest
    c.feed(model(1, 9, 9.0, resend=True), 0.2)
    c.feed(model(2, 8, 8.0, resend=True), 0.2)
    assert not c.done(0.2)
    c.feed(model(3, 3, 3.0, resend=True), 0.3)  # the checkpoint's round: nothing new
    assert c.done(0.3) and c.wake_in(0.3) == 0.0 and c.tick(0.6) == []
    got = c.result()
    assert got.from_round == 3 and got.to_round == 9 and got.resent == [1, 2, 3]
    assert {j: r for j, (r, _) in got.models.items()} == {1: 9, 2: 8}
    assert float(np.asarray(got.models[1][1])[0]) == 9.0
    assert m.liveness.spoken == {1, 2, 3}  # heard: alive for the rounds that follow


def test_catch_up_refuses_rounds_beyond_the_last_and_ends_at_its_deadline():
    """A model of a round after the last: dropped; bad input dropped; a resend missing: done at
    round_timeout_s with what came."""
    _, c = catching_up(last=3)
    with capture_logs() as logs:
        c.feed(model(1, 21, resend=True), 0.1)
        c.feed(model(5, 4), 0.1)
        c.feed(Malformed("'params' contains NaN or Inf", sender=2, round=4), 0.1)
        c.feed(model(2, 6, resend=True), 0.2)
    assert drops(logs) == [
        "model for a round beyond the last",
        "sender is not a neighbour",
        "'params' contains NaN or Inf",
    ]
    assert not c.done(9.9) and c.done(10.0)
    got = c.result()
    assert got.to_round == 6 and got.resent == [2] and list(got.models) == [2]


def test_catch_up_nobody_answers():
    """No answer at all: done at the deadline, continuing from the checkpoint's round."""
    _, c = catching_up(last=7)
    assert len(c.tick(0.0)) == 3 and c.wake_in(0.0) == 0.5  # the first ask at once
    assert c.done(10.0)
    got = c.result()
    assert got.to_round == 7 and got.models == {} and got.resent == []


def test_catch_up_passes_heartbeats_and_byes_to_liveness():
    """During catch-up a bye is a neighbour that left; a heartbeat a sign of life."""
    m, c = catching_up()
    with capture_logs() as logs:
        c.feed(bye(3), 0.1)
        c.feed(beat(1, 4), 0.1)
    assert [e["neighbour"] for e in events(logs, "neighbour_left")] == [3]
    assert m.liveness.gone == {3} and 1 in m.liveness.spoken
