"""Who is alive: one tracker of last-heard times for every role (peer, client, server).

Any checked message from a party is a sign of life. A party silent for `timeout_s`
is gone; it is taken back the moment it speaks again. A party that said bye has
left: gone without an alarm. Nothing here reads a clock: every call takes `now`
(seconds on any monotonic clock), so the rules are tested with a fake one.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

Party = TypeVar("Party", bound=Hashable)  # a peer id, or "coordinator"


class Liveness(Generic[Party]):
    """Last-heard times of a set of parties and which of them are gone.

    `grace_until` lets start-up count as heard: a party not heard at all is first
    judged `timeout_s` after it (so peers that start a little apart do not declare
    each other gone before they have had a chance to speak).
    """

    def __init__(
        self, parties: Iterable[Party], timeout_s: float, grace_until: float = 0.0
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self.timeout_s = timeout_s
        self.last_heard: dict[Party, float] = dict.fromkeys(parties, grace_until)
        self.spoken: set[Party] = set()  # heard at least once
        self.gone: set[Party] = set()

    def __contains__(self, party: object) -> bool:
        return party in self.last_heard

    def add(self, party: Party, now: float) -> None:
        """Track a party from `now` on (a server's new member), as if just heard."""
        self.last_heard[party] = now
        self.gone.discard(party)

    def forget(self, party: Party) -> None:
        """Stop tracking a party altogether."""
        self.last_heard.pop(party, None)
        self.spoken.discard(party)
        self.gone.discard(party)

    def heard(self, party: Party, now: float) -> bool:
        """`party` spoke at `now`; True if it had been gone (it is back).

        The first time a party speaks ends its start-up grace: from then on its
        silence counts from when it was last heard.
        """
        if party not in self.last_heard:
            raise KeyError(party)
        first = party not in self.spoken
        self.last_heard[party] = now if first else max(now, self.last_heard[party])
        self.spoken.add(party)
        if party in self.gone:
            self.gone.discard(party)
            return True
        return False

    def left(self, party: Party) -> bool:
        """`party` said bye: gone, no alarm; True if it was not gone already."""
        if party not in self.last_heard or party in self.gone:
            return False
        self.gone.add(party)
        return True

    def silent_s(self, party: Party, now: float) -> float:
        """Seconds since `party` was last heard (negative inside the start-up grace)."""
        return now - self.last_heard[party]

    def expire(self, now: float) -> list[tuple[Party, float]]:
        """Declare gone every party silent for `timeout_s`; returns (party, silence) of
        those newly gone."""
        newly = [
            (p, now - t)
            for p, t in self.last_heard.items()
            if p not in self.gone and now - t >= self.timeout_s
        ]
        self.gone.update(p for p, _ in newly)
        return newly

    def alive(self) -> set[Party]:
        """Parties not gone (call `expire` first to judge silence up to now)."""
        return set(self.last_heard) - self.gone

    def fresh(self, now: float) -> list[Party]:
        """Parties heard within `timeout_s` of `now`, sorted, without changing any state
        (a server samples only these, and heartbeats only them)."""
        return sorted(p for p, t in self.last_heard.items() if now - t < self.timeout_s)  # type: ignore[type-var]

    def next_expiry(self, now: float, among: Iterable[Party]) -> float:
        """Seconds from `now` until the first of `among` would be declared gone (inf if none)."""
        times = [self.last_heard[p] + self.timeout_s for p in among if p in self.last_heard]
        return max(0.0, min(times) - now) if times else float("inf")
