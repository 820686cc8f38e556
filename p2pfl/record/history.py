"""Per-round records as JSON lines, saved models, and the run summary built from them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class RoundRecord:
    """One line of `peer-<id>.jsonl`; round 0 is the initial model, before any training."""

    round: int
    train_loss: float | None
    test_accuracy: float | None  # None: not evaluated this round (simulator, sim.eval_every)
    holdout_accuracy: float | None
    # measured by a networked peer; None in the simulator (no sockets, peers batched)
    bytes_sent: int | None
    bytes_received: int | None
    train_s: float | None
    eval_s: float | None
    comm_s: float | None
    wait_s: float | None
    cpu_s: float | None  # CPU time of this process in the round (round 0: all of start-up)
    neighbours_heard: list[int]
    neighbours_missing: list[int]
    disagreement: float | None
    t: float  # seconds since the peer process started
    time: float  # unix time the record was written (runs and modes share this clock)
    # what the accuracies were measured on: "initial" (round 0), "mixed" (gossip), and in
    # centralized mode "global" (the server's model after the round) or "update" (the
    # peer's own update, for a round whose global model it never received)
    evaluated_on: str
    # [privacy]: the peer's cumulative ε at the run's δ after this round (None: no DP),
    # and the mechanism steps it composes (its releases so far): with summary.json's
    # privacy block (q, noise_multiplier, delta, accountant) anyone can recompute ε
    epsilon: float | None = None
    dp_steps: int | None = None
    dp_q: float | None = None  # the sampling rate of each of those steps


@dataclass(frozen=True)
class ServerRecord:
    """One line of `coordinator.jsonl`: the global model after a round (0: the initial one)."""

    round: int
    holdout_accuracy: float | None
    holdout_loss: float | None
    train_loss: float | None  # the participants' reported losses, weighted like their models
    sampled: list[int]
    participants: list[int]  # whose updates were averaged
    missing: list[int]  # sampled, but no update by the deadline
    connected: list[int]  # peers alive when the round started
    # "all_in" | "early" (every update still expected is in: the rest left or restarted)
    # | "deadline" | "quorum_missed" (fewer than min_updates: global model kept) | "initial"
    closed_by: str
    bytes_sent: int | None  # by the coordinator, this round (None in the simulator)
    bytes_received: int | None
    quorum_wait_s: float | None  # waiting for min_peers before the round could start
    round_s: float  # from the first start_round sent to the round's close
    aggregate_s: float
    eval_s: float
    t: float  # seconds since the coordinator started
    time: float
    # secure aggregation only: masks fixed, survivors, dropped peers whose masks were
    # recovered, threshold, fixed-point scale, clipped coordinates (or why it failed)
    secagg: dict[str, object] | None = None


def as_dict(record: RoundRecord | ServerRecord) -> dict[str, Any]:
    """A record's fields as a dict (shallow: records hold numbers, strings and lists of
    ints; `dataclasses.asdict` deep-copies and costs the simulator ~0.2 ms a line)."""
    return dict(vars(record))


class HistoryWriter:
    """Appends records to a JSON-lines file, one flushed line per round."""

    def __init__(self, path: Path, append: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a" if append else "w", buffering=1)

    def write(self, record: RoundRecord | ServerRecord) -> None:
        """Append one round."""
        self._file.write(json.dumps(as_dict(record)) + "\n")

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def read(path: Path) -> list[dict[str, Any]]:
    """All complete lines of a history file (a partial last line is skipped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def save_model(path: Path, params: np.ndarray) -> None:
    """Write a flat parameter vector to `path` (npz, key `params`) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, params=np.asarray(params, dtype=np.float32))
    tmp.replace(path)


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "min": None, "max": None}
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def _busiest(totals: Mapping[int | str, int]) -> dict[str, Any]:
    node = max(totals, key=lambda p: totals[p]) if totals else None
    return {"node": node, "bytes": totals[node] if node is not None else 0}


PER_PEER_MAX = 256  # more peers: the per-peer ε stays in the histories only


def summarize(
    scenario: str,
    mode: str,
    rounds: int,
    histories: Mapping[int, list[dict[str, Any]]],
    completed: Iterable[int],
    failed: Iterable[int],
    wall_s: float,
    started_at: float,
    coordinator: Mapping[str, Any] | None = None,
    coordinator_history: list[dict[str, Any]] | None = None,
    crashed: Iterable[int] = (),
    engine: str = "launch",
    privacy: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The `summary.json` of a run: outcome, final holdout accuracy, traffic, time.

    Traffic counts every node, the coordinator (node "coordinator") included, so the
    two modes' totals and busiest nodes compare like for like; `engine = "sim"` (the
    simulator: nothing on a wire) leaves the traffic figures None. With `privacy` (the
    DP settings and accountant inputs) a `privacy` block adds each peer's final ε.
    """
    completed, failed = sorted(completed), sorted(failed)
    networked = engine != "sim"  # the simulator moves no bytes: its traffic is None
    finals = [
        h[-1]["holdout_accuracy"]
        for p, h in histories.items()
        if p in completed and h and h[-1]["holdout_accuracy"] is not None
    ]
    sent: dict[int | str, int] = {}
    through: dict[int | str, int] = {}
    if networked:
        sent = {p: sum(r["bytes_sent"] for r in h) for p, h in histories.items()}
        through = {p: sent[p] + sum(r["bytes_received"] for r in h) for p, h in histories.items()}
    if coordinator_history and networked:
        sent["coordinator"] = sum(r["bytes_sent"] for r in coordinator_history)
        through["coordinator"] = sent["coordinator"] + sum(
            r["bytes_received"] for r in coordinator_history
        )
    return {
        "scenario": scenario,
        "mode": mode,
        "engine": engine,
        "peers": len(histories),
        "rounds": rounds,
        "completed_peers": completed,
        "failed_peers": failed,
        "crashed_peers": sorted(crashed),  # killed on purpose by [faults] crash
        "final_holdout_accuracy": _stats(finals),
        "bytes_sent_total": sum(sent.values()) if networked else None,
        "bytes_sent_busiest": _busiest(sent) if networked else None,
        "bytes_through_busiest": _busiest(through) if networked else None,
        "wall_s": wall_s,
        "started_at": started_at,
        "coordinator": dict(coordinator) if coordinator is not None else None,
        "privacy": None if privacy is None else _privacy(privacy, histories),
    }


def _privacy(settings: Mapping[str, Any], histories: Mapping[int, list[dict[str, Any]]]) -> dict:
    """The DP settings with every peer's final ε (its last line's) and their spread."""
    final = {p: h[-1].get("epsilon") for p, h in histories.items() if h}
    known = [e for e in final.values() if e is not None]
    block = {**settings, "epsilon": _stats(known)}
    if len(final) <= PER_PEER_MAX:
        block["epsilon_per_peer"] = final
    return block
