"""A simulated run's outputs: the same run folder as `p2pfl launch`, and the `Result`.

Up to `COLUMNAR_ABOVE` peers the folder holds what a launch writes: `peer-<id>.jsonl`
(simulated lines: `record.rounds.simulated`), `coordinator.jsonl` in centralized
mode, `models/peer-<id>.npz` (and `models/global.npz`), `summary.json`. Beyond it, the
per-peer files would number in the thousands: the histories go to one columnar
`history.npz` (one `[rounds + 1, peers]` array per field, NaN where a peer has no
line) and the models to `models/peers.npz` (`params`, `[peers, d]`); `summary.json`,
`coordinator.jsonl` and the plot stay. `p2pfl.record.runs.load_run` reads either form.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.record.history import (
    HistoryWriter,
    RoundRecord,
    ServerRecord,
    as_dict,
    save_model,
    summarize,
)
from p2pfl.record.runs import COLUMNS

COLUMNAR_ABOVE = 256  # more peers than this: history.npz and models/peers.npz


class Histories:
    """Every peer's lines as they are made: kept as columns, and written as JSON lines
    when the run is small enough (`COLUMNAR_ABOVE`); with `files` False (a JAX process
    other than the first of a distributed run) nothing is written."""

    def __init__(self, out: Path, peers: int, rounds: int, files: bool = True) -> None:
        self.out, self.peers, self.files = out, peers, files
        self.columnar = peers > COLUMNAR_ABOVE
        self.columns = {k: np.full((rounds + 1, peers), np.nan) for k in COLUMNS}
        self.last: dict[int, dict[str, Any]] = {}  # each peer's latest line
        self._writers: dict[int, HistoryWriter] = {}
        if not self.columnar and files:
            self._writers = {i: HistoryWriter(out / f"peer-{i}.jsonl") for i in range(peers)}

    def write(self, peer: int, record: RoundRecord) -> None:
        """Keep (and, for a small run, write) peer `peer`'s line."""
        line = as_dict(record)
        for k in COLUMNS:
            if line[k] is not None:
                self.columns[k][record.round, peer] = line[k]
        self.last[peer] = line
        if self._writers:
            self._writers[peer].write(record)

    def close(self) -> None:
        """Close the files; a columnar run writes `history.npz` now."""
        for w in self._writers.values():
            w.close()
        if self.columnar and self.files:
            np.savez(self.out / "history.npz", **self.columns)  # type: ignore[arg-type]


def write_models(out: Path, models: np.ndarray, global_model: np.ndarray | None) -> None:
    """The final models as a launch leaves them (per peer, or `models/peers.npz`)."""
    if len(models) > COLUMNAR_ABOVE:
        (out / "models").mkdir(parents=True, exist_ok=True)
        np.savez(out / "models" / "peers.npz", params=models)
    else:
        for i, params in enumerate(models):
            save_model(out / "models" / f"peer-{i}.npz", params)
    if global_model is not None:
        save_model(out / "models" / "global.npz", global_model)


def summary(
    name: str,
    mode: str,
    rounds: int,
    histories: Histories,
    completed: list[int],
    crashed: list[int],
    wall_s: float,
    started_at: float,
    server: list[ServerRecord],
    interrupted: bool,
    privacy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`summary.json` as a launch writes it, `engine = "sim"`; written to the folder."""
    lines = {i: [histories.last[i]] if i in histories.last else [] for i in range(histories.peers)}
    result = summarize(
        name,
        mode,
        rounds,
        lines,
        completed,
        [],
        wall_s,
        started_at,
        coordinator={"role": "server", "exit_code": 0} if mode == "centralized" else None,
        coordinator_history=[as_dict(r) for r in server],
        crashed=crashed,
        engine="sim",
        privacy=privacy,
    )
    result["interrupted"] = interrupted
    result["history"] = "history.npz" if histories.columnar else "peer-<id>.jsonl"
    if histories.files:
        (histories.out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
