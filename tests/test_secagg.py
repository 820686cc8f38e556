"""Secure aggregation in process: the maths (masks, fixed point, Shamir, sealing) and the
server's and peers' machines driven through the real wire codec, with a fake clock."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from structlog.testing import capture_logs

from p2pfl.core import secagg
from p2pfl.protocol import wire
from p2pfl.protocol.events import Received, Send
from p2pfl.protocol.fedavg_server import FedAvgServer, ServerConfig
from p2pfl.protocol.secagg import MAX_PEERS, KeyAuth, SecAggPeer

RANGE = 0.5


def _updates(n, d, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 0.05, (n, d)), rng.integers(50, 300, n)


def _mask_all(deltas, weights, round_=3):
    """Every peer's masked input, by hand from the core functions (nobody dropped)."""
    n = len(deltas)
    pairs = {u: secagg.keypair() for u in range(n)}
    seeds = {u: bytes([u + 1]) * 32 for u in range(n)}
    scale = secagg.scale_for(RANGE, n)
    inputs = {}
    for u in range(n):
        q = secagg.quantise(deltas[u], weights[u] / weights.sum(), scale, RANGE)
        others = {v: pairs[v].public for v in range(n) if v != u}
        inputs[u] = secagg.masked(q.values, seeds[u], pairs[u].secret, others, u, round_)
    return inputs, seeds, pairs, scale


def test_masked_sum_is_the_weighted_mean_within_quantisation():
    """Quickstart's MLP size (64·64 + 64 + 64·10 + 10 = 4,810 coordinates), 8 peers."""
    deltas, weights = _updates(8, 4810)
    inputs, seeds, pairs, scale = _mask_all(deltas, weights)
    total = secagg.unmask(inputs, seeds, {}, {u: p.public for u, p in pairs.items()}, 3)
    got = secagg.dequantise(total, scale, 1.0)
    want = np.average(deltas, axis=0, weights=weights)
    assert np.max(np.abs(got - want)) <= 8 * 0.5 / scale + 1e-12  # half a step a peer
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5


def test_masks_alone_do_not_cancel_without_every_peer():
    """Leave one peer's masked input out: without its mask key the sum is noise, uniform
    over the whole fixed-point range ±RANGE (mean |x| = RANGE / 2; the updates' ~0.04)."""
    deltas, weights = _updates(5, 1000)
    inputs, seeds, pairs, scale = _mask_all(deltas, weights)
    del inputs[4]
    total = secagg.unmask(inputs, seeds, {}, {u: p.public for u, p in pairs.items()}, 3)
    got = secagg.dequantise(total, scale, 1.0)
    assert np.abs(got).mean() > 0.4 * RANGE
    assert stats.kstest(got, "uniform", args=(-RANGE, 2 * RANGE)).pvalue > 1e-3


def test_a_masked_input_is_uniform_and_the_unmasked_one_is_not():
    """Chi-square over the bytes of one peer's masked input (256 cells): uniform; the
    same test rejects its plain fixed-point input outright."""
    deltas, weights = _updates(4, 20_000)
    inputs, _, _, scale = _mask_all(deltas, weights)
    masked = np.frombuffer(inputs[1].tobytes(), np.uint8)
    assert stats.chisquare(np.bincount(masked, minlength=256)).pvalue > 1e-3
    assert stats.kstest(inputs[1] / 2.0**32, "uniform").pvalue > 1e-3
    plain = secagg.quantise(deltas[1], weights[1] / weights.sum(), scale, RANGE).values
    counts = np.bincount(np.frombuffer(plain.tobytes(), np.uint8), minlength=256)
    assert stats.chisquare(counts).pvalue < 1e-12


def test_a_dropped_peer_is_recovered_from_its_mask_key():
    """Peer 2 fixed its masks then dropped: the others' sum is unmasked with its key."""
    deltas, weights = _updates(4, 500)
    inputs, seeds, pairs, scale = _mask_all(deltas, weights)
    del inputs[2]
    survivors = [0, 1, 3]
    publics = {u: p.public for u, p in pairs.items()}
    total = secagg.unmask(inputs, seeds, {2: pairs[2].secret}, publics, 3)
    share = weights[survivors].sum() / weights.sum()
    got = secagg.dequantise(total, scale, share)
    want = np.average(deltas[survivors], axis=0, weights=weights[survivors])
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5


