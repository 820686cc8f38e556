"""Per-round records as JSON lines, and the run summary built from them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RoundRecord:
    """One line of `peer-<id>.jsonl`; round 0 is the initial model, before any training."""

    round: int
    train_loss: float | None
    test_accuracy: float
    holdout_accuracy: float | None
    bytes_sent: int
    bytes_received: int
    train_s: float
    eval_s: float
    comm_s: float
    wait_s: float
    cpu_s: float  # CPU time of this process in the round (round 0: all of start-up)
    neighbours_heard: list[int]
    neighbours_missing: list[int]
    disagreement: float | None
    t: float  # seconds since the peer process started


class HistoryWriter:
    """Appends records to a JSON-lines file, one flushed line per round."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w", buffering=1)

    def write(self, record: RoundRecord) -> None:
        """Append one round."""
        self._file.write(json.dumps(asdict(record)) + "\n")

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


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "min": None, "max": None}
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def summarize(
    scenario: str,
    mode: str,
    rounds: int,
    histories: Mapping[int, list[dict[str, Any]]],
    completed: Iterable[int],
    failed: Iterable[int],
    wall_s: float,
) -> dict[str, Any]:
    """The `summary.json` of a run: outcome, final holdout accuracy, traffic, time."""
    completed, failed = sorted(completed), sorted(failed)
    finals = [
        h[-1]["holdout_accuracy"]
        for p, h in histories.items()
        if p in completed and h and h[-1]["holdout_accuracy"] is not None
    ]
    sent = {p: sum(r["bytes_sent"] for r in h) for p, h in histories.items()}
    busiest = max(sent, key=lambda p: sent[p]) if sent else None
    return {
        "scenario": scenario,
        "mode": mode,
        "peers": len(histories),
        "rounds": rounds,
        "completed_peers": completed,
        "failed_peers": failed,
        "final_holdout_accuracy": _stats(finals),
        "bytes_sent_total": sum(sent.values()),
        "bytes_sent_busiest": {
            "peer": busiest,
            "bytes": sent.get(busiest, 0) if busiest is not None else 0,
        },
        "wall_s": wall_s,
    }
