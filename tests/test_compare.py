"""`p2pfl compare`'s report: hand-built run folders with known numbers, checked exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from p2pfl.app.compare import build_report, render_table, write_outputs

STARTED = 1000.0

# Centralized: the coordinator serves 3 peers, 100 B each way per peer per round.
COORDINATOR = [
    {"round": 0, "holdout_accuracy": 0.1, "bytes_sent": 0, "bytes_received": 0, "time": 1002.0},
    {"round": 1, "holdout_accuracy": 0.6, "bytes_sent": 300, "bytes_received": 300, "time": 1004.0},
    {
        "round": 2,
        "holdout_accuracy": 0.85,
        "bytes_sent": 300,
        "bytes_received": 300,
        "time": 1006.5,
    },
    {"round": 3, "holdout_accuracy": 0.9, "bytes_sent": 300, "bytes_received": 300, "time": 1008.0},
]
# Gossip: 3 peers, each sends 2 x 100 B per round; (accuracy, time) per round.
GOSSIP = {
    0: [(0.1, 1001.0), (0.5, 1003.0), (0.8, 1005.0), (0.88, 1007.0)],
    1: [(0.2, 1001.5), (0.6, 1003.5), (0.9, 1005.2), (0.9, 1007.5)],
    2: [(0.3, 1001.2), (0.7, 1003.1), (0.7, 1005.9), (0.92, 1007.1)],
}


def peer_row(r: int, acc: float | None, time: float, sent: int, received: int) -> dict[str, Any]:
    """One peer history line with the keys compare reads (and `t`)."""
    return {
        "round": r,
        "holdout_accuracy": acc,
        "bytes_sent": sent,
        "bytes_received": received,
        "time": time,
        "t": time - STARTED,
    }


def summary(mode: str, mean: float | None, through: dict[str, Any], **extra: Any) -> dict:
    """A summary.json as the launcher writes it, with the fields compare reads."""
    return {
        "scenario": "demo",
        "mode": mode,
        "peers": 3,
        "rounds": 3,
        "completed_peers": [0, 1, 2],
        "failed_peers": [],
        "final_holdout_accuracy": {"mean": mean, "min": 0.88, "max": 0.92},
        "bytes_sent_total": 1800,
        "bytes_sent_busiest": {"node": through["node"], "bytes": 900},
        "bytes_through_busiest": through,
        "wall_s": 12.5,
        "started_at": STARTED,
        "coordinator": None,
        **extra,
    }


def write_jsonl(path: Path, rows: list[dict[str, Any]], tail: str = "") -> None:
    """JSON lines, optionally followed by a raw (e.g. half-written) last line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    """A consistent centralized run (peers with gaps) and gossip run of scenario `demo`."""
    central, gossip = tmp_path / "centralized", tmp_path / "gossip"
    central.mkdir()
    gossip.mkdir()
    role = {"role": "server", "exit_code": 0}
    busiest_c = {"node": "coordinator", "bytes": 1800}
    s = summary("centralized", 0.92, busiest_c, coordinator=role)
    (central / "summary.json").write_text(json.dumps(s))
    write_jsonl(central / "coordinator.jsonl", COORDINATOR)
    # Peers are sampled: each history misses some rounds.
    for peer, rounds in {0: [0, 1, 3], 1: [0, 2, 3], 2: [0, 1, 2, 3]}.items():
        rows = [peer_row(r, 0.5, STARTED + r, 100 * (r > 0), 100 * (r > 0)) for r in rounds]
        write_jsonl(central / f"peer-{peer}.jsonl", rows)
    s = summary("gossip", 0.9, {"node": 0, "bytes": 1200})
    (gossip / "summary.json").write_text(json.dumps(s))
    for peer, points in GOSSIP.items():
        rows = [peer_row(r, a, t, 200 * (r > 0), 200 * (r > 0)) for r, (a, t) in enumerate(points)]
        write_jsonl(gossip / f"peer-{peer}.jsonl", rows)
    return central, gossip


def edit_summary(run: Path, **changes: Any) -> None:
    """Rewrite some top-level fields of a run's summary.json."""
    data = json.loads((run / "summary.json").read_text())
    data.update(changes)
    (run / "summary.json").write_text(json.dumps(data))


