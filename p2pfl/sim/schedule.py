"""Which peers are up in a simulated round: `[faults] crash` as a row mask over rounds.

A gossip peer crashes on reaching its `at_round` (as the networked peer kills itself
there) and, with `rejoin_after_s`, is back at the round `config.plan.sim_plan` maps
that to. A centralized peer dies, as the networked client does, on the first
start_round of a round >= `at_round` it is sampled in: it is missing from that round
and not live after it; it rejoins as many rounds later as the gossip peer would.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np


class Schedule:
    """Crash and rejoin rounds of every peer (see the module docstring)."""

    def __init__(
        self, peers: int, crashes: Mapping[int, tuple[int, int | None]], mode: str = "gossip"
    ) -> None:
        self.peers = peers
        self._plan = dict(crashes)
        self.on_sample = mode == "centralized"
        self.down: dict[int, int] = {}  # peer -> first round it is down
        self.back: dict[int, int | None] = {}  # peer -> round it is up again (None: never)
        if not self.on_sample:
            for i, (at, rejoin) in self._plan.items():
                self.down[i], self.back[i] = at, rejoin

    def alive(self, round_: int) -> np.ndarray:
        """[peers] bool: up in round `round_`."""
        up = np.ones(self.peers, bool)
        for i, down in self.down.items():
            back = self.back[i]
            up[i] = not (down <= round_ and (back is None or round_ < back))
        return up

    def rejoining(self, round_: int) -> list[int]:
        """Peers back in round `round_` after a crash (they catch up first)."""
        return sorted(i for i, back in self.back.items() if back == round_)

    def sampled(self, round_: int, sampled: Iterable[int]) -> set[int]:
        """Centralized: the sampled peers that die on this round's start_round."""
        dying = set()
        for i in sampled:
            plan = self._plan.get(i)
            if not self.on_sample or plan is None or i in self.down or round_ < plan[0]:
                continue
            at, rejoin = plan
            self.down[i] = round_
            self.back[i] = None if rejoin is None else round_ + (rejoin - at)
            dying.add(i)
        return dying

    @property
    def crashed(self) -> list[int]:
        """Peers that crashed (whether or not they came back)."""
        return sorted(self.down)
