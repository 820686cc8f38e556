"""The FedAvg server and client machines, in process: no sockets, no sleeps, a fake clock."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from p2pfl.core import streams
from p2pfl.protocol import wire
from p2pfl.protocol.events import COORDINATOR, Malformed, Received, Send
from p2pfl.protocol.fedavg_client import (
    ClientConfig,
    FedAvgClient,
    Finish,
    Lost,
    Train,
    lines_on_adopt,
)
from p2pfl.protocol.fedavg_server import (
    END_WAIT_S,
    ClosedRound,
    FedAvgServer,
    ServerConfig,
    stack_updates,
)

D = 4  # model size
PEERS = 4  # the coordinator's sender id
EXPECT = wire.Expect("s", PEERS, {"params": (D,)})
MODEL = np.zeros(D, np.float32)


def message(type_, sender, round_=0, meta=None, params=None):
    """A message as the runtime decodes it (through the real wire codec)."""
    arrays = {"params": np.asarray(params, np.float32)} if params is not None else None
    return wire.decode(wire.encode(type_, sender, round_, "s", meta, arrays), EXPECT)


def origin(peer):
    """The routing id of peer `peer`'s control connection."""
    return bytes([peer])


def control(type_, sender, round_=0, meta=None, via=None):
    """A control-channel message from `sender` (on its own connection unless `via`)."""
    return Received(message(type_, sender, round_, meta), origin=origin(via or sender))


def update(sender, round_, samples=10, loss=0.5, params=None):
    """An update on the update channel (no routing id)."""
    meta = {"samples": samples} if loss is None else {"samples": samples, "loss": loss}
    value = np.full(D, float(sender), np.float32) if params is None else params
    return Received(message("update", sender, round_, meta, value))


def server(rounds=3, now=0.0, **overrides):
    """A server over PEERS peers with small settings."""
    settings = {"peers": PEERS, "rounds": rounds, "seed": 7, "min_peers": 2}
    return FedAvgServer(ServerConfig(**(settings | overrides)), MODEL, now)


def join(s, peers, now=0.0):
    """Every peer in `peers` says hello; the sends in reply, in order."""
    out = []
    for p in peers:
        out += s.feed(control("hello", p), now)
    return out


def of(sends, type_):
    """The recipients of the sends of one type."""
    return [x.to for x in sends if x.type == type_]


def drops(logs):
    """The reasons of message_dropped log lines."""
    return [e["reason"] for e in logs if e["event"] == "message_dropped"]


# -- server: quorum ------------------------------------------------------------------


def test_no_round_before_min_peers_then_it_starts_at_once():
    """One peer of min_peers = 2: waiting_for_peers, no start_round; the second starts it."""
    s = server()
    with capture_logs() as logs:
        assert of(s.tick(0.0), "start_round") == []
        sends = s.feed(control("hello", 0), 0.1)
        assert of(sends, "welcome") == [0] and of(sends, "start_round") == []
        sends = s.feed(control("hello", 1), 0.2)
    assert of(sends, "welcome") == [1] and of(sends, "start_round") == [0, 1]
    assert [e for e in logs if e["event"] == "waiting_for_peers"] == [
        {"event": "waiting_for_peers", "live": 0, "need": 2, "log_level": "info"}
    ]
    start = next(x for x in sends if x.type == "start_round")
    assert start.round == 1 and start.arrays is not None and start.arrays["params"] is MODEL


def test_quorum_not_reached_aborts_with_the_reason_to_every_peer():
    """startup_timeout_s without min_peers fresh: end_session with the error to every member."""
    s = server(min_peers=3, startup_timeout_s=5.0, peer_timeout_s=1.0, heartbeat_s=10.0)
    s.tick(0.0)
    join(s, [0, 1], 0.0)
    assert s.wake_in(1.0) == pytest.approx(4.0)  # the quorum wait's end comes first
    s.tick(4.9)
    assert not s.done and s.aborted is None
    sends = s.tick(5.0)
    assert s.done and s.aborted is not None
    assert "only 0 of the 3 peers needed" in s.aborted and "after 5 s" in s.aborted
    ends = [x for x in sends if x.type == "end_session"]
    assert [x.to for x in ends] == [0, 1]  # stale ones too
    assert all(x.meta == {"error": s.aborted} and x.arrays is None for x in ends)