def test_quantise_reports_what_it_clips():
    q = secagg.quantise(np.array([0.1, -2.0, 3.0]), 1.0, 1000.0, 1.0)
    assert q.out_of_range == 2 and q.max_abs == 3.0
    assert list(q.values.view(np.int32)) == [100, -1000, 1000]


def test_shamir_needs_threshold_shares():
    secret = bytes(range(32))
    shares = secagg.split(secret, range(7), secagg.threshold(7))
    assert secagg.threshold(7) == 4
    assert secagg.combine({h: shares[h] for h in (0, 3, 5, 6)}) == secret
    assert secagg.combine({h: shares[h] for h in (1, 2, 4, 6)}) == secret
    with pytest.raises(ValueError):  # 3 shares of a degree-3 polynomial: a random point
        secagg.combine({h: shares[h] for h in (0, 1, 2)})


def test_sealed_shares_open_only_for_their_holder_round_and_sender():
    a, b, c = secagg.keypair(), secagg.keypair(), secagg.keypair()
    sealed = secagg.seal(a.secret, b.public, secagg.share_aad(4, 0, 1), b"x" * 132)
    assert len(sealed) == secagg.SEALED_BYTES
    assert secagg.unseal(b.secret, a.public, secagg.share_aad(4, 0, 1), sealed) == b"x" * 132
    assert secagg.unseal(b.secret, a.public, secagg.share_aad(5, 0, 1), sealed) is None
    assert secagg.unseal(c.secret, a.public, secagg.share_aad(4, 0, 1), sealed) is None


def test_pair_seeds_agree_from_either_side():
    a, b = secagg.keypair(), secagg.keypair()
    assert secagg.pair_seed(a.secret, b.public, 2, 0, 1) == secagg.pair_seed(
        b.secret, a.public, 2, 1, 0
    )
    assert secagg.pair_seed(a.secret, b.public, 2, 0, 1) != secagg.pair_seed(
        a.secret, b.public, 3, 0, 1
    )


# -- the machines ---------------------------------------------------------------------

N, D = 5, 64
COORD = N  # the coordinator's sender id
EXPECT = wire.Expect("s", N, {"params": (D,), "masked": (D,)}, {"masked": "uint32"})


def _decoded(send: Send, sender: int) -> wire.Message:
    """`send` through the real codec, as its receiver sees it."""
    arrays = dict(send.arrays) if send.arrays else None
    frames = wire.encode(send.type, sender, send.round, "s", send.meta, arrays)
    return wire.decode(frames, EXPECT)


