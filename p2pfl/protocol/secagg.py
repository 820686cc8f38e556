"""Secure aggregation's message flow (Bonawitz et al., CCS 2017), server and peer, sans-I/O.

A secure round runs inside a FedAvg round, after start_round. Every message is a
`secagg` message on the control channel with `meta.step`, except the masked input,
which is an `update` carrying the array `masked` (uint32) on the update channel:

1. keys (peer → server): two fresh X25519 public keys, `c` (to seal shares) and `s`
   (to agree masks), and the peer's sample count. The server waits for every sampled
   peer (or `keys_s`); those that answered are U1.
2. roster (server → U1): every member of U1 with its keys and FedAvg weight. Each peer
   draws its self-mask seed b, splits b and its mask key's secret into Shamir shares
   (threshold t = ⌊|U1|/2⌋ + 1, one share per member of U1, its own kept), seals each
   to its holder and sends them back (shares, peer → server). Senders are U2.
3. shares (server → U2): each peer gets the sealed shares addressed to it. The masks
   are now fixed: it sends `q(w/W · Δ) + PRG(b) + Σ ±PRG(s_uv)` over U2 (masked).
   Senders are U3 (the survivors); U2 \\ U3 dropped out after fixing their masks.
4. unmask (server → U3): who survived and who dropped. Each survivor answers once,
   only for a consistent split of U2, with its shares of the survivors' b and of the
   dropped peers' mask keys (never both for one peer). With t answers the server
   rebuilds those secrets and unmasks the sum; nothing else is ever unmasked.

A round that falls below its floor (U1 under 3, U2 or U3 under t or `min_updates`, or
fewer than t unmask answers) closes `quorum_missed`: the global model is kept and no
secret is asked for. In the masked and unmask steps, where the peers are idle and
heartbeat, an awaited peer that goes silent for `peer_timeout_s` is given up at once.

The server is trusted to follow the protocol (honest but curious): the keys it relays
are not signed, so an active server could stand in for peers. See README "Privacy".
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from p2pfl.core import secagg
from p2pfl.protocol import wire
from p2pfl.protocol.events import Send
from p2pfl.protocol.fedavg_rounds import MAX_SAMPLES

MAX_PEERS = 200  # a roster of more would not fit the header's bounds (256 entries, 64 KiB)
KEYS_S = 5.0  # longest wait for the sampled peers' keys (they answer before training)

Step = Literal["keys", "roster", "shares", "unmask"]
Phase = Literal["keys", "shares", "masked", "unmask", "done", "failed"]
Logger = Any


def _pairs(value: Any, length: int, allowed: Collection[int]) -> dict[int, bytes] | None:
    """`[[id, bytes], ...]` with distinct ids from `allowed` and `length`-byte values."""
    if not isinstance(value, list):
        return None
    out: dict[int, bytes] = {}
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 2 and wire.is_int(pair[0])):
            return None
        who, data = pair
        if who in out or who not in allowed or not isinstance(data, bytes):
            return None
        if len(data) != length:
            return None
        out[who] = data
    return out


def _ids(value: Any) -> list[int] | None:
    """A list of distinct ints, sorted; None if `value` is not one."""
    if not isinstance(value, list) or not all(wire.is_int(x) for x in value):
        return None
    return sorted(value) if len(set(value)) == len(value) else None


@dataclass(frozen=True)
class Advert:
    """A peer's keys for one round and its FedAvg weight."""

    c: bytes  # seals the shares sent to it
    s: bytes  # agrees its pairwise masks
    weight: int
    samples: int = 0  # what it trains on (the server's only; weight is what counts)


