"""Secure aggregation, the server's side: one secure round's steps and what unmasks it.

The message flow is `p2pfl.protocol.secagg`'s docstring; this module is the server's
machine for one round (`SecAggRound`: no socket, no clock, every call takes `now`) and
the secrets it ends with (`SecureSum`), which the runtime turns into the new global
model. The FedAvg server (`fedavg_server`) creates one per secure round.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from p2pfl.core import secagg
from p2pfl.protocol import wire
from p2pfl.protocol.events import Send
from p2pfl.protocol.fedavg_rounds import MAX_SAMPLES, ClosedBy, ClosedRound, Update
from p2pfl.protocol.secagg import KEYS_S, MAX_PEERS, Advert, pairs

Phase = Literal["keys", "shares", "masked", "unmask", "done", "failed"]
Logger = Any


def summary(
    fixed: int,
    survivors: int,
    recovered: Iterable[int],
    threshold: int,
    scale: float,
    out_of_range: int,
) -> dict[str, object]:
    """A secure round as its coordinator line records it (the server's and the
    simulator's): masks fixed, survivors, peers whose masks were recovered, the
    threshold, the fixed-point scale and the coordinates clipped to the range."""
    return {
        "fixed": fixed,
        "survivors": survivors,
        "recovered": sorted(recovered),
        "threshold": threshold,
        "scale": scale,
        "out_of_range": out_of_range,
    }


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

    def summary(self) -> dict[str, object]:
        """This round as its coordinator line records it."""
        survivors, recovered = len(self.inputs), self.dropped_secrets
        return summary(
            self.fixed, survivors, recovered, self.threshold, self.scale, self.out_of_range
        )

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

    def closed(
        self, connected: tuple[int, ...], started: float, quorum_wait_s: float, last: bool
    ) -> ClosedRound:
        """The FedAvg round this secure round finished: the survivors' masked inputs as
        its updates (never to be averaged) and the secrets in `secure`."""
        closed_by: ClosedBy = "quorum_missed"
        updates: dict[int, Update] = {}
        if self.result is not None:
            closed_by = "all_in" if len(self.survivors) == len(self.sampled) else "early"
            if self.timed_out and closed_by == "early":
                closed_by = "deadline"
            updates = {
                u: Update(self.masked[u], self.adverts[u].samples, self.losses[u])
                for u in self.survivors
            }
        return ClosedRound(
            round=self.round,
            closed_by=closed_by,
            sampled=self.sampled,
            connected=connected,
            updates=updates,
            weights={u: float(w) for u, w in self.weights.items()} if self.result else {},
            started=started,
            quorum_wait_s=quorum_wait_s,
            last=last,
            secure=self.result,
            secure_failure=self.failure,
        )

    def forget(self, peer: int) -> None:
        """`peer` left or restarted: nothing more is awaited from it."""
        self.awaited.discard(peer)

    # -- messages -----------------------------------------------------------------------

    def on_message(self, sender: int, meta: Mapping[str, Any]) -> str | None:
        """A `secagg` message from a member; None if kept, else why it is dropped."""
        step = meta.get("step")
        if sender not in self.awaited:
            return f"secagg {_show_step(step)} from a peer not awaited in this step"
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
        tags = pairs(meta.get("tags", []), secagg.TAG_BYTES, range(MAX_PEERS))
        if tags is None:
            return "secagg key tags are not a list of [peer id, 16 bytes]"
        assert isinstance(c, bytes) and isinstance(s, bytes)
        weight = 1 if self.uniform else samples
        self.adverts[sender] = Advert(c, s, weight, samples, tags)
        self.awaited.discard(sender)
        return None

    def _on_shares(self, sender: int, meta: Mapping[str, Any]) -> str | None:
        others = set(self.adverts) - {sender}
        to = pairs(meta.get("to"), secagg.SEALED_BYTES, others)
        if to is None or set(to) != others:
            return "secagg shares are not one sealed share for every other roster member"
        self.shares[sender] = to
        self.awaited.discard(sender)
        return None

    def on_masked(self, msg: wire.Message) -> str | None:
        """A masked input (an `update` carrying `masked`); None if kept, else why not."""
        sender, meta, values = msg.sender, msg.meta, msg.arrays.get("masked")
        over, loss = meta.get("out_of_range"), meta.get("loss")
        if values is None:
            return "secure round: update without masked"
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
        b = pairs(meta.get("b"), secagg.SHARE_BYTES, self.survivors)
        s = pairs(meta.get("s"), secagg.SHARE_BYTES, self.dropped)
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
        out = []
        for v in u1:  # each gets the tags that vouch for the others' keys to it
            peers = [[u, a.c, a.s, a.weight, a.tags.get(v, b"")] for u, a in self.adverts.items()]
            out.append(Send(v, "secagg", self.round, {"step": "roster", "peers": sorted(peers)}))
        return out

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