def test_late_joiner_is_welcomed_into_the_round_and_sampled_from_the_next():
    """A hello during round k gets welcome(round k), is not sampled in k, is in k + 1."""
    s = server()
    join(s, [0, 1])
    sends = s.feed(control("hello", 3), 0.5)
    assert of(sends, "welcome") == [3] and sends[0].meta == {"round": 1}
    assert of(sends, "start_round") == []
    s.feed(update(0, 1), 1.0)
    s.feed(update(1, 1), 1.0)
    closed = s.closing
    assert closed is not None and closed.closed_by == "all_in" and closed.sampled == (0, 1)
    assert closed.connected == (0, 1)
    assert s.close_round(MODEL, 1.0) == []
    assert of(s.tick(1.0), "start_round") == [0, 1, 3]


# -- server: sampling ----------------------------------------------------------------


@pytest.mark.parametrize(("fraction", "min_updates", "k"), [(0.5, 1, 2), (0.1, 1, 1), (0.1, 2, 2)])
def test_sampling_is_seeded_and_respects_fraction_and_min_updates(fraction, min_updates, k):
    """k = max(min_updates, ceil(fraction * live)) fresh peers from [seed, SAMPLE, round]."""
    runs = []
    for _ in range(2):
        s = server(rounds=6, fraction=fraction, min_updates=min_updates, min_peers=PEERS)
        join(s, range(PEERS))
        samples = []
        for r in range(1, 7):
            c = s.closing
            assert c is None
            sampled = s.open.sampled
            for p in sampled:
                s.feed(update(p, r), float(r))
            assert s.closing is not None and s.closing.closed_by == "all_in"
            samples.append(sampled)
            s.close_round(MODEL, float(r))
            s.tick(float(r))
        runs.append(samples)
    assert runs[0] == runs[1]  # reproducible
    assert all(len(x) == k for x in runs[0])
    for r, sampled in enumerate(runs[0], start=1):
        draw = streams.rng(7, streams.SAMPLE, r).choice(list(range(PEERS)), size=k, replace=False)
        assert sampled == tuple(sorted(int(i) for i in draw))
    if k < PEERS:
        assert len(set(runs[0])) > 1  # a fresh sample every round


# -- server: closing -----------------------------------------------------------------


def test_deadline_closes_with_whoever_is_in_and_names_the_missing():
    """Two of three updates by round_timeout_s: closed_by deadline, the third missing."""
    s = server(min_peers=3, round_timeout_s=2.0, min_updates=2, heartbeat_s=5.0)
    join(s, [0, 1, 2], 10.0)
    s.feed(update(0, 1), 10.5)
    s.feed(update(1, 1), 11.0)
    s.tick(11.0)
    assert s.closing is None and s.wake_in(11.7) == pytest.approx(0.3)  # the deadline
    with capture_logs() as logs:
        s.tick(11.999)
        assert s.closing is None
        s.tick(12.0)
    c = s.closing
    assert c is not None and c.closed_by == "deadline"
    assert c.participants == [0, 1] and c.missing == [2] and c.started == 10.0
    missing = [e for e in logs if e["event"] == "round_missing_updates"]
    assert [(e["missing"], e["closed_by"]) for e in missing] == [([2], "deadline")]


@pytest.mark.parametrize("how", ["bye", "restart"])
def test_a_sampled_peer_that_leaves_or_restarts_closes_the_round_early(how):
    """Bye, or hello again on a new connection, from the one missing peer: closed_by early."""
    s = server(min_peers=3)
    join(s, [0, 1, 2])
    s.feed(update(0, 1), 1.0)
    s.feed(update(1, 1), 1.0)
    assert s.closing is None
    if how == "bye":
        s.feed(control("bye", 2, 1), 1.5)
    else:
        sends = s.feed(Received(message("hello", 2), origin=b"new"), 1.5)
        assert of(sends, "welcome") == [2] and s.route(2) == b"new"
    c = s.closing
    assert c is not None and c.closed_by == "early" and c.missing == [2]


