"""Secure aggregation's message flow (Bonawitz et al., CCS 2017), server and peer, sans-I/O.

A secure round runs inside a FedAvg round, after start_round. Every message is a
`secagg` message on the control channel with `meta.step`, except the masked input,
which is an `update` carrying the array `masked` (uint32) on the update channel:

1. keys (peer → server): two fresh X25519 public keys, `c` (to seal shares) and `s`
   (to agree masks), the peer's sample count and (with long-term keys) a tag for each
   other peer. The server waits for every sampled peer (or `KEYS_S`); those that
   answered are U1.
2. roster (server → U1): every member of U1 with its keys, FedAvg weight and its tag
   for the receiver (a peer with long-term keys refuses keys not vouched for). Each peer
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

With long-term keys (`[security] keys`) each peer's round keys carry a tag for every
other peer (an HMAC under the key their CurveZMQ pairs agree on), and a roster whose
keys are not vouched for is refused: the server can neither invent peers nor swap
their keys. In clear it is trusted to relay them as sent. See README "Privacy".

This module holds what both sides share (the bounds, how the lists in a step's meta
are checked) and the peer's side, `SecAggPeer`; the server's is `secagg_server`.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from p2pfl.core import secagg
from p2pfl.protocol import wire

MAX_PEERS = 200  # a roster of more would not fit the header's bounds (256 entries, 64 KiB)
KEYS_S = 5.0  # longest wait for the sampled peers' keys (they answer before training)


def pairs(value: Any, length: int, allowed: Collection[int]) -> dict[int, bytes] | None:
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


def ids(value: Any) -> list[int] | None:
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
    tags: Mapping[int, bytes] = field(default_factory=dict)  # to peer v: its key tag for v


class KeyAuth(NamedTuple):
    """A peer's long-term X25519 keys (its CurveZMQ pair, raw): its secret and every
    peer's public key, which vouch for the round keys (`secagg.key_tag`)."""

    secret: bytes
    publics: Mapping[int, bytes]


# -- the peer's side -------------------------------------------------------------------


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
        auth: its long-term keys (with `[security] keys`): then its round keys go out
            with a tag for every other peer, and a roster whose keys are not vouched
            for by their owners' tags is refused. None: the server is trusted to relay
            the keys as they were sent.
    """

    def __init__(self, me: int, range_: float, auth: KeyAuth | None = None) -> None:
        self.me = me
        self.range_ = range_
        self.mine: _Mine | None = None
        self._auth: dict[int, bytes] = {}  # peer -> the key we share with it
        if auth is not None:
            self._auth = {
                v: secagg.auth_key(auth.secret, public)
                for v, public in auth.publics.items()
                if v != me
            }
        self.authenticated = auth is not None

    def keys(self, round_: int, samples: int) -> dict[str, Any]:
        """Fresh keys for `round_` (what step 1 sends); forgets any older round."""
        m = self.mine = _Mine(round_, secagg.keypair(), secagg.keypair())
        c, s = m.c.public, m.s.public
        out: dict[str, Any] = {"step": "keys", "c": c, "s": s, "samples": samples}
        if self.authenticated:
            tag = secagg.key_tag
            out["tags"] = [
                [v, tag(k, round_, self.me, c, s)] for v, k in sorted(self._auth.items())
            ]
        return out

    def _vouched(
        self, round_: int, roster: Mapping[int, Advert], tags: Mapping[int, bytes]
    ) -> int | None:
        """The first roster member whose keys its tag does not vouch for (None: all are)."""
        for u, a in sorted(roster.items()):
            if u == self.me:
                continue
            key = self._auth.get(u)
            want = None if key is None else secagg.key_tag(key, round_, u, a.c, a.s)
            if want is None or not hmac.compare_digest(want, tags.get(u, b"")):
                return u
        return None

    def _current(self, round_: int) -> _Mine | str:
        m = self.mine
        if m is None or m.round != round_:
            return f"secagg message for round {round_}, not our secure round"
        return m

    def _refused(
        self, m: _Mine, roster: Mapping[int, Advert], tags: Mapping[int, bytes]
    ) -> str | None:
        """Why a parsed roster is refused, or None."""
        mine = roster.get(self.me)
        if mine is None or (mine.c, mine.s) != (m.c.public, m.s.public):
            return "secagg roster does not carry our keys"
        if not secagg.MIN_PEERS <= len(roster) <= MAX_PEERS:
            return f"secagg roster of {len(roster)} peers is outside 3..{MAX_PEERS}"
        if m.roster:
            return "a second secagg roster for this round"
        if self.authenticated and (u := self._vouched(m.round, roster, tags)) is not None:
            return f"secagg roster: the keys of peer {u} are not vouched for by its own key"
        return None

    def roster(self, round_: int, meta: Mapping[str, Any]) -> dict[str, Any] | str:
        """The shares message for the server's roster, or why the roster is refused."""
        m = self._current(round_)
        if isinstance(m, str):
            return m
        parsed = _roster(meta.get("peers"))
        if parsed is None:
            return "secagg roster is not a list of [id, c, s, weight, tag]"
        roster, tags = parsed
        if (why := self._refused(m, roster, tags)) is not None:
            return why
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
        got = pairs(meta.get("from"), secagg.SEALED_BYTES, set(m.roster) - {self.me})
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
        survivors, dropped = ids(meta.get("survivors")), ids(meta.get("dropped"))
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


def _roster(value: Any) -> tuple[dict[int, Advert], dict[int, bytes]] | None:
    """`[[id, c, s, weight, tag], ...]` as adverts by id and each member's tag for us
    (empty bytes when its keys came without one), or None if malformed."""
    if not isinstance(value, list):
        return None
    out: dict[int, Advert] = {}
    tags: dict[int, bytes] = {}
    for entry in value:
        if not (isinstance(entry, list) and len(entry) == 5):
            return None
        u, c, s, w, tag = entry
        keys_ok = all(isinstance(k, bytes) and len(k) == secagg.KEY_BYTES for k in (c, s))
        tag_ok = isinstance(tag, bytes) and len(tag) in (0, secagg.TAG_BYTES)
        if not (wire.is_int(u) and u not in out and keys_ok and tag_ok):
            return None
        if not (wire.is_int(w) and w >= 1):
            return None
        out[u], tags[u] = Advert(c, s, w), tag
    return out, tags