class Net:
    """A server machine and N secure peers, wired in process (no clients' other logic)."""

    def __init__(self, auth=False, **overrides):
        settings = {"peers": N, "rounds": 2, "seed": 1, "min_peers": N, "min_updates": 2}
        settings |= {"secagg_range": RANGE, "peer_timeout_s": 2.0} | overrides
        self.server = FedAvgServer(ServerConfig(**settings), np.zeros(D, np.float32), 0.0)
        static = {u: secagg.keypair() for u in range(N)}  # stand-ins for CurveZMQ pairs
        publics = {u: k.public for u, k in static.items()}
        self.peers = {
            u: SecAggPeer(u, RANGE, KeyAuth(static[u].secret, publics) if auth else None)
            for u in range(N)
        }
        self.relay = lambda send: send  # what the server does to a send on its way
        self.samples = {u: 10 * (u + 1) for u in range(N)}
        self.deltas = np.random.default_rng(3).normal(0, 0.05, (N, D))
        self.dead: set[int] = set()
        self.refusals: list[str] = []
        self.now = 0.0

    def to_server(self, sender, type_, round_, meta, arrays=None, channel="control"):
        send = Send(-1, type_, round_, meta, arrays, channel)
        origin = None if channel == "updates" else bytes([sender])
        msg = _decoded(send, sender)
        return self.deliver(self.server.feed(Received(msg, origin=origin), self.now))

    def join(self, answer=True):
        """Every peer says hello; the round starts; they answer it unless not `answer`."""
        for u in range(N):
            msg = _decoded(Send(-1, "hello", 0, {"samples": self.samples[u]}), u)
            sends = self.server.feed(Received(msg, origin=bytes([u])), self.now)
            if answer:
                self.deliver(sends)

    def deliver(self, sends):
        """Carry the server's sends to the live peers; their replies back, recursively."""
        for s in sends:
            if s.to in self.dead or s.type not in ("start_round", "secagg"):
                continue
            msg = _decoded(self.relay(s), COORD)
            u, peer = s.to, self.peers[s.to]
            if s.type == "start_round":
                self.to_server(u, "secagg", msg.round, peer.keys(msg.round, self.samples[u]))
                continue
            step = msg.meta["step"]
            reply = None
            if step == "roster":
                reply = peer.roster(msg.round, msg.meta)
            elif step == "unmask":
                reply = peer.unmask(msg.round, msg.meta)
            elif (why := peer.shares(msg.round, msg.meta)) is not None:
                reply = why
            else:
                if u in self.crash_after_masking:
                    self.dead.add(u)
                    continue
                q = peer.masked_input(msg.round, self.deltas[u])
                meta = {"loss": 0.1, "out_of_range": q.out_of_range}
                self.to_server(u, "update", msg.round, meta, {"masked": q.values}, "updates")
            if isinstance(reply, str):
                self.refusals.append(reply)
            elif reply is not None:
                self.to_server(u, "secagg", msg.round, reply)

    crash_after_masking: frozenset[int] = frozenset()

    def tick(self, dt):
        self.now += dt
        for u in set(range(N)) - self.dead:
            beat = Received(_decoded(Send(-1, "heartbeat", 0), u), origin=bytes([u]))
            self.deliver(self.server.feed(beat, self.now))
        self.deliver(self.server.tick(self.now))


def _weighted(net, ids):
    w = np.array([net.samples[u] for u in ids], float)
    return np.average(net.deltas[ids], axis=0, weights=w)


def test_secure_round_closes_with_the_weighted_mean_of_every_update():
    net = Net()
    net.join()
    net.deliver(net.server.tick(0.0))
    closed = net.server.closing
    assert closed is not None and closed.closed_by == "all_in" and net.refusals == []
    got = closed.secure.mean_update()
    want = _weighted(net, list(range(N)))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5
    assert closed.participants == list(range(N)) and closed.secure.dropped_secrets == {}
    masked = np.asarray(closed.updates[0].params)
    assert masked.dtype == np.uint32 and not np.allclose(masked, 0)


def test_a_peer_dead_after_masking_is_recovered_and_the_others_sum_is_right():
    """Round 1 starts with peers 0-3 (t = 3); peer 3 dies once its masks are fixed; peer
    4 joins late and is sampled in round 2 with the three survivors."""
    net = Net(min_peers=4)
    net.crash_after_masking = frozenset({3})
    net.join()
    with capture_logs() as logs:
        net.deliver(net.server.tick(0.0))
        assert net.server.closing is None  # waiting for peer 3's masked input
        for _ in range(10):
            net.tick(0.5)
            if net.server.closing is not None:
                break
    closed = net.server.closing
    assert closed is not None and closed.closed_by == "early"
    assert closed.participants == [0, 1, 2] and closed.missing == [3]
    assert sorted(closed.secure.dropped_secrets) == [3] and closed.secure.threshold == 3
    got = closed.secure.mean_update()
    want = _weighted(net, [0, 1, 2])
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5
    assert any(e["event"] == "secagg_dropped" and e["dropped"] == [3] for e in logs)
    assert net.server.close_round(net.server.model, net.now) == []  # the next round goes on
    net.deliver(net.server.tick(net.now))  # round 2, with the four left
    assert net.server.open.sampled == (0, 1, 2, 4) and net.server.closing.closed_by == "all_in"


def test_too_few_survivors_close_the_round_without_unmasking_anything():
    net = Net()
    net.crash_after_masking = frozenset({0, 1, 2})  # 2 of 5 left: under t = 3
    net.join()
    with capture_logs() as logs:
        net.deliver(net.server.tick(0.0))
        for _ in range(10):
            net.tick(0.5)
    closed = net.server.closing
    assert closed is not None and closed.closed_by == "quorum_missed" and closed.secure is None
    assert "2 masked inputs, 3 needed" in closed.secure_failure
    assert not any(e.get("step") == "unmask" for e in logs)
    assert all(p.mine.answered is False for p in net.peers.values())