def test_a_start_round_that_could_not_be_queued_is_not_waited_for():
    """undelivered(start_round) drops the peer from the awaited ones: early close."""
    s = server(min_peers=2)
    sends = join(s, [0, 1])
    s.undelivered(next(x for x in sends if x.type == "start_round" and x.to == 1), 0.0)
    s.feed(update(0, 1), 0.5)
    assert s.closing is not None and s.closing.closed_by == "early"


def test_quorum_missed_keeps_the_global_model():
    """Fewer than min_updates by the deadline: quorum_missed, no weights, model kept."""
    s = server(min_peers=2, min_updates=2, round_timeout_s=1.0)
    join(s, [0, 1])
    s.feed(update(0, 1), 0.5)
    s.tick(1.0)
    c = s.closing
    assert c is not None and c.closed_by == "quorum_missed"
    assert c.weights == {} and c.participants == [] and c.missing == [0, 1]
    assert c.train_loss is None
    s.close_round(s.model, 1.0)
    starts = [x for x in s.tick(1.0) if x.type == "start_round"]
    assert all(x.round == 2 and x.arrays["params"] is MODEL for x in starts)


def test_weights_are_sample_counts_or_uniform_and_the_loss_is_sample_weighted():
    """weighting = samples / uniform; train_loss = sum(n * loss) / sum(n)."""
    for weighting, want in [("samples", {0: 10.0, 1: 30.0}), ("uniform", {0: 1.0, 1: 1.0})]:
        s = server(weighting=weighting)
        join(s, [0, 1])
        s.feed(update(1, 1, samples=30, loss=1.0), 0.1)
        s.feed(update(0, 1, samples=10, loss=0.2), 0.2)
        c = s.closing
        assert c is not None and dict(c.weights) == want
        assert c.train_loss == pytest.approx((10 * 0.2 + 30 * 1.0) / 40)
        stack, weights = stack_updates(c)
        assert stack.tolist() == [[0.0] * D, [1.0] * D]  # id order, not arrival order
        assert weights.tolist() == [want[0], want[1]]


def test_close_round_without_a_closed_round_is_an_error():
    """close_round before a round closed raises."""
    with pytest.raises(RuntimeError):
        server().close_round(MODEL, 0.0)


# -- server: bad updates and claimed ids -----------------------------------------------


def test_update_checks_in_the_server():
    """Not sampled, bad samples or loss, late, wrong round, duplicate: dropped; one kept."""
    # seed 14 samples peers (1, 2) in round 1 and (0, 2) in round 2
    s = server(rounds=3, min_peers=3, fraction=0.5, min_updates=2, seed=14)
    join(s, [0, 1, 2])
    assert s.open.sampled == (1, 2)
    s.feed(update(1, 1), 0.1)
    s.feed(update(2, 1), 0.1)
    s.close_round(MODEL, 0.2)
    s.tick(0.2)
    assert s.open.sampled == (0, 2) and s.round == 2
    with capture_logs() as logs:
        s.feed(update(1, 2), 1.0)
        s.feed(update(0, 2, samples=0), 1.0)
        s.feed(update(0, 2, samples=True), 1.0)
        s.feed(update(0, 2, loss="0.1"), 1.0)
        s.feed(update(0, 2, loss=math.inf), 1.0)
        s.feed(update(0, 1), 1.0)
        s.feed(update(0, 2, samples=5, loss=0.25), 1.0)
        s.feed(update(0, 2, samples=5, loss=0.25), 1.0)
        s.feed(update(2, 3), 1.0)
        s.feed(update(3, 2), 1.0)
        s.feed(Received(message("model", 0, 2, {"samples": 1}, np.ones(D))), 1.0)
        s.feed(Received(message("update", 2, 2, {"samples": 1})), 1.0)
    assert drops(logs) == [
        "update from a peer not sampled this round",
        "meta.samples missing or out of range",
        "meta.samples missing or out of range",
        "meta.loss is not a finite float",
        "meta.loss is not a finite float",
        "duplicate update for this round",
        "update for round 3, the open round is 2",
        "update from a peer that has not joined",
        "unexpected message type 'model' on the update channel",
        "update without params",
    ]
    assert [e["sender"] for e in logs if e["event"] == "late_update"] == [0]
    assert list(s.open.updates) == [0]
    assert s.open.updates[0].samples == 5 and s.open.updates[0].loss == 0.25


