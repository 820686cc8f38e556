"""The one history-line builder: tallies between lines, clocks injected, a line per round."""

from __future__ import annotations

import json
import threading

from p2pfl.record.rounds import PeerHistory


class FakeClock:
    """A settable clock."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_lines_carry_the_tallies_since_the_previous_line(tmp_path):
    """bytes and wait add up between two lines and start again at zero after each."""
    clock, cpu, wall = FakeClock(10.0), FakeClock(2.0), FakeClock(1e9)
    h = PeerHistory(tmp_path / "peer-0.jsonl", clock=clock, cpu=cpu, wall=wall)
    h.write(0, test_accuracy=0.1, holdout_accuracy=0.2, evaluated_on="initial")
    h.sent(100)
    h.sent(20)
    h.received(7)
    h.waited(0.5)
    clock.t, cpu.t = 11.5, 2.25
    r1 = h.write(1, test_accuracy=0.5, holdout_accuracy=0.6, evaluated_on="mixed", heard=[3, 1])
    r2 = h.write(2, test_accuracy=0.7, holdout_accuracy=None, evaluated_on="mixed", missing=[2])
    h.close()
    rows = [json.loads(line) for line in (tmp_path / "peer-0.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0]["cpu_s"] == 2.0  # round 0: all of start-up
    assert (r1.bytes_sent, r1.bytes_received, r1.wait_s) == (120, 7, 0.5)
    assert r1.t == 1.5 and r1.cpu_s == 0.25 and r1.neighbours_heard == [1, 3]
    assert (r2.bytes_sent, r2.bytes_received, r2.wait_s, r2.cpu_s) == (0, 0, 0.0, 0.0)
    assert rows[2]["neighbours_missing"] == [2] and rows[2]["holdout_accuracy"] is None


def test_bytes_sent_from_another_thread_all_count(tmp_path):
    """The heartbeat thread's sends and the round loop's are tallied without loss."""
    h = PeerHistory(tmp_path / "h.jsonl")

    def send_many() -> None:
        for _ in range(10_000):
            h.sent(1)

    threads = [threading.Thread(target=send_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (
        h.write(1, test_accuracy=0.0, holdout_accuracy=None, evaluated_on="mixed").bytes_sent
        == 40_000
    )
    h.close()


def test_append_keeps_the_earlier_lines(tmp_path):
    """A resumed peer appends to its history instead of truncating it."""
    path = tmp_path / "peer-1.jsonl"
    h = PeerHistory(path)
    h.write(0, test_accuracy=0.0, holdout_accuracy=None, evaluated_on="initial")
    h.close()
    h = PeerHistory(path, append=True)
    h.write(5, test_accuracy=0.0, holdout_accuracy=None, evaluated_on="mixed")
    h.close()
    assert [json.loads(line)["round"] for line in path.read_text().splitlines()] == [0, 5]
