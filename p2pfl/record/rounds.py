"""A peer's history: the one builder of `RoundRecord` lines, for every role.

`PeerHistory` owns `peer-<id>.jsonl`. Between two lines it tallies the bytes sent and
received and the time spent blocked waiting; `write` turns the tallies plus what the
round reports into one `RoundRecord` and starts the next tally. The gossip peer and
the centralized client both write through it, so their lines agree field for field.
Clocks are injected (wall, monotonic durations, process CPU) so tests can drive it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from p2pfl.record.history import HistoryWriter, RoundRecord

if TYPE_CHECKING:
    from p2pfl.core.privacy import Spent

Clock = Callable[[], float]


class PeerHistory:
    """Appends one `RoundRecord` per round to a peer's history file.

    `sent` may be called from another thread (the heartbeat ticker): tallies are
    guarded by a lock. Round 0's `cpu_s` is all of start-up (CPU since the process
    began), later rounds' the CPU since the previous line.
    """

    def __init__(
        self,
        path: Path,
        *,
        append: bool = False,
        clock: Clock = time.perf_counter,
        cpu: Clock = time.process_time,
        wall: Clock = time.time,
    ) -> None:
        self._writer = HistoryWriter(path, append=append)
        self._clock, self._cpu, self._wall = clock, cpu, wall
        self._t0 = clock()
        self._cpu0 = 0.0
        self._lock = threading.Lock()
        self._sent = self._received = 0
        self._wait_s = 0.0

    def sent(self, nbytes: int) -> None:
        """Count bytes this peer sent (models, heartbeats, updates)."""
        with self._lock:
            self._sent += nbytes

    def received(self, nbytes: int) -> None:
        """Count bytes this peer received."""
        with self._lock:
            self._received += nbytes

    def waited(self, seconds: float) -> None:
        """Count time spent blocked waiting for messages."""
        with self._lock:
            self._wait_s += seconds

    def write(
        self,
        round_: int,
        *,
        test_accuracy: float,
        holdout_accuracy: float | None,
        evaluated_on: str,
        train_loss: float | None = None,
        train_s: float = 0.0,
        eval_s: float = 0.0,
        comm_s: float = 0.0,
        heard: Iterable[int] = (),
        missing: Iterable[int] = (),
        disagreement: float | None = None,
        dp: Spent | None = None,
    ) -> RoundRecord:
        """Write round `round_`'s line with the tallies since the last one; reset them."""
        cpu = self._cpu()
        with self._lock:
            sent, received, wait_s = self._sent, self._received, self._wait_s
            self._sent = self._received = 0
            self._wait_s = 0.0
        record = RoundRecord(
            round=round_,
            train_loss=train_loss,
            test_accuracy=test_accuracy,
            holdout_accuracy=holdout_accuracy,
            bytes_sent=sent,
            bytes_received=received,
            train_s=train_s,
            eval_s=eval_s,
            comm_s=comm_s,
            wait_s=wait_s,
            cpu_s=cpu - self._cpu0,
            neighbours_heard=sorted(heard),
            neighbours_missing=sorted(missing),
            disagreement=disagreement,
            t=self._clock() - self._t0,
            time=self._wall(),
            evaluated_on=evaluated_on,
            epsilon=None if dp is None else dp.epsilon,
            dp_steps=None if dp is None else dp.steps,
            dp_q=None if dp is None else dp.q,
        )
        self._cpu0 = cpu
        self._writer.write(record)
        return record

    def close(self) -> None:
        """Close the file."""
        self._writer.close()


def simulated(
    round_: int,
    *,
    test_accuracy: float | None,
    holdout_accuracy: float | None,
    evaluated_on: str,
    t: float,
    wall: float,
    train_loss: float | None = None,
    heard: Iterable[int] = (),
    missing: Iterable[int] = (),
    disagreement: float | None = None,
    dp: Spent | None = None,
) -> RoundRecord:
    """A simulated peer's line: the same fields, the networked measurements (bytes,
    per-peer seconds, CPU) None, since the simulator runs every peer in one batched call.

    `t` is seconds since the simulation started, `wall` the unix time of the line.
    """
    return RoundRecord(
        round=round_,
        train_loss=train_loss,
        test_accuracy=test_accuracy,
        holdout_accuracy=holdout_accuracy,
        bytes_sent=None,
        bytes_received=None,
        train_s=None,
        eval_s=None,
        comm_s=None,
        wait_s=None,
        cpu_s=None,
        neighbours_heard=sorted(heard),
        neighbours_missing=sorted(missing),
        disagreement=disagreement,
        t=t,
        time=wall,
        evaluated_on=evaluated_on,
        epsilon=None if dp is None else dp.epsilon,
        dp_steps=None if dp is None else dp.steps,
        dp_q=None if dp is None else dp.q,
    )