def test_update_between_rounds_and_after_close_is_not_taken():
    """No round open: 'the open round is none'; the closed round's updates are late."""
    s = server(min_peers=3)
    join(s, [0, 1])
    with capture_logs() as logs:
        s.feed(update(0, 1), 0.5)
        join(s, [2], 0.6)
        s.feed(update(0, 1), 0.7)
        s.feed(update(1, 1), 0.7)
        s.feed(update(2, 1), 0.7)
        s.feed(update(2, 1), 0.8)  # closed: late
    assert drops(logs) == ["update for round 1, the open round is none"]
    assert [e["msg_round"] for e in logs if e["event"] == "late_update"] == [1]


def test_control_messages_from_unknown_or_claimed_ids_are_dropped():
    """Not joined, claimed from another connection, wrong type: one drop line each."""
    s = server()
    join(s, [0])
    with capture_logs() as logs:
        s.feed(control("heartbeat", 0, via=1), 1.0)
        s.feed(control("bye", 0, via=2), 1.0)
        s.feed(control("heartbeat", 3), 1.0)
        s.feed(control("update", 0), 1.0)
        s.feed(Malformed("empty message", origin=b"x"), 1.0)
        s.feed(Malformed("bad dtype"), 1.0)
    assert drops(logs) == [
        "sender id claimed from another connection",
        "sender id claimed from another connection",
        "sender has not joined",
        "unexpected message type 'update' on the control channel",
        "empty message",
        "bad dtype",
    ]
    assert [e["channel"] for e in logs if "channel" in e] == ["control", "updates"]
    assert 0 in s.members  # the spoofed bye did not remove it


# -- server: liveness ----------------------------------------------------------------


def test_heartbeats_and_samples_only_fresh_peers():
    """A peer silent past peer_timeout_s gets no heartbeat and is not sampled until it speaks."""
    s = server(min_peers=1, peer_timeout_s=3.0, heartbeat_s=1.0, round_timeout_s=4.0)
    s.feed(control("hello", 0), 0.0)
    s.feed(control("hello", 1), 0.0)  # during round 1: sampled from round 2
    assert s.open.sampled == (0,)
    assert of(s.tick(1.0), "heartbeat") == [0, 1]
    s.feed(update(0, 1), 2.5)  # an accepted update is a sign of life
    s.close_round(MODEL, 2.5)
    assert of(s.tick(2.5), "heartbeat") == [0, 1] and s.open.sampled == (0, 1)
    assert of(s.tick(3.0), "heartbeat") == []  # not due yet
    s.feed(control("heartbeat", 0), 4.0)
    assert of(s.tick(4.0), "heartbeat") == [0] and s.live(4.0) == [0]  # 1 silent since 0.0
    s.feed(update(0, 2), 5.0)
    assert of(s.tick(6.5), "heartbeat") == [0]
    assert s.closing is not None and s.closing.missing == [1]
    s.close_round(MODEL, 6.5)
    s.tick(6.5)
    assert s.open.sampled == (0,)  # not sampled while silent
    s.feed(control("heartbeat", 1), 7.0)
    assert of(s.tick(7.5), "heartbeat") == [0, 1]  # taken back the moment it speaks


# -- server: the end -----------------------------------------------------------------


def finish_last_round(s, now=1.0):
    """Close the open round with every sampled update; return close_round's sends."""
    rnd = s.round
    for p in s.open.sampled:
        s.feed(update(p, rnd), now)
    assert s.closing is not None and s.closing.last
    return s.close_round(np.ones(D, np.float32), now)


