"""A finished run as Python values: `Result`, and `load_run` to read any run folder back.

Both engines leave the same folder (`p2pfl launch`: one history file per process;
`p2pfl simulate`: the same files, or for very large runs one columnar `history.npz`
and `models/peers.npz`); `load_run` turns either into a `Result`, so a run launched
as processes and one simulated are read, compared and plotted by the same code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.record.history import read

# per-round, per-peer figures every Result carries: [rounds + 1, peers], NaN where a
# peer has no line that round
COLUMNS = ("holdout_accuracy", "test_accuracy", "train_loss", "disagreement", "epsilon", "dp_steps")


@dataclass
class Result:
    """What a run gives back: its summary, per-round arrays and final models.

    `history[name]` is `[rounds + 1, peers]` float for each of `COLUMNS` (NaN where a
    peer has no line that round); `models` is `[peers, d]` float32 (a peer that left no
    final model is a row of NaN); in centralized mode `server` holds the coordinator's
    lines and `global_model` the final global model.
    """

    summary: dict[str, Any]
    history: dict[str, np.ndarray]
    models: np.ndarray
    out: Path
    server: list[dict[str, Any]] = field(default_factory=list)
    global_model: np.ndarray | None = None


def _columns(
    lines: dict[int, list[dict[str, Any]]], peers: int, rounds: int
) -> dict[str, np.ndarray]:
    cols = {k: np.full((rounds + 1, peers), np.nan) for k in COLUMNS}
    for i, rows in lines.items():
        for row in rows:
            r = row.get("round")
            if not isinstance(r, int) or not 0 <= r <= rounds:
                continue
            for k in COLUMNS:
                if isinstance(row.get(k), int | float):
                    cols[k][r, i] = row[k]
    return cols


def _models(out: Path, peers: int) -> np.ndarray:
    stacked = out / "models" / "peers.npz"
    if stacked.is_file():
        with np.load(stacked) as f:
            return np.asarray(f["params"], np.float32)
    found: dict[int, np.ndarray] = {}
    for path in (out / "models").glob("peer-*.npz"):
        if m := re.fullmatch(r"peer-(\d+)\.npz", path.name):
            with np.load(path) as f:
                found[int(m.group(1))] = np.asarray(f["params"], np.float32)
    if not found:
        return np.zeros((peers, 0), np.float32)
    d = len(next(iter(found.values())))
    models = np.full((peers, d), np.nan, np.float32)
    for i, params in found.items():
        if i < peers:
            models[i] = params
    return models


def load_run(out: str | Path) -> Result:
    """The run in folder `out` (launched or simulated) as a `Result`.

    Raises ValueError when the folder has no `summary.json` (not a finished run).
    """
    out = Path(out)
    path = out / "summary.json"
    if not path.is_file():
        raise ValueError(f"{out}: no summary.json; is this a finished p2pfl run folder?")
    summary = json.loads(path.read_text())
    peers, rounds = int(summary["peers"]), int(summary["rounds"])
    columnar = out / "history.npz"
    if columnar.is_file():
        with np.load(columnar) as f:
            history = {k: np.asarray(f[k]) for k in COLUMNS}
    else:
        lines = {i: read(out / f"peer-{i}.jsonl") for i in range(peers)}
        history = _columns(lines, peers, rounds)
    server = read(out / "coordinator.jsonl") if summary.get("mode") == "centralized" else []
    global_path = out / "models" / "global.npz"
    global_model = None
    if global_path.is_file():
        with np.load(global_path) as f:
            global_model = np.asarray(f["params"], np.float32)
    return Result(summary, history, _models(out, peers), out, server, global_model)