def test_a_peer_never_gives_both_secrets_of_one_peer():
    net = Net()
    net.join()
    net.deliver(net.server.tick(0.0))
    peer = net.peers[0]
    m = peer.mine
    assert m.answered  # it answered the real request once
    again = {"step": "unmask", "survivors": [0, 1, 2], "dropped": [3, 4]}
    assert peer.unmask(1, again) == "a second secagg unmask request for this round"
    m.answered = False
    overlap = {"step": "unmask", "survivors": [0, 1, 2, 3], "dropped": [3, 4]}
    assert "does not split" in peer.unmask(1, overlap)
    few = {"step": "unmask", "survivors": [0, 1], "dropped": [2, 3, 4]}
    assert "too few survivors" in peer.unmask(1, few)


def test_keys_vouched_for_by_long_term_keys_go_through():
    net = Net(auth=True)
    net.join()
    closed = net.server.closing
    assert closed is not None and closed.closed_by == "all_in" and net.refusals == []
    want = _weighted(net, list(range(N)))
    assert np.linalg.norm(closed.secure.mean_update() - want) / np.linalg.norm(want) <= 1e-5


def test_a_relay_that_swaps_a_peers_keys_is_refused():
    """A malicious server puts its own keys for peer 3 in the roster it relays to the
    others: each of them sees peer 3's tag fail and sends no shares, so the round fails
    without a secret; without long-term keys the swap would have gone through."""
    fake = secagg.keypair().public

    def swap(send):
        if send.meta.get("step") != "roster" or send.to == 3:
            return send
        peers = [[u, c, fake if u == 3 else s, w, t] for u, c, s, w, t in send.meta["peers"]]
        return Send(send.to, send.type, send.round, {"step": "roster", "peers": peers})

    for auth in (True, False):
        net = Net(auth=auth)
        net.relay = swap
        net.join()
        for _ in range(80):
            net.tick(0.5)
        refused = [r for r in net.refusals if "keys of peer 3 are not vouched for" in r]
        if auth:
            assert len(refused) == N - 1
            assert net.server.closing.closed_by == "quorum_missed"
            assert "1 peers sent shares" in net.server.closing.secure_failure
        else:  # it went through unnoticed: the masks with peer 3 no longer cancel
            closed = net.server.closing
            assert refused == [] and closed.closed_by == "all_in"
            want = _weighted(net, list(range(N)))
            error = np.linalg.norm(closed.secure.mean_update() - want) / np.linalg.norm(want)
            assert error > 1.0


def test_bad_secagg_messages_are_dropped_with_a_reason():
    net = Net()
    net.join(answer=False)  # start_round went out; nobody answered yet
    with capture_logs() as logs:
        bad_keys = {"step": "keys", "c": b"short", "s": b"x" * 32, "samples": 3}
        net.to_server(0, "secagg", 1, bad_keys)
        net.to_server(1, "secagg", 1, {"step": "shares", "to": []})
        net.to_server(2, "secagg", 7, {"step": "keys"})
        nested: list = []
        for _ in range(50):
            nested = [nested]
        net.to_server(3, "secagg", 1, {"step": nested})
    reasons = [e["reason"] for e in logs if e["event"] == "message_dropped"]
    assert reasons == [
        "secagg keys are not two 32-byte public keys",
        "secagg step 'shares' does not fit the round's step 'keys'",
        "secagg message for round 7, no secure round of it is open",
        "secagg step <a list> does not fit the round's step 'keys'",
    ]


def test_a_full_roster_fits_the_header_bounds():
    """200 peers: the roster and one peer's shares pass the wire's size limits."""
    peers = [[u, b"c" * 32, b"s" * 32, 2**31 - 1] for u in range(MAX_PEERS)]
    roster = Send(0, "secagg", 1, {"step": "roster", "peers": peers})
    assert _decoded(roster, COORD).meta["peers"][-1][0] == MAX_PEERS - 1
    to = [[v, b"x" * secagg.SEALED_BYTES] for v in range(MAX_PEERS - 1)]
    assert len(_decoded(Send(0, "secagg", 1, {"step": "shares", "to": to}), 0).meta["to"]) == 199