def test_end_session_goes_to_everyone_with_retries_and_the_byes_end_it():
    """end_session with the final model; an unsent one is retried; byes finish the session."""
    s = server(rounds=1, min_peers=3, coordinator_timeout_s=2.0)
    join(s, [0, 1, 2])
    ends = finish_last_round(s)
    assert [x.to for x in ends] == [0, 1, 2] and s.ending and not s.done
    assert all(x.type == "end_session" and x.round == 1 for x in ends)
    assert all(np.array_equal(x.arrays["params"], np.ones(D)) for x in ends)
    s.undelivered(ends[1], 1.0)
    assert s.wake_in(1.0) == 0.0
    assert of(s.tick(1.0), "end_session") == [1]  # retried
    assert s.wake_in(1.0) == pytest.approx(0.1)
    assert of(s.tick(1.1), "end_session") == []  # queued this time
    with capture_logs() as logs:
        for p in (0, 1, 2):
            s.feed(control("bye", p, 1), 1.5)
    assert s.done and [e["sender"] for e in logs if e["event"] == "peer_left"] == [0, 1, 2]


def test_the_bye_wait_is_bounded():
    """No bye: done after max(END_WAIT_S, coordinator_timeout_s), naming who never said it."""
    s = server(rounds=1, min_peers=2, coordinator_timeout_s=1.0)
    join(s, [0, 1])
    finish_last_round(s)
    s.tick(2.0)  # the wait starts here
    s.feed(control("bye", 0, 1), 3.0)
    with capture_logs() as logs:
        s.tick(2.0 + END_WAIT_S - 0.01)
        assert not s.done
        s.tick(2.0 + END_WAIT_S)
    assert s.done and [e["peers"] for e in logs if e["event"] == "no_bye"] == [[1]]


def test_a_hello_while_ending_gets_the_final_model_at_once():
    """A peer that joins after the last round gets end_session, not a welcome."""
    s = server(rounds=1, min_peers=2)
    join(s, [0, 1])
    finish_last_round(s)
    sends = s.feed(control("hello", 3), 2.0)
    assert [(x.to, x.type) for x in sends] == [(3, "end_session")]


def test_zero_rounds_hands_the_initial_model_to_the_quorum():
    """rounds = 0: once min_peers are in, end_session with the initial model, no round."""
    s = server(rounds=0, min_peers=2)
    assert s.round == 0
    sends = join(s, [0, 1])
    assert of(sends, "end_session") == [0, 1] and of(sends, "start_round") == []
    assert all(x.round == 0 and x.arrays["params"] is MODEL for x in sends if x.arrays)


def test_a_whole_session_closes_every_round_all_in():
    """Three rounds of full participation: all_in each round, the model passed along."""
    s = server(rounds=3, min_peers=2)
    join(s, [0, 1])
    closed: list[ClosedRound] = []
    for r in (1, 2, 3):
        for p in s.open.sampled:
            s.feed(update(p, r), float(r))
        closed.append(s.closing)
        s.close_round(np.full(D, float(r), np.float32), float(r))
        sends = s.tick(float(r))
        if r < 3:
            assert all(x.arrays["params"][0] == r for x in sends if x.type == "start_round")
    assert [(c.round, c.closed_by) for c in closed] == [(r, "all_in") for r in (1, 2, 3)]
    assert closed[-1].last and s.ending


# -- client --------------------------------------------------------------------------


def client(now=0.0, **overrides):
    """Peer 1's client machine with small settings."""
    settings = {"peer": 1, "coordinator": PEERS, "samples": 10}
    return FedAvgClient(ClientConfig(**(settings | overrides)), now)


def from_coordinator(type_, round_=0, meta=None, params=None, sender=PEERS, size=0):
    """A control message as the client receives it."""
    return Received(message(type_, sender, round_, meta, params), size=size)