def test_centralized_curve_comes_from_the_coordinator(runs):
    """Global-model accuracy, coordinator sent+received cumulated, time since launch."""
    curve = build_report(*runs)["curves"]["centralized"]
    assert curve["round"] == [0, 1, 2, 3]
    assert curve["accuracy"] == [0.1, 0.6, 0.85, 0.9]
    assert curve["bytes"] == [0, 600, 1200, 1800]
    assert curve["seconds"] == pytest.approx([2.0, 4.0, 6.5, 8.0])


def test_gossip_curve_averages_peers(runs):
    """Mean peer accuracy, bytes sent by all peers cumulated, the slowest peer's time."""
    curve = build_report(*runs)["curves"]["gossip"]
    assert curve["round"] == [0, 1, 2, 3]
    assert curve["accuracy"] == pytest.approx([0.2, 0.6, 0.8, 0.9])
    assert curve["bytes"] == [0, 600, 1200, 1800]
    assert curve["seconds"] == pytest.approx([1.5, 3.5, 5.9, 7.5])


def test_gossip_curve_with_gaps_uses_the_peers_that_have_the_round(runs):
    """A peer missing a round is left out of that round's mean and time; its bytes still count."""
    _, gossip = runs
    rows = [peer_row(0, 0.1, 1001.0, 0, 0), peer_row(3, 0.5, 1009.0, 50, 0)]
    write_jsonl(gossip / "peer-0.jsonl", rows)  # peer 0 misses rounds 1 and 2
    curve = build_report(*runs)["curves"]["gossip"]
    assert curve["accuracy"] == pytest.approx([0.2, 0.65, 0.8, (0.5 + 0.9 + 0.92) / 3])
    assert curve["bytes"] == [0, 400, 800, 1250]
    assert curve["seconds"] == pytest.approx([1.5, 3.5, 5.9, 9.0])


def test_centralized_peer_gaps_and_null_accuracy_do_not_break_the_report(runs):
    """Sampled peers' gappy histories are ignored; a null global accuracy stays null."""
    central, _ = runs
    rows = [dict(r) for r in COORDINATOR]
    rows[1]["holdout_accuracy"] = None
    write_jsonl(central / "coordinator.jsonl", rows)
    report = build_report(*runs, target=0.5)
    assert report["curves"]["centralized"]["accuracy"] == [0.1, None, 0.85, 0.9]
    assert report["modes"]["centralized"]["rounds_to_target"] == 2
    assert report["modes"]["centralized"]["completed_peers"] == 3


def test_garbled_last_line_is_skipped(runs):
    """A half-written last line (a run cut off mid-write) is ignored in both modes."""
    central, gossip = runs
    write_jsonl(central / "coordinator.jsonl", COORDINATOR, tail='{"round": 4, "holdout_acc')
    text = (gossip / "peer-1.jsonl").read_text()
    (gossip / "peer-1.jsonl").write_text(text + '{"round": 4, "bytes_se')
    curves = build_report(*runs)["curves"]
    assert curves["centralized"]["round"] == [0, 1, 2, 3]
    assert curves["centralized"]["bytes"][-1] == 1800
    assert curves["gossip"]["round"] == [0, 1, 2, 3]
    assert curves["gossip"]["accuracy"][-1] == pytest.approx(0.9)


def test_rounds_to_target(runs):
    """The first round whose curve accuracy is at least the target; null when never reached."""
    modes = build_report(*runs, target=0.6)["modes"]
    assert (modes["centralized"]["rounds_to_target"], modes["gossip"]["rounds_to_target"]) == (1, 1)
    modes = build_report(*runs, target=0.85)["modes"]
    assert (modes["centralized"]["rounds_to_target"], modes["gossip"]["rounds_to_target"]) == (2, 3)
    modes = build_report(*runs, target=0.95)["modes"]
    assert modes["centralized"]["rounds_to_target"] is None
    assert modes["gossip"]["rounds_to_target"] is None