@dataclass(frozen=True)
class SecureSum:
    """A secure round's masked inputs and the secrets that unmask their sum."""

    round: int
    inputs: Mapping[int, np.ndarray | wire.Chunked]  # the survivors' masked inputs
    self_seeds: Mapping[int, bytes]  # each survivor's b, rebuilt from shares
    dropped_secrets: Mapping[int, bytes]  # each dropped peer's mask key, rebuilt
    mask_publics: Mapping[int, bytes]  # every member of U2's mask public key
    scale: float
    share: float  # Σ w_u / W over the survivors
    threshold: int
    fixed: int  # |U2|: the peers whose masks are in the inputs
    out_of_range: int  # coordinates the survivors reported saturated

    def mean_update(self) -> np.ndarray:
        """The survivors' weighted mean update (float64): only their sum is unmasked."""
        inputs = {u: np.asarray(x) for u, x in self.inputs.items()}
        total = secagg.unmask(
            inputs, self.self_seeds, self.dropped_secrets, self.mask_publics, self.round
        )
        return secagg.dequantise(total, self.scale, self.share)


@dataclass
class SecAggRound:
    """The server's side of one secure round (after start_round went to `sampled`).

    Feed it the peers' `secagg` messages (`on_message`) and masked inputs
    (`on_masked`); `advance` moves it on when everyone awaited answered, an awaited
    peer is gone, or the step's deadline passed, and returns the sends of the next
    step. `result` is set when it is done, `failure` when it failed.
    """

    round: int
    sampled: tuple[int, ...]
    range_: float
    uniform: bool  # centralized.weighting = "uniform"
    min_updates: int
    now: float
    round_deadline: float  # the shares come after training: they may take this long
    step_s: float  # the masked and unmask steps each get this long
    log: Logger
    phase: Phase = "keys"
    deadline: float = 0.0
    awaited: set[int] = field(default_factory=set)
    adverts: dict[int, Advert] = field(default_factory=dict)
    shares: dict[int, dict[int, bytes]] = field(default_factory=dict)  # from -> to -> sealed
    masked: dict[int, wire.Chunked | np.ndarray] = field(default_factory=dict)
    losses: dict[int, float | None] = field(default_factory=dict)
    out_of_range: int = 0
    answers: dict[int, tuple[dict[int, bytes], dict[int, bytes]]] = field(default_factory=dict)
    survivors: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    result: SecureSum | None = None
    failure: str | None = None
    timed_out: bool = False  # a step moved on at its deadline with peers still awaited

    def __post_init__(self) -> None:
        self.awaited = set(self.sampled)
        self.deadline = min(self.now + KEYS_S, self.round_deadline)

    @property
    def finished(self) -> bool:
        """Done or failed: the FedAvg round can close."""
        return self.phase in ("done", "failed")

    @property
    def threshold(self) -> int:
        """Shares needed to rebuild a secret (fixed once the roster went out)."""
        return secagg.threshold(len(self.adverts))

    @property
    def weights(self) -> dict[int, int]:
        """The FedAvg weight of each survivor (once done)."""
        return {u: self.adverts[u].weight for u in self.survivors}

    def forget(self, peer: int) -> None:
        """`peer` left or restarted: nothing more is awaited from it."""
        self.awaited.discard(peer)

    # -- messages -----------------------------------------------------------------------

    def on_message(self, sender: int, meta: Mapping[str, Any]) -> str | None:
        """A `secagg` message from a member; None if kept, else why it is dropped."""
        step = meta.get("step")
        if sender not in self.awaited:
            return f"secagg {step!r} from a peer not awaited in this step"
        if step == "keys" and self.phase == "keys":
            return self._on_keys(sender, meta)
        if step == "shares" and self.phase == "shares":
            return self._on_shares(sender, meta)
        if step == "unmask" and self.phase == "unmask":
            return self._on_unmask(sender, meta)
        return f"secagg step {_show_step(step)} does not fit the round's step {self.phase!r}"

    def _on_keys(self, sender: int, meta: Mapping[str, Any]) -> str | None:
        c, s, samples = meta.get("c"), meta.get("s"), meta.get("samples")
        if not all(isinstance(k, bytes) and len(k) == secagg.KEY_BYTES for k in (c, s)):
            return "secagg keys are not two 32-byte public keys"
        if not (wire.is_int(samples) and 1 <= samples <= MAX_SAMPLES):
            return "meta.samples missing or out of range"
        assert isinstance(c, bytes) and isinstance(s, bytes)
        self.adverts[sender] = Advert(c, s, 1 if self.uniform else samples, samples)
        self.awaited.discard(sender)
        return None

    def _on_shares(self, sender: int, meta: Mapping[str, Any]) -> str | None:
        others = set(self.adverts) - {sender}
        to = _pairs(meta.get("to"), secagg.SEALED_BYTES, others)
        if to is None or set(to) != others:
            return "secagg shares are not one sealed share for every other roster member"
        self.shares[sender] = to
        self.awaited.discard(sender)
        return None

    def on_masked(self, sender: int, values: wire.Chunked, meta: Mapping[str, Any]) -> str | None:
        """A masked input (an `update` carrying `masked`); None if kept, else why not."""
        over, loss = meta.get("out_of_range"), meta.get("loss")
        if self.phase != "masked" or sender not in self.awaited:
            return "masked update from a peer not awaited in this step"
        if values.dtype != np.uint32:
            return "masked update is not uint32"
        if not (wire.is_int(over) and 0 <= over <= values.size):
            return "meta.out_of_range missing or out of range"
        if loss is not None and not (isinstance(loss, float) and np.isfinite(loss)):
            return "meta.loss is not a finite float"
        self.masked[sender] = values
        self.losses[sender] = loss
        self.out_of_range += over
        self.awaited.discard(sender)
        return None

    def _on_unmask(self, sender: int, meta: Mapping[str, Any]) -> str | None:
        b = _pairs(meta.get("b"), secagg.SHARE_BYTES, self.survivors)
        s = _pairs(meta.get("s"), secagg.SHARE_BYTES, self.dropped)
        if b is None or s is None or set(b) != set(self.survivors) or set(s) != set(self.dropped):
            return "secagg unmask answer does not give exactly the shares asked for"
        self.answers[sender] = (b, s)
        self.awaited.discard(sender)
        return None

    # -- time ---------------------------------------------------------------------------

    def advance(self, now: float, fresh: Collection[int]) -> list[Send]:
        """Move on if nothing awaited is missing, or the step's time is up; the sends of
        the next step (`fresh`: members heard within peer_timeout_s)."""
        if self.phase in ("masked", "unmask"):  # the peers idle and heartbeat here
            self.awaited &= set(fresh)
        if self.finished or (self.awaited and now < self.deadline):
            return []
        if self.awaited:
            self.timed_out = True
            self.log.warning("secagg_step_timeout", step=self.phase, missing=sorted(self.awaited))
        if self.phase == "keys":
            return self._roster(now)
        if self.phase == "shares":
            return self._forward(now)
        if self.phase == "masked":
            return self._ask_unmask(now)
        self._unmask()
        return []

    def _fail(self, reason: str) -> list[Send]:
        self.phase, self.failure = "failed", reason
        self.log.warning("secagg_failed", reason=reason, round=self.round)
        return []

    def _roster(self, now: float) -> list[Send]:
        u1 = sorted(self.adverts)
        if len(u1) < max(secagg.MIN_PEERS, self.min_updates):
            need = max(secagg.MIN_PEERS, self.min_updates)
            return self._fail(f"{len(u1)} peers sent keys, {need} needed")
        self.phase, self.awaited, self.deadline = "shares", set(u1), self.round_deadline
        peers = [[u, a.c, a.s, a.weight] for u, a in sorted(self.adverts.items())]
        meta = {"step": "roster", "peers": peers}
        return [Send(u, "secagg", self.round, meta) for u in u1]

    def _forward(self, now: float) -> list[Send]:
        u2 = sorted(self.shares)
        if len(u2) < max(self.threshold, self.min_updates):
            return self._fail(f"{len(u2)} peers sent shares, {self.threshold} needed")
        self.phase, self.awaited, self.deadline = "masked", set(u2), now + self.step_s
        out = []
        for v in u2:
            got = [[u, self.shares[u][v]] for u in u2 if u != v]
            out.append(Send(v, "secagg", self.round, {"step": "shares", "from": got}))
        return out

    def _ask_unmask(self, now: float) -> list[Send]:
        self.survivors = sorted(self.masked)
        self.dropped = sorted(set(self.shares) - set(self.masked))
        if len(self.survivors) < max(self.threshold, self.min_updates):
            return self._fail(f"{len(self.survivors)} masked inputs, {self.threshold} needed")
        if self.dropped:
            self.log.warning("secagg_dropped", dropped=self.dropped, round=self.round)
        self.phase, self.awaited = "unmask", set(self.survivors)
        self.deadline = now + self.step_s
        meta = {"step": "unmask", "survivors": self.survivors, "dropped": self.dropped}
        return [Send(u, "secagg", self.round, meta) for u in self.survivors]

    def _unmask(self) -> None:
        t = self.threshold
        if len(self.answers) < t:
            self._fail(f"{len(self.answers)} unmask answers, {t} needed")
            return
        try:
            seeds = {u: self._rebuild(u, 0) for u in self.survivors}
            keys = {d: self._rebuild(d, 1) for d in self.dropped}
        except ValueError as exc:
            self._fail(str(exc))
            return
        total = sum(self.adverts[u].weight for u in self.adverts)
        self.result = SecureSum(
            round=self.round,
            inputs=dict(self.masked),
            self_seeds=seeds,
            dropped_secrets=keys,
            mask_publics={u: self.adverts[u].s for u in self.shares},
            scale=secagg.scale_for(self.range_, len(self.adverts)),
            share=sum(self.weights.values()) / total,
            threshold=t,
            fixed=len(self.shares),
            out_of_range=self.out_of_range,
        )
        self.phase = "done"

    def _rebuild(self, peer: int, which: int) -> bytes:
        """Peer `peer`'s b (`which` 0) or mask key (1) from the answers' shares."""
        shares = {h: a[which][peer] for h, a in self.answers.items()}
        return secagg.combine(dict(sorted(shares.items())[: self.threshold]))