def test_client_hello_update_and_bye_sends():
    """hello carries the sample count; update goes on the update channel with its loss."""
    c = client()
    assert c.hello(0.0) == Send(COORDINATOR, "hello", 0, {"samples": 10})
    params = np.ones(D, np.float32)
    u = c.update(3, np.float32(0.25), params, 1.0)
    assert (u.type, u.round, u.channel, dict(u.meta)) == (
        "update",
        3,
        "updates",
        {"samples": 10, "loss": 0.25},
    )
    assert u.arrays["params"] is params and c.bye(5, 2.0) == Send(COORDINATOR, "bye", 5)


def test_client_heartbeats_every_heartbeat_s_once_welcomed():
    """No heartbeat before the welcome; then one whenever nothing was sent for heartbeat_s."""
    c = client(heartbeat_s=0.5)
    c.hello(0.0)
    assert c.tick(1.0) == []
    with capture_logs() as logs:
        c.feed(from_coordinator("welcome", meta={"round": 3}), 1.0)
    assert c.welcomed and [e["round"] for e in logs if e["event"] == "joined"] == [3]
    assert [x.type for x in c.tick(1.0)] == ["heartbeat"]  # last sent at 0.0
    assert c.tick(1.4) == []
    c.update(1, 0.1, MODEL, 1.6)  # any send counts
    assert c.tick(2.0) == [] and [x.type for x in c.tick(2.1)] == ["heartbeat"]


def test_client_skips_to_the_newest_queued_round():
    """Two start_rounds queued: take gives the newer one and logs skipped_round."""
    c = client()
    c.feed(from_coordinator("welcome"), 0.0)
    with capture_logs() as logs:
        c.feed(from_coordinator("start_round", 3, params=np.full(D, 3.0)), 9.0)
        c.feed(from_coordinator("heartbeat", 3), 9.0)
        assert c.wake_in(9.0) == 0.0  # only drain what is queued
        c.feed(from_coordinator("start_round", 4, params=np.full(D, 4.0), size=99), 9.0)
        c.feed(from_coordinator("heartbeat", 4, size=5), 9.0)
    task = c.take(9.0)
    assert isinstance(task, Train) and task.round == 4 and np.asarray(task.params)[0] == 4.0
    assert task.size == 99  # the model message's bytes, not the heartbeat's after it
    assert [(e["skipped"], e["newer"]) for e in logs if e["event"] == "skipped_round"] == [(3, 4)]
    assert c.take(9.0) is None


def test_client_silence_counts_only_while_waiting_with_nothing_queued():
    """Queued messages read after a long training round are signs of life; silence is not."""
    c = client(coordinator_timeout_s=10.0)
    c.feed(from_coordinator("welcome"), 0.0)
    assert c.take(10.0) is None  # exactly the limit: not yet
    c.feed(from_coordinator("heartbeat"), 100.0)  # waited in the queue while it trained
    assert c.take(100.0) is None
    assert c.take(110.0) is None
    lost = c.take(110.5)
    assert lost == Lost("no message from the coordinator for 10 s")


def test_client_welcome_timeout():
    """No welcome within startup_timeout_s (from construction): lost."""
    c = client(now=5.0, startup_timeout_s=60.0, heartbeat_s=0.5)
    c.hello(6.0)
    assert c.wake_in(6.0) == 0.5
    assert c.take(65.0) is None
    assert c.take(65.5) == Lost("no welcome from the coordinator for 60 s")


def test_client_end_session_final_model_or_error():
    """end_session with params: Finish; with an error, or without a model: Lost."""
    c = client()
    c.feed(from_coordinator("end_session", 7, params=np.ones(D)), 1.0)
    task = c.take(1.0)
    assert isinstance(task, Finish) and task.round == 7
    c.feed(from_coordinator("end_session", 2, meta={"error": "only 1 of 3 peers"}), 1.0)
    assert c.take(1.0) == Lost("the coordinator ended the session: only 1 of 3 peers", True)
    c.feed(from_coordinator("end_session", 2), 1.0)
    assert c.take(1.0) == Lost("the coordinator ended the session: no final model", True)