@pytest.mark.parametrize(
    ("central_mean", "gossip_mean", "target"),
    [
        (0.92, 0.9, 0.85),  # 0.95 * 0.9 = 0.855 -> 0.85
        (0.6, 0.97, 0.57),  # 0.95 * 0.6 is 0.5699999... in floats: still 0.57
        (0.96, 0.99, 0.91),  # 0.912 -> 0.91
        (None, 0.9, 0.5),  # a mode without a final accuracy: 0.5
        (0.9, None, 0.5),
    ],
)
def test_default_target(runs, central_mean, gossip_mean, target):
    """Default target: 95 % of the lower final mean, rounded down to 0.01; 0.5 if one is null."""
    central, gossip = runs
    for run, mean in ((central, central_mean), (gossip, gossip_mean)):
        edit_summary(run, final_holdout_accuracy={"mean": mean, "min": None, "max": None})
    assert build_report(central, gossip)["target_accuracy"] == target


def test_mode_fields_and_busiest_ratio(runs):
    """Each mode's column comes from its summary; the ratio is centralized / gossip busiest."""
    central, gossip = runs
    report = build_report(central, gossip)
    c, g = report["modes"]["centralized"], report["modes"]["gossip"]
    assert report["scenario"] == "demo"
    assert (c["busiest_node"], c["busiest_bytes"]) == ("coordinator", 1800)
    assert (g["busiest_node"], g["busiest_bytes"]) == (0, 1200)
    assert report["busiest_ratio"] == pytest.approx(1.5)
    assert c["final_accuracy_mean"] == 0.92 and g["final_accuracy_max"] == 0.92
    assert (c["bytes_sent_total"], c["wall_s"], c["peers"]) == (1800, 12.5, 3)
    assert (c["run"], g["run"]) == (str(central), str(gossip))
    edit_summary(gossip, bytes_through_busiest={"node": None, "bytes": 0})
    assert build_report(central, gossip)["busiest_ratio"] is None


def test_table_rows_and_title(runs):
    """The rich table has metric/centralized/gossip columns, human byte units and the ratio."""
    table = render_table(build_report(*runs))
    assert [c.header for c in table.columns] == ["metric", "centralized", "gossip"]
    console = Console(record=True, width=160)
    console.print(table)
    text = console.export_text()
    assert "target holdout accuracy 0.85" in text
    assert "1.8 kB (coordinator)" in text and "1.2 kB (peer 0)" in text
    assert "busiest node, centralized ÷ gossip" in text and "1.50" in text
    assert "rounds to reach 0.85" in text


def test_write_outputs(runs, tmp_path):
    """compare.json is the report, compare.md names both modes and the ratio, the PNG is drawn."""
    central, gossip = runs
    report = build_report(central, gossip)
    out = tmp_path / "cmp" / "demo"
    write_outputs(report, central, gossip, out)
    assert json.loads((out / "compare.json").read_text()) == report
    md = (out / "compare.md").read_text()
    assert md.startswith("## demo") and "0.85" in md.splitlines()[0]
    assert "| metric | centralized | gossip |" in md and "| 1.50 |" in md
    png = (out / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_missing_summary_names_the_file(runs):
    """A folder without summary.json is a ValueError naming the folder and the file."""
    central, gossip = runs
    (central / "summary.json").unlink()
    with pytest.raises(ValueError, match=r"summary\.json") as err:
        build_report(central, gossip)
    assert str(central) in str(err.value)


def test_empty_histories_name_the_file(runs):
    """No coordinator line, or no peer history, is a ValueError naming folder and file."""
    central, gossip = runs
    (central / "coordinator.jsonl").write_text('{"round": 0, "holdo')
    with pytest.raises(ValueError, match=r"coordinator\.jsonl") as err:
        build_report(central, gossip)
    assert str(central) in str(err.value)
    write_jsonl(central / "coordinator.jsonl", COORDINATOR)
    for p in gossip.glob("peer-*.jsonl"):
        p.unlink()
    with pytest.raises(ValueError, match=r"peer-\*\.jsonl") as err:
        build_report(central, gossip)
    assert str(gossip) in str(err.value)


def test_swapped_folders_are_refused(runs):
    """Passing the gossip run as the centralized one is a ValueError naming the mode."""
    central, gossip = runs
    with pytest.raises(ValueError, match="mode is 'gossip', expected 'centralized'"):
        build_report(gossip, central)