def _show_step(value: Any) -> str:
    """A short rendering of an untrusted step name."""
    return repr(value[:20]) if isinstance(value, str) else f"<a {type(value).__name__}>"


# -- the peer's side ----------------------------------------------------------------------


@dataclass
class _Mine:
    """What a peer holds for its current secure round."""

    round: int
    c: secagg.KeyPair
    s: secagg.KeyPair
    roster: dict[int, Advert] = field(default_factory=dict)
    b: bytes = b""
    kept: tuple[bytes, bytes] = (b"", b"")  # its own shares of b and of s
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # u -> shares of b_u, s_u
    fixed: list[int] = field(default_factory=list)  # U2 as this peer saw it
    answered: bool = False


class SecAggPeer:
    """One peer's side of its secure rounds: keys, shares, its masked input, one answer.

    Args:
        me: this peer's id.
        range_: the declared clipping range of each coordinate of the update.
    """

    def __init__(self, me: int, range_: float) -> None:
        self.me = me
        self.range_ = range_
        self.mine: _Mine | None = None

    def keys(self, round_: int, samples: int) -> dict[str, Any]:
        """Fresh keys for `round_` (what step 1 sends); forgets any older round."""
        self.mine = _Mine(round_, secagg.keypair(), secagg.keypair())
        return {
            "step": "keys",
            "c": self.mine.c.public,
            "s": self.mine.s.public,
            "samples": samples,
        }

    def _current(self, round_: int) -> _Mine | str:
        m = self.mine
        if m is None or m.round != round_:
            return f"secagg message for round {round_}, not our secure round"
        return m

    def roster(self, round_: int, meta: Mapping[str, Any]) -> dict[str, Any] | str:
        """The shares message for the server's roster, or why the roster is refused."""
        m = self._current(round_)
        if isinstance(m, str):
            return m
        roster = _roster(meta.get("peers"))
        if roster is None:
            return "secagg roster is not a list of [id, c, s, weight]"
        mine = roster.get(self.me)
        if mine is None or (mine.c, mine.s) != (m.c.public, m.s.public):
            return "secagg roster does not carry our keys"
        if not secagg.MIN_PEERS <= len(roster) <= MAX_PEERS:
            return f"secagg roster of {len(roster)} peers is outside 3..{MAX_PEERS}"
        if m.roster:
            return "a second secagg roster for this round"
        m.roster, m.b = roster, secrets.token_bytes(secagg.KEY_BYTES)
        t = secagg.threshold(len(roster))
        b_shares = secagg.split(m.b, roster, t)
        s_shares = secagg.split(m.s.secret, roster, t)
        m.kept = (b_shares[self.me], s_shares[self.me])
        to = []
        for v, advert in sorted(roster.items()):
            if v != self.me:
                aad = secagg.share_aad(round_, self.me, v)
                sealed = secagg.seal(m.c.secret, advert.c, aad, b_shares[v] + s_shares[v])
                to.append([v, sealed])
        return {"step": "shares", "to": to}

    def shares(self, round_: int, meta: Mapping[str, Any]) -> str | None:
        """Open the shares the others sealed for us; None if all opened, else why not."""
        m = self._current(round_)
        if isinstance(m, str):
            return m
        if not m.roster or m.fixed:
            return "secagg shares out of order"
        got = _pairs(meta.get("from"), secagg.SEALED_BYTES, set(m.roster) - {self.me})
        if got is None or len(got) + 1 < secagg.threshold(len(m.roster)):
            return "secagg shares are not sealed shares from enough roster members"
        for u, sealed in got.items():
            aad = secagg.share_aad(round_, u, self.me)
            plain = secagg.unseal(m.c.secret, m.roster[u].c, aad, sealed)
            if plain is None or len(plain) != 2 * secagg.SHARE_BYTES:
                return f"secagg share from peer {u} does not open"
            m.held[u] = (plain[: secagg.SHARE_BYTES], plain[secagg.SHARE_BYTES :])
        m.fixed = sorted([*got, self.me])
        return None

    def masked_input(self, round_: int, delta: np.ndarray) -> secagg.Quantised | str:
        """Our masked input: the update's share in fixed point plus every mask (mod 2³²)."""
        m = self._current(round_)
        if isinstance(m, str):
            return m
        if not m.fixed:
            return "no secagg shares yet: the masks are not fixed"
        total = sum(a.weight for a in m.roster.values())
        scale = secagg.scale_for(self.range_, len(m.roster))
        q = secagg.quantise(delta, m.roster[self.me].weight / total, scale, self.range_)
        others = {v: m.roster[v].s for v in m.fixed if v != self.me}
        values = secagg.masked(q.values, m.b, m.s.secret, others, self.me, round_)
        return q._replace(values=values)

    def unmask(self, round_: int, meta: Mapping[str, Any]) -> dict[str, Any] | str:
        """Our one answer: shares of the survivors' b and the dropped peers' mask keys."""
        m = self._current(round_)
        if isinstance(m, str):
            return m
        survivors, dropped = _ids(meta.get("survivors")), _ids(meta.get("dropped"))
        if m.answered:
            return "a second secagg unmask request for this round"
        if survivors is None or dropped is None or not m.fixed:
            return "secagg unmask request without survivors and dropped"
        if set(survivors) & set(dropped) or sorted(survivors + dropped) != m.fixed:
            return "secagg unmask request does not split the peers that fixed masks"
        if self.me not in survivors or len(survivors) < secagg.threshold(len(m.roster)):
            return "secagg unmask request names too few survivors"
        m.answered = True
        held = {**m.held, self.me: m.kept}
        return {
            "step": "unmask",
            "b": [[u, held[u][0]] for u in survivors],
            "s": [[d, held[d][1]] for d in dropped],
        }


def _roster(value: Any) -> dict[int, Advert] | None:
    """`[[id, c, s, weight], ...]` as adverts by id, or None if malformed."""
    if not isinstance(value, list):
        return None
    out: dict[int, Advert] = {}
    for entry in value:
        if not (isinstance(entry, list) and len(entry) == 4):
            return None
        u, c, s, w = entry
        keys_ok = all(isinstance(k, bytes) and len(k) == secagg.KEY_BYTES for k in (c, s))
        if not (wire.is_int(u) and u not in out and keys_ok and wire.is_int(w) and w >= 1):
            return None
        out[u] = Advert(c, s, w)
    return out