def test_client_drops_what_is_not_from_the_coordinator():
    """Another sender's start_round, a second welcome, a bad frame, a model-less round."""
    c = client(coordinator_timeout_s=10.0)
    c.feed(from_coordinator("welcome"), 0.0)
    with capture_logs() as logs:
        c.feed(from_coordinator("start_round", 2, params=np.ones(D), sender=0), 20.0)
        c.feed(from_coordinator("welcome"), 1.0)
        c.feed(Malformed("header is not valid msgpack"), 1.0)
        c.feed(from_coordinator("start_round", 2), 1.0)
        assert c.take(1.0) is None  # the start_round without params
        assert c.take(11.5) == Lost("no message from the coordinator for 10 s")
    assert drops(logs) == [
        "not from the coordinator",
        "unexpected type 'welcome'",
        "header is not valid msgpack",
        "start_round without params",
    ]
    assert next(e for e in logs if e["reason"] == "not from the coordinator")["sender"] == 0


@pytest.mark.parametrize(
    ("recorded", "trained", "done", "lines"),
    [
        (0, None, 0, []),  # the initial model is already recorded
        (0, 1, 1, [(1, "global")]),  # sampled in round 2: round 1's model came
        (1, 2, 4, [(2, "update"), (4, "global")]),  # not sampled in round 3
        (4, 4, 4, []),  # resumed: its line is in the history
        (3, 3, 5, [(5, "global")]),
        (0, None, 3, [(3, "global")]),  # a late joiner's first global model
    ],
)
def test_lines_on_adopt(recorded, trained, done, lines):
    """Which rounds get a history line, and evaluated on what, when a global model arrives."""
    assert lines_on_adopt(recorded, trained, done) == lines


# -- server: invariants over random sessions --------------------------------------------

steps = st.lists(
    st.tuples(
        st.sampled_from(["hello", "update", "bye", "beat", "tick", "undelivered"]),
        st.integers(0, PEERS - 1),
        st.integers(0, 3),  # a round offset, or which connection
        st.floats(0.0, 2.0),  # time passing
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(steps=steps, fraction=st.sampled_from([0.3, 0.5, 1.0]), min_updates=st.integers(1, 2))
def test_random_sessions_keep_the_round_invariants(steps, fraction, min_updates):
    """Any event order: samples of the right size from fresh peers, participants sampled,
    weights exactly the participants', closed_by consistent with who is in."""
    s = server(rounds=4, min_peers=2, fraction=fraction, min_updates=min_updates)
    now, last_sends = 0.0, []
    closed = []
    for kind, peer, k, dt in steps:
        now += dt
        if kind == "hello":
            last_sends = s.feed(Received(message("hello", peer), origin=bytes([peer, k])), now)
        elif kind == "update":
            last_sends = s.feed(update(peer, max(0, s.round - 1 + k % 2)), now)
        elif kind in ("bye", "beat") and s.route(peer) is not None:
            type_ = "bye" if kind == "bye" else "heartbeat"
            last_sends = s.feed(Received(message(type_, peer), origin=s.route(peer)), now)
        elif kind == "undelivered" and last_sends:
            s.undelivered(last_sends[k % len(last_sends)], now)
        else:
            last_sends = s.tick(now)
        for x in last_sends:
            assert x.to in s.members
            if x.type == "start_round":
                assert x.to in s.open.sampled and x.round == s.round
        if s.open is not None and s.phase == "open":
            live = len(s.open.connected)
            k_want = min(live, max(min_updates, math.ceil(fraction * live)))
            assert len(s.open.sampled) == k_want and set(s.open.sampled) <= set(s.open.connected)
            assert set(s.open.updates) <= set(s.open.sampled)
        if s.closing is not None:
            c = s.closing
            closed.append(c)
            assert set(c.participants) <= set(c.sampled)
            assert set(c.weights) == set(c.participants)
            assert (c.closed_by == "all_in") == (c.participants == list(c.sampled))
            assert (c.closed_by == "quorum_missed") == (len(c.updates) < min_updates)
            last_sends = s.close_round(MODEL, now)  # the round's start_rounds are stale now
        if s.done:
            break
    assert [c.round for c in closed] == list(range(1, len(closed) + 1))
